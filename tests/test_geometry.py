"""Rotation conventions checked against scipy, RELION's own formula and DESIGN.md."""

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.transform import Rotation

from cryo_forum import geometry as g


def relion_euler_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's Euler_angles2matrix (src/euler.cpp), written out independently."""
    a, b, c = np.radians([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(c), np.sin(c)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


@pytest.fixture
def eulers():
    rng = np.random.default_rng(7)
    return np.column_stack([rng.uniform(-180, 180, 50), rng.uniform(0, 180, 50), rng.uniform(-180, 180, 50)])


def test_euler_matrix_matches_relion_and_scipy(eulers):
    matrices = g.euler_to_matrix(eulers)
    for angles, matrix in zip(eulers, matrices, strict=True):
        np.testing.assert_allclose(matrix, relion_euler_matrix(*angles), atol=1e-12)
    scipy_form = Rotation.from_euler("ZYZ", eulers, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(matrices, scipy_form, atol=1e-12)


def test_third_row_is_viewing_direction():
    rot, tilt = 30.0, 60.0
    view = g.euler_to_matrix([rot, tilt, 123.0])[2]
    expected = [np.sin(np.radians(tilt)) * np.cos(np.radians(rot)), np.sin(np.radians(tilt)) * np.sin(np.radians(rot))]
    np.testing.assert_allclose(view, [*expected, np.cos(np.radians(tilt))], atol=1e-12)


def test_euler_round_trip_including_gimbal_lock(eulers):
    cases = np.vstack([eulers, [[10.0, 0.0, 20.0], [-40.0, 180.0, 75.0]]])
    back = g.matrix_to_euler(g.euler_to_matrix(cases))
    np.testing.assert_allclose(g.euler_to_matrix(back), g.euler_to_matrix(cases), atol=1e-9)
    assert np.all((back[:, 1] >= 0) & (back[:, 1] <= 180))
    np.testing.assert_allclose(back[:-2], eulers, atol=1e-7)


def test_quaternion_represents_the_matrix_with_canonical_sign(eulers):
    q = g.euler_to_quaternion(eulers)
    assert np.all(q[:, 3] >= 0)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(Rotation.from_quat(q).as_matrix(), g.euler_to_matrix(eulers), atol=1e-12)
    np.testing.assert_allclose(g.quaternion_to_euler(q), g.matrix_to_euler(g.euler_to_matrix(eulers)), atol=1e-7)
    np.testing.assert_allclose(g.canonical_quaternion(-q), q)


def test_cryosparc_rotation_vector_convention(eulers):
    matrices = g.euler_to_matrix(eulers)
    rotvecs = g.matrix_to_rotvec(matrices)
    np.testing.assert_allclose(Rotation.from_rotvec(rotvecs).as_matrix(), matrices.transpose(0, 2, 1), atol=1e-12)
    np.testing.assert_allclose(g.rotvec_to_matrix(rotvecs), matrices, atol=1e-12)


def test_quaternion_multiply_composes_matrices():
    q1, q2 = g.random_quaternions(10, 1), g.random_quaternions(10, 2)
    product = g.quaternion_to_matrix(g.quaternion_multiply(q1, q2))
    np.testing.assert_allclose(product, g.quaternion_to_matrix(q1) @ g.quaternion_to_matrix(q2), atol=1e-12)


def test_geodesic_distance_is_rotation_angle_and_precise_when_small():
    q1, q2 = g.random_quaternions(100, 3), g.random_quaternions(100, 4)
    relative = g.quaternion_to_matrix(q1) @ g.quaternion_to_matrix(q2).transpose(0, 2, 1)
    angle = np.arccos(np.clip((np.trace(relative, axis1=1, axis2=2) - 1) / 2, -1, 1))
    np.testing.assert_allclose(g.geodesic_distance(q1, q2), angle, atol=1e-7)
    np.testing.assert_allclose(g.geodesic_distance(q1, -q2), angle, atol=1e-7)
    tiny = Rotation.from_rotvec([0, 0, 1e-7]).as_quat()
    assert g.geodesic_distance(tiny, [0, 0, 0, 1.0]) == pytest.approx(1e-7, rel=1e-6)


def test_random_rotations_are_uniform():
    angles = g.geodesic_distance(g.random_quaternions(20000, 5), [0.0, 0.0, 0.0, 1.0])
    # Haar measure: the rotation angle has density (1 - cos d) / pi on [0, pi].
    cdf = lambda d: (d - np.sin(d)) / np.pi  # noqa: E731
    assert stats.kstest(angles, cdf).pvalue > 0.01


@pytest.mark.parametrize(
    ("name", "order"), [("C1", 1), ("C4", 4), ("D2", 4), ("D7", 14), ("T", 12), ("O", 24), ("I", 60)]
)
def test_point_groups_are_closed_groups_of_the_right_order(name, order):
    group = g.symmetry_matrices(name)
    assert len(group) == order
    np.testing.assert_allclose(group[0], np.eye(3))
    np.testing.assert_allclose(group @ group.transpose(0, 2, 1), np.broadcast_to(np.eye(3), group.shape), atol=1e-9)
    products = np.einsum("aij,bjk->abik", group, group).reshape(-1, 3, 3)
    for product in products[:: max(1, len(products) // 200)]:
        assert np.min(np.abs(group - product).max(axis=(1, 2))) < 1e-6


def contains(group: np.ndarray, axis, angle_deg: float) -> bool:
    target = Rotation.from_rotvec(np.radians(angle_deg) * np.asarray(axis, float) / np.linalg.norm(axis)).as_matrix()
    return bool(np.min(np.abs(group - target).max(axis=(1, 2))) < 1e-5)


def test_point_groups_are_oriented_as_in_relion():
    assert contains(g.symmetry_matrices("C4"), [0, 0, 1], 90)
    assert contains(g.symmetry_matrices("D2"), [1, 0, 0], 180)
    assert contains(g.symmetry_matrices("D2"), [0, 1, 0], 180)
    assert contains(g.symmetry_matrices("T"), [0, 0, 1], 120)
    assert contains(g.symmetry_matrices("O"), [0, 0, 1], 90)
    assert contains(g.symmetry_matrices("O"), [1, 1, 1], 120)
    assert contains(g.symmetry_matrices("I"), [0, 0, 1], 180)  # RELION's default I is I2
    assert contains(g.symmetry_matrices("I1"), [1, 0, 0], 180)
    assert not contains(g.symmetry_matrices("I1"), [0, 0, 1], 72)
    assert contains(g.symmetry_matrices("I3"), [0, 0, 1], 72)


def test_unknown_symmetry_is_rejected_by_name():
    with pytest.raises(ValueError, match="Q7"):
        g.symmetry_matrices("Q7")
    assert g.normalise_symmetry_name(" d2 ") == "D2"


def test_symmetric_distance_ignores_symmetry_mates():
    q = g.random_quaternions(20, 6)
    group = g.symmetry_matrices("D2")
    for element in group:
        mate = g.matrix_to_quaternion(g.quaternion_to_matrix(q) @ element.T)
        np.testing.assert_allclose(g.symmetric_distance(q, mate, "D2"), 0.0, atol=1e-7)
    other = g.random_quaternions(20, 8)
    assert np.all(g.symmetric_distance(q, other, "D2") <= g.geodesic_distance(q, other) + 1e-12)
    assert np.any(g.symmetric_distance(q, other, "D2") < g.geodesic_distance(q, other) - 0.1)


def test_asymmetric_unit_reduction_picks_one_representative_per_orbit():
    q = g.random_quaternions(200, 9)
    reduced = g.reduce_to_asymmetric_unit(q, "C4")
    np.testing.assert_allclose(g.symmetric_distance(q, reduced, "C4"), 0.0, atol=1e-7)
    mate = g.matrix_to_quaternion(g.quaternion_to_matrix(q) @ g.symmetry_matrices("C4")[1].T)
    np.testing.assert_allclose(g.reduce_to_asymmetric_unit(mate, "C4"), reduced, atol=1e-9)
    # Reduced poses lie in the identity's Voronoi cell: no symmetry mate is closer to the identity.
    identity = np.array([0.0, 0.0, 0.0, 1.0])
    assert np.all(g.geodesic_distance(reduced, identity) <= g.symmetric_distance(reduced, identity, "C4") + 1e-9)


def test_align_poses_recovers_global_rotation_and_handedness():
    rng = np.random.default_rng(10)
    truth = g.random_quaternions(300, 11)
    offset = g.random_quaternions(1, 12)[0]
    noise = Rotation.from_rotvec(rng.normal(scale=np.radians(2), size=(300, 3))).as_quat()
    predicted = g.quaternion_multiply(g.quaternion_multiply(truth, offset), noise)
    predicted[:30] = g.random_quaternions(30, 13)  # outliers
    aligned, info = g.align_poses(predicted, truth)
    assert not info["flipped"]
    assert np.degrees(np.median(g.geodesic_distance(aligned[30:], truth[30:]))) < 4
    assert info["median_deg"] < 5

    _, flipped_info = g.align_poses(g.flip_handedness(predicted), truth)
    assert flipped_info["flipped"]
    assert flipped_info["median_deg"] < 5
    _, no_flip = g.align_poses(g.flip_handedness(predicted), truth, allow_flip=False)
    assert no_flip["median_deg"] > 20


def test_flip_handedness_is_conjugation_by_a_mirror():
    q = g.random_quaternions(10, 14)
    mirror = np.diag([1.0, 1.0, -1.0])
    np.testing.assert_allclose(
        g.quaternion_to_matrix(g.flip_handedness(q)), mirror @ g.quaternion_to_matrix(q) @ mirror, atol=1e-12
    )


def test_tensorflow_functions_match_numpy():
    from cryo_forum.tensorflow_quiet import tf

    q1, q2 = g.random_quaternions(16, 15), g.random_quaternions(16, 16)
    t1, t2 = tf.constant(q1), tf.constant(q2)
    np.testing.assert_allclose(g.geodesic_distance_tf(t1, t2).numpy(), g.geodesic_distance(q1, q2), atol=1e-6)
    group = g.symmetry_quaternions("D2")
    np.testing.assert_allclose(
        g.symmetric_distance_tf(t1, t2, group).numpy(), g.symmetric_distance(q1, q2, "D2"), atol=1e-6
    )
    pairwise = g.symmetric_distance_tf(t1[:, None], t2[None], group).numpy()
    np.testing.assert_allclose(pairwise[3, 5], g.symmetric_distance(q1[3], q2[5], "D2"), atol=1e-6)
    matrices = g.quaternion_to_matrix(q1)
    np.testing.assert_allclose(g.quaternion_to_matrix_tf(t1).numpy(), matrices, atol=1e-9)
    np.testing.assert_allclose(g.quaternion_multiply_tf(t1, t2).numpy(), g.quaternion_multiply(q1, q2), atol=1e-12)


def test_tensorflow_distance_has_finite_gradient_at_zero():
    from cryo_forum.tensorflow_quiet import tf

    q = tf.Variable(g.random_quaternions(4, 17).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(g.geodesic_distance_tf(q, tf.identity(q)))
    grad = tape.gradient(loss, q)
    assert np.all(np.isfinite(grad.numpy()))
