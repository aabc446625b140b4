"""The batch contract between data streams and the model, and the step from one to the other.

Every data stream (particles read from stacks, an HDF5 cache, particles simulated on the fly) yields
:class:`RawBatch` elements; :func:`to_model_batches` preprocesses (and optionally augments) them into the
:class:`ModelBatch` elements that :class:`~cryo_forum.model.estimator.OrientationEstimator` trains and
validates on. Both are NamedTuples of tensors, so tf.data and Keras carry them as they are.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cryo_forum.errors import CryoForumError
from cryo_forum.streams.augment import Augmentation
from cryo_forum.streams.preprocess import CTF_KEYS, Preprocessor
from cryo_forum.tensorflow_quiet import tf

AUTOTUNE = tf.data.AUTOTUNE


class RawBatch(NamedTuple):
    """Particles as a stream delivers them, before preprocessing (B particles, source box D)."""

    images: tf.Tensor  # float32 [B, D, D]: raw images (or, from a cache, already preprocessed [B, S, S])
    quaternion: tf.Tensor  # float32 [B, 4]: pose A as [x, y, z, w]; zeros for particles without poses
    origin: tf.Tensor  # float32 [B, 2]: origin (x, y) in px; the particle appears at the box centre minus it
    outlier: tf.Tensor  # float32 [B]: 1 for a labelled outlier, else 0
    ctf: tf.Tensor  # float32 [B, len(CTF_KEYS)]: CTF parameters in CTF_KEYS order; zeros where unknown
    index: tf.Tensor  # int64 [B]: the particle's index in its set or stream
    weight: tf.Tensor  # float32 [B]: the particle's weight in the losses (1, or less for over-represented views)


class Targets(NamedTuple):
    """What the model learns from: the true poses and the outlier labels."""

    quaternion: tf.Tensor  # float32 [B, 4]
    outlier: tf.Tensor  # float32 [B]
    weight: tf.Tensor  # float32 [B]


class ModelBatch(NamedTuple):
    """Preprocessed images and their targets: Keras unpacks it as (x, y)."""

    images: tf.Tensor  # float32 [B, S, S, 1]
    targets: Targets


def preprocess_images(raw: RawBatch, preprocessor: Preprocessor, recentre: bool = False) -> tf.Tensor:
    """Preprocessed images float32 [B, S, S] of a RawBatch (the NumPy Preprocessor inside tf.numpy_function);
    with ``recentre`` each particle is first moved back by its origin."""

    def run(images: np.ndarray, ctf: np.ndarray, origins: np.ndarray) -> np.ndarray:
        params = {key: ctf[:, column] for column, key in enumerate(CTF_KEYS)} if preprocessor.phase_flip else None
        return preprocessor(images, params, origins if recentre else None)

    out = tf.numpy_function(run, [raw.images, raw.ctf, raw.origin], tf.float32, stateful=False)
    return tf.ensure_shape(out, [raw.images.shape[0], preprocessor.image_size, preprocessor.image_size])


def check_preprocessor(spec: RawBatch, preprocessor: Preprocessor | None, has_ctf: bool) -> None:
    """CryoForumError when a stream's images do not fit ``preprocessor`` (None: already preprocessed)."""
    if preprocessor is None:
        return
    size = spec.images.shape[-1]
    if size is not None and size != preprocessor.input_size:
        raise CryoForumError(f"images are {size} px but the preprocessing expects {preprocessor.input_size} px")
    if preprocessor.phase_flip and not has_ctf:
        raise CryoForumError("phase flipping needs CTF parameters, and these particles have none")


def to_model_batches(
    dataset: tf.data.Dataset,
    preprocessor: Preprocessor | None,
    augmentation: Augmentation | None = None,
    seed: int = 0,
    has_ctf: bool = True,
    recentre: bool = False,
) -> tf.data.Dataset:
    """RawBatches -> ModelBatches: preprocessed images [B, S, S, 1] and their Targets.

    ``preprocessor`` None means the images are preprocessed already (an HDF5 cache). ``recentre`` moves each
    particle back by its origin before anything else (particles with consensus origins). Augmentation runs after
    preprocessing, at the small size, with a per-batch seed from ``seed`` that changes every epoch and repeats
    across runs.
    """
    check_preprocessor(dataset.element_spec, preprocessor, has_ctf)
    augment = augmentation is not None and augmentation.active
    base = tf.constant(int(seed), tf.int64)

    def convert(raw: RawBatch, batch_seed: tf.Tensor | None = None) -> ModelBatch:
        images = raw.images if preprocessor is None else preprocess_images(raw, preprocessor, recentre)
        quaternions = raw.quaternion
        if augment:
            images, quaternions = augmentation(images, quaternions, tf.stack([base, batch_seed]))
        return ModelBatch(images[..., None], Targets(quaternions, raw.outlier, raw.weight))

    if augment:
        seeds = tf.data.Dataset.random(seed=int(seed), rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, seeds))
    return dataset.map(convert, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)
