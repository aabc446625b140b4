"""The map a search scores against: sampled like the particles and masked around its density."""

import logging

import numpy as np
import pytest

from cryo_forum.errors import CryoForumError
from cryo_forum.io.maps import benchmark_map_path, load_volume
from cryo_forum.io.mrc import write_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.prediction.search_map import NO_MASK, search_map
from cryo_forum.streams.simulation import write_simulation

SIZE, PIXEL = 32, 9.0


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    volume, pixel_size = load_volume(benchmark_map_path(), pixel_size=PIXEL, size=SIZE)
    folder = tmp_path_factory.mktemp("search_map") / "sim"
    write_simulation(folder, volume, pixel_size, 2, snr=1.0, seed=0)
    return ParticleSet.open(folder / "particles.star")


def test_the_solvent_of_a_noisy_map_is_masked_away_and_the_particle_kept(particles, tmp_path):
    clean, _ = load_volume(benchmark_map_path(), pixel_size=PIXEL, size=SIZE)
    noisy = clean + np.random.default_rng(0).normal(scale=0.05 * clean.std(), size=clean.shape)
    write_volume(tmp_path / "noisy.mrc", noisy, PIXEL)
    masked = search_map(tmp_path / "noisy.mrc", particles)
    inside = np.abs(clean) > 0.2 * np.abs(clean).max()
    np.testing.assert_allclose(masked[inside], noisy[inside], rtol=1e-5)  # the particle is untouched
    corners = np.zeros_like(inside)
    corners[:4, :4, :4] = True
    assert np.abs(masked[corners]).max() == 0.0 < np.abs(noisy[corners]).max()
    np.testing.assert_array_equal(search_map(tmp_path / "noisy.mrc", particles, NO_MASK), noisy.astype(np.float32))


def test_a_given_mask_is_applied_and_a_bad_one_refused(particles, tmp_path):
    volume = np.random.default_rng(1).normal(size=(SIZE,) * 3).astype(np.float32)
    write_volume(tmp_path / "map.mrc", volume, PIXEL)
    half = np.zeros_like(volume)
    half[: SIZE // 2] = 1.0
    write_volume(tmp_path / "half.mrc", half, PIXEL)
    masked = search_map(tmp_path / "map.mrc", particles, tmp_path / "half.mrc")
    np.testing.assert_allclose(masked, volume * half, atol=1e-5)
    write_volume(tmp_path / "wide.mrc", 3.0 * half, PIXEL)
    with pytest.raises(CryoForumError, match=r"wide\.mrc: a mask holds values from 0 to 1"):
        search_map(tmp_path / "map.mrc", particles, tmp_path / "wide.mrc")
    write_volume(tmp_path / "empty.mrc", 0.0 * half, PIXEL)
    with pytest.raises(CryoForumError, match=r"empty\.mrc: the mask is empty"):
        search_map(tmp_path / "map.mrc", particles, tmp_path / "empty.mrc")


def test_a_map_of_noise_alone_is_used_unmasked_with_a_warning(particles, tmp_path, caplog):
    noise = np.random.default_rng(2).normal(size=(SIZE,) * 3).astype(np.float32)
    write_volume(tmp_path / "noise.mrc", noise, PIXEL)
    with caplog.at_level(logging.WARNING):
        used = search_map(tmp_path / "noise.mrc", particles)
    np.testing.assert_array_equal(used, noise)
    assert "no density stands out of the noise" in caplog.text
