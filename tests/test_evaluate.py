"""Evaluation: matching, pose / viewing / in-plane errors, alignment, symmetry, AUROC, kept figures, the report."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from cryo_forum import geometry
from cryo_forum.analysis import evaluate
from cryo_forum.cli import main
from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.prediction import calibration
from cryo_forum.prediction.uncertainty import dispersion_trace
from cryo_forum.streams.simulation import write_simulation
from cryo_forum.training.run import Run

BOX = 32
PIXEL_SIZE = 3.0
N = 60
SHARP = np.array([0.0, 200.0, 300.0, 400.0])  # dispersion trace ~0.011
FLAT = np.array([0.0, 0.5, 0.7, 0.9])  # dispersion trace ~4.5
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def truth_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("truth")
    volume, _ = load_volume(example_map_path(), pixel_size=PIXEL_SIZE, size=BOX)
    write_simulation(folder, volume, PIXEL_SIZE, N, snr=1.0, outlier_fraction=0.2, seed=4)
    return folder / "particles.star"


@pytest.fixture(scope="module")
def truth(truth_path):
    return ParticleSet.open(truth_path)


@pytest.fixture(scope="module")
def outliers(truth):
    return truth.table[star.OUTLIER].to_numpy() == 1


def perturb(q, angles_deg, seed=0):
    """A_true R(axis, angle) for random axes: each pose moved by exactly angles_deg [N]."""
    axes = np.random.default_rng(seed).standard_normal((len(q), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    rotations = Rotation.from_rotvec(axes * np.radians(angles_deg)[:, None]).as_quat()
    return geometry.quaternion_multiply(q, rotations)


def eigenvalues_for(flat):
    return np.where(np.asarray(flat)[:, None], FLAT, SHARP)


def write_prediction(truth, path, q=None, euler=None, eigenvalues=None, keep=None):
    euler = geometry.quaternion_to_euler(q) if euler is None else euler
    columns = pd.DataFrame({name: euler[:, i] for i, name in enumerate(star.ANGLES)})
    if eigenvalues is not None:
        for name, values in zip(star.EIGENVALUES, eigenvalues.T, strict=True):
            columns[name] = values
    truth.write_star(path, columns=columns, keep=keep)
    return path


def run_cli(pred, truth_path, out, *options):
    return main(["evaluate", "--pred", str(pred), "--truth", str(truth_path), "--out", str(out), *options])


# ---------------------------------------------------------------- errors


def test_known_errors_and_median_are_recovered(truth, outliers, tmp_path):
    angles = np.linspace(1.0, 40.0, N)
    pred = write_prediction(truth, tmp_path / "pred" / "p.star", q=perturb(truth.quaternions(), angles))
    result = evaluate.evaluate(ParticleSet.open(pred), truth)
    np.testing.assert_allclose(np.degrees(result.errors.pose), angles, atol=2e-3)
    assert result.metrics["n"] == int((~outliers).sum()) and 0 < outliers.sum() < N
    assert result.metrics["median_deg"] == pytest.approx(np.median(angles[~outliers]), abs=2e-3)
    assert result.metrics["mean_deg"] == pytest.approx(np.mean(angles[~outliers]), abs=2e-3)
    assert result.metrics["p90_deg"] == pytest.approx(np.percentile(angles[~outliers], 90), abs=2e-3)
    # Neither part of the error can exceed the whole rotation.
    assert np.all(result.errors.viewing <= result.errors.pose + 1e-9)
    assert np.all(result.errors.inplane <= result.errors.pose + 1e-9)


def test_viewing_directions_are_the_relion_projection_directions():
    euler = np.random.default_rng(1).uniform([-180, 0, -180], [180, 180, 180], size=(20, 3))
    rot, tilt = np.radians(euler[:, 0]), np.radians(euler[:, 1])
    expected = np.stack([np.sin(tilt) * np.cos(rot), np.sin(tilt) * np.sin(rot), np.cos(tilt)], axis=-1)
    np.testing.assert_allclose(geometry.viewing_directions(geometry.euler_to_quaternion(euler)), expected, atol=1e-12)


def test_pure_inplane_and_pure_tilt_changes_split_correctly():
    rng = np.random.default_rng(2)
    euler = rng.uniform([-180, 20, -180], [180, 160, 180], size=(30, 3))
    delta = rng.uniform(2.0, 60.0, size=30)
    q_true = geometry.euler_to_quaternion(euler)
    inplane = evaluate.pose_errors(geometry.euler_to_quaternion(euler + np.c_[0 * delta, 0 * delta, delta]), q_true)
    np.testing.assert_allclose(np.degrees(inplane.viewing), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.degrees(inplane.inplane), delta, atol=1e-6)
    np.testing.assert_allclose(np.degrees(inplane.pose), delta, atol=1e-6)
    tilted = euler + np.c_[0 * delta, np.minimum(delta, 180 - euler[:, 1]), 0 * delta]
    tilt_change = tilted[:, 1] - euler[:, 1]
    viewing = evaluate.pose_errors(geometry.euler_to_quaternion(tilted), q_true)
    np.testing.assert_allclose(np.degrees(viewing.viewing), tilt_change, atol=1e-6)
    np.testing.assert_allclose(np.degrees(viewing.inplane), 0.0, atol=1e-6)


def test_symmetry_mates_have_zero_error_with_d2(truth, tmp_path):
    group = geometry.symmetry_quaternions("D2")
    choice = np.random.default_rng(3).integers(1, len(group), size=N)  # never the identity
    q_mates = geometry.quaternion_multiply(truth.quaternions(), geometry.quaternion_conjugate(group[choice]))
    pred = ParticleSet.open(write_prediction(truth, tmp_path / "mates.star", q=q_mates))
    d2 = evaluate.evaluate(pred, truth, symmetry="D2")
    assert np.degrees(d2.errors.pose).max() < 2e-3
    assert np.degrees(d2.errors.viewing).max() < 2e-3 and np.degrees(d2.errors.inplane).max() < 2e-3
    c1 = evaluate.evaluate(pred, truth, symmetry="C1")
    np.testing.assert_allclose(np.degrees(c1.errors.pose), 180.0, atol=2e-3)  # D2's rotations are half turns


@pytest.mark.parametrize(("flipped", "symmetry"), [(False, "C1"), (True, "C1"), (True, "D2")])
def test_align_recovers_a_global_rotation_and_hand_flip(truth, tmp_path, flipped, symmetry):
    q_global = Rotation.from_euler("ZYZ", [40, 70, -25], degrees=True).as_matrix()
    group = geometry.symmetry_matrices(symmetry)
    mates = group[np.random.default_rng(7).integers(0, len(group), size=N)]
    moved = geometry.matrix_to_quaternion(geometry.quaternion_to_matrix(truth.quaternions()) @ mates @ q_global)
    if flipped:
        moved = geometry.flip_handedness(moved)
    pred = ParticleSet.open(write_prediction(truth, tmp_path / "global.star", q=moved))
    assert evaluate.evaluate(pred, truth, symmetry=symmetry).metrics["median_deg"] > 20.0
    result = evaluate.evaluate(pred, truth, symmetry=symmetry, align=True)
    assert np.degrees(result.errors.pose).max() < 2e-3  # every particle, outliers included
    alignment = result.metrics["alignment"]
    assert alignment["flipped"] is flipped
    # The fitted rotation undoes the global one up to a symmetry operation: Q_global Q_fit is in the group.
    residual = q_global @ np.array(alignment["rotation"])
    assert np.abs(group - residual).max(axis=(1, 2)).min() < 1e-4
    if symmetry == "C1":
        angle = np.degrees(Rotation.from_matrix(q_global).magnitude())
        assert alignment["rotation_deg"] == pytest.approx(angle, abs=1e-3)


# ---------------------------------------------------------------- uncertainty


def brute_force_auroc(scores, positives):
    difference = scores[positives][:, None] - scores[~positives][None, :]
    return np.mean((difference > 0) + 0.5 * (difference == 0))


def test_auroc_matches_pairwise_counting_and_roc_area():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=300), 1)  # many ties
    positives = rng.random(300) < 0.3
    scores[positives] += 0.7
    value = evaluate.auroc(scores, positives)
    assert value == pytest.approx(brute_force_auroc(scores, positives), abs=1e-12)
    fpr, tpr = evaluate.roc_curve(scores, positives)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(value, abs=1e-12)
    assert evaluate.auroc(-scores, positives) == pytest.approx(1.0 - value, abs=1e-12)


def test_auroc_is_one_for_a_separating_score_and_half_for_a_random_one():
    rng = np.random.default_rng(6)
    positives = rng.random(20000) < 0.2
    assert evaluate.auroc(np.where(positives, 2.0, 1.0) + 0.1 * rng.random(20000), positives) == 1.0
    assert evaluate.auroc(rng.random(20000), positives) == pytest.approx(0.5, abs=0.02)
    assert np.isnan(evaluate.auroc(rng.random(10), np.zeros(10, dtype=bool)))


def test_kept_figures_follow_the_threshold(truth, outliers, tmp_path):
    angles = np.linspace(1.0, 40.0, N)
    unsure_inliers = ~outliers & (np.arange(N) % 4 == 0)  # some inliers look unsure too
    flat = outliers | unsure_inliers
    eigenvalues = eigenvalues_for(flat)
    path = write_prediction(truth, tmp_path / "p.star", q=perturb(truth.quaternions(), angles), eigenvalues=eigenvalues)
    result = evaluate.evaluate(ParticleSet.open(path), truth, metric="dispersion_trace", threshold=0.1)
    metrics = result.metrics
    assert metrics["outlier_auroc"] == pytest.approx(brute_force_auroc(flat.astype(float), outliers))
    kept = ~flat
    np.testing.assert_array_equal(result.kept, kept)
    assert metrics["kept_fraction"] == pytest.approx(kept.mean())
    assert metrics["outliers_rejected_fraction"] == 1.0
    assert metrics["inliers_kept_fraction"] == pytest.approx(kept[~outliers].mean())
    assert metrics["kept_n"] == int(kept.sum())
    assert metrics["kept_median_deg"] == pytest.approx(np.median(angles[kept]), abs=2e-3)
    everything = evaluate.evaluate(ParticleSet.open(path), truth, metric="dispersion_trace", threshold=10.0).metrics
    assert everything["kept_fraction"] == 1.0 and everything["outliers_rejected_fraction"] == 0.0


def test_scores_fall_back_to_the_dispersion_column(truth, outliers, tmp_path):
    columns = pd.DataFrame({name: truth.table[name] for name in star.ANGLES})
    columns[star.DISPERSION_TRACE] = np.where(outliers, 5.0, 0.01)
    truth.write_star(tmp_path / "p.star", columns=columns)
    result = evaluate.evaluate(ParticleSet.open(tmp_path / "p.star"), truth, metric="dispersion_trace")
    assert result.metrics["score_source"] == star.DISPERSION_TRACE
    assert result.metrics["outlier_auroc"] == 1.0
    with pytest.raises(CryoForumError, match="max_dispersion"):
        evaluate.evaluate(ParticleSet.open(tmp_path / "p.star"), truth, metric="max_dispersion")


def test_without_uncertainty_or_labels_the_figures_are_skipped_and_said_so(truth, tmp_path):
    blocks = star.read_star(truth.source)
    blocks[star.PARTICLES_BLOCK] = blocks[star.PARTICLES_BLOCK].drop(columns=[star.OUTLIER, star.OUTLIER_KIND])
    star.write_star(truth.source.parent.parent / "unlabelled.star", blocks)
    unlabelled = ParticleSet.open(truth.source.parent.parent / "unlabelled.star")
    pred = ParticleSet.open(write_prediction(truth, tmp_path / "p.star", q=truth.quaternions()))
    metrics = evaluate.evaluate(pred, unlabelled, threshold=1.0).metrics
    assert metrics["n"] == N and metrics["n_outliers"] is None
    assert not {"outlier_auroc", "kept_fraction", "threshold"} & set(metrics)
    assert any("no uncertainty columns" in note for note in metrics["notes"])
    assert any(star.OUTLIER in note for note in metrics["notes"])


# ---------------------------------------------------------------- matching and inputs


def test_matching_across_absolute_and_relative_stack_paths(truth, truth_path, tmp_path):
    keep = np.arange(0, N, 3)
    elsewhere = write_prediction(truth, tmp_path / "elsewhere" / "p.star", q=truth.quaternions()[keep], keep=keep)
    assert ParticleSet.open(elsewhere).stack_names[0].startswith("/")  # absolute here, relative in the truth
    matching = evaluate.pair_by_image_name(ParticleSet.open(elsewhere), truth)
    np.testing.assert_array_equal(matching.truth_rows, keep)
    np.testing.assert_array_equal(matching.pred_rows, np.arange(len(keep)))
    assert (matching.by_file_name, matching.pred_unmatched, matching.truth_unmatched) == (0, 0, N - len(keep))
    # A stack moved elsewhere (not found at its absolute path) still matches by its file name.
    blocks = star.read_star(elsewhere)
    names = blocks[star.PARTICLES_BLOCK][star.IMAGE_NAME].str.replace(str(truth_path.parent), "/moved/away")
    blocks[star.PARTICLES_BLOCK][star.IMAGE_NAME] = names
    star.write_star(tmp_path / "moved.star", blocks)
    moved = evaluate.pair_by_image_name(ParticleSet.open(tmp_path / "moved.star"), truth)
    np.testing.assert_array_equal(moved.truth_rows, keep)
    assert moved.by_file_name == len(keep)


def test_unmatched_and_bad_inputs_name_the_file(truth, truth_path, tmp_path, capsys):
    blocks = star.read_star(truth_path)
    particles = blocks[star.PARTICLES_BLOCK]
    particles[star.IMAGE_NAME] = [f"{i + 1:06d}@other.mrcs" for i in range(N)]
    star.write_star(tmp_path / "other.star", blocks)
    assert run_cli(tmp_path / "other.star", truth_path, tmp_path / "report") == 1
    error = capsys.readouterr().err
    assert "other.star" in error and "none of its" in error
    assert not (tmp_path / "report").exists()

    no_angles = star.read_star(truth_path)
    no_angles[star.PARTICLES_BLOCK] = no_angles[star.PARTICLES_BLOCK].drop(columns=list(star.ANGLES))
    star.write_star(tmp_path / "no_angles.star", no_angles)
    with pytest.raises(CryoForumError, match=r"no_angles\.star"):
        evaluate.evaluate(ParticleSet.open(tmp_path / "no_angles.star"), truth)
    assert run_cli(tmp_path / "missing.star", truth_path, tmp_path / "report") == 1
    assert "missing.star" in capsys.readouterr().err
    assert run_cli(truth_path, truth_path, tmp_path / "report", "--symmetry", "X3") == 1
    assert "--symmetry" in capsys.readouterr().err


# ---------------------------------------------------------------- the command


def test_command_writes_every_plot_and_the_metrics(truth, truth_path, outliers, tmp_path, capsys):
    angles = np.linspace(1.0, 40.0, N)
    pred = write_prediction(
        truth,
        tmp_path / "pred" / "predicted.star",
        q=perturb(truth.quaternions(), angles),
        eigenvalues=eigenvalues_for(outliers),
    )
    report = tmp_path / "report"
    assert (
        run_cli(pred, truth_path, report, "--symmetry", "c1", "--metric", "dispersion_trace", "--threshold", "0.1") == 0
    )
    metrics = json.loads((report / "metrics.json").read_text())
    required = {
        "n",
        "median_deg",
        "mean_deg",
        "p90_deg",
        "viewing_median_deg",
        "inplane_median_deg",
        "outlier_auroc",
        "kept_median_deg",
        "kept_mean_deg",
        "kept_p90_deg",
        "kept_fraction",
        "outliers_rejected_fraction",
        "inliers_kept_fraction",
    }
    assert required <= set(metrics)
    assert metrics["outlier_auroc"] == 1.0 and metrics["inliers_kept_fraction"] == 1.0
    assert set(metrics["files"]) == {"particles", *evaluate.PLOT_NAMES}
    for name in evaluate.PLOT_NAMES.values():
        assert (report / name).read_bytes()[:8] == PNG, name
    table = pd.read_csv(report / "errors.csv")
    np.testing.assert_allclose(table["error_deg"], angles, atol=2e-3)
    printed = capsys.readouterr().out
    assert "outlier AUROC" in printed and str(report / "metrics.json") in printed
    assert not list(tmp_path.glob(".report*"))  # no staging folder left behind


def test_model_option_takes_the_runs_calibrated_threshold(truth, truth_path, outliers, tmp_path):
    rng = np.random.default_rng(9)
    unsure = rng.random(400) < 0.3
    validation = eigenvalues_for(unsure) * rng.lognormal(0.0, 0.2, size=(400, 1))
    Run(tmp_path / "run").save_calibration(calibration.calibrate(validation, np.where(unsure, 90.0, 5.0)))
    expected = calibration.threshold_for(Run(tmp_path / "run").load_calibration(), "dispersion_trace")
    eigenvalues = eigenvalues_for(outliers)
    pred = write_prediction(truth, tmp_path / "p.star", q=truth.quaternions(), eigenvalues=eigenvalues)
    args = ("--model", str(tmp_path / "run"))
    assert run_cli(pred, truth_path, tmp_path / "report", *args, "--metric", "dispersion_trace") == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["threshold"] == pytest.approx(expected)
    assert run_cli(pred, truth_path, tmp_path / "default", *args) == 0  # without --metric: the calibration's
    default = Run(tmp_path / "run").load_calibration()["default_metric"]
    assert json.loads((tmp_path / "default" / "metrics.json").read_text())["metric"] == default
    assert dispersion_trace(SHARP) < expected < dispersion_trace(FLAT)
    assert metrics["kept_fraction"] == pytest.approx(np.mean(~outliers))
    assert metrics["outliers_rejected_fraction"] == 1.0
    assert run_cli(pred, truth_path, tmp_path / "other", "--model", str(tmp_path / "nowhere")) == 1
