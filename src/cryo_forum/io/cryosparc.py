"""cryoSPARC particle files (``.cs``: a numpy structured array saved with ``np.save``) as RELION tables.

The particles come back with RELION column names and a RELION 3.1 optics table, so the rest of the
program handles one kind of metadata. Conversions (see DESIGN.md):

* ``blob/idx`` is 0-based, ``rlnImageName`` 1-based: ``idx 0, path p -> "000001@p"``. A leading ``>``
  (a path outside the project) is dropped; paths stay relative to the cryoSPARC project folder.
* ``alignments3D/pose`` is a rotation vector r with ``from_rotvec(r).as_matrix() == A^T``.
* ``alignments3D/shift`` is in pixels of ``alignments3D/psize_A`` (else ``blob/psize_A``);
  ``rlnOriginXAngst, rlnOriginYAngst = shift * psize``.
* Defocus values are Angstrom in both; angles and phase shifts are radians in cryoSPARC, degrees in RELION.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from cryo_forum import geometry
from cryo_forum.errors import CryoForumError
from cryo_forum.io import star

_PER_PARTICLE_CTF = {
    "ctf/df1_A": (star.DEFOCUS_U, False),
    "ctf/df2_A": (star.DEFOCUS_V, False),
    "ctf/df_angle_rad": (star.DEFOCUS_ANGLE, True),
    "ctf/phase_shift_rad": (star.PHASE_SHIFT, True),
    "ctf/bfactor": (star.CTF_BFACTOR, False),
}
_OPTICS_CTF = {"ctf/accel_kv": star.VOLTAGE, "ctf/cs_mm": star.CS, "ctf/amp_contrast": star.AMPLITUDE_CONTRAST}


def _strings(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8")
    return values.astype(str)


def read_cs(path: str | os.PathLike, datadir: str | os.PathLike | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a ``.cs`` file -> (particles, optics) DataFrames with RELION names (see the module notes).

    ``datadir``: the cryoSPARC project folder; when given, relative blob paths are joined to it.
    One optics group is made per distinct (pixel size, box, voltage, Cs, amplitude contrast).
    """
    path = Path(path)
    if not path.is_file():
        raise CryoForumError(f"{path}: cryoSPARC file not found")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as error:
        raise CryoForumError(f"{path}: not a readable cryoSPARC .cs file ({error})") from None
    fields = set(data.dtype.names or ())
    missing = sorted({"blob/path", "blob/idx"} - fields)
    if data.ndim != 1 or missing:
        raise CryoForumError(f"{path}: not a cryoSPARC particle file (missing fields: {', '.join(missing)})")

    stacks = np.char.lstrip(_strings(data["blob/path"]), ">")
    if datadir is not None:
        stacks = np.array([str(Path(datadir) / s) if not Path(s).is_absolute() else s for s in stacks])
    indices = data["blob/idx"].astype(np.int64) + 1
    particles = pd.DataFrame({star.IMAGE_NAME: [f"{i:06d}@{s}" for i, s in zip(indices, stacks, strict=True)]})
    if "location/micrograph_path" in fields:
        particles[star.MICROGRAPH_NAME] = np.char.lstrip(_strings(data["location/micrograph_path"]), ">")

    psize = np.round(data["blob/psize_A"].astype(np.float64), 6) if "blob/psize_A" in fields else None
    if "alignments3D/pose" in fields:
        matrices = geometry.rotvec_to_matrix(data["alignments3D/pose"].astype(np.float64))
        euler = geometry.matrix_to_euler(matrices)
        for column, values in zip(star.ANGLES, euler.T, strict=True):
            particles[column] = values
    if "alignments3D/shift" in fields:
        shift_psize = data["alignments3D/psize_A"].astype(np.float64) if "alignments3D/psize_A" in fields else psize
        if shift_psize is None:
            raise CryoForumError(f"{path}: shifts are given but no pixel size (blob/psize_A) to convert them")
        shifts = data["alignments3D/shift"].astype(np.float64) * shift_psize[:, None]
        particles[star.ORIGIN_X_ANGST] = shifts[:, 0]
        particles[star.ORIGIN_Y_ANGST] = shifts[:, 1]
    for field, (column, radians) in _PER_PARTICLE_CTF.items():
        if field in fields:
            values = data[field].astype(np.float64)
            particles[column] = np.degrees(values) if radians else values

    optics_values = {}
    if psize is not None:
        optics_values[star.IMAGE_PIXEL_SIZE] = psize
    if "blob/shape" in fields:
        optics_values[star.IMAGE_SIZE] = data["blob/shape"].reshape(len(data), -1)[:, -1].astype(np.int64)
    for field, column in _OPTICS_CTF.items():
        if field in fields:
            optics_values[column] = np.round(data[field].astype(np.float64), 6)
    per_particle = pd.DataFrame(optics_values, index=particles.index)
    if per_particle.columns.empty:
        groups = np.zeros(len(particles), dtype=np.int64)
        optics = pd.DataFrame(index=[0])
    else:
        optics, groups = _unique_rows(per_particle)
    optics.insert(0, star.OPTICS_GROUP, np.arange(1, len(optics) + 1))
    optics.insert(0, star.OPTICS_GROUP_NAME, [f"opticsGroup{g}" for g in optics[star.OPTICS_GROUP]])
    optics[star.IMAGE_DIMENSIONALITY] = 2
    particles[star.OPTICS_GROUP] = groups + 1
    return particles, optics.reset_index(drop=True)


def _unique_rows(table: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """Distinct rows of ``table`` in order of first appearance, and each row's group number (0-based)."""
    codes = table.groupby(list(table.columns), sort=False, dropna=False).ngroup().to_numpy()
    return table.drop_duplicates().reset_index(drop=True), codes
