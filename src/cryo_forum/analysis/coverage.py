"""How much of the sphere of viewing directions a set of poses covers, and a warning when it collapses.

A model that maps every image to one or a few views still gives half maps that agree with each other, so a
good-looking half-map FSC alone does not prove the poses; predict and reconstruct warn instead. Coverage is
the effective number of occupied cells (exp of the entropy of the cell counts) among ``CELLS`` equal-area
cells of a Fibonacci sphere, as a fraction of what the particles could fill (``min(CELLS, n)``, divided by
the order of the point group, whose views repeat).
"""

from __future__ import annotations

import logging

import numpy as np

from cryo_forum import geometry

CELLS = 200
COLLAPSE_FRACTION = 0.1
MIN_PARTICLES = 50  # fewer particles cannot show a collapse apart from chance

log = logging.getLogger(__name__)


def viewing_coverage(quaternions: np.ndarray, symmetry: str = "C1") -> float:
    """Fraction (0-1) of the reachable viewing-direction cells that poses [N, 4] effectively occupy."""
    quaternions = np.asarray(quaternions, dtype=np.float64).reshape(-1, 4)
    if not len(quaternions):
        return 0.0
    cells = geometry.viewing_cells(quaternions, CELLS)
    counts = np.bincount(cells, minlength=CELLS)
    share = counts[counts > 0] / len(cells)
    effective = float(np.exp(-np.sum(share * np.log(share))))
    reachable = min(CELLS / len(geometry.symmetry_quaternions(symmetry)), len(quaternions))
    return min(1.0, effective / reachable)


def warn_if_collapsed(quaternions: np.ndarray, what: str, symmetry: str = "C1") -> float:
    """Log a warning when poses [N, 4] cover under COLLAPSE_FRACTION of the sphere; returns the coverage."""
    coverage = viewing_coverage(quaternions, symmetry)
    if len(quaternions) >= MIN_PARTICLES and coverage < COLLAPSE_FRACTION:
        log.warning(
            f"the viewing directions of {what} cover only {100 * coverage:.0f} % of the sphere: either the "
            "particles have a strongly preferred orientation or the poses collapsed onto a few views; a half-map "
            "FSC of such poses can look good while the map is wrong (check the viewing-direction plot of "
            "cryo-forum evaluate)"
        )
    return coverage
