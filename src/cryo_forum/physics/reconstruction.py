"""3-D reconstruction by direct Fourier inversion: particle images and their poses, shifts and CTFs -> a map.

By the projection-slice theorem the spectrum of ``image(x, y) = integral of V(A^T [x, y, z]) dz`` is the
central slice ``F_V(A^T [kx, ky, 0])`` of the map's spectrum, multiplied by the particle's CTF. Each image is
re-centred by its origin (a Fourier phase ramp: it shows the particle at box centre minus the origin), and
``CTF * F`` is spread with trilinear weights onto a 3-D Fourier grid twice as fine as the images' (the map's
box padded to 2 D, as RELION does; image frequencies are scaled by 2 rather than the images padded), while
the same weights times ``CTF^2`` accumulate alongside. The map's spectrum is then the Wiener-style ratio

    F_V = sum(w CTF F) / (sum(w CTF^2) + wiener_constant / 8)

zeroed at and beyond Nyquist, transformed back, cropped to D and divided by the ``sinc^2`` footprint of
trilinear gridding. ``wiener_constant`` counts in images: the trilinear weights of one image's samples (2 voxels
apart on the padded grid) add ``1 / (2 * 2^2) = 1/8`` on average to the voxels within one voxel of its slice (hence
the 8), and the default 1 about halves a voxel that one CTF-free image has reached. Read it as ``1 / SNR`` per
image and voxel: it damps the voxels few images have reached (sparse high frequencies, CTF zeros) and barely
changes well-sampled ones; it does not grow with the data set. Without CTF columns the images enter unweighted
(CTF = 1). As in RELION the image samples are used as they are, at their exact frequencies (a CTF that oscillates fast
is not smeared by interpolating the image spectrum); the price is that frequencies below the first image ring,
1 / (D px), are filled by trilinear spreading from that ring, so the map's smoothest component (a gentle background,
part of its total) is approximate, as image normalisation makes it in real data anyway.

FSC weighting (:func:`reference_map`; RELION's tau^2 regularisation) lets the data set the term instead. The
half maps' FSC (masked and corrected for the mask, :func:`~cryo_forum.physics.resolution.masked_fsc`) gives each map's
spectral SNR per shell k, ``FSC / (1 - FSC)`` for a half map and ``2 FSC / (1 - FSC)`` for the map of both
(:func:`ssnr_from_fsc`), and each voxel's term becomes

    1 / tau^2(k) = <sum(w CTF^2)>_k / SSNR(k)

with ``<>_k`` the mean over the padded voxels of map shell k, unsampled ones included (RELION's ``sigma2``). Per
unit of weight this is ``1 / SSNR``: the inverse SNR an image brings there, small where the half maps agree and
large beyond the resolution, so the map is damped where the data stop agreeing, and within a shell more where
few images or CTF zeros left a voxel thin. A voxel of the shell's mean weight gets the Wiener gain
``SSNR / (1 + SSNR)``. That gain, common to the shell, is divided out on the padded grid and applied to the
cropped map (:func:`shell_filter`): the product is the formula, but a gain that falls steeply beyond the
resolution, applied before the crop (which convolves the padded spectrum), would leak the stronger shells below
into the damped ones above. RELION multiplies the term by padding^3 for its own normalisation; here
``sum(w CTF F) / sum(w CTF^2)`` already is the map's spectrum, and in simulations the map without that factor
correlates best with the truth.

With a point group each image is inserted at every symmetry-equivalent pose ``A g^T`` (the map obeys
``V(g x) = V(x)``). Only half the Fourier grid is stored (``kx >= 0``, as ``numpy.fft.rfftn`` lays it out) and
only half of each image's spectrum is inserted; samples landing at ``kx < 0`` go in as their complex conjugate
at ``-k``. The accumulators take ``12 * 4 D^3`` bytes (about 100 MB for D = 128, 800 MB for D = 256; computing
a map briefly needs about three times that, and :func:`half_maps` and :func:`reference_map` hold two
accumulators); particles are streamed in
batches and inserted with :func:`cryo_forum.physics.slices.insert_slices` (the adjoint of the projector's
slice reader, with ``np.bincount``), so memory does not grow with their number.

Maps are ``[z, y, x]`` with their centre at voxel ``D // 2``; poses are RELION matrices A (:mod:`geometry`).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np

from cryo_forum import geometry
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.ctf import compute_ctf
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.physics.masks import half_map_mask
from cryo_forum.physics.resolution import MaskedFSC, Resolution, masked_fsc
from cryo_forum.physics.slices import insert_slices
from cryo_forum.progress import progress as progress_bar

log = logging.getLogger("cryo_forum")

WIENER_CONSTANT = 1.0
TAU2_ITERATIONS = 2
FSC_FLOOR = 1e-3  # the half-map FSC is clipped to [FSC_FLOOR, FSC_CEILING] before it becomes an SSNR
FSC_CEILING = 0.999
PADDING = 2
_ENTRIES_PER_CALL = 1 << 22  # trilinear corner entries handed to one np.bincount call


class FourierAccumulator:
    """The sums ``sum(w CTF F)`` and ``sum(w CTF^2)`` of a map [D, D, D] on its padded half Fourier grid.

    ``data`` (complex64) and ``weight`` (float32) are flat views of the rfftn layout ``[P, P, P // 2 + 1]``
    with ``P = padding * D`` (frequency zero at index 0). Accumulators of disjoint particle sets add up
    (``+=``) to that of their union.
    """

    def __init__(self, size: int, symmetry: str = "C1", padding: int = PADDING):
        self.size = int(size)
        self.padding = int(padding)
        self.padded = self.padding * self.size
        self.shape = (self.padded, self.padded, self.padded // 2 + 1)
        self.group = geometry.symmetry_matrices(symmetry)
        self.data = np.zeros(int(np.prod(self.shape)), dtype=np.complex64)
        self.weight = np.zeros(int(np.prod(self.shape)), dtype=np.float32)
        # One of each conjugate pair of the images' rfft2 coefficients below Nyquist (and frequency zero).
        grid = FourierGrid(self.size)
        keep = grid.inside & ((grid.kx > 0) | (grid.ky >= 0))
        self._rows, self._columns = np.nonzero(keep)
        self._frequencies = np.stack([grid.kx[keep], grid.ky[keep]], axis=-1)  # [M, 2] (kx, ky) in 1 / box
        # Frequency zero is its own conjugate partner; the kx = 0 plane is completed from both sides in volume().
        self._multiplicity = np.where(grid.modulus[keep] == 0, 0.5, 1.0)
        self.slice_weight = 1.0 / (2.0 * self.padding**2)  # mean weight one image adds to voxels by its slice

    def __iadd__(self, other: FourierAccumulator) -> FourierAccumulator:
        if (other.size, other.padding) != (self.size, self.padding):
            raise ValueError("accumulators of different boxes or padding cannot be added")
        self.data += other.data
        self.weight += other.weight
        return self

    def insert(
        self,
        images: np.ndarray,
        matrices: np.ndarray,
        shifts_px: np.ndarray | None = None,
        ctf: np.ndarray | None = None,
    ) -> None:
        """Add images [n, D, D] taken at poses A [n, 3, 3] with origins [n, 2] (x, y; px) and CTFs [n, D, D//2+1]
        (on the rfft2 grid, :func:`cryo_forum.physics.ctf.compute_ctf` with ``rfft=True``; None: no CTF)."""
        images = np.asarray(images, dtype=np.float64)
        spectra = np.fft.rfft2(np.fft.ifftshift(images, axes=(-2, -1)))[:, self._rows, self._columns]  # [n, M]
        if shifts_px is not None:
            # The image shows the particle moved by -origin; moving it back by +origin re-centres it.
            phase = self._frequencies @ np.asarray(shifts_px, dtype=np.float64).T / self.size  # [M, n]
            spectra *= np.exp(-2j * np.pi * phase.T)
        weights = np.broadcast_to(self._multiplicity, spectra.shape)
        spectra *= self._multiplicity
        if ctf is not None:
            ctf = np.asarray(ctf, dtype=np.float64)[:, self._rows, self._columns]
            spectra *= ctf
            weights = weights * ctf**2
        group_count = len(self.group)
        poses = (np.asarray(matrices, dtype=np.float64)[:, None] @ self.group.transpose(0, 2, 1)).reshape(-1, 3, 3)
        points = self.padding * self._frequencies
        chunk = max(1, _ENTRIES_PER_CALL // (8 * len(self._frequencies)))
        for start in range(0, len(poses), chunk):
            rows = slice(start, start + chunk)
            images_of_rows = np.arange(len(poses))[rows] // group_count
            insert_slices(
                self.data,
                self.padded,
                poses[rows],
                points,
                spectra[images_of_rows],
                self.weight,
                weights[images_of_rows],
            )

    def _radius(self) -> np.ndarray:
        """|k| float32 [P, P, P // 2 + 1] of every padded voxel in cycles per map box (padded index / padding)."""
        k = (np.rint(np.fft.fftfreq(self.padded) * self.padded) / self.padding).astype(np.float32)
        kx = np.arange(self.shape[2], dtype=np.float32) / self.padding
        return np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + kx[None, None, :] ** 2)

    def _shell_weight(self, weight: np.ndarray, radius: np.ndarray) -> np.ndarray:
        """The mean summed weight ``<sum w CTF^2>`` [D // 2 + 1] of the padded voxels of each map shell (their
        radius rounded), unsampled voxels included, as RELION averages it."""
        count = self.size // 2 + 1
        inside = radius < self.size / 2.0
        shells = np.rint(radius[inside]).astype(np.int64)
        multiplicity = np.broadcast_to(np.where(np.arange(self.shape[2]) == 0, 1.0, 2.0), self.shape)[inside]
        total = np.bincount(shells, weights=weight[inside] * multiplicity, minlength=count)
        voxels = np.bincount(shells, weights=multiplicity, minlength=count)
        return np.divide(total, voxels, out=np.zeros(count), where=voxels > 0)

    def _spectrum(self, wiener_constant: float, ssnr: np.ndarray | None) -> np.ndarray:
        """The regularised spectrum complex64 [P, P, P // 2 + 1], zero from Nyquist on; with ``ssnr`` its shell
        gain ``<W> / (<W> + 1 / tau^2)`` is divided out (:meth:`volume` applies it to the cropped map)."""
        data = self.data.reshape(self.shape)
        weight = self.weight.reshape(self.shape).copy()
        # Samples near kx = 0 were spread over that plane from both sides: add each voxel's conjugate partner.
        partner = (slice(None, None, -1), slice(None, None, -1), 0)
        plane_data = data[:, :, 0] + np.conj(np.roll(data[partner], 1, axis=(0, 1)))
        weight[:, :, 0] += np.roll(weight[partner], 1, axis=(0, 1))
        if ssnr is None:
            weight += np.float32(_checked_wiener(wiener_constant) * self.slice_weight)  # now the denominator
        else:
            radius, shells = self._radius(), np.arange(len(ssnr))
            weight += np.interp(radius, shells, self._shell_weight(weight, radius) / ssnr).astype(np.float32)
        spectrum = np.divide(data, weight, out=np.zeros(self.shape, np.complex64), where=weight > 0)
        plane = weight[:, :, 0]
        spectrum[:, :, 0] = np.divide(plane_data, plane, out=np.zeros_like(plane_data), where=plane > 0)
        del weight, plane_data
        if ssnr is not None:
            spectrum *= np.interp(radius, shells, 1.0 + 1.0 / ssnr).astype(np.float32)
        spectrum[~FourierGrid(self.padded).volume_inside()] = 0.0
        return spectrum

    def _cropped(self, spectrum: np.ndarray) -> np.ndarray:
        """The map float64 [D, D, D] of a padded spectrum: transformed back, cropped, gridding-corrected."""
        padded = self.padded
        box = np.fft.fftshift(np.fft.irfftn(spectrum, s=(padded,) * 3, axes=(0, 1, 2)))
        start = padded // 2 - self.size // 2
        crop = box[start : start + self.size, start : start + self.size, start : start + self.size]
        correction = FourierGrid(self.size).gridding_correction(padded)  # undoes trilinear gridding, per axis
        return crop * (correction[:, None, None] * correction[None, :, None] * correction[None, None, :])

    def volume(self, wiener_constant: float = WIENER_CONSTANT, ssnr: np.ndarray | None = None) -> np.ndarray:
        """The map float32 [D, D, D] ([z, y, x], centre at D // 2) from the sums so far: regularised by the
        constant ``wiener_constant``, or with ``ssnr`` (this map's SSNR [D // 2 + 1] per shell, see
        :func:`ssnr_from_fsc`) by ``1 / tau^2`` from it (FSC weighting; see the module)."""
        if ssnr is not None:
            ssnr = np.asarray(ssnr, dtype=np.float64)
            if ssnr.shape != (self.size // 2 + 1,) or not (ssnr > 0).all():
                raise InvalidSetting("ssnr", f"needs {self.size // 2 + 1} positive shells, got {ssnr.shape}")
        volume = self._cropped(self._spectrum(wiener_constant, ssnr))
        if ssnr is not None:
            volume = shell_filter(volume, ssnr / (1.0 + ssnr))
        return volume.astype(np.float32)


def shell_filter(volume: np.ndarray, gain: np.ndarray) -> np.ndarray:
    """The map [D, D, D] with each Fourier shell (rounded radius, as the FSC's) multiplied by ``gain``
    [D // 2 + 1]; the corners beyond Nyquist take the Nyquist shell's gain."""
    size = volume.shape[0]
    shells = FourierGrid(size).volume_shells()[0]
    factor = np.asarray(gain, dtype=np.float64)[np.minimum(shells, size // 2)]
    return np.fft.irfftn(np.fft.rfftn(volume) * factor, s=volume.shape, axes=(0, 1, 2))


def _checked_wiener(value: float) -> float:
    if not value >= 0:
        raise InvalidSetting("wiener_constant", f"must be >= 0, got {value}")
    return float(value)


def check_settings(
    wiener_constant: float | None = None, iterations: int = TAU2_ITERATIONS, batch_size: int = 256
) -> None:
    """Raise :class:`~cryo_forum.errors.InvalidSetting` for the first setting out of range (before any work)."""
    if wiener_constant is not None:
        _checked_wiener(wiener_constant)
    for setting, value in (("iterations", iterations), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise InvalidSetting(setting, f"must be a positive integer, got {value}")


class HalfMaps(NamedTuple):
    """Maps [D, D, D] float32 of all particles and of the two half sets, and their pixel size (A)."""

    full: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    pixel_size: float


def _selection(particles: ParticleSet, indices) -> np.ndarray:
    if not particles.has_poses:
        raise CryoForumError(f"{particles.source}: no poses ({', '.join(star.ANGLES)}) to reconstruct from")
    chosen = np.arange(len(particles)) if indices is None else np.asarray(indices)
    if chosen.dtype == bool:
        chosen = np.flatnonzero(chosen)
    if not len(chosen):
        raise CryoForumError(f"{particles.source}: no particles to reconstruct from")
    return chosen.astype(np.int64)


def backproject(
    particles: ParticleSet,
    indices=None,
    symmetry: str = "C1",
    batch_size: int = 256,
    progress: bool = False,
) -> FourierAccumulator:
    """Insert the particles ``indices`` (all by default) with their poses, origins and CTFs (if any)."""
    check_settings(batch_size=batch_size)
    chosen = _selection(particles, indices)
    accumulator = FourierAccumulator(particles.box_size, symmetry)
    matrices = geometry.quaternion_to_matrix(particles.quaternions())
    shifts = particles.shifts_px()
    pixel_size = particles.pixel_size if particles.has_ctf else 1.0
    ctf_parameters = particles.ctf_parameters() if particles.has_ctf else None
    with progress_bar(len(chosen), description="reconstruct", enabled=progress) as bar:
        for batch, images in particles.iter_batches(batch_size, chosen):
            ctf = None
            if ctf_parameters is not None:
                batch_parameters = {name: values[batch] for name, values in ctf_parameters.items()}
                ctf = compute_ctf(images.shape[-1], pixel_size, **batch_parameters, rfft=True)
            accumulator.insert(images, matrices[batch], shifts[batch], ctf)
            bar.update(len(batch))
    return accumulator


def reconstruct(
    particles: ParticleSet,
    indices=None,
    symmetry: str = "C1",
    wiener_constant: float = WIENER_CONSTANT,
    batch_size: int = 256,
    progress: bool = False,
) -> tuple[np.ndarray, float]:
    """The map float32 [D, D, D] of the particles ``indices`` (default all) and its pixel size in A."""
    _checked_wiener(wiener_constant)
    accumulator = backproject(particles, indices, symmetry, batch_size, progress)
    return accumulator.volume(wiener_constant), particles.pixel_size


def split_halves(
    particles: ParticleSet, indices=None, subset_column: str = star.RANDOM_SUBSET
) -> tuple[np.ndarray, np.ndarray]:
    """Particle indices of the two half sets: by ``subset_column`` (values 1 and 2) when the table has it,
    else alternately (first, third, ... particle in half 1)."""
    chosen = _selection(particles, indices)
    if subset_column in particles.table:
        subsets = particles.table[subset_column].to_numpy()[chosen]
        unknown = ~np.isin(subsets, (1, 2))
        if unknown.any():
            raise CryoForumError(f"{particles.source}: {subset_column} must be 1 or 2, found {subsets[unknown][0]!r}")
        halves = chosen[subsets == 1], chosen[subsets == 2]
    else:
        halves = chosen[0::2], chosen[1::2]
    for number, half in enumerate(halves, start=1):
        if not len(half):
            raise CryoForumError(f"{particles.source}: half set {number} has no particles")
    return halves


def half_maps(
    particles: ParticleSet,
    indices=None,
    subset_column: str = star.RANDOM_SUBSET,
    symmetry: str = "C1",
    wiener_constant: float = WIENER_CONSTANT,
    batch_size: int = 256,
    progress: bool = False,
) -> HalfMaps:
    """Maps of the two half sets (:func:`split_halves`) and of all particles, each image read once, with the
    constant Wiener term (:func:`reference_map` for the FSC-weighted ones)."""
    _checked_wiener(wiener_constant)
    first, second = split_halves(particles, indices, subset_column)
    accumulator = backproject(particles, first, symmetry, batch_size, progress)
    half1 = accumulator.volume(wiener_constant)
    other = backproject(particles, second, symmetry, batch_size, progress)
    half2 = other.volume(wiener_constant)
    accumulator += other
    del other
    return HalfMaps(accumulator.volume(wiener_constant), half1, half2, particles.pixel_size)


def ssnr_from_fsc(curve: np.ndarray, full: bool = False) -> np.ndarray:
    """The SSNR [D // 2 + 1] of one half map, ``FSC / (1 - FSC)``, or with ``full`` of the map of both halves,
    ``2 FSC / (1 - FSC)``, from the half maps' FSC [D // 2 + 1]. The FSC is clipped to [FSC_FLOOR, FSC_CEILING]
    and held at the floor from the first shell where it falls below it (later upturns are noise); shell 0, a
    single coefficient, takes shell 1's value."""
    curve = np.asarray(curve, dtype=np.float64)
    clipped = np.clip(curve, FSC_FLOOR, FSC_CEILING)
    fallen = np.flatnonzero(curve[1:] < FSC_FLOOR)
    if len(fallen):
        clipped[fallen[0] + 1 :] = FSC_FLOOR
    clipped[0] = clipped[1]
    return (2.0 if full else 1.0) * clipped / (1.0 - clipped)


class ReferenceMap(NamedTuple):
    """A map to use as a reference. ``map`` of all particles and the half maps ``half1``, ``half2`` (float32
    [D, D, D]); ``mask`` (float32 [D, D, D] in [0, 1], all zeros if none was found) in which ``fsc``, the
    half maps' :class:`~cryo_forum.physics.resolution.MaskedFSC`, was measured; ``resolution`` where its corrected
    curve falls below 0.143; ``pixel_size`` (A); ``regularisation``, what regularised the maps (JSON-ready)."""

    map: np.ndarray
    half1: np.ndarray
    half2: np.ndarray
    mask: np.ndarray
    fsc: MaskedFSC
    resolution: Resolution
    pixel_size: float
    regularisation: dict


def _mask_and_fsc(maps: list[np.ndarray], pixel_size: float, mask: np.ndarray | None) -> tuple[np.ndarray, MaskedFSC]:
    """The mask (``mask``, else :func:`~cryo_forum.physics.masks.half_map_mask` of the half maps) and the half
    maps' FSC in it."""
    used = half_map_mask(*maps, pixel_size) if mask is None else mask
    return used, masked_fsc(*maps, used, pixel_size)


def reference_map(
    particles: ParticleSet,
    indices=None,
    symmetry: str = "C1",
    wiener_constant: float | None = None,
    iterations: int = TAU2_ITERATIONS,
    mask: np.ndarray | None = None,
    subset_column: str = star.RANDOM_SUBSET,
    batch_size: int = 256,
    progress: bool = False,
) -> ReferenceMap:
    """Half maps (:func:`split_halves`), the map of all particles, a mask and the masked FSC, each image read once.

    By default the maps are FSC-weighted: half maps with the constant Wiener term give the masked, corrected
    FSC, its SSNR (:func:`ssnr_from_fsc`) regularises the half maps again (``iterations`` times) and the last
    FSC the full map. A number ``wiener_constant`` keeps the constant term instead. ``mask`` [D, D, D] replaces
    the automatic one. Holds two accumulators (see the module).
    """
    check_settings(wiener_constant, iterations, batch_size)
    if mask is not None and np.shape(mask) != (particles.box_size,) * 3:
        raise InvalidSetting("mask", f"has shape {np.shape(mask)}, the maps {(particles.box_size,) * 3}")
    pixel_size = particles.pixel_size
    first, second = split_halves(particles, indices, subset_column)
    halves = [backproject(particles, half, symmetry, batch_size, progress) for half in (first, second)]
    constant = WIENER_CONSTANT if wiener_constant is None else wiener_constant
    maps = [half.volume(constant) for half in halves]
    used_mask, result = _mask_and_fsc(maps, pixel_size, mask)
    regularisation = {"kind": "wiener", "constant": float(constant)}
    if wiener_constant is None:
        for iteration in range(1, int(iterations) + 1):
            log.info(f"FSC weighting {iteration}/{iterations}: half maps at {result.resolution()} (FSC = 0.143)")
            ssnr = ssnr_from_fsc(result.corrected)
            maps = [half.volume(ssnr=ssnr) for half in halves]
            used_mask, result = _mask_and_fsc(maps, pixel_size, mask)
        regularisation = {"kind": "fsc_weighted", "iterations": int(iterations)}
    if not result.has_mask:
        log.warning("no density stands out of the noise in the half maps: no mask, the unmasked FSC is used")
    halves[0] += halves.pop()
    full_ssnr = ssnr_from_fsc(result.corrected, full=True) if wiener_constant is None else None
    full = halves[0].volume(constant, ssnr=full_ssnr)
    return ReferenceMap(full, *maps, used_mask, result, result.resolution(), pixel_size, regularisation)
