"""Build a simulated refinement job, the data users bring: a consensus refinement of part of a data set (poses a
refinement would give, junk unflagged) and the rest of the particles, picked but never aligned.

The default job: 4000 particles of PDB 5J0N (the package's src/cryo_forum/data/5j0n.mrc), extracted at 128 px and
2.29 A/px and Fourier-cropped to 64 px at 4.58 A/px, SNR 0.1 at 64 px with coloured noise, 65 % of the particles
in 3 clusters of views, origins of sigma 2 px, defocus 0.8-3 um, 3 optics groups (300 kV Cs 2.7, 300 kV Cs 0.01,
200 kV Cs 2.7), 20 % junk in equal shares (aggregates, carbon edges, another protein - the package's PDB 1A28
chain A map - and empty picks), 80 stacks of 50 particles. 2400 particles are in consensus.star, the other 1600 in
rest.star; truth.star says everything. See cryo_forum.streams.job for every setting.

  python data_prep/simulate_job.py --out data/job_5j0n
  python data_prep/simulate_job.py --out data/job_mine --volume my_map.mrc --other-volume contaminant.pdb --snr 0.05
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from cryo_forum.errors import CryoForumError
from cryo_forum.io.maps import benchmark_map_path, example_map_path
from cryo_forum.streams.job import RECORD_NAME, JobSettings, write_job_from_files

DEFAULTS = JobSettings()


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """The job's main knobs, defaults those of :class:`JobSettings`."""
    options = [
        ("--n", "n", int, "particles in all"),
        ("--n-consensus", "n_consensus", int, "particles of the consensus refinement"),
        ("--snr", "snr", float, "var(signal) / var(noise) at the working size"),
        ("--box", "box", int, "working box in px (written)"),
        ("--extract-box", "extract_box", int, "extraction box in px (rendered, then Fourier-cropped)"),
        ("--apix", "pixel_size", float, "working pixel size in A"),
        ("--junk", "junk_fraction", float, "fraction of junk"),
        ("--clusters", "view_clusters", int, "clusters of preferred views"),
        ("--clustered", "clustered_fraction", float, "fraction of the particles in the clusters"),
        ("--concentration", "cluster_concentration", float, "von Mises-Fisher concentration of a cluster"),
        ("--origin-sigma", "origin_sigma_px", float, "standard deviation of the origins in working px"),
        ("--pose-error", "consensus_pose_error_deg", float, "RMS error of the consensus poses in deg"),
        ("--per-micrograph", "particles_per_micrograph", int, "particles per micrograph (and stack)"),
        ("--seed", "seed", int, "seed of everything"),
    ]
    for option, field, kind, text in options:
        default = getattr(DEFAULTS, field)
        parser.add_argument(option, dest=field, type=kind, default=default, help=f"{text} (default: {default})")


def settings_from(args: argparse.Namespace) -> JobSettings:
    fields = {name: getattr(args, name) for name in JobSettings.__dataclass_fields__ if hasattr(args, name)}
    return JobSettings(**fields)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder (new or empty), e.g. data/job_5j0n")
    parser.add_argument(
        "--volume",
        type=Path,
        default=benchmark_map_path(),
        metavar="MAP",
        help="map (.mrc) or atomic model (.pdb, .cif) of the particles "
        f"(default: the package's 5J0N map, {benchmark_map_path()})",
    )
    parser.add_argument(
        "--other-volume",
        type=Path,
        default=example_map_path(),
        metavar="MAP",
        help="map or atomic model of the other protein junk (default: the package's PDB 1A28 chain A map)",
    )
    add_job_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        out = write_job_from_files(args.out, args.volume, args.other_volume, settings_from(args), progress=True)
    except CryoForumError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    counts = json.loads((out / RECORD_NAME).read_text())["counts"]
    print(f"job written to {out} in {time.perf_counter() - started:.0f} s")
    for part in ("consensus", "rest"):
        print(f"  {part}: " + ", ".join(f"{count} {kind}" for kind, count in counts[part].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
