"""STAR reading and writing: RELION 3.0, 3.1 and 5 layouts survive a round trip, checked with plain starfile."""

import numpy as np
import pandas as pd
import pytest
import starfile

from cryo_forum.errors import CryoForumError
from cryo_forum.io import star


def relion30_block(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            star.IMAGE_NAME: [f"{i + 1:06d}@Extract/stack.mrcs" for i in range(n)],
            star.MICROGRAPH_NAME: [f"{i:04d}" for i in range(n)],
            star.ANGLE_ROT: rng.uniform(-180, 180, n).round(3),
            star.ORIGIN_X: rng.normal(size=n).round(3),
            star.ORIGIN_Y: rng.normal(size=n).round(3),
            star.DETECTOR_PIXEL_SIZE: np.full(n, 5.0),
            star.MAGNIFICATION: np.full(n, 50000.0),
            star.CLASS_NUMBER: np.arange(n) % 3 + 1,
        }
    )


def relion31_blocks(extra_optics: dict | None = None, extra_particles: dict | None = None) -> dict:
    optics = pd.DataFrame(
        {
            star.OPTICS_GROUP_NAME: ["opticsGroup1", "opticsGroup2"],
            star.OPTICS_GROUP: [1, 2],
            star.IMAGE_PIXEL_SIZE: [1.1, 2.2],
            star.IMAGE_SIZE: [64, 64],
            star.VOLTAGE: [300.0, 200.0],
            **(extra_optics or {}),
        }
    )
    particles = pd.DataFrame(
        {
            star.IMAGE_NAME: ["000001@a.mrcs", "000002@a.mrcs", "000001@b b.mrcs"],
            star.OPTICS_GROUP: [1, 1, 2],
            star.ORIGIN_X_ANGST: [0.5, -1.25, 2.0],
            **(extra_particles or {}),
        }
    )
    return {star.OPTICS_BLOCK: optics, star.PARTICLES_BLOCK: particles}


def assert_blocks_equal(read: dict, written: dict) -> None:
    assert list(read) == list(written)
    for name, block in written.items():
        if isinstance(block, dict):
            assert read[name] == block
        else:
            pd.testing.assert_frame_equal(read[name], block, check_dtype=False, atol=1e-6)


def test_relion30_single_block_round_trip(tmp_path):
    block = relion30_block()
    path = tmp_path / "particles.star"
    star.write_star(path, {"": block})
    assert "data_\n" in path.read_text()
    plain = starfile.read(path, always_dict=True, parse_as_string=[star.MICROGRAPH_NAME])
    assert_blocks_equal(plain, {"": block})
    again = star.read_star(path)
    assert again[""][star.MICROGRAPH_NAME].tolist() == block[star.MICROGRAPH_NAME].tolist()  # "0001" stays text
    assert star.star_version(path) is None


def test_relion31_two_optics_groups_round_trip(tmp_path):
    blocks = relion31_blocks()
    first, second = tmp_path / "in.star", tmp_path / "out.star"
    star.write_star(first, blocks, version=30001)
    star.write_star(second, star.read_star(first), inputs=[first], version=star.star_version(first))
    assert star.star_version(second) == 30001
    assert_blocks_equal(starfile.read(second, always_dict=True), blocks)


def test_relion5_extra_columns_and_blocks_survive(tmp_path):
    blocks = relion31_blocks(
        extra_optics={
            "rlnMicrographOriginalPixelSize": [0.55, 1.1],
            "rlnCtfDataAreCtfPremultiplied": [0, 0],
            "rlnImageDimensionality": [2, 2],
        },
        extra_particles={
            "rlnTomoName": ["TS_01", "TS_01", "TS_02"],
            "rlnCoordinateZ": [10.0, 20.0, 30.0],
            "rlnOriginZAngst": [0.0, 1.5, -1.5],
        },
    )
    blocks = {"general": {"rlnTomoSubTomosAre2DStacks": 1}, **blocks}
    source = tmp_path / "relion5.star"
    star.write_star(source, blocks, version=50001)
    copy = tmp_path / "copy.star"
    star.write_star(copy, star.read_star(source), inputs=[source], version=star.star_version(source))
    assert star.star_version(copy) == 50001
    assert_blocks_equal(starfile.read(copy, always_dict=True), blocks)


def test_booleans_are_written_as_integers(tmp_path):
    block = pd.DataFrame({star.IMAGE_NAME: ["000001@a.mrcs", "000002@a.mrcs"], star.OUTLIER: [True, False]})
    path = tmp_path / "flags.star"
    star.write_star(path, {"particles": block})
    assert starfile.read(path)[star.OUTLIER].tolist() == [1, 0]


def test_writing_over_an_input_is_refused(tmp_path):
    path = tmp_path / "in.star"
    star.write_star(path, relion31_blocks())
    before = path.read_text()
    with pytest.raises(CryoForumError, match=r"in\.star"):
        star.write_star(path, {"particles": relion30_block()}, inputs=[path])
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.star"]


@pytest.mark.parametrize(
    "content",
    [None, b"", b"\x00\x01\x02binary\xff\xfe", b"# just a comment\n"],
    ids=["missing", "empty", "binary", "no-blocks"],
)
def test_bad_star_files_name_the_file(tmp_path, content):
    path = tmp_path / "bad.star"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CryoForumError, match=r"bad\.star"):
        star.read_star(path)
