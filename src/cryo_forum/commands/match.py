"""Find every particle's pose by projection matching against a known map (the classical baseline).

Searches a global SO(3) grid (--coarse, 7.5 deg: 36 864 rotations; with --symmetry only the point group's
asymmetric unit) at low resolution, then local grids around the best pose that shrink until their step is at most
--refine degrees, scoring each pose by the CTF-aware, noise-whitened normalised cross-correlation of the particle
with the map's projection in Fourier space. The map is resampled to the particles' pixel size and box but not
re-centred: its origin defines the poses; it is masked (--mask, by default automatically around its density).
Writes a STAR file that keeps every input block and column, with the found rlnAngleRot/Tilt/Psi, the origins
when --max-shift > 0, and _cfMatchScore (larger = better match).
The run's peak memory (mostly the map's padded spectrum, which grows as the cube of the box) is estimated
before anything is computed; a run that would not fit in the available memory is refused, naming the largest
--batch-size that would.

Example:
  cryo-forum match --star particles.star --volume map.mrc --out matched.star --max-shift 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cryo_forum.commands.refine import add_mask_option, mask_file
from cryo_forum.errors import CryoForumError


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--star", type=Path, required=True, help="particles (.star or .cs)")
    parser.add_argument("--volume", type=Path, required=True, help="the reference map (.mrc)")
    parser.add_argument("--out", type=Path, required=True, help="output STAR file")
    parser.add_argument("--coarse", type=float, default=7.5, metavar="DEG", help="global grid spacing (default 7.5)")
    parser.add_argument("--refine", type=float, default=1.0, metavar="DEG", help="final local step (default 1)")
    parser.add_argument(
        "--max-shift", type=float, default=0.0, metavar="PX", help="search origins this far from the file's (0: keep)"
    )
    parser.add_argument("--shift-step", type=float, default=1.0, metavar="PX", help="origin grid step (default 1)")
    parser.add_argument(
        "--symmetry", default="C1", help="point group of the map: search only its asymmetric unit (default C1)"
    )
    add_mask_option(parser)
    parser.add_argument("--datadir", type=Path, help="folder to look for particle stacks in")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="particles searched at once; fewer need less memory (default 32)"
    )


def main(args: argparse.Namespace) -> int:
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.particles import ParticleSet
    from cryo_forum.prediction.matching import MatchSettings, match_particles, require_match_memory
    from cryo_forum.prediction.search_map import search_map
    from cryo_forum.resources import map_bytes

    settings = MatchSettings(
        coarse_deg=args.coarse,
        refine_deg=args.refine,
        max_shift_px=args.max_shift,
        shift_step_px=args.shift_step,
        batch_size=args.batch_size,
        symmetry=args.symmetry,
    )
    settings.validate()
    if not args.volume.is_file():
        raise CryoForumError(f"{args.volume}: file not found")
    particles = ParticleSet.open(args.star, datadir=args.datadir)
    particles.validate()
    guard = OutputGuard().protect_particles(particles).protect(args.volume, "the reference map")
    guard.protect(mask_file(args.mask), "the mask").check_file(args.out)
    box = particles.box_size
    settings.validate(box)
    require_match_memory(box, settings, extra=map_bytes(box))  # before the map is resampled into the box
    volume = search_map(args.volume, particles, args.mask)
    started = time.perf_counter()
    table = match_particles(particles, volume, settings)
    seconds = time.perf_counter() - started
    particles.write_star(args.out, columns=table)
    print(f"matched {len(table)} particles in {seconds:.1f} s ({seconds / len(table) * 1e3:.0f} ms each) -> {args.out}")
    return 0
