"""Every setting of a training run as one tree of small dataclasses, stored as RUN/config.yaml.

The tree: ``data`` (labelled particles, :class:`StarData`, or a map to simulate from, :class:`MapData`),
``images`` (the :class:`~cryo_forum.streams.preprocess.Preprocessor`, completed with the data's box and pixel
size), ``model``, ``loss`` (the :class:`LossSchedule`), ``optimisation``, ``augmentation`` (labelled particles
only) and the run-wide ``symmetry`` and ``seed``. A setting of the other kind of data is refused, not ignored.

The defaults suit a CPU-only machine (the small encoder at up to 64 px); the paper's network is one option away
(``encoder: vgg``). ``cryo-forum train`` starts from these defaults, then a ``--config`` YAML file, then its own
options, and writes the result with every default spelled out and data paths made absolute, so a run can be
reproduced (and resumed from anywhere) from its config.yaml alone. :meth:`TrainingConfig.validate` checks every
setting without importing TensorFlow or reading data, so a bad option is refused at once.

Training length: with ``epochs`` set, exactly that many epochs with a cosine learning-rate decay. Without it
(the default) training stops itself: after the loss hand-over, whenever the validation median error has not
improved by 1 % for ``patience`` epochs the learning rate is halved, and the third such plateau (or
``max_epochs``) ends the run; the best epoch is kept.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from cryo_forum import choices
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io.atomic import atomic_output
from cryo_forum.streams.augment import Augmentation
from cryo_forum.streams.preprocess import Preprocessor

MODES = ("star", "map")


@dataclass
class StarData:
    """Labelled particles (RELION .star or cryoSPARC .cs with consensus poses), split by particle."""

    star: str = ""
    datadir: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    cache: bool = False  # keep preprocessed images in RUN/cache.h5
    junk_prior: float = 0.1  # share of the labelled particles that may be junk with meaningless poses
    balance_views: float = 0.5  # strength of the weights that balance preferred views (0: none)
    pretrain: bool = True  # first train on particles simulated from the set's own reconstruction
    pretrain_epochs: int = 90  # epochs of 6400 simulated particles before the real images


@dataclass
class MapData:
    """Fresh particles simulated from a map (or an atomic model) for every batch; fixed val and test sets."""

    volume: str = ""
    apix: float | None = None  # pixel size of the simulated particles (default: the map's)
    box_size: int | None = None  # box of the simulated particles (default: the image size, else 64)
    snr: float | None = 1.0
    snr_start: float | None = None  # curriculum: the SNR of the first batch, falling to snr over half the run
    ctf: bool = True
    defocus_range: list[float] = field(default_factory=lambda: [10000.0, 25000.0])  # A
    max_shift_px: float = 0.0  # origins uniform within this many px
    outliers: float = 0.1  # fraction of labelled outliers in training batches and the fixed sets
    particles_per_epoch: int = 2000
    n_val: int = 500
    n_test: int = 500
    ctf_from: str | None = None  # a particle file: each simulated particle takes the CTF of one of its particles
    noise_spectrum: list[float] | None = None  # relative noise power per radial shell of the box (None: white)
    origin_sigma_px: float | None = None  # normal origins of this std (px) instead of uniform within max_shift_px


@dataclass
class ModelSettings:
    """The network and what its losses compare."""

    encoder: str = "small"
    widths: list[int] | None = None
    pooling: str = "avg"
    lowpass: bool = False
    dropout: float = 0.0
    head: str = "qcqp"
    psd: bool = False  # qcqp head: A = L L^T
    direct_loss: str = "geodesic"
    pair_weighting: str = "none"
    uncertainty_weight: float = 0.1  # qcqp head: weight of the Bingham likelihood that calibrates the eigenvalues


@dataclass(frozen=True)
class LossSchedule:
    """Weights (w_dist, w_direct) of the distance and direct losses as a function of the epoch.

    * ``"original"``: the distance loss alone until ``switch_epoch``, then the direct loss alone (the original
      work trained distance matching first, then switched to the direct loss).
    * ``"constant"``: ``(distance_weight, direct_weight)`` throughout.
    * ``"linear"``: the distance loss alone until ``switch_epoch``, then a linear hand-over that reaches the
      direct loss alone ``ramp_epochs`` later.

    The epoch may be fractional (``step / steps_per_epoch``).
    """

    kind: str = "linear"
    switch_epoch: float = 2.0
    ramp_epochs: float = 3.0
    distance_weight: float = 1.0
    direct_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in choices.SCHEDULE_KINDS:
            raise InvalidSetting("kind", f"must be one of {', '.join(choices.SCHEDULE_KINDS)}, got {self.kind!r}")
        if not self.ramp_epochs > 0:
            raise InvalidSetting("ramp_epochs", f"must be positive, got {self.ramp_epochs}")
        if not self.switch_epoch >= 0:
            raise InvalidSetting("switch_epoch", f"must be >= 0, got {self.switch_epoch}")

    @property
    def handed_over(self) -> float:
        """The epoch from which the weights no longer change."""
        return 0.0 if self.kind == "constant" else self.switch_epoch + self.ramp_epochs

    def __call__(self, epoch: float) -> tuple[float, float]:
        if self.kind == "constant":
            return float(self.distance_weight), float(self.direct_weight)
        if self.kind == "original":
            progress = 1.0 if epoch >= self.switch_epoch else 0.0
        else:
            progress = min(max((epoch - self.switch_epoch) / self.ramp_epochs, 0.0), 1.0)
        return float(self.distance_weight * (1.0 - progress)), float(self.direct_weight * progress)


@dataclass
class Optimisation:
    """Batches, learning rate, training length and distribution."""

    epochs: int | None = None  # None: stop at a validation plateau (see the module notes)
    max_epochs: int = 400
    patience: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    strategy: str = "default"

    @property
    def automatic_length(self) -> bool:
        """Whether training stops itself at a validation plateau (no fixed ``epochs``)."""
        return self.epochs is None

    @property
    def epoch_limit(self) -> int:
        return self.epochs if self.epochs is not None else self.max_epochs


SECTIONS: dict[str, type] = {
    "images": Preprocessor,
    "model": ModelSettings,
    "loss": LossSchedule,
    "optimisation": Optimisation,
    "augmentation": Augmentation,
}
DATA_SECTIONS: dict[str, type] = {"star": StarData, "map": MapData}
FROM_THE_DATA = ("pixel_size_in", "input_size")  # images settings filled in from the data, never set
PATH_SETTINGS = ("star", "volume", "datadir", "ctf_from")
_FLAT_NAMES = {("loss", "kind"): "loss_schedule", ("augmentation", "method"): "augment_method"}
_RUNS = {"star": "training on labelled particles", "map": "training from a map"}


@dataclass
class TrainingConfig:
    """Settings of one training run: the tree described in the module notes."""

    data: StarData | MapData
    images: Preprocessor = field(default_factory=Preprocessor)
    model: ModelSettings = field(default_factory=ModelSettings)
    loss: LossSchedule = field(default_factory=LossSchedule)
    optimisation: Optimisation = field(default_factory=Optimisation)
    augmentation: Augmentation | None = None  # labelled particles only (default: rotation, no shifts)
    symmetry: str = "C1"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode == "star" and self.augmentation is None:
            self.augmentation = Augmentation()
        if self.mode == "map" and self.augmentation is not None:
            raise CryoForumError(
                "augmentation applies to training on labelled particles; particles simulated from a map are "
                "drawn in every orientation and at every shift (--max-shift) already"
            )

    @property
    def mode(self) -> str:
        """ "star" (labelled particles) or "map" (particles simulated from a map)."""
        return "star" if isinstance(self.data, StarData) else "map"

    def validate(self) -> None:
        """Raise InvalidSetting naming the first setting out of range; reads no data, imports no TensorFlow."""
        from cryo_forum.geometry import normalise_symmetry_name

        model, optimisation = self.model, self.optimisation
        if not (self.data.star if self.mode == "star" else self.data.volume):
            raise CryoForumError("give --star (labelled particles) or --volume (a map to simulate from)")
        for name, value, allowed in (
            ("encoder", model.encoder, choices.ENCODERS),
            ("pooling", model.pooling, choices.POOLINGS),
            ("head", model.head, choices.HEAD_NAMES),
            ("direct_loss", model.direct_loss, choices.DIRECT_LOSSES),
            ("pair_weighting", model.pair_weighting, choices.PAIR_WEIGHTINGS),
            ("strategy", optimisation.strategy, choices.STRATEGIES),
        ):
            if value not in allowed:
                raise InvalidSetting(name, f"must be one of {', '.join(allowed)}, got {value!r}")
        try:
            normalise_symmetry_name(self.symmetry)
        except ValueError as error:
            raise InvalidSetting("symmetry", str(error)) from None
        checks = [
            ("seed", self.seed, int(self.seed) == self.seed and self.seed >= 0, "must be an integer >= 0"),
            ("epochs", optimisation.epochs, optimisation.epochs is None or optimisation.epochs > 0, "must be positive"),
            ("max_epochs", optimisation.max_epochs, optimisation.max_epochs > 0, "must be positive"),
            ("patience", optimisation.patience, optimisation.patience > 0, "must be positive"),
            ("batch_size", optimisation.batch_size, optimisation.batch_size >= 2, "must be at least 2 (pairs)"),
            ("learning_rate", optimisation.learning_rate, optimisation.learning_rate > 0, "must be positive"),
            ("warmup_epochs", optimisation.warmup_epochs, optimisation.warmup_epochs >= 0, "must be >= 0"),
            ("weight_decay", optimisation.weight_decay, optimisation.weight_decay >= 0, "must be >= 0"),
            ("image_size", self.images.image_size, self.images.image_size is None or self.images.image_size >= 16,
             "must be at least 16 px"),
            ("dropout", model.dropout, 0 <= model.dropout < 1, "must be in [0, 1)"),
            ("uncertainty_weight", model.uncertainty_weight, model.uncertainty_weight >= 0, "must be >= 0"),
            ("widths", model.widths, model.widths is None or (len(model.widths) > 0 and min(model.widths) > 0),
             "must be positive"),
        ]  # fmt: skip
        checks += self._data_checks()
        for name, value, ok, message in checks:
            if not ok:
                raise InvalidSetting(name, f"{message}, got {value}")

    def _data_checks(self) -> list[tuple[str, Any, bool, str]]:
        data = self.data
        if isinstance(data, StarData):
            return [
                ("val_fraction", data.val_fraction, 0 < data.val_fraction < 1, "must be in (0, 1)"),
                ("test_fraction", data.test_fraction, 0 <= data.test_fraction < 1, "must be in [0, 1)"),
                ("val_fraction", data.val_fraction, data.val_fraction + data.test_fraction < 1,
                 "plus --test-fraction must be below 1"),
                ("junk_prior", data.junk_prior, 0 <= data.junk_prior < 1, "must be in [0, 1)"),
                ("balance_views", data.balance_views, 0 <= data.balance_views <= 1, "must be in [0, 1]"),
                ("pretrain_epochs", data.pretrain_epochs, data.pretrain_epochs > 0, "must be positive"),
            ]  # fmt: skip
        batch = self.optimisation.batch_size
        return [
            ("box_size", data.box_size, data.box_size is None or data.box_size >= 16, "must be at least 16 px"),
            ("apix", data.apix, data.apix is None or data.apix > 0, "must be positive"),
            ("snr", data.snr, data.snr is None or data.snr > 0, "must be positive"),
            ("snr_start", data.snr_start, data.snr_start is None or (data.snr is not None and data.snr_start > 0),
             "must be positive, with an --snr"),
            ("outliers", data.outliers, 0 <= data.outliers < 1, "must be in [0, 1)"),
            ("particles_per_epoch", data.particles_per_epoch, data.particles_per_epoch >= batch,
             "must be at least one batch"),
            ("n_val", data.n_val, data.n_val >= 2, "must be at least 2"),
            ("n_test", data.n_test, data.n_test >= 0, "must be >= 0"),
            ("max_shift_px", data.max_shift_px, data.max_shift_px >= 0, "must be >= 0"),
            ("origin_sigma_px", data.origin_sigma_px, data.origin_sigma_px is None or data.origin_sigma_px >= 0,
             "must be >= 0"),
            ("defocus_range", data.defocus_range,
             len(data.defocus_range) == 2 and 0 <= data.defocus_range[0] <= data.defocus_range[1],
             "needs 0 <= MIN <= MAX"),
        ]  # fmt: skip

    def with_absolute_paths(self) -> TrainingConfig:
        """The same settings with the data paths made absolute (a resumed run finds them from anywhere)."""
        changes = {
            name: str(Path(getattr(self.data, name)).expanduser().resolve())
            for name in PATH_SETTINGS
            if getattr(self.data, name, None)
        }
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **changes))

    def to_dict(self) -> dict[str, Any]:
        """The tree as plain values, ``mode`` first (the YAML layout of config.yaml)."""
        values = dataclasses.asdict(self)
        if values["augmentation"] is None:
            del values["augmentation"]
        return {"mode": self.mode, **values}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainingConfig:
        """The config of a tree like :meth:`to_dict`'s; unknown or misplaced settings raise CryoForumError."""
        values = dict(values)
        mode = values.pop("mode", None)
        data = values.pop("data", None)
        if mode not in MODES or not isinstance(data, dict):
            raise CryoForumError(f"{source}: needs 'mode' (star or map) and a 'data' section")
        sections = {"data": _section(DATA_SECTIONS[mode], data, f"{source}: data", mode)}
        for name, kind in SECTIONS.items():
            if name in values:
                given = values.pop(name)
                if not isinstance(given, dict):
                    raise CryoForumError(f"{source}: '{name}' must be a section of settings")
                sections[name] = _section(kind, given, f"{source}: {name}", mode)
        unknown = sorted(set(values) - {"symmetry", "seed"})
        if unknown:
            raise CryoForumError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        return cls(**sections, **values)

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


def _section(kind: type, values: dict[str, Any], where: str, mode: str):
    """``kind(**values)``, naming settings that belong elsewhere (the other kind of data) or nowhere."""
    known = {item.name for item in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        other = {"star": MapData, "map": StarData}[mode]
        if set(unknown) <= {item.name for item in dataclasses.fields(other)}:
            raise CryoForumError(f"{where}: {', '.join(unknown)} apply to {'map' if mode == 'star' else 'star'} runs")
        raise CryoForumError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    return kind(**values)


class Leaf(NamedTuple):
    """One settable leaf of the tree: its section ("star"/"map" for the data, "" for run-wide) and flat name."""

    section: str
    field: str
    name: str
    default: Any


def leaves() -> list[Leaf]:
    """Every settable leaf, by its flat name (the field name; ``loss_schedule``, ``augment_method`` where the
    field name alone would not say it). Data leaves of both kinds are listed; a name may stand in two sections
    (``max_shift_px``: the simulated origins of a map run, the augmentation of a particle run)."""
    found = []
    for section, kind in {**DATA_SECTIONS, **SECTIONS}.items():
        for item in dataclasses.fields(kind):
            if section == "images" and item.name in FROM_THE_DATA:
                continue
            name = _FLAT_NAMES.get((section, item.name), item.name)
            found.append(Leaf(section, item.name, name, getattr(kind(), item.name)))
    defaults = TrainingConfig(data=StarData())
    return found + [Leaf("", name, name, getattr(defaults, name)) for name in ("symmetry", "seed")]


def leaf(name: str, mode: str) -> Leaf:
    """The leaf the flat setting ``name`` sets in a run of ``mode``; InvalidSetting if it belongs to the other."""
    candidates = [item for item in leaves() if item.name == name]
    if not candidates:
        raise CryoForumError(f"unknown setting {name!r}")
    for item in candidates:
        if item.section in ("", "images", "model", "loss", "optimisation", mode):
            return item
        if item.section == "augmentation" and mode == "star":
            return item
    owner = "star" if candidates[0].section == "augmentation" else candidates[0].section
    raise InvalidSetting(name, f"applies to {_RUNS[owner]}, not to {_RUNS[mode]}")


def configure(base: TrainingConfig | None = None, **settings: Any) -> TrainingConfig:
    """``base`` (None: the defaults) with flat ``settings`` applied, e.g. ``configure(star="p.star", epochs=30)``.

    ``star`` or ``volume`` chooses the kind of run (else ``base``'s); a setting of the other kind is refused.
    """
    if settings.get("star") and settings.get("volume"):
        raise CryoForumError("give either particles (star) or a map (volume) to train from, not both")
    mode = "star" if "star" in settings else "map" if "volume" in settings else (base.mode if base else None)
    if mode is None:
        raise CryoForumError("give --star (labelled particles) or --volume (a map to simulate from)")
    if base is None:
        base = TrainingConfig(data=DATA_SECTIONS[mode]())
    elif base.mode != mode:
        base = dataclasses.replace(base, data=DATA_SECTIONS[mode](), augmentation=None)
    sections: dict[str, dict[str, Any]] = {}
    for name, value in settings.items():
        item = leaf(name, mode)
        sections.setdefault(item.section, {})[item.field] = value
    changes = sections.pop("", {})
    for section, values in sections.items():
        key = "data" if section in DATA_SECTIONS else section
        changes[key] = dataclasses.replace(getattr(base, key), **values)
    return dataclasses.replace(base, **changes)


def setting_value(config: TrainingConfig, name: str) -> Any:
    """The value of the flat setting ``name`` in ``config`` (None where it does not apply to its kind of run)."""
    try:
        item = leaf(name, config.mode)
    except InvalidSetting:
        return None
    holder = (
        config
        if item.section == ""
        else config.data
        if item.section in DATA_SECTIONS
        else getattr(config, item.section)
    )
    return getattr(holder, item.field)
