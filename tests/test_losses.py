"""Losses: pair distance matching by hand and by its invariances, symmetric and chordal pose losses, schedule."""

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryo_forum import geometry as g
from cryo_forum.errors import InvalidSetting
from cryo_forum.model.losses import (
    pair_distances,
    pair_weights,
    pairwise_distance_loss,
    pose_errors,
    upper_triangle_mask,
)
from cryo_forum.tensorflow_quiet import tf
from cryo_forum.training.config import LossSchedule

D2 = g.symmetry_quaternions("D2")


def about_z(degrees) -> tf.Tensor:
    angles = np.asarray(degrees, dtype=np.float64)[:, None]
    return tf.constant(g.matrix_to_quaternion(Rotation.from_euler("z", angles, degrees=True).as_matrix()))


def loss_deg(q_pred, q_true, **kwargs) -> float:
    return math.degrees(float(pairwise_distance_loss(q_pred, q_true, **kwargs)))


def mean_pose_error(q_pred, q_true, group=None, kind="geodesic"):
    return tf.reduce_mean(pose_errors(q_pred, q_true, group, kind))


def test_pairwise_loss_by_hand_for_three_rotations():
    truth, prediction = about_z([0, 30, 100]), about_z([0, 40, 70])
    # pairs (0,1), (0,2), (1,2): true 30, 100, 70 deg; predicted 40, 70, 30 deg; differences 10, 30, 40 deg.
    assert loss_deg(prediction, truth) == pytest.approx(80 / 3, abs=1e-6)
    density = 1 / (1 - np.cos(np.radians([30, 100, 70])))
    expected = np.sum(density * [10, 30, 40]) / density.sum()
    assert loss_deg(prediction, truth, weighting="density") == pytest.approx(expected, abs=1e-6)
    # two 90-degree bins: 30 and 70 share the first (weight 1/2 each), 100 is alone in the second.
    assert loss_deg(prediction, truth, weighting="histogram", bins=2) == pytest.approx(
        (0.5 * 10 + 1 * 30 + 0.5 * 40) / 2, abs=1e-6
    )


def test_pairwise_loss_zero_for_equal_and_for_a_batch_of_one():
    truth = tf.constant(g.random_quaternions(10, 1))
    for weighting in ("none", "density", "histogram"):
        assert float(pairwise_distance_loss(truth, truth, weighting=weighting)) == 0.0
    assert float(pairwise_distance_loss(truth[:1], tf.constant([[0.0, 0.0, 0.6, 0.8]], tf.float64))) == 0.0


def test_pairwise_loss_invariant_to_a_global_right_rotation():
    truth = g.random_quaternions(16, 2)
    prediction = g.random_quaternions(16, 3)
    global_rotation = g.random_quaternions(1, 4)
    moved = g.quaternion_multiply(prediction, global_rotation)  # A -> A Q
    for weighting in ("none", "density", "histogram"):
        before = pairwise_distance_loss(tf.constant(prediction), tf.constant(truth), weighting=weighting)
        after = pairwise_distance_loss(tf.constant(moved), tf.constant(truth), weighting=weighting)
        assert float(before) > 0.1
        assert float(after) == pytest.approx(float(before), abs=1e-9)
    # With D2, invariance holds for rotations that map the group onto itself (here Rz(90 deg)) ...
    quarter_turn = about_z([90]).numpy()
    before = pairwise_distance_loss(tf.constant(prediction), tf.constant(truth), D2)
    after = pairwise_distance_loss(tf.constant(g.quaternion_multiply(prediction, quarter_turn)), tf.constant(truth), D2)
    assert float(after) == pytest.approx(float(before), abs=1e-9)
    # ... but not for a generic one, which moves the symmetry axes.
    after = pairwise_distance_loss(tf.constant(moved), tf.constant(truth), D2)
    assert abs(float(after) - float(before)) > 1e-3


def test_symmetric_losses_vanish_between_mates():
    truth = g.random_quaternions(12, 5)
    choice = np.random.default_rng(6).integers(0, len(D2), 12)
    assert len(set(choice)) > 1
    mates = tf.constant(g.quaternion_multiply(truth, g.quaternion_conjugate(D2[choice])))  # A g^T
    truth = tf.constant(truth)
    assert float(pairwise_distance_loss(mates, truth, D2)) == pytest.approx(0.0, abs=1e-6)
    assert float(pairwise_distance_loss(mates, truth)) > 0.1
    # geodesic_distance_tf clips the dot product at 1 - 1e-7, so its floor is 2 acos(1 - 1e-7) = 9e-4 rad.
    for kind, floor in (("geodesic", 1e-3), ("chordal", 1e-12)):
        np.testing.assert_allclose(pose_errors(mates, truth, D2, kind).numpy(), 0.0, atol=floor)
        assert float(mean_pose_error(mates, truth, kind=kind)) > 0.1


def test_direct_losses_match_numpy_references():
    prediction, truth = g.random_quaternions(20, 7), g.random_quaternions(20, 8)
    geodesic = pose_errors(tf.constant(prediction), tf.constant(truth), D2, "geodesic").numpy()
    np.testing.assert_allclose(geodesic, g.symmetric_distance(prediction, truth, "D2"), atol=1e-6)

    r_pred, r_true = g.quaternion_to_matrix(prediction), g.quaternion_to_matrix(truth)
    plain = np.sum((r_pred - r_true) ** 2, axis=(-2, -1))
    chordal = pose_errors(tf.constant(prediction), tf.constant(truth), kind="chordal").numpy()
    np.testing.assert_allclose(chordal, plain, atol=1e-12)

    mates = np.einsum("nij,gkj->ngik", r_true, g.symmetry_matrices("D2"))  # A g^T
    symmetric = np.min(np.sum((r_pred[:, None] - mates) ** 2, axis=(-2, -1)), axis=1)
    chordal_d2 = mean_pose_error(tf.constant(prediction), tf.constant(truth), D2, "chordal")
    assert float(chordal_d2) == pytest.approx(symmetric.mean(), abs=1e-12)
    assert symmetric.mean() < plain.mean()


def test_gradients_are_finite_at_a_perfect_prediction():
    truth = tf.constant(g.random_quaternions(8, 9), tf.float32)
    prediction = tf.Variable(truth)
    losses = [
        lambda: pairwise_distance_loss(prediction, truth, D2, weighting="density"),
        lambda: mean_pose_error(prediction, truth, D2, "geodesic"),
        lambda: mean_pose_error(prediction, truth, D2, "chordal"),
    ]
    for loss in losses:
        with tf.GradientTape() as tape:
            value = loss()
        assert np.all(np.isfinite(tape.gradient(value, prediction).numpy()))
        assert float(value) == pytest.approx(0.0, abs=2e-3)  # the geodesic floor, see above


def test_histogram_weights_balance_occupied_bins():
    truth = tf.constant(g.random_quaternions(40, 10))
    distances = pair_distances(truth)
    mask = upper_triangle_mask(40, tf.float64)
    weights = pair_weights(distances, mask, "histogram", bins=6).numpy()
    index = np.minimum((distances.numpy() * 6 / np.pi).astype(int), 5)
    upper = np.triu(np.ones((40, 40), bool), 1)
    assert np.all(weights[~upper] == 0)
    totals = [weights[upper & (index == b)].sum() for b in range(6) if np.any(upper & (index == b))]
    np.testing.assert_allclose(totals, 1.0, atol=1e-12)
    assert len(totals) >= 4


def test_unknown_options_name_the_choices():
    q = tf.constant(g.random_quaternions(3, 0))
    with pytest.raises(ValueError, match="none, density, histogram"):
        pairwise_distance_loss(q, q, weighting="uniform")
    with pytest.raises(ValueError, match="geodesic, chordal"):
        mean_pose_error(q, q, kind="l2")
    with pytest.raises(InvalidSetting, match="original, constant, linear"):
        LossSchedule(kind="cosine")


def test_schedules():
    original = LossSchedule("original", switch_epoch=5)
    assert [original(e) for e in (0, 4.9, 5, 20)] == [(1.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.0, 1.0)]
    constant = LossSchedule("constant", distance_weight=0.3, direct_weight=2.0)
    assert constant(0) == constant(100) == (0.3, 2.0)
    linear = LossSchedule("linear", switch_epoch=2, ramp_epochs=4, direct_weight=2.0)
    assert linear(0) == (1.0, 0.0)
    assert linear(3) == pytest.approx((0.75, 0.5))
    assert linear(6) == linear(60) == (0.0, 2.0)
    assert linear.handed_over == 6 and constant.handed_over == 0


def test_sample_mask_drops_every_pair_of_a_masked_particle():
    from cryo_forum.geometry import random_quaternions

    q_true = random_quaternions(5, 21)
    q_pred = q_true.copy()
    q_pred[4] = random_quaternions(1, 22)[0]  # only particle 4 is wrong
    wrong = pairwise_distance_loss(tf.constant(q_pred), tf.constant(q_true))
    masked = pairwise_distance_loss(
        tf.constant(q_pred), tf.constant(q_true), sample_mask=tf.constant([1.0, 1, 1, 1, 0])
    )
    assert float(wrong) > 0.01
    assert float(masked) == pytest.approx(0.0, abs=1e-3)


def _bingham_matrix(mode: np.ndarray, concentrations) -> np.ndarray:
    """A = sum_i z_i v_i v_i^T with v_0 = mode and v_1..3 completing an orthonormal basis."""
    basis = np.linalg.svd(mode[None, :])[2]  # rows: mode (up to sign), then its orthogonal complement
    basis[0] = mode
    return sum(z * np.outer(v, v) for z, v in zip((0.0, *concentrations), basis, strict=True))


def test_bingham_normaliser_matches_integration_on_the_sphere():
    from cryo_forum.model.losses import bingham_nll

    rng = np.random.default_rng(3)
    samples = rng.standard_normal((400000, 4))
    samples /= np.linalg.norm(samples, axis=1, keepdims=True)
    mode = np.array([0.0, 0.0, 0.0, 1.0])
    cases = [([0.0, 0.0, 0.0], 0.01), ([0.5, 1.0, 2.0], 0.4), ([30.0, 60.0, 90.0], 0.1)]
    for concentrations, tolerance in cases:
        matrix = _bingham_matrix(mode, concentrations)
        integral = 2 * np.pi**2 * np.mean(np.exp(-np.einsum("ni,ij,nj->n", samples, matrix, samples)))
        eigenvalues = np.linalg.eigvalsh(matrix)[None]
        nll_at_mode = bingham_nll(tf.constant(mode[None]), tf.constant(matrix[None]), tf.constant(eigenvalues))
        assert float(nll_at_mode[0]) == pytest.approx(np.log(integral), abs=tolerance)
    sharp = np.array([3e3, 6e3, 9e3])  # Gaussian limit: two antipodal modes of 2 pi^(3/2) / sqrt(prod z) in all
    matrix = _bingham_matrix(mode, sharp)
    nll = bingham_nll(tf.constant(mode[None]), tf.constant(matrix[None]), tf.constant(np.linalg.eigvalsh(matrix)[None]))
    assert float(nll[0]) == pytest.approx(np.log(2 * np.pi**1.5 / np.sqrt(np.prod(sharp))), abs=1e-3)


def test_bingham_nll_rewards_sharp_beliefs_for_inliers_and_flat_ones_for_outliers():
    from cryo_forum.model.losses import bingham_nll

    mode = g.random_quaternions(1, 4)[0]
    near = g.quaternion_multiply(mode, Rotation.from_rotvec([0.0, 0.05, 0.0]).as_quat())
    random_truths = g.random_quaternions(2000, 5)

    def mean_nll(truths, z):
        matrix = _bingham_matrix(mode, [z, z, z])
        batch = len(truths)
        matrices = tf.constant(np.broadcast_to(matrix, (batch, 4, 4)))
        eigenvalues = tf.constant(np.broadcast_to(np.linalg.eigvalsh(matrix), (batch, 4)))
        return float(tf.reduce_mean(bingham_nll(tf.constant(truths), matrices, eigenvalues)))

    assert mean_nll(near[None], 200.0) < mean_nll(near[None], 5.0)  # a small error earns a sharp belief
    assert mean_nll(random_truths, 0.5) < mean_nll(random_truths, 50.0)  # random poses earn a flat one
