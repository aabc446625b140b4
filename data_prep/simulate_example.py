"""Build a data set from the built-in example map (PDB 1A28 chain A): 48 px at 2 A/px, CTF, 10 % outliers.

Needs nothing beside the package, so it is the data set for quick runs and CI-sized benchmarks (--volume takes
another map or an atomic model, simulated with the same settings):
  python data_prep/simulate_example.py --snr 1 --out data/example_snr1
  python data_prep/simulate_example.py --snr 0.1 --out data/example_snr0.1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cryo_forum import cli
from cryo_forum.io.maps import example_map_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snr", type=float, required=True, help="var(signal) / var(noise), e.g. 1 or 0.1")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/example_snr1")
    parser.add_argument("--n", type=int, default=2000, help="number of particles (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--volume",
        type=Path,
        default=example_map_path(),
        metavar="MAP",
        help="map (.mrc, .map) or atomic model (.pdb, .cif) to simulate from "
        "(default: the built-in example map, %(default)s)",
    )
    args = parser.parse_args(argv)
    command = ["simulate", "--volume", str(args.volume), "--n", str(args.n), "--box-size", "48", "--apix", "2"]
    command += ["--snr", str(args.snr), "--ctf", "--defocus-range", "8000", "20000", "--outliers", "0.1"]
    return cli.main([*command, "--seed", str(args.seed), "--out", str(args.out)])


if __name__ == "__main__":
    sys.exit(main())
