"""cryo-forum train when things go wrong: interrupts at any moment, bad options, damaged data, resuming."""

import os
import signal
import subprocess
import sys
import time

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
import yaml

from cryo_forum.cli import main
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.streams.simulation import write_simulation
from cryo_forum.training.callbacks import TrainingState
from cryo_forum.training.config import LossSchedule, Optimisation, StarData, TrainingConfig
from cryo_forum.training.run import Run

TINY = ["--image-size", "32", "--batch-size", "16", "--widths", "8", "16", "--seed", "1", "--no-pretrain"]
CLI = [sys.executable, "-m", "cryo_forum.cli"]


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "sim"
    volume, pixel_size = load_volume(example_map_path(), pixel_size=3.0, size=32)
    write_simulation(folder, volume, pixel_size, 160, snr=2.0, ctf=True, seed=5)
    return folder / "particles.star"


@pytest.fixture(scope="module")
def damaged(particles, tmp_path_factory):
    """The same particles with a NaN pixel in one image and an inf in another."""
    folder = tmp_path_factory.mktemp("damaged")
    for name in ("particles.star", "particles.mrcs"):
        (folder / name).write_bytes((particles.parent / name).read_bytes())
    with mrcfile.open(folder / "particles.mrcs", "r+") as stack:
        stack.data[3, 5, 5] = np.nan
        stack.data[150, 2, 2] = np.inf
    return folder / "particles.star"


def _history(run) -> list[int]:
    return list(pd.read_csv(run / "history.csv")["epoch"])


def _train_process(particles, run, *extra):
    command = [*CLI, "train", "--star", str(particles), "--out", str(run), *TINY, *extra]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, process, timeout=240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_kills_at_any_moment_leave_a_run_that_resume_continues(particles, tmp_path):
    """SIGKILL (no clean-up at all) and SIGTERM at three moments, then the same command with --resume."""
    run = tmp_path / "run"
    command = ["--epochs", "6"]
    rng = np.random.default_rng(0)
    for kill in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        process = _train_process(particles, run, *command, *(["--resume"] if Run(run).exists else []))
        first = Run(run).latest_checkpoint()
        done = first[1]["epoch"] if first else 0
        _wait_for(run / "checkpoints" / f"epoch-{done + 1:05d}", process)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere inside the next epoch or its checkpoint
        process.send_signal(kill)
        process.communicate(timeout=60)
    finished = _train_process(particles, run, *command, "--resume")
    _, err = finished.communicate(timeout=300)
    assert finished.returncode == 0, err[-2000:]
    assert _history(run) == [0, 1, 2, 3, 4, 5]
    assert not list((run / "checkpoints").glob(".epoch.*"))
    assert main(["predict", "--model", str(run), "--star", str(particles), "--out", str(tmp_path / "p.star")]) == 0


def test_ctrl_c_after_an_epoch_keeps_the_run_and_resume_finishes_it(particles, tmp_path, monkeypatch):
    from cryo_forum.training import callbacks as model_module

    run = tmp_path / "run"
    original = model_module.LossWeightScheduler.on_epoch_begin

    def interrupt_at_third_epoch(self, epoch, logs=None):
        if epoch == 2:
            raise KeyboardInterrupt
        original(self, epoch, logs)

    monkeypatch.setattr(model_module.LossWeightScheduler, "on_epoch_begin", interrupt_at_third_epoch)
    argv = ["train", "--star", str(particles), "--out", str(run), "--epochs", "4", *TINY]
    assert main(argv) == 130
    assert _history(run) == [0, 1]
    monkeypatch.setattr(model_module.LossWeightScheduler, "on_epoch_begin", original)
    assert main([*argv, "--resume"]) == 0  # the same command line, --resume added
    assert _history(run) == [0, 1, 2, 3]


def test_an_interrupted_model_save_is_rewritten_on_resume(particles, tmp_path):
    """The newest checkpoint is the best epoch but model.keras was cut short: resume repairs it."""
    run = tmp_path / "run"
    argv = ["train", "--star", str(particles), "--out", str(run), "--epochs", "2", *TINY]
    assert main(argv) == 0
    state = Run(run).latest_checkpoint()[1]
    (run / "model.keras").write_bytes(b"PK\x03\x04 truncated")
    if state["best_epoch"] == state["epoch"] - 1:
        assert main([*argv, "--resume"]) == 0
        assert main(["export", "--model", str(run), "--out", str(tmp_path / "export")]) == 0
    else:  # the best epoch was an earlier one, whose save completed before later checkpoints
        assert main(["export", "--model", str(run), "--out", str(tmp_path / "export")]) == 1


def test_a_partial_checkpoint_is_ignored(particles, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--star", str(particles), "--out", str(run), "--epochs", "2", *TINY]
    assert main(argv) == 0
    partial = run / "checkpoints" / ".epoch.x.partial"
    partial.mkdir()
    (partial / "weights.weights.h5").write_bytes(b"half")
    assert Run(run).latest_checkpoint()[1]["epoch"] == 2
    assert main(["train", "--star", str(particles), "--out", str(run), "--epochs", "3", *TINY, "--resume"]) == 0
    assert _history(run) == [0, 1, 2] and not partial.exists()


def test_resume_with_the_same_options_is_accepted_and_changed_ones_are_named(particles, tmp_path, capsys):
    run = tmp_path / "run"
    relative = os.path.relpath(particles)
    argv = ["train", "--star", relative, "--out", str(run), "--epochs", "1", *TINY]
    assert main(argv) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["star"] == str(particles.resolve())
    assert main([*argv, "--resume", "--epochs", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--resume", "--head", "6d", "--seed", "2"]) == 1
    message = capsys.readouterr().err
    assert "--head" in message and "--seed" in message and "--star" not in message


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--symmetry", "X9"], "--symmetry"),
        (["--image-size", "48"], "--image-size"),  # larger than the 32 px box
        (["--batch-size", "500"], "--batch-size"),  # more than the training particles
        (["--val-fraction", "0.9", "--test-fraction", "0.2"], "--val-fraction"),
    ],
)
def test_a_refused_run_leaves_no_folder(particles, tmp_path, capsys, extra, named):
    run = tmp_path / "run"
    argv = ["train", "--star", str(particles), "--out", str(run), "--epochs", "1", *TINY, *extra]
    assert main(argv) == 1
    message = capsys.readouterr().err.strip()
    assert named in message and len(message.splitlines()) == 1
    assert not run.exists()


def test_unknown_design_choices_are_usage_errors(particles, tmp_path, capsys):
    for option, value in (("--encoder", "tiny"), ("--head", "10d"), ("--pooling", "median")):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--star", str(particles), "--out", str(tmp_path / "run"), option, value])
        assert exit_info.value.code == 2 and value in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_options_are_checked_before_data_are_read(tmp_path, capsys):
    argv = ["train", "--star", str(tmp_path / "missing.star"), "--out", str(tmp_path / "run"), "--symmetry", "X9"]
    assert main(argv) == 1
    message = capsys.readouterr().err
    assert "--symmetry" in message and "missing.star" not in message


@pytest.mark.parametrize("count", [0, 1])
def test_too_few_particles_leave_no_folder(particles, tmp_path, capsys, count):
    blocks = starfile.read(particles, always_dict=True)
    blocks["particles"] = blocks["particles"].iloc[:count]
    few = particles.parent / f"few{count}.star"
    starfile.write(blocks, few)
    run = tmp_path / "run"
    assert main(["train", "--star", str(few), "--out", str(run), *TINY]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not run.exists()


def test_damaged_pixels_end_training_with_one_line_and_no_folder(damaged, tmp_path):
    run = tmp_path / "run"
    process = _train_process(damaged, run, "--epochs", "2")
    _, err = process.communicate(timeout=180)  # used to hang for ever after the traceback
    assert process.returncode == 1
    assert "Traceback" not in err and "NaN or inf" in err.strip().splitlines()[-1]
    assert not run.exists()


def test_damaged_pixels_end_prediction_with_one_line(particles, damaged, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--star", str(particles), "--out", str(run), "--epochs", "1", *TINY]) == 0
    command = [*CLI, "predict", "--model", str(run), "--star", str(damaged), "--out", str(tmp_path / "p.star")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "NaN or inf" in result.stderr
    assert not (tmp_path / "p.star").exists()


def test_defaults_fit_a_small_box_and_results_go_to_stdout(particles, tmp_path):
    run = tmp_path / "run"
    process = _train_process(particles, run, "--epochs", "1")
    out, err = process.communicate(timeout=180)
    assert process.returncode == 0, err[-2000:]
    assert out.strip() == f"run written to {run}"
    assert "epoch 1/1" in err and "\r" not in err
    config = TrainingConfig.load(run / "config.yaml")
    assert config.images.image_size == 32  # the 32 px box, not the 64 px default that does not fit


def test_default_length_stops_at_a_validation_plateau(particles, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--star", str(particles), "--out", str(run), *TINY]
    argv += ["--patience", "1", "--switch-epoch", "0", "--ramp-epochs", "1", "--max-epochs", "40"]
    assert main(argv) == 0
    epochs = _history(run)
    assert 3 <= len(epochs) < 40
    assert "plateaus of the validation median" in capsys.readouterr().err


def _state(values, patience=2, **settings):
    config = TrainingConfig(
        data=StarData(star="x.star"),
        loss=LossSchedule(kind="constant"),
        optimisation=Optimisation(patience=patience, **settings),
    )
    rule = TrainingState(config, Run("unused"), steps_per_epoch=1, state={})
    return [rule._stopping_rule(epoch, value) for epoch, value in enumerate(values)], rule.state


def test_stopping_rule_halves_the_rate_at_each_plateau_and_stops_at_the_third():
    stops, state = _state([10.0, 9.0, 8.95, 8.99, 7.0, 7.0, 7.0, 6.99, 6.99])
    # 8.95 and 8.99 are not 1 % better than 9.0: plateau 1; 7.0 improves; then two plateaus of two epochs
    assert stops == [False] * 8 + [True]
    assert state["plateaus"] == 3 and state["lr_scale"] == 0.125
    stops, state = _state([10.0 - epoch for epoch in range(9)])  # steady progress never stops
    assert not any(stops) and state["plateaus"] == 0


def test_fixed_length_ignores_the_stopping_rule():
    stops, state = _state([5.0] * 10, epochs=10)
    assert not any(stops) and state["lr_scale"] == 1.0
