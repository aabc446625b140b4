"""`cryo-forum info`: summaries of STAR, .cs, .mrcs and volume files, as text and as one JSON object."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryo_forum import cli
from cryo_forum.io import star
from cryo_forum.io.mrc import write_stack, write_volume


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
