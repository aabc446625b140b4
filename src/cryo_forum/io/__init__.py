"""Particle file formats (RELION STAR, MRC/MRCS, cryoSPARC .cs) and the lazy ParticleSet built from them.

The names below are imported on first use, so ``cryo_forum.io.atomic`` stays free of pandas and mrcfile.
"""

import importlib

_EXPORTS = {
    "ParticleSet": "cryo_forum.io.particles",
    "open_stack": "cryo_forum.io.mrc",
    "read_volume": "cryo_forum.io.mrc",
    "stack_writer": "cryo_forum.io.mrc",
    "write_stack": "cryo_forum.io.mrc",
    "write_volume": "cryo_forum.io.mrc",
    "read_cs": "cryo_forum.io.cryosparc",
    "read_star": "cryo_forum.io.star",
    "write_star": "cryo_forum.io.star",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
