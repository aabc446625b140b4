"""Run the whole pipeline on the built-in example (PDB 1A28 chain A) and summarise it.

Each step is the cryo-forum command a user would run, in order:
  1. simulate  particles with CTF, noise and 10 % labelled outliers from the shipped map
  2. train     an estimator on fresh particles simulated from the map (it never sees the particles of step 1)
  3. predict   pose and uncertainty of every particle of step 1
  4. filter    with the threshold calibrated on the run's validation particles
  5. reconstruct half maps from all particles, from the kept ones and from the true poses (FSC 0.143)
  6. evaluate  the predictions against the truth
It ends with a table (median and mean error, outlier AUROC, the three FSC resolutions) and the plots' paths.
Everything goes into OUT; the default settings take a few minutes on two CPU cores.

Example:
  cryo-forum demo --out demo_out
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from cryo_forum.errors import CryoForumError

STEPS = 6
log = logging.getLogger("cryo_forum")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (new or empty)")
    parser.add_argument("--n", type=int, default=2000, help="particles to simulate (default: 2000)")
    parser.add_argument("--snr", type=float, default=1.0, help="signal-to-noise ratio (default: 1)")
    parser.add_argument("--epochs", type=int, default=80, help="training epochs (default: 80)")
    parser.add_argument(
        "--particles-per-epoch", type=int, default=6400, help="fresh training particles per epoch (default: 6400)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the simulation and training (default: 0)")


def _run(step: int, title: str, argv: list[str]) -> None:
    from cryo_forum.cli import main as cli

    log.info(f"\n[{step}/{STEPS}] {title}\n  cryo-forum {' '.join(argv)}")
    if cli(argv) != 0:
        raise CryoForumError(f"step {step} ({title}) failed; see the message above")


def _resolution(fsc_folder: Path) -> float:
    return json.loads((fsc_folder / "fsc.json").read_text())["resolution"]["0.143"]["angstrom"]


def main(args: argparse.Namespace) -> int:
    from cryo_forum.io.guard import OutputGuard
    from cryo_forum.io.maps import example_map_path

    if args.n < 20 or args.epochs < 1:
        raise CryoForumError("--n must be at least 20 and --epochs at least 1")
    OutputGuard().check_folder(args.out)
    started = time.perf_counter()
    out, example = args.out, str(example_map_path())
    data, run = out / "particles", out / "run"
    common = ["--snr", str(args.snr), "--outliers", "0.1", "--seed", str(args.seed)]
    _run(
        1,
        "simulate particles from the built-in map",
        [
            "simulate",
            "--volume",
            example,
            "--n",
            str(args.n),
            "--box-size",
            "48",
            "--max-shift",
            "2",
            "--defocus-range",
            "8000",
            "20000",
            *common,
            "--out",
            str(data),
        ],
    )
    _run(
        2,
        "train on fresh particles simulated from the map",
        [
            "train",
            "--volume",
            example,
            "--image-size",
            "48",
            "--epochs",
            str(args.epochs),
            "--particles-per-epoch",
            str(args.particles_per_epoch),
            "--n-val",
            "400",
            "--n-test",
            "0",
            "--defocus-range",
            "8000",
            "20000",
            "--max-shift",
            "2",
            *common,
            "--out",
            str(run),
        ],
    )
    _run(
        3,
        "predict every particle",
        ["predict", "--model", str(run), "--star", str(data / "particles.star"), "--out", str(out / "predicted.star")],
    )
    _run(
        4,
        "filter by uncertainty (threshold from the run's validation set)",
        ["filter", "--star", str(out / "predicted.star"), "--out", str(out / "kept.star"), "--model", str(run)],
    )
    maps = {
        "true poses": data / "particles.star",
        "all particles": out / "predicted.star",
        "kept particles": out / "kept.star",
    }
    names = {"true poses": "map_true", "all particles": "map_all", "kept particles": "map_kept"}
    for label, star_file in maps.items():
        _run(
            5,
            f"reconstruct half maps from the {label}",
            [
                "reconstruct",
                "--star",
                str(star_file),
                "--out",
                str(out / "maps" / f"{names[label]}.mrc"),
                "--half-maps",
            ],
        )
    _run(
        6,
        "evaluate against the truth",
        [
            "evaluate",
            "--pred",
            str(out / "predicted.star"),
            "--truth",
            str(data / "particles.star"),
            "--out",
            str(out / "report"),
            "--model",
            str(run),
            "--metric",
            "expected_error_deg",
        ],
    )

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    summary = {
        "n_particles": args.n,
        "snr": args.snr,
        "median_error_deg": metrics["median_deg"],
        "mean_error_deg": metrics["mean_deg"],
        "kept_median_error_deg": metrics.get("kept_median_deg"),
        "kept_mean_error_deg": metrics.get("kept_mean_deg"),
        "kept_fraction": metrics.get("kept_fraction"),
        "outlier_auroc": metrics.get("outlier_auroc"),
        "fsc_0143_angstrom": {label: _resolution(out / "maps" / f"{names[label]}_fsc") for label in maps},
        "seconds": round(time.perf_counter() - started, 1),
        "plots": sorted(str(path) for path in (out / "report").glob("*.png")),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(summary_table(summary))
    return 0


def summary_table(summary: dict) -> str:
    """The demo's closing table as text."""

    def number(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "",
        f"cryo-forum demo: {summary['n_particles']} particles of 1A28, SNR {summary['snr']:g}, 10 % outliers, "
        f"{summary['seconds']:.0f} s",
        f"  pose error, inliers:      median {number(summary['median_error_deg'])} deg, "
        f"mean {number(summary['mean_error_deg'])} deg",
        f"  after filtering:          median {number(summary['kept_median_error_deg'])} deg, "
        f"mean {number(summary['kept_mean_error_deg'])} deg, kept {number((summary['kept_fraction'] or 0) * 100, 0)} %",
        f"  outlier AUROC:            {number(summary['outlier_auroc'], 3)}",
        "  FSC 0.143 resolution:     "
        + ", ".join(f"{label} {value:.1f} A" for label, value in summary["fsc_0143_angstrom"].items()),
        "  plots:",
        *(f"    {path}" for path in summary["plots"]),
    ]
    return "\n".join(lines)
