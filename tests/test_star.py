"""STAR reading and writing: RELION 3.0, 3.1 and 5 layouts survive a round trip, checked with plain starfile."""

import csv

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


def mixed_block() -> pd.DataFrame:
    return pd.DataFrame(
        {
            star.IMAGE_NAME: ["000001@my stack.mrcs", "000002@a.mrcs", "000003@a.mrcs"],
            "rlnNote": ["two words", "", "plain"],
            star.CLASS_NUMBER: np.array([1, -2, 30], dtype=np.int64),
            star.ANGLE_ROT: [0.1234564, np.nan, -179.5],
            "cfScore": np.array([1.5, 2.25, np.nan], dtype=np.float32),
            star.OUTLIER: [True, False, True],
        }
    )


def test_written_rows_are_pinned_and_read_back_exactly_by_starfile(tmp_path):
    path = tmp_path / "mixed.star"
    star.write_star(path, {"general": {"rlnFlag": True, "rlnText": "a b", "rlnSize": 1.5}, "particles": mixed_block()})
    text = path.read_text()
    assert '_rlnFlag\t\t\t1\n_rlnText\t\t\t"a b"\n_rlnSize\t\t\t1.5\n' in text
    assert '"000001@my stack.mrcs"\t"two words"\t1\t0.123456\t1.500000\t1\n' in text
    assert '000002@a.mrcs\t""\t-2\tnan\t2.250000\t0\n000003@a.mrcs\tplain\t30\t-179.500000\tnan\t1\n\n\n' in text
    expected = mixed_block().assign(**{star.ANGLE_ROT: [0.123456, np.nan, -179.5], star.OUTLIER: [1, 0, 1]})
    expected["cfScore"] = expected["cfScore"].astype(np.float64)
    for read in (starfile.read(path, always_dict=True), star.read_star(path)):
        assert read["general"] == {"rlnFlag": 1, "rlnText": "a b", "rlnSize": 1.5}
        pd.testing.assert_frame_equal(read["particles"], expected, check_exact=True)


def test_reading_agrees_with_starfile_on_hand_written_files(tmp_path):
    text = (
        "\n# version 30001\n\ndata_optics\n\nloop_ \n_rlnOpticsGroupName #1 \n_rlnOpticsGroup #2 \n"
        "_rlnImagePixelSize #3 \nopticsGroup1            1     1.060000 \n \n\n"
        "data_empty\n\nloop_\n_rlnX #1\n_rlnY #2\n\n"
        "data_general\n\n_rlnTomoSubTomosAre2DStacks                       1\n_rlnMicrographName 0001\n"
        "_rlnWord 'a b'\n\n"
        "data_particles\r\n\r\nloop_\r\n_rlnImageName #1\r\n_rlnMicrographName #2\r\n_rlnNote #3\r\n_rlnCode #4\r\n"
        "_rlnAllNan #5\r\n_rlnValue #6\r\n_rlnEmpty #7\r\n# a comment line\r\n"
        "  000001@Extract/a.mrcs   0001   'single quoted'   0002  nan  1 \"\" # trailing comment\r\n\r\n"
        '000002@Extract/a.mrcs 0002 "double quoted" 0010 nan <NA> ""\r\n'
        "000003@Extract/a.mrcs 0003 plain 7 NaN 2.5 ''"
    )
    path = tmp_path / "quirks.star"
    path.write_bytes(text.encode())
    reference = starfile.read(path, always_dict=True, parse_as_string=star.STRING_COLUMNS)
    mine = star.read_star(path)
    assert list(mine) == ["optics", "empty", "general", "particles"] == list(reference)
    general = {"rlnTomoSubTomosAre2DStacks": 1, star.MICROGRAPH_NAME: "0001", "rlnWord": "a b"}
    assert mine["general"] == reference["general"] == general
    for name in ("optics", "empty", "particles"):
        pd.testing.assert_frame_equal(mine[name], reference[name], check_exact=True)
    particles = mine["particles"]
    assert particles["rlnNote"].tolist() == ["single quoted", "double quoted", "plain"]
    assert particles[star.MICROGRAPH_NAME].tolist() == ["0001", "0002", "0003"]
    assert particles["rlnCode"].tolist() == [2, 10, 7] and len(mine["empty"]) == 0
    assert particles["rlnEmpty"].tolist() == ["", "", ""]  # all-empty text is not taken for missing numbers


def test_long_loops_are_read_completely(tmp_path):
    n = 6000  # about 400 kB of rows: more than one read of the streaming parser
    block = pd.DataFrame(
        {
            star.IMAGE_NAME: [f"{i + 1:06d}@Extract/job012/Movies/stack_{i // 100:04d}.mrcs" for i in range(n)],
            star.ANGLE_ROT: np.linspace(-180, 180, n).round(6),
            star.RANDOM_SUBSET: np.arange(n) % 2 + 1,
        }
    )
    path = tmp_path / "long.star"
    star.write_star(path, {"optics": pd.DataFrame({star.OPTICS_GROUP: [1]}), "particles": block}, version=30001)
    assert path.stat().st_size > 300_000
    read = star.read_star(path)
    pd.testing.assert_frame_equal(read["particles"], block, check_exact=True)
    assert read["optics"][star.OPTICS_GROUP].tolist() == [1]


def test_a_failed_write_leaves_nothing(tmp_path):
    block = mixed_block()
    block.loc[2, "rlnNote"] = "tab\tinside"  # cannot be written unquoted: the row fails after others were written
    with pytest.raises(csv.Error):
        star.write_star(tmp_path / "out.star", {"particles": block})
    assert list(tmp_path.iterdir()) == []
