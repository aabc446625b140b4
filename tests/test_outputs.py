"""No command writes over what it reads, damaged run folders fail in one line, written STAR files find their stacks."""

import os
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import starfile

from cryo_forum.analysis.coverage import viewing_coverage
from cryo_forum.cli import main
from cryo_forum.geometry import random_quaternions
from cryo_forum.io.guard import OutputGuard
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.streams.simulation import write_simulation

TINY = ["--image-size", "32", "--batch-size", "16", "--widths", "8", "16", "--seed", "1", "--epochs", "1"]
TINY += ["--no-pretrain"]


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "sim"
    volume, pixel_size = load_volume(example_map_path(), pixel_size=3.0, size=32)
    write_simulation(folder, volume, pixel_size, 120, snr=2.0, ctf=True, seed=5)
    return folder / "particles.star"


@pytest.fixture(scope="module")
def run(particles, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--star", str(particles), "--out", str(folder), *TINY]) == 0
    return folder


def _snapshot(*folders):
    return {path: path.read_bytes() for folder in folders for path in folder.rglob("*") if path.is_file()}


def test_outputs_never_replace_stacks_models_or_runs(particles, run, tmp_path, capsys):
    stack = particles.parent / "particles.mrcs"
    before = _snapshot(particles.parent, run)
    cases = [
        ["predict", "--model", str(run), "--star", str(particles), "--out", str(stack)],
        ["predict", "--model", str(run), "--star", str(particles), "--out", str(run / "model.keras")],
        ["filter", "--star", str(particles), "--out", str(stack), "--threshold", "10"],
        ["export", "--model", str(run), "--out", str(run)],
        ["reconstruct", "--star", str(particles), "--out", str(stack)],
    ]
    for argv in cases:
        assert main(argv) == 1, argv
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert _snapshot(particles.parent, run) == before


def test_export_into_another_runs_folder_is_refused(particles, run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--star", str(particles), "--out", str(other), *TINY]) == 0
    config = (other / "config.yaml").read_bytes()
    assert main(["export", "--model", str(run), "--out", str(other)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (other / "config.yaml").read_bytes() == config


def test_simulating_into_an_existing_simulation_is_refused(particles, capsys):
    stack = (particles.parent / "particles.mrcs").read_bytes()
    argv = ["simulate", "--volume", str(example_map_path()), "--n", "4", "--box-size", "32"]
    assert main([*argv, "--out", str(particles.parent)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (particles.parent / "particles.mrcs").read_bytes() == stack


def test_predictions_may_go_into_the_run_folder(particles, run):
    out = run / "predicted.star"
    assert main(["predict", "--model", str(run), "--star", str(particles), "--out", str(out)]) == 0
    assert len(starfile.read(out, always_dict=True)["particles"]) == 120


def test_guard_protects_every_file_of_a_folder(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "state.json").write_text("{}")
    guard = OutputGuard().protect(tmp_path / "run")
    with pytest.raises(Exception, match="refusing to overwrite an input"):
        guard.check_file(tmp_path / "run" / "checkpoints" / "state.json")
    assert guard.check_file(tmp_path / "run" / "new.star") == tmp_path / "run" / "new.star"


def _damage(run, tmp_path, name, content_or_action):
    damaged = tmp_path / name
    damaged.mkdir()
    for item in run.iterdir():
        if item.is_file():
            (damaged / item.name).write_bytes(item.read_bytes())
    content_or_action(damaged)
    return damaged


def _keras_model_with(layer_kind, path):
    from cryo_forum.tensorflow_quiet import keras

    inputs = keras.Input((4,))
    outputs = keras.layers.Lambda(lambda x: x * 2)(inputs) if layer_kind == "lambda" else keras.layers.Dense(2)(inputs)
    keras.Model(inputs, outputs).save(path)


@pytest.mark.parametrize(
    "kind, message",
    [
        ("junk", "not a Keras model file"),
        ("truncated", "not a Keras model file"),
        ("foreign", "not a cryo-forum orientation estimator"),
        ("lambda", "Lambda layer"),
        ("no_config", "not a cryo-forum run folder"),
        ("no_model", "no model.keras"),
    ],
)
def test_damaged_run_folders_fail_in_one_line(particles, run, tmp_path, capsys, kind, message):
    actions = {
        "junk": lambda folder: (folder / "model.keras").write_bytes(b"not a model at all"),
        "truncated": lambda folder: (folder / "model.keras").write_bytes((run / "model.keras").read_bytes()[:17000]),
        "foreign": lambda folder: _keras_model_with("dense", folder / "model.keras"),
        "lambda": lambda folder: _keras_model_with("lambda", folder / "model.keras"),
        "no_config": lambda folder: (folder / "config.yaml").unlink(),
        "no_model": lambda folder: (folder / "model.keras").unlink(),
    }
    damaged = _damage(run, tmp_path, kind, actions[kind])
    if kind == "truncated":
        assert not zipfile.is_zipfile(damaged / "model.keras")
    out = tmp_path / "p.star"
    assert main(["predict", "--model", str(damaged), "--star", str(particles), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_exported_model_refuses_images_of_another_size_or_rank(run, tmp_path):
    exported = tmp_path / "exported"
    assert main(["export", "--model", str(run), "--out", str(exported)]) == 0
    script = textwrap.dedent(
        f"""
        import tensorflow as tf
        serve = tf.saved_model.load({str(exported)!r}).signatures["serving_default"]
        print(serve(images=tf.zeros([2, 32, 32, 1]))["quaternion"].shape)
        for shape in ([2, 48, 48, 1], [2, 32, 32]):
            try:
                serve(images=tf.zeros(shape))
                print("accepted", shape)
            except tf.errors.InvalidArgumentError as error:
                print("refused", "must be float32 [N, 32, 32, 1]" in error.message)
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-1500:]  # a 3-D input used to abort the whole process
    assert result.stdout.split("\n")[:3] == ["(2, 4)", "refused True", "refused True"]


def test_collapsed_poses_are_flagged(particles, tmp_path, capsys):
    assert viewing_coverage(random_quaternions(2000, 0)) > 0.9
    assert viewing_coverage(np.tile([0.0, 0.0, 0.0, 1.0], (2000, 1))) < 0.01
    blocks = starfile.read(particles, always_dict=True)
    for column, value in (("rlnAngleRot", 10.0), ("rlnAngleTilt", 80.0)):
        blocks["particles"][column] = value  # one viewing direction, in-plane angles kept
    collapsed = particles.parent / "collapsed.star"
    starfile.write(blocks, collapsed)
    assert main(["reconstruct", "--star", str(collapsed), "--out", str(tmp_path / "map.mrc")]) == 0
    assert "warning: the viewing directions" in capsys.readouterr().err
    assert main(["reconstruct", "--star", str(particles), "--out", str(tmp_path / "true.mrc")]) == 0
    assert "warning" not in capsys.readouterr().err


def _stack_names(path) -> set[str]:
    return set(starfile.read(path, always_dict=True)["particles"]["rlnImageName"].str.partition("@")[2])


def test_written_star_files_find_their_stacks_from_any_folder(particles, run, tmp_path, monkeypatch):
    beside = particles.parent / "predicted.star"
    monkeypatch.chdir(particles.parent)  # relative names resolve from here too: they must not stay relative
    assert main(["predict", "--model", str(run), "--star", "particles.star", "--out", "predicted.star"]) == 0
    assert _stack_names(beside) == {"particles.mrcs"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kept = elsewhere / "kept.star"
    assert main(["filter", "--star", "predicted.star", "--out", str(kept), "--threshold", "1e9"]) == 0
    assert _stack_names(kept) == {str((particles.parent / "particles.mrcs").resolve())}
    # the written file is read from yet another working folder
    result = subprocess.run(
        [sys.executable, "-m", "cryo_forum.cli", "info", str(kept), "--json"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert '"stacks_missing": []' in result.stdout


def test_a_stack_found_only_in_the_working_folder_is_reported(particles, tmp_path, monkeypatch, caplog):
    from cryo_forum.io.particles import ParticleSet

    blocks = starfile.read(particles, always_dict=True)
    moved = tmp_path / "star_only"
    moved.mkdir()
    starfile.write(blocks, moved / "particles.star")
    monkeypatch.chdir(particles.parent)
    with caplog.at_level("INFO", logger="cryo_forum"):
        ParticleSet.open(moved / "particles.star").images([0])
    assert "read from the working folder" in caplog.text


def test_non_numeric_angles_are_named_in_one_line(particles, tmp_path, capsys):
    blocks = starfile.read(particles, always_dict=True)
    blocks["particles"]["rlnAngleTilt"] = blocks["particles"]["rlnAngleTilt"].astype(object)
    blocks["particles"].loc[7, "rlnAngleTilt"] = "abc"
    broken = tmp_path / "broken.star"
    starfile.write(blocks, broken)
    for argv in (
        ["reconstruct", "--star", str(broken), "--out", str(tmp_path / "map.mrc")],
        ["evaluate", "--pred", str(broken), "--truth", str(particles), "--out", str(tmp_path / "report")],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert "rlnAngleTilt holds a non-number ('abc')" in err and len(err.splitlines()) == 1


def test_unwritable_outputs_fail_before_the_work(particles, run, capsys):
    for argv in (
        ["predict", "--model", str(run), "--star", str(particles), "--out", "/sys/predicted.star"],
        ["reconstruct", "--star", str(particles), "--out", "/sys/map.mrc", "--half-maps"],
        ["evaluate", "--pred", str(particles), "--truth", str(particles), "--out", "/sys/report"],
    ):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "cannot write in /sys" in err and len(err.strip().splitlines()) == 1


def test_predict_refines_against_a_given_map_and_refuses_a_missing_one(particles, run, tmp_path, capsys):
    from cryo_forum import geometry
    from cryo_forum.io import star
    from cryo_forum.io.particles import ParticleSet

    argv = ["predict", "--model", str(run), "--star", str(particles)]
    network, refined = tmp_path / "network.star", tmp_path / "refined.star"
    assert main([*argv, "--out", str(network)]) == 0  # a run trained without pre-training has no map of its own
    assert main([*argv, "--out", str(refined), "--refine", str(particles.parent / "volume.mrc")]) == 0
    assert not (tmp_path / "refined.star.partial").exists()  # the refinement's finished blocks go with the output
    truth = ParticleSet.open(particles).quaternions()

    def median_error(path):
        found = ParticleSet.open(path)
        return np.median(np.degrees(geometry.geodesic_distance(found.quaternions(), truth))), found.table

    network_error, network_table = median_error(network)
    refined_error, refined_table = median_error(refined)
    assert star.MATCH_SCORE not in network_table and star.MATCH_SCORE in refined_table
    assert refined_error < 2.0 < network_error  # one epoch of training: the search does the work
    np.testing.assert_allclose(refined_table[star.EXPECTED_ERROR], network_table[star.EXPECTED_ERROR], rtol=1e-5)
    capsys.readouterr()
    missing = tmp_path / "missing.star"
    assert main([*argv, "--out", str(missing), "--refine", str(tmp_path / "none.mrc")]) == 1
    assert "--refine:" in capsys.readouterr().err and not missing.exists()
