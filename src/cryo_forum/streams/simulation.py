"""Simulated data sets: particle files with known poses, CTF, shifts, noise and labelled outliers, and the
endless stream of simulated batches that training draws from a map.

Both stream the one forward model, :class:`cryo_forum.physics.renderer.ParticleRenderer` (its docstring states
the image model), chunk after chunk of particle indices: particle i of a seed is the same image (to float32
rounding) in a file written by :func:`write_simulation` and in batch ``i // batch_size`` of
:func:`simulated_batches` with that seed.
Each particle is an outlier with probability ``outlier_fraction`` and of a kind drawn uniformly from
``outlier_kinds``, so counts vary with the seed like binomial draws (before the one forward model, files had
exactly ``round(outlier_fraction * n)`` outliers, cycling through the kinds). A run without ``snr`` gives exactly
the signal of the same run with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cryo_forum import geometry, resources
from cryo_forum.errors import InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.atomic import atomic_directory, refuse_overwriting_inputs
from cryo_forum.io.maps import example_map_path, resample_volume
from cryo_forum.io.mrc import stack_writer, write_volume
from cryo_forum.physics.renderer import ParticleRenderer
from cryo_forum.physics.settings import INLIER_KIND, KINDS, OUTLIER_KINDS, SimulationSettings
from cryo_forum.physics.specimens import OUTLIER_MAP_KINDS, VARIANTS_PER_KIND
from cryo_forum.progress import progress as progress_bar
from cryo_forum.streams.batch import RawBatch
from cryo_forum.streams.preprocess import CTF_KEYS
from cryo_forum.tensorflow_quiet import tf

STACK_NAME = "particles.mrcs"
STAR_NAME = "particles.star"
VOLUME_NAME = "volume.mrc"
OUTPUT_NAMES = (STAR_NAME, STACK_NAME, VOLUME_NAME)
_TABLE_DRAWS = ("quaternion", "origin", *CTF_KEYS, "ctf_row", "subset", "kind")
_CTF_COLUMNS = {
    star.DEFOCUS_U: "defocus_u",
    star.DEFOCUS_V: "defocus_v",
    star.DEFOCUS_ANGLE: "defocus_angle",
    star.CTF_BFACTOR: "bfactor",
    star.PHASE_SHIFT: "phase_shift",
}
_OPTICS_COLUMNS = {
    star.VOLTAGE: "voltage",
    star.CS: "spherical_aberration",
    star.AMPLITUDE_CONTRAST: "amplitude_contrast",
}

__all__ = [
    "INLIER_KIND",
    "OUTLIER_KINDS",
    "SimulatedParticles",
    "SimulationSettings",
    "example_map_path",
    "require_resources",
    "simulate_particles",
    "simulated_batches",
    "write_simulation",
]


# ---------------------------------------------------------------- the particle table


def particle_tables(
    draws: dict[str, np.ndarray], settings: SimulationSettings, pixel_size: float, size: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.1 optics and particles tables of the renderer's draws (arrays of n particles): true angles,
    origins in A, CTF columns when ``ctf``, half sets and outlier labels.

    The optics block has one group of the settings' voltage, Cs and amplitude contrast, or with a ``ctf_table``
    one group per distinct (voltage, Cs, amplitude contrast) among the rows the particles drew."""
    n = len(draws["quaternion"])
    angles = geometry.quaternion_to_euler(draws["quaternion"].astype(np.float64))
    origins = draws["origin"].astype(np.float64)
    kinds = np.asarray(KINDS)[draws["kind"]]
    group_optics, groups = _optics_groups(draws, settings)
    optics = pd.DataFrame(
        {
            star.OPTICS_GROUP: np.arange(1, len(group_optics) + 1),
            star.OPTICS_GROUP_NAME: [f"opticsGroup{number}" for number in range(1, len(group_optics) + 1)],
            **{column: group_optics[:, number] for number, column in enumerate(_OPTICS_COLUMNS)},
            star.IMAGE_PIXEL_SIZE: float(pixel_size),
            star.IMAGE_SIZE: int(size),
            star.IMAGE_DIMENSIONALITY: 2,
        }
    )
    columns = {
        star.IMAGE_NAME: [f"{i + 1:06d}@{STACK_NAME}" for i in range(n)],
        star.OPTICS_GROUP: groups + 1,
        star.ANGLE_ROT: angles[:, 0],
        star.ANGLE_TILT: angles[:, 1],
        star.ANGLE_PSI: angles[:, 2],
        star.ORIGIN_X_ANGST: origins[:, 0] * pixel_size,
        star.ORIGIN_Y_ANGST: origins[:, 1] * pixel_size,
    }
    if settings.ctf:
        columns |= {key: draws[name].astype(np.float64) for key, name in _CTF_COLUMNS.items()}
    columns |= {
        star.RANDOM_SUBSET: draws["subset"].astype(int),
        star.OUTLIER: (kinds != INLIER_KIND).astype(int),
        star.OUTLIER_KIND: kinds,
    }
    return optics, pd.DataFrame(columns)


def _optics_groups(draws: dict[str, np.ndarray], settings: SimulationSettings) -> tuple[np.ndarray, np.ndarray]:
    """(voltage, Cs, amplitude contrast) of each optics group [G, 3] and each particle's group [n] (from 0)."""
    if settings.ctf_table is None:
        constants = [[settings.voltage, settings.cs, settings.amplitude_contrast]]
        return np.asarray(constants, dtype=np.float64), np.zeros(len(draws["quaternion"]), dtype=int)
    rows = np.asarray(settings.ctf_table, dtype=np.float64)[draws["ctf_row"]]
    optics = rows[:, [CTF_KEYS.index(name) for name in _OPTICS_COLUMNS.values()]]
    group_optics, groups = np.unique(optics, axis=0, return_inverse=True)
    return group_optics, groups.reshape(-1).astype(int)


# ---------------------------------------------------------------- streaming the renderer


def render_chunk(size: int, chunk_size: int = 256) -> int:
    """Images of D px rendered at once: ``chunk_size``, fewer for large boxes (``resources.CHUNK_VALUES`` pixels)."""
    return resources.chunk_of(chunk_size, size**2)


def _rendered(
    renderer: ParticleRenderer, n: int, chunk: int
) -> Iterator[tuple[slice, np.ndarray, dict[str, np.ndarray]]]:
    """(rows, images float32 [m, D, D], table draws) of particles 0 ... n - 1 of the settings' seed, ``chunk`` at a
    time; the last chunk is rendered whole and cut, so that every call has one shape (one compilation)."""
    chunk = min(chunk, n)
    for start in range(0, n, chunk):
        images, draws = renderer.render(np.arange(start, start + chunk), renderer.settings.seed)
        count = min(chunk, n - start)
        yield slice(start, start + count), images.numpy()[:count], {k: draws[k].numpy()[:count] for k in _TABLE_DRAWS}


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The table draws of consecutive chunks as arrays of all their particles."""
    return {key: np.concatenate([part[key] for part in parts]) for key in _TABLE_DRAWS}


# ---------------------------------------------------------------- public API


class SimulatedParticles(NamedTuple):
    """Images [n, D, D] float32 and the RELION 3.1 optics and particles tables describing them."""

    images: np.ndarray
    optics: pd.DataFrame
    particles: pd.DataFrame


def boxed_volume(volume: np.ndarray, pixel_size: float, size: int | None = None) -> np.ndarray:
    """The map [z, y, x] as simulated: float64 [D, D, D], padded or cropped about voxel D // 2 to ``size``."""
    volume = np.asarray(volume, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3-D [z, y, x], got shape {volume.shape}")
    size = volume.shape[0] if size is None else int(size)
    if volume.shape != (size,) * 3:
        volume = resample_volume(volume, pixel_size, pixel_size, size, center=False).astype(np.float64)
    return volume


def require_resources(settings: SimulationSettings, size: int, out_dir: str | Path | None = None) -> None:
    """Refuse, before anything is allocated, a simulation of ``size`` px particles that cannot fit.

    Raises :class:`~cryo_forum.errors.InvalidSetting` naming ``size`` when the spectrum tables of the map (and of
    its decoy and broken variants) and the rendering of a chunk exceed the available memory, and ``n`` when the
    files would not fit on ``out_dir``'s file system or the particles' table (in memory, without ``out_dir``:
    and their images) would not fit in memory. The costs are those of :mod:`cryo_forum.resources`.
    """
    if not (int(size) == size and size > 0):
        raise InvalidSetting("size", f"must be a positive number of pixels, got {size}")
    size, n = int(size), int(settings.n)
    box, projectors = _box_memory(settings, size)
    resources.require_memory("size", box, f"a {size} px box", f"{projectors} and rendering")
    table = n * resources.TABLE_BYTES_PER_PARTICLE
    if out_dir is None:
        needed = box + table + resources.stack_bytes(n, size)
        purpose = f"their images, table and {projectors}"
        resources.require_memory("n", needed, f"simulating {n} particles of {size} px in memory", purpose)
        return
    files = resources.stack_bytes(n, size) + n * resources.STAR_BYTES_PER_PARTICLE + 4 * size**3
    resources.require_disk("n", files, out_dir, f"{n} particles of {size} px")
    resources.require_memory("n", box + table, f"simulating {n} particles", f"their table and {projectors}")


def _box_memory(settings: SimulationSettings, size: int) -> tuple[int, str]:
    """Bytes a D px box needs whatever n (spectrum tables, map copies, outlier maps, a chunk's rendering) and what
    for."""
    variants = VARIANTS_PER_KIND * len(set(OUTLIER_MAP_KINDS) & set(settings.drawn_kinds()))
    canvas = sum(kind in ("off_centre", "ice") for kind in settings.outlier_kinds) / len(settings.outlier_kinds)
    needed = (
        (1 + variants) * resources.projector_bytes(size)
        + resources.map_bytes(size)
        + (resources.outlier_map_bytes(size) if variants else 0)
        + resources.render_bytes(size, render_chunk(size), settings.outlier_fraction * canvas)
    )
    return needed, f"the projectors of the map and its {variants} outlier maps" if variants else "the projector"


def _prepare(
    volume: np.ndarray, pixel_size: float, size: int | None, options: dict, out_dir: Path | None = None
) -> tuple[SimulationSettings, np.ndarray, ParticleRenderer]:
    settings = SimulationSettings(**options)
    settings.validate()
    require_resources(settings, np.shape(volume)[0] if size is None else size, out_dir)
    volume = boxed_volume(volume, pixel_size, size)
    return settings, volume, ParticleRenderer(volume, pixel_size, settings)


def simulate_particles(
    volume: np.ndarray, pixel_size: float, n: int, size: int | None = None, **options
) -> SimulatedParticles:
    """Simulate ``n`` particles of a map [z, y, x] (padded or cropped about voxel D // 2 to ``size``) in memory.

    ``options`` are the :class:`SimulationSettings` fields, e.g. ``snr=0.1, ctf=True, defocus_range=(1e4,
    2.5e4), bfactor=(0, 100), max_shift_px=3, outlier_fraction=0.1, symmetry="D2", seed=0``. A request that would
    not fit in memory is refused first (:func:`require_resources`).
    """
    settings, volume, renderer = _prepare(volume, pixel_size, size, {"n": n, **options})
    size = volume.shape[0]
    images = np.empty((settings.n, size, size), dtype=np.float32)
    parts = []
    for rows, chunk, draws in _rendered(renderer, settings.n, render_chunk(size)):
        images[rows] = chunk
        parts.append(draws)
    optics, particles = particle_tables(_joined(parts), settings, pixel_size, size)
    return SimulatedParticles(images, optics, particles)


def write_simulation(
    out_dir: str | Path,
    volume: np.ndarray,
    pixel_size: float,
    n: int,
    size: int | None = None,
    chunk_size: int = 256,
    progress: bool = False,
    inputs: tuple = (),
    **options,
) -> Path:
    """Write ``particles.mrcs``, ``particles.star`` (RELION 3.1) and ``volume.mrc`` (the map used) into out_dir.

    Images are rendered and written ``chunk_size`` at a time (fewer for large boxes: memory does not grow with
    n) and identical to :func:`simulate_particles` with the same arguments. The three files appear together or
    not at all, never over one of ``inputs``. ``progress`` shows progress on stderr. A request that would not fit
    in memory or on disk is refused first (:func:`require_resources`).
    """
    out_dir = Path(out_dir)
    for name in OUTPUT_NAMES:
        refuse_overwriting_inputs(out_dir / name, inputs)
    settings, volume, renderer = _prepare(volume, pixel_size, size, {"n": n, **options}, out_dir)
    size = volume.shape[0]
    parts = []
    with atomic_directory(out_dir) as staging:
        with (
            stack_writer(staging / STACK_NAME, settings.n, size, pixel_size) as stack,
            progress_bar(settings.n, description="simulate", enabled=progress) as bar,
        ):
            for rows, images, draws in _rendered(renderer, settings.n, render_chunk(size, chunk_size)):
                stack[rows] = images
                parts.append(draws)
                bar.update(len(images))
        optics, particles = particle_tables(_joined(parts), settings, pixel_size, size)
        star.write_star(
            staging / STAR_NAME, {star.OPTICS_BLOCK: optics, star.PARTICLES_BLOCK: particles}, version=30001
        )
        write_volume(staging / VOLUME_NAME, volume, pixel_size)
    return out_dir


@dataclass(frozen=True)
class SNRCurriculum:
    """Training particles that start clearer than the data: the SNR falls geometrically from ``start_snr`` at
    batch 0 to the stream's own SNR at batch ``ramp_steps`` and stays there. At an SNR of 0.1 a network learns
    features slowly; seen first at a high SNR, the same particles teach them in a fraction of the epochs."""

    start_snr: float
    ramp_steps: int

    def noise_factor(self, step: tf.Tensor, snr: float) -> tf.Tensor:
        """The factor on the noise of batch ``step`` (float32 scalar): ``sqrt(snr / SNR(step))``."""
        progress = tf.minimum(tf.cast(step, tf.float32) / float(max(self.ramp_steps, 1)), 1.0)
        log_ratio = math.log(max(self.start_snr, snr) / snr)
        return tf.exp(-0.5 * log_ratio * (1.0 - progress))


def simulated_batches(
    volume: np.ndarray,
    pixel_size: float,
    settings: SimulationSettings,
    batch_size: int,
    seed: int,
    start: int = 0,
    curriculum: SNRCurriculum | None = None,
) -> tf.data.Dataset:
    """Endless tf.data.Dataset of :class:`~cryo_forum.streams.batch.RawBatch` of particles simulated from a map.

    Batch k holds particles ``k * batch_size`` to ``(k + 1) * batch_size - 1`` of the stream of ``seed`` (the
    images :func:`write_simulation` writes with ``seed=seed``), from batch ``start`` on. ``settings.seed`` fixes
    the outlier maps and the noise level; ``settings.n`` is unused. ``index`` is the particle's index in the
    stream; the CTF columns are the particles' drawn parameters (a ctf_table row each when the settings have
    one), zeros without ``settings.ctf``. With a ``curriculum`` the noise of batch k is scaled to its SNR.
    """
    settings.validate()
    volume = boxed_volume(volume, pixel_size)
    renderer = ParticleRenderer(volume, pixel_size, settings)
    size, seed = volume.shape[0], int(seed)

    def batch(step: tf.Tensor) -> RawBatch:
        index = step * batch_size + tf.range(batch_size, dtype=tf.int64)
        factor = 1.0 if curriculum is None else curriculum.noise_factor(step, settings.snr)
        images, draws = renderer.render(index, seed, factor)
        columns = [draws[key] for key in CTF_KEYS]
        ctf = tf.stack(columns, axis=-1) if settings.ctf else tf.zeros([batch_size, len(CTF_KEYS)])
        return RawBatch(
            images=tf.ensure_shape(images, [batch_size, size, size]),
            quaternion=tf.ensure_shape(draws["quaternion"], [batch_size, 4]),
            origin=tf.ensure_shape(tf.cast(draws["origin"], tf.float32), [batch_size, 2]),
            outlier=tf.ensure_shape(tf.cast(draws["kind"] != 0, tf.float32), [batch_size]),
            ctf=tf.ensure_shape(ctf, [batch_size, len(CTF_KEYS)]),
            index=index,
            weight=tf.ones([batch_size]),
        )

    return tf.data.Dataset.counter(int(start)).map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
