"""Fourier shell correlation of two maps, and the resolution where it falls below each threshold.

Half maps of one data set are judged at FSC = 0.143; a map against an independent reference (for example the
map particles were simulated from) at 0.5. Both are reported by default. Writes OUT/fsc.json (the curve, the
resolutions, pixel size and box) and OUT/fsc.png, together or not at all. The maps must have the same box and
pixel size. With --mask (a soft mask map) or --auto-mask (one made around the particle of the maps' mean,
written as OUT/mask.mrc) the FSC reported is that of the masked maps corrected for the mask by phase
randomisation; the unmasked and the uncorrected masked curves are reported beside it.

Example:
  cryo-forum fsc map_half1.mrc map_half2.mrc --out fsc_halves --auto-mask
  cryo-forum fsc map.mrc sim/volume.mrc --out fsc_vs_truth --threshold 0.5
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from cryo_forum.errors import CryoForumError

log = logging.getLogger("cryo_forum")

MASK_NAME = "mask.mrc"


def add_args(parser: argparse.ArgumentParser) -> None:
    from cryo_forum.physics.resolution import THRESHOLDS

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
    masks = parser.add_mutually_exclusive_group()
    masks.add_argument("--mask", type=Path, metavar="MASK", help="mask map (.mrc) applied to both maps")
    masks.add_argument("--auto-mask", action="store_true", help="mask both maps automatically (OUT/mask.mrc)")
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

    from cryo_forum.analysis.fsc import JSON_NAME, PNG_NAME, write_masked_fsc
    from cryo_forum.io.atomic import atomic_directory
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.mrc import read_volume, write_volume
    from cryo_forum.physics.masks import half_map_mask
    from cryo_forum.physics.resolution import masked_fsc

    produces = (JSON_NAME, PNG_NAME, MASK_NAME) if args.auto_mask else (JSON_NAME, PNG_NAME)
    OutputGuard().protect(args.map1).protect(args.map2).protect(args.mask).check_folder(args.out, produces)

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

    mask_path = args.mask
    if args.auto_mask:
        mask, mask_path = half_map_mask(map1, map2, pixel_size), args.out / MASK_NAME
        if not mask.any():
            log.warning(f"{args.map1}, {args.map2}: no density stands out of the noise, the mask is empty")
    result = masked_fsc(map1, map2, mask, pixel_size)
    thresholds = tuple(args.threshold)
    with atomic_directory(args.out) as staging:
        write_masked_fsc(
            staging,
            result,
            pixel_size,
            thresholds,
            title=f"FSC of {args.map1.name} and {args.map2.name}",
            maps=[str(args.map1), str(args.map2)],
            mask=str(mask_path) if result.has_mask else None,
        )
        if args.auto_mask:
            write_volume(staging / MASK_NAME, mask, pixel_size)
    which = "masked, corrected by phase randomisation" if result.has_mask else "unmasked"
    for threshold in thresholds:
        print(f"resolution (FSC = {threshold:g}): {result.resolution(threshold)} ({which})")
    print(f"written: {', '.join(str(args.out / name) for name in sorted(produces))}")
    return 0
