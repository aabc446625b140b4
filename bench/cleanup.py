"""Clean-up benchmark: does filtering by uncertainty remove the junk and improve the 3-D map?

Uses the SNR 1 run and test set of the accuracy benchmark (run `python bench/accuracy.py --snr 1` first):
5j0n, 64 px at 4.58 A/px, CTF, 10 % labelled outliers. Predicts the test set, filters it with the threshold
calibrated on the run's own validation particles, reconstructs half maps from all predicted particles, from the
kept ones and from the true poses, evaluates, and writes bench/results/cleanup_snr1/result.json:

  python bench/cleanup.py

Targets (issue 4): outlier AUROC >= 0.9; mean error of the kept particles at most half the mean error before
filtering; the kept particles' map reaches a better FSC 0.143 resolution than all particles'.

It simulates nothing, so it takes no --volume: the map is the one bench/accuracy.py simulated the test set from
(its --volume), and result.json copies that map's record (path and sha256, from the test folder's map.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _maps import recorded_map

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = ROOT / "bench" / "results" / "accuracy_snr1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ACCURACY / "run")
    parser.add_argument("--test", type=Path, default=ACCURACY / "test" / "particles.star")
    parser.add_argument("--metric", default="expected_error_deg")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cleanup_snr1")
    args = parser.parse_args(argv)
    from cryo_forum.cli import main as cli
    from cryo_forum.training.config import TrainingConfig
    from cryo_forum.training.trainer import calibrate_on_validation

    started = time.perf_counter()
    if not (args.run / "calibration.json").exists():
        calibrate_on_validation(args.run, TrainingConfig.load(args.run / "config.yaml"))
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*.star"):
        stale.unlink()
    predicted, kept = work / "predicted.star", work / "kept.star"
    steps = [
        ["predict", "--model", str(args.run), "--star", str(args.test), "--out", str(predicted)],
        ["filter", "--star", str(predicted), "--out", str(kept), "--model", str(args.run), "--metric", args.metric],
        [
            "evaluate",
            "--pred",
            str(predicted),
            "--truth",
            str(args.test),
            "--out",
            str(args.out / "report"),
            "--model",
            str(args.run),
            "--metric",
            args.metric,
        ],
    ]
    maps = {"true": args.test, "all": predicted, "kept": kept}
    steps += [
        ["reconstruct", "--star", str(star_file), "--out", str(work / f"map_{name}.mrc"), "--half-maps"]
        for name, star_file in maps.items()
    ]
    for step in steps:
        if cli(step) != 0:
            return 1
    metrics = json.loads((args.out / "report" / "metrics.json").read_text())
    table = pd.read_csv(args.out / "report" / "errors.csv")
    resolution = {
        name: json.loads((work / f"map_{name}_fsc" / "fsc.json").read_text())["resolution"]["0.143"]["angstrom"]
        for name in maps
    }
    all_errors = table["error_deg"].to_numpy()
    kept_rows = table["kept"].to_numpy().astype(bool)
    result = {
        "metric": args.metric,
        "outlier_auroc": metrics["outlier_auroc"],
        "kept_fraction": metrics["kept_fraction"],
        "outliers_rejected_fraction": metrics["outliers_rejected_fraction"],
        "inliers_kept_fraction": metrics["inliers_kept_fraction"],
        "mean_deg_all_particles": float(np.mean(all_errors)),
        "mean_deg_kept_particles": float(np.mean(all_errors[kept_rows])),
        "median_deg_all_particles": float(np.median(all_errors)),
        "median_deg_kept_particles": float(np.median(all_errors[kept_rows])),
        "mean_deg_inliers": metrics["mean_deg"],
        "mean_deg_kept_inliers": metrics["kept_mean_deg"],
        "fsc_0143_angstrom": resolution,
        "map": recorded_map(args.test.parent),
        "seconds": round(time.perf_counter() - started, 1),
        "command": "python bench/cleanup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    result["targets_met"] = {
        "auroc_at_least_0.9": result["outlier_auroc"] >= 0.9,
        "kept_mean_at_most_half": result["mean_deg_kept_particles"] <= 0.5 * result["mean_deg_all_particles"],
        "kept_map_better_than_all": resolution["kept"] < resolution["all"],
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
