"""Encoders, the low-pass pyramid and GeM pooling: shapes, references (scipy, numpy), saving, gradients."""

import itertools

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cryo_forum.model.encoders import (
    ENCODERS,
    POOLINGS,
    Encoder,
    GeMPooling2D,
    LowPassPyramid,
    build_encoder,
)
from cryo_forum.tensorflow_quiet import keras, tf

SIZE = 32
TINY = {  # cheap options per encoder for 32 px tests
    "small": {"widths": (4, 8, 16), "depths": (1, 1, 2)},
    "resnet": {"widths": (4, 8), "depths": 1},
    "vgg": {"widths": (4, 8), "depths": 1},
}


def _images(batch: int = 4, size: int = SIZE, channels: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, size, size, channels)).astype(np.float32)


def _randomise(model: keras.Model, seed: int) -> None:
    """Give every variable (BN statistics too) random values, so a fresh model cannot match by chance."""
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        shape = tuple(variable.shape)
        if "variance" in variable.path or variable.path.endswith("/p"):
            variable.assign(rng.uniform(1.0, 3.0, size=shape).astype(np.float32))
        else:
            variable.assign(rng.normal(scale=0.3, size=shape).astype(np.float32))


def test_registry_names():
    assert ENCODERS == ("small", "resnet", "vgg")
    assert POOLINGS == ("flatten", "avg", "max", "gem")
    assert type(build_encoder(image_size=SIZE, **TINY["small"])).__name__ == "SmallEncoder"


@pytest.mark.parametrize("name", ENCODERS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_every_encoder_and_pooling_gives_finite_features(name, pooling):
    encoder = build_encoder(name, SIZE, pooling=pooling, **TINY[name])
    features = encoder(_images(), training=True).numpy()
    width = TINY[name]["widths"][-1]
    reduced = SIZE // 2 ** len(TINY[name]["widths"])
    expected = width * reduced**2 if pooling == "flatten" else width
    assert features.shape == (4, expected) == (4, encoder.feature_dim)
    assert np.all(np.isfinite(features))
    assert np.std(features) > 0


@pytest.mark.parametrize("name", ENCODERS)
def test_lowpass_front_end_and_dropout(name):
    encoder = build_encoder(name, SIZE, lowpass=True, sigmas=(1.0, 3.0), dropout=0.5, **TINY[name])
    assert encoder.get_layer("lowpass").output.shape[1:] == (SIZE, SIZE, 3)
    images = _images()
    inference = encoder(images, training=False).numpy()
    np.testing.assert_array_equal(inference, encoder(images, training=False).numpy())
    pooled = keras.Model(encoder.inputs, encoder.get_layer("dropout").input)
    np.testing.assert_allclose(pooled(images, training=False).numpy(), inference, rtol=1e-6)
    before = pooled(images, training=True).numpy()
    dropped = encoder(images, training=True).numpy()
    kept = dropped != 0
    np.testing.assert_allclose(dropped[kept], 2 * before[kept], rtol=1e-5)
    assert 0.1 < np.mean(kept) < 0.9


def test_lowpass_pyramid_matches_scipy_gaussian_filter():
    sigmas = (0.8, 2.0, 5.0)
    images = _images(batch=2, channels=2)
    out = LowPassPyramid(sigmas=sigmas)(images).numpy()
    assert out.shape == (2, SIZE, SIZE, 2 * 4)
    np.testing.assert_array_equal(out[..., :2], images)
    for index, sigma in enumerate(sigmas, start=1):
        for channel in range(2):
            reference = gaussian_filter(images[0, :, :, channel].astype(np.float64), sigma, mode="reflect")
            np.testing.assert_allclose(out[0, :, :, 2 * index + channel], reference, atol=2e-5)


def _high_frequency_power(image: np.ndarray) -> float:
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(image))) ** 2
    freq = np.fft.fftshift(np.fft.fftfreq(image.shape[0]))
    radius = np.hypot(*np.meshgrid(freq, freq, indexing="ij"))
    return float(spectrum[radius > 0.15].sum())


def test_lowpass_pyramid_removes_high_frequencies_and_keeps_constants():
    layer = LowPassPyramid(sigmas=(1.0, 2.0, 4.0))
    out = layer(_images(batch=1))[0].numpy()
    power = [_high_frequency_power(out[..., channel]) for channel in range(4)]
    assert all(later < 0.5 * earlier for earlier, later in itertools.pairwise(power))
    constant = np.full((1, SIZE, SIZE, 1), 2.5, dtype=np.float32)
    np.testing.assert_allclose(layer(constant).numpy(), 2.5, rtol=1e-6)


def test_lowpass_pyramid_on_rectangular_images_matches_scipy():
    images = np.random.default_rng(3).normal(size=(1, 12, 20, 1)).astype(np.float32)
    out = LowPassPyramid(sigmas=(1.5,))(images).numpy()
    reference = gaussian_filter(images[0, :, :, 0].astype(np.float64), 1.5, mode="reflect")
    np.testing.assert_allclose(out[0, :, :, 1], reference, atol=2e-5)


def test_lowpass_pyramid_kernel_wider_than_image_matches_scipy():
    images = _images(batch=1, size=8)
    out = LowPassPyramid(sigmas=(6.0,))(images).numpy()
    reference = gaussian_filter(images[0, :, :, 0].astype(np.float64), 6.0, mode="reflect")
    np.testing.assert_allclose(out[0, :, :, 1], reference, atol=2e-5)


def test_lowpass_pyramid_rejects_bad_sigmas():
    with pytest.raises(ValueError, match="sigmas"):
        LowPassPyramid(sigmas=(1.0, 0.0))


def test_gem_with_p_one_is_average_pooling():
    features = np.abs(_images(channels=5)) + 0.1
    gem = GeMPooling2D(p=1.0)(features).numpy()
    np.testing.assert_allclose(gem, features.mean(axis=(1, 2)), rtol=1e-5)


def test_gem_matches_power_mean_and_approaches_max():
    features = np.abs(_images(channels=5)).astype(np.float64) + 0.1
    gem3 = GeMPooling2D(p=3.0)(features.astype(np.float32)).numpy()
    np.testing.assert_allclose(gem3, np.mean(features**3, axis=(1, 2)) ** (1 / 3), rtol=1e-5)
    gem_large = GeMPooling2D(p=500.0)(features.astype(np.float32)).numpy()
    maximum = features.max(axis=(1, 2))
    assert np.all(gem_large <= maximum * (1 + 1e-6))
    np.testing.assert_allclose(gem_large, maximum, rtol=0.02)
    assert np.all(np.isfinite(gem_large))


def test_gem_clamps_to_eps():
    features = -np.abs(_images(channels=3)) - 1.0
    np.testing.assert_allclose(GeMPooling2D(p=3.0, eps=1e-4)(features).numpy(), 1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", ENCODERS)
def test_model_with_encoder_saves_and_reloads(name, tmp_path):
    options = {"pooling": "gem", "lowpass": True, "sigmas": (1.5,), **TINY[name]}
    encoder = build_encoder(name, SIZE, **options)
    images_in = keras.Input((SIZE, SIZE, 1))
    model = keras.Model(images_in, keras.layers.Dense(3, name="head")(encoder(images_in)))
    _randomise(model, seed=1)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    images = _images(seed=2)
    expected = model(images, training=False).numpy()
    np.testing.assert_array_equal(loaded(images, training=False).numpy(), expected)
    assert isinstance(loaded.layers[1], type(encoder))
    assert loaded.layers[1].get_config() == encoder.get_config()
    fresh = build_encoder(name, SIZE, **options)
    assert not np.allclose(fresh(images).numpy(), encoder(images).numpy())


@pytest.mark.parametrize("name", ENCODERS)
def test_get_config_round_trip(name):
    encoder = build_encoder(name, SIZE, pooling="max", dropout=0.1, **TINY[name])
    config = encoder.get_config()
    assert config["widths"] == list(TINY[name]["widths"])
    rebuilt = type(encoder).from_config(config)
    assert rebuilt.get_config() == config
    assert [layer.name for layer in rebuilt.layers] == [layer.name for layer in encoder.layers]
    assert rebuilt.count_params() == encoder.count_params()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(encoder))
    assert isinstance(restored, Encoder) and restored.get_config() == config


def test_layer_configs_round_trip():
    for layer in (LowPassPyramid(sigmas=(0.5, 2.0), truncate=3.0), GeMPooling2D(p=2.0, eps=1e-5)):
        config = layer.get_config()
        assert type(layer).from_config(config).get_config() == config


@pytest.mark.parametrize("name", ENCODERS)
def test_gradients_reach_every_trainable_weight(name):
    encoder = build_encoder(name, SIZE, pooling="gem", lowpass=True, **TINY[name])
    images = tf.constant(_images())
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(encoder(images, training=True) ** 2)
    grads = tape.gradient(loss, encoder.trainable_variables)
    assert any(variable.path.endswith("gem_pool/p") for variable in encoder.trainable_variables)
    for variable, grad in zip(encoder.trainable_variables, grads, strict=True):
        assert grad is not None, variable.path
        assert np.all(np.isfinite(grad.numpy())), variable.path
        assert np.any(grad.numpy() != 0), variable.path


def test_depths_set_the_number_of_layers_per_stage():
    def convs(encoder):
        return sum(isinstance(layer, keras.layers.Conv2D) for layer in encoder.layers)

    assert convs(build_encoder("small", SIZE, widths=(4, 8, 16), depths=(1, 3, 2))) == 6
    assert convs(build_encoder("vgg", SIZE, widths=(4, 8), depths=3)) == 6
    assert convs(build_encoder("resnet", SIZE, widths=(4, 8), depths=(2, 1))) == 1 + 2 * 3 + 2
    assert build_encoder("small", SIZE, widths=(4, 8, 16)).get_config()["depths"] == [1, 2, 2]
    assert build_encoder("small", 64).get_config()["depths"] == [1, 1, 1, 2, 2]
    assert build_encoder("vgg", SIZE, widths=(4, 8)).get_config()["depths"] == [2, 2]
    with pytest.raises(ValueError, match="depths"):
        build_encoder("small", SIZE, widths=(4, 8), depths=(1, 1, 1))


def test_unknown_names_and_bad_sizes_raise():
    with pytest.raises(ValueError, match="small, resnet, vgg"):
        build_encoder("alexnet", SIZE)
    with pytest.raises(ValueError, match="flatten, avg, max, gem"):
        build_encoder("small", SIZE, pooling="median")
    with pytest.raises(ValueError, match="image_size 8"):
        build_encoder("vgg", 8, widths=(4, 8, 16, 32))
