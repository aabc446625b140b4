"""Training losses: distance matching over the pairs of a batch, a direct pose loss, and their schedule.

Quaternions are [B, 4] ([x, y, z, w]); distances are radians. A point group is passed as its quaternions
[G, 4] (``cryo_forum.geometry.symmetry_quaternions(name)``), and then every distance is the symmetric one,
the minimum over the mates ``A g^T``.

Distance matching compares ``d(pred_i, pred_j)`` with ``d(true_i, true_j)`` over the B(B-1)/2 pairs i < j of
one batch, so it only fixes the poses up to one global rotation ``A -> A Q`` (the frame of the map). With a
point group this holds for the Q that map the group onto itself (for example Q in G).
"""

from __future__ import annotations

import math

import numpy as np

from cryo_forum.choices import DIRECT_LOSSES, PAIR_WEIGHTINGS
from cryo_forum.geometry import quaternion_conjugate, quaternion_multiply_tf, symmetric_distance_tf
from cryo_forum.tensorflow_quiet import tf


def upper_triangle_mask(batch_size, dtype=tf.float32):
    """[B, B] mask, 1 for the pairs i < j and 0 elsewhere (the diagonal and the lower triangle)."""
    ones = tf.ones([batch_size, batch_size], dtype=dtype)
    return tf.linalg.band_part(ones, 0, -1) - tf.linalg.band_part(ones, 0, 0)


def pair_distances(quaternions, group_quaternions: np.ndarray | None = None):
    """Distances [B, B] between all rotations of a batch [B, 4] (symmetric with group_quaternions [G, 4])."""
    return symmetric_distance_tf(quaternions[:, None, :], quaternions[None, :, :], group_quaternions)


def pair_weights(distances, mask, weighting: str = "none", bins: int = 18, min_distance: float = 0.1):
    """Weights [B, B] of the pairs of a batch from their true distances [B, B]; zero where mask is zero.

    * ``"none"``: every pair counts once.
    * ``"density"``: the inverse of the density of distances between uniformly random rotations,
      proportional to ``1 - cos d`` (floored at ``d = min_distance`` radians so near-identical pairs do
      not dominate). Right for poses spread over SO(3) without symmetry.
    * ``"histogram"``: ``bins`` equal bins over [0, pi]; each pair weighs 1 / (pairs of the batch in its bin),
      so every occupied bin weighs the same. Adapts to symmetry and to poses confined to part of SO(3).

    Only relative weights matter: :func:`pairwise_distance_loss` takes the weighted mean.
    """
    if weighting not in PAIR_WEIGHTINGS:
        raise ValueError(f"unknown pair weighting '{weighting}': choose one of {', '.join(PAIR_WEIGHTINGS)}")
    distances = tf.stop_gradient(distances)
    if weighting == "none":
        return mask
    if weighting == "density":
        floor = 1.0 - math.cos(min_distance)
        return mask / tf.maximum(1.0 - tf.cos(distances), floor)
    index = tf.minimum(tf.cast(distances * (bins / math.pi), tf.int32), bins - 1)
    one_hot = tf.one_hot(index, bins, dtype=mask.dtype) * mask[..., None]
    counts = tf.reduce_sum(one_hot, axis=[0, 1])
    return tf.reduce_sum(one_hot * tf.math.divide_no_nan(1.0, counts), axis=-1)


def pairwise_distance_loss(
    q_pred,
    q_true,
    group_quaternions: np.ndarray | None = None,
    weighting: str = "none",
    bins: int = 18,
    min_distance: float = 0.1,
    sample_mask=None,
):
    """Weighted mean over the pairs i < j of a batch of ``|d(pred_i, pred_j) - d(true_i, true_j)|`` (radians).

    q_pred, q_true: [B, 4]; group_quaternions: [G, 4] or None; weighting, bins, min_distance: see
    :func:`pair_weights`; sample_mask [B] (optional, 0 or 1) drops every pair that involves a masked particle
    (labelled outliers have no meaningful pose). Works on [B, B] matrices (no dynamic shapes, fine under
    XLA); a batch of one has no pairs and gives 0.
    """
    q_true = tf.cast(q_true, q_pred.dtype)
    d_pred = pair_distances(q_pred, group_quaternions)
    d_true = pair_distances(q_true, group_quaternions)
    mask = upper_triangle_mask(tf.shape(q_pred)[0], q_pred.dtype)
    if sample_mask is not None:
        sample_mask = tf.cast(sample_mask, q_pred.dtype)
        mask = mask * sample_mask[:, None] * sample_mask[None, :]
    weights = pair_weights(d_true, mask, weighting, bins, min_distance)
    return tf.math.divide_no_nan(tf.reduce_sum(weights * tf.abs(d_pred - d_true)), tf.reduce_sum(weights))


def pose_errors(q_pred, q_true, group_quaternions: np.ndarray | None = None, kind: str = "geodesic"):
    """Per-particle pose error [B] between predictions and truths [B, 4], minimised over the group's mates.

    ``"geodesic"``: the angle in radians. ``"chordal"``: ``||R_pred - R_true||_F^2 = 8 (1 - <q1, q2>^2)``,
    smooth everywhere (also at zero error).
    """
    if kind not in DIRECT_LOSSES:
        raise ValueError(f"unknown direct loss '{kind}': choose one of {', '.join(DIRECT_LOSSES)}")
    q_true = tf.cast(q_true, q_pred.dtype)
    if kind == "geodesic":
        return symmetric_distance_tf(q_pred, q_true, group_quaternions)
    mates = q_true[:, None, :]
    if group_quaternions is not None:
        conjugates = tf.constant(quaternion_conjugate(np.asarray(group_quaternions)), dtype=q_pred.dtype)
        mates = quaternion_multiply_tf(mates, conjugates)  # [B, G, 4]: A_true g^T
    dots = tf.reduce_sum(q_pred[:, None, :] * mates, axis=-1)
    return tf.reduce_min(8.0 * (1.0 - tf.square(dots)), axis=-1)


# Makes the Bingham normaliser approximation below exact in the sharp (Gaussian) limit: beta = pi^(2/3).
_NORMALISER_BETA = math.pi ** (2.0 / 3.0)


def bingham_nll(q_true, matrices, eigenvalues, group_quaternions: np.ndarray | None = None):
    """Approximate negative log-likelihood [B] of true poses under the QCQP head's Bingham belief.

    The head's matrix A [B, 4, 4] defines ``p(q) ~ exp(-q^T A q)`` on unit quaternions. With eigenvalues
    l0 <= l1 <= l2 <= l3 [B, 4] and concentrations ``z_i = l_i - l0``, the density is
    ``exp(-(q^T A q - l0)) / N(z)``; the normaliser is approximated by
    ``log N(z) = log(2 pi^2) - 1/4 sum_i log(1 + z_i + pi^(2/3) z_i^2)``, exact at z = 0 (with the right slope)
    and in the sharp (Gaussian) limit ``2 pi^(3/2) / sqrt(prod z)``, within about 0.35 nats in between. For a
    fixed error the loss falls as the concentrations grow until they match the size of the error: they learn
    it, and for labelled outliers (random "true" poses) they learn to stay small. ``q^T A q - l0`` needs no
    eigenvector, so the gradient stays well conditioned. With a point group, the closest mate ``A_true g^T`` counts.
    """
    q_true = tf.cast(q_true, matrices.dtype)
    mates = q_true[:, None, :]
    if group_quaternions is not None:
        conjugates = tf.constant(quaternion_conjugate(np.asarray(group_quaternions)), dtype=matrices.dtype)
        mates = quaternion_multiply_tf(mates, conjugates)  # [B, G, 4]
    quadratic = tf.einsum("bgi,bij,bgj->bg", mates, matrices, mates)
    energy = tf.nn.relu(tf.reduce_min(quadratic, axis=-1) - eigenvalues[:, 0])
    concentrations = tf.nn.relu(eigenvalues[:, 1:] - eigenvalues[:, :1])
    log_normaliser = math.log(2.0 * math.pi**2) - 0.25 * tf.reduce_sum(
        tf.math.log1p(concentrations + _NORMALISER_BETA * tf.square(concentrations)), axis=-1
    )
    return energy + log_normaliser
