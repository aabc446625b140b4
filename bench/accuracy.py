"""Accuracy benchmark: train on fresh particles simulated from 5j0n, test on held-out simulated particles.

One command per noise level; writes bench/results/accuracy_snr<S>/ (run folder, test set, predictions,
result.json, errors.png) and prints the figures for the README:

  python bench/accuracy.py --snr 1
  python bench/accuracy.py --snr 0.1

The test set (1000 particles, 64 px at 4.58 A/px, CTF, defocus 1-2.5 um, 10 % labelled outliers) is simulated
with a seed the training never uses; errors are reported on its inliers. The map is the package's copy of PDB
5J0N (cryo_forum/data/5j0n.mrc, 3.67 A/px; provenance and licence in cryo_forum/data/README.md); --volume takes
another map or an atomic model. result.json and test/map.json record the map's path and sha256; a test set or run
kept from an earlier invocation is reused only with the same map.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _maps import add_volume_option, check_recorded_map, map_record, record_map, same_map

from cryo_forum.io.maps import benchmark_map_path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MAP = benchmark_map_path()
TEST_SEED = 9001
APIX = 4.58
SIZE = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snr", type=float, required=True)
    add_volume_option(parser, DEFAULT_MAP, "the package's 5J0N map")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--particles-per-epoch", type=int, default=6400)
    parser.add_argument("--encoder", default="small")
    parser.add_argument("--head", default="qcqp")
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="default: bench/results/accuracy_snr<S>")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `cryo-forum train` options")
    return parser.parse_args(argv)


def simulate_test_set(volume: Path, snr: float, n: int, folder: Path) -> Path:
    """The held-out test set of one noise level (simulated once, reused by every method); its STAR file."""
    from cryo_forum.cli import main as cli

    star = folder / "particles.star"
    if star.exists():
        check_recorded_map(folder, volume)
        return star
    command = ["simulate", "--volume", str(volume), "--n", str(n), "--box-size", str(SIZE), "--apix", str(APIX)]
    command += ["--snr", str(snr), "--ctf", "--outliers", "0.1", "--seed", str(TEST_SEED), "--out", str(folder)]
    if cli(command) != 0:
        raise SystemExit(f"simulating the test set into {folder} failed")
    record_map(folder, volume)
    return star


def train_from_map(volume: Path, snr: float, run: Path, epochs: int, per_epoch: int, options: list[str]) -> float:
    """Train (or resume) a run on fresh particles from the map at this noise level; seconds taken."""
    from cryo_forum.cli import main as cli

    command = ["train", "--volume", str(volume), "--apix", str(APIX), "--image-size", str(SIZE), "--snr", str(snr)]
    command += ["--ctf", "--outliers", "0.1", "--epochs", str(epochs), "--particles-per-epoch", str(per_epoch)]
    command += ["--out", str(run), *options]
    if (run / "config.yaml").exists():
        check_run_map(run, volume)
        command = ["train", "--resume", "--out", str(run), "--epochs", str(epochs)]
    started = time.perf_counter()
    if cli(command) != 0:
        raise SystemExit(f"training {run} failed")
    return time.perf_counter() - started


def check_run_map(run: Path, volume: Path) -> None:
    """Stop unless the run kept in ``run`` trains from ``volume`` (the same bytes), so resuming it is the same run."""
    from cryo_forum.training.config import TrainingConfig

    config = TrainingConfig.load(run / "config.yaml")
    trained_from = config.data.volume if config.mode == "map" else None
    if trained_from is None or not same_map(Path(trained_from), volume):
        raise SystemExit(f"{run} trains from {trained_from}, not from {volume}: delete it or choose another --out")


def predict(run: Path, test_star: Path, predicted: Path) -> float:
    """Predict the test set with a run into ``predicted`` (replacing it); seconds taken."""
    from cryo_forum.cli import main as cli

    predicted.unlink(missing_ok=True)
    started = time.perf_counter()
    if cli(["predict", "--model", str(run), "--star", str(test_star), "--out", str(predicted)]) != 0:
        raise SystemExit(f"predicting {test_star} with {run} failed")
    return time.perf_counter() - started


def inlier_errors_deg(predicted: Path, test_star: Path) -> np.ndarray:
    """Angular errors in degrees of the predicted poses of the test set's inliers (labelled outliers left out)."""
    from cryo_forum import geometry
    from cryo_forum.io.particles import ParticleSet
    from cryo_forum.io.star import OUTLIER

    truth = ParticleSet.open(test_star)
    prediction = ParticleSet.open(predicted)
    inlier = truth.table[OUTLIER].to_numpy() == 0
    return np.degrees(geometry.geodesic_distance(prediction.quaternions(), truth.quaternions()))[inlier]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cryo_forum.analysis.plots import error_histogram

    out = args.out or ROOT / "bench" / "results" / f"accuracy_snr{args.snr:g}"
    out.mkdir(parents=True, exist_ok=True)
    test_star = simulate_test_set(args.volume, args.snr, args.n_test, out / "test")
    run = out / "run"
    options = ["--encoder", args.encoder, "--head", args.head, *args.extra]
    train_seconds = train_from_map(args.volume, args.snr, run, args.epochs, args.particles_per_epoch, options)
    predicted = out / "predicted.star"
    predict_seconds = predict(run, test_star, predicted)
    errors = inlier_errors_deg(predicted, test_star)
    result = {
        "snr": args.snr,
        "n_test_inliers": len(errors),
        "median_deg": float(np.median(errors)),
        "mean_deg": float(np.mean(errors)),
        "p90_deg": float(np.percentile(errors, 90)),
        "train_seconds": round(train_seconds, 1),
        "predict_seconds": round(predict_seconds, 1),
        "epochs": args.epochs,
        "particles_per_epoch": args.particles_per_epoch,
        "encoder": args.encoder,
        "head": args.head,
        "map": map_record(args.volume),
        "command": "python bench/accuracy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"{args.volume.stem}, 64 px, CTF, SNR {args.snr:g}: held-out inliers"
    error_histogram(errors, out / "errors.png", title=title)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
