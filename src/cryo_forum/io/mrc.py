"""MRC images, stacks and volumes through ``mrcfile``: stacks read by rows, outputs written atomically.

Particle stacks can be far larger than memory. :class:`StackReader` reads chosen images with positioned
reads (every page of a memory map that is touched counts in the process's resident memory, so reading a
stack once through a map makes RSS grow by the whole stack); :func:`open_stack` still returns a read-only
memory map for whole-stack work, and :func:`stack_writer` fills a memory-mapped output in place. Arrays are
``[n, y, x]`` for stacks and ``[z, y, x]`` for volumes; pixel sizes are in Angstrom (0.0 when not set).
:func:`mrc_info` reads only the 1024-byte header, so it is cheap enough to call on thousands of stacks.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
from mrcfile.dtypes import HEADER_DTYPE
from mrcfile.utils import (
    byte_order_from_machine_stamp,
    data_shape_from_header,
    dtype_from_mode,
    spacegroup_is_volume_stack,
)

from cryo_forum.errors import CryoForumError
from cryo_forum.io.atomic import atomic_output, refuse_overwriting_inputs

_MODES = (0, 1, 2, 4, 6, 12)  # the modes mrcfile can map to numpy types
# Image stacks by their name whatever the header says: RELION's particle stacks and IMOD's tilt series
# (IMOD writes ispg 0 with mz = nz, so its header alone would make a tilt series a volume).
_STACK_NAMES = (".mrcs", ".st")


@dataclass(frozen=True)
class MrcInfo:
    """What the header of an MRC file says: data shape ``[z, y, x]`` or ``[y, x]``, pixel size (0.0 if not
    set), volume or image(s), and whether the file is shorter than the data the header declares."""

    shape: tuple[int, ...]
    pixel_size: float
    is_volume: bool
    truncated: bool


@dataclass(frozen=True)
class _Header:
    """The fields of a checked MRC header that the rest of this module needs."""

    shape: tuple[int, ...]
    dtype: np.dtype
    pixel_size: float
    ispg: int
    mz: int
    offset: int  # of the data, in bytes from the start of the file
    file_size: int


def _read_header(path: Path) -> _Header:
    """Read and check the header of ``path`` without touching its data (no memory map, one 1 KiB read).

    The byte order is chosen as mrcfile's permissive reader chooses it (machine stamp, else the order
    that gives a valid mode); an extended-header length beyond the file is refused before anything
    allocates that much. Shape and pixel size follow mrcfile (``cella.x / mx``), 0.0 when not set.
    """
    if not path.is_file():
        raise CryoForumError(f"{path}: MRC file not found")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_DTYPE.itemsize)
    if len(raw) < HEADER_DTYPE.itemsize:
        raise CryoForumError(f"{path}: truncated MRC file ({size} bytes, shorter than an MRC header)")
    try:
        order = byte_order_from_machine_stamp(np.frombuffer(raw, HEADER_DTYPE)["machst"][0])
    except ValueError:
        order = "<"
    orders = [order, "<" if order == ">" else ">"]
    headers = [np.frombuffer(raw, HEADER_DTYPE.newbyteorder(o)).view(np.recarray)[0] for o in orders]
    valid = [i for i, h in enumerate(headers) if int(h.mode) in _MODES]
    chosen = valid[0] if valid else 0
    header, order = headers[chosen], orders[chosen]
    nsymbt = int(header.nsymbt)
    if not 0 <= nsymbt <= size - HEADER_DTYPE.itemsize:
        raise CryoForumError(f"{path}: corrupt or truncated MRC file (extended header of {nsymbt} bytes)")
    if not valid or dtype_from_mode(int(header.mode)).kind not in "iuf":
        raise CryoForumError(f"{path}: not a readable MRC file (unsupported data mode {int(header.mode)})")
    dims = (int(header.nx), int(header.ny), int(header.nz))
    if min(dims) < 1 or (spacegroup_is_volume_stack(header.ispg) and int(header.mz) < 1):
        raise CryoForumError(f"{path}: corrupt MRC header (nx, ny, nz = {dims}, mz = {int(header.mz)})")
    mx = int(header.mx)
    return _Header(
        shape=tuple(int(n) for n in data_shape_from_header(header)),
        dtype=dtype_from_mode(int(header.mode)).newbyteorder(order),
        pixel_size=float(np.float32(header.cella.x / mx)) if mx > 0 else 0.0,
        ispg=int(header.ispg),
        mz=int(header.mz),
        offset=HEADER_DTYPE.itemsize + nsymbt,
        file_size=size,
    )


def _is_volume(path: Path, header: _Header) -> bool:
    """The one rule telling a 3-D map from images, after MRC2014 and mrcfile.

    A ``.mrcs``/``.st`` file is a stack whatever its header says; a 2-D file or a single section is one
    image; other 3-D data are an image stack only when marked as one (ispg 0 *and* mz 1, as mrcfile's
    ``set_image_stack`` writes). Maps from Chimera and others also carry ispg 0, but with mz = nz.
    """
    if path.suffix.lower() in _STACK_NAMES or len(header.shape) != 3 or header.shape[0] == 1:
        return False
    return not (header.ispg == 0 and header.mz == 1)


def _data_end(header: _Header) -> int:
    """The file size the header declares: header, extended header and data."""
    return header.offset + int(np.prod(header.shape)) * header.dtype.itemsize


def _open_data(path: Path) -> tuple[np.memmap, _Header]:
    """Memory-map the data of ``path``; return the read-only array and the checked header."""
    header = _read_header(path)
    declared = _data_end(header)
    if header.file_size < declared:
        raise CryoForumError(
            f"{path}: corrupt or truncated MRC file ({header.file_size} bytes, header declares {declared})"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
                data = mrc.data
        except Exception as error:
            raise CryoForumError(f"{path}: not a readable MRC file ({error})") from None
    if data is None or data.dtype.kind not in "iuf":
        detail = "; ".join(str(w.message) for w in caught) or "unsupported data mode"
        raise CryoForumError(f"{path}: corrupt or truncated MRC file ({detail})")
    return data, header


def mrc_info(path: str | os.PathLike) -> MrcInfo:
    """Shape, pixel size, kind (see :func:`_is_volume`) and completeness of an MRC file, from its header only.

    Unlike the readers, a file shorter than its header declares is described (``truncated``), not refused.
    """
    path = Path(path)
    header = _read_header(path)
    return MrcInfo(header.shape, header.pixel_size, _is_volume(path, header), header.file_size < _data_end(header))


def open_stack(path: str | os.PathLike) -> np.ndarray:
    """A read-only memory map of the images of an MRC stack, [N, D, D]; a single 2-D image gives N = 1.

    Nothing is read until elements are indexed; convert the selected images to float32 yourself.
    """
    return _open_stack(Path(path))[0]


def _open_stack(path: Path) -> tuple[np.memmap, int]:
    """The checked stack memory map [N, D, D] of ``path`` and the byte offset of its data in the file."""
    data, header = _open_data(path)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise CryoForumError(f"{path}: expected an image or a stack of images, found {data.ndim}-D data")
    if data.shape[1] != data.shape[2]:
        raise CryoForumError(f"{path}: images must be square, found {data.shape[2]} x {data.shape[1]} pixels")
    return data, header.offset


class StackReader:
    """Chosen images of an MRC stack read with positioned reads straight into a new array, no memory map.

    The header is checked as by :func:`open_stack` (same errors). The file stays open until the reader is
    garbage-collected; reads carry their own offsets, so threads may share a reader.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        data, self._offset = _open_stack(self.path)
        self.shape: tuple[int, int, int] = tuple(int(n) for n in data.shape)
        self.dtype: np.dtype = data.dtype  # as stored, byte order included
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows) -> np.ndarray:
        """Images ``rows`` (0-based, any order, repeats allowed) as float32 [n, D, D].

        Each run of consecutive rows is one read; sorted rows (``np.unique``) make the fewest reads.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"{self.path}: rows must lie in [0, {len(self)})")
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float32)
        raw = out if self.dtype == out.dtype else np.empty(out.shape, dtype=self.dtype)
        buffer = memoryview(raw.reshape(-1).view(np.uint8))
        row_bytes = self.shape[1] * self.shape[2] * self.dtype.itemsize
        starts = np.flatnonzero(np.diff(rows, prepend=-2) != 1)  # of runs of consecutive rows (rows >= 0)
        for start, stop in zip(starts, [*starts[1:], len(rows)], strict=False):  # no runs when no rows
            self._read_into(buffer[start * row_bytes : stop * row_bytes], self._offset + int(rows[start]) * row_bytes)
        if raw is not out:
            out[...] = raw
        return out

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        while len(buffer):
            count = os.preadv(self._fd, [buffer], offset)
            if count == 0:
                raise CryoForumError(f"{self.path}: corrupt or truncated MRC file (no data at byte {offset})")
            buffer, offset = buffer[count:], offset + count


def read_volume(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """A 3-D map as float32 [z, y, x] in memory and its pixel size in Angstrom (0.0 if not set)."""
    path = Path(path)
    data, header = _open_data(path)
    if data.ndim != 3:
        raise CryoForumError(f"{path}: expected a 3-D volume, found {data.ndim}-D data of shape {data.shape}")
    return np.array(data, dtype=np.float32), header.pixel_size


def _write(path: str | os.PathLike, data: np.ndarray, pixel_size: float, stack: bool, inputs) -> None:
    refuse_overwriting_inputs(path, inputs)
    with atomic_output(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(data)
        if stack:
            mrc.set_image_stack()
        else:
            mrc.set_volume()
        mrc.voxel_size = float(pixel_size)


def write_volume(
    path: str | os.PathLike, volume: np.ndarray, pixel_size: float, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Write a float32 volume [z, y, x] with its pixel size, atomically and never over ``inputs``."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"a volume must be 3-D, got shape {volume.shape}")
    _write(path, volume, pixel_size, stack=False, inputs=inputs)


def write_stack(
    path: str | os.PathLike, images: np.ndarray, pixel_size: float, inputs: Iterable[str | os.PathLike] = ()
) -> None:
    """Write images [N, D, D] (or one [D, D]) as a float32 image stack, atomically and never over ``inputs``."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"a stack must be [N, D, D], got shape {images.shape}")
    _write(path, images, pixel_size, stack=True, inputs=inputs)


@contextlib.contextmanager
def stack_writer(
    path: str | os.PathLike, n: int, size: int, pixel_size: float, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[np.ndarray]:
    """Yield a writable float32 memory map [n, size, size] backed by a temporary file beside ``path``.

    Fill it in pieces; when the block ends without error the file is renamed onto ``path``, otherwise
    it is deleted. Header statistics are left undetermined (computing them would re-read the file).
    """
    refuse_overwriting_inputs(path, inputs)
    with atomic_output(path) as tmp:
        with mrcfile.new_mmap(tmp, shape=(n, size, size), mrc_mode=2, overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size)
            mrc.reset_header_stats()
            yield mrc.data
