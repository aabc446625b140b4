"""Junk scores that survive preferred orientation: a particle's uncertainty against its own view's.

In a set with strongly preferred views the network is less sure of the rare views, so a plain uncertainty
ranks good particles of rare views as junk. The junk score is a directional z-score: the log of the particle's
expected error, minus the typical log expected error of calibration particles seen from about the same
direction (``CELLS`` equal-area cells of the viewing direction, each cell's median shrunk towards the overall one
by ``PSEUDO_COUNT`` particles so that sparse cells borrow from the rest; medians, because the calibration
particles hold unflagged junk too), divided by the overall robust spread. The model is fitted on the run's
validation predictions and stored in its calibration (``cell_means`` holds the shrunk medians).
:func:`view_model` and :func:`view_z_scores` do the same for any score.
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


def view_model(values: np.ndarray, quaternions: np.ndarray, symmetry: str = "C1") -> dict:
    """The per-view typical value of a score [N] of particles at poses [N, 4], and its robust spread (JSON-ready)."""
    values = np.asarray(values, dtype=np.float64)
    cells = _cells(quaternions, symmetry)
    overall = float(np.median(values))
    counts = np.bincount(cells, minlength=CELLS)
    medians = np.array([np.median(values[cells == cell]) if counts[cell] else overall for cell in range(CELLS)])
    means = (counts * medians + PSEUDO_COUNT * overall) / (counts + PSEUDO_COUNT)
    spread = 1.4826 * float(np.median(np.abs(values - means[cells])))
    return {
        "cells": CELLS,
        "pseudo_count": PSEUDO_COUNT,
        "symmetry": symmetry,
        "cell_means": means.tolist(),
        "spread": max(spread, 1e-6),
    }


def view_z_scores(values: np.ndarray, quaternions: np.ndarray, model: dict) -> np.ndarray:
    """Directional z-scores [N] of a score [N] under a :func:`view_model`: its value against its own view's."""
    cells = _cells(quaternions, model["symmetry"])
    return (np.asarray(values, dtype=np.float64) - np.asarray(model["cell_means"])[cells]) / model["spread"]


def directional_model(expected_error_deg: np.ndarray, quaternions: np.ndarray, symmetry: str = "C1") -> dict:
    """The per-view typical log expected error of calibration particles (JSON-ready)."""
    return view_model(_log(expected_error_deg), quaternions, symmetry)


def junk_scores(expected_error_deg: np.ndarray, quaternions: np.ndarray, model: dict) -> np.ndarray:
    """Directional z-scores [N] (larger = more likely junk) of particles under a :func:`directional_model`."""
    return view_z_scores(_log(expected_error_deg), quaternions, model)


def _log(expected_error_deg: np.ndarray) -> np.ndarray:
    return np.log(np.maximum(np.asarray(expected_error_deg, dtype=np.float64), 1e-6))
