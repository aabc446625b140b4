"""Simulate particle images with known poses from a map or an atomic model (--volume takes either).

Writes OUT/particles.mrcs, OUT/particles.star (RELION 3.1: optics block, true angles, origins in A,
defocus U/V/angle, and cfIsOutlier / cfOutlierKind labels) and OUT/volume.mrc (the map used, at the
output pixel size and box), all three or none. Projections are Fourier slices of the map, moved by
their origin, multiplied by the CTF (on unless --no-ctf) and given white noise at --snr (none without it).
The map is resampled to --apix (default: its own pixel size), centred on its centre of mass and padded
or cropped to --box-size. Without --symmetry the poses cover all of SO(3); with it, the asymmetric unit.
--outliers FRACTION replaces that share of the particles, in equal parts, by labelled outliers: noise
(no particle), decoy (another molecule), broken (a map cut by a plane), off_centre (a bad pick) and ice.
A request whose files would not fit on the output's disk, or whose box would not fit in memory (the
projector holds the map's spectrum padded to twice the box: 8 (2 D)^3 bytes), is refused before any work.

Example:
  cryo-forum simulate --volume map.mrc --n 2000 --box-size 64 --apix 4.58 --snr 0.1 --outliers 0.1 --out sim
  cryo-forum simulate --volume model.pdb --n 500 --box-size 48 --apix 2 --no-ctf --seed 3 --out sim_model
"""

from __future__ import annotations

import argparse
import logging
import warnings
from dataclasses import asdict
from pathlib import Path

from cryo_forum.errors import CryoForumError

log = logging.getLogger("cryo_forum")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--volume",
        type=Path,
        required=True,
        metavar="MAP",
        help="a map (.mrc, .map) or an atomic model (.pdb, .cif, optionally .gz) to project (required)",
    )
    parser.add_argument("--n", type=int, required=True, help="number of particles (required)")
    parser.add_argument("--box-size", type=int, required=True, metavar="D", help="particle box in pixels (required)")
    parser.add_argument(
        "--apix",
        type=float,
        metavar="A",
        help="pixel size in A (default: the map's; for a model, the molecule spans 2/3 of the box)",
    )
    parser.add_argument("--snr", type=float, help="var(signal) / var(noise) over the box (default: no noise)")
    parser.add_argument("--ctf", action=argparse.BooleanOptionalAction, default=True, help="apply a CTF (default: on)")
    parser.add_argument(
        "--defocus-range",
        type=float,
        nargs=2,
        default=(10000.0, 25000.0),
        metavar=("MIN", "MAX"),
        help="mean defocus drawn uniformly in this range, in A (default: 10000 25000)",
    )
    parser.add_argument(
        "--astigmatism", type=float, default=1000.0, metavar="A", help="largest defocus U - V in A (default: 1000)"
    )
    parser.add_argument("--voltage", type=float, default=300.0, metavar="KV", help="in kV (default: 300)")
    parser.add_argument("--cs", type=float, default=2.7, metavar="MM", help="spherical aberration in mm (default: 2.7)")
    parser.add_argument(
        "--amplitude-contrast", type=float, default=0.1, metavar="W", help="fraction, 0-1 (default: 0.1)"
    )
    parser.add_argument(
        "--bfactor",
        type=float,
        nargs="+",
        default=[0.0],
        metavar="B",
        help="CTF B-factor in A^2, or a range MIN MAX drawn per particle (default: 0)",
    )
    parser.add_argument(
        "--max-shift",
        type=float,
        default=0.0,
        metavar="PX",
        help="origins uniform in [-PX, PX] along x and y (default: 0, centred)",
    )
    parser.add_argument(
        "--outliers", type=float, default=0.0, metavar="FRACTION", help="fraction of labelled outliers (default: 0)"
    )
    parser.add_argument(
        "--outlier-kinds",
        default="noise,decoy,broken,off_centre,ice",
        metavar="K1,K2",
        help="comma-separated outlier kinds, in equal shares (default: noise,decoy,broken,off_centre,ice)",
    )
    parser.add_argument(
        "--symmetry", default="C1", help="point group whose asymmetric unit the poses fill (default: C1)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same particles (default: 0)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder, new or empty (required)")


def _settings(args: argparse.Namespace):
    """The SimulationSettings of the options, validated (InvalidSetting names the field; the CLI, its option)."""
    from cryo_forum.streams.simulation import SimulationSettings

    if len(args.bfactor) > 2:
        raise CryoForumError(f"--bfactor: give one value or MIN MAX, got {len(args.bfactor)} values")
    settings = SimulationSettings(
        n=args.n,
        snr=args.snr,
        ctf=args.ctf,
        defocus_range=tuple(args.defocus_range),
        astigmatism=args.astigmatism,
        voltage=args.voltage,
        cs=args.cs,
        amplitude_contrast=args.amplitude_contrast,
        bfactor=tuple(args.bfactor) if len(args.bfactor) == 2 else args.bfactor[0],
        max_shift_px=args.max_shift,
        outlier_fraction=args.outliers,
        outlier_kinds=tuple(kind.strip() for kind in args.outlier_kinds.split(",") if kind.strip()),
        symmetry=args.symmetry,
        seed=args.seed,
    )
    settings.validate()
    return settings


def main(args: argparse.Namespace) -> int:
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.maps import load_volume
    from cryo_forum.streams.simulation import require_resources, write_simulation

    settings = _settings(args)
    if not args.volume.is_file():
        raise CryoForumError(f"{args.volume}: file not found")
    OutputGuard().protect(args.volume).check_folder(args.out)
    require_resources(settings, args.box_size, args.out)  # before the map is resampled into the box
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume, pixel_size = load_volume(args.volume, pixel_size=args.apix, size=args.box_size)
    for warning in caught:
        log.warning(str(warning.message))
    log.info(f"map: {args.volume} at {pixel_size:.3f} A/px in a {args.box_size}^3 box")
    options = asdict(settings)
    n = options.pop("n")
    write_simulation(args.out, volume, pixel_size, n, progress=True, inputs=(args.volume,), **options)
    print(f"wrote {n} particles to {args.out}/")
    return 0
