"""Outputs are complete or absent, and inputs are never overwritten."""

import pytest

from cryo_forum.errors import CryoForumError
from cryo_forum.io.atomic import atomic_directory, atomic_output, refuse_overwriting_inputs


def test_atomic_output_renames_on_success_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_output(target) as tmp:
        tmp.write_text("complete")
        assert not target.exists()
    assert target.read_text() == "complete"
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_directory_moves_all_or_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), atomic_directory(out) as staging:
        (staging / "a.txt").write_text("a")
        raise RuntimeError("failed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(out) as staging:
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
    assert (out / "a.txt").read_text() == "a"
    assert (out / "sub" / "b.txt").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_refuses_to_overwrite_an_input(tmp_path):
    source = tmp_path / "particles.star"
    source.write_text("data_\n")
    with pytest.raises(CryoForumError, match=r"particles\.star"):
        refuse_overwriting_inputs(tmp_path / "." / "particles.star", [source])
    refuse_overwriting_inputs(tmp_path / "other.star", [source])


def test_failed_output_leaves_no_new_folders(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "a" / "b" / "run") as staging:
        (staging / "x.txt").write_text("x")
        raise RuntimeError("failed")
    with pytest.raises(RuntimeError), atomic_output(tmp_path / "c" / "out.txt") as tmp:
        tmp.write_text("x")
        raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []
