"""Origins of unaligned particles: trial centres, and a translational search at their poses against the reference."""

import numpy as np

from cryo_forum import geometry
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.mrc import read_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.prediction.shifts import OriginSearch, trial_origins
from cryo_forum.streams.simulation import write_simulation


def _shifted_particles(folder, n: int, seed: int):
    """n particles of 32 px at SNR 0.5 with origins up to 4 px, their map and their true origins [n, 2] (px)."""
    volume, pixel_size = load_volume(example_map_path(), pixel_size=3.0, size=32)
    write_simulation(folder / "sim", volume, pixel_size, n, snr=0.5, ctf=True, max_shift_px=4.0, seed=seed)
    particles = ParticleSet.open(folder / "sim" / "particles.star")
    return particles, read_volume(folder / "sim" / "volume.mrc")[0], particles.shifts_px()


def test_origins_of_noisy_particles_are_found_to_a_fraction_of_a_pixel(tmp_path):
    particles, reference, truth = _shifted_particles(tmp_path, 60, 3)
    found, scores, _ = OriginSearch(particles, reference)(particles.quaternions(), progress=False)
    error = np.hypot(*(found - truth).T)
    assert np.median(error) < 0.3 and np.mean(error < 1.0) > 0.9
    flipped, _, _ = OriginSearch(particles, reference[::-1])(particles.quaternions(), progress=False)
    assert np.median(np.hypot(*(flipped - truth).T)) > 1.0  # the search needs the right map: it can fail
    assert np.all(np.isfinite(scores))


def test_trial_origins_cover_the_reach_centre_first():
    trials = trial_origins(4.0, 1.5)
    np.testing.assert_array_equal(trials[0], [0.0, 0.0])
    assert np.all(np.hypot(*trials.T) <= 4.0 + 0.75)
    points = np.random.default_rng(0).uniform(-4, 4, size=(2000, 2))
    points = points[np.hypot(*points.T) <= 4.0]
    nearest = np.min(np.hypot(*(points[:, None] - trials[None]).T), axis=0)
    assert nearest.max() <= 1.5 / np.sqrt(2) + 1e-9


def test_the_trial_whose_pose_fits_gives_the_origin(tmp_path):
    """A network given a particle re-centred at the wrong trial gives a wrong pose: the right trial fits best."""
    particles, reference, truth = _shifted_particles(tmp_path, 40, 5)
    trials = trial_origins(4.0, 1.5)
    nearest = np.argmin(np.linalg.norm(truth[None] - trials[:, None], axis=-1), axis=0)  # [n]
    poses = geometry.random_quaternions(len(trials) * len(particles), 6).reshape(len(trials), len(particles), 4)
    poses[nearest, np.arange(len(particles))] = particles.quaternions()
    centres = np.broadcast_to(trials[:, None], (len(trials), len(particles), 2))
    found, _, chosen = OriginSearch(particles, reference)(poses, None, 1.5, centres, progress=False)
    assert np.mean(chosen == nearest) > 0.9
    assert np.median(np.hypot(*(found - truth).T)) < 0.3
    assert np.all(np.hypot(*(found - trials[chosen]).T) <= 1.5 + 0.5)  # within reach of the chosen trial
