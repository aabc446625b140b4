"""Realistic benchmark: the job users bring. Train on a consensus refinement, predict the particles it never aligned.

The data set is a simulated refinement job (cryo_forum.streams.job, built as data_prep/simulate_job.py builds it):
4000 particles of PDB 5J0N at 64 px and 4.58 A/px (extracted at 128 px and Fourier-cropped), SNR 0.1 with
coloured noise, preferred views, three optics groups, 20 % junk of kinds the training stream never simulates
(aggregates, carbon edges, another protein, empty picks). consensus.star holds 2400 of them with the poses a
refinement gives (1.5 deg RMS off, junk unflagged), rest.star the other 1600, picked but never aligned.

  python bench/realistic.py                      # builds bench/results/realistic/job once, then trains and predicts
  python bench/realistic.py --quick              # a tiny job and 2 epochs: a smoke test
  python bench/realistic.py --extra --epochs 50  # further `cryo-forum train` options (last on the line)

It runs, exactly as a user would, `cryo-forum train --star job/consensus.star --out run` with the default settings
(plus --extra), `cryo-forum predict --model run --star job/rest.star --out predicted_refined.star` (refined against
the run's reference, the default) and the same with --no-refine (the network alone), each timed, and measures the
rest against job/truth.star: pose errors of its true particles (median, mean, % within 5 and 10 deg, % within
their calibrated 90 % bound), the error of predicted origins (when predict writes them) and the junk AUROC per
kind of every score predict writes (_cfExpectedErrorDeg and any junk score). Writes result.json and
realistic.png into the results folder and prints a table for the README. The job is reused when its job.json
records the same settings and maps (path and sha256); each invocation trains a fresh run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _maps import add_volume_option, map_record

from cryo_forum.io.maps import benchmark_map_path, example_map_path
from cryo_forum.streams.job import JUNK_KINDS, RECORD_NAME, JobSettings

ROOT = Path(__file__).resolve().parents[1]
QUICK_JOB = dict(n=240, n_consensus=160, box=32, extract_box=64, pixel_size=9.16, particles_per_micrograph=20)
QUICK_TRAINING = ["--epochs", "2"]
SCORE_COLUMNS = ("cfExpectedErrorDeg",)  # always reported; columns naming junk are found in the predictions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_volume_option(parser, benchmark_map_path(), "the package's 5J0N map")
    parser.add_argument(
        "--other-volume",
        type=Path,
        default=example_map_path(),
        metavar="MAP",
        help="map or atomic model of the other protein junk (default: the package's PDB 1A28 chain A map)",
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/realistic (realistic_quick with --quick)")
    parser.add_argument("--n", type=int, help="particles in all (default 4000; 240 with --quick)")
    parser.add_argument("--n-consensus", type=int, help="particles of the consensus (default 2400; 160 with --quick)")
    parser.add_argument("--snr", type=float, default=JobSettings.snr, help="SNR at 64 px (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny job (32 px) and 2 epochs: a smoke test")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `cryo-forum train` options")
    return parser.parse_args(argv)


def job_settings(args: argparse.Namespace) -> JobSettings:
    fields = {"snr": args.snr, "seed": args.seed} | (QUICK_JOB if args.quick else {})
    fields |= {name: value for name, value in (("n", args.n), ("n_consensus", args.n_consensus)) if value}
    return JobSettings(**fields)


def build_or_reuse(folder: Path, volume: Path, other: Path, settings: JobSettings) -> float:
    """The job in ``folder``: reused when it was made with these settings and maps, else built; seconds taken."""
    from cryo_forum.streams.job import write_job_from_files

    record = folder / RECORD_NAME
    if record.exists():
        saved = json.loads(record.read_text())
        same_maps = [saved["maps"][name]["sha256"] for name in ("map", "other_map")] == [
            map_record(path)["sha256"] for path in (volume, other)
        ]
        if JobSettings(**saved["settings"]) != settings or not same_maps:
            raise SystemExit(f"{folder} holds a job of other settings or maps: delete it or choose another --out")
        return 0.0
    started = time.perf_counter()
    write_job_from_files(folder, volume, other, settings, progress=True)
    return time.perf_counter() - started


def run_command(command: list[str]) -> float:
    """Run a cryo-forum command as the command line does; seconds taken."""
    from cryo_forum.cli import main as cli

    started = time.perf_counter()
    if cli(command) != 0:
        raise SystemExit(f"`cryo-forum {' '.join(command)}` failed")
    return time.perf_counter() - started


def fresh_run_folder(run: Path) -> Path:
    """``run`` emptied of an earlier invocation's run (a folder with config.yaml), so training starts afresh."""
    if run.exists():
        if not (run / "config.yaml").exists():
            raise SystemExit(f"{run} exists and is not a cryo-forum run: delete it or choose another --out")
        shutil.rmtree(run)
    return run


def junk_score_columns(columns) -> list[str]:
    """The uncertainty columns to rank junk by: the default one and any whose name says junk."""
    found = [column for column in columns if "junk" in column.lower()]
    return [column for column in SCORE_COLUMNS if column in columns] + found


def junk_aurocs(scores: np.ndarray, kinds: np.ndarray) -> dict[str, float | None]:
    """AUROC of scores [N] (larger = junk) for all junk and for each kind against the true particles (None when
    a kind is absent)."""
    from cryo_forum.analysis.evaluate import auroc

    inlier = kinds == "none"
    aurocs = {"all junk": auroc(scores, ~inlier)}
    for kind in JUNK_KINDS:
        chosen = inlier | (kinds == kind)
        aurocs[kind] = auroc(scores[chosen], kinds[chosen] == kind)
    return {name: None if np.isnan(value) else value for name, value in aurocs.items()}


def measure(predicted_star: Path, truth_star: Path) -> tuple[dict, dict]:
    """Figures of the predicted rest against the truth, and the arrays the plot shows."""
    from cryo_forum import geometry
    from cryo_forum.analysis.evaluate import pair_by_image_name
    from cryo_forum.io import star
    from cryo_forum.io.particles import ParticleSet

    predicted, truth = ParticleSet.open(predicted_star), ParticleSet.open(truth_star)
    matching = pair_by_image_name(predicted, truth)
    if matching.pred_unmatched:
        raise SystemExit(f"{matching.pred_unmatched} predicted particles are not in {truth_star}")
    pred_rows, truth_rows = matching.pred_rows, matching.truth_rows
    kinds = truth.table[star.OUTLIER_KIND].to_numpy()[truth_rows]
    inlier = kinds == "none"
    errors = np.degrees(geometry.geodesic_distance(predicted.quaternions()[pred_rows], truth.quaternions()[truth_rows]))
    figures = {
        "rest_particles": len(pred_rows),
        "rest_true_particles": int(inlier.sum()),
        "median_deg": float(np.median(errors[inlier])),
        "mean_deg": float(np.mean(errors[inlier])),
        "within_5_deg_percent": float(100 * np.mean(errors[inlier] <= 5)),
        "within_10_deg_percent": float(100 * np.mean(errors[inlier] <= 10)),
    }
    has_origins = any(column in predicted.table for column in (star.ORIGIN_X_ANGST, star.ORIGIN_X))
    if has_origins:
        shifts = np.linalg.norm(predicted.shifts_px()[pred_rows] - truth.shifts_px()[truth_rows], axis=1)
        figures["shift_error_px"] = float(np.median(shifts[inlier]))
    else:
        figures["shift_error_px"] = "not written"
    bound = next((column for column in (star.REFINED_BOUND, star.ERROR_BOUND) if column in predicted.table), None)
    if bound is not None:  # the written poses' calibrated 90 % bound: the fraction of true particles within it
        bounds = predicted.table[bound].to_numpy(np.float64)[pred_rows]
        figures["within_90_bound_percent"] = float(100 * np.mean(errors[inlier] <= bounds[inlier]))
        figures["bound_column"] = bound
    columns = junk_score_columns(predicted.table.columns)
    scores = {column: predicted.table[column].to_numpy(np.float64)[pred_rows] for column in columns}
    figures["auroc"] = {column: junk_aurocs(values, kinds) for column, values in scores.items()}
    return figures, {"errors": errors[inlier], "kinds": kinds, "scores": scores}


def plot(arrays: dict, network_errors: np.ndarray, path: Path, title: str) -> None:
    """Error CDFs of the rest's true particles (refined and network alone) and, per score of the refined
    predictions, its distribution for particles and each junk kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryo_forum.analysis.plots import save_png

    scores = arrays["scores"]
    figure, axes = plt.subplots(1, 1 + len(scores), figsize=(5 * (1 + len(scores)), 4))
    axes = np.atleast_1d(axes)
    for label, values in (("network + refine", arrays["errors"]), ("network alone", network_errors)):
        errors = np.sort(values)
        axes[0].plot(errors, np.arange(1, len(errors) + 1) / len(errors), label=label)
    axes[0].legend(fontsize=8)
    for limit in (5, 10):
        axes[0].axvline(limit, color="grey", linestyle=":")
    axes[0].set(xscale="log", xlim=(0.3, 180), ylim=(0, 1), xlabel="pose error (deg)", ylabel="fraction of particles")
    axes[0].set_title("rest: true particles", fontsize=10)
    kinds = ("none", *JUNK_KINDS)
    for axis, (column, values) in zip(axes[1:], scores.items(), strict=True):
        groups = [values[arrays["kinds"] == kind] for kind in kinds]
        axis.boxplot(groups, showfliers=False)
        axis.set_xticks(range(1, len(kinds) + 1), ["particle", *JUNK_KINDS], rotation=20, fontsize=8)
        axis.set(ylabel=column)
        axis.set_title(f"rest: {column} by kind", fontsize=10)
    figure.suptitle(title, fontsize=11)
    save_png(figure, path)


def table(result: dict) -> str:
    """The README's lines for this result: a header and, for the network alone and refined, a row per score."""
    names = ("all junk", *JUNK_KINDS)
    header = ["prediction", "training / prediction", "median", "mean", "within 5 / 10 deg", "shift error", "score"]
    header += [f"AUROC {name}" for name in names]
    rows = []
    for label, figures in (("network alone", result["network_alone"]), ("network + refine", result)):
        shift = figures["shift_error_px"]
        shift = f"{shift:.2f} px" if isinstance(shift, float) else shift
        for column, aurocs in figures["auroc"].items():
            cells = [
                label,
                f"{result['train_seconds']:.0f} s / {figures['predict_seconds']:.0f} s",
                f"**{figures['median_deg']:.1f} deg**",
                f"{figures['mean_deg']:.1f} deg",
                f"{figures['within_5_deg_percent']:.0f} / {figures['within_10_deg_percent']:.0f} %",
                shift,
                f"`{column}`",
            ]
            cells += ["-" if aurocs[name] is None else f"{aurocs[name]:.3f}" for name in names]
            rows.append(cells)
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or ROOT / "bench" / "results" / ("realistic_quick" if args.quick else "realistic")
    out.mkdir(parents=True, exist_ok=True)
    settings = job_settings(args)
    folder = out / "job"
    build_seconds = build_or_reuse(folder, args.volume, args.other_volume, settings)
    run = fresh_run_folder(out / "run")
    extra = (QUICK_TRAINING if args.quick and "--epochs" not in args.extra else []) + args.extra
    train_seconds = run_command(["train", "--star", str(folder / "consensus.star"), "--out", str(run), *extra])
    timings, measured = {}, {}
    for name, options in (("network", ["--no-refine"]), ("refined", [])):
        predicted = out / f"predicted_{name}.star"
        predicted.unlink(missing_ok=True)
        command = ["predict", "--model", str(run), "--star", str(folder / "rest.star"), "--out", str(predicted)]
        timings[name] = run_command(command + options)
        measured[name] = measure(predicted, folder / "truth.star")
    figures, arrays = measured["refined"]
    job_record = json.loads((folder / RECORD_NAME).read_text())
    result = {
        **figures,
        "train_seconds": round(train_seconds, 1),
        "predict_seconds": round(timings["refined"], 1),
        "network_alone": {**measured["network"][0], "predict_seconds": round(timings["network"], 1)},
        "job_build_seconds": round(build_seconds, 1) if build_seconds else "reused",
        "train_options": extra,
        "job": dataclasses.asdict(settings),
        "job_counts": job_record["counts"],
        "maps": job_record["maps"],
        "command": "python bench/realistic.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    title = f"{args.volume.stem}: {settings.n_consensus} consensus -> {settings.n - settings.n_consensus} rest"
    plot(
        arrays,
        measured["network"][1]["errors"],
        out / "realistic.png",
        f"{title}, {settings.box} px, SNR {settings.snr:g}",
    )
    print(json.dumps(result, indent=2))
    print()
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
