"""Build a 5j0n benchmark data set: 64 px at 4.58 A/px, CTF, 10 % labelled outliers, 5000 particles.

The map is the package's copy of PDB entry 5J0N (src/cryo_forum/data/5j0n.mrc, 3.67 A/px; provenance and licence
in src/cryo_forum/data/README.md), resampled to 4.58 A/px in a 64^3 box; --volume takes another map or an atomic
model. The named data sets (same poses, defoci and outliers in both: same seed):
  python data_prep/simulate_5j0n.py --snr 1 --out data/5j0n_snr1
  python data_prep/simulate_5j0n.py --snr 0.1 --out data/5j0n_snr0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryo_forum import cli
from cryo_forum.io.maps import benchmark_map_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snr", type=float, required=True, help="var(signal) / var(noise), e.g. 1 or 0.1")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/5j0n_snr1")
    parser.add_argument("--n", type=int, default=5000, help="number of particles (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--volume",
        type=Path,
        default=benchmark_map_path(),
        metavar="MAP",
        help="map (.mrc, .map) or atomic model (.pdb, .cif) to simulate from "
        "(default: the package's 5J0N map, %(default)s)",
    )
    args = parser.parse_args(argv)
    command = ["simulate", "--volume", str(args.volume), "--n", str(args.n), "--box-size", "64", "--apix", "4.58"]
    command += ["--snr", str(args.snr), "--ctf", "--defocus-range", "10000", "25000", "--outliers", "0.1"]
    return cli.main([*command, "--seed", str(args.seed), "--out", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
