"""Summarise a particle file (RELION .star, cryoSPARC .cs, .mrcs stack) or an MRC volume.

Prints the number of particles, box and pixel size, optics groups, whether poses and CTF parameters
are present, the stacks referenced and the RELION version; --json prints one JSON object instead.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.io.mrc import mrc_info
from cryo_forum.io.particles import STACK_SUFFIXES, ParticleSet


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .star, .cs, .mrcs or .mrc file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    parser.add_argument("--datadir", type=Path, help="extra folder in which to look for image stacks")


def describe_volume(path: Path) -> dict:
    """Summary of a 3-D MRC map."""
    info = mrc_info(path)
    return {
        "file": str(path),
        "kind": "volume",
        "format": "mrc",
        "shape": list(info.shape),
        "box_size": info.shape[-1],
        "pixel_size": info.pixel_size,
        "n_particles": 0,
        "optics_groups": 0,
        "has_poses": False,
        "has_ctf": False,
    }


def describe_particles(path: Path, datadir: Path | None) -> dict:
    """Summary of a particle file; stacks are only looked up, not read (a missing stack is reported)."""
    particles = ParticleSet.open(path, datadir=datadir)
    missing = []
    for name in particles.stack_names:
        try:
            particles.resolve_stack(name)
        except CryoForumError:
            missing.append(name)
    try:
        box_size: int | None = particles.box_size
    except CryoForumError:
        box_size = None
    pixel_sizes = _pixel_sizes(particles)
    if particles.optics is not None:
        groups = len(particles.optics)
    else:
        groups = 1 if len(particles) else 0
    return {
        "file": str(path),
        "kind": "particles",
        "format": particles.kind,
        "relion_version": particles.relion_version,
        "n_particles": len(particles),
        "box_size": box_size,
        "pixel_size": pixel_sizes[0] if len(pixel_sizes) == 1 else None,
        "pixel_sizes": pixel_sizes,
        "optics_groups": groups,
        "has_poses": particles.has_poses,
        "has_ctf": particles.has_ctf,
        "stacks": len(particles.stack_names),
        "stacks_missing": missing,
    }


def _pixel_sizes(particles: ParticleSet) -> list[float]:
    if star.IMAGE_PIXEL_SIZE in particles.table:
        return [float(p) for p in np.unique(particles.table[star.IMAGE_PIXEL_SIZE].dropna())]
    try:
        return [particles.pixel_size]
    except CryoForumError:
        return []


def describe(path: Path, datadir: Path | None = None) -> dict:
    """The summary dict printed by ``cryo-forum info`` (``--json`` prints it as is)."""
    if path.suffix.lower() in (*STACK_SUFFIXES, ".map") and mrc_info(path).is_volume:
        return describe_volume(path)
    return describe_particles(path, datadir)


def _format(summary: dict) -> str:
    def size(value) -> str:
        return "unknown" if value is None else str(value)

    if summary["kind"] == "volume":
        z, y, x = summary["shape"]
        return "\n".join(
            [
                f"file:           {summary['file']} (MRC volume)",
                f"shape:          {x} x {y} x {z} voxels",
                f"pixel size:     {summary['pixel_size']:.4g} A",
            ]
        )
    version = summary["relion_version"]
    kind = {"star": f"RELION {version} STAR", "cs": "cryoSPARC .cs", "mrcs": "MRC image stack"}[summary["format"]]
    sizes = summary["pixel_sizes"]
    pixel = ", ".join(f"{p:.4g}" for p in sizes) + " A" if sizes else "unknown"
    if len(sizes) > 1:
        pixel += " (differs between optics groups)"
    missing = summary["stacks_missing"]
    stacks = f"{summary['stacks']} referenced"
    if missing:
        stacks += f", {len(missing)} not found (first: {missing[0]}; try --datadir)"
    return "\n".join(
        [
            f"file:           {summary['file']} ({kind})",
            f"particles:      {summary['n_particles']}",
            f"box:            {size(summary['box_size'])} px",
            f"pixel size:     {pixel}",
            f"optics groups:  {summary['optics_groups']}",
            f"poses:          {'yes' if summary['has_poses'] else 'no'}",
            f"CTF:            {'yes' if summary['has_ctf'] else 'no'}",
            f"stacks:         {stacks}",
        ]
    )


def main(args: argparse.Namespace) -> int:
    summary = describe(args.file, args.datadir)
    print(json.dumps(summary) if args.json else _format(summary))
    return 0
