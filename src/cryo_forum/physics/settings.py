"""What a simulation draws: the particle and outlier kinds and :class:`SimulationSettings`.

The settings are shared by the renderer (:mod:`cryo_forum.physics.renderer`) and the data sets and streams
built on it (:mod:`cryo_forum.streams.simulation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryo_forum import geometry
from cryo_forum.errors import InvalidSetting

INLIER_KIND = "none"
OUTLIER_KINDS = ("noise", "decoy", "broken", "off_centre", "ice")
KINDS = (INLIER_KIND, *OUTLIER_KINDS)


@dataclass(frozen=True)
class SimulationSettings:
    """What to simulate. Defocus and astigmatism in A, voltage in kV, Cs in mm, B-factor in A^2, shifts in px.

    ``astigmatism`` is the largest ``defocus_u - defocus_v``; ``bfactor`` is one value or a (min, max) range;
    origins are uniform in ``[-max_shift_px, max_shift_px]`` along x and y; ``snr=None`` means no noise.
    """

    n: int
    snr: float | None = None
    ctf: bool = True
    defocus_range: tuple[float, float] = (10000.0, 25000.0)
    astigmatism: float = 1000.0
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.1
    bfactor: float | tuple[float, float] = 0.0
    max_shift_px: float = 0.0
    outlier_fraction: float = 0.0
    outlier_kinds: tuple[str, ...] = OUTLIER_KINDS
    symmetry: str = "C1"
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`~cryo_forum.errors.InvalidSetting` naming the first field out of range."""
        checks = [
            ("n", int(self.n) == self.n and self.n > 0, f"must be a positive integer, got {self.n}"),
            ("snr", self.snr is None or self.snr > 0, f"must be positive, got {self.snr}"),
            (
                "defocus_range",
                0 <= self.defocus_range[0] <= self.defocus_range[1],
                f"needs 0 <= MIN <= MAX (A), got {tuple(self.defocus_range)}",
            ),
            ("astigmatism", self.astigmatism >= 0, f"must be >= 0, got {self.astigmatism}"),
            ("voltage", self.voltage > 0, f"must be positive (kV), got {self.voltage}"),
            ("cs", self.cs >= 0, f"must be >= 0 (mm), got {self.cs}"),
            (
                "amplitude_contrast",
                0 <= self.amplitude_contrast < 1,
                f"must be in [0, 1), got {self.amplitude_contrast}",
            ),
            (
                "bfactor",
                0 <= self.bfactor_range[0] <= self.bfactor_range[1],
                f"needs 0 <= B or 0 <= MIN <= MAX, got {self.bfactor}",
            ),
            ("max_shift_px", self.max_shift_px >= 0, f"must be >= 0, got {self.max_shift_px}"),
            (
                "outlier_fraction",
                0 <= self.outlier_fraction <= 1,
                f"must be in [0, 1], got {self.outlier_fraction}",
            ),
            (
                "outlier_kinds",
                len(self.outlier_kinds) > 0 and set(self.outlier_kinds) <= set(OUTLIER_KINDS),
                f"choose from {', '.join(OUTLIER_KINDS)}, got {', '.join(self.outlier_kinds) or 'none'}",
            ),
        ]
        for field, ok, message in checks:
            if not ok:
                raise InvalidSetting(field, message)
        try:
            geometry.normalise_symmetry_name(self.symmetry)
        except ValueError as error:
            raise InvalidSetting("symmetry", str(error)) from None

    @property
    def bfactor_range(self) -> tuple[float, float]:
        low, high = np.broadcast_to(np.asarray(self.bfactor, dtype=np.float64), (2,))
        return float(low), float(high)

    def drawn_kinds(self) -> tuple[str, ...]:
        """The outlier kinds that can occur: ``outlier_kinds`` if ``outlier_fraction`` > 0, else none."""
        return self.outlier_kinds if self.outlier_fraction > 0 else ()
