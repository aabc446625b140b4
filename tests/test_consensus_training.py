"""What training on a consensus refinement needs: junk-aware likelihood, view balance, directional junk scores."""

import numpy as np
import pytest

from cryo_forum import geometry
from cryo_forum.model.estimator import OrientationEstimator
from cryo_forum.prediction.directional import directional_model, junk_scores
from cryo_forum.streams.balance import view_balance_weights
from cryo_forum.tensorflow_quiet import tf


def _sharp_belief(quaternion: np.ndarray, concentration: float) -> dict:
    """Outputs of a qcqp head whose Bingham belief peaks at ``quaternion`` with the given concentration."""
    q = np.asarray(quaternion, dtype=np.float64)
    basis = np.linalg.qr(np.column_stack([q, np.eye(4)[:, :3]]))[0]  # first column +-q, then an orthonormal rest
    values = np.array([0.0, concentration, concentration, concentration])
    matrix = basis @ np.diag(values) @ basis.T
    return {"matrix": tf.constant(matrix[None]), "eigenvalues": tf.constant(values[None])}


@pytest.fixture(scope="module")
def estimator():
    return OrientationEstimator({"name": "small", "image_size": 16, "widths": [4]}, junk_prior=0.2)


def test_a_label_the_belief_cannot_explain_stops_pulling(estimator):
    q = geometry.random_quaternions(2, 1)
    outputs = _sharp_belief(q[0], 200.0)
    explained = estimator._likelihood(tf.constant(q[:1]), outputs, tf.constant([0.0], tf.float64))
    unexplained = estimator._likelihood(tf.constant(q[1:]), outputs, tf.constant([0.0], tf.float64))
    assert float(explained[1][0]) > 0.99 and float(unexplained[1][0]) < 0.01
    assert (
        float(unexplained[0][0])
        < float(  # the mixture caps the NLL of junk
            estimator._likelihood(tf.constant(q[1:]), outputs, tf.constant([1.0], tf.float64))[0][0]
        )
    )
    trusting = OrientationEstimator({"name": "small", "image_size": 16, "widths": [4]})
    nll, responsibility = trusting._likelihood(tf.constant(q[1:]), outputs, tf.constant([0.0], tf.float64))
    assert float(responsibility[0]) == 1.0 and float(nll[0]) > float(unexplained[0][0])


def test_view_weights_favour_rare_views():
    rng = np.random.default_rng(0)
    small = geometry.matrix_to_quaternion(geometry.rotvec_to_matrix(rng.normal(scale=0.05, size=(800, 3))))
    cluster = geometry.quaternion_multiply(small, geometry.random_quaternions(1, 2))  # 800 of one view
    spread = geometry.random_quaternions(200, 3)
    weights = view_balance_weights(np.concatenate([cluster, spread]))
    assert weights.mean() == pytest.approx(1.0)
    assert weights[:800].mean() < 0.5 * weights[800:].mean()
    assert weights.max() / weights.min() <= 25.0 + 1e-9
    np.testing.assert_array_equal(view_balance_weights(spread, strength=0.0), 1.0)


def test_junk_scores_compare_a_particle_with_its_own_view():
    rng = np.random.default_rng(1)
    poses = geometry.random_quaternions(3000, 4)
    directions = geometry.viewing_directions(poses)
    rare = directions[:, 2] > 0.8  # a cap of views the network is less sure of
    errors = np.where(rare, 12.0, 3.0) * rng.lognormal(0.0, 0.2, len(poses))
    junk = rng.random(len(poses)) < 0.05
    errors[junk] *= 6.0
    model = directional_model(errors[:2000], poses[:2000])
    z = junk_scores(errors[2000:], poses[2000:], model)
    plain = np.log(errors[2000:])
    test_rare, test_junk = rare[2000:], junk[2000:]
    good_rare = test_rare & ~test_junk
    # a plain score puts good particles of the rare views among the junk; the directional one does not
    assert np.median(plain[good_rare]) > np.quantile(plain[~test_rare & ~test_junk], 0.99)
    assert np.median(z[good_rare]) < np.quantile(z[test_junk], 0.1)
    assert abs(np.median(z[~test_junk])) < 0.5
