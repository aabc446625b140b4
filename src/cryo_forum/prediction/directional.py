"""Junk scores that survive preferred orientation: a particle's uncertainty against its own view's.

In a set with strongly preferred views the network is less sure of the rare views, so a plain uncertainty
ranks good particles of rare views as junk. The junk score is a directional z-score: the log of the particle's
expected error, minus the typical log expected error of calibration particles seen from about the same
direction (``CELLS`` equal-area cells of the viewing direction, each cell's mean shrunk towards the overall one
by ``PSEUDO_COUNT`` particles so that sparse cells borrow from the rest), divided by the overall robust spread.
The model is fitted on the run's validation predictions and stored in its calibration.
"""

from __future__ import annotations

import numpy as np

from cryo_forum import geometry

JUNK_SCORE = "junk_score"
CELLS = 24
PSEUDO_COUNT = 10.0


def _cells(quaternions: np.ndarray, symmetry: str) -> np.ndarray:
    quaternions = np.asarray(quaternions, dtype=np.float64)
    if geometry.normalise_symmetry_name(symmetry) != "C1":
        quaternions = geometry.reduce_to_asymmetric_unit(quaternions, symmetry)
    return geometry.viewing_cells(quaternions, CELLS)


def directional_model(expected_error_deg: np.ndarray, quaternions: np.ndarray, symmetry: str = "C1") -> dict:
    """The per-view typical log expected error of calibration particles (JSON-ready)."""
    values = np.log(np.maximum(np.asarray(expected_error_deg, dtype=np.float64), 1e-6))
    cells = _cells(quaternions, symmetry)
    overall = float(np.median(values))
    counts = np.bincount(cells, minlength=CELLS)
    sums = np.bincount(cells, weights=values, minlength=CELLS)
    means = (sums + PSEUDO_COUNT * overall) / (counts + PSEUDO_COUNT)
    spread = 1.4826 * float(np.median(np.abs(values - means[cells])))
    return {
        "cells": CELLS,
        "pseudo_count": PSEUDO_COUNT,
        "symmetry": symmetry,
        "cell_means": means.tolist(),
        "spread": max(spread, 1e-6),
    }


def junk_scores(expected_error_deg: np.ndarray, quaternions: np.ndarray, model: dict) -> np.ndarray:
    """Directional z-scores [N] (larger = more likely junk) of particles under a :func:`directional_model`."""
    values = np.log(np.maximum(np.asarray(expected_error_deg, dtype=np.float64), 1e-6))
    cells = _cells(quaternions, model["symmetry"])
    return (values - np.asarray(model["cell_means"])[cells]) / model["spread"]
