"""Projection matching: the classical pose search of each particle against a known map.

For every particle the pose (and, optionally, the origin) that maximises the CTF-aware normalised
cross-correlation with the map's projection is searched, first over a global SO(3) grid at about 7.5 degrees
(:func:`cryo_forum.geometry.rotation_grid`) at low resolution, then by local grids around the best pose that
shrink to a fraction of a degree at full resolution. With the particle's spectrum ``X``, its CTF ``C``, the
reference's central slice ``P`` and the trial origin ``o``, the score is

    score = Re sum_k w_k conj(C P)(k) X(k) exp(-2 pi i k.o / D) / sqrt(sum_k w_k C(k)^2 |P(k)|^2)

over the half-plane frequencies ``k`` of the working band (zero frequency left out, so the background level
does not matter), with ``w_k`` counting Hermitian pairs and dividing by the noise power of the set's radial
shell (whitening). For Gaussian noise this is the log-likelihood of the best-scaled reference: the
maximum-likelihood pose that refinement programs approximate. Both sums are matrix products in TensorFlow,
so thousands of references are scored per particle at once.
"""

from __future__ import annotations

import bisect
import functools
import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from cryo_forum import geometry, resources
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.physics.particle_ctf import ParticleCTFs
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.progress import progress as progress_bar
from cryo_forum.tensorflow_quiet import tf

NOISE_SAMPLE = 2000  # particles whose mean power spectrum estimates the noise per shell
LOCAL_HALF_WIDTH = 2  # local grids of (2 * 2 + 1)^3 = 125 rotations
COVERING = 0.87  # covering radius of a cubic grid of rotation vectors, per unit step (sqrt(3) / 2)
MAX_COARSE_DEG = 30.0  # the coarsest global grid: 576 rotations
MIN_REFINE_DEG = 0.01
MIN_SHIFT_STEP_PX = 0.1  # the local stages halve it anyway
MIN_COARSE_RADIUS = 2.0  # cycles per box: the coarse band must hold a few frequencies
MAX_OVERSAMPLING = 4
MIN_BOX = 8


@dataclass(frozen=True)
class MatchSettings:
    """How the search runs; angles in degrees, shifts in pixels of the particle box.

    ``coarse_deg`` is the global grid's spacing (RELION's count; its covering radius is about 0.87 of it). Each
    local stage then searches the 125 rotations ``step * {-2..2}^3`` around the best pose so far, the step
    shrinking by 0.435 per stage so that the grid of rotation vectors still covers the previous stage's cell,
    until it is at most ``refine_deg``. Origins are searched within ``max_shift_px`` of the particle's own
    origin (from the file, zero if none) on a ``shift_step_px`` grid, then refined by a 3 x 3 grid at half the
    previous step per stage; ``max_shift_px = 0`` keeps the file's origins. The coarse stage uses frequencies up
    to ``coarse_band / coarse angle`` cycles per box (where a rotation by the grid step still moves a Fourier
    sample by less than about two samples); the local stages use everything below Nyquist. ``oversampling`` is
    the projector's (see :class:`cryo_forum.physics.projection.FourierProjector`). With a point group other than C1 as
    ``symmetry`` the global grid keeps only the rotations in and near the asymmetric unit (:func:`global_grid`):
    about |G| times fewer references. :meth:`validate` states the ranges.
    """

    coarse_deg: float = 7.5
    refine_deg: float = 1.0
    max_shift_px: float = 0.0
    shift_step_px: float = 1.0
    coarse_band: float = 2.0
    oversampling: int = 2
    batch_size: int = 32
    symmetry: str = "C1"

    def validate(self, box_size: int | None = None) -> None:
        """Raise :class:`~cryo_forum.errors.InvalidSetting` naming the first setting out of range.

        The global grid needs at least a few hundred rotations (``coarse_deg`` at most 30) and a coarse band of at
        least two cycles per box; the local stages refine to ``refine_deg`` between 0.01 degrees and the coarse
        spacing; a searched origin grid has steps of at least 0.1 px, no larger than the largest shift. With the
        particles' ``box_size``, shifts must also stay within half the box.
        """
        self._validate_angles()
        self._validate_shifts()
        if not (_whole(self.oversampling) and 1 <= self.oversampling <= MAX_OVERSAMPLING):
            message = f"must be an integer from 1 to {MAX_OVERSAMPLING}, got {self.oversampling}"
            raise InvalidSetting("oversampling", message)
        if not (_whole(self.batch_size) and self.batch_size >= 1):
            raise InvalidSetting("batch_size", f"must be a positive integer, got {self.batch_size}")
        try:
            geometry.normalise_symmetry_name(self.symmetry)
        except ValueError as error:
            raise InvalidSetting("symmetry", str(error)) from None
        if box_size is not None:
            self._validate_box(int(box_size))

    def _validate_angles(self) -> None:
        coarse, refine = self.coarse_deg, self.refine_deg
        if not (_finite(coarse) and 0 < coarse <= MAX_COARSE_DEG):
            rotations = geometry.grid_size_for_spacing(MAX_COARSE_DEG)
            raise InvalidSetting(
                "coarse_deg",
                f"must be in (0, {MAX_COARSE_DEG:g}] degrees (a global grid of at least {rotations} rotations), "
                f"got {coarse}",
            )
        if not (_finite(refine) and MIN_REFINE_DEG <= refine <= coarse):
            raise InvalidSetting(
                "refine_deg", f"must be from {MIN_REFINE_DEG:g} to the coarse spacing, {coarse:g} degrees, got {refine}"
            )
        lowest = MIN_COARSE_RADIUS * math.radians(coarse)
        if not (_finite(self.coarse_band) and self.coarse_band >= lowest):
            raise InvalidSetting(
                "coarse_band",
                f"must be at least {lowest:.3g} at a {coarse:g} degree grid (a band of {MIN_COARSE_RADIUS:g} cycles "
                f"per box), got {self.coarse_band}",
            )

    def _validate_shifts(self) -> None:
        shift, step = self.max_shift_px, self.shift_step_px
        if not (_finite(shift) and shift >= 0):
            raise InvalidSetting("max_shift_px", f"must be >= 0 px, got {shift}")
        if not (_finite(step) and step >= MIN_SHIFT_STEP_PX and (shift == 0 or step <= shift)):
            most = f" and at most the largest shift searched, {shift:g} px" if shift > 0 else ""
            raise InvalidSetting("shift_step_px", f"must be at least {MIN_SHIFT_STEP_PX:g} px{most}, got {step}")

    def _validate_box(self, box_size: int) -> None:
        if box_size < MIN_BOX:
            raise CryoForumError(f"matching needs particles of at least {MIN_BOX} px, got {box_size} px")
        if not self.max_shift_px < box_size / 2:
            raise InvalidSetting(
                "max_shift_px", f"{self.max_shift_px:g} px reaches beyond half the particles' {box_size} px box"
            )

    def local_steps(self) -> list[float]:
        """Step in degrees of each local stage: 0.435 of the previous (coarse) step, down to ``refine_deg``."""
        steps = [COVERING * self.coarse_deg / LOCAL_HALF_WIDTH]
        while steps[-1] > self.refine_deg:
            steps.append(COVERING * steps[-1] / LOCAL_HALF_WIDTH)
        return steps


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)


def _whole(value) -> bool:
    return _finite(value) and int(value) == value


def half_plane_frequencies(size: int, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rfft2 half-plane frequencies with 0 < |k| < radius (cycles per box): :meth:`FourierGrid.band`.

    Returns their flat indices into the ``[size, size // 2 + 1]`` rfft2 grid [K], (kx, ky) [K, 2] and the
    Hermitian weights [K] (2 for kx > 0, whose mirror image is not stored; 1 on the kx = 0 column, which holds both).
    """
    return FourierGrid(size).band(radius)


def particle_spectra(images: np.ndarray) -> np.ndarray:
    """rfft2 of images [N, D, D] centred at ``D // 2`` (phases relative to the centre) -> [N, D * (D // 2 + 1)]."""
    spectra = np.fft.rfft2(np.fft.ifftshift(np.asarray(images, dtype=np.float64), axes=(-2, -1)))
    return spectra.reshape(len(images), -1)


def shell_noise_power(particles: ParticleSet, sample: int = NOISE_SAMPLE) -> np.ndarray:
    """Mean power per integer radial shell [D // 2 + 1] of the set's spectra, from up to ``sample`` particles.

    At the SNRs of cryo-EM images this is dominated by the noise, so dividing by it whitens the score.
    """
    size = particles.box_size
    rng = np.random.default_rng(0)
    chosen = np.sort(rng.choice(len(particles), size=min(sample, len(particles)), replace=False))
    shells = FourierGrid(size).shells.ravel()
    inside = shells <= size // 2
    total = np.zeros(size // 2 + 1)
    counts = np.bincount(shells[inside], minlength=size // 2 + 1) * len(chosen)
    for rows in _blocks(len(chosen), resources.chunk_of(256, size**2)):
        power = np.abs(particle_spectra(particles.images(chosen[rows]))) ** 2
        total += np.bincount(shells[inside], weights=power[:, inside].sum(axis=0), minlength=size // 2 + 1)
    power = total / np.maximum(counts, 1)
    return np.maximum(power, power[power > 0].min() if (power > 0).any() else 1.0)


class _Band:
    """One working band: its frequencies and their weights (Hermitian count / noise power of the shell)."""

    def __init__(self, size: int, radius: float, noise_power: np.ndarray):
        grid = FourierGrid(size)
        self.flat, self.frequencies, hermitian = grid.band(radius)
        self.weights = hermitian / noise_power[grid.shells.ravel()[self.flat]]
        self.size = size
        self.radius = float(radius)

    def phase_ramps(self, origins: np.ndarray) -> np.ndarray:
        """exp(-2 pi i k.o / D) for origins [..., 2] (x, y) in px -> [..., K]: undoes a particle's offset."""
        return np.exp(-2j * np.pi * (origins @ self.frequencies.T) / self.size)


@tf.function(reduce_retracing=True)
def _coarse_scores(references, reference_power, weighted, ctf_power):
    """Scores [R, B, T] of references [R, 2K] (real | imag) against weighted particles [B, T, 2K]."""
    batch, shifts = tf.shape(weighted)[0], tf.shape(weighted)[1]
    numerator = tf.matmul(references, tf.reshape(weighted, [batch * shifts, -1]), transpose_b=True)
    denominator = tf.sqrt(tf.maximum(tf.matmul(reference_power, ctf_power, transpose_b=True), 1e-30))
    return tf.reshape(numerator, [-1, batch, shifts]) / denominator[:, :, None]


@tf.function(reduce_retracing=True)
def _local_scores(slices, weighted, ctf_power):
    """Scores [B, C, T] of each particle's own candidates: slices [B, C, 2K] (real | imag), particles [B, T, 2K]."""
    half = tf.shape(slices)[-1] // 2
    power = slices[..., :half] ** 2 + slices[..., half:] ** 2
    denominator = tf.sqrt(tf.maximum(tf.reduce_sum(power * ctf_power[:, None, :], axis=-1), 1e-30))
    return tf.matmul(slices, weighted, transpose_b=True) / denominator[:, :, None]


def _real_imag(values) -> np.ndarray:
    """Complex [..., K] -> float32 [..., 2K] (real parts, then imaginary parts): Re(conj(a) b) becomes a dot product."""
    values = np.asarray(values)
    return np.concatenate([values.real, values.imag], axis=-1).astype(np.float32, copy=False)


def _blocks(total: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering range(total)."""
    return [slice(start, min(start + size, total)) for start in range(0, total, size)]


def _shift_count(radius: float, step: float) -> int:
    """At least the number of offsets :func:`shift_grid` gives, without building them."""
    ticks = math.floor(radius / step + 1e-9)
    return min((2 * ticks + 1) ** 2, math.ceil(math.pi * (ticks + 1) ** 2))


def shift_grid(radius: float, step: float) -> np.ndarray:
    """Offsets (x, y) [T, 2] in px on a square grid of ``step`` within ``radius`` (just [0, 0] for radius 0)."""
    ticks = step * np.arange(-np.floor(radius / step + 1e-9), np.floor(radius / step + 1e-9) + 1)
    grid = np.stack(np.meshgrid(ticks, ticks, indexing="xy"), axis=-1).reshape(-1, 2)
    return grid[np.hypot(grid[:, 0], grid[:, 1]) <= radius + 1e-9]


def global_grid(spacing_deg: float, symmetry: str = "C1") -> np.ndarray:
    """The global search's rotations [n, 4]: the SO(3) grid, restricted to the asymmetric unit of ``symmetry``.

    The asymmetric unit holds the poses nearest the identity among their symmetry mates; grid rotations up to a
    covering radius beyond its border are kept too, so every pose of the unit has a grid rotation within the
    grid's covering radius. For a rotation that far out, its angle from the identity exceeds its nearest mate's by
    at most twice that radius, which is the test applied.
    """
    grid = geometry.rotation_grid(spacing_deg)
    if geometry.normalise_symmetry_name(symmetry) == "C1":
        return grid
    identity = geometry.geodesic_distance(grid, [0.0, 0.0, 0.0, 1.0])
    mates = geometry.quaternion_multiply(
        grid[:, None], geometry.quaternion_conjugate(geometry.symmetry_quaternions(symmetry))
    )
    nearest = geometry.geodesic_distance(mates, [0.0, 0.0, 0.0, 1.0]).min(axis=1)
    return grid[identity <= nearest + 2.0 * COVERING * np.radians(spacing_deg)]


def match_memory(size: int, settings: MatchSettings) -> int:
    """Estimated peak bytes of matching ``size`` px particles with ``settings`` (the map itself not counted).

    From the box, the batch size and the sizes of the global grid, its band and the origin grid (see
    :func:`cryo_forum.resources.match_bytes`); nothing is built.
    """
    group = len(geometry.symmetry_matrices(settings.symmetry))
    full = geometry.grid_size_for_spacing(settings.coarse_deg)
    rotations = full if group == 1 else min(full, 2 * full // group + 1)  # the asymmetric unit and its border
    radius = min(settings.coarse_band / math.radians(settings.coarse_deg), size / 2.0)
    return resources.match_bytes(
        size,
        settings.batch_size,
        rotations,
        coarse_frequencies=math.ceil(math.pi * radius**2 / 2 + radius),
        coarse_shifts=_shift_count(settings.max_shift_px, settings.shift_step_px),
        local_shifts=9 if settings.max_shift_px > 0 else 1,
        oversampling=settings.oversampling,
        grid_bytes=full * (32 + (40 * group if group > 1 else 0)),  # the grid, and its symmetry mates
    )


def require_match_memory(size: int, settings: MatchSettings, extra: int = 0) -> None:
    """Refuse a search that would not fit in the available memory (with ``extra`` bytes more, e.g. for the map).

    Raises :class:`~cryo_forum.errors.InvalidSetting` ``batch_size`` naming the largest batch size that fits, or
    :class:`~cryo_forum.errors.CryoForumError` when not even one particle at a time does.
    """

    def shortfall(batch_size: int) -> str | None:
        return resources.memory_shortfall(match_memory(size, replace(settings, batch_size=batch_size)) + extra)

    if shortfall(settings.batch_size) is None:
        return
    if shortfall(1) is not None:
        raise CryoForumError(f"matching {size} px particles one at a time {shortfall(1)}")
    largest = bisect.bisect_left(range(1, settings.batch_size), True, key=lambda b: shortfall(b) is not None)
    resources.require_memory(
        "batch_size",
        match_memory(size, settings) + extra,
        f"matching {size} px particles {settings.batch_size} at a time",
        advice=f"use a batch size of at most {largest}",
    )


class ProjectionMatcher:
    """Global-then-local pose search of particles against one map at the particles' box and pixel size.

    volume: cubic map [D, D, D] sampled like the particles (same box D and pixel size); its origin defines the
    poses. ``noise_power`` [D // 2 + 1] whitens the score (see :func:`shell_noise_power`; None: white noise).
    """

    def __init__(self, volume: np.ndarray, settings: MatchSettings = MatchSettings(), noise_power=None):
        self.size = int(volume.shape[0])
        settings.validate(self.size)
        require_match_memory(self.size, settings)
        self.settings = settings
        self.projector = FourierProjector(volume, settings.oversampling)
        noise = np.ones(self.size // 2 + 1) if noise_power is None else np.asarray(noise_power, dtype=np.float64)
        self.noise_power = noise
        self.coarse = _Band(self.size, settings.coarse_band / np.radians(settings.coarse_deg), noise)
        self.fine = _Band(self.size, self.size / 2.0, noise)
        self.grid = global_grid(settings.coarse_deg, settings.symmetry)
        self._coarse_shifts = shift_grid(settings.max_shift_px, settings.shift_step_px)
        self._bands = {self.coarse.radius: self.coarse, self.fine.radius: self.fine}

    @functools.cached_property
    def _references(self) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """The global grid's slices on the coarse band, made at the first global search."""
        return self._coarse_references()

    def band(self, radius: float) -> _Band:
        """The frequencies below ``radius`` cycles per box (at most Nyquist) and their weights, made once."""
        radius = min(float(radius), self.size / 2.0)
        if radius not in self._bands:
            self._bands[radius] = _Band(self.size, radius, self.noise_power)
        return self._bands[radius]

    def _slices(self, quaternions: np.ndarray, band: _Band, chunk: int | None = None) -> np.ndarray:
        """Central slices of the map [N, K] (complex64) at poses [N, 4] on ``band``, ``chunk`` poses per call
        (default: CHUNK_VALUES values); the last call is padded, so each band and chunk compiles once."""
        matrices = geometry.quaternion_to_matrix(quaternions).astype(np.float32)
        chunk = chunk or resources.chunk_of(len(matrices), len(band.frequencies))
        padded = np.concatenate(
            [matrices, np.broadcast_to(np.eye(3, dtype=np.float32), (-len(matrices) % chunk, 3, 3))]
        )
        parts = [
            self.projector.central_slices(padded[start : start + chunk], band.frequencies).numpy()
            for start in range(0, len(padded), chunk)
        ]
        return np.concatenate(parts)[: len(matrices)]

    def _coarse_references(self) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """The global grid's slices on the coarse band as (real | imag [r, 2K], power [r, K]) float32 blocks.

        A block holds at most CHUNK_VALUES values and gives at most CHUNK_VALUES scores for a batch, so neither
        the table's construction nor a batch's coarse scores need more than a block's memory beyond the table.
        """
        values = max(2 * len(self.coarse.flat), self.settings.batch_size * len(self._coarse_shifts))
        rows = resources.chunk_of(len(self.grid), values)
        table = []
        for block in _blocks(len(self.grid), rows):
            slices = self._slices(self.grid[block], self.coarse, chunk=rows)
            table.append((tf.constant(_real_imag(slices)), tf.constant((np.abs(slices) ** 2).astype(np.float32))))
        return table

    def _weighted(self, band: _Band, spectra: np.ndarray, ctf: np.ndarray, origins: np.ndarray) -> np.ndarray:
        """w C X exp(-2 pi i k.o / D) for particles [B] and trial origins [B, T, 2] -> float32 [B, T, 2K]."""
        base = band.weights * ctf[:, band.flat] * spectra[:, band.flat]
        return _real_imag(base[:, None, :] * band.phase_ramps(origins))

    def search(self, images: np.ndarray, ctf: np.ndarray, origins: np.ndarray) -> tuple[np.ndarray, ...]:
        """Best poses of a batch: images [B, D, D], CTF [B, D, D // 2 + 1] (rfft grid), origins [B, 2] px.

        Returns quaternions [B, 4], origins [B, 2] (px) and normalised cross-correlation scores [B].
        """
        spectra = particle_spectra(images)
        ctf = np.asarray(ctf, dtype=np.float64).reshape(len(images), -1)
        quaternions, origins, score = self.coarse_search(spectra, ctf, origins)
        searched = self.settings.max_shift_px > 0
        for stage, step in enumerate(self.settings.local_steps()):
            shift_step = self.settings.shift_step_px / 2 ** (stage + 1) if searched else 0.0
            offsets = geometry.local_rotation_offsets(step, LOCAL_HALF_WIDTH)
            quaternions, origins, score, _ = self.local_search(spectra, ctf, quaternions, origins, offsets, shift_step)
        return quaternions, origins, score

    def coarse_search(
        self, spectra: np.ndarray, ctf: np.ndarray, origins: np.ndarray, shifts: np.ndarray | None = None
    ) -> tuple[np.ndarray, ...]:
        """Best global-grid rotation and origin of each particle, scored one block of references at a time.

        spectra [B, D * (D // 2 + 1)] from :func:`particle_spectra`, CTFs [B, D * (D // 2 + 1)] and origins [B, 2] px;
        the origins tried are each particle's plus ``shifts`` [T, 2] (px; default the settings' grid, which sizes
        the search's memory: pass at most as many). Returns quaternions [B, 4], origins [B, 2] and scores [B].
        """
        rows = np.arange(len(spectra))
        shifts = self._coarse_shifts if shifts is None else shifts
        trials = origins[:, None, :] + shifts[None]  # [B, T, 2]
        weighted = self._weighted(self.coarse, spectra, ctf, trials)
        ctf_power = (self.coarse.weights * ctf[:, self.coarse.flat] ** 2).astype(np.float32)
        best = np.full(len(spectra), -np.inf)
        reference, shift = np.zeros(len(spectra), dtype=np.int64), np.zeros(len(spectra), dtype=np.int64)
        first = 0
        for references, power in self._references:
            scores = _coarse_scores(references, power, weighted, ctf_power).numpy()  # [r, B, T]
            flat = np.moveaxis(scores, 1, 0).reshape(len(spectra), -1)
            top = np.argmax(flat, axis=1)
            better = flat[rows, top] > best  # strictly: ties keep the earlier reference, as one argmax would
            block_reference, block_shift = np.unravel_index(top, scores.shape[::2])
            best[better] = flat[rows, top][better]
            reference[better], shift[better] = first + block_reference[better], block_shift[better]
            first += len(scores)
        return self.grid[reference], trials[rows, shift], best

    def local_search(
        self,
        spectra,
        ctf,
        quaternions,
        origins,
        offsets: np.ndarray,
        shift_step: float = 0.0,
        band: _Band | None = None,
    ) -> tuple[np.ndarray, ...]:
        """One local stage: the best of the rotations ``offsets`` [C, 4] (small rotations, applied on the left)
        around each pose and, with a ``shift_step`` (px), of the origins one step or none away from its origin, on
        ``band`` (default: all frequencies below Nyquist). Arrays as for :meth:`coarse_search`; also returns every
        candidate's score [B, C] at the best origin.

        The candidates' slices (B x C x K values) are formed and scored a bounded block at a time: a few
        particles with all their candidates for small boxes, some candidates of one particle for large ones.
        """
        band = band or self.fine
        candidates = geometry.quaternion_multiply(offsets[None], quaternions[:, None])  # [B, C, 4]
        trials = origins[:, None, :] + shift_grid(shift_step, shift_step if shift_step > 0 else 1.0)
        frequencies = len(band.flat)
        per_call = resources.chunk_of(len(offsets), frequencies)  # candidates of one particle per block
        full = per_call == len(offsets)  # a block of several particles, sized by the batch size: one XLA shape
        particles = resources.chunk_of(self.settings.batch_size, len(offsets) * frequencies) if full else 1
        scores = np.empty((len(spectra), len(offsets), trials.shape[1]), dtype=np.float32)
        for group in _blocks(len(spectra), particles):
            weighted = self._weighted(band, spectra[group], ctf[group], trials[group])
            ctf_power = (band.weights * ctf[group][:, band.flat] ** 2).astype(np.float32)
            for block in _blocks(len(offsets), per_call):
                poses = candidates[group, block]
                slices = self._slices(poses.reshape(-1, 4), band, chunk=particles * per_call)
                scores[group, block] = _local_scores(
                    _real_imag(slices.reshape(*poses.shape[:2], -1)), weighted, ctf_power
                ).numpy()
        rows = np.arange(len(spectra))
        candidate, shift = np.unravel_index(np.argmax(scores.reshape(len(spectra), -1), axis=1), scores.shape[1:])
        return (
            geometry.canonical_quaternion(candidates[rows, candidate]),
            trials[rows, shift],
            scores[rows, candidate, shift],
            scores[rows, :, shift],
        )


def match_particles(
    particles: ParticleSet, volume: np.ndarray, settings: MatchSettings = MatchSettings(), progress: bool = True
) -> pd.DataFrame:
    """Projection-match every particle against ``volume`` (sampled like the particles) -> the STAR columns.

    The table holds rlnAngleRot/Tilt/Psi (degrees), the origins when they were searched (in Angstrom, or in pixels
    for a RELION 3.0 file) and _cfMatchScore (the normalised cross-correlation, larger = better match).
    """
    matcher = ProjectionMatcher(volume, settings, shell_noise_power(particles))
    ctfs = ParticleCTFs(particles)
    origins_in = particles.shifts_px()
    quaternions = np.zeros((len(particles), 4))
    origins = np.zeros((len(particles), 2))
    scores = np.zeros(len(particles))
    with progress_bar(len(particles), description="match", enabled=progress) as bar:
        for rows, images in particles.iter_batches(settings.batch_size):
            quaternions[rows], origins[rows], scores[rows] = matcher.search(images, ctfs(rows), origins_in[rows])
            bar.update(len(rows))
    euler = geometry.quaternion_to_euler(quaternions)
    table = pd.DataFrame({star.ANGLE_ROT: euler[:, 0], star.ANGLE_TILT: euler[:, 1], star.ANGLE_PSI: euler[:, 2]})
    if settings.max_shift_px > 0:
        if star.ORIGIN_X in particles.table and star.ORIGIN_X_ANGST not in particles.table:
            table[star.ORIGIN_X], table[star.ORIGIN_Y] = origins[:, 0], origins[:, 1]
        else:
            angstrom = origins * particles.pixel_sizes()[:, None]
            table[star.ORIGIN_X_ANGST], table[star.ORIGIN_Y_ANGST] = angstrom[:, 0], angstrom[:, 1]
    table[star.MATCH_SCORE] = scores
    return table
