"""Fourier shell correlation of two maps, and the resolution where it falls below each threshold.

Half maps of one data set are judged at FSC = 0.143; a map against an independent reference (for example the
map particles were simulated from) at 0.5. Both are reported by default. Writes OUT/fsc.json (the curve, the
resolutions, pixel size and box) and OUT/fsc.png, together or not at all. The maps must have the same box and
pixel size; --mask multiplies both by a (soft) mask first.

Example:
  cryo-forum fsc map_half1.mrc map_half2.mrc --out fsc_halves
  cryo-forum fsc map.mrc sim/volume.mrc --out fsc_vs_truth --threshold 0.5
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from cryo_forum.errors import CryoForumError


def add_args(parser: argparse.ArgumentParser) -> None:
    from cryo_forum.analysis.fsc import THRESHOLDS

    parser.add_argument("map1", type=Path, help="first map (.mrc)")
    parser.add_argument("map2", type=Path, help="second map (.mrc), same box and pixel size")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for fsc.json and fsc.png")
    parser.add_argument(
        "--threshold",
        type=float,
        nargs="+",
        default=list(THRESHOLDS),
        metavar="T",
        help="FSC thresholds to report (default 0.143 0.5)",
    )
    parser.add_argument("--mask", type=Path, metavar="MASK", help="mask map (.mrc) applied to both maps")
    parser.add_argument("--pixel-size", type=float, metavar="A", help="pixel size in A (default: the map headers)")


def _pixel_size(args: argparse.Namespace, first: float, second: float) -> float:
    if args.pixel_size is not None:
        if not args.pixel_size > 0:
            raise CryoForumError(f"--pixel-size must be positive, got {args.pixel_size}")
        return args.pixel_size
    if first > 0 and second > 0 and not math.isclose(first, second, rel_tol=1e-3):
        raise CryoForumError(f"{args.map2}: pixel size {second:g} A differs from {args.map1}'s {first:g} A")
    if not max(first, second) > 0:
        raise CryoForumError(f"{args.map1}: no pixel size in the map headers; give --pixel-size")
    return first if first > 0 else second


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from cryo_forum.analysis.fsc import JSON_NAME, PNG_NAME, fsc, resolution_at, write_fsc
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.mrc import read_volume

    OutputGuard().protect(args.map1).protect(args.map2).protect(args.mask).check_folder(
        args.out, produces=(JSON_NAME, PNG_NAME)
    )

    for threshold in args.threshold:
        if not -1.0 < threshold < 1.0:
            raise CryoForumError(f"--threshold {threshold:g}: must lie between -1 and 1")
    map1, pixel1 = read_volume(args.map1)
    map2, pixel2 = read_volume(args.map2)
    if len(set(map1.shape)) != 1:
        raise CryoForumError(f"{args.map1}: not a cubic map (shape {map1.shape})")
    if map2.shape != map1.shape:
        raise CryoForumError(f"{args.map2}: box {map2.shape} differs from {args.map1}'s {map1.shape}")
    pixel_size = _pixel_size(args, pixel1, pixel2)
    mask = None
    if args.mask is not None:
        mask, _ = read_volume(args.mask)
        if mask.shape != map1.shape:
            raise CryoForumError(f"{args.mask}: mask box {mask.shape} differs from the maps' {map1.shape}")
    for path, volume in ((args.map1, map1), (args.map2, map2)):
        if not np.isfinite(volume).all():
            raise CryoForumError(f"{path}: the map contains NaN or infinite values")

    frequencies, curve = fsc(map1, map2, pixel_size, mask)
    thresholds = tuple(args.threshold)
    write_fsc(
        args.out,
        frequencies,
        curve,
        pixel_size,
        thresholds,
        title=f"FSC of {args.map1.name} and {args.map2.name}",
        maps=[str(args.map1), str(args.map2)],
        mask=str(args.mask) if args.mask else None,
    )
    for threshold in thresholds:
        print(f"resolution (FSC = {threshold:g}): {resolution_at(frequencies, curve, threshold)}")
    print(f"written: {args.out / 'fsc.json'}, {args.out / 'fsc.png'}")
    return 0
