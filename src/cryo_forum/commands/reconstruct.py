"""Reconstruct a 3-D map from particles with poses (direct Fourier inversion with CTF/Wiener weighting).

Reads the poses (rlnAngleRot/Tilt/Psi), origins and CTF parameters of every particle of a RELION STAR (or
cryoSPARC .cs) file and writes the map of all particles to OUT. With --half-maps it also writes the maps of
the two half sets (rlnRandomSubset, or alternate particles when the file has no such column) as
OUT_half1.mrc and OUT_half2.mrc, and their FSC (fsc.json, fsc.png) into the folder OUT_fsc, and prints the
resolution at FSC = 0.143. With --symmetry every image is also inserted at its symmetry-equivalent poses.
All outputs appear together or not at all.

Example:
  cryo-forum reconstruct --star predicted.star --out map.mrc --half-maps --symmetry D2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from cryo_forum.errors import CryoForumError
from cryo_forum.io import star

log = logging.getLogger("cryo_forum")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--star", type=Path, required=True, metavar="FILE", help="particles with poses (.star, .cs)")
    parser.add_argument("--out", type=Path, required=True, metavar="MAP", help="output map, e.g. map.mrc")
    parser.add_argument("--half-maps", action="store_true", help="also write both half maps and their FSC")
    parser.add_argument("--symmetry", default="C1", metavar="GROUP", help="point group, e.g. C4, D2, O (default C1)")
    parser.add_argument("--datadir", type=Path, metavar="DIR", help="extra folder in which to look for stacks")
    parser.add_argument(
        "--subset-column",
        default=star.RANDOM_SUBSET,
        metavar="COLUMN",
        help=f"column (values 1, 2) splitting the half sets (default {star.RANDOM_SUBSET})",
    )
    parser.add_argument(
        "--wiener",
        type=float,
        default=1.0,
        metavar="C",
        help="Wiener constant, an inverse SNR per image and Fourier voxel (default: 1)",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="particles read at a time (default 256)")


def output_paths(out: Path) -> dict[str, Path]:
    """Where the map, the half maps and the FSC folder of ``--out`` go."""
    suffix = out.suffix or ".mrc"
    return {
        "map": out,
        "half1": out.with_name(f"{out.stem}_half1{suffix}"),
        "half2": out.with_name(f"{out.stem}_half2{suffix}"),
        "fsc": out.with_name(f"{out.stem}_fsc"),
    }


def main(args: argparse.Namespace) -> int:
    from cryo_forum import geometry
    from cryo_forum.analysis.coverage import warn_if_collapsed
    from cryo_forum.analysis.fsc import HALF_MAP_THRESHOLD, fsc, resolution_at, write_fsc
    from cryo_forum.analysis.reconstruct import half_maps, reconstruct
    from cryo_forum.io.atomic import atomic_directory, atomic_output
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.mrc import write_volume
    from cryo_forum.io.particles import ParticleSet

    try:
        symmetry = geometry.normalise_symmetry_name(args.symmetry)
    except ValueError as error:
        raise CryoForumError(f"--symmetry {args.symmetry}: {error}") from None
    if args.wiener < 0:
        raise CryoForumError(f"--wiener must be >= 0, got {args.wiener}")
    if args.batch_size < 1:
        raise CryoForumError(f"--batch-size must be positive, got {args.batch_size}")
    particles = ParticleSet.open(args.star, datadir=args.datadir)
    if not particles.has_poses:
        raise CryoForumError(f"{args.star}: no poses ({', '.join(star.ANGLES)}) to reconstruct from")
    paths = output_paths(args.out)
    guard = OutputGuard().protect_particles(particles)
    for key, path in paths.items():
        if key == "fsc" and args.half_maps:
            guard.check_folder(path, produces=("fsc.json", "fsc.png"))
        elif key == "map" or args.half_maps:
            guard.check_file(path)
    warn_if_collapsed(particles.quaternions(), f"the particles of {args.star}", symmetry)

    options = {"symmetry": symmetry, "wiener_constant": args.wiener, "batch_size": args.batch_size, "progress": True}
    log.info(f"reconstructing {len(particles)} particles ({symmetry})")
    if args.half_maps:
        maps = half_maps(particles, subset_column=args.subset_column, **options)
        volumes = {"map": maps.full, "half1": maps.half1, "half2": maps.half2}
        pixel_size = maps.pixel_size
    else:
        volume, pixel_size = reconstruct(particles, **options)
        volumes = {"map": volume}

    with contextlib.ExitStack() as outputs:  # every file is renamed into place only if all were written
        for key, volume in volumes.items():
            write_volume(outputs.enter_context(atomic_output(paths[key])), volume, pixel_size)
        if args.half_maps:
            frequencies, curve = fsc(volumes["half1"], volumes["half2"], pixel_size)
            write_fsc(
                outputs.enter_context(atomic_directory(paths["fsc"])),
                frequencies,
                curve,
                pixel_size,
                title=f"Half-map FSC of {paths['map'].name} ({len(particles)} particles, {symmetry})",
                half_maps=[str(paths["half1"]), str(paths["half2"])],
                n_particles=len(particles),
                symmetry=symmetry,
            )
    print(f"map: {paths['map']} ({particles.box_size} px, {pixel_size:.3f} A/px)")
    if args.half_maps:
        resolution = resolution_at(frequencies, curve, HALF_MAP_THRESHOLD)
        print(f"half maps: {paths['half1']}, {paths['half2']}")
        print(f"FSC: {paths['fsc'] / 'fsc.json'}, {paths['fsc'] / 'fsc.png'}")
        print(f"resolution (FSC = {HALF_MAP_THRESHOLD}): {resolution}")
    return 0
