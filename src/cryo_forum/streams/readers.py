"""Particles read from their stacks as a tf.data stream of :class:`~cryo_forum.streams.batch.RawBatch`.

Images are read through :meth:`cryo_forum.io.particles.ParticleSet.images` (positioned reads, no memory map)
inside ``tf.numpy_function``; only the per-particle numbers (pose, origin, outlier label, CTF: tens of bytes
each) are held in memory, so memory stays flat in the stack size. A reading error inside the stream (a NaN
pixel, a truncated stack) reaches the caller as that error through :func:`stream_errors`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator

import numpy as np

from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.particles import ParticleSet
from cryo_forum.streams.batch import AUTOTUNE, RawBatch, preprocess_images
from cryo_forum.streams.preprocess import CTF_KEYS, Preprocessor
from cryo_forum.tensorflow_quiet import tf

_STREAM_ERROR = re.compile(r"(?:CryoForumError|InvalidSetting): (.+?)\n")


@contextlib.contextmanager
def stream_errors() -> Iterator[None]:
    """Turn a CryoForumError raised while tf.data read particles back into itself.

    Inside ``tf.numpy_function`` it becomes a TensorFlow ``OpError`` whose message quotes it; re-raised as a
    CryoForumError (its traceback dropped) it reaches the user as one line, and the stream's iterator is freed
    while the program still runs instead of at interpreter exit, where its threads would deadlock.
    """
    try:
        yield
    except tf.errors.OpError as error:
        found = _STREAM_ERROR.search(error.message + "\n")
        if found is None:
            raise
        raise CryoForumError(found.group(1).strip()) from None


class ParticleLabels:
    """Per-particle numbers of a set, held in memory as float32: quaternion [N, 4], origin [N, 2] (px),
    outlier [N], ctf [N, len(CTF_KEYS)] (zeros without CTF parameters), weight [N] (ones unless given)."""

    def __init__(self, particles: ParticleSet, weights: np.ndarray | None = None, origins: np.ndarray | None = None):
        n = len(particles)
        self.has_ctf = particles.has_ctf
        self.quaternion = particles.quaternions() if particles.has_poses else np.zeros((n, 4))
        self.origin = particles.shifts_px() if origins is None else origins
        outlier = particles.table.get(star.OUTLIER)
        self.outlier = np.zeros(n) if outlier is None else (outlier.fillna(0).to_numpy(np.float64) != 0)
        self.ctf = np.zeros((n, len(CTF_KEYS)))
        if particles.has_ctf:
            params = particles.ctf_parameters()
            self.ctf = np.stack([params[key] for key in CTF_KEYS], axis=-1)
        self.weight = np.ones(n) if weights is None else weights
        for name in ("quaternion", "origin", "outlier", "ctf", "weight"):
            setattr(self, name, np.asarray(getattr(self, name), dtype=np.float32))

    def rows(self, batch: np.ndarray) -> list[np.ndarray]:
        return [self.quaternion[batch], self.origin[batch], self.outlier[batch], self.ctf[batch], self.weight[batch]]


def check_indices(indices, n: int, batch_size: int, drop_remainder: bool) -> np.ndarray:
    """Particle indices int64 (all, a list or a boolean mask); CryoForumError for an empty or invalid selection."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise InvalidSetting("batch_size", f"must be a positive integer, got {batch_size}")
    if indices is None:
        indices = np.arange(n, dtype=np.int64)
    elif np.asarray(indices).dtype == bool:
        mask = np.asarray(indices)
        if mask.shape != (n,):
            raise CryoForumError(f"a particle mask needs {n} values, got shape {mask.shape}")
        indices = np.flatnonzero(mask)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not indices.size:
        raise CryoForumError("no particles selected for the data stream")
    if indices.min() < 0 or indices.max() >= n:
        raise CryoForumError(f"particle indices must lie in [0, {n})")
    if drop_remainder and batch_size > len(indices):
        raise InvalidSetting("batch_size", f"{batch_size} is more than the {len(indices)} particles selected")
    return indices


def index_batches(
    indices: np.ndarray, batch_size: int, shuffle: bool, seed: int, repeat: bool, drop_remainder: bool
) -> tf.data.Dataset:
    """Batches of particle indices int64 [B]; each epoch (each pass, or each repetition) batched on its own.

    Shuffled orders are numpy permutations drawn from ``seed`` and a per-epoch number from
    ``tf.data.Dataset.random(seed, rerandomize_each_iteration=True)``: every epoch (also every new iteration
    over a finite dataset, as keras.Model.fit does) gets a new order, and the sequence of orders is the same
    in every run with the same seed.
    """
    if int(seed) != seed or seed < 0:
        raise InvalidSetting("seed", f"must be an integer >= 0, got {seed}")
    seed = int(seed)
    if not shuffle:
        batches = tf.data.Dataset.from_tensor_slices(indices).batch(batch_size, drop_remainder=drop_remainder)
        return batches.repeat() if repeat else batches

    def permute(epoch_seed: np.int64) -> np.ndarray:
        return indices[np.random.default_rng([seed, int(epoch_seed) % 2**63]).permutation(len(indices))]

    def epoch(epoch_seed: tf.Tensor) -> tf.data.Dataset:
        order = tf.numpy_function(permute, [epoch_seed], tf.int64, stateful=False)
        order = tf.ensure_shape(order, [len(indices)])
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder=drop_remainder)

    epoch_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return (epoch_seeds if repeat else epoch_seeds.take(1)).flat_map(epoch)


def read_batches(
    read: Callable[[np.ndarray], np.ndarray], size: int, labels: ParticleLabels, batches: tf.data.Dataset
) -> tf.data.Dataset:
    """RawBatches for batches of indices, images [B, size, size] from ``read(indices)`` (NumPy, in tf.data)."""

    def load(batch: np.ndarray) -> list[np.ndarray]:
        return [read(batch), *labels.rows(batch)]

    def to_raw(batch: tf.Tensor) -> RawBatch:
        images, quaternion, origin, outlier, ctf, weight = tf.numpy_function(
            load, [batch], [tf.float32] * 6, stateful=False
        )
        rows = batch.shape[0]
        return RawBatch(
            images=tf.ensure_shape(images, [rows, size, size]),
            quaternion=tf.ensure_shape(quaternion, [rows, 4]),
            origin=tf.ensure_shape(origin, [rows, 2]),
            outlier=tf.ensure_shape(outlier, [rows]),
            ctf=tf.ensure_shape(ctf, [rows, len(CTF_KEYS)]),
            index=batch,
            weight=tf.ensure_shape(weight, [rows]),
        )

    return batches.map(to_raw, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)


def particle_batches(
    particles: ParticleSet,
    indices=None,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    repeat: bool = False,
    drop_remainder: bool = False,
    weights: np.ndarray | None = None,
    origins: np.ndarray | None = None,
) -> tf.data.Dataset:
    """RawBatches of the particles ``indices`` (all by default) with raw images [B, D, D] from the stacks.

    Without ``shuffle`` batches follow ``indices`` in order; with it every epoch is a new permutation,
    reproducible with ``seed``. ``repeat`` streams epochs forever (each epoch batched on its own, so a
    batch never holds a particle twice); ``drop_remainder`` drops each epoch's last partial batch and
    makes the batch size static. ``weights`` [N] (per particle of the set) become the batches' loss weights;
    ``origins`` [N, 2] (px) replace the set's own.
    """
    indices = check_indices(indices, len(particles), batch_size, drop_remainder)
    batches = index_batches(indices, int(batch_size), shuffle, seed, repeat, drop_remainder)
    labels = ParticleLabels(particles, weights, origins)
    return read_batches(particles.images, particles.box_size, labels, batches)


def prediction_batches(
    particles: ParticleSet,
    preprocessor: Preprocessor,
    batch_size: int = 256,
    indices=None,
    recentre: bool = True,
    origins: np.ndarray | None = None,
) -> tf.data.Dataset:
    """(indices int64 [B], images float32 [B, S, S, 1]) over ``indices`` (all by default) in that order.

    Particles with origins (the set's own, or ``origins`` [N, 2] px) are re-centred by them (``recentre``); every
    particle is visited once; memory holds a few batches whatever the stack size.
    """
    if preprocessor.input_size != particles.box_size:
        raise CryoForumError(
            f"{particles.source}: images are {particles.box_size} px but the preprocessing expects "
            f"{preprocessor.input_size} px"
        )
    if preprocessor.phase_flip and not particles.has_ctf:
        raise CryoForumError(f"{particles.source}: phase flipping needs CTF parameters, and these particles have none")

    def to_prediction(batch: RawBatch) -> tuple[tf.Tensor, tf.Tensor]:
        return batch.index, preprocess_images(batch, preprocessor, recentre)[..., None]

    raw = particle_batches(particles, indices, batch_size, origins=origins)
    return raw.map(to_prediction, num_parallel_calls=AUTOTUNE, deterministic=True).prefetch(AUTOTUNE)
