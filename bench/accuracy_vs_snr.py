"""Accuracy against noise: the four rotation heads and projection matching on the same held-out particles.

  python bench/accuracy_vs_snr.py

For each SNR (1, 0.1, 0.03, 0.01) one test set of 1000 particles is simulated from the map (default: the
package's 5J0N map, as in bench/accuracy.py; --volume for another map or an atomic model) at 64 px, 4.58 A/px, CTF,
10 % labelled outliers, with the same seed as bench/accuracy.py. Each head (qcqp, quaternion, 6d, 9d) trains on fresh
particles from the map at that SNR with the same budget (--epochs x --particles-per-epoch, default settings
otherwise) and predicts the test set; `cryo-forum match` searches the same test set against the map it was
simulated from (test/volume.mrc: the map boxed and centred as the simulation did). Errors are taken on the
inliers. The qcqp runs of bench/accuracy.py from the same map (same test sets, longer training), where present, are
drawn beside them and enter the target check at SNR 0.1 (best qcqp median / projection matching median).

Writes bench/results/accuracy_vs_snr/result.json (every figure and the map's path and sha256) and
accuracy_vs_snr.png; each (SNR, method) is kept in its own folder with its result.json, so an interrupted run
resumes where it stopped (with the same map only: each test folder records its map in map.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _maps import add_volume_option, map_record
from accuracy import DEFAULT_MAP, ROOT, inlier_errors_deg, predict, simulate_test_set, train_from_map

HEADS = ("qcqp", "quaternion", "6d", "9d")
METHODS = (*HEADS, "match")
SNRS = (1.0, 0.1, 0.03, 0.01)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snrs", type=float, nargs="+", default=list(SNRS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    add_volume_option(parser, DEFAULT_MAP, "the package's 5J0N map")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--particles-per-epoch", type=int, default=6400)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "accuracy_vs_snr")
    return parser.parse_args(argv)


def run_head(args: argparse.Namespace, head: str, snr: float, test_star: Path, folder: Path) -> dict:
    """Train one head at one SNR with the shared budget and measure it on the test set."""
    run = folder / "run"
    train_seconds = train_from_map(args.volume, snr, run, args.epochs, args.particles_per_epoch, ["--head", head])
    predicted = folder / "predicted.star"
    seconds = predict(run, test_star, predicted)
    return {"train_seconds": round(train_seconds, 1), "seconds": round(seconds, 2), "errors": predicted}


def run_match(test_star: Path, folder: Path) -> dict:
    """Projection matching of the test set against the map."""
    from cryo_forum.cli import main as cli

    predicted = folder / "predicted.star"
    predicted.unlink(missing_ok=True)
    started = time.perf_counter()
    volume = test_star.parent / "volume.mrc"  # the map exactly as the test particles were projected from it
    command = ["match", "--star", str(test_star), "--volume", str(volume), "--out", str(predicted)]
    if cli(command) != 0:
        raise SystemExit(f"projection matching of {test_star} failed")
    return {"seconds": round(time.perf_counter() - started, 2), "errors": predicted}


def measure(args: argparse.Namespace, method: str, snr: float, test_star: Path) -> dict:
    """One (method, SNR) entry, computed once and kept in its folder's result.json."""
    folder = args.out / f"snr{snr:g}" / method
    saved = folder / "result.json"
    if saved.exists():
        return json.loads(saved.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    entry = run_match(test_star, folder) if method == "match" else run_head(args, method, snr, test_star, folder)
    errors = inlier_errors_deg(entry.pop("errors"), test_star)
    entry.update(
        method=method,
        snr=snr,
        n_test_inliers=len(errors),
        median_deg=float(np.median(errors)),
        mean_deg=float(np.mean(errors)),
        p90_deg=float(np.percentile(errors, 90)),
        seconds_per_particle=entry["seconds"] / args.n_test,
    )
    if method != "match":
        entry.update(epochs=args.epochs, particles_per_epoch=args.particles_per_epoch)
    saved.write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def long_runs(sha256: str) -> list[dict]:
    """The qcqp runs of bench/accuracy.py from the map with this sha256 (same test sets, longer training).

    Results written before maps were recorded came from the 5J0N map, byte for byte the package's copy.
    """
    found = (
        json.loads(path.read_text()) for path in sorted((ROOT / "bench" / "results").glob("accuracy_snr*/result.json"))
    )
    default = {"sha256": map_record(DEFAULT_MAP)["sha256"]}
    same = (run for run in found if run["head"] == "qcqp" and run.get("map", default)["sha256"] == sha256)
    return sorted(same, key=lambda run: run["snr"])


def target_check(entries: list[dict], references: list[dict]) -> dict | None:
    """At SNR 0.1: the best qcqp median (this budget or a longer run) against projection matching's."""
    at = [e for e in entries if e["snr"] == 0.1]
    matching = next((e["median_deg"] for e in at if e["method"] == "match"), None)
    qcqp = [e["median_deg"] for e in [*at, *references] if e.get("method", e.get("head")) == "qcqp" and e["snr"] == 0.1]
    if matching is None or not qcqp:
        return None
    return {"snr": 0.1, "qcqp_median_deg": min(qcqp), "match_median_deg": matching, "ratio": min(qcqp) / matching}


def plot(entries: list[dict], references: list[dict], path: Path, name: str) -> None:
    """Median and mean error against SNR, one line per method; longer qcqp runs as separate markers."""
    from matplotlib.figure import Figure

    from cryo_forum.analysis.plots import save_png

    fig = Figure(figsize=(13, 4.2), dpi=100)
    axes = fig.subplots(1, 2)
    for method in METHODS:
        rows = sorted((e for e in entries if e["method"] == method), key=lambda e: e["snr"])
        if not rows:
            continue
        snr = [e["snr"] for e in rows]
        style = {"marker": "o", "linestyle": "--" if method == "match" else "-"}
        label = "projection matching" if method == "match" else f"{method} head"
        axes[0].plot(snr, [e["median_deg"] for e in rows], label=label, **style)
        axes[1].plot(snr, [e["mean_deg"] for e in rows], label=label, **style)
    if references:
        label = "qcqp head, longer training (bench/accuracy.py)"
        snr = [run["snr"] for run in references]
        axes[0].plot(snr, [run["median_deg"] for run in references], "*", color="tab:blue", markersize=12, label=label)
        axes[1].plot(snr, [run["mean_deg"] for run in references], "*", color="tab:blue", markersize=12, label=label)
    for axis, statistic in zip(axes, ("median", "mean"), strict=True):
        axis.set(xscale="log", yscale="log", xlabel="SNR", ylabel=f"{statistic} error on inliers (deg)")
        axis.grid(True, which="both", alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9)
    fig.suptitle(f"{name}, 64 px, CTF: held-out test particles")
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entries = []
    for snr in args.snrs:
        test_star = simulate_test_set(args.volume, snr, args.n_test, args.out / f"snr{snr:g}" / "test")
        for method in args.methods:
            entry = measure(args, method, snr, test_star)
            print(f"SNR {snr:g} {method}: median {entry['median_deg']:.2f} deg, mean {entry['mean_deg']:.2f} deg")
            entries.append(entry)
    volume = map_record(args.volume)
    references = long_runs(volume["sha256"])
    summary = {
        "command": "python bench/accuracy_vs_snr.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "map": volume,
        "entries": entries,
        "longer_qcqp_runs": references,
        "target_snr0.1_qcqp_over_match": target_check(entries, references),
    }
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(entries, references, args.out / "accuracy_vs_snr.png", args.volume.stem)
    print(json.dumps(summary["target_snr0.1_qcqp_over_match"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
