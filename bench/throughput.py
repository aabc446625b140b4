"""Throughput benchmark: prediction and training speed of the default model on this machine's CPU.

  python bench/throughput.py
  python bench/throughput.py --quick     (a ~30 s smoke test; its figures mean little)

Writes bench/results/throughput/result.json (every figure) and throughput.png, and prints a summary. Images are
random normal [B, S, S, 1] float32 held in memory, so only the network is timed, never data loading. Every
timing comes after a warm-up (tracing) and is repeated --repeats times; best and median are reported.

* Prediction (particles/s) of the default model as ``cryo-forum train`` builds it (small encoder, qcqp head),
  at 64 and 128 px, in batches of 256, the outputs fetched to numpy: eagerly, ``model(images, training=False)``
  per batch (how a Keras user calls a model); and through cryo_forum.model.estimator.inference_function, the graph that
  cryo_forum.prediction.predict.predict_particles (``cryo-forum predict``) uses.
* Projection matching (particles/s) at the same sizes: ``cryo_forum.prediction.matching.match_particles`` (what
  ``cryo-forum match`` runs, default settings) on particles simulated from the built-in example map (--volume for
  another map or an atomic model) in a box of --field-of-view A (default 128 A: 2 A/px at 64 px), after a warm-up
  run (XLA compilation); the one-off set-up (36 864 coarse references) is timed apart from the per-particle
  search, best of two passes over --match-particles particles. result.json records the map's path and sha256.
  The speed-up of amortised inference is matching's seconds per particle over the graph prediction's.
* Training (pairs/s) at 64 px with the package's AdamW optimiser (make_optimizer), timed with ``model.fit``:
  - in-batch: OrientationEstimator's own train_step. One batch of 64 images gives 64 * 63 / 2 = 2016 pairs
    for the distance loss (plus the direct loss and the Bingham likelihood it also computes).
  - two-branch: the original research layout, a Keras functional model with two image inputs sharing ONE
    encoder + qcqp head, whose output is the geodesic distance of the two predicted poses; the loss is
    mean |d_pred(q1, q2) - d_true(q1, q2)| over a batch of 64 pairs (128 images), so 64 pairs per step.
* FLOPs of one forward pass per image (encoder + head) at 64 and 128 px, counted by TensorFlow's profiler on
  the frozen graph of a batch-1 concrete function; also counted analytically from the layers (conv
  2 k k Cin Cout Hout Wout, dense 2 in out) as a cross-check and fallback. The matmul peak is the best float32
  ``tf.linalg.matmul`` of N x N matrices inside a tf.function. Achieved GFLOP/s: forward FLOPs x images/s for
  prediction, about 3 x forward FLOPs x images/s for training (forward + two backward products).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _maps import add_volume_option, map_record

from cryo_forum.io.maps import example_map_path

ROOT = Path(__file__).resolve().parents[1]
PREDICT_BATCH = 256
TRAIN_BATCH = 64
TRAIN_SIZE = 64
BACKWARD_FACTOR = 3.0
MODES = ("eager", "tf_function")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of every measurement")
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed repeat")
    parser.add_argument("--predict-batches", type=int, default=8, help="batches of 256 per timed prediction repeat")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="prediction image sizes (px)")
    parser.add_argument("--matmul", type=int, nargs="+", default=[2048, 4096], help="matmul sizes N for the peak")
    parser.add_argument("--match-particles", type=int, default=128, help="particles timed for projection matching")
    add_volume_option(parser, example_map_path(), "the built-in example map")
    parser.add_argument(
        "--field-of-view",
        type=float,
        default=128.0,
        metavar="A",
        help="box edge of the matched particles in A (default %(default)g)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput")
    parser.add_argument("--quick", action="store_true", help="shrink everything to a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.predict_batches, args.matmul = 2, 2, 1, [256, 512]
        args.match_particles = 8
    return args


def seconds_of(function: Callable[[], object], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``function``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def rates(count: float, times: list[float]) -> dict:
    """Best and median of ``count`` items per second over the timed repeats."""
    return {"best": count / min(times), "median": count / statistics.median(times)}


def matmul_peak(sizes: list[int], repeats: int) -> dict:
    """Best float32 GFLOP/s of an N x N matmul (2 N^3 flops) inside a tf.function, per N."""
    from cryo_forum.tensorflow_quiet import tf

    multiply = tf.function(lambda a, b: tf.reduce_sum(tf.linalg.matmul(a, b)))
    result = {}
    for n in sizes:
        a = tf.random.normal([n, n])
        b = tf.random.normal([n, n])
        multiply(a, b).numpy()
        times = seconds_of(lambda a=a, b=b: multiply(a, b).numpy(), max(repeats, 3))
        result[str(n)] = 2.0 * n**3 / min(times) / 1e9
    return result


def default_config(image_size: int):
    from cryo_forum.streams.preprocess import Preprocessor
    from cryo_forum.training.config import StarData, TrainingConfig

    return TrainingConfig(data=StarData(star="unused"), images=Preprocessor(image_size=image_size))


def prediction_throughput(image_size: int, batches: int, repeats: int) -> dict:
    """Particles/s of eager model calls and of the graph that predict_particles uses."""
    from cryo_forum.model.estimator import inference_function
    from cryo_forum.tensorflow_quiet import tf
    from cryo_forum.training.trainer import build_model

    model = build_model(default_config(image_size))
    images = [tf.random.normal([PREDICT_BATCH, image_size, image_size, 1], seed=i) for i in range(batches)]
    compiled = inference_function(model)

    def run(call: Callable) -> None:
        for batch in images:
            outputs = call(batch)
            outputs["quaternion"].numpy()
            outputs["eigenvalues"].numpy()

    result = {}
    for name, call in zip(MODES, (lambda x: model(x, training=False), compiled), strict=True):
        run(call)
        times = seconds_of(lambda call=call: run(call), repeats)
        result[name] = {**rates(batches * PREDICT_BATCH, times), "seconds": times}
    result["parameters"] = int(model.count_params())
    return result


def matching_throughput(volume_path: Path, field_of_view: float, image_size: int, n: int) -> dict:
    """Seconds of projection matching's set-up and per particle, at ``image_size`` px, on ``n`` particles."""
    import tempfile

    from cryo_forum.io.maps import load_volume
    from cryo_forum.io.particles import ParticleSet
    from cryo_forum.prediction.matching import MatchSettings, ParticleCTFs, ProjectionMatcher, shell_noise_power
    from cryo_forum.streams.simulation import write_simulation

    volume, pixel_size = load_volume(volume_path, pixel_size=field_of_view / image_size, size=image_size)
    with tempfile.TemporaryDirectory() as folder:
        write_simulation(folder, volume, pixel_size, n=n, snr=0.1, ctf=True, seed=1)
        particles = ParticleSet.open(Path(folder) / "particles.star")
        rows = np.arange(n)
        images, ctf, origins = particles.images(rows), ParticleCTFs(particles)(rows), np.zeros((n, 2))
        started = time.perf_counter()
        matcher = ProjectionMatcher(volume, MatchSettings(), shell_noise_power(particles))
        matcher.search(images[:1], ctf[:1], origins[:1])  # the global table is made at the first search
        setup = time.perf_counter() - started
    batch = matcher.settings.batch_size

    def search_all() -> None:
        for first in range(0, n, batch):
            matcher.search(images[first : first + batch], ctf[first : first + batch], origins[first : first + batch])

    search_all()  # warm-up: XLA compiles the central slices once per shape
    per_particle = min(seconds_of(search_all, 2)) / n
    return {"n": n, "setup_seconds": setup, "seconds_per_particle": per_particle, "particles_per_s": 1.0 / per_particle}


def random_poses(n: int, seed: int) -> np.ndarray:
    from cryo_forum.geometry import random_quaternions

    return random_quaternions(n, np.random.default_rng(seed)).astype(np.float32)


def epoch_timer(times: list[float]):
    """A Keras callback that appends the wall-clock seconds of every epoch of a fit to ``times``."""
    from cryo_forum.tensorflow_quiet import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    return EpochTimer()


def timed_fit(model, dataset, steps: int, repeats: int) -> list[float]:
    """Seconds per epoch of ``steps`` steps, ``repeats`` epochs after a two-step warm-up fit (tracing)."""
    model.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    times: list[float] = []
    timer = epoch_timer(times)
    model.fit(dataset, epochs=repeats, steps_per_epoch=steps, verbose=0, shuffle=False, callbacks=[timer])
    return times


def in_batch_training(steps: int, repeats: int) -> dict:
    """Pairs/s of OrientationEstimator's train_step: B(B-1)/2 pairs from each batch of B images."""
    from cryo_forum.streams.batch import ModelBatch, Targets
    from cryo_forum.tensorflow_quiet import tf
    from cryo_forum.training.trainer import build_model, make_optimizer

    config = default_config(TRAIN_SIZE)
    model = build_model(config)
    model.compile(optimizer=make_optimizer(config.optimisation, steps))
    images = tf.random.normal([TRAIN_BATCH, TRAIN_SIZE, TRAIN_SIZE, 1], seed=1)
    targets = Targets(quaternion=random_poses(TRAIN_BATCH, 1), outlier=np.zeros(TRAIN_BATCH, np.float32))
    dataset = tf.data.Dataset.from_tensors(ModelBatch(images, targets)).repeat()
    times = timed_fit(model, dataset, steps, repeats)
    pairs = TRAIN_BATCH * (TRAIN_BATCH - 1) // 2
    return {
        "pairs_per_step": pairs,
        "images_per_step": TRAIN_BATCH,
        "pairs_per_s": rates(steps * pairs, times),
        "images_per_s": rates(steps * TRAIN_BATCH, times),
        "seconds": times,
    }


def two_branch_model(image_size: int):
    """Two image inputs -> one shared encoder + qcqp head each -> geodesic distance of the two poses [B, 1].

    The encoder and head are those build_model makes for the default config, so both layouts train the same
    network.
    """
    from cryo_forum.geometry import geodesic_distance_tf
    from cryo_forum.tensorflow_quiet import keras
    from cryo_forum.training.trainer import build_model

    class PairDistance(keras.layers.Layer):
        """Quaternions [B, 4] x 2 -> geodesic distance [B, 1] in radians."""

        def call(self, q1, q2):
            return geodesic_distance_tf(q1, q2)[:, None]

        def compute_output_shape(self, q1_shape, q2_shape):
            return (q1_shape[0], 1)

    network = build_model(default_config(image_size))
    first = keras.Input((image_size, image_size, 1), name="image_1")
    second = keras.Input((image_size, image_size, 1), name="image_2")
    q1 = network.head(network.encoder(first))["quaternion"]
    q2 = network.head(network.encoder(second))["quaternion"]
    return keras.Model([first, second], PairDistance(name="distance")(q1, q2), name="two_branch")


def two_branch_training(steps: int, repeats: int) -> dict:
    """Pairs/s of the two-branch layout: each step one batch of B pairs (2B images), loss mean |d_pred - d_true|."""
    from cryo_forum.geometry import geodesic_distance
    from cryo_forum.tensorflow_quiet import tf
    from cryo_forum.training.trainer import make_optimizer

    config = default_config(TRAIN_SIZE)
    model = two_branch_model(TRAIN_SIZE)
    model.compile(optimizer=make_optimizer(config.optimisation, steps), loss="mean_absolute_error")
    shape = [TRAIN_BATCH, TRAIN_SIZE, TRAIN_SIZE, 1]
    first, second = tf.random.normal(shape, seed=2), tf.random.normal(shape, seed=3)
    d_true = geodesic_distance(random_poses(TRAIN_BATCH, 2), random_poses(TRAIN_BATCH, 3))[:, None]
    dataset = tf.data.Dataset.from_tensors(((first, second), d_true.astype(np.float32))).repeat()
    times = timed_fit(model, dataset, steps, repeats)
    return {
        "pairs_per_step": TRAIN_BATCH,
        "images_per_step": 2 * TRAIN_BATCH,
        "pairs_per_s": rates(steps * TRAIN_BATCH, times),
        "images_per_s": rates(steps * 2 * TRAIN_BATCH, times),
        "seconds": times,
    }


def profiler_flops(model, image_size: int) -> int | None:
    """Float operations of one forward pass of a batch-1 image by TensorFlow's profiler (None if it fails)."""
    from cryo_forum.tensorflow_quiet import tf

    try:
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        spec = tf.TensorSpec([1, image_size, image_size, 1], tf.float32)
        concrete = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
        frozen = convert_variables_to_constants_v2(concrete)
        builder = tf.compat.v1.profiler.ProfileOptionBuilder
        options = builder(builder.float_operation()).with_empty_output().build()
        profile = tf.compat.v1.profiler.profile(
            graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(), options=options
        )
        return int(profile.total_float_ops) or None
    except Exception as error:  # any profiler failure falls back to the analytic count
        print(f"TensorFlow profiler failed ({error.__class__.__name__}: {error}); using the analytic count")
        return None


def analytic_flops(model) -> int:
    """2 k k Cin Cout Hout Wout per convolution and 2 in out per dense layer of the encoder and head."""
    from cryo_forum.tensorflow_quiet import keras

    total = 0
    for layer in model.encoder.layers:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, cin, cout = layer.kernel.shape
            _, hout, wout, _ = layer.output.shape
            total += 2 * kh * kw * cin * cout * hout * wout
    fan_in, fan_out = model.head.dense.kernel.shape
    return int(total + 2 * fan_in * fan_out)


def forward_flops(image_size: int) -> dict:
    """FLOPs per image of the default model's forward pass: profiler count, analytic count and the one used."""
    from cryo_forum.training.trainer import build_model

    model = build_model(default_config(image_size))
    profiled = profiler_flops(model, image_size)
    analytic = analytic_flops(model)
    return {
        "profiler": profiled,
        "analytic": analytic,
        "used": profiled if profiled is not None else analytic,
        "method": "tensorflow profiler (frozen graph)" if profiled is not None else "analytic (conv + dense)",
    }


def achieved(flops_per_image: float, images_per_s: float, factor: float, peak: float) -> dict:
    gflops = factor * flops_per_image * images_per_s / 1e9
    return {"gflops_per_s": gflops, "fraction_of_peak": gflops / peak}


def machine() -> dict:
    from cryo_forum.tensorflow_quiet import keras, tf

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "gpus": len(tf.config.list_physical_devices("GPU")),
    }


def plot(result: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    from cryo_forum.analysis.plots import save_png

    figure = Figure(figsize=(18, 4.5))
    left, versus, middle, right = figure.subplots(1, 4)
    sizes = list(result["prediction"])
    x = np.arange(len(sizes))
    for offset, mode, label in (
        (-0.2, "eager", "eager model calls"),
        (0.2, "tf_function", "graph (cryo-forum predict)"),
    ):
        values = [result["prediction"][size][mode]["best"] for size in sizes]
        bars = left.bar(x + offset, values, 0.4, label=label)
        left.bar_label(bars, fmt="%.0f", fontsize=8)
    left.set_ylim(0, 1.25 * max(result["prediction"][size][mode]["best"] for size in sizes for mode in MODES))
    left.set_xticks(x, [f"{size} px" for size in sizes])
    left.set_ylabel("particles / s (best)")
    left.set_title(f"Prediction, default model, batches of {PREDICT_BATCH}")
    left.legend(fontsize=8, loc="upper right")

    network = [result["prediction"][size]["tf_function"]["best"] for size in sizes]
    matching = [result["matching"][size]["particles_per_s"] for size in sizes]
    for offset, values, label in ((-0.2, network, "estimator (graph)"), (0.2, matching, "projection matching")):
        bars = versus.bar(x + offset, values, 0.4, label=label)
        versus.bar_label(bars, fmt="%.3g", fontsize=8)
    versus.set_yscale("log")
    versus.set_ylim(min(matching) / 3, max(network) * 5)
    versus.set_xticks(x, [f"{size} px" for size in sizes])
    versus.set_ylabel("particles / s (log scale)")
    speedups = ", ".join(f"{result['matching'][size]['speedup_of_prediction']:.0f}x" for size in sizes)
    versus.set_title(f"Estimator vs projection matching: {speedups}")
    versus.legend(fontsize=8, loc="upper right")

    training = result["training"]
    layouts = ("in_batch", "two_branch")
    names = [f"{name.replace('_', '-')}\n({training[name]['pairs_per_step']} pairs/step)" for name in layouts]
    values = [training[name]["pairs_per_s"]["best"] for name in layouts]
    bottom = min(values) / 4
    bars = middle.bar(names, [value - bottom for value in values], bottom=bottom, color=["tab:green", "tab:gray"])
    middle.bar_label(bars, labels=[f"{value:.0f}" for value in values], fontsize=8)
    middle.set_yscale("log")
    middle.set_ylim(bottom, max(values) * 3)
    middle.set_ylabel("training pairs / s (best, log scale)")
    middle.set_title(f"Training, {TRAIN_SIZE} px: in-batch / two-branch = {training['ratio']:.0f}x")

    efficiency = result["efficiency"]
    labels = [f"predict {size} px, {mode}" for size in sizes for mode in MODES]
    labels += ["train in-batch", "train two-branch"]
    achieved_values = [
        *(efficiency["prediction"][size][mode]["gflops_per_s"] for size in sizes for mode in MODES),
        efficiency["training"]["in_batch"]["gflops_per_s"],
        efficiency["training"]["two_branch"]["gflops_per_s"],
    ]
    bars = right.barh(labels, achieved_values, color="tab:blue")
    right.bar_label(bars, fmt="%.1f", fontsize=8)
    right.axvline(efficiency["peak_gflops_per_s"], color="tab:red", linestyle="--", label="matmul peak")
    right.set_xlim(0, 1.2 * max(*achieved_values, efficiency["peak_gflops_per_s"]))
    right.set_xlabel("GFLOP/s achieved")
    right.set_title("Achieved vs float32 matmul peak")
    right.invert_yaxis()
    right.legend(fontsize=8)
    save_png(figure, path)


def summary(result: dict) -> str:
    lines = []
    for size, entry in result["prediction"].items():
        lines.append(
            f"predict {size:>3} px: {entry['eager']['best']:8.0f} particles/s eager, "
            f"{entry['tf_function']['best']:8.0f} under tf.function "
            f"({entry['tf_function']['best'] / entry['eager']['best']:.2f}x)"
        )
    training = result["training"]
    for name in ("in_batch", "two_branch"):
        entry = training[name]
        lines.append(
            f"train {name:>10}: {entry['pairs_per_s']['best']:8.0f} pairs/s "
            f"({entry['images_per_s']['best']:.0f} images/s, {entry['pairs_per_step']} pairs per step)"
        )
    lines.append(f"in-batch / two-branch pairs/s: {training['ratio']:.1f}x (target >= 10x)")
    for size, entry in result["matching"].items():
        lines.append(
            f"match {size:>3} px: {entry['seconds_per_particle'] * 1e3:.0f} ms/particle "
            f"(+ {entry['setup_seconds']:.1f} s set-up); "
            f"prediction is {entry['speedup_of_prediction']:.0f}x faster (target >= 100x)"
        )
    efficiency = result["efficiency"]
    lines.append(f"matmul peak: {efficiency['peak_gflops_per_s']:.1f} GFLOP/s")
    for size, flops in result["flops_per_image"].items():
        lines.append(
            f"forward {size:>3} px: {flops['used'] / 1e6:.1f} MFLOP/image ({flops['method']}; "
            f"analytic {flops['analytic'] / 1e6:.1f})"
        )
    for size, entry in efficiency["prediction"].items():
        for mode in MODES:
            lines.append(
                f"predict {size:>3} px {mode:>11}: {entry[mode]['gflops_per_s']:.1f} GFLOP/s = "
                f"{entry[mode]['fraction_of_peak']:.0%} of peak"
            )
    for name, entry in efficiency["training"].items():
        lines.append(f"train {name:>10}: {entry['gflops_per_s']:.1f} GFLOP/s = {entry['fraction_of_peak']:.0%} of peak")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    print("matmul peak ...", flush=True)
    peaks = matmul_peak(args.matmul, args.repeats)
    peak = max(peaks.values())
    sizes = sorted(set(args.sizes) | {TRAIN_SIZE})
    print("forward FLOPs ...", flush=True)
    flops = {str(size): forward_flops(size) for size in sizes}
    prediction = {}
    for size in args.sizes:
        print(f"prediction at {size} px ...", flush=True)
        prediction[str(size)] = prediction_throughput(size, args.predict_batches, args.repeats)
    matching = {}
    for size in args.sizes:
        print(f"projection matching at {size} px ...", flush=True)
        entry = matching_throughput(args.volume, args.field_of_view, size, args.match_particles)
        entry["speedup_of_prediction"] = prediction[str(size)]["tf_function"]["best"] / entry["particles_per_s"]
        matching[str(size)] = entry
    print("in-batch training ...", flush=True)
    in_batch = in_batch_training(args.steps, args.repeats)
    print("two-branch training ...", flush=True)
    two_branch = two_branch_training(args.steps, args.repeats)
    training = {
        "image_size": TRAIN_SIZE,
        "batch_size": TRAIN_BATCH,
        "in_batch": in_batch,
        "two_branch": two_branch,
        "ratio": in_batch["pairs_per_s"]["best"] / two_branch["pairs_per_s"]["best"],
    }
    train_flops = flops[str(TRAIN_SIZE)]["used"]
    efficiency = {
        "peak_gflops_per_s": peak,
        "prediction": {
            size: {mode: achieved(flops[size]["used"], entry[mode]["best"], 1.0, peak) for mode in MODES}
            for size, entry in prediction.items()
        },
        "training": {
            name: achieved(train_flops, training[name]["images_per_s"]["best"], BACKWARD_FACTOR, peak)
            for name in ("in_batch", "two_branch")
        },
    }
    result = {
        "machine": machine(),
        "matmul_gflops_per_s": peaks,
        "flops_per_image": flops,
        "prediction": prediction,
        "matching": matching,
        "map": map_record(args.volume),
        "training": training,
        "efficiency": efficiency,
        "settings": {
            "repeats": args.repeats,
            "steps": args.steps,
            "predict_batches": args.predict_batches,
            "predict_batch_size": PREDICT_BATCH,
            "match_field_of_view_angstrom": args.field_of_view,
            "quick": args.quick,
        },
        "command": "python bench/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "throughput.png")
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
