"""What a simulation draws: the particle and outlier kinds and :class:`SimulationSettings`.

The settings are shared by the renderer (:mod:`cryo_forum.physics.renderer`) and the data sets and streams
built on it (:mod:`cryo_forum.streams.simulation`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryo_forum import geometry
from cryo_forum.errors import InvalidSetting

INLIER_KIND = "none"
OUTLIER_KINDS = ("noise", "decoy", "broken", "off_centre", "ice")
KINDS = (INLIER_KIND, *OUTLIER_KINDS)
CTF_TABLE_COLUMNS = (
    "defocus_u",
    "defocus_v",
    "defocus_angle",
    "voltage",
    "spherical_aberration",
    "amplitude_contrast",
    "bfactor",
    "phase_shift",
)
"""The columns of a ``ctf_table`` row, in the order (and units) of streams.preprocess.CTF_KEYS."""


@dataclass(frozen=True)
class SimulationSettings:
    """What to simulate. Defocus and astigmatism in A, voltage in kV, Cs in mm, B-factor in A^2, shifts in px.

    ``astigmatism`` is the largest ``defocus_u - defocus_v``; ``bfactor`` is one value or a (min, max) range;
    origins are uniform in ``[-max_shift_px, max_shift_px]`` along x and y; ``snr=None`` means no noise.

    Measured properties of a data set replace the drawn ones when given (None keeps the behaviour above):

    * ``noise_spectrum``: relative noise power per integer radial shell of the box (``D // 2 + 1`` values, shell
      0 first; the box's corners beyond shell ``D // 2`` take the last value). Only the shape counts: ``snr``
      still sets the noise variance over the box.
    * ``ctf_table``: rows of CTF parameters in CTF_TABLE_COLUMNS order; each particle draws one row instead of
      the defocus, astigmatism and B-factor ranges and the fixed voltage, Cs and amplitude contrast.
    * ``origin_sigma_px``: origins normal with this standard deviation along x and y, clipped at
      ``max_shift_px`` when that is > 0.

    Sequences are kept as tuples (of floats), so settings stay hashable.
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
    noise_spectrum: tuple[float, ...] | None = None
    ctf_table: tuple[tuple[float, ...], ...] | None = None
    origin_sigma_px: float | None = None

    def __post_init__(self) -> None:
        if self.noise_spectrum is not None:
            object.__setattr__(self, "noise_spectrum", tuple(float(value) for value in self.noise_spectrum))
        if self.ctf_table is not None:
            table = tuple(tuple(float(value) for value in row) for row in self.ctf_table)
            object.__setattr__(self, "ctf_table", table)

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
        for field, ok, message in checks + self._measured_checks():
            if not ok:
                raise InvalidSetting(field, message)
        try:
            geometry.normalise_symmetry_name(self.symmetry)
        except ValueError as error:
            raise InvalidSetting("symmetry", str(error)) from None

    def _measured_checks(self) -> list[tuple[str, bool, str]]:
        """The checks of noise_spectrum, ctf_table and origin_sigma_px, as (field, ok, message)."""
        checks = []
        spectrum = self.noise_spectrum
        if spectrum is not None:
            finite = all(math.isfinite(value) and value >= 0 for value in spectrum)
            ok = len(spectrum) >= 2 and finite and max(spectrum) > 0
            checks.append(("noise_spectrum", ok, "needs D // 2 + 1 finite values >= 0, not all zero"))
        table = self.ctf_table
        if table is not None:
            checks.append(("ctf_table", self.ctf, "needs ctf=True"))
            checks.append(("ctf_table", len(table) > 0, "needs at least one row"))
            bad = next((number for number, row in enumerate(table) if not _valid_ctf_row(row)), None)
            message = "" if bad is None else f"row {bad} {table[bad]}: {_CTF_ROW_RULE}"
            checks.append(("ctf_table", bad is None, message))
        sigma = self.origin_sigma_px
        if sigma is not None:
            ok = math.isfinite(sigma) and sigma >= 0
            checks.append(("origin_sigma_px", ok, f"must be >= 0 (px) or None, got {sigma}"))
        return checks

    @property
    def bfactor_range(self) -> tuple[float, float]:
        low, high = np.broadcast_to(np.asarray(self.bfactor, dtype=np.float64), (2,))
        return float(low), float(high)

    def drawn_kinds(self) -> tuple[str, ...]:
        """The outlier kinds that can occur: ``outlier_kinds`` if ``outlier_fraction`` > 0, else none."""
        return self.outlier_kinds if self.outlier_fraction > 0 else ()


_CTF_ROW_RULE = (
    f"needs {len(CTF_TABLE_COLUMNS)} finite values ({', '.join(CTF_TABLE_COLUMNS)}) with defoci, Cs and B-factor "
    ">= 0, voltage > 0 and amplitude contrast in [0, 1)"
)


def _valid_ctf_row(row: tuple[float, ...]) -> bool:
    """Whether a ctf_table row holds CTF parameters compute_ctf accepts."""
    if len(row) != len(CTF_TABLE_COLUMNS) or not all(math.isfinite(value) for value in row):
        return False
    values = dict(zip(CTF_TABLE_COLUMNS, row, strict=True))
    return (
        min(values["defocus_u"], values["defocus_v"], values["spherical_aberration"], values["bfactor"]) >= 0
        and values["voltage"] > 0
        and 0 <= values["amplitude_contrast"] < 1
    )
