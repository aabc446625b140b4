"""The QCQP layer: 10 numbers -> symmetric 4x4 matrix A -> the unit quaternion minimising q^T A q.

Peretroukhin et al. 2020, "A Smooth Representation of Belief over SO(3) for Deep Rotation Learning with
Uncertainty": a network predicts a symmetric matrix A; the rotation is the unit quaternion q that minimises
``q^T A q``, i.e. the eigenvector of A's smallest eigenvalue, and the eigenvalues describe a Bingham belief
over SO(3) (see :mod:`cryo_forum.prediction.uncertainty`).

The 10 numbers fill A's upper triangle row by row::

    [a00, a01, a02, a03, a11, a12, a13, a22, a23, a33]

With ``psd=True`` the same numbers fill an upper-triangular U (zeros below the diagonal) and
``A = U^T U = L L^T`` with ``L = U^T``, which keeps A positive semi-definite.

Gradient guard. The eigenvector's derivative is ``dq = sum_{i>0} v_i (v_i^T dA q) / (l_0 - l_i)``, which grows
like ``1 / (l_1 - l_0)`` and explodes when the smallest eigenvalues nearly coincide. :func:`smallest_eigenvector`
runs ``tf.linalg.eigh`` in float64 and replaces TensorFlow's eigh gradient by this analytic formula with every
gap ``l_i - l_0`` floored at ``min_gap`` (gap-aware): well-separated eigenvalues get the exact gradient, and
near-degenerate ones a bounded gradient (at most ``|upstream| / min_gap``) that keeps its direction. The
eigenvalue gradient ``dl_k = v_k^T dA v_k`` is exact and never ill-conditioned.
"""

from __future__ import annotations

from cryo_forum.geometry import canonical_quaternion_tf
from cryo_forum.tensorflow_quiet import keras, tf

# Position in the 10-vector of each entry of the 4x4 matrix (row-major); 10 points at a padded zero.
_SYMMETRIC_INDEX = [0, 1, 2, 3, 1, 4, 5, 6, 2, 5, 7, 8, 3, 6, 8, 9]
_UPPER_INDEX = [0, 1, 2, 3, 10, 4, 5, 6, 10, 10, 7, 8, 10, 10, 10, 9]


def vector_to_symmetric_matrix(params, psd: bool = False):
    """Parameters [..., 10] (upper triangle, row-major) -> symmetric matrices A [..., 4, 4].

    With ``psd=True`` the parameters fill an upper-triangular U and ``A = U^T U`` (positive semi-definite).
    """
    lead = tf.shape(params)[:-1]
    matrix_shape = tf.concat([lead, [4, 4]], axis=0)
    if not psd:
        return tf.reshape(tf.gather(params, _SYMMETRIC_INDEX, axis=-1), matrix_shape)
    padded = tf.concat([params, tf.zeros_like(params[..., :1])], axis=-1)
    upper = tf.reshape(tf.gather(padded, _UPPER_INDEX, axis=-1), matrix_shape)
    return tf.linalg.matmul(upper, upper, transpose_a=True)


def smallest_eigenvector(matrices, min_gap: float = 1e-3):
    """Symmetric matrices A [..., 4, 4] -> (quaternion q [..., 4], eigenvalues [..., 4] ascending).

    q is the unit eigenvector of the smallest eigenvalue, read as [x, y, z, w] with the sign chosen so that
    w >= 0. The decomposition runs in float64; results come back in the input dtype. The gradient is the
    analytic one with eigenvalue gaps floored at ``min_gap`` (see the module docstring).
    """

    @tf.custom_gradient
    def solve(a):
        a64 = tf.cast(a, tf.float64)
        values, vectors = tf.linalg.eigh(0.5 * (a64 + tf.linalg.matrix_transpose(a64)))
        q = canonical_quaternion_tf(vectors[..., 0])
        others = vectors[..., 1:]  # [..., 4, 3]: v_1, v_2, v_3 as columns

        def grad(dq, dvalues):
            gaps = tf.maximum(values[..., 1:] - values[..., :1], min_gap)  # l_i - l_0 >= min_gap
            coefficients = -tf.einsum("...j,...jk->...k", tf.cast(dq, tf.float64), others) / gaps
            from_vector = tf.einsum("...ik,...k,...j->...ij", others, coefficients, q)
            from_values = tf.einsum("...ik,...k,...jk->...ij", vectors, tf.cast(dvalues, tf.float64), vectors)
            total = from_vector + from_values
            return tf.cast(0.5 * (total + tf.linalg.matrix_transpose(total)), a.dtype)

        return (tf.cast(q, a.dtype), tf.cast(values, a.dtype)), grad

    return solve(matrices)


@keras.saving.register_keras_serializable(package="cryo_forum")
class QCQPLayer(keras.layers.Layer):
    """[B, 10] -> (quaternion [B, 4], eigenvalues [B, 4] ascending): the q minimising q^T A q.

    Args:
        psd: build A as ``U^T U`` (positive semi-definite) instead of filling its upper triangle directly.
        min_gap: floor on the eigenvalue gaps in the eigenvector gradient (the gradient guard).
    """

    def __init__(self, psd: bool = False, min_gap: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        if min_gap <= 0:
            raise ValueError(f"QCQPLayer min_gap must be positive, got {min_gap}")
        self.psd = bool(psd)
        self.min_gap = float(min_gap)

    def call(self, inputs):
        return smallest_eigenvector(vector_to_symmetric_matrix(inputs, self.psd), self.min_gap)

    def compute_output_shape(self, input_shape):
        shape = (*input_shape[:-1], 4)
        return shape, shape

    def get_config(self) -> dict:
        return {**super().get_config(), "psd": self.psd, "min_gap": self.min_gap}
