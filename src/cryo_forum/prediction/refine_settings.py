"""The settings of local refinement (:mod:`cryo_forum.prediction.refinement`): how far and how finely each
particle is searched. Light to import (no TensorFlow), so the commands can show the defaults in their help."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryo_forum.errors import InvalidSetting

SHRINK = 0.5  # each stage's step over the previous one
MIN_STEP_DEG = 0.01
GLOBAL_SHIFT_STEP_PX = 1.0
WIDE_SHIFT_STEPS = 3.5  # the wide origin grid: about seven origins across (2 px apart for a 7 px reach)


@dataclass(frozen=True)
class RefineSettings:
    """How far and how finely each particle is searched; angles in degrees, shifts in px of the particle box.

    ``radius_per_error`` scales the network's expected error to the radius searched (at least
    ``min_radius_deg``); ``step_deg`` bounds the last stage's step and ``iterations`` is the number of
    Gauss-Newton steps per stage while the stage's band is below half the Nyquist frequency (one after);
    ``shift_px`` how far origins may move from where they start. The global fallback uses the matcher's grid of
    ``coarse_deg`` and its band ``coarse_band``, which also sets each stage's. A particle that fits weakly for its
    view (its weak-fit z-score above ``retry_above``) is searched again globally over origins within
    ``wide_shift_px`` (default ``shift_px``) of its start, and keeps the better fit: a particle centred a few
    pixels off lands in a wrong basin that the first search, near its start, cannot leave.
    """

    radius_per_error: float = 2.0
    min_radius_deg: float = 3.0
    global_above_deg: float = 30.0
    step_deg: float = 2.0
    iterations: int = 2
    shift_px: float = 2.0
    wide_shift_px: float | None = None
    retry_above: float = 1.0
    coarse_deg: float = 7.5
    coarse_band: float = 2.0
    oversampling: int = 2
    batch_size: int = 128
    symmetry: str = "C1"

    def validate(self) -> None:
        """Raise :class:`~cryo_forum.errors.InvalidSetting` naming the first setting out of range."""
        positive = {
            "radius_per_error": self.radius_per_error,
            "min_radius_deg": self.min_radius_deg,
            "step_deg": self.step_deg,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise InvalidSetting(name, f"must be positive, got {value}")
        if not (isinstance(self.iterations, (int, np.integer)) and self.iterations >= 1):
            raise InvalidSetting("iterations", f"must be a positive integer, got {self.iterations}")
        if not self.step_deg >= MIN_STEP_DEG:
            raise InvalidSetting("step_deg", f"must be at least {MIN_STEP_DEG:g} degrees, got {self.step_deg}")
        if not (math.isfinite(self.global_above_deg) and self.global_above_deg >= self.min_radius_deg):
            raise InvalidSetting(
                "global_above_deg",
                f"must be at least the smallest radius searched, {self.min_radius_deg:g} degrees, "
                f"got {self.global_above_deg}",
            )
        if not (math.isfinite(self.shift_px) and self.shift_px >= 0):
            raise InvalidSetting("shift_px", f"must be >= 0 px, got {self.shift_px}")
        if not (math.isfinite(self.wide_reach) and self.wide_reach >= self.shift_px):
            message = f"must be at least shift_px, {self.shift_px:g} px, got {self.wide_reach}"
            raise InvalidSetting("wide_shift_px", message)
        if math.isnan(self.retry_above):
            raise InvalidSetting("retry_above", "must be a number (inf: no second search)")
        self.matching().validate()

    @property
    def wide_reach(self) -> float:
        """How far from its start the second, global search tries a particle's origin (px)."""
        return self.shift_px if self.wide_shift_px is None else float(self.wide_shift_px)

    def narrow_shifts(self) -> np.ndarray:
        """The origin offsets [T, 2] (px) of the first global search: 1 px apart within ``shift_px``."""
        from cryo_forum.prediction.matching import shift_grid

        return shift_grid(self.shift_px, min(GLOBAL_SHIFT_STEP_PX, self.shift_px) or GLOBAL_SHIFT_STEP_PX)

    def matching(self):
        """The matcher's :class:`~cryo_forum.prediction.matching.MatchSettings`: its global grid for the fallback,
        whose own origin grid is the second search's (within ``wide_reach``, about WIDE_SHIFT_STEPS steps across,
        at least GLOBAL_SHIFT_STEP_PX apart; the first global search tries :meth:`narrow_shifts`), its batch size
        and symmetry."""
        from cryo_forum.prediction.matching import MatchSettings

        reach = self.wide_reach
        return MatchSettings(
            coarse_deg=self.coarse_deg,
            refine_deg=min(self.step_deg, self.coarse_deg),
            max_shift_px=reach,
            shift_step_px=min(reach, max(GLOBAL_SHIFT_STEP_PX, reach / WIDE_SHIFT_STEPS)) or GLOBAL_SHIFT_STEP_PX,
            coarse_band=self.coarse_band,
            oversampling=self.oversampling,
            batch_size=self.batch_size,
            symmetry=self.symmetry,
        )

    def steps(self) -> np.ndarray:
        """The stages' steps [S] (degrees, halving): the first is ``global_above_deg``, the last at most
        ``step_deg``. A stage's step bounds its rotation steps and sets its band, so a stage closes in on a pose
        about a step away (see :mod:`cryo_forum.prediction.refinement`)."""
        steps = [self.global_above_deg]
        while steps[-1] > self.step_deg:
            steps.append(steps[-1] * SHRINK)
        return np.array(steps)

    def first_stages(self, expected_error_deg: np.ndarray) -> np.ndarray:
        """Each particle's first stage [n]: the last whose step is at least its radius; -1 for a global search
        (radius beyond ``global_above_deg``, or no expected error)."""
        steps = self.steps()
        errors = np.asarray(expected_error_deg, dtype=np.float64)
        radius = np.maximum(self.radius_per_error * errors, self.min_radius_deg)
        first = (steps[None, :] >= radius[:, None]).sum(axis=1) - 1
        return np.where(np.isfinite(errors) & (radius <= self.global_above_deg), first, -1)

    def after_global(self) -> int:
        """The stage a globally searched particle continues at: the last whose step is at least the global grid's
        covering radius."""
        from cryo_forum.prediction.matching import COVERING

        return int((self.steps() >= COVERING * self.coarse_deg).sum() - 1)
