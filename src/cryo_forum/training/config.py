"""Every setting of a training run in one documented dataclass, stored as RUN/config.yaml.

The defaults suit a CPU-only machine (the small encoder at up to 64 px); the paper's network is one option away
(``encoder: vgg``). ``cryo-forum train`` starts from these defaults, then a ``--config`` YAML file, then its
own options, and writes the result with every default spelled out and data paths made absolute, so a run can
be reproduced (and resumed from anywhere) from its config.yaml alone. :meth:`TrainingConfig.validate` checks
every setting without importing TensorFlow or reading data, so a bad option is refused at once.

Training length: with ``epochs`` set, exactly that many epochs with a cosine learning-rate decay. Without it
(the default) training stops itself: after the loss hand-over, whenever the validation median error has not
improved by 1 % for ``patience`` epochs the learning rate is halved, and the third such plateau (or
``max_epochs``) ends the run; the best epoch is kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cryo_forum import choices
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io.atomic import atomic_output

PATH_SETTINGS = ("star", "volume", "datadir")
DEFAULT_IMAGE_SIZE = 64


@dataclass
class TrainingConfig:
    """Settings of one training run (angles in degrees; lengths in A or px)."""

    # data: labelled particles (star) or a map to simulate from (volume)
    star: str | None = None
    volume: str | None = None
    datadir: str | None = None
    apix: float | None = None  # map mode: pixel size of the simulated particles (default: the map's)
    box_size: int | None = None  # map mode: box of the simulated particles (default: the image size, else 64)
    snr: float | None = 1.0  # map mode
    ctf: bool = True  # map mode
    defocus_range: list[float] = field(default_factory=lambda: [10000.0, 25000.0])  # map mode, A
    outliers: float = 0.1  # map mode: fraction of labelled outliers in training batches and held-out sets
    particles_per_epoch: int = 2000  # map mode: fresh particles drawn per epoch
    n_val: int = 500  # map mode: fixed validation particles, simulated once and kept in RUN/val
    n_test: int = 500  # map mode: fixed test particles, kept in RUN/test
    val_fraction: float = 0.1  # star mode
    test_fraction: float = 0.1  # star mode
    symmetry: str = "C1"
    seed: int = 0
    # preprocessing
    image_size: int | None = None  # default: the particle box, at most 64 px
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
    # optimisation and length
    epochs: int | None = None  # None: stop at a validation plateau (see the module notes)
    max_epochs: int = 400
    patience: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    # augmentation and shifts
    max_shift: float = 0.0  # px: star mode random shifts of the images; map mode origins of the simulated particles
    rotate: bool = True  # star mode: exact in-plane rotation, pose updated (map mode draws fresh orientations)
    augment_method: str = "bilinear"
    # distribution
    strategy: str = "default"

    def validate(self) -> None:
        """Raise InvalidSetting naming the first setting out of range; reads no data, imports no TensorFlow."""
        from cryo_forum.geometry import normalise_symmetry_name

        if (self.star is None) == (self.volume is None):
            raise CryoForumError("give exactly one of --star (labelled particles) or --volume (a map to simulate from)")
        for name, allowed in (
            ("encoder", choices.ENCODERS),
            ("pooling", choices.POOLINGS),
            ("head", choices.HEAD_NAMES),
            ("loss_schedule", choices.SCHEDULE_KINDS),
            ("direct_loss", choices.DIRECT_LOSSES),
            ("pair_weighting", choices.PAIR_WEIGHTINGS),
            ("augment_method", choices.AUGMENT_METHODS),
            ("strategy", choices.STRATEGIES),
        ):
            if getattr(self, name) not in allowed:
                raise InvalidSetting(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        try:
            normalise_symmetry_name(self.symmetry)
        except ValueError as error:
            raise InvalidSetting("symmetry", str(error)) from None
        checks = [
            ("epochs", self.epochs is None or self.epochs > 0, "must be positive"),
            ("max_epochs", self.max_epochs > 0, "must be positive"),
            ("patience", self.patience > 0, "must be positive"),
            ("batch_size", self.batch_size >= 2, "must be at least 2 (pairs need two particles)"),
            ("image_size", self.image_size is None or self.image_size >= 16, "must be at least 16 px"),
            ("box_size", self.box_size is None or self.box_size >= 16, "must be at least 16 px"),
            ("apix", self.apix is None or self.apix > 0, "must be positive"),
            ("learning_rate", self.learning_rate > 0, "must be positive"),
            ("warmup_epochs", self.warmup_epochs >= 0, "must be >= 0"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("snr", self.snr is None or self.snr > 0, "must be positive"),
            ("outliers", 0 <= self.outliers < 1, "must be in [0, 1)"),
            ("val_fraction", 0 < self.val_fraction < 1, "must be in (0, 1)"),
            ("test_fraction", 0 <= self.test_fraction < 1, "must be in [0, 1)"),
            ("particles_per_epoch", self.particles_per_epoch >= self.batch_size, "must be at least one batch"),
            ("n_val", self.n_val >= 2, "must be at least 2"),
            ("n_test", self.n_test >= 0, "must be >= 0"),
            ("max_shift", self.max_shift >= 0, "must be >= 0"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("uncertainty_weight", self.uncertainty_weight >= 0, "must be >= 0"),
            ("mask_radius", self.mask_radius is None or 0 < self.mask_radius <= 1, "must be in (0, 1]"),
            ("widths", self.widths is None or (len(self.widths) > 0 and min(self.widths) > 0), "must be positive"),
            ("ramp_epochs", self.ramp_epochs > 0, "must be positive"),
            ("switch_epoch", self.switch_epoch >= 0, "must be >= 0"),
            (
                "defocus_range",
                len(self.defocus_range) == 2 and 0 <= self.defocus_range[0] <= self.defocus_range[1],
                "needs 0 <= MIN <= MAX",
            ),
        ]
        for name, ok, message in checks:
            if not ok:
                raise InvalidSetting(name, f"{message}, got {getattr(self, name)}")
        if self.val_fraction + self.test_fraction >= 1:
            raise InvalidSetting("val_fraction", f"plus test_fraction must be below 1, got {self.val_fraction}")

    @property
    def automatic_length(self) -> bool:
        """Whether training stops itself at a validation plateau (no fixed ``epochs``)."""
        return self.epochs is None

    @property
    def epoch_limit(self) -> int:
        return self.epochs if self.epochs is not None else self.max_epochs

    def with_absolute_paths(self) -> TrainingConfig:
        """The same settings with the data paths made absolute (a resumed run finds them from anywhere)."""
        changes = {
            name: str(Path(getattr(self, name)).expanduser().resolve())
            for name in PATH_SETTINGS
            if getattr(self, name) is not None
        }
        return dataclasses.replace(self, **changes)

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
