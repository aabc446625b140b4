"""Input pipeline: particle splits, tf.data streams of RawBatches, an HDF5 cache, augmentation, model inputs.

A *RawBatch* (see the estimator's interface notes) is a dict of batched tensors: ``images`` float32 [B, D, D]
(raw, source box D), ``quaternion`` float32 [B, 4] (pose A as [x, y, z, w], zeros without poses), ``outlier``
float32 [B], ``ctf`` (dict of float32 [B] keyed by :data:`CTF_KEYS`, only when the particles
have CTF parameters) and ``index`` int64 [B] (position in the ParticleSet). :func:`particle_batches` reads them
from the MRC stacks, :func:`cached_batches` from an HDF5 cache of preprocessed images (:func:`open_cache`);
either way memory stays flat in the stack size: only the per-particle numbers (tens of bytes each) are held.
:func:`prepare_for_model` turns RawBatches into the model's ``(images [B, S, S, 1], {"quaternion", "outlier"})``
and :func:`prediction_batches` streams ``(index, images)`` in particle order for prediction.

In-plane augmentation follows the convention pinned by tests/test_pipeline.py: rotating the image content by
+alpha (``cryo_forum.physics.fourier.rotate_images(images, +alpha)``) gives the projection at ``A' = Rz(alpha) A``, i.e.
``q' = q_z(alpha) (x) q`` (psi' = psi - alpha). Shifts move the content and leave the pose alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cryo_forum import geometry
from cryo_forum.choices import AUGMENT_METHODS
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.atomic import atomic_output, refuse_overwriting_inputs
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.fourier import rotate_images, translate_images
from cryo_forum.progress import progress as progress_bar
from cryo_forum.streams.preprocess import CTF_KEYS, Preprocessor
from cryo_forum.tensorflow_quiet import tf

SPLIT_NAMES = ("train", "val", "test")
SPLIT_FORMAT = "cryo-forum split"
CACHE_FORMAT = "cryo-forum image cache"
FORMAT_VERSION = 1
CACHE_DATASET = "images"
_SAMPLED_IMAGES = 8  # raw images hashed into a cache's fingerprint (catches a stack rewritten under the same names)
_AUTOTUNE = tf.data.AUTOTUNE

# ---------------------------------------------------------------- errors inside streams

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


# ---------------------------------------------------------------- splits


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Random split of particles 0..n-1 into {"train", "val", "test"}: sorted, disjoint int64 arrays covering all.

    Subset sizes are ``round(fraction * n)``; the same (n, fractions, seed) gives the same split. A fraction of 0
    gives an empty subset; a positive fraction too small to select one particle, negative fractions, fractions
    summing to 1 or more, or an empty training set raise CryoForumError naming the option.
    """
    if int(n) != n or n < 1:
        raise CryoForumError(f"cannot split {n} particles: need at least one")
    n = int(n)
    sizes = {}
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (np.isfinite(fraction) and fraction >= 0):
            raise InvalidSetting(name, f"must be a fraction >= 0, got {fraction}")
        sizes[name] = round(fraction * n)
        if fraction > 0 and sizes[name] == 0:
            raise InvalidSetting(name, f"{fraction} selects no particle of {n}; raise it or set it to 0")
    if val_fraction + test_fraction >= 1 or sizes["val_fraction"] + sizes["test_fraction"] >= n:
        raise InvalidSetting(
            "val_fraction", f"plus test_fraction ({val_fraction} + {test_fraction}) leaves no training particle of {n}"
        )
    order = np.random.default_rng(_check_seed(seed)).permutation(n)
    n_val, n_test = sizes["val_fraction"], sizes["test_fraction"]
    return {
        "train": np.sort(order[n_val + n_test :]),
        "val": np.sort(order[:n_val]),
        "test": np.sort(order[n_val : n_val + n_test]),
    }


def save_split(
    path: str | os.PathLike,
    split: Mapping[str, np.ndarray],
    particles: ParticleSet,
    *,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    seed: int | None = None,
) -> None:
    """Write ``split`` as JSON (atomically): fractions and seed (null when not given), source, n, and per subset
    the particle indices and their rlnImageName, so that :func:`load_split` can check it against a STAR file."""
    path = Path(path)
    n = len(particles)
    clean = _checked_split(split, n, str(path))
    names = particles.table[star.IMAGE_NAME].astype(str).to_numpy()
    document = {
        "format": SPLIT_FORMAT,
        "version": FORMAT_VERSION,
        "source": str(particles.source),
        "n": n,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "seed": seed,
        "subsets": {
            key: {"indices": indices.tolist(), "names": names[indices].tolist()} for key, indices in clean.items()
        },
    }
    refuse_overwriting_inputs(path, [particles.source])
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def load_split(path: str | os.PathLike, particles: ParticleSet | None = None) -> dict[str, np.ndarray]:
    """Read a split written by :func:`save_split` -> {"train", "val", "test"} sorted int64 index arrays.

    With ``particles`` the split must have been made for the same number of particles with the same
    rlnImageName at every index; any difference raises CryoForumError naming the file.
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CryoForumError(f"{path}: split file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CryoForumError(f"{path}: not a readable split file ({error})") from None
    if not isinstance(document, dict) or document.get("format") != SPLIT_FORMAT:
        raise CryoForumError(f"{path}: not a cryo-forum split file")
    if document.get("version") != FORMAT_VERSION:
        raise CryoForumError(f"{path}: split file version {document.get('version')} (this version reads 1)")
    try:
        n = int(document["n"])
        subsets = {key: document["subsets"][key] for key in SPLIT_NAMES}
        split = {key: np.asarray(subsets[key]["indices"], dtype=np.int64).reshape(-1) for key in SPLIT_NAMES}
        names = {key: [str(name) for name in subsets[key]["names"]] for key in SPLIT_NAMES}
    except (KeyError, TypeError, ValueError) as error:
        raise CryoForumError(f"{path}: malformed split file ({error!r} missing or invalid)") from None
    split = _checked_split(split, n, str(path))
    if any(len(names[key]) != len(split[key]) for key in SPLIT_NAMES):
        raise CryoForumError(f"{path}: malformed split file (names and indices differ in number)")
    if particles is not None:
        if len(particles) != n:
            raise CryoForumError(
                f"{path}: split made for {n} particles ({document.get('source')}) "
                f"but {particles.source} has {len(particles)}"
            )
        actual = particles.table[star.IMAGE_NAME].astype(str).to_numpy()
        for key in SPLIT_NAMES:
            differs = np.flatnonzero(actual[split[key]] != np.asarray(names[key], dtype=object))
            if differs.size:
                first = differs[0]
                raise CryoForumError(
                    f"{path}: split does not match {particles.source}: particle {split[key][first]} is "
                    f"{actual[split[key][first]]!r} there but {names[key][first]!r} in the split"
                )
    return split


def _checked_split(split: Mapping[str, np.ndarray], n: int, where: str) -> dict[str, np.ndarray]:
    """The three subsets as sorted int64 arrays; CryoForumError unless they are disjoint and lie in [0, n)."""
    if set(split) != set(SPLIT_NAMES):
        raise CryoForumError(f"{where}: a split has exactly the subsets {', '.join(SPLIT_NAMES)}")
    clean = {key: np.sort(np.asarray(split[key], dtype=np.int64).reshape(-1)) for key in SPLIT_NAMES}
    everything = np.concatenate(list(clean.values()))
    if everything.size and (everything.min() < 0 or everything.max() >= n):
        raise CryoForumError(f"{where}: split indices must lie in [0, {n})")
    if len(np.unique(everything)) != len(everything):
        raise CryoForumError(f"{where}: split subsets overlap or repeat particles")
    return clean


# ---------------------------------------------------------------- RawBatch streams


class _Labels:
    """Per-particle numbers of a RawBatch, held in memory: quaternion [N, 4], outlier [N], ctf [N, 8] or None."""

    def __init__(self, particles: ParticleSet):
        n = len(particles)
        self.quaternions = (
            particles.quaternions().astype(np.float32) if particles.has_poses else np.zeros((n, 4), np.float32)
        )
        outlier = particles.table.get(star.OUTLIER)
        self.outlier = (
            np.zeros(n, np.float32) if outlier is None else (outlier.fillna(0).to_numpy(np.float64) != 0)
        ).astype(np.float32)
        self.ctf: np.ndarray | None = None
        if particles.has_ctf:
            params = particles.ctf_parameters()
            self.ctf = np.stack([params[key] for key in CTF_KEYS], axis=-1).astype(np.float32)


def _check_seed(seed: int) -> int:
    if int(seed) != seed or seed < 0:
        raise CryoForumError(f"seed must be an integer >= 0, got {seed}")
    return int(seed)


def _check_indices(indices, n: int, batch_size: int, drop_remainder: bool) -> np.ndarray:
    if int(batch_size) != batch_size or batch_size < 1:
        raise CryoForumError(f"batch_size must be a positive integer, got {batch_size}")
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
        raise CryoForumError(
            f"batch_size {batch_size} is larger than the {len(indices)} particles selected: no full batch"
        )
    return indices


def _index_batches(
    indices: np.ndarray, batch_size: int, shuffle: bool, seed: int, repeat: bool, drop_remainder: bool
) -> tf.data.Dataset:
    """Batches of particle indices int64 [B]; each epoch (each pass, or each repetition) batched on its own.

    Shuffled orders are numpy permutations drawn from ``seed`` and a per-epoch number from
    ``tf.data.Dataset.random(seed, rerandomize_each_iteration=True)``: every epoch (also every new iteration
    over a finite dataset, as keras.Model.fit does) gets a new order, and the sequence of orders is the same
    in every run with the same seed.
    """
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


def _raw_batches(
    read: Callable[[np.ndarray], np.ndarray],
    size: int,
    labels: _Labels,
    indices: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int,
    repeat: bool,
    drop_remainder: bool,
) -> tf.data.Dataset:
    """RawBatches whose images [B, size, size] come from ``read(indices)`` (numpy, called in tf.numpy_function)."""
    seed = _check_seed(seed)
    has_ctf = labels.ctf is not None

    def load(batch: np.ndarray) -> list[np.ndarray]:
        arrays = [read(batch), labels.quaternions[batch], labels.outlier[batch]]
        return [*arrays, labels.ctf[batch]] if has_ctf else arrays

    def to_raw(batch: tf.Tensor) -> dict[str, Any]:
        outputs = tf.numpy_function(load, [batch], [tf.float32] * (4 if has_ctf else 3), stateful=False)
        rows = batch.shape[0]
        raw = {
            "images": tf.ensure_shape(outputs[0], [rows, size, size]),
            "quaternion": tf.ensure_shape(outputs[1], [rows, 4]),
            "outlier": tf.ensure_shape(outputs[2], [rows]),
            "index": batch,
        }
        if has_ctf:
            ctf = tf.ensure_shape(outputs[3], [rows, len(CTF_KEYS)])
            raw["ctf"] = {key: ctf[:, column] for column, key in enumerate(CTF_KEYS)}
        return raw

    batches = _index_batches(indices, batch_size, shuffle, seed, repeat, drop_remainder)
    return batches.map(to_raw, num_parallel_calls=_AUTOTUNE, deterministic=True).prefetch(_AUTOTUNE)


def particle_batches(
    particles: ParticleSet,
    indices=None,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    repeat: bool = False,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """RawBatches of the particles ``indices`` (all by default) with raw images [B, D, D] from the stacks.

    Without ``shuffle`` batches follow ``indices`` in order; with it every epoch is a new permutation,
    reproducible with ``seed``. ``repeat`` streams epochs forever (each epoch batched on its own, so a
    batch never holds a particle twice); ``drop_remainder`` drops each epoch's last partial batch and
    makes the batch size static. Images are read through :meth:`ParticleSet.images` (positioned reads; every
    stack's rows are read in ascending order and returned in batch order) inside tf.numpy_function.
    """
    indices = _check_indices(indices, len(particles), batch_size, drop_remainder)
    return _raw_batches(
        particles.images,
        particles.box_size,
        _Labels(particles),
        indices,
        int(batch_size),
        shuffle,
        seed,
        repeat,
        drop_remainder,
    )


# ---------------------------------------------------------------- HDF5 cache of preprocessed images


class ImageCache:
    """Preprocessed images of a ParticleSet in an HDF5 file (dataset ``images`` [N, S, S] float32, one chunk
    per image); made by :func:`build_cache` / :func:`open_cache`, read by :func:`cached_batches`."""

    def __init__(self, path: Path, particles: ParticleSet, preprocessor: Preprocessor):
        self.path = Path(path)
        self.particles = particles
        self.preprocessor = preprocessor
        self._file: h5py.File | None = None
        self._lock = threading.Lock()

    @property
    def image_size(self) -> int:
        return int(self.preprocessor.image_size)

    def images(self, indices) -> np.ndarray:
        """Images [n, S, S] float32 of particles ``indices`` in that order.

        Reads image by image in ascending order (h5py's fancy indexing is several times slower).
        """
        wanted, inverse = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        block = np.empty((len(wanted), self.image_size, self.image_size), dtype=np.float32)
        with self._lock:
            if self._file is None:
                self._file = h5py.File(self.path, "r")
            images = self._file[CACHE_DATASET]
            for row, index in enumerate(wanted):
                images.read_direct(block, np.s_[int(index)], np.s_[row])
        return block[inverse.reshape(-1)]

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _digest(*arrays: np.ndarray) -> str:
    hasher = hashlib.sha256()
    for array in arrays:
        hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()


def _fingerprint(particles: ParticleSet, preprocessor: Preprocessor) -> dict[str, Any]:
    """What a cache depends on: preprocessing options, particle names, a sample of raw images, CTF if flipped."""
    n = len(particles)
    names = "\n".join(particles.table[star.IMAGE_NAME].astype(str)).encode()
    sample = np.unique(np.linspace(0, n - 1, min(n, _SAMPLED_IMAGES)).round().astype(np.int64))
    ctf = ""
    if preprocessor.phase_flip:
        params = particles.ctf_parameters()
        ctf = _digest(*(params[key].astype(np.float64) for key in CTF_KEYS))
    return {
        "format": CACHE_FORMAT,
        "version": FORMAT_VERSION,
        "preprocessor": json.dumps(preprocessor.to_dict(), sort_keys=True),
        "n": n,
        "box": int(particles.box_size),
        "names_sha256": hashlib.sha256(names).hexdigest(),
        "sample_sha256": _digest(particles.images(sample)),
        "ctf_sha256": ctf,
    }


def _check_compatible(particles: ParticleSet, preprocessor: Preprocessor) -> None:
    if preprocessor.input_size != particles.box_size:
        raise CryoForumError(
            f"{particles.source}: images are {particles.box_size} px but preprocess.input_size is "
            f"{preprocessor.input_size}"
        )
    if preprocessor.phase_flip and not particles.has_ctf:
        raise CryoForumError(f"{particles.source}: preprocess.phase_flip is set but the particles have no CTF")


def build_cache(
    particles: ParticleSet,
    preprocessor: Preprocessor,
    path: str | os.PathLike,
    batch_size: int = 256,
    progress: bool = True,
) -> ImageCache:
    """Preprocess every particle into the HDF5 file ``path`` (written atomically, never over an input).

    Dataset ``images`` [N, S, S] float32, chunked by image; attributes: the preprocessor (JSON), source path,
    n, box and the fingerprint :func:`open_cache` compares. Memory stays at one batch of images.
    """
    path = Path(path)
    _check_compatible(particles, preprocessor)
    refuse_overwriting_inputs(path, [particles.source, *map(particles.resolve_stack, particles.stack_names)])
    attributes = {**_fingerprint(particles, preprocessor), "source": str(particles.source)}
    size = preprocessor.image_size
    ctf = particles.ctf_parameters() if preprocessor.phase_flip else None
    with (
        atomic_output(path) as tmp,
        h5py.File(tmp, "w") as handle,
        progress_bar(len(particles), description="cache", enabled=progress) as bar,
    ):
        images = handle.create_dataset(
            CACHE_DATASET, shape=(len(particles), size, size), dtype=np.float32, chunks=(1, size, size)
        )
        for indices, raw in particles.iter_batches(batch_size):
            params = None if ctf is None else {key: values[indices] for key, values in ctf.items()}
            images[indices[0] : indices[-1] + 1] = preprocessor(raw, params)
            bar.update(len(indices))
        images.attrs.update(attributes)
    return ImageCache(path, particles, preprocessor)


def open_cache(
    path: str | os.PathLike,
    particles: ParticleSet,
    preprocessor: Preprocessor,
    rebuild: bool = False,
    progress: bool = True,
) -> ImageCache:
    """The cache at ``path`` if it matches (particles and preprocessing); built first when it does not exist.

    A cache made for other particles (names, a sample of raw images, n, box, CTF when phase-flipping) or other
    preprocessing options raises CryoForumError naming the file and what differs, unless ``rebuild`` is set,
    in which case it is rebuilt. A file that is not a cryo-forum cache is never overwritten.
    """
    path = Path(path)
    _check_compatible(particles, preprocessor)
    if not path.exists():
        return build_cache(particles, preprocessor, path, progress=progress)
    try:
        with h5py.File(path, "r") as handle:
            stored = dict(handle[CACHE_DATASET].attrs)
            shape = handle[CACHE_DATASET].shape
    except (OSError, KeyError):
        raise CryoForumError(f"{path}: not a cryo-forum image cache (no HDF5 dataset {CACHE_DATASET!r})") from None
    if stored.get("format") != CACHE_FORMAT:
        raise CryoForumError(f"{path}: not a cryo-forum image cache; choose another cache path")
    expected = _fingerprint(particles, preprocessor)
    differs = [key for key, value in expected.items() if _plain(stored.get(key)) != value]
    if shape != (len(particles), preprocessor.image_size, preprocessor.image_size):
        differs.append("shape")
    if not differs:
        return ImageCache(path, particles, preprocessor)
    if rebuild:
        return build_cache(particles, preprocessor, path, progress=progress)
    raise CryoForumError(
        f"{path}: image cache was made for other {'/'.join(differs)} (from {_plain(stored.get('source'))}); "
        "delete it, rebuild it or choose another cache path"
    )


def _plain(value: Any) -> Any:
    """HDF5 attribute values as plain Python values (numpy scalars and bytes come back from h5py)."""
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


def cached_batches(
    cache: ImageCache,
    indices=None,
    batch_size: int = 64,
    shuffle: bool = False,
    seed: int = 0,
    repeat: bool = False,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """:func:`particle_batches` with images [B, S, S] read from ``cache``, already preprocessed: pass
    ``preprocessor=None`` to :func:`prepare_for_model`. Same orders for the same arguments and seed."""
    particles = cache.particles
    indices = _check_indices(indices, len(particles), batch_size, drop_remainder)
    return _raw_batches(
        cache.images,
        cache.image_size,
        _Labels(particles),
        indices,
        int(batch_size),
        shuffle,
        seed,
        repeat,
        drop_remainder,
    )


# ---------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class Augmentation:
    """Random in-plane rotation (pose updated to match) and small shifts (pose unchanged) of model inputs.

    rotate: turn every image by a uniform angle in [0, 2 pi) and set ``q' = q_z(alpha) (x) q``.
    max_shift_px: move the content by uniform (dx, dy) in [-max, max] pixels of the images augmented (the
    preprocessed size in :func:`prepare_for_model`); shifts are periodic with "fourier".
    method: "bilinear" (TF image transform: about 3 ms per batch of 64 at 64 px on this 2-core CPU, but the
    interpolation damps white noise to 0.45 of its variance on average) or "fourier"
    (:func:`cryo_forum.physics.fourier.rotate_images`: exact, keeps the noise spectrum, but about 45 ms per batch of 64
    at 64 px and 14 ms at 32 px, more than a training step). The default is "bilinear" for that reason.
    """

    rotate: bool = True
    max_shift_px: float = 0.0
    method: str = "bilinear"

    def __post_init__(self) -> None:
        if self.method not in AUGMENT_METHODS:
            raise CryoForumError(
                f"augmentation.method must be one of {', '.join(AUGMENT_METHODS)}, got {self.method!r}"
            )
        if not (np.isfinite(self.max_shift_px) and self.max_shift_px >= 0):
            raise CryoForumError(f"augmentation.max_shift_px must be >= 0, got {self.max_shift_px}")
        if not isinstance(self.rotate, bool | np.bool_):
            raise CryoForumError(f"augmentation.rotate must be true or false, got {self.rotate!r}")

    @property
    def active(self) -> bool:
        return bool(self.rotate) or self.max_shift_px > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (YAML-safe) that :meth:`from_dict` turns back into this Augmentation."""
        return {"rotate": bool(self.rotate), "max_shift_px": float(self.max_shift_px), "method": str(self.method)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Augmentation:
        """Rebuild from :meth:`to_dict` output (missing keys take defaults); unknown keys raise CryoForumError."""
        unknown = sorted(set(values) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise CryoForumError(f"augmentation: unknown options {unknown}")
        return cls(**values)

    def __call__(self, images: tf.Tensor, quaternions: tf.Tensor, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Augment images float32 [B, S, S] and their poses [B, 4]; ``seed`` int [2] (stateless random ops).

        Returns (images [B, S, S], quaternions [B, 4] canonical). The same seed gives the same result.
        """
        images = tf.convert_to_tensor(images, tf.float32)
        quaternions = tf.convert_to_tensor(quaternions, tf.float32)
        rows = tf.shape(images)[0]
        angle_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))
        angles = tf.zeros([rows])
        if self.rotate:
            angles = tf.random.stateless_uniform([rows], angle_seed, 0.0, 2.0 * np.pi)
        shifts = tf.random.stateless_uniform([rows, 2], shift_seed, -self.max_shift_px, self.max_shift_px)
        if self.method == "fourier":
            moved = self._fourier(images, angles, shifts)
        else:
            moved = _bilinear_transform(images, angles, shifts)
        if self.rotate:
            quaternions = rotate_poses_in_plane(quaternions, angles)
        return moved, quaternions

    def _fourier(self, images: tf.Tensor, angles: tf.Tensor, shifts: tf.Tensor) -> tf.Tensor:
        rotate, shift = bool(self.rotate), self.max_shift_px > 0

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
    half = 0.5 * tf.cast(angles, quaternions.dtype)
    zeros = tf.zeros_like(half)
    turn = tf.stack([zeros, zeros, tf.sin(half), tf.cos(half)], axis=-1)
    return geometry.canonical_quaternion_tf(geometry.quaternion_multiply_tf(turn, quaternions))


def _bilinear_transform(images: tf.Tensor, angles: tf.Tensor, shifts: tf.Tensor) -> tf.Tensor:
    """out(p) = in(Rz(-alpha)(p - shift - c) + c) by bilinear interpolation, zeros from outside; [B, S, S]."""
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


# ---------------------------------------------------------------- model inputs


def _preprocess(raw: Mapping[str, Any], preprocessor: Preprocessor) -> tf.Tensor:
    """Preprocessed images float32 [B, S, S] of a RawBatch (numpy Preprocessor in tf.numpy_function)."""
    images = raw["images"]
    if preprocessor.phase_flip:
        ctf = tf.stack([raw["ctf"][key] for key in CTF_KEYS], axis=-1)

        def run(batch: np.ndarray, params: np.ndarray) -> np.ndarray:
            return preprocessor(batch, {key: params[:, column] for column, key in enumerate(CTF_KEYS)})

        out = tf.numpy_function(run, [images, ctf], tf.float32, stateful=False)
    else:
        out = tf.numpy_function(preprocessor, [images], tf.float32, stateful=False)
    return tf.ensure_shape(out, [images.shape[0], preprocessor.image_size, preprocessor.image_size])


def _check_preprocessor(spec: Mapping[str, Any], preprocessor: Preprocessor | None) -> None:
    if preprocessor is None:
        return
    size = spec["images"].shape[-1]
    if size is not None and size != preprocessor.input_size:
        raise CryoForumError(f"images are {size} px but preprocess.input_size is {preprocessor.input_size}")
    if preprocessor.phase_flip and "ctf" not in spec:
        raise CryoForumError("preprocess.phase_flip is set but the particles have no CTF parameters")


def prepare_for_model(
    dataset: tf.data.Dataset,
    preprocessor: Preprocessor | None,
    augmentation: Augmentation | None,
    seed: int = 0,
) -> tf.data.Dataset:
    """RawBatches -> (images float32 [B, S, S, 1], {"quaternion": [B, 4], "outlier": [B]}) for the model.

    ``preprocessor`` None means the images are already preprocessed (:func:`cached_batches`, synthetic data).
    Augmentation runs after preprocessing, at the small size, with a per-batch seed from ``seed`` that changes
    every epoch and repeats across runs.
    """
    spec = dataset.element_spec
    _check_preprocessor(spec, preprocessor)
    augment = augmentation is not None and augmentation.active
    base_seed = _check_seed(seed)

    def to_model(raw: Mapping[str, Any], batch_seed: tf.Tensor | None = None):
        images = raw["images"] if preprocessor is None else _preprocess(raw, preprocessor)
        quaternions = raw["quaternion"]
        if augment:
            images, quaternions = augmentation(
                images, quaternions, tf.stack([tf.constant(base_seed, tf.int64), batch_seed])
            )
        return images[..., None], {"quaternion": quaternions, "outlier": raw["outlier"]}

    if augment:
        seeds = tf.data.Dataset.random(seed=base_seed, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, seeds))
    return dataset.map(to_model, num_parallel_calls=_AUTOTUNE, deterministic=True).prefetch(_AUTOTUNE)


def prediction_batches(
    particles: ParticleSet, preprocessor: Preprocessor | None, batch_size: int = 256, indices=None
) -> tf.data.Dataset:
    """(indices int64 [B], images float32 [B, S, S, 1]) over ``indices`` (all by default) in that order.

    Every particle is visited once; memory holds a few batches whatever the stack size.
    """
    raw = particle_batches(particles, indices, batch_size)
    _check_preprocessor(raw.element_spec, preprocessor)

    def to_prediction(batch: Mapping[str, Any]) -> tuple[tf.Tensor, tf.Tensor]:
        images = batch["images"] if preprocessor is None else _preprocess(batch, preprocessor)
        return batch["index"], images[..., None]

    return raw.map(to_prediction, num_parallel_calls=_AUTOTUNE, deterministic=True).prefetch(_AUTOTUNE)
