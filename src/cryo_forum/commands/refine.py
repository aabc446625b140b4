"""Finish predicted poses and origins with a local search against a map (after `cryo-forum predict`).

Every particle starts from its pose and origin in --star and is searched on shrinking local grids of rotations
around it, down to --refine-step degrees, scored like `cryo-forum match` (the CTF-aware, noise-whitened correlation
with the map's projection); its origin is searched to a fraction of a pixel within --refine-shift of where it
started. How wide the search starts follows the network's uncertainty (its calibrated 90 % bound
_cfErrorBound90Deg, else twice _cfExpectedErrorDeg): a particle it is sure of gets a small search, an unsure one a
wider one, and one whose search would reach beyond --global-above degrees (or that has no expected error) a global
search first (symmetry-aware with --symmetry). The map is resampled to the particles' pixel size and box but not
re-centred: its origin defines the poses (use the map the network was trained on, e.g. the run's reference.mrc).
Writes a STAR file that keeps every input block and column, with the refined rlnAngleRot/Tilt/Psi and
rlnOriginX/YAngst, _cfMatchScore (larger = better fit), _cfFitJunkScore (how badly the map explains the image, a
directional z-score; `cryo-forum filter --metric fit_junk_score --threshold 3`) and _cfRefinedErrorDeg, the refined
pose's expected error from the sharpness of its fit (it leaves out the map's own errors, so with a map from the
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
        help=f"final angular step (default {DEFAULTS.step_deg:g})",
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
    if symmetry:
        parser.add_argument(
            "--symmetry", default="C1", help="point group of the map, for its global search (default C1)"
        )


def settings_from(args: argparse.Namespace, symmetry: str, batch_size: int = DEFAULTS.batch_size) -> RefineSettings:
    """The search's settings from the options of :func:`add_refine_options`, checked."""
    settings = RefineSettings(
        step_deg=args.refine_step,
        shift_px=args.refine_shift,
        global_above_deg=args.global_above,
        symmetry=symmetry,
        batch_size=batch_size,
    )
    settings.validate()
    return settings


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--star", type=Path, required=True, help="particles with poses (.star or .cs)")
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
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.maps import load_volume
    from cryo_forum.io.partial import PartialResults
    from cryo_forum.io.particles import ParticleSet
    from cryo_forum.prediction.refinement import refine_particles, search_widths

    if args.batch_size < 1:
        raise CryoForumError(f"--batch-size: must be positive, got {args.batch_size}")
    settings = settings_from(args, args.symmetry, args.batch_size)
    if not args.volume.is_file():
        raise CryoForumError(f"{args.volume}: file not found")
    particles = ParticleSet.open(args.star, datadir=args.datadir)
    if not particles.has_poses:
        raise CryoForumError(f"{args.star}: has no poses to refine (rlnAngleRot/Tilt/Psi); run `cryo-forum predict`")
    particles.validate()
    OutputGuard().protect_particles(particles).protect(args.volume, "the reference map").check_file(args.out)
    volume, _ = load_volume(args.volume, pixel_size=particles.pixel_size, size=particles.box_size, center=False)
    started = time.perf_counter()
    widths, settings = search_widths(particles.table, settings, str(args.star))
    partial = PartialResults.beside(args.out)
    table = refine_particles(particles, volume, particles.quaternions(), widths, settings=settings, partial=partial)
    seconds = time.perf_counter() - started
    particles.write_star(args.out, columns=table)
    PartialResults.discard(partial)
    print(f"refined {len(table)} particles in {seconds:.1f} s ({seconds / len(table) * 1e3:.0f} ms each) -> {args.out}")
    return 0
