"""MRC images, stacks and volumes through ``mrcfile``: stacks read by rows, outputs written atomically.

Particle stacks can be far larger than memory. :class:`StackReader` reads chosen images with positioned
reads (every page of a memory map that is touched counts in the process's resident memory, so reading a
stack once through a map makes RSS grow by the whole stack); :func:`open_stack` still returns a read-only
memory map for whole-stack work, and :func:`stack_writer` fills a memory-mapped output in place. Arrays are
``[n, y, x]`` for stacks and ``[z, y, x]`` for volumes; pixel sizes are in Angstrom (0.0 when not set).
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
from mrcfile.utils import byte_order_from_machine_stamp

from cryo_forum.errors import CryoForumError
from cryo_forum.io.atomic import atomic_output, refuse_overwriting_inputs

_MODES = (0, 1, 2, 4, 6, 12)  # the modes mrcfile can map to numpy types


@dataclass(frozen=True)
class MrcInfo:
    """What the header of an MRC file says: data shape ``[z, y, x]`` or ``[y, x]``, pixel size, volume or not."""

    shape: tuple[int, ...]
    pixel_size: float
    is_volume: bool


def _check_extended_header(path: Path) -> None:
    """Refuse a header whose extended-header length exceeds the file before mrcfile allocates that much.

    The byte order is chosen as mrcfile's permissive reader chooses it (machine stamp, else the order
    that gives a valid mode).
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(HEADER_DTYPE.itemsize)
    if len(raw) < HEADER_DTYPE.itemsize:
        raise CryoForumError(f"{path}: truncated MRC file ({size} bytes, shorter than an MRC header)")
    try:
        order = byte_order_from_machine_stamp(np.frombuffer(raw, HEADER_DTYPE)["machst"][0])
    except ValueError:
        order = "<"
    headers = [np.frombuffer(raw, HEADER_DTYPE.newbyteorder(o))[0] for o in (order, "<" if order == ">" else ">")]
    valid = [h for h in headers if int(h["mode"]) in _MODES]
    nsymbt = int((valid or headers)[0]["nsymbt"])
    if not 0 <= nsymbt <= size - HEADER_DTYPE.itemsize:
        raise CryoForumError(f"{path}: corrupt or truncated MRC file (extended header of {nsymbt} bytes)")


def _open_data(path: Path) -> tuple[np.memmap, float, int, int]:
    """Memory-map the data of ``path``; return (read-only array, pixel size, space group, data offset in bytes)."""
    if not path.is_file():
        raise CryoForumError(f"{path}: MRC file not found")
    _check_extended_header(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
                data, pixel_size, ispg = mrc.data, float(mrc.voxel_size.x), int(mrc.header.ispg)
                offset = int(mrc.header.nbytes + mrc.extended_header.nbytes)
        except Exception as error:
            raise CryoForumError(f"{path}: not a readable MRC file ({error})") from None
    if data is None or data.dtype.kind not in "iuf":
        detail = "; ".join(str(w.message) for w in caught) or "unsupported data mode"
        raise CryoForumError(f"{path}: corrupt or truncated MRC file ({detail})")
    return data, pixel_size, ispg, offset


def mrc_info(path: str | os.PathLike) -> MrcInfo:
    """Shape, pixel size and kind of an MRC file; a 3-D file is a volume unless it is a ``.mrcs``
    or marked as an image stack (space group 0)."""
    path = Path(path)
    data, pixel_size, ispg, _ = _open_data(path)
    is_volume = data.ndim == 3 and ispg != 0 and path.suffix.lower() != ".mrcs"
    return MrcInfo(tuple(int(n) for n in data.shape), pixel_size, is_volume)


def open_stack(path: str | os.PathLike) -> np.ndarray:
    """A read-only memory map of the images of an MRC stack, [N, D, D]; a single 2-D image gives N = 1.

    Nothing is read until elements are indexed; convert the selected images to float32 yourself.
    """
    return _open_stack(Path(path))[0]


def _open_stack(path: Path) -> tuple[np.memmap, int]:
    """The checked stack memory map [N, D, D] of ``path`` and the byte offset of its data in the file."""
    data, _, _, offset = _open_data(path)
    if data.ndim == 2:
        data = data[None]
    if data.ndim != 3:
        raise CryoForumError(f"{path}: expected an image or a stack of images, found {data.ndim}-D data")
    if data.shape[1] != data.shape[2]:
        raise CryoForumError(f"{path}: images must be square, found {data.shape[2]} x {data.shape[1]} pixels")
    return data, offset


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
    data, pixel_size, _, _ = _open_data(path)
    if data.ndim != 3:
        raise CryoForumError(f"{path}: expected a 3-D volume, found {data.ndim}-D data of shape {data.shape}")
    return np.array(data, dtype=np.float32), pixel_size


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
