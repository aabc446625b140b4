"""Scaling: time and peak memory of `cryo-forum predict` and of one training epoch for 1k, 10k and 100k particles.

  python bench/scaling.py                 # N = 1000 10000 100000, 64 px (stack of 1.6 GB)
  python bench/scaling.py --quick         # smoke test: N = 200 1000 at 32 px, about a minute

Data: the largest set is simulated once from the built-in example map (PDB 1A28 chain A; --volume for another map
or an atomic model) in 64 px boxes of --field-of-view A (default 128 A: 2 A/px), SNR 0.1, CTF, into OUT/data/ and
reused by later runs from the same map (OUT/data/map.json records it; result.json too, path and sha256); the
smaller sets are STAR files listing the first N particles of the same stack. Each measurement runs the real CLI in
a fresh child process:
  predict  `cryo-forum predict` of the N particles with one model (trained once: the epoch run of the smallest N;
           the weights do not change the timing), default batch size;
  train    `cryo-forum train --star ... --epochs 1` with default settings (80/10/10 split, batch 64).
Reported per N: wall time of the command; for predict also the prediction loop alone (first to last progress bar
update: reading, preprocessing and the network) and particles/s over that loop; for train the epoch alone, from the
"model:" line (data ready, model built) to the first end-of-epoch line, so it includes tf.function tracing, the
validation pass over the 10 % validation particles and the end-of-epoch checkpoint and model save, while start-up
(imports, STAR, split) and what follows the epoch (calibration on the validation particles) are reported apart.
Times come from timestamps of the child's output lines; logs with those timestamps are kept in OUT/work/logs/.

Memory: peak RSS is the child's ru_maxrss from os.wait4; the peak anonymous memory (RssAnon from /proc/PID/status,
sampled every 50 ms) is reported beside it. Particle images are read with positioned reads into each batch's buffer
(cryo_forum.io.mrc.StackReader), not through a memory map, so stack pages never count in the process's RSS.
Target: predict peak RSS flat in N, peak(largest N) / peak(smallest N) <= 1.2 (checked for both figures).

Page cache: nothing is dropped (dropping caches needs root). Right after simulation the whole stack is in the page
cache (warm) when the machine has the memory for it; a reused stack may be partly evicted. The share of the stack
resident in the page cache just before each measurement is recorded (mincore), together with whether the stack was
written by this invocation. Measurements are kept in OUT/work/measurements/ (delete them to measure again); the
result is OUT/result.json and OUT/scaling.png.
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import json
import mmap
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _maps import add_volume_option, check_recorded_map, map_record, record_map

from cryo_forum.io.maps import example_map_path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1000, 10000, 100000)
QUICK_SIZES = (200, 1000)
SNR = 0.1
FLAT_RATIO = 1.2  # target: predict peak memory at the largest N / at the smallest N
SAMPLE_SECONDS = 0.05
MIB = 1024 * 1024
EPOCH_LINE = re.compile(r"^\s*\d+/\d+ - \d+s - ")  # Keras fit, verbose=2, printed at the end of an epoch
PROGRESS = re.compile(r"(\d+)/(\d+) \[")  # a tqdm update: "...| 512/1000 [00:02<00:02, ...]"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", help=f"particle counts (default {' '.join(map(str, SIZES))})")
    parser.add_argument("--quick", action="store_true", help="smoke test: N = 200 1000, 32 px boxes")
    parser.add_argument("--out", type=Path, help="default: bench/results/scaling (scaling_quick with --quick)")
    add_volume_option(parser, example_map_path(), "the built-in example map")
    parser.add_argument(
        "--field-of-view",
        type=float,
        default=128.0,
        metavar="A",
        help="box edge of the simulated particles in A (default %(default)g)",
    )
    args = parser.parse_args(argv)
    args.sizes = sorted(set(args.sizes or (QUICK_SIZES if args.quick else SIZES)))
    if args.sizes[0] < 100:
        parser.error("--sizes: at least 100 particles (training needs a full batch of 64 after the split)")
    folder = "scaling_quick" if args.quick else "scaling"
    args.out = args.out or ROOT / "bench" / "results" / folder
    # box, the train options it needs and the pixel size that fills the field of view
    args.box, args.train_options = (32, ["--image-size", "32"]) if args.quick else (64, [])
    args.apix = args.field_of_view / args.box
    return args


# ---------------------------------------------------------------- data


def cli_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "cryo_forum.cli", *arguments]


def simulate(args: argparse.Namespace, data: Path) -> dict:
    """The largest set, simulated into ``data`` once (its own progress bar on stderr); what was done."""
    from cryo_forum.io.mrc import mrc_info

    star, stack = data / "particles.star", data / "particles.mrcs"
    n = args.sizes[-1]
    if star.exists() and stack.exists():
        shape = mrc_info(stack).shape
        if shape[0] < n or shape[1:] != (args.box, args.box):
            raise SystemExit(
                f"{data} holds {shape[0]} particles of {shape[-1]} px, not {n} of {args.box} px: "
                "delete it or choose another --out"
            )
        check_recorded_map(data, args.volume)
        return {"simulated_now": False, "n": shape[0]}
    print(f"simulating {n} particles of {args.box} px into {data}/ (done once)", file=sys.stderr)
    command = ["simulate", "--volume", str(args.volume), "--n", str(n), "--box-size", str(args.box)]
    command += ["--apix", str(args.apix), "--snr", str(SNR), "--ctf", "--out", str(data)]
    started = time.perf_counter()
    if subprocess.run(cli_command(*command)).returncode != 0:
        raise SystemExit(f"simulating {n} particles into {data} failed")
    record_map(data, args.volume)
    return {"simulated_now": True, "n": n, "seconds": round(time.perf_counter() - started, 1)}


def subset_star(data: Path, n: int, total: int) -> Path:
    """A STAR file of the first ``n`` particles of the simulated stack (the full STAR when n is all of them)."""
    full = data / "particles.star"
    if n == total:
        return full
    path = data / f"particles_{n}.star"
    if not path.exists():
        from cryo_forum.io.particles import ParticleSet

        ParticleSet.open(full).write_star(path, keep=np.arange(n))
    return path


def page_cache_fraction(path: Path) -> float | None:
    """Share of the file's pages resident in the page cache (mincore on a read-only mapping); None if unknown."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with path.open("rb") as handle:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, handle.fileno(), 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        vector = (ctypes.c_ubyte * pages)()
        if libc.mincore(address, size, vector) != 0:
            return None
        return round(float(np.count_nonzero(np.frombuffer(vector, np.uint8) & 1)) / pages, 3)
    finally:
        libc.munmap(address, size)


# ---------------------------------------------------------------- one measured child process


def _rss_anon_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _read_lines(stream, started: float, lines: list[tuple[float, str]]) -> None:
    """Collect (seconds since ``started``, line) of a child's output and show it; lines end at "\\n" or "\\r".

    A line is timed when its text arrives, not its terminator: tqdm starts each redraw with "\\r", so a progress
    line is only terminated by the next redraw. Progress bars are redrawn in place on stderr, other lines printed.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending, pending_time, in_bar = "", 0.0, False
    while chunk := stream.read1(65536):
        now = time.perf_counter() - started
        text = decoder.decode(chunk)
        *complete, rest = re.split(r"[\r\n]", pending + text)
        for number, line in enumerate(complete):
            if not line.strip():
                continue
            lines.append((pending_time if number == 0 and text[:1] in "\r\n" else now, line))
            bar = bool(PROGRESS.search(line))
            prefix = "\r" if bar else ("\n" if in_bar else "")
            print(f"{prefix}  | {line[:110] if bar else line}", end="" if bar else "\n", file=sys.stderr, flush=True)
            in_bar = bar
        if rest != pending or complete:
            pending_time = now
        pending = rest
    if pending.strip():
        lines.append((pending_time, pending))
    if in_bar:
        print(file=sys.stderr)


def run_measured(command: list[str], log: Path) -> dict:
    """Run ``command`` in a fresh process: wall seconds, peak RSS (ru_maxrss) and sampled peak RssAnon in MiB,
    and every output line with its time since the start (also written to ``log``)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lines: list[tuple[float, str]] = []
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    reader = threading.Thread(target=_read_lines, args=(child.stdout, started, lines), daemon=True)
    reader.start()
    peak_anon = 0
    try:
        while True:
            peak_anon = max(peak_anon, _rss_anon_kib(child.pid) or 0)
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(SAMPLE_SECONDS)
    except BaseException:
        child.kill()
        raise
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(f"[{t:8.2f} s] {line}\n" for t, line in lines))
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {child.returncode}; see {log}")
    return {
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # KiB on Linux
        "peak_anon_mib": round(peak_anon / 1024, 1),
        "lines": lines,
    }


def first_time(lines: list[tuple[float, str]], matches) -> float | None:
    """Time of the first output line for which ``matches(line)`` holds."""
    return next((t for t, line in lines if matches(line)), None)


def last_time(lines: list[tuple[float, str]], matches) -> float | None:
    """Time of the last output line for which ``matches(line)`` holds."""
    return first_time(lines[::-1], matches)


def span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 2)


def measure_predict(model: Path, star: Path, n: int, work: Path) -> dict:
    """`cryo-forum predict` of ``star`` with the run ``model``: total time, prediction loop, memory."""
    predicted = work / f"predicted_{n}.star"
    predicted.unlink(missing_ok=True)
    run = run_measured(
        cli_command("predict", "--model", str(model), "--star", str(star), "--out", str(predicted)),
        work / "logs" / f"predict_{n}.log",
    )
    lines = run.pop("lines")
    loop = span(first_time(lines, PROGRESS.search), last_time(lines, PROGRESS.search))
    return {
        **run,
        "startup_seconds": span(0.0, first_time(lines, PROGRESS.search)),
        "loop_seconds": loop,
        "particles_per_s": round(n / loop, 1) if loop else None,
        "particles_per_s_total": round(n / run["seconds"], 1),
    }


def measure_train(args: argparse.Namespace, star: Path, n: int, work: Path) -> dict:
    """One epoch of `cryo-forum train --star` (default settings) into a fresh run folder: times and memory."""
    folder = work / f"train_{n}"
    shutil.rmtree(folder, ignore_errors=True)  # an interrupted earlier attempt
    command = cli_command("train", "--star", str(star), "--out", str(folder), "--epochs", "1", *args.train_options)
    run = run_measured(command, work / "logs" / f"train_{n}.log")
    lines = run.pop("lines")
    data_ready = first_time(lines, lambda line: line.startswith("training on"))
    model_built = first_time(lines, lambda line: line.startswith("model:"))
    # the first end-of-epoch line: Keras's own (printed after the other callbacks) or the best-model saver's
    epoch_end = first_time(lines, lambda line: bool(EPOCH_LINE.search(line)) or line.startswith("epoch 1:"))
    split = json.loads((folder / "split.json").read_text())["subsets"]
    n_train, n_val = len(split["train"]["indices"]), len(split["val"]["indices"])
    epoch = span(model_built, epoch_end)
    return {
        **run,
        "startup_seconds": span(0.0, data_ready),
        "model_build_seconds": span(data_ready, model_built),
        "epoch_seconds": epoch,
        "after_epoch_seconds": span(epoch_end, run["seconds"]),  # calibration on the validation set, exit
        "n_train": n_train,
        "n_val": n_val,
        "train_particles_per_s": round(n_train / epoch, 1) if epoch else None,
    }


def measure(args: argparse.Namespace, kind: str, n: int, star: Path, simulation: dict) -> dict:
    """One (kind, N) measurement, taken once and kept in OUT/work/measurements/ (an interrupted run resumes)."""
    work = args.out / "work"
    saved = work / "measurements" / f"{kind}_{n}.json"
    if saved.exists() and (kind != "train" or (work / f"train_{n}" / "model.keras").exists()):
        print(f"{kind}: {n} particles: kept from an earlier run ({saved})", file=sys.stderr)
        return json.loads(saved.read_text())
    print(f"{kind}: {n} particles", file=sys.stderr)
    cached = page_cache_fraction(args.out / "data" / "particles.mrcs")
    if kind == "train":
        entry = measure_train(args, star, n, work)
    else:
        entry = measure_predict(work / f"train_{args.sizes[0]}", star, n, work)
    entry.update(stack_in_page_cache=cached, stack_written_by_this_invocation=simulation["simulated_now"])
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(entry, indent=2) + "\n")
    return entry


# ---------------------------------------------------------------- report


def machine() -> dict:
    memory = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(memory.split()[1]) / 1024**2, 1),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": metadata.version("tensorflow"),
    }


def ratio(entries: list[dict], key: str) -> float:
    return round(entries[-1][key] / entries[0][key], 3)


def plot(entries: list[dict], stack_mib_per_particle: float, path: Path, title: str) -> None:
    """Time and peak memory against N (log x): predict and train lines."""
    from matplotlib.figure import Figure

    from cryo_forum.analysis.plots import save_png

    n = [e["n"] for e in entries]
    fig = Figure(figsize=(11, 4.2), dpi=100)
    timing, memory = fig.subplots(1, 2)
    timing.plot(n, [e["predict_seconds"] for e in entries], "o-", color="C0", label="predict (command)")
    timing.plot(n, [e["predict_loop_seconds"] for e in entries], "o:", color="C0", label="predict (loop only)")
    timing.plot(n, [e["train_seconds"] for e in entries], "s-", color="C1", label="train 1 epoch (command)")
    timing.plot(n, [e["train_epoch_seconds"] for e in entries], "s:", color="C1", label="train (epoch only)")
    timing.set(xscale="log", yscale="log", xlabel="particles N", ylabel="wall time (s)")
    memory.plot(n, [e["predict_peak_mib"] for e in entries], "o-", color="C0", label="predict peak RSS")
    memory.plot(n, [e["predict_peak_anon_mib"] for e in entries], "o--", color="C0", label="predict peak anonymous")
    memory.plot(n, [e["train_peak_mib"] for e in entries], "s-", color="C1", label="train peak RSS")
    memory.plot(n, [e["train_peak_anon_mib"] for e in entries], "s--", color="C1", label="train peak anonymous")
    memory.plot(n, [stack_mib_per_particle * k for k in n], ":", color="grey", label="stack size (N images)")
    memory.set(xscale="log", xlabel="particles N", ylabel="peak memory (MiB)")
    memory.set_ylim(bottom=0)
    for axis in (timing, memory):
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    save_png(fig, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine()
    data = args.out / "data"
    simulation = simulate(args, data)
    if simulation["simulated_now"]:  # measurements of earlier data no longer apply
        shutil.rmtree(args.out / "work" / "measurements", ignore_errors=True)
    stack = data / "particles.mrcs"
    entries = []
    for n in args.sizes:  # the smallest N's training run is the model every prediction uses
        star = subset_star(data, n, simulation["n"])
        train = measure(args, "train", n, star, simulation)
        predict = measure(args, "predict", n, star, simulation)
        entry = {
            "n": n,
            "predict_seconds": predict["seconds"],
            "predict_loop_seconds": predict["loop_seconds"],
            "predict_particles_per_s": predict["particles_per_s"],
            "predict_peak_mib": predict["peak_rss_mib"],
            "predict_peak_anon_mib": predict["peak_anon_mib"],
            "train_seconds": train["seconds"],
            "train_epoch_seconds": train["epoch_seconds"],
            "train_peak_mib": train["peak_rss_mib"],
            "train_peak_anon_mib": train["peak_anon_mib"],
            "predict": predict,
            "train": train,
        }
        entries.append(entry)
        print(
            f"N {n}: predict {entry['predict_seconds']:.1f} s ({entry['predict_particles_per_s']} particles/s in the "
            f"loop), peak {entry['predict_peak_mib']:.0f} MiB (anonymous {entry['predict_peak_anon_mib']:.0f}); "
            f"train epoch {entry['train_epoch_seconds']} s of {entry['train_seconds']:.1f} s, peak "
            f"{entry['train_peak_mib']:.0f} MiB (anonymous {entry['train_peak_anon_mib']:.0f})",
            file=sys.stderr,
        )
    stack_mib = stack.stat().st_size / MIB
    targets = {
        "predict_peak_ratio_max": FLAT_RATIO,
        "predict_peak_ratio": ratio(entries, "predict_peak_mib"),
        "predict_peak_anon_ratio": ratio(entries, "predict_peak_anon_mib"),
        "train_peak_ratio": ratio(entries, "train_peak_mib"),
        "train_peak_anon_ratio": ratio(entries, "train_peak_anon_mib"),
    }
    targets["predict_peak_flat"] = targets["predict_peak_ratio"] <= FLAT_RATIO
    targets["predict_peak_anon_flat"] = targets["predict_peak_anon_ratio"] <= FLAT_RATIO
    summary = {
        "command": "python bench/scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
        "data": {
            "map": map_record(args.volume),
            "box_px": args.box,
            "apix": args.apix,
            "snr": SNR,
            "ctf": True,
            "stack": str(stack),
            "stack_mib": round(stack_mib, 1),
            **simulation,
        },
        "train_options": ["--epochs", "1", *args.train_options],
        "targets": targets,
        "entries": entries,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    title = f"scaling: {args.box} px particles read from disk, {info['cores']} cores"
    plot(entries, stack_mib / simulation["n"], args.out / "scaling.png", title)
    print(
        f"\n{'N':>8} {'predict s':>10} {'part/s':>8} {'pred MiB':>9} {'(anon)':>7} "
        f"{'epoch s':>8} {'train s':>8} {'train MiB':>10} {'(anon)':>7}"
    )
    for e in entries:
        print(
            f"{e['n']:>8} {e['predict_seconds']:>10.1f} {e['predict_particles_per_s'] or 0:>8.0f} "
            f"{e['predict_peak_mib']:>9.0f} {e['predict_peak_anon_mib']:>7.0f} {e['train_epoch_seconds'] or 0:>8.1f} "
            f"{e['train_seconds']:>8.1f} {e['train_peak_mib']:>10.0f} {e['train_peak_anon_mib']:>7.0f}"
        )
    print(
        f"predict peak RSS ratio {targets['predict_peak_ratio']} (target <= {FLAT_RATIO}: "
        f"{'met' if targets['predict_peak_flat'] else 'NOT met'}); anonymous {targets['predict_peak_anon_ratio']} "
        f"({'met' if targets['predict_peak_anon_flat'] else 'NOT met'})"
    )
    print(f"wrote {args.out / 'result.json'} and {args.out / 'scaling.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
