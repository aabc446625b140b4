"""The design-choice study: every encoder design choice varied one at a time from the defaults, at an equal
wall-clock budget and several seeds, on the 5J0N benchmark at SNR 0.1.

  python bench/design_choices.py                  # every choice, 3 seeds, 90 s of training each (~1.8 h on 2 cores)
  python bench/design_choices.py --choices head   # the default and the other heads only
  python bench/design_choices.py --quick          # a smoke test: 32 px, one short epoch, 2 seeds

Each choice's epochs are what fits the budget at the seconds its epochs take (a 2-epoch probe run, timed on its
last epoch), so every run then trains that fixed length with its full learning-rate decay. Runs train on fresh
particles simulated from the map (64 px at 4.58 A/px, CTF, 10 % labelled outliers) and are tested on the
accuracy benchmark's held-out set of that SNR (its inliers). Writes result.json (every run, and per choice the
mean and spread over seeds with a verdict against the default) and design_choices.png (error against seconds
per epoch) into bench/results/design_choices; run folders stay in runs/, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _maps import add_volume_option, map_record

from cryo_forum.io.maps import benchmark_map_path

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_volume_option(parser, benchmark_map_path(), "the package's 5J0N map")
    parser.add_argument("--snr", type=float, default=0.1)
    parser.add_argument("--budget", type=float, default=90.0, help="seconds of training per run (default %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per choice (default %(default)s)")
    parser.add_argument("--choices", nargs="+", metavar="NAME", help="choices or factors to compare with the default")
    parser.add_argument("--particles-per-epoch", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="32 px, one epoch of 128 particles, 2 seeds, 64 tested")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "design_choices")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cryo_forum.analysis import design_study

    size, seeds, n_test = (32, 2, 64) if args.quick else (SIZE, args.seeds, args.n_test)
    base = {**design_study.BENCHMARK, "volume": str(args.volume), "snr": args.snr}
    quick = {"particles_per_epoch": 128, "n_val": 32}
    base |= quick if args.quick else {"particles_per_epoch": args.particles_per_epoch}
    base |= {"image_size": size, "apix": base["apix"] * SIZE / size}
    settings = design_study.StudySettings(
        base=base,
        seeds=tuple(range(seeds)),
        budget_seconds=None if args.quick else args.budget,
        epochs=1 if args.quick else None,
    )
    try:
        study = design_study.select(args.choices, design_study.default_choices())
    except ValueError as error:
        raise SystemExit(f"--choices: {error}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    test_folder = args.out / ("test_quick" if args.quick else "test")
    test_set = design_study.simulate_test_set(args.volume, base, n_test, test_folder)

    def report(record: dict) -> None:
        print(
            f"{record['choice']:>28} seed {record['seed']}: {record['epochs']} epochs, "
            f"median {record['median_deg']:.1f} deg, {record['seconds_per_epoch']:.1f} s/epoch",
            flush=True,
        )

    records = design_study.run_study(study, settings, args.out, test_set, report)
    rows = design_study.summarise(records)
    title = f"{args.volume.stem}, {size} px, SNR {args.snr:g}: " + (
        "quick smoke test" if args.quick else f"{args.budget:g} s of training per run, {seeds} seeds"
    )
    design_study.study_figure(rows, args.out / "design_choices.png", title)
    result = {
        "command": "python bench/design_choices.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "map": map_record(args.volume),
        "snr": args.snr,
        "image_size": size,
        "budget_seconds": settings.budget_seconds,
        "seeds": seeds,
        "n_test": n_test,
        "choices": rows,
        "runs": records,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(
            f"{row['choice']:>28}: median {row['median_deg']:5.1f} +- {row['median_spread']:4.1f} deg, "
            f"within 5 deg {row['within_5_percent']:4.1f} %, {row['seconds_per_epoch']:5.1f} s/epoch, "
            f"{row['epochs']:3d} epochs  {row['verdict']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
