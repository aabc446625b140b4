"""Every setting of a training run in one flat, documented dataclass, stored as RUN/config.yaml.

The defaults suit a CPU-only machine (the small encoder at 64 px); the paper's network is one option away
(``encoder: vgg``). ``cryo-forum train`` starts from these defaults, then a ``--config`` YAML file, then its
own options, and writes the result with every default spelled out, so a run can be reproduced from its
config.yaml alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cryo_forum.errors import CryoForumError
from cryo_forum.io.atomic import atomic_output

STRATEGIES = ("default", "mirrored", "multiworker")


@dataclass
class TrainingConfig:
    """Settings of one training run (paths as given by the user; angles in degrees; lengths in A or px)."""

    # data: labelled particles (star) or a map to simulate from (volume)
    star: str | None = None
    volume: str | None = None
    datadir: str | None = None
    apix: float | None = None  # map mode: pixel size of the simulated particles (default: the map's)
    box_size: int | None = None  # map mode: box of the simulated particles (default: image_size)
    snr: float | None = 1.0  # map mode
    ctf: bool = True  # map mode
    defocus_range: list[float] = field(default_factory=lambda: [10000.0, 25000.0])  # map mode, A
    shift_px: float = 0.0  # map mode
    outliers: float = 0.1  # map mode: fraction of labelled outliers in training batches and held-out sets
    particles_per_epoch: int = 2000  # map mode: fresh particles drawn per epoch
    n_val: int = 500  # map mode: fixed validation particles, simulated once and kept in RUN/val
    n_test: int = 500  # map mode: fixed test particles, kept in RUN/test
    val_fraction: float = 0.1  # star mode
    test_fraction: float = 0.1  # star mode
    symmetry: str = "C1"
    seed: int = 0
    # preprocessing
    image_size: int = 64
    normalise: bool = True
    mask_radius: float | None = 0.9  # fraction of the box radius; None for no mask
    phase_flip: bool = False
    cache: bool = False  # star mode: cache preprocessed images in RUN/cache.h5
    # model
    encoder: str = "small"
    widths: list[int] | None = None
    pooling: str = "avg"
    lowpass: bool = False
    dropout: float = 0.0
    head: str = "qcqp"
    psd: bool = False
    # loss
    loss_schedule: str = "linear"
    switch_epoch: float = 2.0
    ramp_epochs: float = 3.0
    distance_weight: float = 1.0
    direct_weight: float = 1.0
    direct_loss: str = "geodesic"
    pair_weighting: str = "none"
    uncertainty_weight: float = 0.1  # qcqp head: weight of the Bingham likelihood that calibrates the eigenvalues
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    # augmentation (star mode; map mode draws fresh orientations instead)
    rotate: bool = True
    max_shift_px: float = 0.0
    augment_method: str = "bilinear"
    # distribution
    strategy: str = "default"

    def validate(self) -> None:
        """Raise CryoForumError naming the first option out of range."""
        if (self.star is None) == (self.volume is None):
            raise CryoForumError("give exactly one of --star (labelled particles) or --volume (a map to simulate from)")
        checks = [
            ("--epochs", self.epochs > 0, "must be positive"),
            ("--batch-size", self.batch_size >= 2, "must be at least 2 (pairs need two particles)"),
            ("--image-size", self.image_size >= 16, "must be at least 16 px"),
            ("--learning-rate", self.learning_rate > 0, "must be positive"),
            ("--snr", self.snr is None or self.snr > 0, "must be positive"),
            ("--outliers", 0 <= self.outliers < 1, "must be in [0, 1)"),
            ("--val-fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("--test-fraction", 0 <= self.test_fraction < 1, "must be in [0, 1)"),
            ("--particles-per-epoch", self.particles_per_epoch >= self.batch_size, "must be at least one batch"),
            ("--n-val", self.n_val >= 2, "must be at least 2"),
            ("--strategy", self.strategy in STRATEGIES, f"must be one of {', '.join(STRATEGIES)}"),
        ]
        for option, ok, message in checks:
            if not ok:
                raise CryoForumError(f"{option}: {message}, got {getattr(self, option[2:].replace('-', '_'))}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CryoForumError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        with atomic_output(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> TrainingConfig:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise CryoForumError(f"{path}: no such file") from None
        except yaml.YAMLError as error:
            raise CryoForumError(f"{path}: not valid YAML ({error.__class__.__name__})") from None
        if not isinstance(values, dict):
            raise CryoForumError(f"{path}: expected a mapping of setting: value")
        return cls.from_dict(values, source=str(path))
