"""The contrast transfer function, as RELION computes it, defined once for NumPy and TensorFlow.

``CTF(s) = sin(chi(s) + K3 + phase_shift) * exp(-B |s|^2 / 4)`` with the phase
``chi(s) = pi * lambda * dz(s) * |s|^2 - (pi / 2) * Cs * lambda^3 * |s|^4``, the astigmatic defocus
``dz(s) = (dU + dV)/2 + (dU - dV)/2 * cos(2 (angle(s) - astigmatism_angle))`` (positive for underfocus)
and ``K3 = atan(Q0 / sqrt(1 - Q0^2))`` for amplitude contrast Q0; this equals RELION's ``-sin(argument)``.
At zero frequency the CTF equals +Q0: a projection of positive density stays positive at low resolution.

Frequencies are in 1/Angstrom on the unshifted FFT grid (``numpy.fft.fftfreq``; ``rfftfreq`` along x
for the half grid). Arrays are ``[..., y, x]``; parameters broadcast over a leading particle axis.
:func:`compute_ctf` (NumPy) and :func:`compute_ctf_tf` (TensorFlow, for tf.data) evaluate the same
:func:`_transfer` in double precision; the TensorFlow one rounds its result to float32.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

WAVELENGTH_CONSTANT = 12.2642598  # h / sqrt(2 m0 e), in A sqrt(V)
RELATIVISTIC_CORRECTION = 0.978466e-6  # e / (2 m0 c^2), per volt
VOLTS_PER_KV = 1e3
ANGSTROM_PER_MM = 1e7
RADIANS_PER_DEGREE = math.pi / 180.0

_NUMPY = SimpleNamespace(sin=np.sin, cos=np.cos, exp=np.exp, sqrt=np.sqrt, atan=np.arctan, atan2=np.arctan2)


def _wavelength(voltage_kv, ops=_NUMPY):
    """Relativistic electron wavelength in A for voltages in kV (arrays of the ``ops`` backend)."""
    volts = voltage_kv * VOLTS_PER_KV
    return WAVELENGTH_CONSTANT / ops.sqrt(volts * (1.0 + volts * RELATIVISTIC_CORRECTION))


def _transfer(ops, sx, sy, dfu, dfv, angle, kv, cs, q0, bfactor, shift):
    """The CTF at frequencies (sx, sy) in 1/A for parameters in compute_ctf's units, with ``ops``' functions.

    Frequencies [Y, X] and parameters [N, 1, 1] (or scalars) broadcast to [N, Y, X].
    """
    s2 = sx**2 + sy**2
    wavelength = _wavelength(kv, ops)
    azimuth = ops.atan2(sy, sx)
    defocus = 0.5 * (dfu + dfv) + 0.5 * (dfu - dfv) * ops.cos(2.0 * (azimuth - angle * RADIANS_PER_DEGREE))
    chi = np.pi * wavelength * defocus * s2 - 0.5 * np.pi * cs * ANGSTROM_PER_MM * wavelength**3 * s2**2
    k3 = ops.atan(q0 / ops.sqrt(1.0 - q0**2))
    return ops.sin(chi + k3 + shift * RADIANS_PER_DEGREE) * ops.exp(-0.25 * bfactor * s2)


def electron_wavelength(voltage_kv: float | np.ndarray) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom for an acceleration voltage in kV."""
    return _wavelength(np.asarray(voltage_kv, dtype=np.float64))


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
    """CTF (float64) on the FFT grid of a size x size image with pixel_size (A/px).

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
    columns = (np.atleast_1d(p)[:, None, None] for p in params)
    ctf = _transfer(_NUMPY, *frequency_grid(size, pixel_size, rfft), *columns)
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
    rfft: bool = False,
):
    """TensorFlow view of :func:`compute_ctf` for batches drawn inside a tf.data pipeline.

    Parameters are tensors [N] or scalars (any float type); returns float32 [N, size, size] (half grid
    [N, size, size//2+1] with ``rfft=True``), computed in double precision like :func:`compute_ctf`.
    """
    from cryo_forum.tensorflow_quiet import tf

    ops = SimpleNamespace(sin=tf.sin, cos=tf.cos, exp=tf.exp, sqrt=tf.sqrt, atan=tf.atan, atan2=tf.atan2)
    sx, sy = (tf.constant(grid, tf.float64) for grid in frequency_grid(size, pixel_size, rfft))
    count = tf.shape(tf.reshape(defocus_u, [-1]))[0]

    def column(value):
        return tf.broadcast_to(tf.reshape(tf.cast(value, tf.float64), [-1, 1, 1]), [count, 1, 1])

    params = (
        defocus_u,
        defocus_v,
        defocus_angle,
        voltage,
        spherical_aberration,
        amplitude_contrast,
        bfactor,
        phase_shift,
    )
    return tf.cast(_transfer(ops, sx, sy, *(column(value) for value in params)), tf.float32)
