"""Rotation heads: Keras layers that turn a feature vector [B, F] into a rotation, chosen by name.

Every head returns ``{"quaternion": [B, 4]}`` (unit, [x, y, z, w], w >= 0) and the QCQP head also
``"eigenvalues": [B, 4]`` (ascending; its Bingham uncertainty). The quaternion is the RELION matrix A.

* ``"qcqp"``: Dense(10) + :class:`cryo_forum.model.layers.QCQPLayer` (Peretroukhin et al. 2020).
* ``"quaternion"``: Dense(4), normalised.
* ``"6d"``: Dense(6) = the first two columns of R, completed by Gram-Schmidt (Zhou et al. 2019).
* ``"9d"``: Dense(9) = a 3x3 matrix M (row-major), projected onto SO(3) (the special-orthogonal SVD
  projection of Levinson et al. 2020).

Matrices become quaternions through :func:`nearest_rotation_quaternion_tf`, an eigenproblem with a well
conditioned gradient (TensorFlow's SVD gradient and the trace-based matrix-to-quaternion formula are not).
"""

from __future__ import annotations

from cryo_forum.geometry import canonical_quaternion_tf
from cryo_forum.model.layers import QCQPLayer, smallest_eigenvector, vector_to_symmetric_matrix
from cryo_forum.tensorflow_quiet import keras, tf


def gram_schmidt_tf(six):
    """Six numbers [..., 6] = two 3-vectors a1, a2 -> rotation matrices [..., 3, 3] with columns b1, b2, b3.

    ``b1 = a1 / |a1|``, ``b2`` = the normalised part of a2 orthogonal to b1, ``b3 = b1 x b2`` (det +1).
    """
    a1, a2 = six[..., :3], six[..., 3:]
    b1 = tf.math.l2_normalize(a1, axis=-1)
    b2 = tf.math.l2_normalize(a2 - tf.reduce_sum(b1 * a2, axis=-1, keepdims=True) * b1, axis=-1)
    return tf.stack([b1, b2, tf.linalg.cross(b1, b2)], axis=-1)


def nearest_rotation_quaternion_tf(matrices):
    """Matrices M [..., 3, 3] -> unit quaternions [..., 4] (w >= 0) of the rotation R maximising tr(R^T M).

    This is the special-orthogonal SVD projection ``R = U diag(1, 1, det(U V^T)) V^T`` of ``M = U S V^T``
    (det +1), computed in its quaternion form (Horn 1987; Bar-Itzhack 2000): ``tr(R(q)^T M) = q^T K q`` for a
    symmetric 4x4 K linear in M, so q is the eigenvector of K's largest eigenvalue. Its gap to the next one
    is ``2 (s2 + s3)`` (4 for an exact rotation; ``2 (s2 - s3)`` if det M < 0, where the projection itself
    jumps at s2 = s3), so the gradient is well conditioned where TensorFlow's SVD gradient is not (it is
    wrong when singular values coincide, i.e. as M approaches a rotation), and no branch of a trace-based
    matrix-to-quaternion formula can produce a NaN gradient near 180 degrees.
    """
    m = [[matrices[..., i, j] for j in range(3)] for i in range(3)]
    xx = m[0][0] - m[1][1] - m[2][2]
    yy = m[1][1] - m[0][0] - m[2][2]
    zz = m[2][2] - m[0][0] - m[1][1]
    ww = m[0][0] + m[1][1] + m[2][2]
    xy, xz, yz = m[0][1] + m[1][0], m[0][2] + m[2][0], m[1][2] + m[2][1]
    xw, yw, zw = m[2][1] - m[1][2], m[0][2] - m[2][0], m[1][0] - m[0][1]
    k = tf.stack(
        [
            tf.stack([xx, xy, xz, xw], axis=-1),
            tf.stack([xy, yy, yz, yw], axis=-1),
            tf.stack([xz, yz, zz, zw], axis=-1),
            tf.stack([xw, yw, zw, ww], axis=-1),
        ],
        axis=-2,
    )
    quaternion, _ = smallest_eigenvector(-k)
    return quaternion


class RotationHead(keras.layers.Layer):
    """Base of the heads: a Dense layer with ``units`` outputs followed by :meth:`to_rotation`."""

    units: int

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(self.units, name="dense")

    def build(self, input_shape):
        if not self.dense.built:
            self.dense.build(input_shape)

    def call(self, features):
        return self.to_rotation(self.dense(features))

    def to_rotation(self, outputs) -> dict:
        """Dense outputs [B, units] -> {"quaternion": [B, 4], ...}."""
        raise NotImplementedError


@keras.saving.register_keras_serializable(package="cryo_forum")
class QCQPHead(RotationHead):
    """Dense(10) -> symmetric 4x4 A -> smallest eigenvector and the eigenvalues (see QCQPLayer).

    Also returns A itself as ``"matrix"`` [B, 4, 4]: the Bingham likelihood (losses.bingham_nll) needs it.
    """

    units = 10

    def __init__(self, psd: bool = False, min_gap: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        self.qcqp = QCQPLayer(psd=psd, min_gap=min_gap, name="qcqp")

    def to_rotation(self, outputs) -> dict:
        quaternion, eigenvalues = self.qcqp(outputs)
        matrix = vector_to_symmetric_matrix(outputs, self.qcqp.psd)
        return {"quaternion": quaternion, "eigenvalues": eigenvalues, "matrix": matrix}

    def get_config(self) -> dict:
        return {**super().get_config(), "psd": self.qcqp.psd, "min_gap": self.qcqp.min_gap}


@keras.saving.register_keras_serializable(package="cryo_forum")
class QuaternionHead(RotationHead):
    """Dense(4) -> normalised quaternion with w >= 0."""

    units = 4

    def to_rotation(self, outputs) -> dict:
        return {"quaternion": canonical_quaternion_tf(tf.math.l2_normalize(outputs, axis=-1))}


@keras.saving.register_keras_serializable(package="cryo_forum")
class SixDHead(RotationHead):
    """Dense(6) -> Gram-Schmidt rotation (Zhou et al. 2019) -> quaternion."""

    units = 6

    def to_rotation(self, outputs) -> dict:
        return {"quaternion": nearest_rotation_quaternion_tf(gram_schmidt_tf(outputs))}


@keras.saving.register_keras_serializable(package="cryo_forum")
class NineDHead(RotationHead):
    """Dense(9) -> SVD projection onto SO(3) (Levinson et al. 2020) -> quaternion."""

    units = 9

    def to_rotation(self, outputs) -> dict:
        return {"quaternion": nearest_rotation_quaternion_tf(tf.reshape(outputs, [-1, 3, 3]))}


HEADS: dict[str, type[RotationHead]] = {
    "qcqp": QCQPHead,
    "quaternion": QuaternionHead,
    "6d": SixDHead,
    "9d": NineDHead,
}


def build_head(name: str, /, **kwargs) -> RotationHead:
    """The rotation head called ``name`` (case-insensitive: qcqp, quaternion, 6d, 9d) built with kwargs.

    ``name`` is positional-only, so a Keras layer name can be passed as ``build_head("qcqp", name="head")``.
    """
    key = str(name).strip().lower()
    if key not in HEADS:
        raise ValueError(f"unknown rotation head '{name}': choose one of {', '.join(HEADS)}")
    return HEADS[key](**kwargs)
