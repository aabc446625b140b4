"""The QCQP layer: triangle layout, eigen-solution against NumPy, guarded gradient, long training, config."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryo_forum import geometry as g
from cryo_forum.model.layers import QCQPLayer, smallest_eigenvector, vector_to_symmetric_matrix
from cryo_forum.tensorflow_quiet import keras, tf

UPPER = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]


def matrix_with_spectrum(values, rotation_seed: int) -> np.ndarray:
    """Symmetric 4x4 with the given eigenvalues and a random orthonormal eigenbasis."""
    basis, _ = np.linalg.qr(np.random.default_rng(rotation_seed).standard_normal((4, 4)))
    return basis @ np.diag(values) @ basis.T


def upper_params(matrix: np.ndarray) -> np.ndarray:
    return np.array([matrix[i, j] for i, j in UPPER])


def test_triangle_layout_and_psd_form():
    params = np.arange(1.0, 11.0)[None]
    symmetric = vector_to_symmetric_matrix(tf.constant(params)).numpy()[0]
    expected = np.zeros((4, 4))
    for value, (i, j) in zip(params[0], UPPER, strict=True):
        expected[i, j] = expected[j, i] = value
    np.testing.assert_array_equal(symmetric, expected)

    upper = np.triu(expected)
    psd = vector_to_symmetric_matrix(tf.constant(params), psd=True).numpy()[0]
    np.testing.assert_allclose(psd, upper.T @ upper, rtol=1e-12)
    assert np.linalg.eigvalsh(psd).min() > -1e-9


@pytest.mark.parametrize("psd", [False, True])
def test_layer_matches_numpy_eigh(psd):
    params = np.random.default_rng(3).standard_normal((16, 10)).astype(np.float32)
    quaternion, eigenvalues = QCQPLayer(psd=psd)(params)
    matrices = vector_to_symmetric_matrix(tf.constant(params, tf.float64), psd).numpy()
    values, vectors = np.linalg.eigh(matrices)
    np.testing.assert_allclose(eigenvalues.numpy(), values, atol=1e-5)
    reference = g.canonical_quaternion(vectors[..., 0])
    np.testing.assert_allclose(quaternion.numpy(), reference, atol=1e-5)
    assert np.all(quaternion.numpy()[:, 3] >= 0)
    np.testing.assert_allclose(np.linalg.norm(quaternion.numpy(), axis=-1), 1.0, atol=1e-6)
    # The quaternion minimises q^T A q over unit quaternions: its value is the smallest eigenvalue.
    q = quaternion.numpy().astype(np.float64)
    np.testing.assert_allclose(np.einsum("bi,bij,bj->b", q, matrices, q), values[:, 0], atol=1e-5)


def test_matrix_with_known_rotation_gives_it_back():
    rotations = Rotation.random(8, random_state=5)
    truth = g.canonical_quaternion(rotations.as_quat())
    matrices = np.eye(4) - np.einsum("bi,bj->bij", truth, truth)  # q^T A q = 1 - <q, q_true>^2
    quaternion, _ = smallest_eigenvector(tf.constant(matrices))
    np.testing.assert_allclose(quaternion.numpy(), truth, atol=1e-12)


def loss_and_gradient(params: np.ndarray, weights_q: np.ndarray, weights_l: np.ndarray, min_gap: float = 1e-3):
    x = tf.constant(params)
    with tf.GradientTape() as tape:
        tape.watch(x)
        quaternion, eigenvalues = QCQPLayer(min_gap=min_gap, dtype="float64")(x)
        loss = tf.reduce_sum(quaternion * weights_q) + tf.reduce_sum(eigenvalues * weights_l)
    return loss.numpy(), tape.gradient(loss, x).numpy()


def test_gradient_matches_finite_differences():
    matrix = matrix_with_spectrum([0.5, 1.7, 2.4, 4.0], rotation_seed=11)
    params = upper_params(matrix)[None]
    _, vectors = np.linalg.eigh(matrix)
    assert abs(vectors[3, 0]) > 0.1  # the sign rule is locally smooth here
    rng = np.random.default_rng(2)
    weights_q, weights_l = rng.standard_normal(4), rng.standard_normal(4)
    _, analytic = loss_and_gradient(params, weights_q, weights_l)
    step = 1e-6
    numeric = np.zeros(10)
    for k in range(10):
        shift = np.zeros((1, 10))
        shift[0, k] = step
        plus, _ = loss_and_gradient(params + shift, weights_q, weights_l)
        minus, _ = loss_and_gradient(params - shift, weights_q, weights_l)
        numeric[k] = (plus - minus) / (2 * step)
    np.testing.assert_allclose(analytic[0], numeric, rtol=1e-6, atol=1e-8)


def test_near_degenerate_gradient_is_finite_and_bounded():
    matrix = matrix_with_spectrum([1.0, 1.0 + 1e-9, 2.0, 3.0], rotation_seed=4)
    params = upper_params(matrix)[None]
    weights_q = np.array([0.3, -0.2, 0.5, 0.1])
    _, guarded = loss_and_gradient(params, weights_q, np.zeros(4), min_gap=1e-3)
    assert np.all(np.isfinite(guarded))
    assert np.linalg.norm(guarded) < 2 * np.sqrt(2) * np.linalg.norm(weights_q) / 1e-3

    # TensorFlow's own eigh gradient, for contrast, scales like 1 / gap.
    x = tf.constant(params)
    with tf.GradientTape() as tape:
        tape.watch(x)
        _, vectors = tf.linalg.eigh(vector_to_symmetric_matrix(x))
        loss = tf.reduce_sum(vectors[..., 0] * weights_q)
    assert np.linalg.norm(tape.gradient(loss, x).numpy()) > 1e5


def test_two_thousand_training_steps_stay_finite():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inputs = tf.constant(rng.standard_normal((8, 32)), tf.float32)
    targets = tf.constant(g.random_quaternions(8, rng), tf.float32)
    dense = keras.layers.Dense(10)
    qcqp = QCQPLayer()
    optimizer = keras.optimizers.Adam(learning_rate=0.05)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            quaternion, _ = qcqp(dense(x))
            loss = tf.reduce_mean(g.geodesic_distance_tf(quaternion, y))
        gradients = tape.gradient(loss, dense.trainable_variables)
        optimizer.apply_gradients(zip(gradients, dense.trainable_variables, strict=True))
        return loss

    noise = 0.3 * rng.standard_normal((2000, *inputs.shape)).astype(np.float32)  # keeps the spectrum moving
    losses = [step(inputs + noise[i], targets) for i in range(2000)]
    losses = np.array([float(loss) for loss in losses])
    assert np.all(np.isfinite(losses))
    assert all(np.all(np.isfinite(weight.numpy())) for weight in dense.weights)
    assert losses[-100:].mean() < losses[:100].mean()  # it learned something, so gradients flowed


def test_config_round_trip_and_saved_model(tmp_path):
    layer = QCQPLayer(psd=True, min_gap=1e-4, name="head_qcqp")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, QCQPLayer)
    assert (restored.psd, restored.min_gap, restored.name) == (True, 1e-4, "head_qcqp")

    inputs = keras.Input((6,))
    outputs = QCQPLayer(psd=True)(keras.layers.Dense(10)(inputs))
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "qcqp.keras")
    loaded = keras.saving.load_model(tmp_path / "qcqp.keras")
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    for before, after in zip(model(x), loaded(x), strict=True):
        np.testing.assert_allclose(after.numpy(), before.numpy(), atol=1e-6)


def test_invalid_min_gap_is_refused():
    with pytest.raises(ValueError, match="min_gap"):
        QCQPLayer(min_gap=0.0)
