"""RELION STAR files as ordered blocks of pandas tables, read and written in ``starfile``'s dialect.

A STAR file is a sequence of named data blocks; loop blocks become DataFrames and key-value blocks dicts.
Column names lose their leading ``_`` (``rlnImageName``). Every block and column is kept on a round trip,
so RELION 3.0 (one block, origins in pixels), 3.1/4.0 (``data_optics`` + ``data_particles``, origins in
Angstrom, several optics groups) and RELION 5 files (extra optics and particle columns) survive untouched.
Loop rows are streamed between the file and pandas in both directions, so memory beyond the tables themselves
does not grow with the number of particles; files read and written here read identically with ``starfile``.

The column names cryo-forum reads or writes are defined here and nowhere else.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from cryo_forum import __version__
from cryo_forum.errors import CryoForumError
from cryo_forum.io.atomic import atomic_output, refuse_overwriting_inputs

# RELION columns
IMAGE_NAME = "rlnImageName"
MICROGRAPH_NAME = "rlnMicrographName"
ANGLE_ROT = "rlnAngleRot"
ANGLE_TILT = "rlnAngleTilt"
ANGLE_PSI = "rlnAnglePsi"
ORIGIN_X_ANGST = "rlnOriginXAngst"
ORIGIN_Y_ANGST = "rlnOriginYAngst"
ORIGIN_X = "rlnOriginX"  # RELION 3.0, pixels
ORIGIN_Y = "rlnOriginY"  # RELION 3.0, pixels
DEFOCUS_U = "rlnDefocusU"
DEFOCUS_V = "rlnDefocusV"
DEFOCUS_ANGLE = "rlnDefocusAngle"
VOLTAGE = "rlnVoltage"
CS = "rlnSphericalAberration"
AMPLITUDE_CONTRAST = "rlnAmplitudeContrast"
CTF_BFACTOR = "rlnCtfBfactor"
PHASE_SHIFT = "rlnPhaseShift"
OPTICS_GROUP = "rlnOpticsGroup"
OPTICS_GROUP_NAME = "rlnOpticsGroupName"
IMAGE_PIXEL_SIZE = "rlnImagePixelSize"
IMAGE_SIZE = "rlnImageSize"
IMAGE_DIMENSIONALITY = "rlnImageDimensionality"
PIXEL_SIZE = "rlnPixelSize"  # RELION 3.0 files written by some tools
DETECTOR_PIXEL_SIZE = "rlnDetectorPixelSize"  # RELION 3.0, micrometre
MAGNIFICATION = "rlnMagnification"  # RELION 3.0
RANDOM_SUBSET = "rlnRandomSubset"
CLASS_NUMBER = "rlnClassNumber"

# cryo-forum's own columns
OUTLIER = "cfIsOutlier"  # 0/1
OUTLIER_KIND = "cfOutlierKind"
EXPECTED_ERROR = "cfExpectedErrorDeg"  # the expected angular error under the belief, in degrees
FIT_JUNK_SCORE = "cfFitJunkScore"  # refinement: directional z-score of how badly the map explains the image
ERROR_BOUND = "cfErrorBound90Deg"  # the network's pose error is below it for 90 % of the particles (calibrated)
REFINED_BOUND = "cfRefinedBound90Deg"  # the same for the refined pose
REFINED_ERROR = "cfRefinedErrorDeg"  # the expected error of a refined pose, from the sharpness of its fit
JUNK_SCORE = "cfJunkScore"  # the directional z-score of the expected error (larger = more likely junk)
DISPERSION_TRACE = "cfDispersionTrace"
EIGEN_GAP = "cfEigenGap"
MAX_DISPERSION = "cfMaxDispersion"
EIGENVALUES = ("cfEigenvalue1", "cfEigenvalue2", "cfEigenvalue3", "cfEigenvalue4")  # ascending
MATCH_SCORE = "cfMatchScore"  # projection matching: normalised cross-correlation, larger = better
SHIFT_SCORE = "cfShiftScore"  # the whitened correlation at the searched origin, larger = better fit

ANGLES = (ANGLE_ROT, ANGLE_TILT, ANGLE_PSI)

PARTICLES_BLOCK = "particles"
OPTICS_BLOCK = "optics"

# Columns whose values look numeric but are names: parsed as strings so that "0001" stays "0001".
STRING_COLUMNS = [IMAGE_NAME, MICROGRAPH_NAME, OPTICS_GROUP_NAME, "rlnCtfImage", "rlnReferenceImage"]

if TYPE_CHECKING:  # pandas is imported where tables are made, so that importing the column names stays fast
    import pandas as pd

    Block = pd.DataFrame | dict
_VERSION_COMMENT = re.compile(r"^#\s*version\s+(\d+)")


def read_star(path: str | os.PathLike) -> dict[str, Block]:
    """All data blocks of a STAR file in file order: loops as DataFrames, key-value blocks as dicts.

    A single unnamed block (``data_``, typical of RELION 3.0) has the key ``""``.
    """
    path = Path(path)
    if not path.is_file():
        raise CryoForumError(f"{path}: STAR file not found")
    try:
        with open(path, encoding="utf-8") as handle:
            blocks = _parse(_Lines(handle))
    except Exception as error:
        raise CryoForumError(f"{path}: cannot parse as a STAR file ({type(error).__name__}: {error})") from None
    if not blocks:
        raise CryoForumError(f"{path}: no data blocks found; is this a STAR file?")
    return blocks


# Reading follows starfile's parser rule for rule (block structure, quoting, number parsing), but streams
# each loop's rows from the file into pandas instead of holding the whole text several times over.


class _Lines:
    """The stripped lines of a text file, one at a time: ``current`` is None past the end."""

    def __init__(self, handle: TextIO) -> None:
        self._handle = handle
        self.current: str | None = None
        self.advance()

    def advance(self) -> None:
        line = self._handle.readline()
        self.current = line.strip() if line else None

    def in_loop(self) -> bool:
        """Whether the current line still belongs to a loop's rows (not the end, not the next ``data_``)."""
        return self.current is not None and not self.current.startswith("data_")


class _LoopRows(io.TextIOBase):
    """A loop's rows up to the next ``data_`` line as a file for ``pandas.read_csv``; ' becomes " as in starfile."""

    def __init__(self, lines: _Lines) -> None:
        super().__init__()
        self._lines = lines

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> str:
        parts, length = [], 0
        while self._lines.in_loop() and (size is None or size < 0 or length < size):
            parts.append(self._lines.current.replace("'", '"') + "\n")
            length += len(parts[-1])
            self._lines.advance()
        return "".join(parts)


def _parse(lines: _Lines) -> dict[str, Block]:
    blocks: dict[str, Block] = {}
    while lines.current is not None:
        if lines.current.startswith("data_"):
            name = lines.current[5:]
            blocks[name] = _parse_block(lines)
        else:
            lines.advance()
    return blocks


def _parse_block(lines: _Lines) -> Block:
    lines.advance()
    while lines.current is not None:
        if lines.current.startswith("loop_"):
            return _parse_loop(lines)
        if lines.current.startswith("_"):
            return _parse_pairs(lines)
        lines.advance()
    raise ValueError("a data block without content at the end of the file")


def _parse_pairs(lines: _Lines) -> dict:
    block = {}
    while lines.current is not None and not lines.current.startswith("data"):
        if lines.current.startswith("_"):
            key, value = shlex.split(lines.current)
            block[key[1:]] = value if key[1:] in STRING_COLUMNS else _number_or_text(value)
        lines.advance()
    return block


def _number_or_text(value: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            continue
    return value


def _parse_loop(lines: _Lines) -> pd.DataFrame:
    import pandas as pd

    lines.advance()
    names = []
    while lines.current is not None and lines.current.startswith("_"):
        names.append(lines.current.split()[0][1:])
        lines.advance()
    while lines.current == "":
        lines.advance()
    if not lines.in_loop():
        return pd.DataFrame(np.zeros((0, len(names))), columns=names)
    frame = pd.read_csv(
        _LoopRows(lines),
        sep=r"\s+",
        header=None,
        comment="#",
        dtype={names.index(name): str for name in STRING_COLUMNS if name in names},
        keep_default_na=False,
        na_values=["nan", "NaN", "<NA>"],
        engine="c",
    )
    frame.columns = names
    for position, name in enumerate(names):
        if name in STRING_COLUMNS:
            continue
        try:
            numbers = pd.to_numeric(frame.iloc[:, position])
        except ValueError:
            continue
        if not numbers.isna().all():
            frame.isetitem(position, numbers)
    return frame


def star_version(path: str | os.PathLike) -> int | None:
    """The ``# version NNNNN`` tag RELION writes before its blocks (30001 for 3.1/4.0, 50001 for 5), if any."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for _, line in zip(range(200), handle, strict=False):
            match = _VERSION_COMMENT.match(line.strip())
            if match:
                return int(match.group(1))
            if line.startswith("loop_"):
                return None
    return None


def write_star(
    path: str | os.PathLike,
    blocks: dict[str, Block],
    inputs: Iterable[str | os.PathLike] = (),
    version: int | None = None,
) -> None:
    """Write ``blocks`` (name -> DataFrame or dict) in the given order, atomically and never over ``inputs``.

    Boolean columns are written as 0/1, floats as ``%.6f``, missing values as ``nan`` (all readable by RELION)
    and strings that are empty or hold a space in double quotes. With ``version`` each block is preceded by
    RELION's ``# version NNNNN`` tag. Loops are streamed to the file, so memory does not grow with the rows.
    """
    refuse_overwriting_inputs(path, inputs)
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(f"# Created by cryo-forum {__version__}\n\n\n")
        for name, block in blocks.items():
            if version is not None:
                handle.write(f"# version {version}\n\n")
            if isinstance(block, dict):
                _write_pairs(handle, name, block)
            else:
                _write_loop(handle, name, block)


def _quote(value):
    """A string that is empty or holds a space in double quotes (as starfile writes it); anything else as is."""
    if isinstance(value, str) and (" " in value or not value):
        return f'"{value}"'
    return value


def _write_pairs(handle: TextIO, name: str, block: dict) -> None:
    handle.write(f"data_{name}\n\n")
    for key, value in block.items():
        value = int(value) if isinstance(value, bool | np.bool_) else value
        handle.write(f"_{key}\t\t\t{_quote(value)}\n")
    handle.write("\n\n")


def _write_loop(handle: TextIO, name: str, frame: pd.DataFrame) -> None:
    """One loop block: header, then the rows through ``DataFrame.to_csv`` in chunks (no whole-file string)."""
    import pandas as pd

    handle.write(f"data_{name}\n\nloop_\n")
    handle.writelines(f"_{column} #{number}\n" for number, column in enumerate(frame.columns, 1))
    frame = frame.copy(deep=False)
    for position, dtype in enumerate(frame.dtypes):
        if pd.api.types.is_bool_dtype(dtype):
            frame.isetitem(position, frame.iloc[:, position].astype(np.int64))
        elif not pd.api.types.is_numeric_dtype(dtype):
            frame.isetitem(position, frame.iloc[:, position].map(_quote))
    frame.to_csv(
        handle,
        sep="\t",
        header=False,
        index=False,
        float_format="%.6f",
        na_rep="nan",
        quoting=csv.QUOTE_NONE,
        lineterminator="\n",
    )
    handle.write("\n\n")
