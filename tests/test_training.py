"""cryo-forum train / predict / export end to end on tiny data sets (32 px, short runs)."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import starfile
import yaml

from cryo_forum import geometry
from cryo_forum.cli import main
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.streams.simulation import write_simulation
from cryo_forum.training.config import StarData, TrainingConfig

MODEL = ["--image-size", "32", "--batch-size", "16", "--widths", "8", "16", "--seed", "1"]
TINY = [*MODEL, "--no-pretrain"]  # labelled particles: the images alone


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "sim"
    volume, pixel_size = load_volume(example_map_path(), pixel_size=3.0, size=32)
    write_simulation(folder, volume, pixel_size, 160, snr=2.0, ctf=True, outlier_fraction=0.1, seed=5)
    return folder / "particles.star"


@pytest.fixture(scope="module")
def trained_run(particles, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--star", str(particles), "--out", str(run), "--epochs", "2", *TINY]) == 0
    return run


def test_train_writes_a_complete_run(trained_run):
    for name in ("model.keras", "config.yaml", "split.json", "history.csv", "calibration.json"):
        assert (trained_run / name).is_file(), name
    assert any((trained_run / "logs").rglob("events.out.tfevents.*"))
    config = yaml.safe_load((trained_run / "config.yaml").read_text())
    sections = {"mode", "data", "images", "model", "loss", "optimisation", "augmentation", "symmetry", "seed"}
    assert set(config) == sections
    assert config["mode"] == "star" and set(config["data"]) == {field.name for field in dataclasses.fields(StarData)}
    assert config["images"]["image_size"] == 32 and config["images"]["input_size"] == 32
    assert config["model"]["widths"] == [8, 16] and config["model"]["head"] == "qcqp"
    assert TrainingConfig.load(trained_run / "config.yaml").to_dict() == config
    history = pd.read_csv(trained_run / "history.csv")
    assert list(history["epoch"]) == [0, 1]
    assert np.isfinite(history[["loss", "val_median_error_deg", "val_mean_error_deg"]].to_numpy()).all()
    split = json.loads((trained_run / "split.json").read_text())
    sizes = [len(split["subsets"][name]["indices"]) for name in ("train", "val", "test")]
    assert sum(sizes) == 160 and min(sizes) > 0


def test_existing_run_is_not_overwritten(trained_run, particles, capsys):
    before = (trained_run / "model.keras").read_bytes()
    assert main(["train", "--star", str(particles), "--out", str(trained_run), "--epochs", "1", *TINY]) == 1
    assert "--resume" in capsys.readouterr().err
    assert (trained_run / "model.keras").read_bytes() == before


def test_predict_keeps_every_column_and_adds_angles_and_uncertainty(trained_run, particles, tmp_path):
    out = tmp_path / "predicted.star"
    assert (
        main(["predict", "--model", str(trained_run), "--star", str(particles), "--out", str(out), "--subset", "test"])
        == 0
    )
    source = starfile.read(particles, always_dict=True)
    written = starfile.read(out, always_dict=True)
    pd.testing.assert_frame_equal(written["optics"], source["optics"])
    split = json.loads((trained_run / "split.json").read_text())
    test_names = split["subsets"]["test"]["names"]
    table = written["particles"]
    assert list(table["rlnImageName"].str.split("@").str[0]) == [n.split("@")[0] for n in test_names]
    assert set(source["particles"].columns) <= set(table.columns)
    for column in ("cfDispersionTrace", "cfEigenGap", "cfMaxDispersion", "cfEigenvalue1"):
        assert np.isfinite(table[column]).all() and column in table
    assert (table["cfDispersionTrace"] > 0).all()
    rows = table["rlnImageName"].str.split("@").str[0].astype(int).to_numpy() - 1
    np.testing.assert_allclose(table["rlnDefocusU"], source["particles"]["rlnDefocusU"].to_numpy()[rows])
    assert table["rlnAngleTilt"].between(0, 180).all()


def test_predict_refuses_to_write_over_its_input(trained_run, particles, capsys):
    before = particles.read_bytes()
    assert main(["predict", "--model", str(trained_run), "--star", str(particles), "--out", str(particles)]) == 1
    assert "refusing to overwrite an input" in capsys.readouterr().err
    assert particles.read_bytes() == before


def test_predict_refuses_a_negative_max_shift_before_writing(trained_run, particles, tmp_path, capsys):
    out = tmp_path / "predicted.star"
    argv = ["predict", "--model", str(trained_run), "--star", str(particles), "--out", str(out), "--max-shift", "-1"]
    assert main(argv) == 1
    assert "--max-shift: must be >= 0 px, got -1.0" in capsys.readouterr().err
    assert not out.exists()


def test_export_reloads_without_cryo_forum_and_matches_keras(trained_run, tmp_path):
    from cryo_forum.tensorflow_quiet import keras

    exported = tmp_path / "exported"
    assert main(["export", "--model", str(trained_run), "--out", str(exported)]) == 0
    images = np.random.default_rng(0).normal(size=(5, 32, 32, 1)).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(
        f"""
        import sys, numpy as np, tensorflow as tf
        loaded = tf.saved_model.load({str(exported)!r})
        out = loaded.signatures["serving_default"](images=tf.constant(np.load({str(tmp_path / "images.npy")!r})))
        assert "cryo_forum" not in sys.modules
        np.save({str(tmp_path / "q.npy")!r}, out["quaternion"].numpy())
        np.save({str(tmp_path / "e.npy")!r}, out["eigenvalues"].numpy())
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120, cwd=tmp_path)
    model = keras.models.load_model(trained_run / "model.keras")
    expected = model(images, training=False)
    np.testing.assert_allclose(np.load(tmp_path / "q.npy"), expected["quaternion"].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected["eigenvalues"].numpy(), atol=1e-5)
    assert json.loads((exported / "preprocess.json").read_text())["image_size"] == 32


def test_training_from_a_map_draws_fresh_particles_and_keeps_fixed_sets(tmp_path):
    run = tmp_path / "maprun"
    args = [
        "train",
        "--volume",
        str(example_map_path()),
        "--apix",
        "3.0",
        "--out",
        str(run),
        "--epochs",
        "2",
        "--particles-per-epoch",
        "64",
        "--n-val",
        "32",
        "--n-test",
        "24",
        "--snr",
        "1",
        "--outliers",
        "0.1",
        *MODEL,
    ]
    assert main(args) == 0
    assert len(starfile.read(run / "val" / "particles.star")["particles"]) == 32
    assert len(starfile.read(run / "test" / "particles.star")["particles"]) == 24
    assert json.loads((run / "split.json").read_text())["mode"] == "map"
    assert len(pd.read_csv(run / "history.csv")) == 2
    out = tmp_path / "pred.star"
    assert (
        main(["predict", "--model", str(run), "--star", str(run / "test" / "particles.star"), "--out", str(out)]) == 0
    )
    assert len(starfile.read(out)["particles"]) == 24


@pytest.mark.slow
def test_training_learns_poses_on_a_clean_easy_set(tmp_path):
    """Fresh clean particles of the built-in map at 32 px: 40 short epochs must take the error far below chance.

    Random poses give a median error of about 126 deg; a pipeline that scrambles images, poses or gradients
    (a wrong sign of the in-plane augmentation, a transposed rotation, a broken loss) stays there.
    """
    run = tmp_path / "learns"
    args = ["train", "--volume", str(example_map_path()), "--apix", "3", "--box-size", "32", "--snr", "10"]
    args += ["--no-ctf", "--outliers", "0", "--particles-per-epoch", "1024", "--n-val", "128", "--n-test", "128"]
    assert main([*args, "--epochs", "40", "--seed", "1", "--out", str(run)]) == 0
    out = tmp_path / "test.star"
    assert (
        main(["predict", "--model", str(run), "--star", str(run / "test" / "particles.star"), "--out", str(out)]) == 0
    )
    predicted = ParticleSet.open(out).quaternions()
    truth = ParticleSet.open(run / "test" / "particles.star").quaternions()
    median = np.median(np.degrees(geometry.geodesic_distance(predicted, truth)))
    assert median < 75.0, f"test median {median:.1f} deg after 40 epochs"


def test_bad_training_options_name_the_option(particles, tmp_path, capsys):
    run = tmp_path / "bad"
    assert main(["train", "--star", str(particles), "--out", str(run), "--epochs", "0"]) == 1
    assert "--epochs" in capsys.readouterr().err
    assert main(["train", "--out", str(run)]) == 1
    assert "--star" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_mirrored_strategy_trains_on_two_logical_cpus(particles, tmp_path):
    run = tmp_path / "mirrored"
    command = ["train", "--star", str(particles), "--out", str(run), "--epochs", "1", "--strategy", "mirrored", *TINY]
    script = textwrap.dedent(
        f"""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from cryo_forum.cli import main
        sys.exit(main({command!r}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 replica(s)" in result.stderr
    assert (run / "model.keras").is_file()


@pytest.mark.slow
def test_multiworker_strategy_with_two_local_workers(particles, tmp_path):
    run = tmp_path / "multiworker"
    ports = [_free_port(), _free_port()]
    workers = []
    for index in range(2):
        tf_config = {
            "cluster": {"worker": [f"localhost:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config)}
        command = [
            sys.executable,
            "-m",
            "cryo_forum.cli",
            "train",
            "--star",
            str(particles),
            "--out",
            str(run),
            "--epochs",
            "1",
            "--strategy",
            "multiworker",
            *TINY,
        ]
        workers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [worker.communicate(timeout=300) for worker in workers]
    for worker, (_, stderr) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, stderr[-2000:]
    assert "2 replica(s)" in outputs[0][1]
    assert (run / "model.keras").is_file()
    assert list(pd.read_csv(run / "history.csv")["epoch"]) == [0]
