"""The CTF against RELION's formula and its physical landmarks."""

import numpy as np
import pytest

from cryo_forum.physics.ctf import compute_ctf, electron_wavelength, frequency_grid


def relion_ctf(s_x, s_y, du, dv, angle_deg, kv, cs_mm, q0, bfactor):
    """RELION's CTF::getCTF written out: -sin(K1 deltaf u2 + K2 u4 - K3) exp(-B u2 / 4), deltaf negative."""
    wavelength = 12.2642598 / np.sqrt(kv * 1e3 * (1 + kv * 1e3 * 0.978466e-6))
    u2 = s_x**2 + s_y**2
    ellipse = np.arctan2(s_y, s_x) - np.radians(angle_deg)
    deltaf = -(0.5 * (du + dv) + 0.5 * (du - dv) * np.cos(2 * ellipse))
    k1, k2 = np.pi * wavelength, np.pi / 2 * cs_mm * 1e7 * wavelength**3
    k3 = np.arctan(q0 / np.sqrt(1 - q0**2))
    return -np.sin(k1 * deltaf * u2 + k2 * u2**2 - k3) * np.exp(-bfactor / 4 * u2)


def test_wavelength_at_300_kv():
    assert electron_wavelength(300.0) == pytest.approx(0.01969, abs=1e-5)


def test_matches_relion_formula_with_astigmatism():
    sx, sy = frequency_grid(64, 1.5)
    expected = relion_ctf(sx, sy, 15000.0, 12000.0, 30.0, 300.0, 2.7, 0.07, 50.0)
    actual = compute_ctf(64, 1.5, 15000.0, 12000.0, 30.0, 300.0, 2.7, 0.07, bfactor=50.0)
    np.testing.assert_allclose(actual, expected, atol=1e-12)


def test_zero_frequency_equals_amplitude_contrast():
    assert compute_ctf(32, 2.0, 20000.0, 20000.0, 0.0, amplitude_contrast=0.1)[0, 0] == pytest.approx(0.1)


def test_first_zero_of_a_phase_contrast_ctf():
    size, apix, defocus, kv = 256, 1.0, 20000.0, 300.0
    ctf = compute_ctf(size, apix, defocus, defocus, 0.0, kv, 0.0, 0.0)
    sx, _ = frequency_grid(size, apix)
    first_zero = np.sqrt(1.0 / (electron_wavelength(kv) * defocus))  # pi lambda dz s^2 = pi
    row = ctf[0, : size // 2]
    assert np.all(row[1:5] > 0)
    crossing = np.argmax(row < 0)  # first sign change: sin(pi lambda dz s^2) passes pi
    assert sx[0, crossing - 1] < first_zero <= sx[0, crossing]


def test_batched_parameters_and_half_grid():
    du = np.array([10000.0, 20000.0])
    batch = compute_ctf(32, 2.0, du, du, np.zeros(2))
    assert batch.shape == (2, 32, 32)
    np.testing.assert_allclose(batch[1], compute_ctf(32, 2.0, 20000.0, 20000.0, 0.0))
    half = compute_ctf(32, 2.0, du, du, np.zeros(2), rfft=True)
    np.testing.assert_allclose(half, batch[..., :17])


@pytest.mark.parametrize("rfft", [False, True])
def test_tensorflow_and_numpy_views_agree_to_float32_precision(rfft):
    """Astigmatic, phase-shifted and B-factor-damped CTFs with phases of hundreds of radians near Nyquist."""
    from cryo_forum.physics.ctf import compute_ctf_tf

    du = np.array([12000.0, 25000.0, 50000.0, 8000.0])
    dv = np.array([11000.0, 24000.0, 47000.0, 8000.0])
    angle, bfactor, shift = np.array([10.0, -60.0, 135.0, 0.0]), np.array([0, 40, 150, 10]), np.array([0, 5, 90, -30])
    for size, apix, kv, cs, q0 in (
        (48, 2.5, 300.0, 2.7, 0.1),
        (64, 1.0, 200.0, 0.01, 0.07),
        (33, 4.0, 120.0, 2.0, 0.2),
    ):
        expected = compute_ctf(size, apix, du, dv, angle, kv, cs, q0, bfactor, shift, rfft=rfft)
        actual = compute_ctf_tf(
            size, apix, du.astype(np.float32), dv, angle, kv, cs, q0, bfactor, shift.astype(np.float32), rfft=rfft
        ).numpy()
        assert actual.dtype == np.float32 and actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, rtol=0, atol=2**-24)  # float32 rounding of values within [-1, 1]
