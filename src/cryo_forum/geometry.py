"""Rotations in one place: RELION Euler angles, matrices, quaternions, cryoSPARC rotation vectors.

Conventions (checked numerically by tests/test_geometry.py):

* A pose is RELION's rotation matrix ``A(rot, tilt, psi) = Rz(rot) Ry(tilt) Rz(psi)`` as RELION builds it,
  which equals ``Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True).as_matrix().T``. Row 3 of A is
  the viewing direction; an image is ``image(x, y) = integral of V(A^T [x, y, z]) dz``.
* A quaternion is stored ``[x, y, z, w]`` (tensorflow-graphics and scipy order) and represents A itself;
  q and -q are one rotation, and the canonical sign has ``w >= 0``.
* cryoSPARC's ``alignments3D/pose`` is a rotation vector r with ``from_rotvec(r).as_matrix() == A^T``.
* The distance between orientations is ``2 acos(|<q1, q2>|)`` in radians, in [0, pi].
* A particle with point group G gives the same image for A and ``A g^T`` (g in G), so its symmetric
  distance is the minimum over G. Groups are oriented as RELION orients them (symmetries.cpp).
* A map reconstructed in another frame changes every pose to ``A Q`` for one rotation Q; a map of the
  other hand changes A to ``F A F`` with ``F = diag(1, 1, -1)``. :func:`align_poses` undoes both.

Angles are degrees at the file boundary (Euler angles) and radians everywhere else.
NumPy functions work in float64 and broadcast over leading axes; ``*_tf`` functions are TensorFlow
equivalents for training, imported lazily so file-only commands never load TensorFlow.
"""

from __future__ import annotations

import re
import warnings
from functools import lru_cache

import numpy as np
from scipy.spatial.transform import Rotation

HANDEDNESS_FLIP = np.diag([1.0, 1.0, -1.0])


def _as_rotation_of_matrices(matrices: np.ndarray) -> tuple[Rotation, tuple[int, ...]]:
    matrices = np.asarray(matrices, dtype=np.float64)
    lead = matrices.shape[:-2]
    return Rotation.from_matrix(matrices.reshape(-1, 3, 3)), lead


def euler_to_matrix(euler_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees, shape [..., 3] -> rotation matrices A, shape [..., 3, 3]."""
    euler_deg = np.asarray(euler_deg, dtype=np.float64)
    lead = euler_deg.shape[:-1]
    matrices = Rotation.from_euler("ZYZ", euler_deg.reshape(-1, 3), degrees=True).as_matrix()
    return np.swapaxes(matrices, -1, -2).reshape(*lead, 3, 3)


def matrix_to_euler(matrices: np.ndarray) -> np.ndarray:
    """Rotation matrices A [..., 3, 3] -> RELION (rot, tilt, psi) in degrees [..., 3].

    rot and psi lie in [-180, 180], tilt in [0, 180]; at tilt 0 or 180 the split between rot and psi
    is arbitrary but the matrix is reproduced.
    """
    rotation, lead = _as_rotation_of_matrices(np.swapaxes(np.asarray(matrices, dtype=np.float64), -1, -2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # gimbal lock is expected at tilt 0 and 180
        euler = rotation.as_euler("ZYZ", degrees=True)
    return euler.reshape(*lead, 3)


def canonical_quaternion(quaternions: np.ndarray) -> np.ndarray:
    """Flip the sign of quaternions [..., 4] so that w >= 0 (and the first non-zero of x, y, z at w == 0)."""
    q = np.asarray(quaternions, dtype=np.float64)
    key = q[..., 3]
    for axis in (0, 1, 2):  # at w == 0 the first non-zero vector component decides
        key = np.where(q[..., 3] == 0, np.where(key != 0, key, q[..., axis]), key)
    return np.where((key < 0)[..., None], -q, q)


def matrix_to_quaternion(matrices: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] -> canonical unit quaternions [x, y, z, w], shape [..., 4]."""
    rotation, lead = _as_rotation_of_matrices(matrices)
    return canonical_quaternion(rotation.as_quat().reshape(*lead, 4))


def quaternion_to_matrix(quaternions: np.ndarray) -> np.ndarray:
    """Quaternions [x, y, z, w] [..., 4] (normalised here) -> rotation matrices [..., 3, 3]."""
    q = np.asarray(quaternions, dtype=np.float64)
    lead = q.shape[:-1]
    return Rotation.from_quat(q.reshape(-1, 4)).as_matrix().reshape(*lead, 3, 3)


def euler_to_quaternion(euler_deg: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees [..., 3] -> canonical quaternions of A [..., 4]."""
    return matrix_to_quaternion(euler_to_matrix(euler_deg))


def quaternion_to_euler(quaternions: np.ndarray) -> np.ndarray:
    """Quaternions of A [..., 4] -> RELION (rot, tilt, psi) in degrees [..., 3]."""
    return matrix_to_euler(quaternion_to_matrix(quaternions))


def rotvec_to_matrix(rotvecs: np.ndarray) -> np.ndarray:
    """cryoSPARC ``alignments3D/pose`` rotation vectors [..., 3] in radians -> RELION matrices A."""
    rotvecs = np.asarray(rotvecs, dtype=np.float64)
    lead = rotvecs.shape[:-1]
    matrices = Rotation.from_rotvec(rotvecs.reshape(-1, 3)).as_matrix()
    return np.swapaxes(matrices, -1, -2).reshape(*lead, 3, 3)


def matrix_to_rotvec(matrices: np.ndarray) -> np.ndarray:
    """RELION matrices A [..., 3, 3] -> cryoSPARC rotation vectors [..., 3] (radians)."""
    rotation, lead = _as_rotation_of_matrices(np.swapaxes(np.asarray(matrices, dtype=np.float64), -1, -2))
    return rotation.as_rotvec().reshape(*lead, 3)


def quaternion_multiply(q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """Hamilton product of [x, y, z, w] quaternions: the rotation ``R(q1) @ R(q2)``. Broadcasts."""
    x1, y1, z1, w1 = np.moveaxis(np.asarray(q1, dtype=np.float64), -1, 0)
    x2, y2, z2, w2 = np.moveaxis(np.asarray(q2, dtype=np.float64), -1, 0)
    return np.stack(
        [
            w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
            w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
            w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2,
            w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
        ],
        axis=-1,
    )


def quaternion_conjugate(quaternions: np.ndarray) -> np.ndarray:
    """The inverse rotation of unit quaternions [..., 4]."""
    q = np.asarray(quaternions, dtype=np.float64)
    return np.concatenate([-q[..., :3], q[..., 3:]], axis=-1)


def geodesic_distance(q1: np.ndarray, q2: np.ndarray) -> np.ndarray:
    """Angle in radians of the rotation between unit quaternions q1 and q2 [..., 4]; broadcasts.

    Computed as ``4 atan2(|q1 - s q2|, |q1 + s q2|)`` with s the sign of <q1, q2>, which equals
    ``2 acos(|<q1, q2>|)`` but keeps full precision for small angles.
    """
    q1 = np.asarray(q1, dtype=np.float64)
    q2 = np.asarray(q2, dtype=np.float64)
    sign = np.where(np.sum(q1 * q2, axis=-1, keepdims=True) < 0, -1.0, 1.0)
    q2 = sign * q2
    return 4.0 * np.arctan2(np.linalg.norm(q1 - q2, axis=-1), np.linalg.norm(q1 + q2, axis=-1))


def viewing_directions(quaternions: np.ndarray) -> np.ndarray:
    """Quaternions of A [..., 4] -> viewing directions [..., 3] (the third rows of A)."""
    return quaternion_to_matrix(quaternions)[..., 2, :]


def fibonacci_sphere(count: int) -> np.ndarray:
    """``count`` nearly equal-area cell centres on the unit sphere, [count, 3]."""
    index = np.arange(count) + 0.5
    z = 1.0 - 2.0 * index / count
    azimuth = np.pi * (1.0 + 5.0**0.5) * index
    radius = np.sqrt(1.0 - z**2)
    return np.stack([radius * np.cos(azimuth), radius * np.sin(azimuth), z], axis=-1)


def viewing_cells(quaternions: np.ndarray, cells: int) -> np.ndarray:
    """The nearest of ``cells`` equal-area cells (:func:`fibonacci_sphere`) of each pose's viewing direction [N]."""
    directions = viewing_directions(np.asarray(quaternions, dtype=np.float64).reshape(-1, 4))
    return np.argmax(directions @ fibonacci_sphere(cells).T, axis=1)


def random_quaternions(n: int, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """n rotations drawn uniformly (Haar measure) from SO(3), as canonical quaternions [n, 4]."""
    rng = np.random.default_rng(rng)
    q = rng.standard_normal((n, 4))
    return canonical_quaternion(q / np.linalg.norm(q, axis=-1, keepdims=True))


def grid_size_for_spacing(spacing_deg: float) -> int:
    """Number of rotations of an SO(3) grid with angular spacing ``spacing_deg``, counted as RELION does.

    RELION's HEALPix order k samples 12 * 4^k viewing directions at 60 / 2^k degrees, each with in-plane angles
    at the same step: 15 552 000 / spacing^3 rotations in all (36 864 at 7.5 degrees).
    """
    if not spacing_deg > 0:
        raise ValueError(f"the grid spacing must be positive, got {spacing_deg}")
    return int(np.ceil(12.0 * (60.0 / spacing_deg) ** 2 * (360.0 / spacing_deg)))


def rotation_grid(spacing_deg: float) -> np.ndarray:
    """A near-uniform deterministic grid of SO(3) at ``spacing_deg`` as canonical quaternions [n, 4].

    Super-Fibonacci spiral (Alexa, CVPR 2022): point i of n on the 3-sphere is
    ``(r sin a, r cos a, R sin b, R cos b)`` with ``r = sqrt(s / n)``, ``R = sqrt(1 - s / n)``, ``s = i + 1/2``,
    ``a = 2 pi s / sqrt(2)`` and ``b = 2 pi s / 1.5337511687552043``. Its n follows :func:`grid_size_for_spacing`.
    """
    n = grid_size_for_spacing(spacing_deg)
    s = np.arange(n, dtype=np.float64) + 0.5
    r, big_r = np.sqrt(s / n), np.sqrt(1.0 - s / n)
    alpha, beta = 2.0 * np.pi * s / np.sqrt(2.0), 2.0 * np.pi * s / 1.533751168755204288118041
    q = np.stack([r * np.sin(alpha), r * np.cos(alpha), big_r * np.sin(beta), big_r * np.cos(beta)], axis=-1)
    return canonical_quaternion(q)


def local_rotation_offsets(step_deg: float, half_width: int) -> np.ndarray:
    """Small rotations on a cubic grid of rotation vectors, ``step_deg * {-m..m}^3``, as quaternions [(2m+1)^3, 4].

    ``quaternion_multiply(offsets, q)`` turns a pose into its neighbourhood for a local search; an offset's
    geodesic distance from the identity is the length of its rotation vector.
    """
    ticks = np.radians(step_deg) * np.arange(-half_width, half_width + 1)
    vectors = np.stack(np.meshgrid(ticks, ticks, ticks, indexing="ij"), axis=-1).reshape(-1, 3)
    return canonical_quaternion(Rotation.from_rotvec(vectors).as_quat())


# ---------------------------------------------------------------- point groups

_ICOSAHEDRAL_GENERATORS = {
    "I1": [
        (2, (1, 0, 0)),
        (5, (0.85065080702670, 0, -0.5257311142635)),
        (3, (0.9341723640, 0.3568220765, 0)),
    ],
    "I2": [(2, (0, 0, 1)), (5, (0.525731114, 0, 0.850650807)), (3, (0, 0.356822076, 0.934172364))],
    "I3": [
        (2, (-0.5257311143, 0, 0.8506508070)),
        (5, (0, 0, 1)),
        (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
    "I4": [
        (2, (0.5257311143, 0, 0.8506508070)),
        (5, (0.8944271932547096, 0, 0.4472135909903704)),
        (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428)),
    ],
}


def _generators(name: str) -> list[tuple[int, tuple[float, float, float]]]:
    """RELION's rotation generators (fold, axis) for a point-group name such as C4, D2, T, O, I, I3."""
    match = re.fullmatch(r"([CD])(\d+)", name)
    if match:
        order = int(match.group(2))
        if order < 1:
            raise ValueError(f"unknown symmetry '{name}': the order must be at least 1")
        generators = [(order, (0.0, 0.0, 1.0))] if order > 1 else []
        if match.group(1) == "D":
            generators.append((2, (1.0, 0.0, 0.0)))
        return generators
    if name == "T":
        return [(3, (0.0, 0.0, 1.0)), (2, (0.0, 0.816496, 0.577350))]
    if name == "O":
        return [(3, (0.5773502, 0.5773502, 0.5773502)), (4, (0.0, 0.0, 1.0))]
    if name in ("I", *_ICOSAHEDRAL_GENERATORS):
        return _ICOSAHEDRAL_GENERATORS["I2" if name == "I" else name]
    raise ValueError(f"unknown symmetry '{name}': use C<n>, D<n>, T, O, I or I1-I4")


@lru_cache(maxsize=64)
def _symmetry_matrices_cached(name: str) -> np.ndarray:
    seeds = [
        Rotation.from_rotvec(2 * np.pi / fold * np.asarray(axis) / np.linalg.norm(axis)).as_matrix()
        for fold, axis in _generators(name)
    ]
    group = [np.eye(3)]
    frontier = list(seeds)
    while frontier:
        candidate = frontier.pop()
        if any(np.allclose(candidate, member, atol=1e-4) for member in group):
            continue
        group.append(candidate)
        frontier.extend(candidate @ seed for seed in seeds)
    matrices = np.stack(group)
    # Clean the generators' rounding (RELION's axes carry ~1e-7 errors) by re-orthonormalising.
    u, _, vt = np.linalg.svd(matrices)
    return u @ vt


def normalise_symmetry_name(name: str) -> str:
    """Upper-case and validate a point-group name; raises ValueError naming it when unknown."""
    cleaned = str(name).strip().upper()
    _generators(cleaned)
    return cleaned


def symmetry_matrices(name: str) -> np.ndarray:
    """Rotation matrices g [G, 3, 3] of a point group as RELION orients it; the identity first."""
    return _symmetry_matrices_cached(normalise_symmetry_name(name)).copy()


def symmetry_quaternions(name: str) -> np.ndarray:
    """Canonical quaternions [G, 4] of a point group's rotations; the identity first."""
    return matrix_to_quaternion(symmetry_matrices(name))


def symmetric_distance(q1: np.ndarray, q2: np.ndarray, symmetry: str = "C1") -> np.ndarray:
    """min over g in G of the distance between A1 and ``A2 g^T``, in radians; broadcasts over [..., 4]."""
    group = symmetry_quaternions(symmetry)
    q1 = np.asarray(q1, dtype=np.float64)[..., None, :]
    mates = quaternion_multiply(np.asarray(q2, dtype=np.float64)[..., None, :], quaternion_conjugate(group))
    return geodesic_distance(q1, mates).min(axis=-1)


def reduce_to_asymmetric_unit(quaternions: np.ndarray, symmetry: str) -> np.ndarray:
    """Map each pose to its symmetry mate ``A g^T`` closest to the identity (a fundamental domain of G)."""
    group = symmetry_quaternions(symmetry)
    q = np.asarray(quaternions, dtype=np.float64)
    mates = quaternion_multiply(q[..., None, :], quaternion_conjugate(group))
    best = np.argmax(np.abs(mates[..., 3]), axis=-1)
    return canonical_quaternion(np.take_along_axis(mates, best[..., None, None], axis=-2)[..., 0, :])


def flip_handedness(quaternions: np.ndarray) -> np.ndarray:
    """Poses of the mirrored map: A -> F A F with F = diag(1, 1, -1), i.e. (x, y, z, w) -> (-x, -y, z, w)."""
    q = np.asarray(quaternions, dtype=np.float64)
    return canonical_quaternion(q * np.array([-1.0, -1.0, 1.0, 1.0]))


def _best_right_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The rotation Q minimising sum ||source_i Q - target_i||_F^2 over matrices [N, 3, 3] (Procrustes)."""
    correlation = np.einsum("nji,njk->ik", source, target)
    u, _, vt = np.linalg.svd(correlation)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def align_poses(
    q_pred: np.ndarray,
    q_true: np.ndarray,
    allow_flip: bool = True,
    symmetry: str = "C1",
    iterations: int = 5,
) -> tuple[np.ndarray, dict]:
    """Align predicted poses to the truth by one global rotation ``A -> A Q`` and, optionally, a hand flip.

    Predictions made against a map in another frame (or of the other hand) differ from the truth by such
    a global transform. The rotation is fitted by Procrustes on the matrices, then refitted on the half of
    the particles that agree best (robust to outliers), choosing per particle the symmetry mate of the truth
    closest to the aligned prediction.

    Returns the aligned quaternions [N, 4] and a dict with ``rotation`` (Q, 3x3), ``flipped`` (bool) and
    ``median_deg`` (median symmetric error after alignment).
    """
    q_pred = np.asarray(q_pred, dtype=np.float64)
    q_true = np.asarray(q_true, dtype=np.float64)
    group = symmetry_quaternions(symmetry)
    true_mates = quaternion_multiply(q_true[:, None, :], quaternion_conjugate(group))  # [N, G, 4]
    best: tuple[float, np.ndarray, np.ndarray, bool] | None = None
    for flipped in (False, True) if allow_flip else (False,):
        source_q = flip_handedness(q_pred) if flipped else q_pred
        source = quaternion_to_matrix(source_q)
        target_q = true_mates[:, 0]
        keep = np.ones(len(q_pred), dtype=bool)
        for _ in range(iterations):
            rotation = _best_right_rotation(source[keep], quaternion_to_matrix(target_q[keep]))
            aligned = matrix_to_quaternion(source @ rotation)
            distances = geodesic_distance(aligned[:, None, :], true_mates)
            target_q = true_mates[np.arange(len(q_pred)), distances.argmin(axis=1)]
            errors = distances.min(axis=1)
            keep = errors <= np.median(errors)
        median = float(np.median(errors))
        if best is None or median < best[0]:
            best = (median, aligned, rotation, flipped)
    median, aligned, rotation, flipped = best
    return aligned, {"rotation": rotation, "flipped": flipped, "median_deg": float(np.degrees(median))}


# ---------------------------------------------------------------- TensorFlow equivalents for training


def _tf():
    from cryo_forum.tensorflow_quiet import tf

    return tf


def canonical_quaternion_tf(quaternions):
    """TensorFlow: flip quaternions [..., 4] so that w >= 0 (w == 0 is left as it is)."""
    tf = _tf()
    return tf.where(quaternions[..., 3:] < 0, -quaternions, quaternions)


def quaternion_multiply_tf(q1, q2):
    """TensorFlow Hamilton product ``R(q1) @ R(q2)`` of [x, y, z, w] quaternions (tensorflow-graphics)."""
    from tensorflow_graphics.geometry.transformation import quaternion as tfg_quaternion

    return tfg_quaternion.multiply(q1, q2)


def quaternion_to_matrix_tf(quaternions):
    """TensorFlow quaternions [..., 4] -> rotation matrices [..., 3, 3] (tensorflow-graphics)."""
    from tensorflow_graphics.geometry.transformation import rotation_matrix_3d

    return rotation_matrix_3d.from_quaternion(quaternions)


def geodesic_distance_tf(q1, q2, epsilon: float = 1e-7):
    """TensorFlow ``2 acos(|<q1, q2>|)`` in radians; broadcasts over [..., 4].

    The dot product is clipped to ``1 - epsilon`` so that the gradient stays finite when the two
    rotations coincide (acos' derivative is infinite at 1).
    """
    tf = _tf()
    dot = tf.abs(tf.reduce_sum(q1 * q2, axis=-1))
    return 2.0 * tf.acos(tf.clip_by_value(dot, 0.0, 1.0 - epsilon))


def symmetric_distance_tf(q1, q2, group_quaternions=None, epsilon: float = 1e-7):
    """TensorFlow symmetric distance min_g d(A1, A2 g^T); group_quaternions [G, 4] from symmetry_quaternions.

    With ``group_quaternions=None`` (or a single identity) this is :func:`geodesic_distance_tf`.
    Broadcasts over the leading axes of q1 and q2.
    """
    tf = _tf()
    if group_quaternions is None or len(group_quaternions) == 1:
        return geodesic_distance_tf(q1, q2, epsilon)
    group = tf.cast(quaternion_conjugate(np.asarray(group_quaternions)), q2.dtype)
    mates = quaternion_multiply_tf(q2[..., None, :], group)  # [..., G, 4]
    return tf.reduce_min(geodesic_distance_tf(q1[..., None, :], mates, epsilon), axis=-1)
