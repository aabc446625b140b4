"""Reconstruct a 3-D map from particles with poses (direct Fourier inversion with CTF and FSC or Wiener weighting).

Reads the poses (rlnAngleRot/Tilt/Psi), origins and CTF parameters of every particle of a RELION STAR (or
cryoSPARC .cs) file and writes the map of all particles to OUT. With --half-maps it also writes the maps of
the two half sets (rlnRandomSubset, or alternate particles when the file has no such column) as
OUT_half1.mrc and OUT_half2.mrc, an automatic soft mask around the particle as OUT_mask.mrc (unless --mask
gives one), and their FSC (fsc.json, fsc.png) into the folder OUT_fsc: masked and corrected for the mask by
phase randomisation (the resolution to quote) and unmasked. With half maps the maps are FSC-weighted by
default (each Fourier voxel regularised by the SSNR the half maps' masked FSC implies, as RELION does);
--wiener C uses a constant Wiener term C instead, and is what regularises a map without half maps (C = 1
unless given). With --symmetry every image is also inserted at its symmetry-equivalent poses. All outputs
appear together or not at all.

Example:
  cryo-forum reconstruct --star predicted.star --out map.mrc --half-maps --symmetry D2
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from cryo_forum.errors import CryoForumError
from cryo_forum.io import star

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("cryo_forum")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--star", type=Path, required=True, metavar="FILE", help="particles with poses (.star, .cs)")
    parser.add_argument("--out", type=Path, required=True, metavar="MAP", help="output map, e.g. map.mrc")
    parser.add_argument(
        "--half-maps", action="store_true", help="also write both half maps, a mask and their FSC (FSC weighting)"
    )
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
        metavar="C",
        help="constant Wiener term, an inverse SNR per image and Fourier voxel, instead of the FSC weighting "
        "(default: FSC weighting with --half-maps, else C = 1)",
    )
    parser.add_argument(
        "--iterations", type=int, default=2, metavar="N", help="FSC weighting: updates from the half maps (default 2)"
    )
    parser.add_argument(
        "--mask",
        type=Path,
        metavar="MASK",
        help="with --half-maps: a mask (.mrc) instead of the automatic one",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="particles read at a time (default 256)")


def output_paths(out: Path) -> dict[str, Path]:
    """Where the map, the half maps, the mask and the FSC folder of ``--out`` go."""
    suffix = out.suffix or ".mrc"
    return {
        "map": out,
        "half1": out.with_name(f"{out.stem}_half1{suffix}"),
        "half2": out.with_name(f"{out.stem}_half2{suffix}"),
        "mask": out.with_name(f"{out.stem}_mask{suffix}"),
        "fsc": out.with_name(f"{out.stem}_fsc"),
    }


def _outputs(args: argparse.Namespace) -> list[str]:
    """The keys of :func:`output_paths` this run writes."""
    if not args.half_maps:
        return ["map"]
    return ["map", "half1", "half2", "fsc"] + ([] if args.mask else ["mask"])


def _read_mask(args: argparse.Namespace, size: int) -> np.ndarray | None:
    """The --mask map [D, D, D] (None without one), refused without --half-maps or in another box."""
    from cryo_forum.io.mrc import read_volume

    if args.mask is None:
        return None
    if not args.half_maps:
        raise CryoForumError("--mask: is used with --half-maps only")
    mask, _ = read_volume(args.mask)
    if mask.shape != (size,) * 3:
        raise CryoForumError(f"{args.mask}: mask box {mask.shape} differs from the particles' {(size,) * 3}")
    return mask


def main(args: argparse.Namespace) -> int:
    from cryo_forum import geometry
    from cryo_forum.analysis.coverage import warn_if_collapsed
    from cryo_forum.analysis.fsc import write_masked_fsc
    from cryo_forum.io.atomic import atomic_directory, atomic_output
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.mrc import write_volume
    from cryo_forum.io.particles import ParticleSet
    from cryo_forum.physics.reconstruction import WIENER_CONSTANT, check_settings, reconstruct, reference_map
    from cryo_forum.physics.resolution import HALF_MAP_THRESHOLD, resolution_at

    try:
        symmetry = geometry.normalise_symmetry_name(args.symmetry)
    except ValueError as error:
        raise CryoForumError(f"--symmetry {args.symmetry}: {error}") from None
    check_settings(args.wiener, args.iterations, args.batch_size)
    particles = ParticleSet.open(args.star, datadir=args.datadir)
    if not particles.has_poses:
        raise CryoForumError(f"{args.star}: no poses ({', '.join(star.ANGLES)}) to reconstruct from")
    paths = output_paths(args.out)
    guard = OutputGuard().protect_particles(particles).protect(args.mask, "the input mask")
    for key in _outputs(args):
        if key == "fsc":
            guard.check_folder(paths[key], produces=("fsc.json", "fsc.png"))
        else:
            guard.check_file(paths[key])
    mask = _read_mask(args, particles.box_size)
    warn_if_collapsed(particles.quaternions(), f"the particles of {args.star}", symmetry)

    log.info(f"reconstructing {len(particles)} particles ({symmetry})")
    options = {"symmetry": symmetry, "batch_size": args.batch_size, "progress": True}
    if args.half_maps:
        result = reference_map(
            particles,
            wiener_constant=args.wiener,
            iterations=args.iterations,
            mask=mask,
            subset_column=args.subset_column,
            **options,
        )
        volumes = {"map": result.map, "half1": result.half1, "half2": result.half2}
        if mask is None:
            volumes["mask"] = result.mask
        pixel_size = result.pixel_size
    else:
        if args.wiener is None:
            log.info(f"no half maps: a constant Wiener term C = {WIENER_CONSTANT:g} (FSC weighting needs --half-maps)")
        wiener = WIENER_CONSTANT if args.wiener is None else args.wiener
        volume, pixel_size = reconstruct(particles, wiener_constant=wiener, **options)
        volumes = {"map": volume}

    with contextlib.ExitStack() as outputs:  # every file is renamed into place only if all were written
        for key, volume in volumes.items():
            write_volume(outputs.enter_context(atomic_output(paths[key])), volume, pixel_size)
        if args.half_maps:
            write_masked_fsc(
                outputs.enter_context(atomic_directory(paths["fsc"])),
                result.fsc,
                pixel_size,
                title=f"Half-map FSC of {paths['map'].name} ({len(particles)} particles, {symmetry})",
                half_maps=[str(paths["half1"]), str(paths["half2"])],
                mask=str(args.mask or paths["mask"]) if result.fsc.has_mask else None,
                regularisation=result.regularisation,
                n_particles=len(particles),
                symmetry=symmetry,
            )
    print(f"map: {paths['map']} ({particles.box_size} px, {pixel_size:.3f} A/px)")
    if args.half_maps:
        unmasked = resolution_at(result.fsc.frequencies, result.fsc.unmasked, HALF_MAP_THRESHOLD)
        print(f"half maps: {paths['half1']}, {paths['half2']}" + ("" if args.mask else f"; mask: {paths['mask']}"))
        print(f"FSC: {paths['fsc'] / 'fsc.json'}, {paths['fsc'] / 'fsc.png'}")
        which = "masked, corrected by phase randomisation" if result.fsc.has_mask else "no mask found: unmasked"
        print(f"resolution (FSC = {HALF_MAP_THRESHOLD}): {result.resolution} ({which}); unmasked {unmasked}")
    return 0
