"""The reference map: FSC-weighted (tau^2) regularisation beats the constant Wiener term on noisy simulated
particles without costing per-shell fidelity, the automatic mask holds the particle and leaves the corners, the
masked FSC is corrected for the mask, noise-only particles give neither a mask nor a resolution, and the half sets
follow rlnRandomSubset."""

import numpy as np
import pytest

from cryo_forum import geometry
from cryo_forum.errors import InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.mrc import read_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.masks import lowpass
from cryo_forum.physics.reconstruction import FourierAccumulator, reconstruct, reference_map, ssnr_from_fsc
from cryo_forum.physics.resolution import fsc, resolution_at
from cryo_forum.streams.simulation import write_simulation

SIZE = 32
PIXEL_SIZE = 2.5
NYQUIST = 2 * PIXEL_SIZE


@pytest.fixture(scope="module")
def molecule():
    return load_volume(example_map_path(), pixel_size=PIXEL_SIZE, size=SIZE)


def simulated(folder, volume, pixel_size, n, **options):
    write_simulation(folder, volume, pixel_size, n, seed=3, ctf=True, max_shift_px=2.0, **options)
    return ParticleSet.open(folder / "particles.star"), read_volume(folder / "volume.mrc")[0]


@pytest.fixture(scope="module")
def noisy(tmp_path_factory, molecule):
    return simulated(tmp_path_factory.mktemp("noisy"), *molecule, 300, snr=0.05)


@pytest.fixture(scope="module")
def noise_only(tmp_path_factory, molecule):
    folder = tmp_path_factory.mktemp("noise_only")
    return simulated(folder, *molecule, 300, snr=0.05, outlier_fraction=1.0, outlier_kinds=("noise",))[0]


@pytest.fixture(scope="module")
def noisy_maps(noisy):
    particles, _ = noisy
    return reference_map(particles, wiener_constant=1.0), reference_map(particles)


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def corners(size, width=4):
    """The eight corner cubes (width^3 voxels each) of the box, bool [D, D, D]: for D = 32 all farther than 20 px
    from the centre, where the molecule reaches 13.5 px."""
    edge = (np.arange(size) < width) | (np.arange(size) >= size - width)
    return edge[:, None, None] & edge[None, :, None] & edge[None, None, :]


@pytest.mark.parametrize("count, snr", [(300, 0.05), (100, 0.02)])
def test_fsc_weighting_beats_the_constant_wiener_term_on_few_noisy_particles(tmp_path, molecule, count, snr):
    particles, source = simulated(tmp_path, *molecule, count, snr=snr)
    constant = reference_map(particles, wiener_constant=1.0)
    weighted = reference_map(particles)
    assert weighted.regularisation == {"kind": "fsc_weighted", "iterations": 2}
    assert constant.regularisation == {"kind": "wiener", "constant": 1.0}
    # measured: 0.49 -> 0.87 (300 particles, SNR 0.05) and 0.26 -> 0.80 (100, SNR 0.02)
    assert correlation(weighted.map, source) > correlation(constant.map, source) + 0.25
    assert correlation(weighted.map, source) > 0.7
    # a shell-wise gain: no shell of the map gets worse against the truth (a gain applied before cropping the
    # padded grid leaks the stronger shells below into the damped ones above, and lost 0.16 in one shell)
    shells = slice(1, SIZE // 2 - 4)
    assert (fsc(weighted.map, source)[1][shells] - fsc(constant.map, source)[1][shells]).min() > -0.08


def test_noise_free_fsc_weighted_map_still_recovers_the_source(tmp_path, molecule):
    particles, source = simulated(tmp_path, *molecule, 200, snr=None)
    result = reference_map(particles)
    _, curve = fsc(result.map, source, PIXEL_SIZE)
    assert curve[1 : int(0.8 * (SIZE // 2)) + 1].min() > 0.9
    assert correlation(result.map, source) > 0.98
    assert result.resolution.angstrom < 1.1 * NYQUIST


def test_auto_mask_holds_the_particle_and_leaves_the_corners(noisy, noisy_maps):
    _, source = noisy
    mask = noisy_maps[1].mask
    assert mask.shape == (SIZE,) * 3 and mask.dtype == np.float32 and 0 <= mask.min() and mask.max() == 1
    positive = np.maximum(source, 0)
    assert (mask * positive).sum() / positive.sum() > 0.95  # measured 0.99
    assert mask[corners(SIZE)].max() == 0
    assert 0.1 < mask.mean() < 0.7  # measured 0.45: the molecule spans two thirds of this box


def test_masked_fsc_is_corrected_and_at_least_as_good_as_the_unmasked(noisy_maps):
    for result in noisy_maps:
        curves = result.fsc
        unmasked = resolution_at(curves.frequencies, curves.unmasked, 0.143)
        assert curves.has_mask and result.resolution == curves.resolution(0.143)
        assert result.resolution.angstrom <= unmasked.angstrom  # measured 8.7 A masked, 9.5 A unmasked
        start = curves.randomised_from
        assert 1 <= start < SIZE // 2
        np.testing.assert_array_equal(curves.corrected[:start], curves.masked[:start])
        assert np.abs(curves.randomised[start:]).max() < 0.25  # a soft mask wide of the particle adds little


def test_noise_only_particles_give_no_mask_and_no_resolution(noise_only):
    result = reference_map(noise_only)
    assert not result.fsc.has_mask and result.mask.sum() < 0.01 * SIZE**3
    assert result.resolution.angstrom > 6 * NYQUIST  # measured ~70 A (the box is 80 A)
    assert result.regularisation["kind"] == "fsc_weighted"


def test_phase_randomisation_undoes_what_a_sharp_tight_mask_adds(noisy):
    """A binary mask hugging the particle correlates the half maps by itself at high resolution: the raw masked
    FSC reaches Nyquist, the corrected one stays near what a soft mask gives."""
    particles, source = noisy
    smooth = lowpass(source, PIXEL_SIZE, 8.0)
    sharp = (smooth > 0.5 * smooth.max()).astype(np.float32)
    result = reference_map(particles, wiener_constant=1.0, mask=sharp)
    curves = result.fsc
    raw = resolution_at(curves.frequencies, curves.masked, 0.143)
    unmasked = resolution_at(curves.frequencies, curves.unmasked, 0.143)
    assert raw.angstrom < 1.1 * NYQUIST  # measured 5.0 A, Nyquist-limited
    assert raw.angstrom + 1.0 < result.resolution.angstrom < unmasked.angstrom  # measured 6.8 A; 10.7 A unmasked
    assert curves.randomised[curves.randomised_from :].max() > 0.5  # what the mask alone makes of random phases


def test_half_sets_follow_the_random_subset_column(tmp_path, noisy):
    particles, _ = noisy
    subsets = np.where(np.arange(len(particles)) < 200, 1, 2)  # not the alternating fallback
    particles.write_star(tmp_path / "split.star", columns={star.RANDOM_SUBSET: subsets})
    split = ParticleSet.open(tmp_path / "split.star")
    result = reference_map(split, wiener_constant=1.0)
    for half, number in ((result.half1, 1), (result.half2, 2)):
        expected, _ = reconstruct(split, np.flatnonzero(subsets == number))
        np.testing.assert_allclose(half, expected, atol=1e-5 * np.abs(expected).max())


def test_ssnr_from_fsc():
    curve = np.array([-1.0, 0.999999, 0.5, 0.2, 0.0005, 0.3, 0.1])
    half = ssnr_from_fsc(curve)
    np.testing.assert_allclose(half[:4], [999.0, 999.0, 1.0, 0.25])
    np.testing.assert_allclose(half[4:], 1e-3 / (1 - 1e-3))  # held at the floor once the FSC has fallen to ~0
    np.testing.assert_allclose(ssnr_from_fsc(curve, full=True), 2 * half)


def test_fsc_weighting_with_a_boundless_ssnr_is_the_unregularised_map():
    rng = np.random.default_rng(0)
    accumulator = FourierAccumulator(8)
    accumulator.insert(
        rng.standard_normal((6, 8, 8)), geometry.quaternion_to_matrix(geometry.random_quaternions(6, rng))
    )
    plain = accumulator.volume(0.0)
    np.testing.assert_allclose(accumulator.volume(ssnr=np.full(5, 1e12)), plain, atol=1e-5 * np.abs(plain).max())
    damped = accumulator.volume(ssnr=np.full(5, 1e-3))
    assert np.abs(damped).max() < 0.01 * np.abs(plain).max()


def test_bad_settings_are_refused(noisy):
    particles, _ = noisy
    for options, setting in (
        ({"iterations": 0}, "iterations"),
        ({"wiener_constant": -1.0}, "wiener_constant"),
        ({"mask": np.ones((8, 8, 8))}, "mask"),
        ({"batch_size": 0}, "batch_size"),
    ):
        with pytest.raises(InvalidSetting) as error:
            reference_map(particles, **options)
        assert error.value.setting == setting
