"""Train an orientation estimator on labelled particles (--star) or on particles simulated from a map (--volume).

Settings come from the defaults, then --config FILE (YAML, laid out as RUN/config.yaml), then the options
given here. An option of the other kind of data (say --snr with --star) is refused. The run folder receives
model.keras (best validation epoch), config.yaml (every setting), split.json, history.csv, calibration.json,
logs/ (TensorBoard) and checkpoints/.

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
import logging
from pathlib import Path
from typing import Any

from cryo_forum import choices
from cryo_forum.errors import CryoForumError

log = logging.getLogger("cryo_forum")

# option -> help and, where the value alone would not say it, the default as a user should read it
_HELP = {
    "--star": ("labelled particles (RELION .star or cryoSPARC .cs with poses)", "none"),
    "--datadir": ("star data: folder to look for particle stacks in", "none"),
    "--val-fraction": ("star data: fraction of particles held out for validation", None),
    "--test-fraction": ("star data: fraction of particles held out for testing", None),
    "--cache": ("star data: cache preprocessed images in RUN/cache.h5", None),
    "--junk-prior": ("star data: share of labelled particles that may be junk with meaningless poses", None),
    "--balance-views": ("star data: strength of the weights that balance preferred views (0: none)", None),
    "--pretrain": ("star data: first train on particles simulated from the set's own reconstruction", None),
    "--pretrain-epochs": ("star data: epochs of simulated particles before the real images", None),
    "--volume": ("a map (.mrc) or atomic model (.pdb, .cif) to simulate fresh training particles from", "none"),
    "--apix": ("map data: pixel size of the simulated particles in A", "the map's"),
    "--box-size": ("map data: box of the simulated particles in px", "the image size, else 64"),
    "--snr": ("map data: signal-to-noise ratio of the simulated particles", None),
    "--snr-start": ("map data: curriculum, the SNR of the first batch, falling to --snr over half the run", "none"),
    "--ctf": ("map data: apply a CTF to the simulated particles", None),
    "--defocus-range": ("map data: defocus range in A", None),
    "--ctf-from": ("map data: a particle file whose CTF parameters the simulated particles take", "none"),
    "--noise-spectrum": ("map data: relative noise power per radial shell of the box", "white"),
    "--origin-sigma-px": ("map data: normal origins of this std in px", "uniform within --max-shift"),
    "--max-shift": ("largest particle shift in px: star data are augmented by it, map data simulated with it", None),
    "--outliers": ("map data: fraction of labelled outliers", None),
    "--particles-per-epoch": ("map data: fresh particles per epoch", None),
    "--n-val": ("map data: fixed validation particles", None),
    "--n-test": ("map data: fixed test particles", None),
    "--image-size": ("image size the network sees in px (Fourier-cropped from the box)", "the box, at most 64"),
    "--normalise": ("normalise images by their background", None),
    "--background-radius": ("background outside this fraction of the box radius", None),
    "--mask-radius": ("soft circular mask radius as a fraction of the box radius", None),
    "--mask-edge": ("width of the mask's cosine edge in px", None),
    "--phase-flip": ("phase-flip images by their CTF before the network", None),
    "--encoder": ("encoder: small (fast on CPUs), resnet, vgg (the paper's)", None),
    "--widths": ("channel widths of the encoder stages", "the encoder's own"),
    "--pooling": ("pooling of the encoder's last feature map", None),
    "--lowpass": ("add the low-pass pyramid front end", None),
    "--dropout": ("dropout before the head", None),
    "--head": ("rotation head: qcqp (with uncertainty), quaternion, 6d, 9d", None),
    "--psd": ("qcqp head: build A as a positive semi-definite L L^T", None),
    "--direct-loss": ("direct pose loss", None),
    "--pair-weighting": ("pair weights: none, density (1 / (1 - cos d)), histogram", None),
    "--uncertainty-weight": ("qcqp head: weight of the Bingham likelihood that calibrates the uncertainty", None),
    "--loss-schedule": ("weights of distance and direct loss over epochs", None),
    "--switch-epoch": ("epoch at which the direct loss takes over", None),
    "--ramp-epochs": ("epochs of the linear hand-over", None),
    "--distance-weight": ("weight of the pairwise distance loss", None),
    "--direct-weight": ("weight of the direct pose loss", None),
    "--epochs": ("train exactly this many epochs (cosine learning-rate decay)", "stop at a validation plateau"),
    "--max-epochs": ("without --epochs: the most epochs a run may take", None),
    "--patience": ("without --epochs: epochs without a 1 %% gain that make a plateau", None),
    "--batch-size": ("particles per batch (all pairs within it are compared)", None),
    "--learning-rate": ("peak learning rate (after warm-up)", None),
    "--warmup-epochs": ("epochs of linear learning-rate warm-up", None),
    "--weight-decay": ("AdamW weight decay", None),
    "--strategy": ("distribution over devices or workers", None),
    "--rotate": ("star data: augment by exact in-plane rotation (pose updated)", None),
    "--augment-method": ("star data: in-plane rotation method, fourier (exact) or bilinear (fast)", None),
    "--symmetry": ("point group of the particle (C1, Cn, Dn, T, O, I)", None),
    "--seed": ("random seed (split, shuffling, simulation)", None),
}
_CHOICES = {
    "--encoder": choices.ENCODERS,
    "--pooling": choices.POOLINGS,
    "--head": choices.HEAD_NAMES,
    "--loss-schedule": choices.SCHEDULE_KINDS,
    "--direct-loss": choices.DIRECT_LOSSES,
    "--pair-weighting": choices.PAIR_WEIGHTINGS,
    "--augment-method": choices.AUGMENT_METHODS,
    "--strategy": choices.STRATEGIES,
}
_FLOATS = {"--apix", "--snr", "--snr-start", "--mask-radius", "--origin-sigma-px"}
_INTEGERS = {"--box-size", "--image-size", "--epochs"}
_MAY_CHANGE_ON_RESUME = {"epochs", "max_epochs", "patience"}
PATHS = ("star", "volume", "datadir")


def option_of(name: str) -> str:
    """The command-line option of the flat setting ``name`` (the one table of cryo_forum.commands.options)."""
    from cryo_forum.commands.options import OPTION_OF_SETTING

    return OPTION_OF_SETTING.get(name, "--" + name.replace("_", "-"))


def add_args(parser: argparse.ArgumentParser) -> None:
    from cryo_forum.training.config import leaves

    parser.add_argument("--out", type=Path, required=True, metavar="RUN", help="run folder (new, or one to resume)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML file of settings (laid out as config.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last completed epoch")
    seen = set()
    for item in leaves():
        option = option_of(item.name)
        if option in seen:
            continue
        seen.add(option)
        text, default_text = _HELP[option]
        default = item.default
        shown = default_text or (" ".join(map(str, default)) if isinstance(default, list) else str(default))
        kwargs = {"default": argparse.SUPPRESS, "help": f"{text} (default: {shown})", "dest": item.name}
        if option in _CHOICES:
            kwargs["choices"] = _CHOICES[option]
        if isinstance(default, bool):
            parser.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, list) or option in ("--widths", "--noise-spectrum"):
            kind = float if option in ("--defocus-range", "--noise-spectrum") else int
            parser.add_argument(option, type=kind, nargs="+", **kwargs)
        else:
            kind = float if option in _FLOATS else int if option in _INTEGERS else type(default)
            parser.add_argument(option, type=kind if kind in (int, float) else str, **kwargs)


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, by flat name."""
    from cryo_forum.training.config import leaves

    return {item.name: getattr(args, item.name) for item in leaves() if hasattr(args, item.name)}


def _same(name: str, given, stored) -> bool:
    if name in PATHS and given is not None and stored is not None:
        return Path(given).expanduser().resolve() == Path(stored).expanduser().resolve()
    return given == stored


def resolve_config(args: argparse.Namespace):
    """Defaults, then the run's own config.yaml (--resume) or --config, then the options given.

    On --resume the options given must agree with the run's settings, except the training length.
    """
    from cryo_forum.training.config import TrainingConfig, configure, setting_value
    from cryo_forum.training.run import CONFIG_NAME

    given = given_settings(args)
    if not args.resume:
        return configure(TrainingConfig.load(args.config) if args.config is not None else None, **given)
    config_path = args.out / CONFIG_NAME
    if not config_path.is_file():
        raise CryoForumError(f"{args.out}: holds no run to resume ({CONFIG_NAME} is missing); leave out --resume")
    stored = TrainingConfig.load(config_path)
    changed = sorted(
        option_of(name)
        for name, value in given.items()
        if name not in _MAY_CHANGE_ON_RESUME and not _same(name, value, setting_value(stored, name))
    )
    if changed:
        allowed = ", ".join(option_of(name) for name in sorted(_MAY_CHANGE_ON_RESUME))
        raise CryoForumError(
            f"--resume: {', '.join(changed)} differ from the run's config.yaml; a resumed run keeps its settings "
            f"(only {allowed} may change)"
        )
    return configure(stored, **{name: value for name, value in given.items() if name in _MAY_CHANGE_ON_RESUME})


def main(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    config.validate()
    from cryo_forum.training.trainer import train

    train(config, args.out, resume=args.resume)
    print(f"run written to {args.out}")
    return 0
