"""The map a pose search scores particles against (`match`, `refine`, `predict`'s centring and refinement).

The map is resampled to the particles' pixel size and box but never re-centred (its origin defines the poses),
and multiplied by a soft mask around its density: the user's, or by default the automatic one of
:func:`~cryo_forum.physics.masks.auto_mask`. To a search, density outside the particle is noise that enters
every score: a reconstruction's solvent is not zero, and over the volume outside the particle it adds up. On
the realistic benchmark's own reference, masking it took the refined median error from 2.3 to 1.3 degrees.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cryo_forum.errors import CryoForumError
from cryo_forum.io.maps import load_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.masks import auto_mask

log = logging.getLogger(__name__)

NO_MASK = "none"  # the mask setting that leaves a map unmasked


def search_map(path: Path, particles: ParticleSet, mask: Path | str | None = None) -> np.ndarray:
    """The map at ``path`` [D, D, D] sampled like ``particles`` and masked by ``mask``: a mask file (values in
    [0, 1], resampled like the map), :data:`NO_MASK`, or None for the automatic mask. A map in which no density
    stands out of the noise is used unmasked, with a warning."""
    volume, _ = load_volume(path, pixel_size=particles.pixel_size, size=particles.box_size, center=False)
    if mask == NO_MASK:
        return volume
    if mask is None:
        weights = auto_mask(volume, particles.pixel_size)
        if not weights.any():
            log.warning(f"{path}: no density stands out of the noise to mask; the map is used unmasked")
            return volume
        return volume * weights
    weights, _ = load_volume(mask, pixel_size=particles.pixel_size, size=particles.box_size, center=False)
    if not (np.isfinite(weights).all() and weights.min() >= -0.1 and weights.max() <= 1.1):
        found = f"{weights.min():.3g} to {weights.max():.3g}"
        raise CryoForumError(f"{mask}: a mask holds values from 0 to 1, found {found}")
    if not weights.any():
        raise CryoForumError(f"{mask}: the mask is empty")
    return volume * np.clip(weights, 0.0, 1.0)
