"""Poses and uncertainties for every particle of a set, in batches, memory flat in the stack's size.

The result is a table with RELION's angle columns (degrees) and cryo-forum's uncertainty columns, ready
for :meth:`cryo_forum.io.particles.ParticleSet.write_star`: every input column is kept, the predicted
angles replace ``rlnAngleRot/Tilt/Psi``, and ``_cf*`` columns carry the uncertainty (larger = less sure),
``_cfExpectedErrorDeg`` (the default score) first.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cryo_forum.errors import CryoForumError
from cryo_forum.geometry import quaternion_to_euler
from cryo_forum.io import star
from cryo_forum.io.particles import ParticleSet
from cryo_forum.model.estimator import OrientationEstimator, inference_function
from cryo_forum.prediction import uncertainty
from cryo_forum.progress import progress as progress_bar
from cryo_forum.streams.augment import CENTRING_ERROR_PX
from cryo_forum.streams.preprocess import CTF_KEYS, Preprocessor
from cryo_forum.streams.readers import prediction_batches, stream_errors

log = logging.getLogger(__name__)

TRIAL_BAND = 0.25  # cycles per pixel: trial centres are ranked below it (a quarter of the reads), the winner at all


def preprocessor_for(particles: ParticleSet, trained: Preprocessor) -> Preprocessor:
    """The run's preprocessing applied to this set's box and pixel size (the network's input size is fixed).

    Logs a warning when the resulting pixel size differs from the training one by more than 2 %.
    """
    if particles.box_size < trained.image_size:
        raise CryoForumError(
            f"{particles.source}: particles of {particles.box_size} px are smaller than the model's "
            f"{trained.image_size} px input; use a model trained at {particles.box_size} px or less"
        )
    adapted = dataclasses.replace(trained, pixel_size_in=particles.pixel_size, input_size=particles.box_size)
    if abs(adapted.output_pixel_size / trained.output_pixel_size - 1.0) > 0.02:
        log.warning(
            f"{particles.source} gives {adapted.output_pixel_size:.2f} A/px at {adapted.image_size} px, "
            f"the model was trained at {trained.output_pixel_size:.2f} A/px"
        )
    return adapted


def predict_particles(
    model: OrientationEstimator,
    particles: ParticleSet,
    preprocessor: Preprocessor,
    indices: np.ndarray | None = None,
    batch_size: int = 256,
    progress: bool = True,
    reference: np.ndarray | None = None,
    centring: Centring | None = None,
) -> pd.DataFrame:
    """Predicted angles and uncertainty scores for ``indices`` (default: all), one row per particle.

    Particles with origins are re-centred by them first. With a ``reference`` map (sampled like the particles)
    particles without origins get them (see :mod:`cryo_forum.prediction.shifts`): the network predicts each
    particle re-centred by every trial origin of ``centring``, the trial whose pose the reference fits best gives
    the origin, and the particle re-centred there is predicted again and its origin refined at that pose; the
    table then holds the origins too.
    """
    indices = np.arange(len(particles)) if indices is None else np.asarray(indices)
    forward = inference_function(model)
    if reference is None or particles.has_origins:
        quaternions, eigenvalues = _predict(forward, particles, preprocessor, indices, batch_size, progress, None)
        return prediction_table(quaternions, eigenvalues)
    from cryo_forum.prediction.shifts import OriginSearch

    centring = centring or Centring.for_particles(particles, preprocessor)
    trials = centring.trials()
    log.info(f"centring {len(indices)} particles: the network's poses at {len(trials)} trial origins")
    search = OriginSearch(particles, reference)
    origins = np.zeros((len(indices), 2))
    with progress_bar(len(indices), description="centring", enabled=progress) as bar:
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            poses = _trial_poses(forward, particles, preprocessor, rows, trials)
            centres = np.broadcast_to(trials[:, None, :], (len(trials), len(rows), 2))
            found = search(poses, rows, centring.step_px, centres, progress=False, band=TRIAL_BAND * particles.box_size)
            origins[start : start + len(rows)] = found[0]
            bar.update(len(rows))
    quaternions, eigenvalues = _predict(forward, particles, preprocessor, indices, batch_size, progress, origins)
    origins, scores, _ = search(quaternions, indices, centring.step_px, origins[None], progress=progress)
    table = prediction_table(quaternions, eigenvalues)
    for column, values in origin_columns(particles, origins).items():
        table[column] = values
    table[star.SHIFT_SCORE] = scores
    return table


def _trial_poses(forward, particles: ParticleSet, preprocessor: Preprocessor, rows, trials) -> np.ndarray:
    """The network's poses [T, b, 4] of particles ``rows`` [b] re-centred at each trial origin [T, 2] (px): the
    images are read once and preprocessed once per trial (re-centring is part of the preprocessing)."""
    images = particles.images(rows)
    params = None
    if preprocessor.phase_flip:
        every = particles.ctf_parameters()
        params = {key: every[key][rows] for key in CTF_KEYS}
    poses = np.empty((len(trials), len(rows), 4))
    for number, trial in enumerate(trials):
        inputs = preprocessor(images, params, np.broadcast_to(trial, (len(rows), 2)))[..., None]
        poses[number] = forward(inputs)["quaternion"].numpy()
    return poses


@dataclass(frozen=True)
class Centring:
    """Where the origins of particles never aligned are looked for: trial origins every ``step_px`` within
    ``reach_px`` of the box centre (px of the particles' box)."""

    reach_px: float
    step_px: float

    @classmethod
    def for_particles(
        cls,
        particles: ParticleSet,
        preprocessor: Preprocessor,
        spread_angstrom: float | None = None,
        reach_px: float | None = None,
    ) -> Centring:
        """Trials within ``reach_px`` (default: 3 x the training set's origin spread ``spread_angstrom``, without
        it a tenth of the box), 1.5 x CENTRING_ERROR_PX of the network's pixels apart: every particle is then
        within the off-centring the network was trained for of one trial."""
        if reach_px is None and spread_angstrom is not None:
            reach_px = 3.0 * spread_angstrom / particles.pixel_size
        elif reach_px is None:
            reach_px = particles.box_size / 10
        step = 1.5 * CENTRING_ERROR_PX * particles.box_size / preprocessor.image_size
        return cls(reach_px=float(reach_px), step_px=float(step))

    def trials(self) -> np.ndarray:
        from cryo_forum.prediction.shifts import trial_origins

        return trial_origins(self.reach_px, self.step_px)


def _predict(forward, particles, preprocessor, indices, batch_size, progress, origins):
    """Quaternions [n, 4] and eigenvalues [n, 4] (NaN for heads without them) of particles ``indices``."""
    quaternions = np.zeros((len(indices), 4))
    eigenvalues = np.full((len(indices), 4), np.nan)
    row_of = np.zeros(len(particles), dtype=np.int64)  # particle index -> output row, 8 bytes per particle
    row_of[indices] = np.arange(len(indices))
    every = None
    if origins is not None:
        every = np.zeros((len(particles), 2))
        every[indices] = origins
    dataset = prediction_batches(particles, preprocessor, batch_size, indices=indices, origins=every)
    with progress_bar(len(indices), description="predict", enabled=progress) as bar, stream_errors():
        for batch_indices, images in dataset:
            outputs = forward(images)
            rows = row_of[batch_indices.numpy()]
            quaternions[rows] = outputs["quaternion"].numpy()
            if "eigenvalues" in outputs:
                eigenvalues[rows] = outputs["eigenvalues"].numpy()
            bar.update(len(rows))
    return quaternions, eigenvalues


def origin_columns(particles: ParticleSet, origins_px: np.ndarray) -> dict[str, np.ndarray]:
    """Origins [n, 2] (px) as the STAR columns of the set's layout: in Angstrom (RELION 3.1+) or px (3.0)."""
    if particles.relion_version == "3.0":
        return {star.ORIGIN_X: origins_px[:, 0], star.ORIGIN_Y: origins_px[:, 1]}
    angstrom = origins_px * particles.pixel_size
    return {star.ORIGIN_X_ANGST: angstrom[:, 0], star.ORIGIN_Y_ANGST: angstrom[:, 1]}


def prediction_table(quaternions: np.ndarray, eigenvalues: np.ndarray) -> pd.DataFrame:
    """Quaternions [N, 4] and eigenvalues [N, 4] (NaN for heads without them) -> the STAR columns."""
    euler = quaternion_to_euler(quaternions)
    table = pd.DataFrame({star.ANGLE_ROT: euler[:, 0], star.ANGLE_TILT: euler[:, 1], star.ANGLE_PSI: euler[:, 2]})
    if np.isfinite(eigenvalues).all():
        table[star.EXPECTED_ERROR] = uncertainty.expected_error_deg(eigenvalues)
        table[star.DISPERSION_TRACE] = uncertainty.dispersion_trace(eigenvalues)
        table[star.MAX_DISPERSION] = uncertainty.max_dispersion(eigenvalues)
        table[star.EIGEN_GAP] = uncertainty.first_eigengap(eigenvalues)
        for column, values in zip(star.EIGENVALUES, np.sort(eigenvalues, axis=1).T, strict=True):
            table[column] = values
    return table
