"""The contrast transfer function, as RELION computes it.

``CTF(s) = sin(chi(s) + K3 + phase_shift) * exp(-B |s|^2 / 4)`` with the phase
``chi(s) = pi * lambda * dz(s) * |s|^2 - (pi / 2) * Cs * lambda^3 * |s|^4``, the astigmatic defocus
``dz(s) = (dU + dV)/2 + (dU - dV)/2 * cos(2 (angle(s) - astigmatism_angle))`` (positive for underfocus)
and ``K3 = atan(Q0 / sqrt(1 - Q0^2))`` for amplitude contrast Q0; this equals RELION's ``-sin(argument)``.
At zero frequency the CTF equals +Q0: a projection of positive density stays positive at low resolution.

Frequencies are in 1/Angstrom on the unshifted FFT grid (``numpy.fft.fftfreq``; ``rfftfreq`` along x
for the half grid). Arrays are ``[..., y, x]``; parameters broadcast over a leading particle axis.
"""

from __future__ import annotations

import numpy as np


def electron_wavelength(voltage_kv: float | np.ndarray) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    volts = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2642598 / np.sqrt(volts * (1.0 + volts * 0.978466e-6))


def frequency_grid(size: int, pixel_size: float, rfft: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (sx, sy) in 1/Angstrom of a size x size image, each [size, size or size//2+1]."""
    fy = np.fft.fftfreq(size, d=pixel_size)
    fx = np.fft.rfftfreq(size, d=pixel_size) if rfft else fy
    sy, sx = np.meshgrid(fy, fx, indexing="ij")
    return sx, sy


def compute_ctf(
    size: int,
    pixel_size: float,
    defocus_u: float | np.ndarray,
    defocus_v: float | np.ndarray,
    defocus_angle: float | np.ndarray,
    voltage: float | np.ndarray = 300.0,
    spherical_aberration: float | np.ndarray = 2.7,
    amplitude_contrast: float | np.ndarray = 0.1,
    bfactor: float | np.ndarray = 0.0,
    phase_shift: float | np.ndarray = 0.0,
    rfft: bool = False,
) -> np.ndarray:
    """CTF on the FFT grid of a size x size image with pixel_size (A/px).

    Defocus U/V in Angstrom, astigmatism angle and phase shift in degrees, voltage in kV, Cs in mm,
    B-factor in A^2. Scalars give [size, size]; arrays of length N give [N, size, size] (half grid
    [.., size//2+1] along x with ``rfft=True``).
    """
    params = [
        np.asarray(p, dtype=np.float64)
        for p in (
            defocus_u,
            defocus_v,
            defocus_angle,
            voltage,
            spherical_aberration,
            amplitude_contrast,
            bfactor,
            phase_shift,
        )
    ]
    batched = any(p.ndim > 0 for p in params)
    dfu, dfv, angle, kv, cs, q0, bfac, shift = (np.atleast_1d(p)[:, None, None] for p in params)
    sx, sy = frequency_grid(size, pixel_size, rfft)
    s2 = sx**2 + sy**2
    wavelength = electron_wavelength(kv)
    azimuth = np.arctan2(sy, sx)
    defocus = 0.5 * (dfu + dfv) + 0.5 * (dfu - dfv) * np.cos(2.0 * (azimuth - np.radians(angle)))
    cs_angstrom = cs * 1e7
    chi = np.pi * wavelength * defocus * s2 - 0.5 * np.pi * cs_angstrom * wavelength**3 * s2**2
    k3 = np.arctan(q0 / np.sqrt(1.0 - q0**2))
    ctf = np.sin(chi + k3 + np.radians(shift)) * np.exp(-0.25 * bfac * s2)
    return ctf if batched else ctf[0]


def compute_ctf_tf(
    size: int,
    pixel_size: float,
    defocus_u,
    defocus_v,
    defocus_angle,
    voltage,
    spherical_aberration,
    amplitude_contrast,
    bfactor=0.0,
    phase_shift=0.0,
):
    """TensorFlow twin of :func:`compute_ctf` for batches drawn inside a tf.data pipeline.

    Every parameter is a tensor [N] (float32); returns [N, size, size] on the unshifted full FFT grid.
    """
    from cryo_forum.tensorflow_quiet import tf

    sx, sy = (tf.constant(grid, tf.float32) for grid in frequency_grid(size, pixel_size))
    s2 = sx**2 + sy**2

    def column(value):
        return tf.reshape(tf.cast(value, tf.float32), [-1, 1, 1]) + tf.zeros_like(tf.reshape(defocus_u, [-1, 1, 1]))

    dfu, dfv, angle, kv, cs, q0, bfac, shift = (
        column(v)
        for v in (
            defocus_u,
            defocus_v,
            defocus_angle,
            voltage,
            spherical_aberration,
            amplitude_contrast,
            bfactor,
            phase_shift,
        )
    )
    volts = kv * 1e3
    wavelength = 12.2642598 / tf.sqrt(volts * (1.0 + volts * 0.978466e-6))
    azimuth = tf.atan2(sy, sx)
    defocus = 0.5 * (dfu + dfv) + 0.5 * (dfu - dfv) * tf.cos(2.0 * (azimuth - angle * (np.pi / 180.0)))
    chi = np.pi * wavelength * defocus * s2 - 0.5 * np.pi * cs * 1e7 * wavelength**3 * s2**2
    k3 = tf.atan(q0 / tf.sqrt(1.0 - q0**2))
    return tf.sin(chi + k3 + shift * (np.pi / 180.0)) * tf.exp(-0.25 * bfac * s2)
