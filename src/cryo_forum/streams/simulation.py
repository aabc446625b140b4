"""Simulated particle images with known poses, CTF, shifts, noise and labelled outliers.

A particle image is the Fourier-slice projection of the map at a pose drawn uniformly from SO(3) (optionally
reduced to the asymmetric unit of a point group), moved so that it appears at ``box centre - origin``
(``translate_images(projection, -origin_px)``, as RELION's ``rlnOriginX/YAngst`` re-centre it), multiplied in
Fourier space by the CTF of its defocus U/V/angle (:func:`cryo_forum.physics.ctf.compute_ctf`) and given white
Gaussian noise with ``SNR = var(signal) / var(noise)`` over the box. The noise level is one for the whole
data set (as a constant dose gives), set from the mean signal variance of 256 pilot particles drawn like the
real ones, so signal variance varies with orientation as in real data.

Outliers replace a chosen fraction of the particles and are labelled (``cfIsOutlier``, ``cfOutlierKind``):

* ``noise``: noise only (in a noise-free data set: noise with the signal's standard deviation);
* ``decoy``: another molecule, a pseudo-molecule of Gaussian blobs with the map's size, shape and mass;
* ``broken``: the map cut by a random plane near its centre (a dissociated or damaged particle);
* ``off_centre``: the particle displaced by 25-40 % of the box (a bad pick);
* ``ice``: smooth blobs and an occasional straight edge, 1-3 times the signal's contrast (ice, carbon).

Every outlier gets the same CTF and noise as a particle, except that ``noise`` has no signal to transfer.
Everything is drawn from ``seed``: the particle table from one stream, each image's noise and outlier shape
from a stream of its own, so images do not depend on how they are batched, and a run without ``snr`` gives
exactly the signal of the same run with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from cryo_forum import geometry, resources
from cryo_forum.errors import InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.atomic import atomic_directory, refuse_overwriting_inputs
from cryo_forum.io.maps import center_of_mass, example_map_path, resample_volume
from cryo_forum.io.mrc import stack_writer, write_volume
from cryo_forum.physics.ctf import compute_ctf
from cryo_forum.physics.fourier import translate_images
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.progress import progress as progress_bar

OUTLIER_KINDS = ("noise", "decoy", "broken", "off_centre", "ice")
INLIER_KIND = "none"
STACK_NAME = "particles.mrcs"
STAR_NAME = "particles.star"
VOLUME_NAME = "volume.mrc"
OUTPUT_NAMES = (STAR_NAME, STACK_NAME, VOLUME_NAME)
PILOT_PARTICLES = 256
VARIANTS_PER_KIND = 2  # distinct decoy molecules and broken maps
_TABLE_STREAM, _PILOT_STREAM, _IMAGE_STREAM, _VARIANT_STREAM = 0, 1, 2, 3

__all__ = [
    "OUTLIER_KINDS",
    "SimulatedParticles",
    "SimulationSettings",
    "example_map_path",
    "require_resources",
    "simulate_particles",
    "write_simulation",
]


@dataclass(frozen=True)
class SimulationSettings:
    """What to simulate. Defocus and astigmatism in A, voltage in kV, Cs in mm, B-factor in A^2, shifts in px.

    ``astigmatism`` is the largest ``defocus_u - defocus_v``; ``bfactor`` is one value or a (min, max) range;
    origins are uniform in ``[-shift_px, shift_px]`` along x and y; ``snr=None`` means no noise.
    """

    n: int
    snr: float | None = None
    ctf: bool = True
    defocus_range: tuple[float, float] = (10000.0, 25000.0)
    astigmatism: float = 1000.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor: float | tuple[float, float] = 0.0
    shift_px: float = 0.0
    outlier_fraction: float = 0.0
    outlier_kinds: tuple[str, ...] = OUTLIER_KINDS
    symmetry: str = "C1"
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`~cryo_forum.errors.InvalidSetting` naming the first field out of range."""
        checks = [
            ("n", int(self.n) == self.n and self.n > 0, f"must be a positive integer, got {self.n}"),
            ("snr", self.snr is None or self.snr > 0, f"must be positive, got {self.snr}"),
            (
                "defocus_range",
                0 <= self.defocus_range[0] <= self.defocus_range[1],
                f"needs 0 <= MIN <= MAX (A), got {tuple(self.defocus_range)}",
            ),
            ("astigmatism", self.astigmatism >= 0, f"must be >= 0, got {self.astigmatism}"),
            ("voltage", self.voltage > 0, f"must be positive (kV), got {self.voltage}"),
            ("cs", self.cs >= 0, f"must be >= 0 (mm), got {self.cs}"),
            (
                "amplitude_contrast",
                0 <= self.amplitude_contrast < 1,
                f"must be in [0, 1), got {self.amplitude_contrast}",
            ),
            (
                "bfactor",
                0 <= self.bfactor_range[0] <= self.bfactor_range[1],
                f"needs 0 <= B or 0 <= MIN <= MAX, got {self.bfactor}",
            ),
            ("shift_px", self.shift_px >= 0, f"must be >= 0, got {self.shift_px}"),
            (
                "outlier_fraction",
                0 <= self.outlier_fraction <= 1,
                f"must be in [0, 1], got {self.outlier_fraction}",
            ),
            (
                "outlier_kinds",
                len(self.outlier_kinds) > 0 and set(self.outlier_kinds) <= set(OUTLIER_KINDS),
                f"choose from {', '.join(OUTLIER_KINDS)}, got {', '.join(self.outlier_kinds) or 'none'}",
            ),
        ]
        for field, ok, message in checks:
            if not ok:
                raise InvalidSetting(field, message)
        try:
            geometry.normalise_symmetry_name(self.symmetry)
        except ValueError as error:
            raise InvalidSetting("symmetry", str(error)) from None

    @property
    def bfactor_range(self) -> tuple[float, float]:
        low, high = np.broadcast_to(np.asarray(self.bfactor, dtype=np.float64), (2,))
        return float(low), float(high)

    def drawn_kinds(self) -> tuple[str, ...]:
        """The outlier kinds that occur: the first of ``outlier_kinds`` when there are fewer outliers than kinds."""
        return self.outlier_kinds[: min(round(self.outlier_fraction * self.n), len(self.outlier_kinds))]


@dataclass(frozen=True)
class ParticleDraws:
    """The random choices behind each particle: arrays of length n (origins [n, 2] in px, x then y)."""

    quaternions: np.ndarray
    origins_px: np.ndarray
    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    bfactor: np.ndarray
    subset: np.ndarray
    kinds: np.ndarray


def draw_particles(settings: SimulationSettings, rng: np.random.Generator, n: int | None = None) -> ParticleDraws:
    """Poses, CTF parameters, origins, half-set and outlier kind of ``n`` (default settings.n) particles.

    All quantities are drawn whatever the settings switch off, so two runs that differ only in, say, the
    CTF or the noise share their poses and shifts.
    """
    n = settings.n if n is None else n
    quaternions = geometry.random_quaternions(n, rng)
    if geometry.normalise_symmetry_name(settings.symmetry) != "C1":
        quaternions = geometry.reduce_to_asymmetric_unit(quaternions, settings.symmetry)
    mean_defocus = rng.uniform(*settings.defocus_range, size=n)
    astigmatism = rng.uniform(0.0, settings.astigmatism, size=n)
    defocus_angle = rng.uniform(0.0, 180.0, size=n)
    bfactor = rng.uniform(*settings.bfactor_range, size=n)
    origins = rng.uniform(-settings.shift_px, settings.shift_px, size=(n, 2))
    subset = rng.integers(1, 3, size=n)
    kinds = np.full(n, INLIER_KIND, dtype=object)
    n_outliers = round(settings.outlier_fraction * n)
    chosen = rng.choice(n, size=n_outliers, replace=False)
    kinds[chosen] = np.asarray(settings.outlier_kinds, dtype=object)[
        rng.permutation(n_outliers) % len(settings.outlier_kinds)
    ]
    return ParticleDraws(
        quaternions=quaternions,
        origins_px=origins,
        defocus_u=mean_defocus + astigmatism / 2.0,
        defocus_v=mean_defocus - astigmatism / 2.0,
        defocus_angle=defocus_angle,
        bfactor=bfactor,
        subset=subset,
        kinds=kinds,
    )


def particle_tables(
    draws: ParticleDraws, settings: SimulationSettings, pixel_size: float, size: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.1 optics and particles tables (true angles, origins in A, CTF columns when ``ctf``)."""
    n = len(draws.quaternions)
    angles = geometry.quaternion_to_euler(draws.quaternions)
    optics = pd.DataFrame(
        {
            star.OPTICS_GROUP: [1],
            star.OPTICS_GROUP_NAME: ["opticsGroup1"],
            star.VOLTAGE: [float(settings.voltage)],
            star.CS: [float(settings.cs)],
            star.AMPLITUDE_CONTRAST: [float(settings.amplitude_contrast)],
            star.IMAGE_PIXEL_SIZE: [float(pixel_size)],
            star.IMAGE_SIZE: [int(size)],
            star.IMAGE_DIMENSIONALITY: [2],
        }
    )
    columns = {
        star.IMAGE_NAME: [f"{i + 1:06d}@{STACK_NAME}" for i in range(n)],
        star.OPTICS_GROUP: np.ones(n, dtype=int),
        star.ANGLE_ROT: angles[:, 0],
        star.ANGLE_TILT: angles[:, 1],
        star.ANGLE_PSI: angles[:, 2],
        star.ORIGIN_X_ANGST: draws.origins_px[:, 0] * pixel_size,
        star.ORIGIN_Y_ANGST: draws.origins_px[:, 1] * pixel_size,
    }
    if settings.ctf:
        columns |= {
            star.DEFOCUS_U: draws.defocus_u,
            star.DEFOCUS_V: draws.defocus_v,
            star.DEFOCUS_ANGLE: draws.defocus_angle,
            star.CTF_BFACTOR: draws.bfactor,
            star.PHASE_SHIFT: np.zeros(n),
        }
    columns |= {
        star.RANDOM_SUBSET: draws.subset,
        star.OUTLIER: (draws.kinds != INLIER_KIND).astype(int),
        star.OUTLIER_KIND: draws.kinds.astype(str),
    }
    return optics, pd.DataFrame(columns)


# ---------------------------------------------------------------- outlier maps and images


def _grid(size: int) -> np.ndarray:
    """Voxel coordinates (z, y, x) relative to the box centre, [3, D, D, D]."""
    return np.indices((size,) * 3, dtype=np.float64) - size // 2


def decoy_volume(volume: np.ndarray, rng: np.random.Generator, blobs: int = 40) -> np.ndarray:
    """Another molecule: Gaussian blobs filling a randomly oriented ellipsoid with the map's second moments.

    The ellipsoid has the principal extents of the map's positive density and the total equals the map's.
    """
    size = volume.shape[0]
    weights = np.clip(volume, 0.0, None)
    offsets = _grid(size).reshape(3, -1) - (center_of_mass(volume) - size // 2)[:, None]
    covariance = (offsets * weights.ravel()) @ offsets.T / weights.sum()
    semi_axes = np.sqrt(5.0 * np.clip(np.linalg.eigvalsh(covariance), 1.0, None))  # solid ellipsoid: var = a^2/5
    directions = rng.standard_normal((blobs, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    inside = directions * rng.uniform(0.0, 1.0, size=(blobs, 1)) ** (1.0 / 3.0) * semi_axes
    centres = inside @ geometry.quaternion_to_matrix(geometry.random_quaternions(1, rng))[0].T
    widths = rng.uniform(0.06, 0.12, size=blobs) * semi_axes.mean() + 1.0
    heights = rng.uniform(0.5, 1.5, size=blobs)
    z, y, x = _grid(size)
    decoy = np.zeros((size,) * 3)
    for (cz, cy, cx), width, height in zip(centres, widths, heights, strict=True):
        decoy += height * np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2.0 * width**2))
    return decoy * (volume.sum() / decoy.sum())


def broken_volume(volume: np.ndarray, rng: np.random.Generator, edge_px: float = 1.5) -> np.ndarray:
    """The map with the density beyond a random plane removed (soft edge); the plane passes within half the
    radius of gyration of the centre of mass, so roughly 40-60 % of the mass goes."""
    size = volume.shape[0]
    weights = np.clip(volume, 0.0, None)
    offsets = _grid(size) - (center_of_mass(volume) - size // 2)[:, None, None, None]
    radius_of_gyration = np.sqrt((np.sum(offsets**2, axis=0) * weights).sum() / weights.sum())
    normal = rng.standard_normal(3)
    normal /= np.linalg.norm(normal)
    distance = np.tensordot(normal, offsets, axes=1) - rng.uniform(-0.3, 0.3) * radius_of_gyration
    return volume / (1.0 + np.exp(distance / edge_px))


def ice_image(canvas: int, box: int, rng: np.random.Generator) -> np.ndarray:
    """One to three soft-edged elliptical blobs about a box of ``box`` px, often reaching beyond it, and half
    the time a straight edge, drawn on a larger ``canvas`` [canvas, canvas] with the box in its middle."""
    y, x = np.indices((canvas, canvas), dtype=np.float64) - canvas // 2
    image = np.zeros((canvas, canvas))
    for _ in range(rng.integers(1, 4)):
        cx, cy = rng.uniform(-0.6, 0.6, size=2) * box
        ax, ay = rng.uniform(0.1, 0.45, size=2) * box
        angle = rng.uniform(0.0, np.pi)
        u = ((x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)) / ax
        v = (-(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)) / ay
        edge = (np.hypot(u, v) - 1.0) * min(ax, ay) / rng.uniform(1.0, 4.0)
        image += rng.uniform(0.5, 1.0) / (1.0 + np.exp(np.clip(edge, -50.0, 50.0)))
    if rng.uniform() < 0.5:
        angle = rng.uniform(0.0, 2.0 * np.pi)
        distance = x * np.cos(angle) + y * np.sin(angle) - rng.uniform(-0.4, 0.4) * box
        image += 1.0 / (1.0 + np.exp(np.clip(-distance / 1.5, -50.0, 50.0)))
    return image


# ---------------------------------------------------------------- rendering


def stream_rng(seed: int, *stream: int) -> np.random.Generator:
    """The generator of one named stream (``_TABLE_STREAM``, ...) of a simulation seed."""
    return np.random.default_rng([int(seed), *stream])


def variant_projectors(volume: np.ndarray, seed: int, kinds) -> dict[str, list[FourierProjector]]:
    """Projectors of the outlier maps among ``kinds``: VARIANTS_PER_KIND decoy molecules and broken maps each."""
    variants: dict[str, list[FourierProjector]] = {}
    for number, (kind, build) in enumerate((("decoy", decoy_volume), ("broken", broken_volume))):
        if kind in kinds:
            variants[kind] = [
                FourierProjector(build(volume, stream_rng(seed, _VARIANT_STREAM, number, k)))
                for k in range(VARIANTS_PER_KIND)
            ]
    return variants


def apply_ctf(
    images: np.ndarray, pixel_size: float, settings: SimulationSettings, draws: ParticleDraws, index: np.ndarray
) -> np.ndarray:
    """Multiply images [m, S, S] by the CTF of particles ``index`` (nothing when the CTF is off)."""
    if not settings.ctf or len(images) == 0:
        return images
    ctf = compute_ctf(
        images.shape[-1],
        pixel_size,
        draws.defocus_u[index],
        draws.defocus_v[index],
        draws.defocus_angle[index],
        settings.voltage,
        settings.cs,
        settings.amplitude_contrast,
        draws.bfactor[index],
        rfft=True,
    )
    return np.fft.irfft2(np.fft.rfft2(images) * ctf, s=images.shape[-2:])


def noise_levels(projector: FourierProjector, pixel_size: float, settings: SimulationSettings) -> tuple[float, float]:
    """(signal std, noise std) of a data set: the signal's from PILOT_PARTICLES pilot particles drawn from the
    seed like the real ones (CTF-filtered, centred), the noise's from it and ``snr`` (0 without noise)."""
    pilot = draw_particles(settings, stream_rng(settings.seed, _PILOT_STREAM), n=PILOT_PARTICLES)
    variances = []
    for index in _chunks(PILOT_PARTICLES, render_chunk(projector.size)):
        clean = apply_ctf(projector.project_numpy(pilot.quaternions[index]), pixel_size, settings, pilot, index)
        variances.append(np.var(clean, axis=(1, 2)))
    signal_std = float(np.sqrt(np.mean(np.concatenate(variances))))
    return signal_std, 0.0 if settings.snr is None else signal_std / np.sqrt(settings.snr)


def render_chunk(size: int, chunk_size: int = 256) -> int:
    """Images of D px rendered at once: ``chunk_size``, fewer for large boxes (``resources.CHUNK_VALUES`` pixels)."""
    return resources.chunk_of(chunk_size, size**2)


def _chunks(n: int, chunk: int):
    """Consecutive index arrays of at most ``chunk`` covering range(n)."""
    for start in range(0, n, chunk):
        yield np.arange(start, min(start + chunk, n))


class ParticleRenderer:
    """Renders any subset of the particles of one simulation (cubic map [D, D, D] -> images [m, D, D]).

    Particles, decoys and broken maps are moved and CTF-filtered periodically in the box, the image model of
    RELION and of reconstruction (``image = CTF * shifted projection`` on the box's DFT grid). Off-centre
    particles and ice reach beyond the box, so they are moved and filtered on a canvas twice as large and cut
    out afterwards: what leaves the box is lost instead of wrapping around.
    """

    def __init__(self, volume: np.ndarray, pixel_size: float, settings: SimulationSettings, draws: ParticleDraws):
        self.volume = np.asarray(volume, dtype=np.float64)
        self.size = self.volume.shape[0]
        self.pixel_size = float(pixel_size)
        self.settings = settings
        self.draws = draws
        self.projector = FourierProjector(self.volume)
        self.variants = variant_projectors(self.volume, settings.seed, set(draws.kinds))
        self.signal_std, self.noise_std = noise_levels(self.projector, self.pixel_size, settings)

    def _project(self, kinds: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Centred, noise-free projections [m, D, D] of the map (or its outlier variants); zeros for the rest."""
        images = np.zeros((len(index), self.size, self.size))
        projected = np.isin(kinds, (INLIER_KIND, "off_centre"))
        if projected.any():
            images[projected] = self.projector.project_numpy(self.draws.quaternions[index[projected]])
        for kind, projectors in self.variants.items():
            for k, projector in enumerate(projectors):
                chosen = (kinds == kind) & (index % len(projectors) == k)
                if chosen.any():
                    images[chosen] = projector.project_numpy(self.draws.quaternions[index[chosen]])
        return images

    def _render_beyond_box(self, images: np.ndarray, kinds: np.ndarray, index: np.ndarray, rngs: list) -> np.ndarray:
        """Off-centre particles and ice [m, D, D], moved and CTF-filtered on a canvas [m, 2D, 2D], cut out."""
        size = self.size
        start = size - size // 2  # the box's place in the canvas: its centre on the canvas centre
        canvas = np.zeros((len(images), 2 * size, 2 * size))
        shifts = -self.draws.origins_px[index]
        for row, kind in enumerate(kinds):
            if kind == "ice":
                canvas[row] = ice_image(2 * size, size, rngs[row])
                shifts[row] = 0.0
            else:
                canvas[row, start : start + size, start : start + size] = images[row]
                angle = rngs[row].uniform(0.0, 2.0 * np.pi)
                shifts[row] += rngs[row].uniform(0.25, 0.4) * size * np.array([np.cos(angle), np.sin(angle)])
        canvas = apply_ctf(translate_images(canvas, shifts), self.pixel_size, self.settings, self.draws, index)
        out = canvas[:, start : start + size, start : start + size]
        for row in np.flatnonzero(kinds == "ice"):  # contrast relative to particles, after the CTF's high-pass
            out[row] *= rngs[row].uniform(1.0, 3.0) * self.signal_std / max(out[row].std(), 1e-12)
        return out

    def render(self, index: np.ndarray) -> np.ndarray:
        """Images of particles ``index`` (ints in [0, n)) as float32 [m, D, D]."""
        index = np.asarray(index, dtype=np.int64)
        kinds = self.draws.kinds[index]
        rngs = [stream_rng(self.settings.seed, _IMAGE_STREAM, int(i)) for i in index]
        images = self._project(kinds, index)
        beyond = np.isin(kinds, ("off_centre", "ice"))
        inside = ~beyond
        if inside.any():
            moved = translate_images(images[inside], -self.draws.origins_px[index[inside]])
            images[inside] = apply_ctf(moved, self.pixel_size, self.settings, self.draws, index[inside])
        if beyond.any():
            images[beyond] = self._render_beyond_box(
                images[beyond], kinds[beyond], index[beyond], [rngs[row] for row in np.flatnonzero(beyond)]
            )
        size = self.size
        for row, rng in enumerate(rngs):
            if self.noise_std > 0.0:
                images[row] += self.noise_std * rng.standard_normal((size, size))
            elif kinds[row] == "noise":
                images[row] = self.signal_std * rng.standard_normal((size, size))
        return images.astype(np.float32)


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

    Raises :class:`~cryo_forum.errors.InvalidSetting` naming ``size`` when the projectors of the map (and of its
    decoy and broken variants) and the rendering of a chunk exceed the available memory, and ``n`` when the
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
    """Bytes a D px box needs whatever n (projectors, map copies, outlier maps, a chunk's rendering) and what for."""
    variants = VARIANTS_PER_KIND * len({"decoy", "broken"} & set(settings.drawn_kinds()))
    canvas = sum(kind in ("off_centre", "ice") for kind in settings.outlier_kinds) / len(settings.outlier_kinds)
    needed = (
        (1 + variants) * resources.projector_bytes(size)
        + resources.map_bytes(size)
        + (resources.outlier_map_bytes(size) if variants else 0)
        + resources.render_bytes(size, render_chunk(size), settings.outlier_fraction * canvas)
    )
    return needed, f"the projectors of the map and its {variants} outlier maps" if variants else "the projector"


def _prepare(volume: np.ndarray, pixel_size: float, size: int | None, options: dict, out_dir: Path | None = None):
    settings = SimulationSettings(**options)
    settings.validate()
    require_resources(settings, np.shape(volume)[0] if size is None else size, out_dir)
    volume = boxed_volume(volume, pixel_size, size)
    draws = draw_particles(settings, stream_rng(settings.seed, _TABLE_STREAM))
    return settings, volume, draws


def simulate_particles(
    volume: np.ndarray, pixel_size: float, n: int, size: int | None = None, **options
) -> SimulatedParticles:
    """Simulate ``n`` particles of a map [z, y, x] (padded or cropped about voxel D // 2 to ``size``) in memory.

    ``options`` are the :class:`SimulationSettings` fields, e.g. ``snr=0.1, ctf=True, defocus_range=(1e4,
    2.5e4), bfactor=(0, 100), shift_px=3, outlier_fraction=0.1, symmetry="D2", seed=0``. A request that would
    not fit in memory is refused first (:func:`require_resources`).
    """
    settings, volume, draws = _prepare(volume, pixel_size, size, {"n": n, **options})
    size = volume.shape[0]
    renderer = ParticleRenderer(volume, pixel_size, settings, draws)
    images = np.empty((settings.n, size, size), dtype=np.float32)
    for index in _chunks(settings.n, render_chunk(size)):
        images[index] = renderer.render(index)
    optics, particles = particle_tables(draws, settings, pixel_size, size)
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
    settings, volume, draws = _prepare(volume, pixel_size, size, {"n": n, **options}, out_dir)
    size = volume.shape[0]
    renderer = ParticleRenderer(volume, pixel_size, settings, draws)
    optics, particles = particle_tables(draws, settings, pixel_size, size)
    with atomic_directory(out_dir) as staging:
        with (
            stack_writer(staging / STACK_NAME, settings.n, size, pixel_size) as stack,
            progress_bar(settings.n, description="simulate", enabled=progress) as bar,
        ):
            for index in _chunks(settings.n, render_chunk(size, chunk_size)):
                stack[index[0] : index[-1] + 1] = renderer.render(index)
                bar.update(len(index))
        star.write_star(
            staging / STAR_NAME, {star.OPTICS_BLOCK: optics, star.PARTICLES_BLOCK: particles}, version=30001
        )
        write_volume(staging / VOLUME_NAME, volume, pixel_size)
    return out_dir
