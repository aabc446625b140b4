"""`cryo-forum info`: summaries of STAR, .cs, .mrcs and volume files, as text and as one JSON object."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryo_forum import cli
from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.io import summary as summary_module
from cryo_forum.io.mrc import mrc_info, write_stack, write_volume
from cryo_forum.io.particles import ParticleSet


@pytest.fixture
def info_only(monkeypatch):
    """The dispatcher with just this command, so the test does not depend on other commands' modules."""
    monkeypatch.setattr(cli, "COMMANDS", ["info"])


@pytest.fixture
def relion31(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((3, 24, 24)), 1.2)
    optics = pd.DataFrame(
        {
            star.OPTICS_GROUP_NAME: ["opticsGroup1", "opticsGroup2"],
            star.OPTICS_GROUP: [1, 2],
            star.IMAGE_PIXEL_SIZE: [1.2, 1.2],
            star.IMAGE_SIZE: [24, 24],
            star.VOLTAGE: [300.0, 300.0],
        }
    )
    particles = pd.DataFrame(
        {
            star.IMAGE_NAME: ["000001@a.mrcs", "000002@a.mrcs", "000003@a.mrcs", "000001@gone.mrcs"],
            star.OPTICS_GROUP: [1, 2, 2, 1],
            star.ANGLE_ROT: [0.0, 1.0, 2.0, 3.0],
            star.ANGLE_TILT: [0.0, 1.0, 2.0, 3.0],
            star.ANGLE_PSI: [0.0, 1.0, 2.0, 3.0],
        }
    )
    path = tmp_path / "particles.star"
    star.write_star(path, {"optics": optics, "particles": particles}, version=30001)
    return path


def run_json(capsys, *args) -> dict:
    assert cli.main(["info", *map(str, args), "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)  # exactly one JSON document, nothing else on stdout


def test_star_summary_as_json(info_only, relion31, capsys):
    summary = run_json(capsys, relion31)
    assert summary["n_particles"] == 4 and summary["box_size"] == 24
    assert summary["pixel_size"] == pytest.approx(1.2) and summary["optics_groups"] == 2
    assert summary["has_poses"] is True and summary["has_ctf"] is False
    assert summary["relion_version"] == "3.1" and summary["stacks"] == 2
    assert summary["stacks_missing"] == ["gone.mrcs"]


def test_star_summary_as_text(info_only, relion31, capsys):
    assert cli.main(["info", str(relion31)]) == 0
    text = capsys.readouterr().out
    assert "particles:      4" in text and "box:            24 px" in text
    assert "optics groups:  2" in text and "poses:          yes" in text and "CTF:            no" in text
    assert "RELION 3.1" in text and "1 not found (first: gone.mrcs" in text


def test_stack_volume_and_cs(info_only, tmp_path, capsys):
    write_stack(tmp_path / "s.mrcs", np.zeros((5, 16, 16)), 2.5)
    summary = run_json(capsys, tmp_path / "s.mrcs")
    assert (summary["n_particles"], summary["box_size"], summary["pixel_size"]) == (5, 16, 2.5)
    assert summary["has_poses"] is False and summary["optics_groups"] == 1

    write_volume(tmp_path / "map.mrc", np.zeros((12, 12, 12)), 3.5)
    summary = run_json(capsys, tmp_path / "map.mrc")
    assert summary["kind"] == "volume" and summary["n_particles"] == 0
    assert summary["box_size"] == 12 and summary["pixel_size"] == 3.5

    data = np.zeros(3, dtype=[("blob/path", "S16"), ("blob/idx", "<u4"), ("blob/psize_A", "<f4"), ("ctf/df1_A", "<f4")])
    data["blob/path"], data["blob/idx"], data["blob/psize_A"] = b"s.mrcs", [0, 1, 2], 2.5
    with open(tmp_path / "p.cs", "wb") as handle:
        np.save(handle, data)
    summary = run_json(capsys, tmp_path / "p.cs", "--datadir", tmp_path)
    assert summary["format"] == "cs" and summary["n_particles"] == 3 and summary["box_size"] == 16
    assert summary["has_ctf"] is True and summary["has_poses"] is False and summary["stacks_missing"] == []


def test_bad_file_is_a_one_line_error(info_only, tmp_path, capsys):
    assert cli.main(["info", str(tmp_path / "missing.star")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "missing.star" in captured.err


def test_console_script(relion31):
    script = Path(sys.executable).parent / "cryo-forum"
    result = subprocess.run(
        [str(script), "info", str(relion31), "--json"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["n_particles"] == 4


def write_map(path, shape, ispg, voxel_size=1.0):
    """A float32 file with the given space group and mz = nz (mrcfile's header for 3-D data, and Chimera's)."""
    with mrcfile.new(path, overwrite=True) as handle:
        handle.set_data(np.zeros(shape, np.float32))
        handle.header.ispg = ispg
        if voxel_size:
            handle.voxel_size = voxel_size
    return path


@pytest.mark.parametrize("shape", [(69, 57, 75), (30, 30, 30), (128, 32, 32)], ids=["chimera", "cube", "tall"])
def test_ispg0_maps_are_volumes(info_only, tmp_path, capsys, shape):
    path = write_map(tmp_path / "map.mrc", shape, ispg=0, voxel_size=1.1)
    summary = run_json(capsys, path)
    assert summary["kind"] == "volume" and summary["shape"] == list(shape) and summary["box_size"] == shape[-1]
    assert cli.main(["info", str(path)]) == 0
    assert f"shape:          {shape[2]} x {shape[1]} x {shape[0]} voxels" in capsys.readouterr().out
    with pytest.raises(CryoForumError, match=r"map\.mrc: is a 3-D volume"):
        ParticleSet.open(path)  # the particle reader follows the same rule


def test_marked_stack_named_mrc_is_particles(info_only, tmp_path, capsys):
    path = tmp_path / "stack.mrc"
    with mrcfile.new(path) as handle:
        handle.set_data(np.zeros((6, 16, 16), np.float32))
        handle.set_image_stack()
    summary = run_json(capsys, path)
    assert summary["kind"] == "particles" and summary["n_particles"] == 6 and summary["box_size"] == 16
    assert len(ParticleSet.open(path)) == 6


def test_pixel_size_not_set(info_only, tmp_path, capsys):
    volume = write_map(tmp_path / "map.mrc", (8, 8, 8), ispg=1, voxel_size=None)
    assert run_json(capsys, volume)["pixel_size"] is None
    assert cli.main(["info", str(volume)]) == 0
    assert "pixel size:     not set\n" in capsys.readouterr().out
    stack = write_map(tmp_path / "s.mrcs", (3, 8, 8), ispg=0, voxel_size=None)
    assert run_json(capsys, stack)["pixel_size"] is None
    assert cli.main(["info", str(stack)]) == 0
    assert "pixel size:     not set\n" in capsys.readouterr().out


def write_particles_star(path, names, image_size=None):
    """A RELION 3.1 STAR of particles ``names`` (``index@stack``), rlnImageSize in the optics if given."""
    optics = pd.DataFrame({star.OPTICS_GROUP_NAME: ["opticsGroup1"], star.OPTICS_GROUP: [1]})
    optics[star.IMAGE_PIXEL_SIZE] = 1.0
    if image_size is not None:
        optics[star.IMAGE_SIZE] = image_size
    particles = pd.DataFrame({star.IMAGE_NAME: names, star.OPTICS_GROUP: 1})
    star.write_star(path, {"optics": optics, "particles": particles}, version=30001)
    return path


def test_box_comes_from_the_stacks_not_the_metadata(info_only, tmp_path, capsys):
    write_stack(tmp_path / "a.mrcs", np.zeros((2, 30, 30)), 1.0)
    path = write_particles_star(tmp_path / "p.star", ["000001@a.mrcs", "000002@a.mrcs"], image_size=448)
    summary = run_json(capsys, path)
    assert (summary["box_size"], summary["box_size_metadata"], summary["box_sizes_stacks"]) == (30, 448, [30])
    assert cli.main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "box:            30 px\n" in text
    assert "box mismatch:   rlnImageSize is 448 px but the stacks hold 30 px images" in text


def test_stacks_of_different_boxes(info_only, tmp_path, capsys):
    write_stack(tmp_path / "a.mrcs", np.zeros((1, 24, 24)), 1.0)
    write_stack(tmp_path / "b.mrcs", np.zeros((1, 32, 32)), 1.0)
    path = write_particles_star(tmp_path / "p.star", ["1@a.mrcs", "1@b.mrcs"], image_size=24)
    summary = run_json(capsys, path)
    assert summary["box_size"] is None and summary["box_sizes_stacks"] == [24, 32]
    assert cli.main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "box:            differs between stacks: 24, 32 px" in text
    assert "box mismatch:   rlnImageSize is 24 px but the stacks hold 24 or 32 px images" in text


def test_damaged_stacks_are_reported_not_errors(info_only, tmp_path, capsys):
    write_stack(tmp_path / "good.mrcs", np.zeros((3, 16, 16)), 1.0)
    write_stack(tmp_path / "cut.mrcs", np.zeros((3, 16, 16)), 1.0)
    os.truncate(tmp_path / "cut.mrcs", (tmp_path / "cut.mrcs").stat().st_size - 16 * 16 * 4)  # last image gone
    write_stack(tmp_path / "few.mrcs", np.zeros((3, 16, 16)), 1.0)
    (tmp_path / "bad.mrcs").write_bytes(b"not an MRC file" * 100)
    names = ["1@good.mrcs", "3@good.mrcs", "1@cut.mrcs", "2@few.mrcs", "5@few.mrcs", "1@gone.mrcs", "1@bad.mrcs"]
    path = write_particles_star(tmp_path / "p.star", names, image_size=16)
    summary = run_json(capsys, path)
    assert summary["stacks"] == 5 and summary["box_size"] == 16 and summary["box_size_metadata"] == 16
    assert summary["stacks_missing"] == ["gone.mrcs"] and summary["stacks_unreadable"] == ["bad.mrcs"]
    assert summary["stacks_truncated"] == ["cut.mrcs"] and summary["stacks_short"] == ["few.mrcs"]
    assert cli.main(["info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "stacks:         5 referenced, 1 not found (first: gone.mrcs; try --datadir)" in text
    assert "unreadable:     1 (not readable as square MRC images; first: bad.mrcs)" in text
    assert "truncated:      1 (shorter than its header says; first: cut.mrcs)" in text
    assert "too few images: 1 (holds fewer images than the metadata refers to; first: few.mrcs)" in text
    assert "mismatch" not in text


def test_truncated_volume_is_described(info_only, tmp_path, capsys):
    path = write_map(tmp_path / "map.mrc", (8, 8, 8), ispg=1)
    os.truncate(path, path.stat().st_size - 10)
    assert run_json(capsys, path)["truncated"] is True
    assert cli.main(["info", str(path)]) == 0
    assert "truncated:      the file is shorter than its header says" in capsys.readouterr().out


def test_many_stacks_each_header_opened_once_and_no_data_read(info_only, tmp_path, capsys, monkeypatch):
    write_stack(tmp_path / "s0.mrcs", np.zeros((2, 8, 8)), 1.0)
    content = (tmp_path / "s0.mrcs").read_bytes()
    for i in range(1, 500):
        (tmp_path / f"s{i}.mrcs").write_bytes(content)
    names = [f"{k}@s{i}.mrcs" for i in range(500) for k in (1, 2, 1)]
    path = write_particles_star(tmp_path / "p.star", names, image_size=8)
    opened = []
    monkeypatch.setattr(summary_module, "mrc_info", lambda stack: opened.append(stack.name) or mrc_info(stack))
    monkeypatch.setattr(mrcfile, "mmap", None)  # no memory map, so no image data, is opened
    summary = run_json(capsys, path)
    assert summary["stacks"] == 500 and summary["box_size"] == 8 and summary["stacks_short"] == []
    assert sorted(opened) == sorted(f"s{i}.mrcs" for i in range(500))


def test_output_cut_short_by_the_reader_ends_quietly(tmp_path):
    names = [f"1@{'missing_stack_with_a_long_name_' * 2}{i:05d}.mrcs" for i in range(3000)]
    path = write_particles_star(tmp_path / "p.star", names)  # --json lists them all: far more than a pipe holds
    script = Path(sys.executable).parent / "cryo-forum"
    process = subprocess.Popen(
        [str(script), "info", str(path), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path
    )
    assert process.stdout.read(100).startswith(b"{")
    process.stdout.close()  # like `cryo-forum info ... | head -c 100`
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == cli.BROKEN_PIPE_STATUS
    assert stderr == ""
