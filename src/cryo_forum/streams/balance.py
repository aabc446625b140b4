"""Weights that balance over-represented views: particles of a preferred orientation count less in training.

A consensus set with strongly preferred views would teach the network mostly those views. Each particle's
weight is ``(typical count / count of its viewing-direction cell) ** strength`` over ``CELLS`` equal-area cells,
clipped to ``[1 / CLIP, CLIP]`` and normalised to a mean of 1, so rare views count more without a handful of
particles dominating.
"""

from __future__ import annotations

import numpy as np

from cryo_forum import geometry

CELLS = 200
CLIP = 5.0


def view_balance_weights(quaternions: np.ndarray, strength: float = 0.5, symmetry: str = "C1") -> np.ndarray:
    """Weights [N] of poses [N, 4] (see the module notes); ``strength`` 0 gives ones."""
    quaternions = np.asarray(quaternions, dtype=np.float64).reshape(-1, 4)
    if strength == 0.0 or len(quaternions) == 0:
        return np.ones(len(quaternions))
    if geometry.normalise_symmetry_name(symmetry) != "C1":
        quaternions = geometry.reduce_to_asymmetric_unit(quaternions, symmetry)
    cells = geometry.viewing_cells(quaternions, CELLS)
    counts = np.bincount(cells, minlength=CELLS)
    typical = np.median(counts[counts > 0])
    weights = np.clip((typical / counts[cells]) ** strength, 1.0 / CLIP, CLIP)
    return weights / weights.mean()
