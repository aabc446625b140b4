"""Encoders: particle images [B, D, D, C] (float32, normalised) -> feature vectors [B, F], chosen by name.

An encoder is an optional front end (:class:`LowPassPyramid`), a convolutional backbone that turns the
images into a feature map [B, h, w, K], a pooling that turns the map into [B, F] and an optional dropout.
``build_encoder("small" | "resnet" | "vgg", image_size, ...)`` returns one as a ``keras.Model`` subclass
whose constructor arguments are its config, so a model that contains it saves to and loads from ``.keras``.

* ``"small"`` (the default): strided 3x3 convolutions, narrow at high resolution; fast enough for a CPU.
* ``"resnet"``: a small residual network (pre-activation or standard blocks, strided downsampling).
* ``"vgg"``: the original paper's VGG-like network (3x3 conv + ReLU (+ batch norm), 2x2 max-pool), for GPUs.

Poolings: ``"flatten"``, ``"avg"`` (global average), ``"max"`` (global max) and ``"gem"`` (generalised
mean with a learnable exponent, :class:`GeMPooling2D`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from cryo_forum.choices import ENCODERS, POOLINGS
from cryo_forum.tensorflow_quiet import keras, tf

DEFAULT_SIGMAS = (1.0, 2.0, 4.0)

_register = keras.saving.register_keras_serializable(package="cryo_forum")


def gaussian_blur_matrix(size: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """[size, size] matrix M with ``M @ x == scipy.ndimage.gaussian_filter1d(x, sigma, mode="reflect")``.

    The Gaussian has sigma pixels and is cut at ``truncate`` sigma (scipy's taps); mirrored borders
    ("d c b a | a b c d", repeated for kernels wider than the signal) are folded into the matrix, so a
    blur is two small matrix products, which run faster on CPUs than wide convolutions.
    """
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    rows = np.broadcast_to(np.arange(size)[:, None], (size, offsets.size))
    cols = np.mod(rows + offsets, 2 * size)
    cols = np.where(cols >= size, 2 * size - 1 - cols, cols)
    matrix = np.zeros((size, size))
    np.add.at(matrix, (rows, cols), np.broadcast_to(taps / taps.sum(), rows.shape))
    return matrix


@_register
class LowPassPyramid(keras.layers.Layer):
    """Images [B, H, W, C] -> [B, H, W, C (1 + S)]: the input, then S Gaussian low-passed copies.

    Channels ``[0, C)`` are the input itself, channels ``[C (s + 1), C (s + 2))`` the input blurred by a
    fixed separable Gaussian of ``sigmas[s]`` pixels, truncated at ``truncate`` sigma, with mirrored borders
    (scipy.ndimage's ``mode="reflect"``, see :func:`gaussian_blur_matrix`), so a constant image stays
    constant. The coarse copies give an encoder the low-resolution shape of a noisy particle directly
    (the original's "blur" front end). Needs a static image size.
    """

    def __init__(self, sigmas: Sequence[float] = DEFAULT_SIGMAS, truncate: float = 4.0, **kwargs: Any):
        super().__init__(**kwargs)
        self.sigmas = tuple(float(sigma) for sigma in sigmas)
        self.truncate = float(truncate)
        if not self.sigmas or min(self.sigmas) <= 0:
            raise ValueError(f"LowPassPyramid sigmas must be positive pixel widths, got {list(sigmas)}")
        if self.truncate <= 0:
            raise ValueError(f"LowPassPyramid truncate must be positive, got {truncate}")

    def build(self, input_shape: tuple) -> None:
        if None in tuple(input_shape[1:]):
            raise ValueError(f"LowPassPyramid needs a known image size and channel count, got {input_shape}")
        height, width = input_shape[1:3]
        self._blur_rows = np.stack([gaussian_blur_matrix(height, s, self.truncate) for s in self.sigmas])
        self._blur_columns = np.stack([gaussian_blur_matrix(width, s, self.truncate) for s in self.sigmas])

    def call(self, images: tf.Tensor) -> tf.Tensor:
        rows = tf.constant(self._blur_rows, dtype=images.dtype)  # [S, H, H]
        columns = tf.constant(self._blur_columns, dtype=images.dtype)  # [S, W, W]
        blurred = tf.einsum("shi,biwc->bshwc", rows, images)
        blurred = tf.einsum("swj,bshjc->bhwsc", columns, blurred)  # [B, H, W, S, C]
        shape = tf.shape(images)
        blurred = tf.reshape(blurred, [shape[0], shape[1], shape[2], len(self.sigmas) * images.shape[-1]])
        return tf.concat([images, blurred], axis=-1)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (*input_shape[:-1], input_shape[-1] * (1 + len(self.sigmas)))

    def get_config(self) -> dict:
        return {**super().get_config(), "sigmas": list(self.sigmas), "truncate": self.truncate}


@_register
class GeMPooling2D(keras.layers.Layer):
    """Generalised-mean pooling [B, H, W, C] -> [B, C]: ``(mean_{H,W} max(x, eps)^p)^(1/p)``.

    p = 1 is average pooling and large p approaches max pooling (Radenovic et al. 2018). p is one learnable
    scalar (initial value ``p``, trainable unless ``trainable_p=False``), used as ``max(p, 1)`` so the pool
    stays between the two. The mean is taken relative to the per-channel maximum (a constant for the
    gradient), which gives the same value without overflow at large p.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6, trainable_p: bool = True, **kwargs: Any):
        super().__init__(**kwargs)
        self.initial_p = float(p)
        self.eps = float(eps)
        self.trainable_p = bool(trainable_p)
        if self.initial_p < 1 or self.eps <= 0:
            raise ValueError(f"GeMPooling2D needs p >= 1 and eps > 0, got p={p}, eps={eps}")

    def build(self, input_shape: tuple) -> None:
        self.p = self.add_weight(
            name="p",
            shape=(),
            initializer=keras.initializers.Constant(self.initial_p),
            trainable=self.trainable_p,
        )

    def call(self, features: tf.Tensor) -> tf.Tensor:
        p = tf.maximum(tf.cast(self.p, features.dtype), 1.0)
        clamped = tf.maximum(features, self.eps)
        peak = tf.stop_gradient(tf.reduce_max(clamped, axis=[1, 2], keepdims=True))
        mean = tf.reduce_mean((clamped / peak) ** p, axis=[1, 2])
        return peak[:, 0, 0, :] * mean ** (1.0 / p)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "p": self.initial_p, "eps": self.eps, "trainable_p": self.trainable_p}


def make_pooling(name: str) -> keras.layers.Layer:
    """The pooling layer [B, h, w, K] -> [B, F] called ``name`` (one of POOLINGS)."""
    if name == "flatten":
        return keras.layers.Flatten(name="flatten")
    if name == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool")
    if name == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool")
    if name == "gem":
        return GeMPooling2D(name="gem_pool")
    raise ValueError(f"unknown pooling {name!r}; choose one of: {', '.join(POOLINGS)}")


Backbone = Callable[..., Any]


class Encoder(keras.Model):
    """Images [B, D, D, C] -> features [B, F]: front end, backbone, pooling, dropout as one functional graph.

    ``widths`` are the channel counts of the stages (each halves the image size) and ``depths`` the number
    of conv layers or blocks per stage (one count for all, or one per stage). Subclasses pass their
    backbone (a function of the feature map, widths, depths and their own options) and set the defaults.
    ``get_config`` returns the constructor arguments, so ``from_config`` rebuilds the same graph and saved
    weights load into it. Pooling ``"flatten"`` keeps the spatial layout (F = h w K), the others give
    F = widths[-1].
    """

    default_widths: ClassVar[tuple[int, ...]] = ()

    @classmethod
    def default_depths(cls, stages: int) -> tuple[int, ...]:
        """Depths used when none are given, for any number of stages."""
        return (1,) * stages

    def __init__(
        self,
        image_size: int,
        *,
        backbone: Backbone,
        options: dict[str, Any],
        widths: Sequence[int] | None = None,
        depths: int | Sequence[int] | None = None,
        pooling: str = "avg",
        lowpass: bool = False,
        sigmas: Sequence[float] = DEFAULT_SIGMAS,
        dropout: float = 0.0,
        channels: int = 1,
        **kwargs: Any,
    ):
        widths = tuple(int(width) for width in (self.default_widths if widths is None else widths))
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty list of positive channel counts, got {widths}")
        if depths is None:
            depths = self.default_depths(len(widths))
        depths = (int(depths),) * len(widths) if np.ndim(depths) == 0 else tuple(int(d) for d in depths)
        if len(depths) != len(widths) or min(depths) < 1:
            raise ValueError(f"depths must be a positive count or one per width {widths}, got {depths}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLINGS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if image_size < 2 ** len(widths):
            raise ValueError(
                f"image_size {image_size} is too small for {len(widths)} downsampling stages "
                f"(needs >= {2 ** len(widths)}); use fewer widths"
            )
        images = keras.Input((image_size, image_size, channels), name="images")
        x = LowPassPyramid(sigmas, name="lowpass")(images) if lowpass else images
        x = backbone(x, widths, depths, **options)
        x = make_pooling(pooling)(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name="dropout")(x)
        super().__init__(inputs=images, outputs=x, **kwargs)
        self._encoder_config = {
            "image_size": int(image_size),
            "widths": list(widths),
            "depths": list(depths),
            "pooling": pooling,
            "lowpass": bool(lowpass),
            "sigmas": [float(sigma) for sigma in sigmas],
            "dropout": float(dropout),
            "channels": int(channels),
            **options,
        }

    @property
    def feature_dim(self) -> int:
        """F, the length of the feature vector."""
        return int(self.outputs[0].shape[-1])

    def get_config(self) -> dict:
        return {"name": self.name, "trainable": self.trainable, **self._encoder_config}

    @classmethod
    def from_config(cls, config: dict, custom_objects: dict | None = None) -> Encoder:
        return cls(**config)


def _bn_relu(x: Any, name: str) -> Any:
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _conv(filters: int, size: int, strides: int, name: str, use_bias: bool = False) -> keras.layers.Conv2D:
    return keras.layers.Conv2D(filters, size, strides=strides, padding="same", use_bias=use_bias, name=name)


def _conv_block(x: Any, filters: int, strides: int, batch_norm: bool, name: str) -> Any:
    """3x3 conv (+ batch norm) + ReLU."""
    x = _conv(filters, 3, strides, f"{name}_conv", use_bias=not batch_norm)(x)
    if batch_norm:
        x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _vgg_backbone(x: Any, widths: tuple[int, ...], depths: tuple[int, ...], batch_norm: bool) -> Any:
    for block, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
        for conv in range(1, depth + 1):
            x = _conv_block(x, width, 1, batch_norm, f"block{block}_{conv}")
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return x


def _residual_block(x: Any, width: int, strides: int, preactivation: bool, name: str) -> Any:
    """Two 3x3 convs plus a shortcut (a strided 1x1 projection where the shape changes)."""
    project = strides != 1 or x.shape[-1] != width
    if preactivation:  # He et al. 2016, "Identity mappings in deep residual networks"
        activated = _bn_relu(x, f"{name}_pre")
        shortcut = _conv(width, 1, strides, f"{name}_proj")(activated) if project else x
        y = _conv(width, 3, strides, f"{name}_conv1")(activated)
        y = _bn_relu(y, f"{name}_mid")
        y = _conv(width, 3, 1, f"{name}_conv2")(y)
        return keras.layers.Add(name=f"{name}_add")([shortcut, y])
    shortcut = x
    if project:
        shortcut = _conv(width, 1, strides, f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = _bn_relu(_conv(width, 3, strides, f"{name}_conv1")(x), f"{name}_mid")
    y = keras.layers.BatchNormalization(name=f"{name}_out_bn")(_conv(width, 3, 1, f"{name}_conv2")(y))
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out_relu")(y)


def _resnet_backbone(x: Any, widths: tuple[int, ...], depths: tuple[int, ...], preactivation: bool) -> Any:
    x = _conv(widths[0], 3, 1, "stem_conv")(x)
    if not preactivation:
        x = _bn_relu(x, "stem")
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
        for block in range(1, depth + 1):
            x = _residual_block(x, width, 2 if block == 1 else 1, preactivation, f"stage{stage}_{block}")
    return _bn_relu(x, "final") if preactivation else x


def _small_backbone(x: Any, widths: tuple[int, ...], depths: tuple[int, ...]) -> Any:
    for stage, (width, depth) in enumerate(zip(widths, depths, strict=True), start=1):
        for conv in range(1, depth + 1):
            x = _conv_block(x, width, 2 if conv == 1 else 1, True, f"stage{stage}_{conv}")
    return x


@_register
class VGGEncoder(Encoder):
    """The original paper's VGG-like encoder: per width, ``depths`` x (3x3 conv (+ BN) + ReLU), then a
    2x2 max-pool (D -> D / 2^len(widths)). Heavy: meant for GPUs."""

    default_widths = (64, 128, 256, 512)

    @classmethod
    def default_depths(cls, stages: int) -> tuple[int, ...]:
        return (2,) * stages

    def __init__(self, image_size: int, batch_norm: bool = True, **kwargs: Any):
        kwargs.setdefault("name", "vgg_encoder")
        options = {"batch_norm": bool(batch_norm)}
        super().__init__(image_size, backbone=_vgg_backbone, options=options, **kwargs)


@_register
class ResNetEncoder(Encoder):
    """A small residual network: a 3x3 stem at full resolution, then per width a stage of ``depths``
    residual blocks (pre-activation or standard) whose first block halves the size (D -> D / 2^len(widths))."""

    default_widths = (32, 64, 128, 256)

    @classmethod
    def default_depths(cls, stages: int) -> tuple[int, ...]:
        return (2,) * stages

    def __init__(self, image_size: int, preactivation: bool = True, **kwargs: Any):
        kwargs.setdefault("name", "resnet_encoder")
        options = {"preactivation": bool(preactivation)}
        super().__init__(image_size, backbone=_resnet_backbone, options=options, **kwargs)


@_register
class SmallEncoder(Encoder):
    """A fast CPU encoder: per width a stage of ``depths`` 3x3 conv + BN + ReLU layers whose first has
    stride 2 (D -> D / 2^len(widths)); no pooling layers. Few channels at high resolution keep it cheap and
    the extra layer in each of the two coarsest stages mixes the whole field of view, which orientation
    needs (0.8 M parameters; bench/throughput.py times its training steps).
    Plain convolutions beat depthwise-separable ones here: TensorFlow runs depthwise kernels on one
    thread, and they trained worse."""

    default_widths = (16, 32, 64, 128, 192)

    @classmethod
    def default_depths(cls, stages: int) -> tuple[int, ...]:
        """Two conv layers in each of the last two stages, one elsewhere: (1, 1, 1, 2, 2) by default."""
        return tuple(2 if stage >= stages - 2 else 1 for stage in range(stages))

    def __init__(self, image_size: int, **kwargs: Any):
        kwargs.setdefault("name", "small_encoder")
        super().__init__(image_size, backbone=_small_backbone, options={}, **kwargs)


_ENCODER_CLASSES: dict[str, type[Encoder]] = {
    "small": SmallEncoder,
    "resnet": ResNetEncoder,
    "vgg": VGGEncoder,
}


def build_encoder(
    name: str = "small",
    image_size: int = 64,
    pooling: str = "avg",
    lowpass: bool = False,
    widths: Sequence[int] | None = None,
    dropout: float = 0.0,
    depths: int | Sequence[int] | None = None,
    **options: Any,
) -> Encoder:
    """The encoder called ``name`` (one of ENCODERS) for images [B, image_size, image_size, channels].

    ``widths`` (channels per stage) and ``depths`` (conv layers or residual blocks per stage) default to
    the encoder's own; ``options`` are ``sigmas`` and ``channels`` for every encoder, ``batch_norm`` for
    vgg and ``preactivation`` for resnet.
    """
    if name not in _ENCODER_CLASSES:
        raise ValueError(f"unknown encoder {name!r}; choose one of: {', '.join(ENCODERS)}")
    return _ENCODER_CLASSES[name](
        image_size, pooling=pooling, lowpass=lowpass, widths=widths, depths=depths, dropout=dropout, **options
    )
