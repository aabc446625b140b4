"""Train an orientation estimator on labelled particles (--star) or on particles simulated from a map (--volume).

Settings come from the defaults, then --config FILE (YAML, keys as in RUN/config.yaml), then the options
given here. The run folder receives model.keras (best validation epoch), config.yaml (every setting),
preprocess.json, split.json, history.csv, calibration.json, logs/ (TensorBoard) and checkpoints/.

Length: without --epochs, training stops itself when the validation median error stops improving (the
learning rate is halved after --patience epochs without a 1 % gain; the third such plateau, or --max-epochs,
ends the run). --epochs N trains exactly N epochs with a cosine learning-rate decay.

Every option is checked before any data are read. A run that fails before its first epoch ends leaves no
folder; an interrupted run (Ctrl-C, a killed job) is continued by the same command with --resume added.

Examples:
  cryo-forum train --star particles.star --out run1
  cryo-forum train --volume map.mrc --apix 4.58 --snr 0.1 --outliers 0.1 --out run2 --epochs 100
  cryo-forum train --star particles.star --out run1 --resume
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from cryo_forum import choices
from cryo_forum.errors import CryoForumError
from cryo_forum.training.config import PATH_SETTINGS, TrainingConfig

log = logging.getLogger("cryo_forum")

# setting -> (help, default as the user should read it, or None to print the value)
_HELP = {
    "star": ("labelled particles (RELION .star or cryoSPARC .cs with poses)", "none"),
    "volume": ("a map (.mrc) or atomic model (.pdb, .cif) to simulate fresh training particles from", "none"),
    "datadir": ("folder to look for particle stacks in", "none"),
    "apix": ("map mode: pixel size of the simulated particles in A", "the map's"),
    "box_size": ("map mode: box of the simulated particles in px", "the image size, else 64"),
    "snr": ("map mode: signal-to-noise ratio of the simulated particles", None),
    "ctf": ("map mode: apply a CTF to the simulated particles", None),
    "defocus_range": ("map mode: defocus range in A", None),
    "outliers": ("map mode: fraction of labelled outliers", None),
    "particles_per_epoch": ("map mode: fresh particles per epoch", None),
    "n_val": ("map mode: fixed validation particles", None),
    "n_test": ("map mode: fixed test particles", None),
    "val_fraction": ("star mode: fraction of particles held out for validation", None),
    "test_fraction": ("star mode: fraction of particles held out for testing", None),
    "symmetry": ("point group of the particle (C1, Cn, Dn, T, O, I)", None),
    "seed": ("random seed (split, shuffling, simulation)", None),
    "image_size": ("image size the network sees in px (Fourier-cropped from the box)", "the box, at most 64"),
    "normalise": ("normalise images by their background", None),
    "mask_radius": ("soft circular mask radius as a fraction of the box radius", None),
    "phase_flip": ("phase-flip images by their CTF before the network", None),
    "cache": ("star mode: cache preprocessed images in RUN/cache.h5", None),
    "encoder": ("encoder: small (fast on CPUs), resnet, vgg (the paper's)", None),
    "widths": ("channel widths of the encoder stages", "the encoder's own"),
    "pooling": ("pooling of the encoder's last feature map", None),
    "lowpass": ("add the low-pass pyramid front end", None),
    "dropout": ("dropout before the head", None),
    "head": ("rotation head: qcqp (with uncertainty), quaternion, 6d, 9d", None),
    "psd": ("qcqp head: build A as a positive semi-definite L L^T", None),
    "loss_schedule": ("weights of distance and direct loss over epochs", None),
    "switch_epoch": ("epoch at which the direct loss takes over", None),
    "ramp_epochs": ("epochs of the linear hand-over", None),
    "distance_weight": ("weight of the pairwise distance loss", None),
    "direct_weight": ("weight of the direct pose loss", None),
    "direct_loss": ("direct pose loss", None),
    "pair_weighting": ("pair weights: none, density (1 / (1 - cos d)), histogram", None),
    "uncertainty_weight": ("qcqp head: weight of the Bingham likelihood that calibrates the uncertainty", None),
    "epochs": ("train exactly this many epochs (cosine learning-rate decay)", "stop at a validation plateau"),
    "max_epochs": ("without --epochs: the most epochs a run may take", None),
    "patience": ("without --epochs: epochs without a 1 %% gain that make a plateau", None),
    "batch_size": ("particles per batch (all pairs within it are compared)", None),
    "learning_rate": ("peak learning rate (after warm-up)", None),
    "warmup_epochs": ("epochs of linear learning-rate warm-up", None),
    "weight_decay": ("AdamW weight decay", None),
    "max_shift": ("largest particle shift in px: star mode augments by it, map mode simulates it", None),
    "rotate": ("star mode: augment by exact in-plane rotation (pose updated)", None),
    "augment_method": ("in-plane rotation method: fourier (exact) or bilinear (fast)", None),
    "strategy": ("distribution over devices or workers", None),
}
_CHOICES = {
    "encoder": choices.ENCODERS,
    "pooling": choices.POOLINGS,
    "head": choices.HEAD_NAMES,
    "loss_schedule": choices.SCHEDULE_KINDS,
    "direct_loss": choices.DIRECT_LOSSES,
    "pair_weighting": choices.PAIR_WEIGHTINGS,
    "augment_method": choices.AUGMENT_METHODS,
    "strategy": choices.STRATEGIES,
}
_FLOATS = {"apix", "snr", "mask_radius"}
_INTEGERS = {"box_size", "image_size", "epochs"}
_MAY_CHANGE_ON_RESUME = {"epochs", "max_epochs", "patience"}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder (new, or one to resume)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings (keys as in config.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    defaults = TrainingConfig()
    for item in dataclasses.fields(TrainingConfig):
        text, default_text = _HELP[item.name]
        default = getattr(defaults, item.name)
        shown = default_text or (" ".join(map(str, default)) if isinstance(default, list) else str(default))
        kwargs = {"default": argparse.SUPPRESS, "help": f"{text} (default: {shown})"}
        if item.name in _CHOICES:
            kwargs["choices"] = _CHOICES[item.name]
        if isinstance(default, bool):
            parser.add_argument(_option(item.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, list) or item.name == "widths":
            kind = float if item.name == "defocus_range" else int
            parser.add_argument(_option(item.name), type=kind, nargs="+", **kwargs)
        else:
            kind = float if item.name in _FLOATS else int if item.name in _INTEGERS else type(default)
            parser.add_argument(_option(item.name), type=kind if kind in (int, float) else str, **kwargs)


def _same(name: str, given, stored) -> bool:
    if name in PATH_SETTINGS and given is not None and stored is not None:
        return Path(given).expanduser().resolve() == Path(stored).expanduser().resolve()
    return given == stored


def resolve_config(args: argparse.Namespace) -> TrainingConfig:
    """Defaults, then the run's own config.yaml (--resume) or --config, then the options given.

    On --resume the options given must agree with the run's settings, except the training length.
    """
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig) if hasattr(args, f.name)}
    if args.resume:
        config_path = args.out / "config.yaml"
        if not config_path.is_file():
            raise CryoForumError(f"{args.out}: holds no run to resume (config.yaml is missing); leave out --resume")
        base = TrainingConfig.load(config_path)
        changed = [
            _option(name)
            for name, value in given.items()
            if name not in _MAY_CHANGE_ON_RESUME and not _same(name, value, getattr(base, name))
        ]
        if changed:
            raise CryoForumError(
                f"--resume: {', '.join(changed)} differ from the run's config.yaml; a resumed run keeps its settings "
                f"(only {', '.join(_option(name) for name in sorted(_MAY_CHANGE_ON_RESUME))} may change)"
            )
    elif args.config is not None:
        base = TrainingConfig.load(args.config)
    else:
        base = TrainingConfig()
    return dataclasses.replace(base, **given)


def main(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    config.validate()
    from cryo_forum.training.trainer import train

    train(config, args.out, resume=args.resume)
    print(f"run written to {args.out}")
    return 0
