"""Origins of unaligned particles from a translational search at their poses against the reference map."""

import numpy as np

from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.mrc import read_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.prediction.shifts import search_origins
from cryo_forum.streams.simulation import write_simulation


def test_origins_of_noisy_particles_are_found_to_a_fraction_of_a_pixel(tmp_path):
    volume, pixel_size = load_volume(example_map_path(), pixel_size=3.0, size=32)
    write_simulation(tmp_path / "sim", volume, pixel_size, 60, snr=0.5, ctf=True, max_shift_px=4.0, seed=3)
    particles = ParticleSet.open(tmp_path / "sim" / "particles.star")
    reference, _ = read_volume(tmp_path / "sim" / "volume.mrc")
    truth = particles.shifts_px()
    found, scores = search_origins(particles, particles.quaternions(), reference, progress=False)
    error = np.hypot(*(found - truth).T)
    assert np.median(error) < 0.3 and np.mean(error < 1.0) > 0.9
    flipped, _ = search_origins(particles, particles.quaternions(), reference[::-1], progress=False)
    assert np.median(np.hypot(*(flipped - truth).T)) > 1.0  # the search needs the right map: it can fail
    assert np.all(np.isfinite(scores))
