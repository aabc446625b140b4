"""Train an orientation estimator on labelled particles (--star) or on particles simulated from a map (--volume).

Settings come from the defaults, then --config FILE (YAML, keys as in RUN/config.yaml), then the options
given here. The run folder receives model.keras (best validation epoch), config.yaml (every setting),
split.json, history.csv, logs/ (TensorBoard) and checkpoints/; --resume continues an interrupted run
from its last completed epoch (pass a larger --epochs to train further).

Examples:
  cryo-forum train --star particles.star --out run1 --epochs 30
  cryo-forum train --volume map.mrc --apix 4.58 --snr 0.1 --outliers 0.1 --out run2
  cryo-forum train --resume --out run1 --epochs 40
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from cryo_forum.config import STRATEGIES, TrainingConfig
from cryo_forum.errors import CryoForumError

_HELP = {
    "star": "labelled particles (RELION .star or cryoSPARC .cs with poses)",
    "volume": "a map (.mrc) or atomic model to simulate fresh training particles from",
    "datadir": "folder to look for particle stacks in",
    "apix": "map mode: pixel size of the simulated particles in A (default: the map's)",
    "box_size": "map mode: box of the simulated particles in px (default: --image-size)",
    "snr": "map mode: signal-to-noise ratio of the simulated particles",
    "ctf": "map mode: apply a CTF to the simulated particles",
    "defocus_range": "map mode: defocus range in A",
    "shift_px": "map mode: largest particle shift in px",
    "outliers": "map mode: fraction of labelled outliers",
    "particles_per_epoch": "map mode: fresh particles per epoch",
    "n_val": "map mode: fixed validation particles",
    "n_test": "map mode: fixed test particles",
    "val_fraction": "star mode: fraction of particles held out for validation",
    "test_fraction": "star mode: fraction of particles held out for testing",
    "symmetry": "point group of the particle (C1, Cn, Dn, T, O, I)",
    "seed": "random seed (split, shuffling, simulation)",
    "image_size": "image size the network sees in px (Fourier-cropped from the box)",
    "normalise": "normalise images by their background",
    "mask_radius": "soft circular mask radius as a fraction of the box radius",
    "phase_flip": "phase-flip images by their CTF before the network",
    "cache": "star mode: cache preprocessed images in RUN/cache.h5",
    "encoder": "encoder: small (fast on CPUs), resnet, vgg (the paper's)",
    "widths": "channel widths of the encoder stages",
    "pooling": "pooling: avg, max, gem, flatten",
    "lowpass": "add the low-pass pyramid front end",
    "dropout": "dropout before the head",
    "head": "rotation head: qcqp (with uncertainty), quaternion, 6d, 9d",
    "psd": "qcqp head: build A as a positive semi-definite L L^T",
    "loss_schedule": "weights of distance and direct loss over epochs: linear, original, constant",
    "switch_epoch": "epoch at which the direct loss takes over",
    "ramp_epochs": "epochs of the linear hand-over",
    "distance_weight": "weight of the pairwise distance loss",
    "direct_weight": "weight of the direct pose loss",
    "direct_loss": "direct pose loss: geodesic or chordal",
    "pair_weighting": "pair weights: none, density (1 / (1 - cos d)), histogram",
    "uncertainty_weight": "qcqp head: weight of the Bingham likelihood that calibrates the uncertainty",
    "epochs": "number of epochs",
    "batch_size": "particles per batch (all pairs within it are compared)",
    "learning_rate": "peak learning rate (warm-up, then cosine decay)",
    "warmup_epochs": "epochs of linear learning-rate warm-up",
    "weight_decay": "AdamW weight decay",
    "rotate": "star mode: augment by exact in-plane rotation (pose updated)",
    "max_shift_px": "star mode: augment by random shifts up to this many px",
    "augment_method": "in-plane rotation method: fourier (exact) or bilinear (fast)",
    "strategy": f"distribution: {', '.join(STRATEGIES)}",
}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder")
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    defaults = TrainingConfig()
    for item in dataclasses.fields(TrainingConfig):
        default = getattr(defaults, item.name)
        kwargs = {"default": argparse.SUPPRESS, "help": f"{_HELP[item.name]} (default: {default})"}
        if isinstance(default, bool):
            parser.add_argument(_option(item.name), action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, list) or item.name == "widths":
            kind = float if item.name == "defocus_range" else int
            parser.add_argument(_option(item.name), type=kind, nargs="+", **kwargs)
        else:
            kind = {int: int, float: float}.get(type(default), str)
            if item.name in ("apix", "mask_radius", "snr"):
                kind = float
            elif item.name == "box_size":
                kind = int
            parser.add_argument(_option(item.name), type=kind, **kwargs)


def resolve_config(args: argparse.Namespace) -> TrainingConfig:
    """Defaults, then the run's own config.yaml (--resume) or --config, then the options given."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingConfig) if hasattr(args, f.name)}
    if args.resume:
        base = TrainingConfig.load(args.out / "config.yaml") if (args.out / "config.yaml").exists() else None
        if base is None:
            raise CryoForumError(f"--resume: {args.out} holds no run to resume (config.yaml is missing)")
        changed = sorted(set(given) - {"epochs"})
        if changed:
            raise CryoForumError(f"--resume continues a run as configured; only --epochs may change, not {changed}")
    elif args.config is not None:
        base = TrainingConfig.load(args.config)
    else:
        base = TrainingConfig()
    return dataclasses.replace(base, **given)


def main(args: argparse.Namespace) -> int:
    from cryo_forum.training import train

    config = resolve_config(args)
    train(config, args.out, resume=args.resume)
    print(f"run written to {args.out} (model.keras, config.yaml, split.json, history.csv, logs/)")
    return 0
