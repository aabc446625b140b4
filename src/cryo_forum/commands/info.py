"""Summarise a particle file (RELION .star, cryoSPARC .cs, .mrcs stack) or an MRC volume.

Prints the number of particles, box and pixel size, optics groups, whether poses and CTF parameters
are present, the stacks referenced and the RELION version; --json prints one JSON object instead. The box
is what the stacks hold: the header of every referenced stack is read (never its images), and stacks that
are missing, unreadable, truncated or hold fewer images than the metadata refers to are listed, as is an
rlnImageSize that disagrees with the stacks. Such problems are reported, not errors (exit status 0).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cryo_forum.io import star


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="a .star, .cs, .mrcs or .mrc file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    parser.add_argument("--datadir", type=Path, help="extra folder in which to look for image stacks")


def _angstrom(sizes: list[float]) -> str:
    """Pixel sizes as text; none known is "not set" (an MRC header stores 0 for that)."""
    return ", ".join(f"{p:.4g}" for p in sizes) + " A" if sizes else "not set"


def _format(summary: dict) -> str:
    """The text summary: one ``label: value`` line per fact, a line per problem found."""
    if summary["kind"] == "volume":
        z, y, x = summary["shape"]
        lines = [
            f"file:           {summary['file']} (MRC volume)",
            f"shape:          {x} x {y} x {z} voxels",
            f"pixel size:     {_angstrom([] if summary['pixel_size'] is None else [summary['pixel_size']])}",
        ]
        if summary["truncated"]:
            lines.append("truncated:      the file is shorter than its header says")
        return "\n".join(lines)
    version = summary["relion_version"]
    kind = {"star": f"RELION {version} STAR", "cs": "cryoSPARC .cs", "mrcs": "MRC image stack"}[summary["format"]]
    pixel = _angstrom(summary["pixel_sizes"])
    if len(summary["pixel_sizes"]) > 1:
        pixel += " (differs between optics groups)"
    return "\n".join(
        [
            f"file:           {summary['file']} ({kind})",
            f"particles:      {summary['n_particles']}",
            *_box_lines(summary),
            f"pixel size:     {pixel}",
            f"optics groups:  {summary['optics_groups']}",
            f"poses:          {'yes' if summary['has_poses'] else 'no'}",
            f"CTF:            {'yes' if summary['has_ctf'] else 'no'}",
            *_stack_lines(summary),
        ]
    )


def _box_lines(summary: dict) -> list[str]:
    """The box the stacks hold, and a line when the metadata's rlnImageSize says otherwise."""
    sizes, declared = summary["box_sizes_stacks"], summary["box_size_metadata"]
    if len(sizes) > 1:
        lines = [f"box:            differs between stacks: {', '.join(map(str, sizes))} px"]
    elif sizes:
        lines = [f"box:            {sizes[0]} px"]
    elif declared is not None:
        return [f"box:            {declared} px according to {star.IMAGE_SIZE} (no stack header could be read)"]
    else:
        return ["box:            unknown (no stack header could be read)"]
    if declared is not None and sizes != [declared]:
        held = " or ".join(map(str, sizes))
        lines.append(f"box mismatch:   {star.IMAGE_SIZE} is {declared} px but the stacks hold {held} px images")
    return lines


def _stack_lines(summary: dict) -> list[str]:
    """The number of stacks referenced, then one line per kind of fault with the first stack at fault."""
    missing = summary["stacks_missing"]
    stacks = f"{summary['stacks']} referenced"
    if missing:
        stacks += f", {len(missing)} not found (first: {missing[0]}; try --datadir)"
    lines = [f"stacks:         {stacks}"]
    for key, label, fault in [
        ("stacks_unreadable", "unreadable:     ", "not readable as square MRC images"),
        ("stacks_truncated", "truncated:      ", "shorter than its header says"),
        ("stacks_short", "too few images: ", "holds fewer images than the metadata refers to"),
    ]:
        if summary[key]:
            lines.append(f"{label}{len(summary[key])} ({fault}; first: {summary[key][0]})")
    return lines


def main(args: argparse.Namespace) -> int:
    from cryo_forum.io.summary import describe

    summary = describe(args.file, args.datadir)
    print(json.dumps(summary) if args.json else _format(summary))
    return 0
