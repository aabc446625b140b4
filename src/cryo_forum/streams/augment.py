"""Augmentation of model inputs: exact in-plane rotation with the pose updated to match, and shifts.

:class:`Augmentation` is also a section of a run's settings, so this module imports TensorFlow only where it
computes.

The convention, pinned by tests/test_pipeline.py: rotating the image content by +alpha
(``cryo_forum.physics.fourier.rotate_images(images, +alpha)``) gives the projection at ``A' = Rz(alpha) A``,
i.e. ``q' = q_z(alpha) (x) q`` (psi' = psi - alpha). Shifts move the content and leave the pose alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cryo_forum.choices import AUGMENT_METHODS
from cryo_forum.errors import InvalidSetting
from cryo_forum.physics.fourier import rotate_images, translate_images

if TYPE_CHECKING:
    import tensorflow as tf

CENTRING_ERROR_PX = 1.0  # px of the network's images: how far off-centre the trained network must still work


@dataclass(frozen=True)
class Augmentation:
    """Random in-plane rotation (pose updated to match) and small shifts (pose unchanged) of model inputs.

    rotate: turn every image by a uniform angle in [0, 2 pi) and set ``q' = q_z(alpha) (x) q``.
    max_shift_px: move the content by uniform (dx, dy) in [-max, max] pixels of the images augmented (the
    preprocessed size in :func:`~cryo_forum.streams.batch.to_model_batches`); shifts are periodic with "fourier".
    method: "bilinear" (TF image transform: fast, but the interpolation damps white noise to 0.45 of its variance
    on average) or "fourier" (:func:`~cryo_forum.physics.fourier.rotate_images`: exact, keeps the noise spectrum,
    but slower than a training step). The default is "bilinear" for that reason.
    """

    rotate: bool = True
    max_shift_px: float | None = None  # None: chosen from the data (see :meth:`with_shifts_of`)
    method: str = "bilinear"

    def __post_init__(self) -> None:
        if self.method not in AUGMENT_METHODS:
            raise InvalidSetting("method", f"must be one of {', '.join(AUGMENT_METHODS)}, got {self.method!r}")
        if self.max_shift_px is not None and not (np.isfinite(self.max_shift_px) and self.max_shift_px >= 0):
            raise InvalidSetting("max_shift_px", f"must be >= 0, got {self.max_shift_px}")
        if not isinstance(self.rotate, bool | np.bool_):
            raise InvalidSetting("rotate", f"must be true or false, got {self.rotate!r}")

    @property
    def active(self) -> bool:
        return bool(self.rotate) or bool(self.max_shift_px)

    def with_shifts_of(self, origins_px: np.ndarray) -> Augmentation:
        """These settings with an unset ``max_shift_px`` chosen from the particles' origins [N, 2] (px of the
        augmented images): re-centred particles are moved by up to CENTRING_ERROR_PX, as far as ``predict``'s
        centring leaves particles never aligned off-centre (less for sets whose origins spread less). A set
        without origins gets none."""
        if self.max_shift_px is not None:
            return self
        spread = float(np.std(origins_px)) if len(origins_px) else 0.0
        return dataclasses.replace(self, max_shift_px=round(min(CENTRING_ERROR_PX, 2.0 * spread), 2))

    def __call__(self, images: tf.Tensor, quaternions: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Augment images float32 [B, S, S] and their poses [B, 4]; ``seed`` int [2] (stateless random ops).

        Returns (images [B, S, S], quaternions [B, 4] canonical). The same seed gives the same result.
        """
        from cryo_forum.tensorflow_quiet import tf

        images = tf.convert_to_tensor(images, tf.float32)
        quaternions = tf.convert_to_tensor(quaternions, tf.float32)
        rows = tf.shape(images)[0]
        angle_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
        angles = tf.zeros([rows])
        if self.rotate:
            angles = tf.random.stateless_uniform([rows], angle_seed, 0.0, 2.0 * np.pi)
        reach = self.max_shift_px or 0.0  # unset: no shifts
        shifts = tf.random.stateless_uniform([rows, 2], shift_seed, -reach, reach)
        if self.method == "fourier":
            moved = self._fourier(images, angles, shifts)
        else:
            moved = _bilinear_transform(images, angles, shifts)
        if self.rotate:
            quaternions = rotate_poses_in_plane(quaternions, angles)
        return moved, quaternions

    def _fourier(self, images: tf.Tensor, angles: tf.Tensor, shifts: tf.Tensor) -> tf.Tensor:
        from cryo_forum.tensorflow_quiet import tf

        rotate, shift = bool(self.rotate), bool(self.max_shift_px)

        def move(batch: np.ndarray, batch_angles: np.ndarray, batch_shifts: np.ndarray) -> np.ndarray:
            if rotate:
                batch = rotate_images(batch, batch_angles)
            if shift:
                batch = translate_images(batch, batch_shifts)
            return batch.astype(np.float32, copy=False)

        moved = tf.numpy_function(move, [images, angles, shifts], tf.float32, stateful=False)
        return tf.ensure_shape(moved, images.shape)


def rotate_poses_in_plane(quaternions: tf.Tensor, angles: tf.Tensor) -> tf.Tensor:
    """Poses [B, 4] of images whose content was rotated by angles [B] (radians): q_z(alpha) (x) q, canonical."""
    from cryo_forum import geometry
    from cryo_forum.tensorflow_quiet import tf

    half = 0.5 * tf.cast(angles, quaternions.dtype)
    zeros = tf.zeros_like(half)
    turn = tf.stack([zeros, zeros, tf.sin(half), tf.cos(half)], axis=-1)
    return geometry.canonical_quaternion_tf(geometry.quaternion_multiply_tf(turn, quaternions))


def _bilinear_transform(images: tf.Tensor, angles: tf.Tensor, shifts: tf.Tensor) -> tf.Tensor:
    """out(p) = in(Rz(-alpha)(p - shift - c) + c) by bilinear interpolation, zeros from outside; [B, S, S]."""
    from cryo_forum.tensorflow_quiet import tf

    size = images.shape[-1] if images.shape[-1] is not None else tf.shape(images)[-1]
    centre = tf.cast(size // 2, tf.float32)
    cos, sin = tf.cos(angles), tf.sin(angles)
    x0 = centre + shifts[:, 0]  # output pixel p maps to input cos*(x - x0) + sin*(y - y0) + c, ...
    y0 = centre + shifts[:, 1]
    transforms = tf.stack(
        [
            cos,
            sin,
            centre - cos * x0 - sin * y0,
            -sin,
            cos,
            centre + sin * x0 - cos * y0,
            tf.zeros_like(cos),
            tf.zeros_like(cos),
        ],
        axis=-1,
    )
    moved = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None],
        transforms=transforms,
        output_shape=tf.shape(images)[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    return tf.ensure_shape(moved[..., 0], images.shape)
