"""ParticleSet: particle metadata as one pandas table, images read lazily, by rows, from MRC stacks.

Opened from a RELION STAR file (3.0, 3.1/4.0 or 5), a cryoSPARC ``.cs`` file or a bare ``.mrcs`` stack.
``rlnImageName`` ``"000001@stack.mrcs"`` is 1-based; a relative stack path is looked up beside the STAR
file, then in the working directory, then in ``datadir``. :meth:`ParticleSet.write_star` writes the
original blocks back (optics intact, same RELION layout) with new columns, never over the source.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from cryo_forum import geometry
from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.io.cryosparc import read_cs
from cryo_forum.io.mrc import StackReader, mrc_info, open_stack

STACK_SUFFIXES = (".mrcs", ".mrc", ".st")
RELION_31_VERSION = 30001  # the "# version" tag of the RELION 3.1/4.0 STAR layout
_VERSION_NAMES = {30001: "3.1", 50001: "5"}
_OPEN_STACKS = 64  # stack files kept open at once (least recently used closed first)

log = logging.getLogger(__name__)


class _StackCache:
    """Resolved paths and open readers of stacks, shared between a set and its subsets.

    Shuffled batches over many stacks reuse open files instead of reopening them; a reader dropped from
    the cache closes its file once no thread is still reading from it.
    """

    def __init__(self) -> None:
        self.paths: dict[str, Path] = {}
        self.readers: OrderedDict[Path, StackReader] = OrderedDict()
        self.lock = threading.Lock()  # tf.data may read from several threads

    def open(self, path: Path) -> StackReader:
        with self.lock:
            if path in self.readers:
                self.readers.move_to_end(path)
                return self.readers[path]
        reader = StackReader(path)
        with self.lock:
            self.readers[path] = reader
            if len(self.readers) > _OPEN_STACKS:
                self.readers.popitem(last=False)
        return reader


def _partition_image_names(names: pd.Series) -> pd.DataFrame:
    """``index@stack`` names -> columns 0 (index), 1 ("@" or ""), 2 (stack); three columns even when empty."""
    if not len(names):
        return pd.DataFrame({0: pd.Series(dtype=str), 1: pd.Series(dtype=str), 2: pd.Series(dtype=str)})
    return names.astype(str).str.partition("@")


class ParticleSet:
    """Particles with RELION metadata (``table``) and lazily read images; build with :meth:`open`."""

    def __init__(
        self,
        source: Path,
        kind: str,
        blocks: dict[str, star.Block],
        particles_key: str,
        datadir: Path | None = None,
        version: int | None = None,
        cache: _StackCache | None = None,
    ) -> None:
        self.source = source
        self.kind = kind  # "star", "cs" or "mrcs"
        self.datadir = datadir
        self.version = version
        self._blocks = blocks
        self._particles_key = particles_key
        self._raw = blocks[particles_key].reset_index(drop=True)
        optics = blocks.get(star.OPTICS_BLOCK)
        self.optics: pd.DataFrame | None = optics if isinstance(optics, pd.DataFrame) else None
        self.table = self._merge_optics()
        self._cache = cache or _StackCache()
        self._parse_image_names()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike, datadir: str | os.PathLike | None = None) -> ParticleSet:
        """Open a ``.star``, ``.cs`` or bare ``.mrcs`` file; images are not read until requested."""
        path = Path(path)
        datadir = Path(datadir) if datadir is not None else None
        suffix = path.suffix.lower()
        if suffix == ".star":
            blocks = star.read_star(path)
            key = _particle_block(path, blocks)
            return cls(path, "star", blocks, key, datadir, star.star_version(path))
        if suffix == ".cs":
            particles, optics = read_cs(path)
            blocks = {star.OPTICS_BLOCK: optics, star.PARTICLES_BLOCK: particles}
            return cls(path, "cs", blocks, star.PARTICLES_BLOCK, datadir, RELION_31_VERSION)
        if suffix in STACK_SUFFIXES:
            return cls._from_stack(path, datadir)
        raise CryoForumError(f"{path}: unknown particle file type (expected .star, .cs or {'/'.join(STACK_SUFFIXES)})")

    @classmethod
    def _from_stack(cls, path: Path, datadir: Path | None) -> ParticleSet:
        """One particle per image of an MRC stack; a file the header rule calls a volume is refused."""
        info = mrc_info(path)
        if info.is_volume:
            raise CryoForumError(
                f"{path}: is a 3-D volume, not a particle stack (name it .mrcs, or mark it a stack: ispg 0, mz 1)"
            )
        n = open_stack(path).shape[0]
        particles = pd.DataFrame(
            {
                star.IMAGE_NAME: [f"{i:06d}@{path.name}" for i in range(1, n + 1)],
                star.OPTICS_GROUP: np.ones(n, dtype=np.int64),
            }
        )
        optics = pd.DataFrame({star.OPTICS_GROUP_NAME: ["opticsGroup1"], star.OPTICS_GROUP: [1]})
        if info.pixel_size > 0:  # 0 means "not set" in an MRC header
            optics[star.IMAGE_PIXEL_SIZE] = info.pixel_size
        optics[star.IMAGE_SIZE] = info.shape[-1]
        optics[star.IMAGE_DIMENSIONALITY] = 2
        blocks = {star.OPTICS_BLOCK: optics, star.PARTICLES_BLOCK: particles}
        return cls(path, "mrcs", blocks, star.PARTICLES_BLOCK, datadir, RELION_31_VERSION)

    def _merge_optics(self) -> pd.DataFrame:
        """The particle rows with their optics-group values and a per-particle pixel size where known."""
        table = self._raw.copy()
        if self.optics is not None and len(self.optics):
            if star.OPTICS_GROUP not in self.optics:
                raise CryoForumError(f"{self.source}: data_optics has no {star.OPTICS_GROUP} column")
            lookup = self.optics.set_index(star.OPTICS_GROUP)
            if not lookup.index.is_unique:
                raise CryoForumError(f"{self.source}: optics group numbers are repeated in data_optics")
            if star.OPTICS_GROUP not in table:
                if len(lookup) != 1:
                    raise CryoForumError(f"{self.source}: particles lack {star.OPTICS_GROUP} but there are several")
                table[star.OPTICS_GROUP] = lookup.index[0]
            unknown = ~table[star.OPTICS_GROUP].isin(lookup.index)
            if unknown.any():
                group = table[star.OPTICS_GROUP][unknown].iloc[0]
                raise CryoForumError(f"{self.source}: particles refer to optics group {group}, not in data_optics")
            for column in lookup.columns:
                if column not in table:
                    table[column] = table[star.OPTICS_GROUP].map(lookup[column]).to_numpy()
        if star.IMAGE_PIXEL_SIZE not in table:
            if star.PIXEL_SIZE in table:
                table[star.IMAGE_PIXEL_SIZE] = table[star.PIXEL_SIZE].astype(np.float64)
            elif star.DETECTOR_PIXEL_SIZE in table and star.MAGNIFICATION in table:
                table[star.IMAGE_PIXEL_SIZE] = 1e4 * table[star.DETECTOR_PIXEL_SIZE] / table[star.MAGNIFICATION]
        return table

    def _parse_image_names(self) -> None:
        """Split every ``index@stack`` into a 0-based index and a stack code (into ``stack_names``)."""
        if star.IMAGE_NAME not in self._raw:
            raise CryoForumError(f"{self.source}: particle table has no {star.IMAGE_NAME} column")
        parts = _partition_image_names(self._raw[star.IMAGE_NAME])
        has_at = (parts[1] == "@").to_numpy()
        index = pd.to_numeric(parts[0].where(has_at, "1"), errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(index) | (index < 1) | (index != np.round(index))
        if bad.any():
            example = self._raw[star.IMAGE_NAME].iloc[int(np.flatnonzero(bad)[0])]
            raise CryoForumError(f"{self.source}: bad {star.IMAGE_NAME} {example!r} (expected 000001@stack.mrcs)")
        stacks = parts[2].where(has_at, parts[0])
        codes, names = pd.factorize(stacks)
        self._index = index.astype(np.int64) - 1
        self._codes = codes.astype(np.int64)
        self.stack_names: list[str] = [str(name) for name in names]

    # ------------------------------------------------------------------ metadata

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"ParticleSet({str(self.source)!r}, {len(self)} particles)"

    @property
    def relion_version(self) -> str | None:
        """RELION STAR layout of a STAR source ("3.0", "3.1", "5", "3.1+" if untagged); None otherwise."""
        if self.kind != "star":
            return None
        if self.version is not None:
            return _VERSION_NAMES.get(self.version, f"tag {self.version}")
        return "3.0" if self.optics is None else "3.1+"

    @property
    def has_poses(self) -> bool:
        return all(column in self.table for column in star.ANGLES)

    @property
    def has_origins(self) -> bool:
        return star.ORIGIN_X_ANGST in self.table or star.ORIGIN_X in self.table

    @property
    def has_ctf(self) -> bool:
        return star.DEFOCUS_U in self.table

    @cached_property
    def box_size(self) -> int:
        """Image size in pixels, from the metadata or else from the first stack's header."""
        if star.IMAGE_SIZE in self.table:
            sizes = np.unique(self.table[star.IMAGE_SIZE].dropna().astype(np.int64))
            if len(sizes) > 1:
                raise CryoForumError(f"{self.source}: particles have different box sizes {sizes.tolist()}")
            if len(sizes) == 1:
                return int(sizes[0])
        if not len(self):
            raise CryoForumError(f"{self.source}: no particles")
        return int(self._stack(int(self._codes[0])).shape[-1])

    @property
    def pixel_size(self) -> float:
        """The one pixel size (Angstrom) of all particles; an error if optics groups differ."""
        if star.IMAGE_PIXEL_SIZE in self.table:
            sizes = np.unique(self.table[star.IMAGE_PIXEL_SIZE].dropna().to_numpy(dtype=np.float64))
            if len(sizes) > 1:
                raise CryoForumError(
                    f"{self.source}: optics groups have different pixel sizes {sizes.tolist()} A; "
                    "select one group or use the per-particle rlnImagePixelSize"
                )
            if len(sizes) == 1:
                return float(sizes[0])
        if len(self):
            header = mrc_info(self._resolve(self.stack_names[int(self._codes[0])]))
            if header.pixel_size > 0:
                return header.pixel_size
        raise CryoForumError(f"{self.source}: no pixel size in the metadata or the stack header")

    def pixel_sizes(self) -> np.ndarray:
        """Pixel size per particle [N] in Angstrom."""
        if star.IMAGE_PIXEL_SIZE in self.table and self.table[star.IMAGE_PIXEL_SIZE].notna().all():
            return self.table[star.IMAGE_PIXEL_SIZE].to_numpy(dtype=np.float64)
        return np.full(len(self), self.pixel_size)

    def numbers(self, columns) -> np.ndarray:
        """The values of ``columns`` as float64 [N, len(columns)]; CryoForumError naming a column that holds text."""
        columns = list(columns)
        try:
            return self.table[columns].to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            for column in columns:
                values = pd.to_numeric(self.table[column], errors="coerce")
                bad = values.isna() & self.table[column].notna()
                if bad.any():
                    example = self.table[column][bad].iloc[0]
                    raise CryoForumError(f"{self.source}: {column} holds a non-number ({example!r})") from None
            raise

    def quaternions(self) -> np.ndarray:
        """Canonical quaternions [N, 4] ([x, y, z, w]) of the RELION matrices A(rot, tilt, psi)."""
        if not self.has_poses:
            raise CryoForumError(f"{self.source}: no poses (rlnAngleRot, rlnAngleTilt, rlnAnglePsi)")
        angles = self.numbers(star.ANGLES)
        bad = ~np.isfinite(angles).all(axis=1)
        if bad.any():
            raise CryoForumError(f"{self.source}: angles are not finite numbers for {int(bad.sum())} particles")
        return geometry.euler_to_quaternion(angles)

    def shifts_px(self) -> np.ndarray:
        """Origin shifts [N, 2] (x, y) in pixels; zeros when the file has none."""
        if star.ORIGIN_X_ANGST in self.table:
            return self.shifts_angstrom() / self.pixel_sizes()[:, None]
        return self._columns_or_zeros(star.ORIGIN_X, star.ORIGIN_Y)

    def shifts_angstrom(self) -> np.ndarray:
        """Origin shifts [N, 2] (x, y) in Angstrom; zeros when the file has none."""
        if star.ORIGIN_X_ANGST in self.table:
            return self._columns_or_zeros(star.ORIGIN_X_ANGST, star.ORIGIN_Y_ANGST)
        if star.ORIGIN_X in self.table:
            return self.shifts_px() * self.pixel_sizes()[:, None]
        return np.zeros((len(self), 2))

    def _columns_or_zeros(self, x: str, y: str) -> np.ndarray:
        columns = [self.numbers([c])[:, 0] if c in self.table else np.zeros(len(self)) for c in (x, y)]
        return np.stack(columns, axis=-1).reshape(len(self), 2)

    def ctf_parameters(self) -> dict[str, np.ndarray]:
        """Per-particle [N] arrays keyed like the arguments of :func:`cryo_forum.physics.ctf.compute_ctf`."""
        required = [star.DEFOCUS_U, star.VOLTAGE, star.CS, star.AMPLITUDE_CONTRAST]
        missing = [column for column in required if column not in self.table]
        if missing:
            raise CryoForumError(f"{self.source}: no CTF parameters ({', '.join(missing)} missing)")

        def column(name: str, default: str | float) -> np.ndarray:
            if name in self.table:
                return self.numbers([name])[:, 0]
            return column(default, 0.0) if isinstance(default, str) else np.full(len(self), float(default))

        return {
            "defocus_u": column(star.DEFOCUS_U, 0.0),
            "defocus_v": column(star.DEFOCUS_V, star.DEFOCUS_U),
            "defocus_angle": column(star.DEFOCUS_ANGLE, 0.0),
            "voltage": column(star.VOLTAGE, 0.0),
            "spherical_aberration": column(star.CS, 0.0),
            "amplitude_contrast": column(star.AMPLITUDE_CONTRAST, 0.0),
            "bfactor": column(star.CTF_BFACTOR, 0.0),
            "phase_shift": column(star.PHASE_SHIFT, 0.0),
        }

    # ------------------------------------------------------------------ images

    def _resolve(self, name: str) -> Path:
        """The file of stack ``name``: absolute, or beside the source, in the working folder, in datadir.

        The working folder is where RELION resolves its relative paths (the project folder); a stack found there
        rather than beside the source is reported once, so a same-named file elsewhere is never read silently.
        """
        if name in self._cache.paths:
            return self._cache.paths[name]
        if Path(name).is_absolute():
            candidates = [Path(name)]
        else:
            candidates = [self.source.parent / name, Path.cwd() / name]
            if self.datadir is not None:
                candidates.append(self.datadir / name)
        for number, candidate in enumerate(candidates):
            if candidate.is_file():
                if number == 1:
                    log.info(f"{self.source}: stack {name} is read from the working folder ({candidate})")
                self._cache.paths[name] = candidate
                return candidate
        looked = ", ".join(str(c) for c in candidates)
        raise CryoForumError(f"{self.source}: image stack {name} not found (looked in: {looked}); try --datadir")

    def resolve_stack(self, name: str) -> Path:
        """The file of one of ``stack_names``; CryoForumError listing the places searched if absent."""
        return self._resolve(name)

    def highest_image_per_stack(self) -> dict[str, int]:
        """The highest 1-based image number the metadata refers to in each of ``stack_names``."""
        tops = np.full(len(self.stack_names), -1, dtype=np.int64)
        np.maximum.at(tops, self._codes, self._index)
        return {name: int(top) + 1 for name, top in zip(self.stack_names, tops, strict=True)}

    def _stack(self, code: int) -> StackReader:
        return self._cache.open(self._resolve(self.stack_names[code]))

    def _as_indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.dtype == bool:
            if indices.shape != (len(self),):
                raise IndexError(f"boolean mask of shape {indices.shape} for {len(self)} particles")
            return np.flatnonzero(indices)
        indices = indices.astype(np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"particle indices must lie in [0, {len(self)})")
        return indices

    def images(self, indices) -> np.ndarray:
        """Images [n, D, D] float32 of the particles ``indices`` (in that order).

        Each stack's rows are read once, sorted, in runs of consecutive images, with positioned reads rather
        than through a memory map, so resident memory stays at the batch however much of the stacks is read.
        """
        indices = self._as_indices(indices)
        size = self.box_size
        out = np.empty((len(indices), size, size), dtype=np.float32)
        codes = self._codes[indices]
        by_stack = np.argsort(codes, kind="stable")
        groups = np.split(by_stack, np.flatnonzero(np.diff(codes[by_stack])) + 1) if len(indices) else []
        for where in groups:  # positions in ``indices`` of the particles of one stack, ascending
            code = int(codes[where[0]])
            path = self._resolve(self.stack_names[code])
            stack = self._stack(code)
            if stack.shape[-1] != size:
                raise CryoForumError(f"{path}: images are {stack.shape[-1]} px but the particle box is {size} px")
            rows = self._index[indices[where]]
            if rows.max() >= len(stack):
                bad = where[np.argmax(rows >= len(stack))]
                raise CryoForumError(
                    f"{path}: image {self._index[indices[bad]] + 1} requested (particle {indices[bad]}) "
                    f"but the stack holds {len(stack)} images"
                )
            unique_rows, inverse = np.unique(rows, return_inverse=True)
            block = stack.read(unique_rows)
            finite = np.isfinite(block).all(axis=(1, 2))
            if not finite.all():
                first = int(np.flatnonzero(~finite[inverse])[0])
                raise CryoForumError(
                    f"{path}: image {rows[first] + 1} (particle {indices[where[first]]}) contains NaN or inf values"
                )
            out[where] = block[inverse]
        return out

    def iter_batches(self, batch_size: int, indices=None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices [b], images [b, D, D]) over ``indices`` (all particles by default), in order."""
        indices = np.arange(len(self)) if indices is None else self._as_indices(indices)
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            yield chunk, self.images(chunk)

    def validate(self) -> None:
        """Check that every stack exists and is readable, indices lie in range and all boxes are equal."""
        sizes: dict[Path, int] = {}
        for code, (name, top) in enumerate(self.highest_image_per_stack().items()):
            if top < 1:
                continue
            path = self._resolve(name)
            stack = self._stack(code)
            if top > len(stack):
                raise CryoForumError(f"{path}: image {top} requested but the stack holds {len(stack)} images")
            sizes[path] = int(stack.shape[-1])
        if len(set(sizes.values())) > 1:
            listing = ", ".join(f"{path}: {size} px" for path, size in sizes.items())
            raise CryoForumError(f"{self.source}: stacks have different box sizes ({listing})")
        if sizes and star.IMAGE_SIZE in self.table:
            size = next(iter(sizes.values()))
            declared = self.box_size
            if size != declared:
                raise CryoForumError(f"{self.source}: {star.IMAGE_SIZE} is {declared} but the stacks hold {size} px")

    # ------------------------------------------------------------------ subsets and output

    def subset(self, indices) -> ParticleSet:
        """The particles ``indices`` (integer positions or a boolean mask) as a new set sharing the source."""
        indices = self._as_indices(indices)
        blocks = dict(self._blocks)
        blocks[self._particles_key] = self._raw.iloc[indices].reset_index(drop=True)
        return ParticleSet(self.source, self.kind, blocks, self._particles_key, self.datadir, self.version, self._cache)

    def write_star(
        self,
        path: str | os.PathLike,
        columns: pd.DataFrame | dict | None = None,
        keep=None,
    ) -> None:
        """Write the source's blocks back with ``columns`` added or replaced, for the ``keep`` particles.

        ``columns`` holds one value per particle of this set (len(self)) or per kept particle (len(keep)).
        The output keeps the input's RELION layout (a .cs or .mrcs source is written as RELION 3.1), every
        block and column; it is written atomically and never over the source. Stack names follow the policy of
        :meth:`_portable_stack_names`: the written file finds its stacks from any working folder.
        """
        path = Path(path)
        kept = np.arange(len(self)) if keep is None else self._as_indices(keep)
        particles = self._raw.iloc[kept].reset_index(drop=True)
        if columns is not None:
            frame = pd.DataFrame(columns).reset_index(drop=True)
            if len(frame) == len(self):
                frame = frame.iloc[kept].reset_index(drop=True)
            elif len(frame) != len(kept):
                raise ValueError(f"columns have {len(frame)} rows for {len(self)} particles ({len(kept)} kept)")
            for column in frame.columns:
                particles[column] = frame[column].to_numpy()
        renamed = self._portable_stack_names(path.parent)
        if renamed:
            stacks = np.array([renamed.get(name, name) for name in self.stack_names], dtype=object)
            parts = _partition_image_names(particles[star.IMAGE_NAME])
            prefix = np.where(parts[1] == "@", parts[0] + "@", "").astype(object)
            particles[star.IMAGE_NAME] = prefix + stacks[self._codes[kept]]
        blocks = dict(self._blocks)
        blocks[self._particles_key] = particles
        star.write_star(path, blocks, inputs=[self.source], version=self.version)

    def _portable_stack_names(self, folder: Path) -> dict[str, str]:
        """New names for the stacks of a STAR file written into ``folder``, so that it reads from anywhere.

        The policy: a stack keeps its name when that name, taken relative to ``folder``, is the same file (or
        the name is absolute); any other stack is named by its absolute path. Stacks that cannot be found keep
        their names.
        """
        renamed = {}
        for name in self.stack_names:
            if Path(name).is_absolute():
                continue
            try:
                stack = self._resolve(name).resolve()
            except CryoForumError:
                continue
            if (folder / name).resolve() != stack:
                renamed[name] = str(stack)
        return renamed


def _particle_block(path: Path, blocks: dict[str, star.Block]) -> str:
    """Name of the particle table: ``particles`` or else the first loop with an rlnImageName column."""
    candidates = [star.PARTICLES_BLOCK] + [name for name in blocks if name != star.PARTICLES_BLOCK]
    for name in candidates:
        block = blocks.get(name)
        if isinstance(block, pd.DataFrame) and star.IMAGE_NAME in block.columns:
            return name
    names = ", ".join(f"data_{name}" for name in blocks)
    raise CryoForumError(f"{path}: no particle table with an {star.IMAGE_NAME} column (blocks: {names})")
