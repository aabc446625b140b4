"""Local refinement: the network's poses and origins finished by a local fit against a map.

Each particle starts from its predicted pose and origin. Its origin is first searched at that pose within
``shift_px`` of where it started (:meth:`OriginSearch.best_origins`, sub-pixel), then pose and origin are fitted
together by Gauss-Newton steps on the matcher's CTF-aware, whitened score (:mod:`cryo_forum.prediction.local_fit`),
in stages whose step (the trust region of a rotation step) halves down to ``step_deg``. A stage's band stops at
``coarse_band`` cycles per radian of its step, as the global grid's does, so a wide stage is not misled by detail
finer than it can resolve and the fit widens to the whole band as it closes in. How wide the search starts depends
on the network's uncertainty: a particle whose expected error is e starts at the stage that reaches
``radius_per_error * e`` (at least ``min_radius_deg``), so a sure particle costs a few stages and an unsure one
more; one whose radius would exceed ``global_above_deg`` is searched globally first (the matcher's coarse grid,
symmetry-aware, over origins 1 px apart within ``shift_px``).

Junk is told by the fit (:func:`misfit_scores`): an image the map explains badly, either because the fit is weak
(empty picks, ice) or because much of its low-resolution power is left over (aggregates, carbon, other proteins).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from cryo_forum import geometry, resources
from cryo_forum.io import star
from cryo_forum.io.partial import PartialResults, fingerprint
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.physics.particle_ctf import ParticleCTFs
from cryo_forum.prediction.calibration import numeric_columns
from cryo_forum.prediction.directional import view_model, view_z_scores
from cryo_forum.prediction.local_fit import LocalFit, expected_errors_deg
from cryo_forum.prediction.matching import ProjectionMatcher, particle_spectra, shell_noise_power
from cryo_forum.prediction.refine_settings import RefineSettings
from cryo_forum.prediction.shifts import OriginSearch
from cryo_forum.progress import progress as progress_bar

log = logging.getLogger(__name__)

RESIDUAL_BAND = 1 / 8  # cycles per box pixel: four per particle diameter in a box twice its size
FIT_JUNK_THRESHOLD = 3.0  # the recommended cut of misfit_scores: 3 robust standard deviations beyond the view's
CHECKPOINT_PARTICLES = 1024  # particles refined between two saves of a resumable refinement
# what LocalRefiner.refine returns per particle, in its order, and the shape of each
REFINED_ARRAYS = {"poses": (4,), "origins": (2,), "scores": (), "errors": (), "residuals": ()}
GAUSSIAN_BOUND_90 = 1.4435  # 90 % of an isotropic 3-D Gaussian's draws lie within 1.4435 x its RMS (chi2_3)


class LocalRefiner:
    """Refines poses and origins of one set's particles against one map [D, D, D] sampled like them."""

    def __init__(self, particles: ParticleSet, volume: np.ndarray, settings: RefineSettings | None = None):
        settings = settings or RefineSettings()
        settings.validate()
        noise = shell_noise_power(particles)
        self.settings = settings
        self.particles = particles
        self.matcher = ProjectionMatcher(volume, settings.matching(), noise)
        self.origins = OriginSearch(particles, volume, noise)
        self.ctfs = ParticleCTFs(particles)
        self.fit = LocalFit(self.matcher.projector)
        self.steps = settings.steps()
        self.narrow_shifts = settings.narrow_shifts()

    def refine(
        self, indices: np.ndarray, quaternions: np.ndarray, origins: np.ndarray, first: np.ndarray, wide: bool = False
    ) -> tuple[np.ndarray, ...]:
        """Poses [b, 4], origins [b, 2] (px), scores [b], expected errors [b] (degrees) and low-resolution
        residuals [b] (:func:`misfit_scores`) of particles ``indices`` [b] started at ``quaternions``, ``origins``
        and stages ``first`` [b] (from :meth:`RefineSettings.first_stages`; -1: global first, over origins within
        ``shift_px``). With ``wide`` every particle is searched globally first over the origins within the wide
        reach (:attr:`RefineSettings.wide_reach`), and its origin then moves within ``shift_px`` of the one found."""
        images = self.particles.images(indices)
        spectra = particle_spectra(images)
        ctf = self.ctfs(indices)
        flat_ctf = np.asarray(ctf, dtype=np.float64).reshape(len(indices), -1)
        start = np.asarray(origins, dtype=np.float64)
        poses, first = np.array(quaternions, dtype=np.float64), np.array(first)
        if wide:
            poses, start, _ = self.matcher.coarse_search(spectra, flat_ctf, start)
            first = np.full(len(first), self.settings.after_global())
        moved = start.copy()
        searched = first < 0
        if searched.any():
            poses[searched], moved[searched], _ = self.matcher.coarse_search(
                spectra[searched], flat_ctf[searched], moved[searched], self.narrow_shifts
            )
            first[searched] = self.settings.after_global()
        if self.settings.shift_px > 0:
            weighted = self.origins.weighted_spectra(images)
            moved = self.origins.best_origins(weighted, ctf, poses, start, self.settings.shift_px)[0]
        state, band, data = None, None, None
        for stage, step in enumerate(self.steps):
            active = first <= stage
            if not active.any():
                continue
            stage_band = self.matcher.band(self.settings.coarse_band / math.radians(step))
            iterations = self.settings.iterations if stage_band.radius < 0.5 * self.matcher.fine.radius else 1
            if stage_band is not band:
                band, data = stage_band, self.fit.on_band(stage_band, spectra, flat_ctf)
                state = self.fit.state(data, poses, moved)
            state = self.fit.iterate(data, state, active, start, step, self.settings.shift_px, iterations)
            poses, moved = state.poses, state.origins
        low = self.matcher.band(self.particles.box_size * RESIDUAL_BAND)
        fit = self.fit.normal_equations(self.fit.on_band(low, spectra, flat_ctf), poses, moved)[0]
        residuals = np.sum(low.weights * np.abs(spectra[:, low.flat]) ** 2, axis=1) - fit**2
        return poses, moved, state.scores, expected_errors_deg(state), residuals


def refine_particles(
    particles: ParticleSet,
    volume: np.ndarray,
    quaternions: np.ndarray,
    expected_error_deg: np.ndarray,
    origins: np.ndarray | None = None,
    settings: RefineSettings | None = None,
    progress: bool = True,
    partial: Path | None = None,
) -> pd.DataFrame:
    """The refined STAR columns of every particle, started from poses ``quaternions`` [N, 4], origins [N, 2]
    (px; default the set's, zero where none) and the network's ``expected_error_deg`` [N] (NaN: unknown,
    searched globally).

    The table holds the angles, the origins (the set's layout), _cfMatchScore, _cfRefinedErrorDeg (the refined
    pose's expected error, :func:`~cryo_forum.prediction.local_fit.expected_errors_deg`), _cfRefinedBound90Deg
    (the 90 % bound that error implies for a Gaussian posterior) and _cfFitJunkScore. With a ``partial`` folder
    every CHECKPOINT_PARTICLES particles are kept there as they finish
    (:class:`~cryo_forum.io.partial.PartialResults`), and a call with the same inputs refines only the particles
    not yet kept; the caller removes the folder once the output is written.
    """
    from cryo_forum.prediction.predict import origin_columns

    settings = settings or RefineSettings()
    refiner = LocalRefiner(particles, volume, settings)
    first = settings.first_stages(expected_error_deg)
    if origins is None:
        origins = particles.shifts_px() if particles.has_origins else np.zeros((len(particles), 2))
    origins = np.asarray(origins, dtype=np.float64)
    kept = None
    if partial is not None:
        names = particles.table[star.IMAGE_NAME].to_numpy(dtype=str) if star.IMAGE_NAME in particles.table else None
        key = fingerprint(np.asarray(quaternions), first, origins, np.asarray(volume), names, settings)
        kept = PartialResults(partial, key)
    block = max(1, CHECKPOINT_PARTICLES // settings.batch_size) * settings.batch_size
    log.info(
        f"refining {len(particles)} particles: {np.mean(first < 0) * 100:.0f} % searched globally first, "
        f"stages from {refiner.steps[0]:.1f} to {refiner.steps[-1]:.2f} deg"
        + (f"; {kept.finished()} blocks of {block} already refined" if kept is not None and kept.finished() else "")
    )
    width = min(settings.batch_size, len(particles), fit_batch_limit(particles.box_size))
    run = functools.partial(_refine_blocks, refiner, quaternions, origins, first, width, block)
    with progress_bar(len(particles), description="refine", enabled=progress) as bar:
        results = run(np.arange(len(particles)), kept, bar)
    retried = _retry_candidates(results, first, settings)
    if len(retried):
        log.info(
            f"searching {len(retried)} particles again (a weak fit for their view): globally, over origins within "
            f"{settings.wide_reach:.1f} px"
        )
        again = None if kept is None else PartialResults(kept.folder / "again", fingerprint(key, retried))
        with progress_bar(len(retried), description="refine again", enabled=progress) as bar:
            second = run(retried, again, bar, wide=True)
        better = second["scores"] > results["scores"][retried]
        for name, values in second.items():
            results[name][retried[better]] = values[better]
    poses, errors = results["poses"], results["errors"]
    euler = geometry.quaternion_to_euler(poses)
    table = pd.DataFrame({star.ANGLE_ROT: euler[:, 0], star.ANGLE_TILT: euler[:, 1], star.ANGLE_PSI: euler[:, 2]})
    for column, values in origin_columns(particles, results["origins"]).items():
        table[column] = values
    table[star.MATCH_SCORE] = results["scores"]
    table[star.REFINED_ERROR] = errors
    table[star.REFINED_BOUND] = GAUSSIAN_BOUND_90 * errors  # the fit's own: it needs no calibration
    table[star.FIT_JUNK_SCORE] = misfit_scores(results["scores"], results["residuals"], poses, settings.symmetry)
    return table


def fit_batch_limit(size: int) -> int:
    """The most particles of ``size`` px one local fit step may take within resources.FIT_BATCH_BYTES."""
    frequencies = FourierGrid(size).inside.sum()
    return resources.chunk_of(2**31, resources.FIT_BYTES_PER_POINT * frequencies, resources.FIT_BATCH_BYTES)


def _refine_blocks(refiner, quaternions, origins, first, width, block, rows, kept, bar, wide=False) -> dict:
    """The refined arrays (REFINED_ARRAYS) of particles ``rows``, ``block`` at a time, each block kept in ``kept``
    (a PartialResults, or None) and taken from it when it was finished before."""
    results = {name: np.zeros((len(rows), *shape)) for name, shape in REFINED_ARRAYS.items()}
    for begin in range(0, len(rows), block):
        chunk = rows[begin : begin + block]
        done = kept.load(begin) if kept is not None else None
        if done is None:
            done = _refine_block(refiner, chunk, quaternions, origins, first, width, wide)
            if kept is not None:
                kept.save(begin, done)
        for name, values in done.items():
            results[name][begin : begin + len(chunk)] = values
        bar.update(len(chunk))
    return results


def _refine_block(refiner, rows, quaternions, origins, first, batch_size, wide) -> dict[str, np.ndarray]:
    """The refined arrays (REFINED_ARRAYS) of particles ``rows``, ``batch_size`` at a time. A short batch is
    padded with copies of its last particle, so every batch has one shape and the fit compiles once per band."""
    parts = []
    for begin in range(0, len(rows), batch_size):
        batch = rows[begin : begin + batch_size]
        padded = np.pad(batch, (0, batch_size - len(batch)), mode="edge")
        refined = refiner.refine(padded, quaternions[padded], origins[padded], first[padded], wide)
        parts.append([values[: len(batch)] for values in refined])
    return {name: np.concatenate([part[n] for part in parts]) for n, name in enumerate(REFINED_ARRAYS)}


def _retry_candidates(results: dict, first: np.ndarray, settings: RefineSettings) -> np.ndarray:
    """The particles to search again (:class:`RefineSettings`): a weak fit for their view
    (:func:`weak_fit_scores` above ``retry_above``), unless the same global search already found that fit."""
    weak = weak_fit_scores(results["scores"], results["poses"], settings.symmetry) > settings.retry_above
    if settings.wide_reach <= settings.shift_px:
        weak &= first >= 0  # searched globally already, over the same origins
    return np.flatnonzero(weak)


def search_widths(
    table: pd.DataFrame, settings: RefineSettings, source: str = "the predictions"
) -> tuple[np.ndarray, RefineSettings]:
    """What sets each particle's search radius, from a table of predictions: the calibrated 90 % bound
    (_cfErrorBound90Deg, searched out to it) when there is one, else the expected error (_cfExpectedErrorDeg, times
    ``radius_per_error``), else NaN (a global search). Returns the values [N] and the settings to use; a column
    holding text is a CryoForumError naming ``source``."""
    if star.ERROR_BOUND in table:
        bounds = numeric_columns(table, [star.ERROR_BOUND], source)[:, 0]
        return bounds, dataclasses.replace(settings, radius_per_error=1.0)
    if star.EXPECTED_ERROR in table:
        return numeric_columns(table, [star.EXPECTED_ERROR], source)[:, 0], settings
    return np.full(len(table), np.nan), settings


def misfit_scores(scores: np.ndarray, residuals: np.ndarray, quaternions: np.ndarray, symmetry: str) -> np.ndarray:
    """How badly the map explains each particle [N], as a directional z-score (larger = more likely junk).

    Two signs of junk, each compared with the particles seen from about the same direction
    (:func:`cryo_forum.prediction.directional.view_model`, robust to a minority of junk in the set): a weak fit
    (a low whitened score, in units of the noise) and a large residual, the whitened power of the image below
    RESIDUAL_BAND less the part the best-scaled projection explains. An empty pick fails the first; an aggregate,
    carbon or another protein holds power the projection does not explain and fails the second. The score is the
    larger of the two z-scores.
    """
    unexplained = view_z_scores(residuals, quaternions, view_model(residuals, quaternions, symmetry))
    return np.maximum(weak_fit_scores(scores, quaternions, symmetry), unexplained)


def weak_fit_scores(scores: np.ndarray, quaternions: np.ndarray, symmetry: str) -> np.ndarray:
    """How much weaker each particle's fit ``scores`` [N] is than those of the particles of its view, as a robust
    z-score [N] (:func:`cryo_forum.prediction.directional.view_z_scores`; larger = weaker)."""
    return view_z_scores(-scores, quaternions, view_model(-scores, quaternions, symmetry))
