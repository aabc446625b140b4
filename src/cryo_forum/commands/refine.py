"""Finish predicted poses and origins with a local fit against a map (after `cryo-forum predict`).

Every particle starts from its pose and origin in --star. Its origin is searched at that pose to a fraction of a
pixel within --refine-shift of where it started, then pose and origin are fitted together by Gauss-Newton steps on
the score of `cryo-forum match` (the CTF-aware, noise-whitened correlation with the map's projection), in stages
whose rotation steps are bounded by a trust region that halves down to --refine-step degrees and whose band widens
to the whole image as the fit closes in. How wide the search starts follows the network's uncertainty (its
calibrated 90 % bound _cfErrorBound90Deg, else twice _cfExpectedErrorDeg): a particle it is sure of starts at a
small step, an unsure one at a larger one, and one whose search would reach beyond --global-above degrees (or that
has no expected error, or no pose at all) is searched on the global grid of `match` first (symmetry-aware with
--symmetry). A particle whose fit is weak for its view (more than --retry-above robust standard deviations below
the particles seen from about the same direction: typically one whose start was a few pixels off) is searched
again, globally over origins within --wide-shift of its start, and keeps the better fit. The map is resampled to
the particles' pixel size and box but not re-centred: its origin defines the poses (use the map the network was
trained on, e.g. the run's reference.mrc); it is masked (--mask, by default automatically around its density).
Writes a STAR file that keeps every input block and column, with the refined rlnAngleRot/Tilt/Psi and
rlnOriginX/YAngst, _cfMatchScore (larger = better fit), _cfFitJunkScore (how badly the map explains the image, a
directional z-score; `cryo-forum filter --metric fit_junk_score --threshold 3`) and _cfRefinedErrorDeg, the refined
pose's expected error from the curvature of the fit (it leaves out the map's own errors, so with a map from the
data set itself it is smaller than the true error).
Refined particles are kept in OUT.partial/ as they finish: the same command, interrupted, resumes where it stopped.

Example:
  cryo-forum refine --star predicted.star --volume run1/reference.mrc --out refined.star
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cryo_forum.errors import CryoForumError
from cryo_forum.prediction.refine_settings import RefineSettings

DEFAULTS = RefineSettings()


def add_refine_options(parser: argparse.ArgumentParser, symmetry: bool = True) -> None:
    """The search's options, shared with `predict --refine` (which takes the symmetry from its run)."""
    parser.add_argument(
        "--refine-step",
        type=float,
        default=DEFAULTS.step_deg,
        metavar="DEG",
        help=f"the last stage's longest rotation step (default {DEFAULTS.step_deg:g})",
    )
    parser.add_argument(
        "--refine-shift",
        type=float,
        default=DEFAULTS.shift_px,
        metavar="PX",
        help=f"how far origins may move from where they start (default {DEFAULTS.shift_px:g} px; 0 keeps them)",
    )
    parser.add_argument(
        "--global-above",
        type=float,
        default=DEFAULTS.global_above_deg,
        metavar="DEG",
        help="particles whose search would reach further are searched globally first "
        f"(default {DEFAULTS.global_above_deg:g})",
    )
    parser.add_argument(
        "--wide-shift",
        type=float,
        metavar="PX",
        help="how far from its start the second, global search of a particle that fits weakly tries its origin "
        "(default: --refine-shift; predict: as far as it centred never-aligned particles)",
    )
    parser.add_argument(
        "--retry-above",
        type=float,
        default=DEFAULTS.retry_above,
        metavar="Z",
        help="search a particle again when its fit is this many robust standard deviations weaker than its view's "
        f"(default {DEFAULTS.retry_above:g}; inf: never)",
    )
    add_mask_option(parser)
    if symmetry:
        parser.add_argument(
            "--symmetry", default="C1", help="point group of the map, for its global search (default C1)"
        )


def add_mask_option(parser: argparse.ArgumentParser) -> None:
    """The mask of the map a search scores particles against (`match`, `refine`, `predict`)."""
    parser.add_argument(
        "--mask",
        metavar="MASK",
        help="soft mask (.mrc, values 0 to 1) of the map, or 'none' (default: an automatic mask around its density)",
    )


def settings_from(
    args: argparse.Namespace, symmetry: str, batch_size: int = DEFAULTS.batch_size, wide_shift: float | None = None
) -> RefineSettings:
    """The search's settings from the options of :func:`add_refine_options`, checked; ``wide_shift`` is the
    second search's origin reach when --wide-shift does not say (never below --refine-shift)."""
    wide = args.wide_shift  # the user's, checked below
    if wide is None and wide_shift is not None:
        wide = max(wide_shift, args.refine_shift)
    settings = RefineSettings(
        step_deg=args.refine_step,
        shift_px=args.refine_shift,
        wide_shift_px=wide,
        retry_above=args.retry_above,
        global_above_deg=args.global_above,
        symmetry=symmetry,
        batch_size=batch_size,
    )
    settings.validate()
    return settings


def mask_file(mask: str | None) -> Path | None:
    """The mask file of a --mask option (None for the automatic mask or none), checked to exist."""
    from cryo_forum.prediction.search_map import NO_MASK

    if mask is None or mask == NO_MASK:
        return None
    if not Path(mask).is_file():
        raise CryoForumError(f"--mask: {mask}: file not found")
    return Path(mask)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--star", type=Path, required=True, help="particles with poses (.star or .cs); without, a global search first"
    )
    parser.add_argument("--volume", type=Path, required=True, help="the reference map (.mrc)")
    parser.add_argument("--out", type=Path, required=True, help="output STAR file")
    add_refine_options(parser)
    parser.add_argument("--datadir", type=Path, help="folder to look for particle stacks in")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULTS.batch_size,
        help=f"particles searched at once (default {DEFAULTS.batch_size})",
    )


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.partial import PartialResults
    from cryo_forum.io.particles import ParticleSet
    from cryo_forum.prediction.refinement import refine_particles, search_widths
    from cryo_forum.prediction.search_map import search_map

    if args.batch_size < 1:
        raise CryoForumError(f"--batch-size: must be positive, got {args.batch_size}")
    settings = settings_from(args, args.symmetry, args.batch_size)
    if not args.volume.is_file():
        raise CryoForumError(f"{args.volume}: file not found")
    particles = ParticleSet.open(args.star, datadir=args.datadir)
    particles.validate()
    guard = OutputGuard().protect_particles(particles).protect(args.volume, "the reference map")
    guard.protect(mask_file(args.mask), "the mask").check_file(args.out)
    volume = search_map(args.volume, particles, args.mask)
    started = time.perf_counter()
    widths, settings = search_widths(particles.table, settings, str(args.star))
    poses = particles.quaternions() if particles.has_poses else np.tile([0.0, 0.0, 0.0, 1.0], (len(particles), 1))
    if not particles.has_poses:  # nothing to start from: every particle is searched globally first
        widths = np.full(len(particles), np.nan)
    partial = PartialResults.beside(args.out)
    table = refine_particles(particles, volume, poses, widths, settings=settings, partial=partial)
    seconds = time.perf_counter() - started
    particles.write_star(args.out, columns=table)
    PartialResults.discard(partial)
    print(f"refined {len(table)} particles in {seconds:.1f} s ({seconds / len(table) * 1e3:.0f} ms each) -> {args.out}")
    return 0
