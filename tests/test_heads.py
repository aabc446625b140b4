"""Rotation heads: unit canonical quaternions, the 6D and 9D maps against scipy/NumPy, registry, config."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryo_forum import geometry as g
from cryo_forum.model.heads import (
    HEADS,
    NineDHead,
    QCQPHead,
    SixDHead,
    build_head,
    gram_schmidt_tf,
    nearest_rotation_quaternion_tf,
)
from cryo_forum.tensorflow_quiet import keras, tf

FEATURES = np.random.default_rng(0).standard_normal((12, 16)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_return_unit_canonical_quaternions(name):
    outputs = build_head(name)(FEATURES)
    quaternion = outputs["quaternion"].numpy()
    assert quaternion.shape == (12, 4)
    np.testing.assert_allclose(np.linalg.norm(quaternion, axis=-1), 1.0, atol=1e-5)
    assert np.all(quaternion[:, 3] >= 0)
    if name == "qcqp":
        eigenvalues = outputs["eigenvalues"].numpy()
        assert eigenvalues.shape == (12, 4)
        assert np.all(np.diff(eigenvalues, axis=-1) >= 0)
    else:
        assert "eigenvalues" not in outputs


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_have_finite_gradients(name):
    head = build_head(name)
    with tf.GradientTape() as tape:
        quaternion = head(FEATURES)["quaternion"]
        loss = tf.reduce_sum(quaternion * tf.constant([0.1, -0.4, 0.3, 0.2]))
    gradients = tape.gradient(loss, head.trainable_variables)
    assert len(gradients) == 2
    assert all(np.all(np.isfinite(gradient.numpy())) for gradient in gradients)


def test_heads_follow_their_dense_outputs():
    head = build_head("quaternion")
    raw = head.dense(FEATURES).numpy()
    expected = g.canonical_quaternion(raw / np.linalg.norm(raw, axis=-1, keepdims=True))
    np.testing.assert_allclose(head(FEATURES)["quaternion"].numpy(), expected, atol=1e-6)

    head = SixDHead()
    columns = head.dense(FEATURES).numpy().astype(np.float64)
    matrices = g.quaternion_to_matrix(head(FEATURES)["quaternion"].numpy())
    np.testing.assert_allclose(matrices, gram_schmidt_tf(tf.constant(columns)).numpy(), atol=1e-5)


def test_gram_schmidt_reproduces_a_rotation_from_its_first_two_columns():
    matrices = Rotation.random(20, random_state=3).as_matrix()
    six = np.concatenate([matrices[:, :, 0], matrices[:, :, 1]], axis=-1)
    np.testing.assert_allclose(gram_schmidt_tf(tf.constant(six)).numpy(), matrices, atol=1e-12)

    skewed = np.random.default_rng(4).standard_normal((20, 6))
    result = gram_schmidt_tf(tf.constant(skewed)).numpy()
    np.testing.assert_allclose(result.transpose(0, 2, 1) @ result, np.broadcast_to(np.eye(3), (20, 3, 3)), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(result), 1.0, atol=1e-12)
    first = skewed[:, :3] / np.linalg.norm(skewed[:, :3], axis=-1, keepdims=True)
    np.testing.assert_allclose(result[:, :, 0], first, atol=1e-12)


def test_nine_d_matches_scipy_for_rotations_and_svd_projection_otherwise():
    rotations = Rotation.random(20, random_state=6)
    head = NineDHead()
    quaternion = head.to_rotation(tf.constant(rotations.as_matrix().reshape(20, 9)))["quaternion"].numpy()
    np.testing.assert_allclose(quaternion, g.canonical_quaternion(rotations.as_quat()), atol=1e-12)

    matrices = np.random.default_rng(8).standard_normal((50, 3, 3))
    u, _, vt = np.linalg.svd(matrices)
    signs = np.linalg.det(u @ vt)
    assert np.any(signs < 0) and np.any(signs > 0)  # both branches of the det +1 correction
    u[:, :, 2] *= signs[:, None]
    projected = g.quaternion_to_matrix(nearest_rotation_quaternion_tf(tf.constant(matrices)).numpy())
    np.testing.assert_allclose(projected, u @ vt, atol=1e-10)
    np.testing.assert_allclose(np.linalg.det(projected), 1.0, atol=1e-12)
    # scipy's Kabsch solution maximises the same tr(R^T M) (align_vectors of M's columns onto the axes).
    for matrix, rotation in zip(matrices[:5], projected[:5], strict=True):
        reference, _ = Rotation.align_vectors(matrix.T, np.eye(3))
        np.testing.assert_allclose(rotation, reference.as_matrix(), atol=1e-10)


def test_matrix_conversion_gradient_is_finite_at_half_turns():
    half_turns = Rotation.from_rotvec([[np.pi, 0, 0], [0, np.pi - 1e-7, 0], [0, 0, np.pi]]).as_matrix()
    for dtype in (tf.float32, tf.float64):
        matrices = tf.constant(half_turns, dtype)
        with tf.GradientTape() as tape:
            tape.watch(matrices)
            loss = tf.reduce_sum(nearest_rotation_quaternion_tf(matrices) * tf.constant([1, 2, 3, 4], dtype))
        assert np.all(np.isfinite(tape.gradient(loss, matrices).numpy()))


def test_unknown_head_names_the_choices():
    with pytest.raises(ValueError, match="qcqp, quaternion, 6d, 9d"):
        build_head("euler")
    assert isinstance(build_head(" 6D "), SixDHead)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_config_round_trip(name, tmp_path):
    kwargs = {"psd": True, "min_gap": 1e-5} if name == "qcqp" else {}
    head = build_head(name, name=f"head_{name}", **kwargs)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    assert type(restored) is type(head)
    assert restored.get_config() == head.get_config()

    inputs = keras.Input((16,))
    model = keras.Model(inputs, head(inputs))
    model.save(tmp_path / "head.keras")
    loaded = keras.saving.load_model(tmp_path / "head.keras")
    before, after = model(FEATURES), loaded(FEATURES)
    assert sorted(after) == sorted(before)
    for key in before:
        np.testing.assert_allclose(after[key].numpy(), before[key].numpy(), atol=1e-6)
    if name == "qcqp":
        assert isinstance(loaded.get_layer(f"head_{name}"), QCQPHead)
        assert loaded.get_layer(f"head_{name}").qcqp.psd


def test_nine_d_gradient_matches_finite_differences_at_a_rotation():
    """At an exact rotation all singular values coincide, where TensorFlow's SVD gradient is wrong."""
    matrix = Rotation.from_rotvec([0.3, 0.2, 0.1]).as_matrix()
    weights = tf.constant(np.random.default_rng(9).standard_normal((3, 3)))

    def projected_loss(m):
        return tf.reduce_sum(g.quaternion_to_matrix_tf(nearest_rotation_quaternion_tf(m)) * weights)

    m = tf.constant(matrix)
    with tf.GradientTape() as tape:
        tape.watch(m)
        loss = projected_loss(m)
    analytic = tape.gradient(loss, m).numpy()
    step = 1e-6
    numeric = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            shift = np.zeros((3, 3))
            shift[i, j] = step
            plus = projected_loss(tf.constant(matrix + shift)).numpy()
            minus = projected_loss(tf.constant(matrix - shift)).numpy()
            numeric[i, j] = (plus - minus) / (2 * step)
    assert np.abs(numeric).max() > 0.1
    np.testing.assert_allclose(analytic, numeric, atol=1e-7)
