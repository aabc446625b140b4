"""Uncertainty calibration: quantiles, scores from tables, recommended thresholds, files and their errors."""

import json

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.prediction import calibration as cal
from cryo_forum.prediction.uncertainty import SCORES
from cryo_forum.training.run import Run


def random_eigenvalues(n: int, seed: int, low: float = -1.0, high: float = 4.0) -> np.ndarray:
    """Eigenvalues [n, 4]: an arbitrary offset plus concentrations spread over decades."""
    rng = np.random.default_rng(seed)
    concentrations = 10 ** rng.uniform(low, high, (n, 3))
    return rng.normal(0, 10, (n, 1)) + np.column_stack([np.zeros(n), concentrations])


def table_of(eigenvalues: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(np.sort(eigenvalues, axis=1), columns=list(star.EIGENVALUES))


def isotropic_eigenvalues(trace: np.ndarray) -> np.ndarray:
    """Eigenvalues [N, 4] whose dispersion trace (3 / z) equals ``trace`` [N]: a score we choose directly."""
    z = 3.0 / np.asarray(trace)
    return np.column_stack([np.zeros(len(z)), z, z, z])


def test_quantile_thresholds_match_numpy_quantiles():
    eigenvalues = random_eigenvalues(237, seed=0)
    calibration = cal.calibrate(eigenvalues, source="test")
    assert calibration["n"] == 237 and set(calibration["metrics"]) == set(SCORES)
    assert calibration["default_metric"] == "expected_error_deg"
    for name, score in SCORES.items():
        scores = score(eigenvalues)
        for q in (0.0, 0.01, 0.25, 0.5, 0.73, 0.99, 1.0):
            assert cal.threshold_for(calibration, name, q) == pytest.approx(np.quantile(scores, q), rel=1e-12)
        between = np.interp(0.735, [0.73, 0.74], np.quantile(scores, [0.73, 0.74]))
        assert cal.threshold_for(calibration, name, 0.735) == pytest.approx(between, rel=1e-12)
        assert cal.threshold_for(calibration, name, 0.0) == pytest.approx(scores.min(), rel=1e-12)
        assert cal.threshold_for(calibration, name, 1.0) == pytest.approx(scores.max(), rel=1e-12)
        kept = np.mean(scores <= cal.threshold_for(calibration, name, 0.6))
        assert kept == pytest.approx(0.6, abs=1 / 237)
        assert cal.calibration_fraction_below(calibration, name, np.quantile(scores, 0.42)) == pytest.approx(0.42)


def test_scores_from_eigenvalue_columns_and_from_fallback_columns():
    eigenvalues = random_eigenvalues(20, seed=1)
    table = table_of(eigenvalues)
    for name, score in SCORES.items():
        np.testing.assert_allclose(cal.scores_from_table(table, name), score(eigenvalues), rtol=1e-12)
    fallback = pd.DataFrame(
        {star.DISPERSION_TRACE: [1.0, 2.0], star.MAX_DISPERSION: [3.0, 4.0], star.EIGEN_GAP: [5, 6]}
    )
    np.testing.assert_array_equal(cal.scores_from_table(fallback, "dispersion_trace"), [1.0, 2.0])
    np.testing.assert_array_equal(cal.scores_from_table(fallback, "max_dispersion"), [3.0, 4.0])
    np.testing.assert_array_equal(cal.scores_from_table(fallback, "negative_eigengap"), [-5.0, -6.0])
    assert cal.available_metrics(fallback) == ["dispersion_trace", "max_dispersion", "negative_eigengap"]
    # Eigenvalues win over a stale derived column.
    both = table.assign(**{star.DISPERSION_TRACE: 0.0})
    np.testing.assert_allclose(cal.scores_from_table(both, "dispersion_trace"), SCORES["dispersion_trace"](eigenvalues))


def test_missing_values_score_nan_and_bad_tables_name_their_columns():
    table = table_of(random_eigenvalues(4, seed=2))
    table.loc[1, "cfEigenvalue3"] = np.nan
    scores = cal.scores_from_table(table, "expected_error_deg")
    assert np.isnan(scores[1]) and np.isfinite(scores[[0, 2, 3]]).all()
    partial = table.drop(columns=["cfEigenvalue4"]).assign(**{star.DISPERSION_TRACE: 1.0})
    np.testing.assert_array_equal(cal.scores_from_table(partial, "dispersion_trace"), np.ones(4))
    with pytest.raises(CryoForumError, match=r"^p\.star: metric expected_error_deg needs .*missing: cfEigenvalue4"):
        cal.scores_from_table(partial, "expected_error_deg", source="p.star")
    with pytest.raises(CryoForumError, match=r"^p\.star: .*cfEigenvalue1.*or cfMaxDispersion"):
        cal.scores_from_table(pd.DataFrame({"rlnImageName": ["1@a"]}), "max_dispersion", source="p.star")
    with pytest.raises(CryoForumError, match=r"^metric: unknown metric 'entropy'; choose from dispersion_trace"):
        cal.scores_from_table(table, "entropy")
    with pytest.raises(CryoForumError, match=r"^q\.star: non-numeric"):
        cal.scores_from_table(table.assign(cfEigenvalue2="x"), "dispersion_trace", source="q.star")
    with pytest.raises(CryoForumError, match="1 of 4 particles have no finite"):
        cal.calibrate(table)
    with pytest.raises(CryoForumError, match="no uncertainty columns"):
        cal.calibrate(pd.DataFrame({"rlnImageName": ["1@a"]}), source="v.star")


def test_a_table_and_its_eigenvalues_calibrate_alike():
    eigenvalues = random_eigenvalues(50, seed=3)
    from_table = cal.calibrate(table_of(eigenvalues))
    from_array = cal.calibrate(eigenvalues)
    for name in SCORES:
        np.testing.assert_allclose(
            from_table["metrics"][name]["quantiles"], from_array["metrics"][name]["quantiles"], rtol=1e-12
        )
    fallback = table_of(eigenvalues).assign(**{star.DISPERSION_TRACE: SCORES["dispersion_trace"](eigenvalues)})
    only_trace = cal.calibrate(fallback.drop(columns=list(star.EIGENVALUES)))
    assert list(only_trace["metrics"]) == ["dispersion_trace"] and only_trace["default_metric"] == "dispersion_trace"
    with pytest.raises(CryoForumError, match=r"metric: 'expected_error_deg' is not in the calibration"):
        cal.threshold_for(only_trace, "expected_error_deg", 0.5)


def junk_mixture(n: int, junk: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and errors: good particles (errors ~ 3 deg, low scores) and junk (random poses, high scores)."""
    rng = np.random.default_rng(seed)
    bad = np.arange(n) >= round((1 - junk) * n)
    scores = np.where(bad, rng.uniform(1.5, 3.0, n), rng.uniform(0.0, 1.0, n))
    errors = np.where(bad, rng.uniform(20.0, 180.0, n), 3.0 * rng.lognormal(0.0, 0.5, n))
    permutation = rng.permutation(n)
    return scores[permutation], errors[permutation]


def test_recommended_threshold_cuts_where_junk_starts():
    scores, errors = junk_mixture(400, junk=0.3, seed=4)
    good = errors < 20
    calibration = cal.calibrate(isotropic_eigenvalues(scores), errors, source="mixture")
    recommended = calibration["metrics"]["dispersion_trace"]["recommended"]
    assert 0.66 <= recommended["keep_fraction"] <= 0.74
    kept = scores <= recommended["threshold"]
    assert kept[good].mean() >= 0.95 and kept[~good].mean() <= 0.1
    assert recommended["kept_median_error_deg"] == pytest.approx(np.median(errors[kept]))
    assert recommended["kept_mean_error_deg"] == pytest.approx(np.mean(errors[kept]))
    assert recommended["kept_mean_error_deg"] < 0.2 * np.mean(errors)
    # Every metric is a monotone function of the trace here, so all keep the same particles.
    for name in ("max_dispersion", "expected_error_deg"):
        other = calibration["metrics"][name]["recommended"]
        assert other["keep_fraction"] == recommended["keep_fraction"]
    assert cal.threshold_for(calibration, "dispersion_trace") == recommended["threshold"]
    assert calibration["metrics"]["dispersion_trace"]["spearman_with_error"] > 0.5
    assert calibration["errors_deg"]["median"] == pytest.approx(np.median(errors))


def test_recommended_threshold_keeps_everything_when_the_score_says_nothing():
    rng = np.random.default_rng(5)
    scores, errors = rng.uniform(0, 1, 400), 5.0 * rng.lognormal(0.0, 0.5, 400)
    recommended = cal.recommend_threshold(scores, errors)
    assert recommended["keep_fraction"] == 1.0 and recommended["threshold"] == scores.max()


def test_recommended_threshold_on_a_gradual_trend():
    """Errors grow steadily with the score: a looser tolerance keeps more, and the cut sits where it should."""
    rng = np.random.default_rng(6)
    scores = rng.uniform(0, 1, 1000)
    errors = (1.0 + 20.0 * scores) * rng.lognormal(0.0, 0.2, 1000)  # best decile ~ 2 deg
    fractions = [cal.recommend_threshold(scores, errors, tolerance)["keep_fraction"] for tolerance in (2, 3, 5, 20)]
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1] == 1.0
    # Tolerance 3: typical error 3 x ~2 deg = ~6 deg, reached near score (6 - 1) / 20 = 0.25.
    assert 0.15 <= cal.recommend_threshold(scores, errors)["threshold"] <= 0.35


def test_save_and_load_round_trip(tmp_path):
    scores, errors = junk_mixture(100, junk=0.2, seed=7)
    calibration = cal.calibrate(isotropic_eigenvalues(scores), errors, source="validation of run")
    path = Run(tmp_path / "run").save_calibration(calibration)
    assert path == tmp_path / "run" / "calibration.json" and sorted(p.name for p in path.parent.iterdir()) == [
        "calibration.json"
    ]
    loaded = Run(tmp_path / "run").load_calibration()
    assert loaded == json.loads(json.dumps(calibration))
    for q in (None, 0.3, 0.875):
        assert cal.threshold_for(loaded, "expected_error_deg", q) == cal.threshold_for(
            calibration, "expected_error_deg", q
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "calibration.json: not found"),
        ("{not json", "calibration.json: cannot read the calibration"),
        ('{"format": "something else"}', "calibration.json: not a cryo-forum calibration"),
        ("[1, 2]", "calibration.json: not a cryo-forum calibration"),
    ],
)
def test_load_errors_name_the_file(tmp_path, content, message):
    if content is not None:
        (tmp_path / "calibration.json").write_text(content)
    with pytest.raises(CryoForumError, match=message):
        Run(tmp_path).load_calibration()


def test_damaged_quantiles_are_refused(tmp_path):
    calibration = cal.calibrate(random_eigenvalues(30, seed=8))
    calibration["metrics"]["dispersion_trace"]["quantiles"] = [1.0, 2.0]
    (tmp_path / "calibration.json").write_text(json.dumps(calibration))
    with pytest.raises(CryoForumError, match="not a cryo-forum calibration"):
        Run(tmp_path).load_calibration()


def test_threshold_errors():
    without_errors = cal.calibrate(random_eigenvalues(30, seed=9))
    with pytest.raises(CryoForumError, match=r"no recommended threshold .* give --quantile or --threshold"):
        cal.threshold_for(without_errors, "dispersion_trace")
    for quantile in (-0.01, 1.5, float("nan")):
        with pytest.raises(CryoForumError, match=r"^quantile: must lie in \[0, 1\]"):
            cal.threshold_for(without_errors, "dispersion_trace", quantile)
    with pytest.raises(CryoForumError, match=r"^metric: unknown metric 'bogus'"):
        cal.threshold_for(without_errors, "bogus", 0.5)
    with pytest.raises(ValueError, match="errors_deg must be 30 finite values"):
        cal.calibrate(random_eigenvalues(30, seed=9), errors_deg=np.ones(29))
    with pytest.raises(CryoForumError, match="no particles"):
        cal.calibrate(np.zeros((0, 4)))


def test_pose_errors_match_scipy_and_respect_symmetry():
    rng = np.random.default_rng(10)
    truth_rot = Rotation.random(25, random_state=11)
    predicted_rot = Rotation.from_rotvec(rng.normal(0, 0.3, (25, 3))) * truth_rot
    # RELION's matrix A is the transpose of the ZYZ rotation of (rot, tilt, psi).
    table = lambda rot: pd.DataFrame(rot.as_euler("ZYZ", degrees=True), columns=list(star.ANGLES))  # noqa: E731
    expected = np.degrees((predicted_rot * truth_rot.inv()).magnitude())
    np.testing.assert_allclose(cal.pose_errors_deg(table(predicted_rot), table(truth_rot)), expected, atol=1e-7)
    # A C2 mate of the truth, A g^T with g a half-turn about z (scipy's rotation is A^T, so g A^T), is no error
    # under C2 and 180 degrees under C1.
    mates = Rotation.from_euler("z", 180, degrees=True) * truth_rot
    errors_c2 = cal.pose_errors_deg(table(mates), table(truth_rot), "C2")
    errors_c1 = cal.pose_errors_deg(table(mates), table(truth_rot), "C1")
    np.testing.assert_allclose(errors_c2, 0.0, atol=1e-6)
    np.testing.assert_allclose(errors_c1, 180.0, atol=1e-6)
