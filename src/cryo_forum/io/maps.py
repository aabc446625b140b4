"""Maps to simulate from: MRC maps or atomic models, resampled to a pixel size and a cubic box.

Every map leaves :func:`load_volume` as a cubic float32 array ``[D, D, D]`` (``[z, y, x]``) with its centre of
mass at voxel ``D // 2``, the rotation centre of the projector. A map is resampled to another pixel size by a
low-pass at the new Nyquist frequency (when it gets coarser) followed by cubic-spline interpolation. An atomic
model (PDB or mmCIF, read by gemmi) becomes a map of its electron scattering potential (gemmi's
``DensityCalculatorE``, electron form factors and the model's B-factors) computed on a grid twice as fine and
Fourier-cropped to the pixel size, so the map is band-limited at Nyquist instead of aliased. An extra B-factor
of ``32 apix^2`` (a Gaussian of 0.64 px) damps Nyquist to exp(-2) beforehand, so the crop does not ring:
the map stays positive to within 1 % of its maximum.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
from scipy import ndimage

from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io.mrc import read_volume
from cryo_forum.resources import map_bytes, model_map_bytes, require_memory

MAP_SUFFIXES = (".mrc", ".map", ".ccp4", ".rec")
MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")
MODEL_MARGIN_ANGSTROM = 3.0  # atom density reaches this far beyond the atom centres
MODEL_BLUR_PER_PIXEL_AREA = 32.0  # extra B-factor (A^2) per apix^2: exp(-2) at Nyquist, so the crop does not ring

log = logging.getLogger("cryo_forum")


def example_map_path() -> Path:
    """The built-in example map (PDB 1A28 chain A, 48^3 voxels at 2 A/px; see cryo_forum/data/README.md)."""
    return Path(str(resources.files("cryo_forum") / "data" / "example.mrc"))


def example_model_path() -> Path:
    """The atomic model the example map was computed from (PDB 1A28 chain A, protein atoms)."""
    return Path(str(resources.files("cryo_forum") / "data" / "1a28_chainA.pdb"))


def benchmark_map_path() -> Path:
    """The benchmarks' map (PDB 5J0N, 3.67 A/px, MIT-licensed copy; provenance in cryo_forum/data/README.md)."""
    return Path(str(resources.files("cryo_forum") / "data" / "5j0n.mrc"))


def is_model_file(path: str | os.PathLike) -> bool:
    """True for names ending in a PDB/mmCIF suffix (optionally gzipped)."""
    return str(path).lower().endswith(MODEL_SUFFIXES)


def load_volume(
    path: str | os.PathLike, pixel_size: float | None = None, size: int | None = None, center: bool = True
) -> tuple[np.ndarray, float]:
    """A map or an atomic model as a cubic float32 volume [size, size, size] and its pixel size (A).

    ``pixel_size=None`` keeps a map's own pixel size; for a model it picks one at which the molecule spans
    two thirds of the box (at least 1 A). ``size=None`` takes the smallest even box holding the map (or the
    molecule with a margin). With ``center`` the centre of mass moves to voxel ``size // 2``. A map resampled to
    another box or pixel size is logged in one line; a box that would not fit in the available memory is refused
    (:class:`~cryo_forum.errors.InvalidSetting` ``size``) before it is allocated.
    """
    path = Path(path)
    if not path.is_file():
        raise CryoForumError(f"{path}: file not found")
    if pixel_size is not None and not pixel_size > 0:
        raise InvalidSetting("pixel_size", f"must be positive, got {pixel_size}")
    if size is not None and not (int(size) == size and size > 0):
        raise InvalidSetting("size", f"must be a positive number of pixels, got {size}")
    if is_model_file(path):
        return _volume_from_model(path, pixel_size, size)
    if not str(path).lower().endswith(MAP_SUFFIXES):
        raise CryoForumError(
            f"{path}: unknown file type; expected a map ({', '.join(MAP_SUFFIXES)}) "
            f"or an atomic model ({', '.join(MODEL_SUFFIXES)})"
        )
    volume, map_pixel_size = read_volume(path)
    if not np.isfinite(volume).all():
        raise CryoForumError(f"{path}: the map contains NaN or infinite values")
    if pixel_size is None:
        if not map_pixel_size > 0:
            raise CryoForumError(f"{path}: the header sets no pixel size; give one (--apix)")
        pixel_size = map_pixel_size
    elif not map_pixel_size > 0:
        map_pixel_size = pixel_size  # no header value: the given pixel size is the map's own
    if size is None:
        size = _even(math.ceil(max(volume.shape) * map_pixel_size / pixel_size - 1e-6))
    require_memory("size", map_bytes(size), f"a {size} px box", "the map resampled into it")
    if volume.shape != (size,) * 3 or abs(map_pixel_size / pixel_size - 1.0) > 1e-6:
        shape = f"{volume.shape[0]}" if len(set(volume.shape)) == 1 else " x ".join(map(str, volume.shape[::-1]))
        log.info(
            f"{path}: resampling the map from {shape} px at {map_pixel_size:.3f} A/px "
            f"to {size} px at {pixel_size:.3f} A/px"
        )
    boxed = resample_volume(volume, map_pixel_size, pixel_size, size, center)
    kept = (
        np.clip(boxed, 0, None).sum() * pixel_size**3 / max(np.clip(volume, 0, None).sum() * map_pixel_size**3, 1e-30)
    )
    if kept < 0.95:
        warnings.warn(
            f"{path}: {100 * (1 - kept):.0f} % of the map's density lies outside the {size}^3 box", stacklevel=2
        )
    return boxed, float(pixel_size)


def _even(n: int) -> int:
    return n + (n % 2)


def lowpass_volume(volume: np.ndarray, pixel_size: float, resolution: float) -> np.ndarray:
    """Remove spatial frequencies above 1/resolution (1/A) from a volume [z, y, x], with a short cosine edge."""
    spectrum = np.fft.fftn(volume)
    freqs = [np.fft.fftfreq(n, d=pixel_size) for n in volume.shape]
    radius = np.sqrt(freqs[0][:, None, None] ** 2 + freqs[1][None, :, None] ** 2 + freqs[2][None, None, :] ** 2)
    edge = np.clip((radius * resolution - 0.9) / 0.1, 0.0, 1.0)  # 1 below 0.9 / resolution, 0 above it
    return np.fft.ifftn(spectrum * 0.5 * (1.0 + np.cos(np.pi * edge))).real


def center_of_mass(volume: np.ndarray) -> np.ndarray:
    """Centre of mass (z, y, x) in voxels of the positive part of a volume; the box centre if it has none."""
    weights = np.clip(volume, 0.0, None)
    if not weights.sum() > 0:
        return np.array([n // 2 for n in volume.shape], dtype=np.float64)
    return np.asarray(ndimage.center_of_mass(weights), dtype=np.float64)


def resample_volume(
    volume: np.ndarray, pixel_size_in: float, pixel_size_out: float, size: int, center: bool = True
) -> np.ndarray:
    """Resample a volume [z, y, x] (any shape) to a cube [size]^3 at another pixel size.

    Coarser sampling first removes what lies beyond the new Nyquist frequency (no aliasing); the values are
    then read by cubic-spline interpolation (zero outside the input). At an unchanged pixel size the centre
    of mass moves by whole voxels only, so voxel values are copied exactly.
    """
    volume = np.asarray(volume, dtype=np.float64)
    scale = pixel_size_out / pixel_size_in
    same_sampling = abs(scale - 1.0) < 1e-6
    source_centre = center_of_mass(volume) if center else np.array([n // 2 for n in volume.shape], float)
    if same_sampling:
        shift = np.round(source_centre).astype(int) - size // 2
        out = np.zeros((size,) * 3)
        src = [slice(max(s, 0), min(s + size, n)) for s, n in zip(shift, volume.shape, strict=True)]
        dst = [slice(r.start - s, r.stop - s) for r, s in zip(src, shift, strict=True)]
        if all(r.stop > r.start for r in src):
            out[tuple(dst)] = volume[tuple(src)]
        return out.astype(np.float32)
    if scale > 1.0:
        volume = lowpass_volume(volume, pixel_size_in, 2.0 * pixel_size_out)
    # Output voxel o reads the input at (o - size // 2) * scale + source_centre along each axis (no coordinate grids).
    return ndimage.affine_transform(
        volume,
        np.full(3, scale),
        offset=source_centre - (size // 2) * scale,
        output_shape=(size,) * 3,
        output=np.float32,
        order=3,
        mode="constant",
        cval=0.0,
    )


def fourier_crop_volume(volume: np.ndarray, new_size: int) -> np.ndarray:
    """Downsample a cube [D, D, D] to [new_size]^3 by cropping its centred spectrum; voxel means are kept."""
    size = volume.shape[0]
    spectrum = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume)))
    start = size // 2 - new_size // 2
    window = slice(start, start + new_size)
    cropped = spectrum[window, window, window]
    out = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(cropped))).real
    return out * (new_size / size) ** 3


def _read_model(path: Path):
    import gemmi

    try:
        structure = gemmi.read_structure(str(path))
    except Exception as error:
        raise CryoForumError(f"{path}: not a readable PDB/mmCIF model ({error})") from None
    structure.remove_waters()
    if len(structure) == 0 or structure[0].count_atom_sites() == 0:
        raise CryoForumError(f"{path}: the model contains no atoms")
    return structure


def _volume_from_model(path: Path, pixel_size: float | None, size: int | None) -> tuple[np.ndarray, float]:
    """Electron scattering potential of the first model of a PDB/mmCIF file; see :func:`load_volume`."""
    import gemmi

    structure = _read_model(path)
    model = structure[0]
    positions = np.array([atom.pos.tolist() for chain in model for residue in chain for atom in residue])
    centre = positions.mean(axis=0)
    diameter = 2.0 * (np.linalg.norm(positions - centre, axis=1).max() + MODEL_MARGIN_ANGSTROM)
    if pixel_size is None:
        pixel_size = max(1.0, math.ceil(100 * 1.5 * diameter / size) / 100) if size else 1.0
    fit = _even(math.ceil(diameter / pixel_size) + 2)
    box = max(fit, size or 0)
    require_memory("size", model_map_bytes(box), f"a {box} px box", f"the map of {path.name} at {pixel_size:g} A/px")
    edge = box * pixel_size
    # A P1 cell of the box size with the molecule in its middle; the density is computed at half the pixel size.
    structure.cell = gemmi.UnitCell(edge, edge, edge, 90.0, 90.0, 90.0)
    structure.spacegroup_hm = "P 1"
    model.transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(*(edge / 2.0 - centre))))
    calculator = gemmi.DensityCalculatorE()
    calculator.grid.set_unit_cell(structure.cell)
    calculator.grid.spacegroup = gemmi.SpaceGroup("P 1")
    calculator.grid.set_size(2 * box, 2 * box, 2 * box)
    calculator.blur = MODEL_BLUR_PER_PIXEL_AREA * pixel_size**2
    calculator.put_model_density_on_grid(model)
    fine = np.array(calculator.grid, copy=True).transpose(2, 1, 0).astype(np.float64)  # [x, y, z] -> [z, y, x]
    volume = fourier_crop_volume(fine, box)
    return resample_volume(volume, pixel_size, pixel_size, size or box, center=True), float(pixel_size)
