"""`cryo-forum filter`: thresholds from options or a run's calibration, outputs that keep every block, errors."""

import re
import shutil

import numpy as np
import pandas as pd
import pytest
import starfile

from cryo_forum import cli
from cryo_forum.io import star
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.prediction import calibration
from cryo_forum.prediction.uncertainty import SCORES, dispersion_trace, expected_error_deg
from cryo_forum.streams.simulation import write_simulation
from cryo_forum.training.run import Run

N = 40


@pytest.fixture(autouse=True)
def filter_only(monkeypatch):
    """The dispatcher with just this command, so the test does not depend on other commands' modules."""
    monkeypatch.setattr(cli, "COMMANDS", ["filter"])


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A small simulated RELION 3.1 set (32 px): the particles a model would have predicted."""
    volume, _ = load_volume(example_map_path(), pixel_size=3.0, size=32)
    return write_simulation(tmp_path_factory.mktemp("sim"), volume, 3.0, N, snr=1.0, outlier_fraction=0.1, seed=1)


def eigenvalues(seed: int, scale: float = 1.0, n: int = N) -> np.ndarray:
    """Eigenvalues [n, 4] (ascending) whose expected errors spread from a few degrees to ~120."""
    rng = np.random.default_rng(seed)
    concentrations = scale * 10 ** rng.uniform(-0.5, 3.0, (n, 3))
    return rng.normal(0, 5, (n, 1)) + np.column_stack([np.zeros(n), np.sort(concentrations, axis=1)])


def predicted_star(simulated, name: str, values: np.ndarray, with_eigenvalues: bool = True) -> tuple:
    """Write a prediction-like STAR beside the stack: the simulated set plus uncertainty columns."""
    columns = pd.DataFrame(
        {
            star.DISPERSION_TRACE: dispersion_trace(values),
            star.MAX_DISPERSION: SCORES["max_dispersion"](values),
            star.EIGEN_GAP: -SCORES["negative_eigengap"](values),
        }
    )
    if with_eigenvalues:
        for column, value in zip(star.EIGENVALUES, values.T, strict=True):
            columns[column] = value
    path = simulated / name
    ParticleSet.open(simulated / "particles.star").write_star(path, columns=columns)
    return path


def run_filter(*argv) -> int:
    return cli.main(["filter", *map(str, argv)])


def printed_threshold(out: str) -> float:
    return float(re.search(r"<= (\S+) ->", out).group(1))


def test_kept_and_rejected_partition_the_input_and_keep_every_block(simulated, capsys):
    values = eigenvalues(seed=2)
    source = predicted_star(simulated, "pred_a.star", values)
    out = simulated / "kept_a.star"
    assert run_filter("--star", source, "--out", out, "--threshold", 30) == 0
    printed = capsys.readouterr().out
    keep = expected_error_deg(values) <= 30
    assert 5 < keep.sum() < N - 5
    assert f"kept {keep.sum()} of {N} particles" in printed and "expected_error_deg <= 30 ->" in printed
    assert "threshold from --threshold" in printed and f"rejected {N - keep.sum()}" in printed
    original = starfile.read(source, always_dict=True)
    kept = starfile.read(out, always_dict=True)
    rejected = starfile.read(simulated / "kept_a.rejected.star", always_dict=True)
    for blocks in (kept, rejected):
        assert list(blocks) == ["optics", "particles"]
        pd.testing.assert_frame_equal(blocks["optics"], original["optics"])
        assert list(blocks["particles"].columns) == list(original["particles"].columns)
    for blocks, mask in ((kept, keep), (rejected, ~keep)):
        expected = original["particles"][mask].reset_index(drop=True)
        pd.testing.assert_frame_equal(blocks["particles"], expected)
    names = pd.concat([kept["particles"], rejected["particles"]])[star.IMAGE_NAME]
    assert sorted(names) == sorted(original["particles"][star.IMAGE_NAME]) and names.is_unique
    assert star.star_version(out) == star.star_version(source) == 30001


def test_kept_particles_written_elsewhere_still_find_their_images(simulated, tmp_path, capsys):
    source = predicted_star(simulated, "pred_b.star", eigenvalues(seed=3))
    out = tmp_path / "elsewhere" / "kept.star"
    assert run_filter("--star", source, "--out", out, "--threshold", 60, "--metric", "expected_error_deg") == 0
    kept = ParticleSet.open(out)
    original = ParticleSet.open(source)
    positions = np.flatnonzero(expected_error_deg(eigenvalues(seed=3)) <= 60)
    np.testing.assert_array_equal(kept.images(np.arange(len(kept))), original.images(positions))
    assert (tmp_path / "elsewhere" / "kept.rejected.star").is_file()


def test_quantile_threshold_comes_from_the_calibration_not_the_filtered_set(simulated, tmp_path, capsys):
    validation = eigenvalues(seed=4, n=300)
    run = tmp_path / "run"
    Run(run).save_calibration(calibration.calibrate(validation, source="validation"))
    expected = np.quantile(expected_error_deg(validation), 0.5)
    thresholds, kept_counts = [], []
    for name, scale in (("pred_sharp.star", 3.0), ("pred_flat.star", 0.05)):
        values = eigenvalues(seed=5, scale=scale)
        source = predicted_star(simulated, name, values)
        out = tmp_path / f"kept_{name}"
        assert run_filter("--star", source, "--out", out, "--model", run, "--quantile", 0.5) == 0
        printed = capsys.readouterr().out
        thresholds.append(printed_threshold(printed))
        assert "(300 calibration particles, quantile 0.5)" in printed
        keep = expected_error_deg(values) <= expected
        kept_counts.append(int(keep.sum()))
        kept_names = starfile.read(out)["particles"][star.IMAGE_NAME].str.partition("@")[0].tolist()
        assert kept_names == [f"{i + 1:06d}" for i in np.flatnonzero(keep)]
        assert abs(np.quantile(expected_error_deg(values), 0.5) - expected) > 5  # not this set's own median
    assert thresholds == pytest.approx([expected, expected], rel=1e-5)
    assert kept_counts[0] > 0.7 * N and kept_counts[1] < 0.3 * N  # same threshold, different sets


def test_recommended_threshold_and_other_metrics_from_the_calibration(simulated, tmp_path, capsys):
    validation = eigenvalues(seed=6, n=200)
    scores = expected_error_deg(validation)
    rng = np.random.default_rng(7)
    errors = np.where(scores < 40, 0.5 * scores, rng.uniform(60, 180, 200))  # junk beyond 40 degrees
    run = tmp_path / "run"
    stored = calibration.calibrate(validation, errors, source="validation")
    Run(run).save_calibration(stored)
    values = eigenvalues(seed=8)
    source = predicted_star(simulated, "pred_c.star", values)
    assert run_filter("--star", source, "--out", tmp_path / "rec.star", "--model", run) == 0
    printed = capsys.readouterr().out
    recommended = stored["metrics"]["expected_error_deg"]["recommended"]
    assert printed_threshold(printed) == pytest.approx(recommended["threshold"], rel=1e-5)
    assert 30 < recommended["threshold"] <= 40 and "recommended: keeps" in printed
    assert len(starfile.read(tmp_path / "rec.star")["particles"]) == np.sum(
        expected_error_deg(values) <= recommended["threshold"]
    )
    args = ("--star", source, "--out", tmp_path / "trace.star", "--model", run, "--metric", "dispersion_trace")
    assert run_filter(*args, "--quantile", 0.25) == 0
    trace_threshold = np.quantile(dispersion_trace(validation), 0.25)
    assert printed_threshold(capsys.readouterr().out) == pytest.approx(trace_threshold, rel=1e-5)
    assert len(starfile.read(tmp_path / "trace.star")["particles"]) == np.sum(
        dispersion_trace(values) <= trace_threshold
    )
    assert run_filter("--star", source, "--out", tmp_path / "x.star", "--model", run, "--threshold", 20) == 0
    below = np.searchsorted(np.quantile(scores, calibration.QUANTILE_LEVELS), 20, side="right") - 1
    kept = calibration.QUANTILE_LEVELS[below]
    assert f"keeps about {kept:.0%} of the run's calibration set" in capsys.readouterr().out


def test_derived_columns_suffice_for_their_metrics(simulated, tmp_path, capsys):
    values = eigenvalues(seed=9)
    source = predicted_star(simulated, "pred_d.star", values, with_eigenvalues=False)
    out = tmp_path / "kept.star"
    assert run_filter("--star", source, "--out", out, "--metric", "negative_eigengap", "--threshold", -5) == 0
    assert len(starfile.read(out)["particles"]) == np.sum(-SCORES["negative_eigengap"](values) >= 5)
    assert run_filter("--star", source, "--out", tmp_path / "no.star", "--threshold", 5) == 1
    error = capsys.readouterr().err
    assert "pred_d.star: metric expected_error_deg needs the columns cfEigenvalue1" in error
    assert not (tmp_path / "no.star").exists()


def test_every_particle_rejected_or_kept_still_writes_both_files(simulated, tmp_path, capsys):
    source = predicted_star(simulated, "pred_e.star", eigenvalues(seed=10))
    assert run_filter("--star", source, "--out", tmp_path / "none.star", "--threshold", 0) == 0
    assert (
        len(starfile.read(tmp_path / "none.star")["particles"]) == 0
        and len(starfile.read(tmp_path / "none.rejected.star")["particles"]) == N
    )
    assert run_filter("--star", source, "--out", tmp_path / "all.star", "--threshold", 180) == 0
    assert (
        len(starfile.read(tmp_path / "all.star")["particles"]) == N
        and len(starfile.read(tmp_path / "all.rejected.star")["particles"]) == 0
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--star", "{raw}", "--threshold", "10"], r"particles\.star: metric expected_error_deg needs the columns"),
        (["--metric", "bogus", "--threshold", "1"], r"--metric: unknown metric 'bogus'"),
        (["--model", "{run}", "--quantile", "1.5"], r"--quantile: must lie in \[0, 1\].*got 1\.5"),
        (["--model", "{run}", "--quantile", "-0.1"], r"--quantile: must lie in \[0, 1\].*got -0\.1"),
        (["--quantile", "0.5"], r"--quantile: needs --model RUN.*never taken on the set being filtered"),
        ([], r"--threshold: give --threshold X, or --model RUN"),
        (["--threshold", "nan"], r"--threshold nan: must be a finite number"),
        (["--model", "{empty}"], r"empty/calibration\.json: not found"),
        (["--model", "{corrupt}"], r"corrupt/calibration\.json: cannot read"),
        (["--model", "{run}"], r"no recommended threshold .*give --quantile or --threshold"),
        (["--model", "{run}", "--metric", "bogus", "--quantile", "0.5"], r"--metric: unknown metric 'bogus'"),
        (["--star", "{folder}/missing.star", "--threshold", "1"], r"missing\.star: STAR file not found"),
        (["--out", "{pred}", "--threshold", "1"], r"pred\.star: refusing to overwrite an input"),
        (["--star", "{clash}", "--out", "{folder}/clash.star", "--threshold", "1"], r"refusing to overwrite an input"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(simulated, tmp_path, capsys, options, message):
    folder = tmp_path / "work"
    folder.mkdir()
    pred = predicted_star(simulated, "pred_f.star", eigenvalues(seed=11))
    shutil.copy(pred, folder / "pred.star")
    shutil.copy(pred, folder / "clash.rejected.star")
    for name in ("run", "empty", "corrupt"):
        (tmp_path / name).mkdir()
    Run(tmp_path / "run").save_calibration(calibration.calibrate(eigenvalues(seed=12)))
    (tmp_path / "corrupt" / "calibration.json").write_text("{")
    places = {
        "raw": simulated / "particles.star",
        "run": tmp_path / "run",
        "empty": tmp_path / "empty",
        "corrupt": tmp_path / "corrupt",
        "folder": folder,
        "pred": folder / "pred.star",
        "clash": folder / "clash.rejected.star",
    }
    options = [option.format(**places) for option in options]
    argv = {"--star": str(folder / "pred.star"), "--out": str(folder / "kept.star")}
    for key in ("--star", "--out"):
        if key in options:
            argv[key] = options.pop(options.index(key) + 1)
            options.remove(key)
    before = sorted(folder.iterdir())
    assert run_filter(*[item for pair in argv.items() for item in pair], *options) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("cryo-forum filter: error: ") and "\n" not in error
    assert re.search(message, error), error
    assert sorted(folder.iterdir()) == before


def test_quantile_and_threshold_together_is_a_usage_error(simulated, tmp_path):
    source = simulated / "particles.star"
    with pytest.raises(SystemExit) as stop:
        run_filter("--star", source, "--out", tmp_path / "k.star", "--quantile", 0.5, "--threshold", 3)
    assert stop.value.code == 2
    assert not (tmp_path / "k.star").exists()


def test_a_failure_while_writing_leaves_neither_file(simulated, tmp_path, monkeypatch):
    from cryo_forum.io.particles import ParticleSet

    source = predicted_star(simulated, "pred_g.star", eigenvalues(seed=13))
    calls = []
    original = ParticleSet.write_star

    def fail_second_time(self, path, columns=None, keep=None):
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        original(self, path, columns, keep)

    monkeypatch.setattr(ParticleSet, "write_star", fail_second_time)
    with pytest.raises(RuntimeError, match="disk full"):
        run_filter("--star", source, "--out", tmp_path / "out" / "kept.star", "--threshold", 30)
    assert len(calls) == 2 and not (tmp_path / "out").exists()
