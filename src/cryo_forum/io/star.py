"""RELION STAR files as ordered blocks of pandas tables, read and written through ``starfile``.

A STAR file is a sequence of named data blocks; loop blocks become DataFrames and key-value blocks dicts.
Column names lose their leading ``_`` (``rlnImageName``). Every block and column is kept on a round trip,
so RELION 3.0 (one block, origins in pixels), 3.1/4.0 (``data_optics`` + ``data_particles``, origins in
Angstrom, several optics groups) and RELION 5 files (extra optics and particle columns) survive untouched.

The column names cryo-forum reads or writes are defined here and nowhere else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

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
DISPERSION_TRACE = "cfDispersionTrace"
EIGEN_GAP = "cfEigenGap"
MAX_DISPERSION = "cfMaxDispersion"
EIGENVALUES = ("cfEigenvalue1", "cfEigenvalue2", "cfEigenvalue3", "cfEigenvalue4")  # ascending
MATCH_SCORE = "cfMatchScore"  # projection matching: normalised cross-correlation, larger = better

ANGLES = (ANGLE_ROT, ANGLE_TILT, ANGLE_PSI)

PARTICLES_BLOCK = "particles"
OPTICS_BLOCK = "optics"

# Columns whose values look numeric but are names: parsed as strings so that "0001" stays "0001".
STRING_COLUMNS = [IMAGE_NAME, MICROGRAPH_NAME, OPTICS_GROUP_NAME, "rlnCtfImage", "rlnReferenceImage"]

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
        blocks = starfile.read(path, always_dict=True, parse_as_string=STRING_COLUMNS)
    except Exception as error:
        raise CryoForumError(f"{path}: cannot parse as a STAR file ({type(error).__name__}: {error})") from None
    if not blocks:
        raise CryoForumError(f"{path}: no data blocks found; is this a STAR file?")
    return dict(blocks)


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

    Boolean columns are written as 0/1 and missing values as ``nan`` (both readable by RELION). With
    ``version`` each block is preceded by RELION's ``# version NNNNN`` tag.
    """
    refuse_overwriting_inputs(path, inputs)
    prepared = {name: _prepare(block) for name, block in blocks.items()}
    text = starfile.to_string(prepared, float_format="%.6f", na_rep="nan")
    if version is not None:
        text = re.sub(r"^data_", f"# version {version}\n\ndata_", text, flags=re.MULTILINE)
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _prepare(block: Block) -> Block:
    if isinstance(block, dict):
        return {key: int(value) if isinstance(value, bool | np.bool_) else value for key, value in block.items()}
    bools = [column for column in block.columns if pd.api.types.is_bool_dtype(block[column])]
    return block.astype(dict.fromkeys(bools, np.int64)) if bools else block
