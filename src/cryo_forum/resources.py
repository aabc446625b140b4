"""What a run will cost in memory and disk, estimated before anything large is allocated.

Each estimate is the peak of the large arrays of one piece of work (the projector's spectrum, a chunk of
rendered images, the reference table of a search); the interpreter and TensorFlow are already in use, so
they are left out and compared with the memory *available* now. The work that can be chunked is chunked to
the budgets below, so these costs do not grow with the number of particles. A request that cannot fit is
refused with :class:`~cryo_forum.errors.InvalidSetting` naming the setting at fault, instead of ending in a
``MemoryError`` (or the kernel's out-of-memory killer) after minutes of work.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from cryo_forum.errors import InvalidSetting

CHUNK_VALUES = 2**22  # values per chunk of chunked work (interpolated points, candidate slices, pixels)
PROJECTION_POINTS = 2**20  # spectrum points read per call when projecting whole images (~110 bytes each)
RENDER_BYTES_PER_PIXEL = 100  # simulating one image: its slice, shift, CTF and noise (65-95 measured, TensorFlow)
CANVAS_BYTES_PER_PIXEL = 200  # more for an off-centre particle or ice, drawn on a canvas twice as wide (140)
PARTICLE_BYTES_PER_PIXEL = 64  # matching one particle: its image, spectrum and CTF
FIT_BYTES_PER_POINT = 300  # one frequency of one particle in a local fit's step: corners, gradients, basis
FIT_BATCH_BYTES = 2**29  # the local fit's batch stays within 512 MB (128 particles of 64 px, 64 of 256 px)
TABLE_BYTES_PER_PARTICLE = 400  # a simulated particle's row: draws, STAR columns and image name
STAR_BYTES_PER_PARTICLE = 300  # a particle's line in a STAR file


def available_memory() -> int | None:
    """Bytes a new allocation can use now: MemAvailable of /proc/meminfo, else the physical memory; None if unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def free_disk(path: str | os.PathLike) -> tuple[Path, int]:
    """The nearest existing folder of ``path`` (itself or an ancestor) and the bytes free on its file system."""
    folder = Path(path).absolute()
    while not folder.is_dir() and folder.parent != folder:
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def format_bytes(count: float) -> str:
    """``640 kB``, ``6.4 GB``, ``64000 TB``: decimal units, one decimal below 10."""
    units = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6))
    unit, scale = next(((unit, scale) for unit, scale in units if count >= scale), ("kB", 1e3))
    value = count / scale
    return f"{value:.1f} {unit}" if value < 9.95 else f"{value:.0f} {unit}"


def memory_shortfall(needed: int, purpose: str = "") -> str | None:
    """None if ``needed`` bytes fit in the available memory, else "needs X of memory [for PURPOSE]; this machine
    has Y available"."""
    available = available_memory()
    if available is None or needed <= available:
        return None
    cost = f"needs {format_bytes(needed)} of memory" + (f" for {purpose}" if purpose else "")
    return f"{cost}; this machine has {format_bytes(available)} available"


def require_memory(setting: str, needed: int, subject: str, purpose: str = "", advice: str = "") -> None:
    """Refuse ``needed`` bytes beyond the available memory: InvalidSetting(setting, "SUBJECT needs X of memory
    [for PURPOSE]; this machine has Y available[; ADVICE]")."""
    shortfall = memory_shortfall(needed, purpose)
    if shortfall is not None:
        raise InvalidSetting(setting, f"{subject} {shortfall}" + (f"; {advice}" if advice else ""))


def require_disk(setting: str, needed: int, path: str | os.PathLike, subject: str) -> None:
    """Refuse ``needed`` bytes beyond the free space of ``path``'s file system: InvalidSetting(setting, "SUBJECT
    need X on disk; FOLDER has Y free")."""
    folder, free = free_disk(path)
    if needed > free:
        message = f"{subject} need {format_bytes(needed)} on disk; {folder} has {format_bytes(free)} free"
        raise InvalidSetting(setting, message)


# ---------------------------------------------------------------- estimates


def projector_bytes(size: int, oversampling: int = 2) -> int:
    """A FourierProjector of a D px map: its (oversampling D + 2)^3 complex64 spectrum table, and while it is
    built, a slab of oversampling D x D x D complex64 values, a chunk of planes with its reordered copy and two
    float32 copies of the map."""
    padded = oversampling * size
    return 8 * (padded + 2) ** 3 + 8 * padded * size**2 + 16 * CHUNK_VALUES + 8 * size**3


def map_bytes(size: int) -> int:
    """A map boxed to D px: float32 as loaded and float64 as the simulator keeps it."""
    return 12 * size**3


def model_map_bytes(size: int) -> int:
    """A map computed from an atomic model in a D px box: gemmi's grid twice as fine (float32), its float64
    copy and the complex128 spectra of the Fourier crop."""
    return (4 + 8 + 3 * 16) * (2 * size) ** 3 + map_bytes(size)


def outlier_map_bytes(size: int) -> int:
    """Building a decoy or broken map of D px: coordinate grids and blobs in float64 (88 bytes a voxel measured)."""
    return 96 * size**3


def render_bytes(size: int, images: int, canvas_fraction: float = 0.0) -> int:
    """Rendering ``images`` particles of D px at once (their slices read in one go), ``canvas_fraction`` of them
    on the wider canvas."""
    per_pixel = RENDER_BYTES_PER_PIXEL + canvas_fraction * CANVAS_BYTES_PER_PIXEL
    return math.ceil(images * size**2 * per_pixel)


def stack_bytes(n: int, size: int) -> int:
    """An MRC stack of n float32 images of D px: header and data."""
    return 1024 + 4 * n * size**2


def chunk_of(total: int, cost_per_item: int, budget: int | None = None) -> int:
    """How many of ``total`` items to take at once so that ``cost_per_item`` each stays within ``budget`` (default
    CHUNK_VALUES); at least one."""
    budget = CHUNK_VALUES if budget is None else budget
    return max(1, min(int(total), budget // max(int(cost_per_item), 1)))


def match_bytes(
    size: int,
    batch_size: int,
    rotations: int,
    coarse_frequencies: int,
    coarse_shifts: int,
    local_shifts: int,
    oversampling: int = 2,
    grid_bytes: int = 0,
) -> int:
    """Projection matching of D px particles ``batch_size`` at a time against ``rotations`` coarse references.

    The projector; the coarse reference table (real | imaginary parts and power, float32); a chunk of coarse
    scores; the weighted particles of the coarse stage ([B, T, K] complex); a batch of particle images, spectra
    and CTFs; the local stage's chunk of candidate slices and the weighted particles of its sub-batch; the noise
    estimate's chunk of spectra; and ``grid_bytes`` for building the global grid.
    """
    fine_frequencies = math.ceil(math.pi * size**2 / 8) + size
    table = 12 * rotations * coarse_frequencies
    scores = 16 * CHUNK_VALUES  # a block of coarse scores and its reordered copy, or of the table as it is built
    coarse_weighted = 40 * batch_size * coarse_shifts * coarse_frequencies
    batch = PARTICLE_BYTES_PER_PIXEL * batch_size * size**2 + 4 * batch_size * fine_frequencies
    local = 40 * CHUNK_VALUES + 40 * local_shifts * max(fine_frequencies, CHUNK_VALUES // 125)
    noise = 40 * max(CHUNK_VALUES, size**2)
    return projector_bytes(size, oversampling) + table + scores + coarse_weighted + batch + local + noise + grid_bytes
