"""The 3-D comparison: the network alone, the network + local refinement, and global projection matching.

On one benchmark's particles with known poses, each method gives poses (and origins), and is judged as the field
does: median error, % within 5 and 10 deg, median origin error (px) and time per particle on the true
particles, and the gold-standard resolution (FSC 0.143 between half maps, masked) of the map reconstructed from
the true particles with the method's poses, against the map from their true poses.

  python bench/comparison.py realistic   # the realistic job: its consensus-trained run and rest.star
  python bench/comparison.py clean       # the clean 5J0N benchmark at SNR 1 (bench/accuracy.py's run and test set)

`realistic` uses bench/results/realistic/{job,run} (made by bench/realistic.py when missing) and the run's own
reference map for refinement and matching (the map a user has: the consensus set's reconstruction); matching
searches origins as far as predict does (3 x the consensus set's origin spread, on a 2 px grid that its local
stages refine). `clean` uses bench/results/accuracy_snr1/{run,test} (made by bench/accuracy.py when missing) and
the map the test set was simulated from; its particles are centred, so no origins are searched there. Both also
run `refine` on the particles with their angles removed ("global grid + local fit": the global grid of matching
finished by refinement's local fit, no network; for the realistic job its second search looks for origins as far
as matching does), which tells what the network saves beyond the local fit.

The first --n particles are compared. Every command runs in a process of its own, as a user runs it. Time per
particle is each command's marginal cost: every command also runs on the first --n-small particles, and
(t(n) - t(n_small)) / (n - n_small) leaves out what does not grow with the set (importing TensorFlow, compiling,
estimating the noise); the start-up is reported beside it, and so is the whole command's wall time over n. Each
size runs --repeats times and the fastest run counts: on a shared machine a start-up varies by a second or more,
which over n - n_small particles would otherwise swamp a cost of a millisecond or two per particle.
Writes result.json and comparison.png (median error against time per particle) into
bench/results/comparison_<benchmark>.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
MATCH_SHIFT_STEP_PX = 2.0  # the global grid's origin step; its local stages refine it to 0.25 px
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmark", choices=("realistic", "clean"))
    parser.add_argument("--n", type=int, default=1000, help="particles compared (default %(default)s)")
    parser.add_argument(
        "--n-small", type=int, default=200, help="particles of the second, timing-only run (default %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of every command at each size, the fastest counted (default 3)"
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/comparison_<benchmark>")
    return parser.parse_args(argv)


def cli(command: list[str]) -> float:
    """Run a cryo-forum command in a process of its own, as a user would; seconds taken (start-up included)."""
    started = time.perf_counter()
    launch = "import sys; from cryo_forum.cli import main; sys.exit(main(sys.argv[1:]))"
    if subprocess.run([sys.executable, "-c", launch, *command]).returncode != 0:
        raise SystemExit(f"`cryo-forum {' '.join(command)}` failed")
    return time.perf_counter() - started


def realistic_inputs() -> dict:
    """The realistic job's run, particles, truth, map and origin search reach (made when missing)."""
    folder = RESULTS / "realistic"
    if not (folder / "run" / "reference.mrc").exists():
        import realistic

        realistic.main([])
    from cryo_forum.io.particles import ParticleSet
    from cryo_forum.training.run import Run

    particles = ParticleSet.open(folder / "job" / "rest.star")
    reach = 3.0 * Run(folder / "run").load_origin_spread() / particles.pixel_size
    return {
        "run": folder / "run",
        "particles": folder / "job" / "rest.star",
        "truth": folder / "job" / "truth.star",
        "map": folder / "run" / "reference.mrc",
        "max_shift_px": float(np.ceil(reach)),
    }


def clean_inputs() -> dict:
    """The clean SNR 1 benchmark's run, test set and its map (made when missing)."""
    folder = RESULTS / "accuracy_snr1"
    if not (folder / "run" / "model.keras").exists() or not (folder / "test" / "particles.star").exists():
        import accuracy

        accuracy.main(["--snr", "1", "--epochs", "100", "--particles-per-epoch", "6400"])
    test = folder / "test" / "particles.star"
    return {"run": folder / "run", "particles": test, "truth": test, "map": folder / "test" / "volume.mrc"}


def subset(source: Path, truth: Path, n: int, out: Path) -> tuple[Path, Path]:
    """The first n particles of ``source`` and their truth, written as STAR files into ``out``."""
    from cryo_forum.analysis.evaluate import pair_by_image_name
    from cryo_forum.io.particles import ParticleSet

    particles, truths = ParticleSet.open(source), ParticleSet.open(truth)
    rows = np.arange(min(n, len(particles)))
    chosen = out / "particles.star"
    particles.subset(rows).write_star(chosen)
    matching = pair_by_image_name(ParticleSet.open(chosen), truths)
    truth_rows = matching.truth_rows[np.argsort(matching.pred_rows)]
    chosen_truth = out / "truth.star"
    truths.subset(truth_rows).write_star(chosen_truth)
    return chosen, chosen_truth


def true_particles(truth) -> np.ndarray:
    """Rows of the true particles (no junk, no labelled outlier) of a truth set."""
    from cryo_forum.io import star

    table = truth.table
    if star.OUTLIER_KIND in table:
        return np.flatnonzero(table[star.OUTLIER_KIND].to_numpy() == "none")
    if star.OUTLIER in table:
        return np.flatnonzero(table[star.OUTLIER].to_numpy() == 0)
    return np.arange(len(truth))


def resolution(star_file: Path, rows: np.ndarray, work: Path, name: str) -> float:
    """FSC 0.143 resolution (A) of the half maps of particles ``rows`` of ``star_file`` as they are posed there."""
    from cryo_forum.io.particles import ParticleSet

    kept = work / f"{name}_true_particles.star"
    kept.unlink(missing_ok=True)
    ParticleSet.open(star_file).subset(rows).write_star(kept)
    volume = work / f"map_{name}.mrc"
    cli(["reconstruct", "--star", str(kept), "--out", str(volume), "--half-maps"])
    fsc = json.loads((work / f"map_{name}_fsc" / "fsc.json").read_text())
    return float(fsc["resolution"]["0.143"]["angstrom"])


def figures(predicted: Path, truth_star: Path, rows: np.ndarray) -> dict:
    """Pose and origin errors of the true particles ``rows``."""
    from cryo_forum import geometry
    from cryo_forum.io import star
    from cryo_forum.io.particles import ParticleSet

    found, truth = ParticleSet.open(predicted), ParticleSet.open(truth_star)
    errors = np.degrees(geometry.geodesic_distance(found.quaternions()[rows], truth.quaternions()[rows]))
    result = {
        "median_deg": float(np.median(errors)),
        "mean_deg": float(np.mean(errors)),
        "within_5_deg_percent": float(100 * np.mean(errors <= 5)),
        "within_10_deg_percent": float(100 * np.mean(errors <= 10)),
    }
    if any(column in found.table for column in (star.ORIGIN_X_ANGST, star.ORIGIN_X)):
        shifts = np.hypot(*(found.shifts_px()[rows] - truth.shifts_px()[rows]).T)
        result["shift_error_px"] = float(np.median(shifts))
    return result


def fastest(command: list[str], out: Path, repeats: int) -> float:
    """The fastest of ``repeats`` runs of a command writing ``out`` (seconds); the last run's output is kept."""
    times = []
    for _ in range(repeats):
        out.unlink(missing_ok=True)
        times.append(cli([*command, "--out", str(out)]))
    return min(times)


def timing(seconds: float, seconds_small: float, count: int, count_small: int) -> dict:
    """Marginal milliseconds per particle, start-up seconds and whole-command milliseconds per particle."""
    marginal = (seconds - seconds_small) / (count - count_small)
    return {
        "ms_per_particle": 1e3 * marginal,
        "startup_seconds": seconds_small - marginal * count_small,
        "whole_command_ms_per_particle": 1e3 * seconds / count,
    }


def without_angles(source: Path, out: Path) -> Path:
    """A copy of a STAR file without its angles (and anything that says how sure they are)."""
    from cryo_forum.io import star
    from cryo_forum.io.star import read_star, write_star

    blocks = read_star(source)
    dropped = [*star.ANGLES, star.EXPECTED_ERROR, star.ERROR_BOUND]
    for name, block in blocks.items():
        if not isinstance(block, dict) and star.IMAGE_NAME in block:
            blocks[name] = block.drop(columns=[column for column in dropped if column in block])
    out.unlink(missing_ok=True)
    write_star(out, blocks)
    return out


def plot(methods: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cryo_forum.analysis.plots import save_png

    figure, axis = plt.subplots(figsize=(5, 4))
    for name, result in methods.items():
        axis.scatter(result["ms_per_particle"], result["median_deg"], s=40)
        axis.annotate(
            name,
            (result["ms_per_particle"], result["median_deg"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    axis.set(xscale="log", yscale="log", xlabel="time per particle (ms)", ylabel="median pose error (deg)")
    axis.set_title(title, fontsize=10)
    save_png(figure, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 < args.n_small < args.n:
        raise SystemExit(f"--n-small must be between 0 and --n ({args.n}), got {args.n_small}")
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be positive, got {args.repeats}")
    out = args.out or RESULTS / f"comparison_{args.benchmark}"
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    inputs = realistic_inputs() if args.benchmark == "realistic" else clean_inputs()
    particles, truth = subset(inputs["particles"], inputs["truth"], args.n, work)
    small = work / "small"
    small.mkdir(exist_ok=True)
    particles_small, _ = subset(inputs["particles"], inputs["truth"], args.n_small, small)
    from cryo_forum.io.particles import ParticleSet

    count, count_small = len(ParticleSet.open(particles)), len(ParticleSet.open(particles_small))
    rows = true_particles(ParticleSet.open(truth))
    model, volume = str(inputs["run"]), str(inputs["map"])
    commands = {
        "network alone": lambda star: ["predict", "--model", model, "--star", str(star), "--no-refine"],
        "network + refine": lambda star: ["predict", "--model", model, "--star", str(star), "--refine", volume],
        "global matching": lambda star: ["match", "--star", str(star), "--volume", volume, *match_options(inputs)],
    }
    commands["global grid + local fit"] = lambda star: [
        "refine", "--star", str(without_angles(star, star.with_name("no_angles.star"))), "--volume", volume,
        *wide_options(inputs),
    ]  # fmt: skip
    methods = {}
    for name, command in commands.items():
        stem = name.replace(" ", "_").replace("+", "and")
        path, path_small = work / f"{stem}.star", small / f"{stem}.star"
        seconds_small = fastest(command(particles_small), path_small, args.repeats)
        seconds = fastest(command(particles), path, args.repeats)
        methods[name] = figures(path, truth, rows) | timing(seconds, seconds_small, count, count_small)
        methods[name]["fsc_0143_angstrom"] = resolution(path, rows, work, stem)
        methods[name]["command"] = "cryo-forum " + " ".join([*command(particles), "--out", str(path)])
    true_resolution = resolution(truth, rows, work, "true_poses")
    refined, matched = methods["network + refine"], methods["global matching"]
    result = {
        "benchmark": args.benchmark,
        "particles": count,
        "particles_timing_only": count_small,
        "true_particles": len(rows),
        "true_poses_fsc_0143_angstrom": true_resolution,
        "methods": methods,
        "refine_vs_matching": {
            "median_ratio": refined["median_deg"] / matched["median_deg"],
            "speed_up": matched["ms_per_particle"] / refined["ms_per_particle"],
            "speed_up_whole_command": matched["whole_command_ms_per_particle"]
            / refined["whole_command_ms_per_particle"],
            "fsc_over_true_poses": refined["fsc_0143_angstrom"] / true_resolution,
        },
        "command": "python bench/comparison.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(methods, out / "comparison.png", f"{args.benchmark}: {count} particles, {len(rows)} true")
    print(json.dumps(result, indent=2))
    return 0


def wide_options(inputs: dict) -> list[str]:
    """`refine` options for never-aligned particles: their second search looks as far as matching does."""
    return ["--wide-shift", f"{inputs['max_shift_px']:g}"] if inputs.get("max_shift_px") else []


def match_options(inputs: dict) -> list[str]:
    """`match` options: the origin search of the realistic job (none for centred particles)."""
    if not inputs.get("max_shift_px"):
        return []
    return ["--max-shift", f"{inputs['max_shift_px']:g}", "--shift-step", str(MATCH_SHIFT_STEP_PX)]


if __name__ == "__main__":
    sys.exit(main())
