"""An HDF5 cache of preprocessed particle images, for sets read many times (``train --cache``).

The file holds dataset ``images`` [N, S, S] float32 (one chunk per image), each particle re-centred by its
origin, and, as attributes, a fingerprint of what it was made from: preprocessing options, particle names,
origins, a sample of raw images, the CTF when phase flipping. A cache that no longer matches its particles is
refused (or rebuilt on request), never used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.io.atomic import atomic_output, refuse_overwriting_inputs
from cryo_forum.io.particles import ParticleSet
from cryo_forum.progress import progress as progress_bar
from cryo_forum.streams.preprocess import CTF_KEYS, Preprocessor
from cryo_forum.streams.readers import ParticleLabels, check_indices, index_batches, read_batches
from cryo_forum.tensorflow_quiet import tf

CACHE_FORMAT = "cryo-forum image cache"
FORMAT_VERSION = 1
CACHE_DATASET = "images"
_SAMPLED_IMAGES = 8  # raw images hashed into a cache's fingerprint (catches a stack rewritten under the same names)


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
        "preprocessor": json.dumps(dataclasses.asdict(preprocessor), sort_keys=True),
        "n": n,
        "box": int(particles.box_size),
        "names_sha256": hashlib.sha256(names).hexdigest(),
        "sample_sha256": _digest(particles.images(sample)),
        "ctf_sha256": ctf,
        "origins_sha256": _digest(particles.shifts_px()),
    }


def _check_compatible(particles: ParticleSet, preprocessor: Preprocessor) -> None:
    if preprocessor.input_size != particles.box_size:
        raise CryoForumError(
            f"{particles.source}: images are {particles.box_size} px but the preprocessing expects "
            f"{preprocessor.input_size} px"
        )
    if preprocessor.phase_flip and not particles.has_ctf:
        raise CryoForumError(f"{particles.source}: phase flipping needs CTF parameters, and these particles have none")


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
    origins = particles.shifts_px()
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
            images[indices[0] : indices[-1] + 1] = preprocessor(raw, params, origins[indices])
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
    weights: np.ndarray | None = None,
) -> tf.data.Dataset:
    """:func:`~cryo_forum.streams.readers.particle_batches` with images [B, S, S] read from ``cache``, already
    preprocessed (pass ``preprocessor=None`` to :func:`~cryo_forum.streams.batch.to_model_batches`). Same
    orders for the same arguments and seed."""
    particles = cache.particles
    indices = check_indices(indices, len(particles), batch_size, drop_remainder)
    batches = index_batches(indices, int(batch_size), shuffle, seed, repeat, drop_remainder)
    return read_batches(cache.images, cache.image_size, ParticleLabels(particles, weights), batches)
