"""Particle image preprocessing: phase flip, Fourier-crop downsampling, background normalisation, soft mask.

Every function takes a batch ``[N, D, D]``, is pure and returns float32, so the tf.data input pipeline can
call it lazily per batch (e.g. through ``tf.numpy_function``). :class:`Preprocessor` ties the steps
together in a fixed order and is the ``images`` section of a run's settings:

1. phase flip (optional): each spectrum times sign(CTF) of its particle, fused with
2. the Fourier crop to ``image_size`` (the pixel size grows by D / image_size): sign(CTF) is evaluated on
   the kept frequencies only, and the result equals flipping at the input box and pixel size, then cropping;
3. normalise with the background outside a circle (RELION: zero mean, unit std there);
4. soft circular mask (optional): 1 inside, raised-cosine edge, 0 outside.

Flipping the already cropped image with the CTF at the cropped box and pixel size gives the same result
(the crop keeps the same physical frequencies) except on an even crop's Nyquist row and column, where
+-Nyquist share one coefficient and an astigmatic sign(CTF) is ambiguous; flipping first keeps those
frequencies' own signs. tests/test_preprocess.py checks both. Pixel centre and frequency conventions are
those of :mod:`cryo_forum.physics.fourier` and :mod:`cryo_forum.physics.ctf`: the image centre is pixel D // 2, the CTF
lives on the unshifted FFT grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.physics.ctf import compute_ctf
from cryo_forum.physics.fourier import fourier_crop, fourier_crop_and_filter, translate_images

CTF_KEYS = (
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "voltage",
    "spherical_aberration",
    "amplitude_contrast",
    "bfactor",
    "phase_shift",
)
"""Per-particle CTF parameters accepted by :func:`ctf_signs` (compute_ctf's keywords and units)."""

_REQUIRED_CTF_KEYS = ("defocus_u", "defocus_v", "defocus_angle")
DEFAULT_IMAGE_SIZE = 64  # px the network sees unless asked otherwise (fast on CPUs; smaller boxes are kept)


def radius_grid(size: int) -> np.ndarray:
    """Distance in pixels of every pixel of a size x size image from the centre pixel (D // 2), [D, D]."""
    offsets = np.arange(size) - size // 2
    return np.hypot(offsets[:, None], offsets[None, :])


def _as_batch(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise CryoForumError(f"images must be a batch of square images [N, D, D], got shape {images.shape}")
    return images


def downsample(images: np.ndarray, pixel_size: float, size: int) -> tuple[np.ndarray, float]:
    """Fourier-crop images [N, D, D] to [N, size, size]; returns them (float32) and the new pixel size (A).

    The new pixel size is ``pixel_size * D / size``; the band limit is exact (no aliasing).
    """
    images = _as_batch(images)
    box = images.shape[-1]
    if not 0 < size <= box:
        raise CryoForumError(f"image_size {size} must be between 1 and the input box size {box}")
    cropped = fourier_crop(images.astype(np.float32, copy=False), size)
    return cropped.astype(np.float32, copy=False), float(pixel_size) * box / size


def normalise_background(images: np.ndarray, radius_fraction: float = 0.85) -> np.ndarray:
    """Zero mean and unit std of each image's background (RELION's convention), float32 [N, D, D].

    The background is the pixels farther than ``radius_fraction * D / 2`` from the centre. An image whose
    background is flat (std zero or below 1e-6 of |mean|, e.g. a blank image) is only mean-subtracted.
    """
    images = _as_batch(images)
    size = images.shape[-1]
    if not 0.0 < radius_fraction < 1.0:
        raise CryoForumError(f"background radius fraction must be in (0, 1), got {radius_fraction}")
    outside = radius_grid(size) > radius_fraction * size / 2
    background = images[:, outside]
    mean = background.mean(axis=1, dtype=np.float64)
    std = background.std(axis=1, dtype=np.float64)
    flat = ~(std > 1e-6 * np.abs(mean))
    std = np.where(flat, 1.0, std)
    scaled = (images - mean[:, None, None].astype(np.float32)) * (1.0 / std)[:, None, None].astype(np.float32)
    return scaled.astype(np.float32, copy=False)


def soft_circular_mask(size: int, radius: float, edge: float) -> np.ndarray:
    """Mask [D, D] (float32): 1 up to ``radius`` pixels from the centre, 0 beyond ``radius + edge``.

    In between it falls as a raised cosine ``0.5 (1 + cos(pi (r - radius) / edge))``, as in RELION's
    soft masks; ``edge = 0`` gives a hard mask.
    """
    if radius < 0 or edge < 0:
        raise CryoForumError(f"mask radius ({radius}) and edge width ({edge}) must not be negative")
    r = radius_grid(size)
    if edge == 0:
        return (r <= radius).astype(np.float32)
    ramp = np.clip((r - radius) / edge, 0.0, 1.0)
    return (0.5 * (1.0 + np.cos(np.pi * ramp))).astype(np.float32)


def apply_soft_mask(images: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """Multiply images [N, D, D] by :func:`soft_circular_mask` (masked-out value 0); float32."""
    images = _as_batch(images)
    return (images * soft_circular_mask(images.shape[-1], radius, edge)).astype(np.float32, copy=False)


def _ctf_arguments(ctf_params: Mapping[str, Any], count: int) -> dict[str, np.ndarray]:
    unknown = sorted(set(ctf_params) - set(CTF_KEYS))
    missing = [key for key in _REQUIRED_CTF_KEYS if key not in ctf_params]
    if unknown or missing:
        raise CryoForumError(f"CTF parameters: unknown keys {unknown}, missing keys {missing}")
    arguments = {}
    for key, value in ctf_params.items():
        array = np.asarray(value, dtype=np.float64)
        if array.ndim > 1 or (array.ndim == 1 and len(array) != count):
            raise CryoForumError(f"CTF parameter {key} needs a scalar or {count} values, got shape {array.shape}")
        if not np.all(np.isfinite(array)):
            raise CryoForumError(f"CTF parameter {key} has non-finite values")
        arguments[key] = np.broadcast_to(array, (count,))
    return arguments


def ctf_signs(size: int, pixel_size: float, ctf_params: Mapping[str, Any], count: int) -> np.ndarray:
    """sign(CTF) [count, size, size] (float32, +1 where the CTF is zero) on the unshifted FFT grid.

    ctf_params maps :data:`CTF_KEYS` (defocus_u/v/angle required, the rest default as in compute_ctf) to a
    scalar or ``count`` values, one per particle.
    """
    arguments = _ctf_arguments(ctf_params, count)
    return np.where(compute_ctf(size, pixel_size, **arguments) < 0, -1.0, 1.0).astype(np.float32)


def phase_flip(images: np.ndarray, pixel_size: float, ctf_params: Mapping[str, Any]) -> np.ndarray:
    """Multiply each image's spectrum by the sign of its CTF (see :func:`ctf_signs`); float32 [N, D, D].

    pixel_size is that of ``images`` (A/px). :class:`Preprocessor` fuses this with the Fourier crop
    (:func:`flip_and_downsample`), which gives the same result as flipping at the input size first.
    """
    images = _as_batch(images)
    size = images.shape[-1]
    signs = ctf_signs(size, pixel_size, ctf_params, len(images))
    return fourier_crop_and_filter(images.astype(np.float32, copy=False), size, signs)


def flip_and_downsample(
    images: np.ndarray, pixel_size: float, size: int, ctf_params: Mapping[str, Any]
) -> tuple[np.ndarray, float]:
    """``downsample(phase_flip(images, pixel_size, ctf_params), pixel_size, size)`` in one pass.

    One FFT at the input size and sign(CTF) evaluated only on the kept frequencies (the cropped grid),
    which is several times cheaper than flipping at the input size. Returns float32 images and the new
    pixel size.
    """
    images = _as_batch(images)
    box = images.shape[-1]
    if not 0 < size <= box:
        raise CryoForumError(f"image_size {size} must be between 1 and the input box size {box}")
    new_pixel_size = float(pixel_size) * box / size
    signs = ctf_signs(size, new_pixel_size, ctf_params, len(images))
    return fourier_crop_and_filter(images.astype(np.float32, copy=False), size, signs), new_pixel_size


@dataclass(frozen=True)
class Preprocessor:
    """How raw particle images [N, input_size, input_size] become network inputs [N, image_size, image_size].

    It is also the ``images`` section of a run's settings: ``image_size`` None (the input box, at most
    DEFAULT_IMAGE_SIZE) and the data's ``pixel_size_in`` / ``input_size`` are filled in by :meth:`resolved` once
    the data are known. normalise: background normalisation outside ``background_radius * image_size / 2``.
    mask_radius: soft-mask radius as a fraction of image_size / 2 (None: no mask); mask_edge: cosine edge width
    in output pixels. phase_flip: flip by sign(CTF) at the input box (needs CTF parameters per call).
    """

    image_size: int | None = None
    normalise: bool = True
    background_radius: float = 0.85
    mask_radius: float | None = 0.9
    mask_edge: float = 3.0
    phase_flip: bool = False
    pixel_size_in: float | None = None
    input_size: int | None = None

    def __post_init__(self) -> None:
        if self.input_size is not None and (not isinstance(self.input_size, int | np.integer) or self.input_size < 1):
            raise InvalidSetting("input_size", f"must be a positive integer, got {self.input_size!r}")
        if self.image_size is not None:
            if not isinstance(self.image_size, int | np.integer) or self.image_size < 1:
                raise InvalidSetting("image_size", f"must be a positive integer, got {self.image_size!r}")
            if self.input_size is not None and self.image_size > self.input_size:
                raise InvalidSetting(
                    "image_size", f"must be at most the particles' box of {self.input_size} px, got {self.image_size}"
                )
        if self.pixel_size_in is not None and not (
            isinstance(self.pixel_size_in, float | int | np.number) and 0 < self.pixel_size_in < np.inf
        ):
            raise InvalidSetting("pixel_size_in", f"must be positive, got {self.pixel_size_in!r}")
        if not 0.0 < self.background_radius < 1.0:
            raise InvalidSetting("background_radius", f"must be in (0, 1), got {self.background_radius}")
        if self.mask_radius is not None and not 0.0 < self.mask_radius <= 1.0:
            raise InvalidSetting("mask_radius", f"must be in (0, 1] or None, got {self.mask_radius}")
        if not self.mask_edge >= 0:
            raise InvalidSetting("mask_edge", f"must not be negative, got {self.mask_edge}")

    def resolved(self, pixel_size: float, box: int) -> Preprocessor:
        """These settings for raw images of ``box`` px at ``pixel_size`` A (the image size chosen if unset)."""
        image_size = self.image_size or min(DEFAULT_IMAGE_SIZE, int(box))
        return dataclasses.replace(
            self, image_size=int(image_size), pixel_size_in=float(pixel_size), input_size=int(box)
        )

    @property
    def is_resolved(self) -> bool:
        return None not in (self.image_size, self.pixel_size_in, self.input_size)

    @property
    def output_pixel_size(self) -> float:
        """Pixel size of the output images in Angstrom."""
        return float(self.pixel_size_in) * self.input_size / self.image_size

    def __call__(
        self, images: np.ndarray, ctf_params: Mapping[str, Any] | None = None, origins: np.ndarray | None = None
    ) -> np.ndarray:
        """Preprocess images [N, input_size, input_size] -> float32 [N, image_size, image_size].

        ctf_params (see :data:`CTF_KEYS`) is required when phase_flip is set and ignored otherwise. ``origins``
        [N, 2] (x, y, px of the input images) re-centre the particles first: one appears at the box centre minus
        its origin, so its content is moved by +origin. Raises CryoForumError for a wrong shape, non-finite
        pixels or missing CTF parameters.
        """
        if not self.is_resolved:
            raise CryoForumError("the preprocessing does not know the images' box and pixel size yet (resolved())")
        images = _as_batch(images)
        if images.shape[-1] != self.input_size:
            raise CryoForumError(f"images are {images.shape[-1]} px but the preprocessing expects {self.input_size} px")
        if not np.all(np.isfinite(images)):
            raise CryoForumError("images contain NaN or infinite pixels")
        out = images.astype(np.float32, copy=False)
        if origins is not None and np.any(origins):
            out = translate_images(out, np.asarray(origins, dtype=np.float64))
        if self.phase_flip:
            if ctf_params is None:
                raise CryoForumError("phase flipping needs CTF parameters, and none were given")
            out, _ = flip_and_downsample(out, self.pixel_size_in, self.image_size, ctf_params)
        else:
            out, _ = downsample(out, self.pixel_size_in, self.image_size)
        if self.normalise:
            out = normalise_background(out, self.background_radius)
        if self.mask_radius is not None:
            out = apply_soft_mask(out, self.mask_radius * self.image_size / 2, self.mask_edge)
        return np.ascontiguousarray(out, dtype=np.float32)
