"""A simulated refinement job, the data users bring: a consensus refinement of part of a data set, with junk that
nothing flags, and the rest of the particles, picked but never aligned, with the truth about all of them.

Every image comes from the one forward model, :class:`~cryo_forum.physics.renderer.ParticleRenderer`, at the
extraction box (``extract_box`` px at ``pixel_size * box / extract_box`` A/px) and is Fourier-cropped to the
working box (``box`` px at ``pixel_size``) before it is written, as RELION's extraction with rescaling does.
What the job adds to the renderer's particles:

* preferred orientations: ``clustered_fraction`` of the particles view the molecule from near one of
  ``view_clusters`` directions (von Mises-Fisher, concentration ``cluster_concentration``; in-plane angle
  uniform), the rest from anywhere;
* micrographs of ``particles_per_micrograph`` particles, each with its own defocus (mean uniform in
  ``defocus_range``, astigmatism exponential of mean ``astigmatism`` at a uniform angle), B-factor and optics
  group (``optics``: voltage, Cs, amplitude contrast per group, one pixel size; consecutive micrographs share a
  group, like the sessions of a data set); each particle's defocus differs from its micrograph's by a normal
  ``defocus_spread`` (its height in the ice);
* normal origins of ``origin_sigma_px`` (working px);
* coloured noise of power ``noise_floor + (1 - noise_floor) / (1 + (s * noise_corner_angstrom)^2)`` at spatial
  frequency s (1/A), at ``snr`` = var(signal) / var(noise) of PILOT_PARTICLES pilot particles, both measured on
  the cropped images (at the working size);
* a ``junk_fraction`` of junk in equal shares of ``junk_kinds``, none of them a kind the training stream
  simulates: ``aggregate`` (the particle and one or two more copies at random poses, 0.2-0.5 box away, on the
  renderer's canvas so nothing wraps around), ``carbon`` (a carbon film's edge,
  :func:`~cryo_forum.physics.specimens.carbon_texture`, through the CTF at 2-4 times the particles' signal
  standard deviation), ``other_protein`` (another map's projections, at the particles' contrast), ``empty`` (the
  noise alone). All of it has the particles' CTF and noise.

:func:`write_job` writes ``consensus.star`` (``n_consensus`` particles with poses and origins as a refinement
gives them: the true ones off by a random rotation of RMS ``consensus_pose_error_deg`` and a normal origin error
of ``consensus_origin_error_px``, the junk with random ones, nothing flagged), ``rest.star`` (the others: no
angles, no origins), ``truth.star`` (everything, with labels), one stack per micrograph in ``Particles/``,
``map.mrc`` (the map at the working size) and ``job.json``. Everything follows from the seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cryo_forum import geometry, resources
from cryo_forum.errors import InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.atomic import atomic_directory
from cryo_forum.io.guard import OutputGuard
from cryo_forum.io.maps import fourier_crop_volume, load_volume, resample_volume
from cryo_forum.io.mrc import write_stack, write_volume
from cryo_forum.physics.fourier import fourier_crop
from cryo_forum.physics.renderer import ParticleRenderer
from cryo_forum.physics.settings import INLIER_KIND, KINDS, SimulationSettings
from cryo_forum.physics.specimens import ICE_DRAWS, carbon_texture
from cryo_forum.progress import progress as progress_bar
from cryo_forum.streams.preprocess import CTF_KEYS
from cryo_forum.streams.simulation import render_chunk
from cryo_forum.tensorflow_quiet import tf

JUNK_KINDS = ("aggregate", "carbon", "other_protein", "empty")
JOB_KINDS = (INLIER_KIND, *JUNK_KINDS)
"""A particle's ``kind`` is an index into this tuple (0: a particle)."""
CONSENSUS_STAR, REST_STAR, TRUTH_STAR = "consensus.star", "rest.star", "truth.star"
MAP_NAME, RECORD_NAME, STACK_FOLDER = "map.mrc", "job.json", "Particles"
JOB_SET = "cfJobSet"  # truth.star: "consensus" or "rest"
PILOT_PARTICLES = 256
CARBON_CONTRAST = (2.0, 4.0)  # carbon's standard deviation after the CTF, in particles' signal standard deviations
AGGREGATE_REACH = (0.2, 0.5)  # how far (in boxes) further copies of an aggregate lie from the first
MAX_COPIES = 2  # further copies of an aggregate: one or two
_CENTRE_STREAM, _PLAN_STREAM, _PILOT_STREAM, _CARBON_STREAM = range(4)  # NumPy streams of a job's seed
_MIN_CLUSTER_SEPARATION_DEG = 60.0
_OFF_CENTRE = KINDS.index("off_centre")  # how the renderer draws a copy displaced on its canvas
log = logging.getLogger("cryo_forum")


@dataclass(frozen=True)
class JobSettings:
    """What a simulated job holds; lengths in A, defoci in A, B-factors in A^2, origins in working px.

    ``optics`` holds one (voltage kV, Cs mm, amplitude contrast) row per optics group. Sequences are kept as
    tuples, so settings read back from ``job.json`` compare equal.
    """

    n: int = 4000
    n_consensus: int = 2400
    box: int = 64
    extract_box: int = 128
    pixel_size: float = 4.58
    snr: float = 0.1
    view_clusters: int = 3
    clustered_fraction: float = 0.65
    cluster_concentration: float = 20.0
    origin_sigma_px: float = 2.0
    defocus_range: tuple[float, float] = (8000.0, 30000.0)
    astigmatism: float = 300.0
    defocus_spread: float = 100.0
    bfactor_range: tuple[float, float] = (40.0, 160.0)
    optics: tuple[tuple[float, float, float], ...] = ((300.0, 2.7, 0.1), (300.0, 0.01, 0.07), (200.0, 2.7, 0.1))
    noise_floor: float = 0.1
    noise_corner_angstrom: float = 15.0
    junk_fraction: float = 0.2
    junk_kinds: tuple[str, ...] = JUNK_KINDS
    particles_per_micrograph: int = 50
    consensus_pose_error_deg: float = 1.5
    consensus_origin_error_px: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("defocus_range", "bfactor_range"):
            object.__setattr__(self, name, tuple(float(value) for value in getattr(self, name)))
        object.__setattr__(self, "optics", tuple(tuple(float(value) for value in row) for row in self.optics))
        object.__setattr__(self, "junk_kinds", tuple(self.junk_kinds))

    @property
    def extraction_pixel_size(self) -> float:
        """The pixel size (A) of the extraction box the images are rendered in."""
        return self.pixel_size * self.box / self.extract_box

    def validate(self) -> None:
        """Raise :class:`~cryo_forum.errors.InvalidSetting` naming the first field out of range."""
        optics_ok = len(self.optics) > 0 and all(
            len(row) == 3 and row[0] > 0 and row[1] >= 0 and 0 <= row[2] < 1 for row in self.optics
        )
        checks = [
            ("n", int(self.n) == self.n and self.n > 0, f"must be a positive integer, got {self.n}"),
            ("n_consensus", 0 < self.n_consensus <= self.n, f"must be in [1, n = {self.n}], got {self.n_consensus}"),
            ("box", int(self.box) == self.box and self.box >= 16 and self.box % 2 == 0, "must be even and >= 16"),
            ("extract_box", self.extract_box % 2 == 0 and self.extract_box >= self.box, "must be even and >= box"),
            ("pixel_size", self.pixel_size > 0, f"must be positive (A), got {self.pixel_size}"),
            ("snr", self.snr > 0, f"must be positive, got {self.snr}"),
            ("view_clusters", 0 <= self.view_clusters <= 10, f"must be in [0, 10], got {self.view_clusters}"),
            ("clustered_fraction", 0 <= self.clustered_fraction <= 1, "must be in [0, 1]"),
            ("cluster_concentration", self.cluster_concentration > 0, "must be positive"),
            ("origin_sigma_px", self.origin_sigma_px >= 0, "must be >= 0 (px)"),
            ("defocus_range", 0 < self.defocus_range[0] <= self.defocus_range[1], "needs 0 < MIN <= MAX (A)"),
            ("astigmatism", self.astigmatism >= 0, "must be >= 0 (A)"),
            ("defocus_spread", self.defocus_spread >= 0, "must be >= 0 (A)"),
            ("bfactor_range", 0 <= self.bfactor_range[0] <= self.bfactor_range[1], "needs 0 <= MIN <= MAX"),
            ("optics", optics_ok, "needs rows of (voltage > 0 kV, Cs >= 0 mm, amplitude contrast in [0, 1))"),
            ("noise_floor", 0 <= self.noise_floor <= 1, "must be in [0, 1]"),
            ("noise_corner_angstrom", self.noise_corner_angstrom > 0, "must be positive (A)"),
            ("junk_fraction", 0 <= self.junk_fraction < 1, f"must be in [0, 1), got {self.junk_fraction}"),
            (
                "junk_kinds",
                len(self.junk_kinds) > 0 and set(self.junk_kinds) <= set(JUNK_KINDS),
                f"choose from {', '.join(JUNK_KINDS)}, got {', '.join(self.junk_kinds) or 'none'}",
            ),
            ("particles_per_micrograph", self.particles_per_micrograph >= 1, "must be >= 1"),
            ("consensus_pose_error_deg", self.consensus_pose_error_deg >= 0, "must be >= 0 (deg)"),
            ("consensus_origin_error_px", self.consensus_origin_error_px >= 0, "must be >= 0 (px)"),
        ]
        for field, ok, message in checks:
            if not ok:
                raise InvalidSetting(field, message)

    def noise_spectrum(self) -> tuple[float, ...]:
        """Relative noise power per radial shell of the extraction box (``extract_box // 2 + 1`` values)."""
        frequencies = np.arange(self.extract_box // 2 + 1) / (self.extract_box * self.extraction_pixel_size)
        falling = 1.0 / (1.0 + (frequencies * self.noise_corner_angstrom) ** 2)
        return tuple(float(value) for value in self.noise_floor + (1.0 - self.noise_floor) * falling)


# ---------------------------------------------------------------- what every particle is


@dataclass(frozen=True)
class JobPlan:
    """Every particle's draws, arrays of n in file order (micrograph after micrograph).

    ``quaternion`` [n, 4] and ``origin`` [n, 2] (working px) are the truth; ``kind`` [n] indexes JOB_KINDS;
    ``micrograph``, ``optics_group`` (from 0) and ``subset`` (1 or 2) [n]; ``ctf`` maps CTF_KEYS to [n];
    ``consensus`` [n] (bool) with ``consensus_quaternion`` [n, 4] and ``consensus_origin`` [n, 2] (what the
    refinement says); ``copies`` [n] (an aggregate's further copies), ``copy_quaternion`` [n, MAX_COPIES, 4] and
    ``copy_offset`` [n, MAX_COPIES, 2] (working px); ``carbon_contrast`` [n].
    """

    quaternion: np.ndarray
    origin: np.ndarray
    kind: np.ndarray
    micrograph: np.ndarray
    optics_group: np.ndarray
    subset: np.ndarray
    ctf: dict[str, np.ndarray]
    consensus: np.ndarray
    consensus_quaternion: np.ndarray
    consensus_origin: np.ndarray
    copies: np.ndarray
    copy_quaternion: np.ndarray
    copy_offset: np.ndarray
    carbon_contrast: np.ndarray

    def __len__(self) -> int:
        return len(self.kind)


def _unit_vectors(rng: np.random.Generator, count: int) -> np.ndarray:
    vectors = rng.standard_normal((count, 3))
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def view_centres(settings: JobSettings) -> np.ndarray:
    """The viewing directions [view_clusters, 3] the clusters gather around, at least 60 deg apart."""
    rng = np.random.default_rng([settings.seed, _CENTRE_STREAM])
    centres: list[np.ndarray] = []
    while len(centres) < settings.view_clusters:
        candidate = _unit_vectors(rng, 1)[0]
        if all(candidate @ centre < math.cos(math.radians(_MIN_CLUSTER_SEPARATION_DEG)) for centre in centres):
            centres.append(candidate)
    return np.asarray(centres).reshape(-1, 3)


def _von_mises_fisher(rng: np.random.Generator, means: np.ndarray, concentration: float) -> np.ndarray:
    """Unit vectors [m, 3] drawn from von Mises-Fisher distributions about ``means`` [m, 3] (Wood 1994)."""
    u = rng.uniform(size=len(means))
    cosine = 1.0 + np.log(u + (1.0 - u) * np.exp(-2.0 * concentration)) / concentration
    across = _unit_vectors(rng, len(means))
    across -= np.sum(across * means, axis=1, keepdims=True) * means
    across /= np.linalg.norm(across, axis=1, keepdims=True)
    return cosine[:, None] * means + np.sqrt(np.clip(1.0 - cosine**2, 0.0, None))[:, None] * across


def _poses(rng: np.random.Generator, count: int, settings: JobSettings) -> np.ndarray:
    """Quaternions [count, 4]: viewing directions from the clusters or uniform, in-plane angles uniform."""
    directions = _unit_vectors(rng, count)
    centres = view_centres(settings)
    clustered = rng.uniform(size=count) < (settings.clustered_fraction if len(centres) else 0.0)
    cluster = rng.integers(max(len(centres), 1), size=count)
    if clustered.any():
        chosen = centres[cluster[clustered]]
        directions[clustered] = _von_mises_fisher(rng, chosen, settings.cluster_concentration)
    # the third row of A(rot, tilt, psi) is (sin tilt cos rot, sin tilt sin rot, cos tilt): the viewing direction
    rot = np.degrees(np.arctan2(directions[:, 1], directions[:, 0]))
    tilt = np.degrees(np.arccos(np.clip(directions[:, 2], -1.0, 1.0)))
    psi = rng.uniform(0.0, 360.0, size=count)
    return geometry.euler_to_quaternion(np.stack([rot, tilt, psi], axis=-1))


def _kinds(rng: np.random.Generator, settings: JobSettings, count: int) -> np.ndarray:
    """Kinds [count] (JOB_KINDS indices): exactly round(junk_fraction * count) junk in equal shares, shuffled."""
    junk = round(settings.junk_fraction * count)
    shares = np.full(len(settings.junk_kinds), junk // len(settings.junk_kinds))
    shares[: junk % len(settings.junk_kinds)] += 1
    codes = [JOB_KINDS.index(kind) for kind in settings.junk_kinds]
    return rng.permutation(np.concatenate([np.zeros(count - junk, int), np.repeat(codes, shares)]))


def _ctf(rng: np.random.Generator, settings: JobSettings, micrograph: np.ndarray, group: np.ndarray) -> dict:
    """CTF_KEYS -> [n]: each micrograph's defocus, astigmatism and B-factor, each particle's height, its optics."""
    count = int(micrograph.max()) + 1
    mean_defocus = rng.uniform(*settings.defocus_range, size=count)[micrograph]
    astigmatism = rng.exponential(settings.astigmatism, size=count)[micrograph] if settings.astigmatism else 0.0
    angle = rng.uniform(0.0, 180.0, size=count)[micrograph]
    bfactor = rng.uniform(*settings.bfactor_range, size=count)[micrograph]
    height = rng.normal(0.0, settings.defocus_spread, size=len(micrograph))
    optics = np.asarray(settings.optics)[group]
    return {
        "defocus_u": mean_defocus + height + astigmatism / 2.0,
        "defocus_v": mean_defocus + height - astigmatism / 2.0,
        "defocus_angle": angle,
        "voltage": optics[:, 0],
        "spherical_aberration": optics[:, 1],
        "amplitude_contrast": optics[:, 2],
        "bfactor": bfactor,
        "phase_shift": np.zeros(len(micrograph)),
    }


def _perturbed(rng: np.random.Generator, quaternions: np.ndarray, rms_deg: float) -> np.ndarray:
    """Quaternions [m, 4] each turned by a random rotation about a uniform axis of RMS angle ``rms_deg``."""
    rotvecs = rng.normal(0.0, math.radians(rms_deg) / math.sqrt(3.0), size=(len(quaternions), 3))
    errors = geometry.matrix_to_quaternion(geometry.rotvec_to_matrix(rotvecs))
    return geometry.canonical_quaternion(geometry.quaternion_multiply(errors, quaternions))


def plan_job(settings: JobSettings, pilots: bool = False) -> JobPlan:
    """Every particle of the job (or, with ``pilots``, PILOT_PARTICLES particles without junk drawn like them, that
    set the noise level), from the settings' seed alone."""
    if pilots:
        settings = dataclasses.replace(settings, n=PILOT_PARTICLES, n_consensus=0, junk_fraction=0.0)
    n = settings.n
    rng = np.random.default_rng([settings.seed, _PILOT_STREAM if pilots else _PLAN_STREAM])
    micrograph = np.arange(n) // settings.particles_per_micrograph
    micrographs = int(micrograph[-1]) + 1
    group = (micrograph * len(settings.optics)) // micrographs  # consecutive micrographs: sessions
    kind = _kinds(rng, settings, n)
    quaternion = _poses(rng, n, settings)
    unaligned = (kind != 0) & (kind != JOB_KINDS.index("aggregate"))  # another molecule, or none
    quaternion[unaligned] = geometry.random_quaternions(int(unaligned.sum()), rng)
    origin = rng.normal(0.0, settings.origin_sigma_px, size=(n, 2))
    ctf = _ctf(rng, settings, micrograph, group)
    subset = rng.integers(1, 3, size=n)
    consensus = np.zeros(n, bool)
    consensus[rng.permutation(n)[: settings.n_consensus]] = True
    junk = kind != 0
    consensus_quaternion = _perturbed(rng, quaternion, settings.consensus_pose_error_deg)
    consensus_quaternion[junk] = geometry.random_quaternions(int(junk.sum()), rng)
    consensus_origin = origin + rng.normal(0.0, settings.consensus_origin_error_px, size=(n, 2))
    consensus_origin[junk] = rng.normal(0.0, settings.origin_sigma_px, size=(int(junk.sum()), 2))
    reach = rng.uniform(*AGGREGATE_REACH, size=(n, MAX_COPIES)) * settings.box
    direction = rng.uniform(0.0, 2.0 * math.pi, size=(n, MAX_COPIES))
    return JobPlan(
        quaternion=quaternion,
        origin=origin,
        kind=kind,
        micrograph=micrograph,
        optics_group=group,
        subset=subset,
        ctf=ctf,
        consensus=consensus,
        consensus_quaternion=consensus_quaternion,
        consensus_origin=consensus_origin,
        copies=rng.integers(1, MAX_COPIES + 1, size=n),
        copy_quaternion=geometry.random_quaternions(n * MAX_COPIES, rng).reshape(n, MAX_COPIES, 4),
        copy_offset=reach[..., None] * np.stack([np.cos(direction), np.sin(direction)], axis=-1),
        carbon_contrast=rng.uniform(*CARBON_CONTRAST, size=n),
    )


# ---------------------------------------------------------------- the images


def _in_chunks(render: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, chunk: int) -> np.ndarray:
    """``render`` of rows [m], ``chunk`` at a time (the last padded by repeating its last row, so that every call
    has one shape and compiles once), concatenated: [m, ...]."""
    parts = []
    for start in range(0, len(rows), chunk):
        part = rows[start : start + chunk]
        parts.append(np.asarray(render(np.pad(part, (0, chunk - len(part)), mode="edge")))[: len(part)])
    return np.concatenate(parts)


class JobSimulator:
    """The images of a job's particles, from the maps [E, E, E] (E = extract_box, at the extraction pixel size).

    :meth:`signal` and :meth:`extracted` give float32 [m, E, E] at the extraction size (noise-free, and with
    noise), :meth:`images` [m, D, D] as written (D = box). ``signal_std`` is the particles' signal standard
    deviation and ``noise_std`` the noise's, both at the extraction size. Memory: two spectrum tables of
    ``(2 E + 2)^3`` complex64 values (137 MB each at E = 128) and a chunk of images on the renderer's canvas.
    """

    def __init__(self, volume: np.ndarray, other_volume: np.ndarray | None, settings: JobSettings):
        self.settings = settings
        self.plan = plan_job(settings)
        self._apix = settings.extraction_pixel_size
        self._chunk = render_chunk(settings.extract_box, 64)
        # copies of aggregates are the renderer's off-centre particles; the job draws its own kinds
        options = SimulationSettings(
            n=1,
            noise_spectrum=settings.noise_spectrum(),
            outlier_fraction=1.0,
            outlier_kinds=("off_centre",),
            seed=settings.seed,
        )
        self._main = ParticleRenderer(volume, self._apix, options)
        self._signal = tf.function(self._main.signal, autograph=False)
        self._canvas = tf.function(self._main.canvas_images, autograph=False)
        self._noise = tf.function(
            lambda index: self._main.unit_noise(index, settings.seed),
            input_signature=[tf.TensorSpec([None], tf.int64)],
            autograph=False,
        )
        self._other_signal = None
        if JOB_KINDS.index("other_protein") in self.plan.kind:
            if other_volume is None:
                raise InvalidSetting("junk_kinds", "other_protein junk needs another map")
            other = ParticleRenderer(other_volume, self._apix, options)
            scale = self._main.signal_std / other.signal_std  # the same contrast: maps come in arbitrary units
            other_signal = tf.function(other.signal, autograph=False)
            self._other_signal = lambda draws: scale * other_signal(draws)
        self.signal_std, self.noise_std = self._levels()

    def _draws(self, plan: JobPlan, rows: np.ndarray, copy: int | None = None) -> dict[str, tf.Tensor]:
        """The renderer's draws of particles ``rows`` [m] (or of their further copies number ``copy``)."""
        scale = self.settings.extract_box / self.settings.box
        count = len(rows)
        quaternion = plan.quaternion[rows] if copy is None else plan.copy_quaternion[rows, copy]
        displacement = np.zeros((count, 2)) if copy is None else scale * plan.copy_offset[rows, copy]
        draws = {
            "quaternion": quaternion,
            "origin": scale * plan.origin[rows],
            **{key: plan.ctf[key][rows] for key in CTF_KEYS},
            "displacement": displacement,
            "ice_contrast": np.ones(count),
            "ice": np.zeros((count, ICE_DRAWS)),
        }
        draws = {key: tf.constant(value, tf.float32) for key, value in draws.items()}
        draws["kind"] = tf.fill([count], 0 if copy is None else _OFF_CENTRE)
        draws["variant"] = tf.zeros([count], tf.int32)
        return draws

    def _carbon(self, plan: JobPlan, rows: np.ndarray) -> np.ndarray:
        """Carbon edges [m, E, E] through the CTF, at their contrast."""
        size, seed = self.settings.extract_box, self.settings.seed
        unique, inverse = np.unique(rows, return_inverse=True)  # a padded chunk repeats its last row
        textures = [
            carbon_texture(np.random.default_rng([seed, _CARBON_STREAM, row]), 2 * size, size) for row in unique
        ]
        textures = np.stack(textures).astype(np.float32)[inverse]
        images = self._canvas(textures, self._draws(plan, rows)).numpy()
        contrast = plan.carbon_contrast[rows] * self.signal_std / np.maximum(images.std(axis=(1, 2)), 1e-12)
        return images * contrast[:, None, None].astype(np.float32)

    def _signal_of(self, plan: JobPlan, rows: np.ndarray) -> np.ndarray:
        """Noise-free images float32 [m, E, E] of ``plan``'s particles ``rows``: one pass per part (particles,
        other protein, each further copy of aggregates, carbon), each in chunks of one shape."""
        size, chunk = self.settings.extract_box, self._chunk
        out = np.zeros((len(rows), size, size), np.float32)
        kind = plan.kind[rows]
        aggregate = kind == JOB_KINDS.index("aggregate")
        passes = [((kind == 0) | aggregate, lambda r: self._signal(self._draws(plan, r)))]
        if self._other_signal is not None:
            other = kind == JOB_KINDS.index("other_protein")
            passes.append((other, lambda r: self._other_signal(self._draws(plan, r))))
        for copy in range(MAX_COPIES):
            further = aggregate & (plan.copies[rows] > copy)
            passes.append((further, lambda r, copy=copy: self._signal(self._draws(plan, r, copy))))
        passes.append((kind == JOB_KINDS.index("carbon"), lambda r: self._carbon(plan, r)))
        for chosen, render in passes:
            where = np.flatnonzero(chosen)
            if len(where):
                out[where] += _in_chunks(render, rows[where], chunk)
        return out

    def _levels(self) -> tuple[float, float]:
        """(signal std, noise std) at the extraction size, such that the pilot particles' var(signal) /
        var(noise), both Fourier-cropped to the working size, is ``snr``."""
        pilots = plan_job(self.settings, pilots=True)
        index = np.arange(PILOT_PARTICLES)
        signal = self._signal_of(pilots, index)
        noise = _in_chunks(lambda r: self._noise(-1 - r), index, self._chunk)  # particles -1, -2, ...: not the job's
        box = self.settings.box
        signal_var, noise_var = (np.mean(np.var(fourier_crop(x, box), axis=(1, 2))) for x in (signal, noise))
        noise_std = math.sqrt(signal_var / self.settings.snr / noise_var)
        return float(np.sqrt(np.mean(np.var(signal, axis=(1, 2))))), noise_std

    def signal(self, rows) -> np.ndarray:
        """Noise-free images float32 [m, E, E] of particles ``rows`` (positions in the plan)."""
        return self._signal_of(self.plan, np.asarray(rows, dtype=np.int64))

    def extracted(self, rows) -> np.ndarray:
        """Images float32 [m, E, E] of particles ``rows`` at the extraction size, noise included."""
        rows = np.asarray(rows, dtype=np.int64)
        noise = _in_chunks(lambda r: self._noise(r), rows, self._chunk)
        return self.signal(rows) + np.float32(self.noise_std) * noise

    def images(self, rows) -> np.ndarray:
        """Images float32 [m, D, D] of particles ``rows`` as written: extracted and Fourier-cropped (a chunk at a
        time: the crop's spectra are complex128)."""
        extracted, chunk = self.extracted(rows), self._chunk
        return np.concatenate(
            [fourier_crop(extracted[start : start + chunk], self.settings.box) for start in range(0, len(rows), chunk)]
        )


# ---------------------------------------------------------------- the files


def stack_name(micrograph: int) -> str:
    """The stack of a micrograph's particles, relative to the job's folder."""
    return f"{STACK_FOLDER}/mic{micrograph + 1:05d}.mrcs"


def _optics_table(settings: JobSettings) -> pd.DataFrame:
    groups = np.arange(1, len(settings.optics) + 1)
    optics = np.asarray(settings.optics)
    return pd.DataFrame(
        {
            star.OPTICS_GROUP: groups,
            star.OPTICS_GROUP_NAME: [f"opticsGroup{group}" for group in groups],
            star.VOLTAGE: optics[:, 0],
            star.CS: optics[:, 1],
            star.AMPLITUDE_CONTRAST: optics[:, 2],
            star.IMAGE_PIXEL_SIZE: settings.pixel_size,
            star.IMAGE_SIZE: settings.box,
            star.IMAGE_DIMENSIONALITY: 2,
        }
    )


def _pose_columns(quaternions: np.ndarray, origins: np.ndarray, pixel_size: float) -> dict[str, np.ndarray]:
    angles = geometry.quaternion_to_euler(quaternions)
    return {
        star.ANGLE_ROT: angles[:, 0],
        star.ANGLE_TILT: angles[:, 1],
        star.ANGLE_PSI: angles[:, 2],
        star.ORIGIN_X_ANGST: origins[:, 0] * pixel_size,
        star.ORIGIN_Y_ANGST: origins[:, 1] * pixel_size,
    }


def job_tables(plan: JobPlan, settings: JobSettings) -> dict[str, pd.DataFrame]:
    """The particle tables of consensus.star, rest.star and truth.star (file order within each)."""
    position = np.arange(len(plan)) - np.searchsorted(plan.micrograph, plan.micrograph)  # within its micrograph
    common = pd.DataFrame(
        {
            star.IMAGE_NAME: [f"{p + 1:06d}@{stack_name(m)}" for p, m in zip(position, plan.micrograph, strict=True)],
            star.MICROGRAPH_NAME: [f"Micrographs/mic{m + 1:05d}.mrc" for m in plan.micrograph],
            star.OPTICS_GROUP: plan.optics_group + 1,
            star.DEFOCUS_U: plan.ctf["defocus_u"],
            star.DEFOCUS_V: plan.ctf["defocus_v"],
            star.DEFOCUS_ANGLE: plan.ctf["defocus_angle"],
            star.CTF_BFACTOR: plan.ctf["bfactor"],
            star.PHASE_SHIFT: plan.ctf["phase_shift"],
        }
    )
    refined = _pose_columns(plan.consensus_quaternion, plan.consensus_origin, settings.pixel_size)
    consensus = common.assign(**refined, **{star.RANDOM_SUBSET: plan.subset})[plan.consensus]
    kinds = np.asarray(JOB_KINDS)[plan.kind]
    truth = common.assign(
        **_pose_columns(plan.quaternion, plan.origin, settings.pixel_size),
        **{
            star.RANDOM_SUBSET: plan.subset,
            star.OUTLIER: (plan.kind != 0).astype(int),
            star.OUTLIER_KIND: kinds,
            JOB_SET: np.where(plan.consensus, "consensus", "rest"),
        },
    )
    tables = {CONSENSUS_STAR: consensus, REST_STAR: common[~plan.consensus], TRUTH_STAR: truth}
    return {name: table.reset_index(drop=True) for name, table in tables.items()}


def job_counts(plan: JobPlan) -> dict[str, dict[str, int]]:
    """Particles per kind in the consensus, the rest and all."""
    sets = {"consensus": plan.consensus, "rest": ~plan.consensus, "all": np.ones(len(plan), bool)}
    return {
        name: {kind: int(np.sum(chosen & (plan.kind == code))) for code, kind in enumerate(JOB_KINDS)}
        for name, chosen in sets.items()
    }


def file_record(path: str | os.PathLike) -> dict[str, str]:
    """A map's absolute path and sha256."""
    path = Path(path).resolve()
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def check_job_outputs(out_dir: Path, settings: JobSettings, sources: Mapping[str, str | os.PathLike]) -> None:
    """Refuse, before any work, invalid settings, an output folder that is not new or empty (or holds a source
    map), and a job whose files would not fit on its disk or whose maps would not fit in memory."""
    settings.validate()
    guard = OutputGuard()
    for path in sources.values():
        guard.protect(path, "a map of the job")
    guard.check_folder(out_dir)
    size, n = settings.extract_box, settings.n
    files = resources.stack_bytes(n, settings.box) + 3 * n * resources.STAR_BYTES_PER_PARTICLE + 4 * settings.box**3
    resources.require_disk("n", files, out_dir, f"{n} particles of {settings.box} px")
    memory = 2 * resources.projector_bytes(size) + 2 * resources.map_bytes(size) + resources.render_bytes(size, 64, 1)
    resources.require_memory("extract_box", memory, f"a {size} px extraction box", "the projectors of two maps")


def write_job(
    out_dir: str | os.PathLike,
    volume: np.ndarray,
    pixel_size: float,
    other_volume: np.ndarray | None,
    other_pixel_size: float | None,
    settings: JobSettings = JobSettings(),
    sources: Mapping[str, str | os.PathLike] | None = None,
    progress: bool = False,
) -> Path:
    """Write a simulated job (see the module docstring) into ``out_dir``, a new or empty folder, whole or not at all.

    ``volume`` and ``other_volume`` (the other protein, needed for ``other_protein`` junk) are maps [z, y, x] at
    their pixel sizes (A), resampled to the extraction pixel size and box, centred on their centres of mass.
    ``sources`` names the files they came from (``{"map": ..., "other_map": ...}``), recorded with their sha256 in
    job.json and kept off the outputs. Images are rendered and written a block of micrographs at a time.
    """
    out_dir, sources = Path(out_dir), dict(sources or {})
    check_job_outputs(out_dir, settings, sources)
    size, apix = settings.extract_box, settings.extraction_pixel_size
    volume = resample_volume(volume, pixel_size, apix, size).astype(np.float64)
    if other_volume is not None:
        other_volume = resample_volume(other_volume, other_pixel_size, apix, size).astype(np.float64)
    simulator = JobSimulator(volume, other_volume, settings)
    plan = simulator.plan
    log.info(f"job: signal std {simulator.signal_std:.4g}, noise std {simulator.noise_std:.4g} at {size} px")
    with atomic_directory(out_dir) as staging:
        (staging / STACK_FOLDER).mkdir()
        with progress_bar(len(plan), description="simulate job", enabled=progress) as bar:
            for rows in _micrograph_blocks(plan, settings):
                images = simulator.images(rows)
                for micrograph in np.unique(plan.micrograph[rows]):
                    mine = plan.micrograph[rows] == micrograph
                    write_stack(staging / stack_name(int(micrograph)), images[mine], settings.pixel_size)
                bar.update(len(rows))
        optics = _optics_table(settings)
        for name, particles in job_tables(plan, settings).items():
            blocks = {star.OPTICS_BLOCK: optics, star.PARTICLES_BLOCK: particles}
            star.write_star(staging / name, blocks, version=30001)
        write_volume(staging / MAP_NAME, fourier_crop_volume(volume, settings.box), settings.pixel_size)
        record = {
            "settings": dataclasses.asdict(settings),
            "extraction_pixel_size": apix,
            "signal_std": simulator.signal_std,
            "noise_std": simulator.noise_std,
            "view_centres": view_centres(settings).tolist(),
            "counts": job_counts(plan),
            "maps": {name: file_record(path) for name, path in sources.items()},
        }
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return out_dir


def _micrograph_blocks(plan: JobPlan, settings: JobSettings, particles: int = 1024):
    """Rows [m] of whole micrographs, about ``particles`` at a time, in file order."""
    per_block = max(1, particles // settings.particles_per_micrograph)
    last = int(plan.micrograph[-1])
    for first in range(0, last + 1, per_block):
        yield np.flatnonzero((plan.micrograph >= first) & (plan.micrograph < first + per_block))


def write_job_from_files(
    out_dir: str | os.PathLike,
    volume: str | os.PathLike,
    other_volume: str | os.PathLike | None,
    settings: JobSettings = JobSettings(),
    progress: bool = False,
) -> Path:
    """:func:`write_job` of maps or atomic models read from files (loaded at the extraction pixel size and box)."""
    sources = {"map": volume} | ({} if other_volume is None else {"other_map": other_volume})
    check_job_outputs(Path(out_dir), settings, sources)
    apix, size = settings.extraction_pixel_size, settings.extract_box
    maps = {name: load_volume(path, pixel_size=apix, size=size)[0] for name, path in sources.items()}
    other = maps.get("other_map")
    return write_job(out_dir, maps["map"], apix, other, apix, settings, sources, progress)
