"""The design-choice study: every encoder design choice varied one at a time from the defaults, each trained for
the same wall-clock budget with several seeds and tested on one held-out set.

A budget in seconds becomes a number of epochs per choice (:func:`epochs_for_budget`) from the seconds its epochs
take (a short probe run, :func:`seconds_per_epoch`), so every choice then trains a fixed length with its full
learning-rate decay. The probe's timing is only fair on an otherwise idle machine; the runs after it are not
affected by what else the machine does. Each (choice, seed) is one run folder whose
``record.json`` is written last: a study interrupted at any point resumes where it stopped
(:func:`run_study`). :func:`summarise` gives the spread over seeds and judges each choice against the default by
it; :func:`study_figure` plots error against cost. ``bench/design_choices.py`` and notebook 05 run it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryo_forum import choices
from cryo_forum.io.atomic import atomic_output

log = logging.getLogger(__name__)

# the study's data: the accuracy benchmark's particles (5J0N at 64 px, CTF, 10 % labelled outliers) at SNR 0.1
BENCHMARK = {
    "apix": 4.58,
    "image_size": 64,
    "snr": 0.1,
    "ctf": True,
    "outliers": 0.1,
    "particles_per_epoch": 2000,
    "n_val": 300,
    "n_test": 0,
}
TEST_SEED = 9001  # the accuracy benchmark's test seed: training never draws it
PROBE_EPOCHS = 2  # the probe's last epoch is timed: the first also traces the graphs
RECORD_NAME = "record.json"
PROBE_NAME = "probe.json"


@dataclass(frozen=True)
class Choice:
    """One configuration of the study: the ``factor`` it varies and the flat settings that differ from the
    defaults (:func:`cryo_forum.training.config.configure` names)."""

    factor: str
    name: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """The choice's folder name."""
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in self.name)


def default_choices() -> list[Choice]:
    """The defaults, then every alternative of every factor, one at a time.

    Alternatives are taken from :mod:`cryo_forum.choices` and the current defaults, so a changed default is
    compared with the others rather than with itself. The distance loss is turned off by a constant schedule of
    the direct loss alone (a zero weight under the linear schedule would leave no loss at all before the hand-over).
    """
    from cryo_forum.training.config import leaves

    defaults = {leaf.name: leaf.default for leaf in leaves()}
    factors = [
        ("encoder", "encoder", choices.ENCODERS),
        ("pooling", "pooling", choices.POOLINGS),
        ("low-pass front end", "lowpass", (False, True)),
        ("head", "head", choices.HEAD_NAMES),
        ("loss schedule", "loss_schedule", choices.SCHEDULE_KINDS),
        ("pair weighting", "pair_weighting", choices.PAIR_WEIGHTINGS),
        ("Bingham weight", "uncertainty_weight", (0.0, defaults["uncertainty_weight"])),
    ]
    found = [Choice("default", "default")]
    for factor, setting, values in factors:
        others = [value for value in values if value != defaults[setting]]
        found += [Choice(factor, f"{setting}={_text(value)}", {setting: value}) for value in others]
    found.append(Choice("distance loss", "distance loss off", {"loss_schedule": "constant", "distance_weight": 0.0}))
    return found


def _text(value: Any) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def select(names: Iterable[str] | None, available: list[Choice]) -> list[Choice]:
    """The default and the choices named (by name or factor; None: all); ValueError naming an unknown one."""
    if names is None:
        return available
    names = list(names)
    known = {item.name for item in available} | {item.factor for item in available}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown choice(s) {', '.join(unknown)}; known: {', '.join(i.name for i in available)}")
    return [item for item in available if item.factor == "default" or {item.name, item.factor} & set(names)]


def epochs_for_budget(budget_seconds: float, seconds_per_epoch: float) -> int:
    """How many whole epochs fit in the budget (at least one)."""
    if not (seconds_per_epoch > 0 and budget_seconds > 0):
        raise ValueError(f"need a positive budget and epoch time, got {budget_seconds} and {seconds_per_epoch}")
    return max(1, math.floor(budget_seconds / seconds_per_epoch))


def seconds_per_epoch(history_csv: Path) -> float:
    """The wall time of a run's last epoch (its validation pass included), from its history.csv."""
    import pandas as pd

    return float(pd.read_csv(history_csv)["seconds"].iloc[-1])


@dataclass(frozen=True)
class StudySettings:
    """What every run shares: the flat training settings of ``base`` (the data: map, SNR, sizes), the seeds,
    and either a wall-clock ``budget_seconds`` per run or, instead, a fixed number of ``epochs``."""

    base: dict[str, Any]
    seeds: tuple[int, ...] = (0, 1, 2)
    budget_seconds: float | None = 90.0
    epochs: int | None = None


def simulate_test_set(volume: str | Path, base: dict[str, Any], n: int, folder: Path):
    """The held-out test set of the study's data ``base`` (simulated once into ``folder``, then reused)."""
    from cryo_forum.cli import main as cli
    from cryo_forum.errors import CryoForumError
    from cryo_forum.io.particles import ParticleSet

    star = Path(folder) / "particles.star"
    if not star.exists():
        command = ["simulate", "--volume", str(volume), "--n", str(n), "--box-size", str(base["image_size"])]
        command += ["--apix", str(base["apix"]), "--snr", str(base["snr"]), "--outliers", str(base["outliers"])]
        command += ["--ctf" if base["ctf"] else "--no-ctf", "--seed", str(TEST_SEED), "--out", str(folder)]
        if cli(command) != 0:
            raise CryoForumError(f"simulating the study's test set into {folder} failed")
    return ParticleSet.open(star)


def run_study(
    study: list[Choice],
    settings: StudySettings,
    folder: Path,
    test_set,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Train and test every (choice, seed) under ``folder`` (runs/SLUG/seedN), reusing finished ones; one record
    per run: the test errors' median, mean and share within 5 and 10 deg, the epochs, seconds per epoch, training
    seconds and parameters. ``test_set`` is a :class:`~cryo_forum.io.particles.ParticleSet` with true poses and
    the outlier flag; errors are over its inliers."""
    records = []
    for choice in study:
        epochs = settings.epochs or _budget_epochs(choice, settings, folder / "runs" / choice.slug)
        for seed in settings.seeds:
            run = folder / "runs" / choice.slug / f"seed{seed}"
            record = _finished_record(run)
            if record is None or record["epochs"] != epochs:
                record = train_and_test(choice, seed, epochs, settings.base, run, test_set)
            records.append(record)
            if report:
                report(record)
    return records


def _finished_record(run: Path) -> dict[str, Any] | None:
    path = run / RECORD_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _budget_epochs(choice: Choice, settings: StudySettings, folder: Path) -> int:
    """The epochs of ``choice`` that fit the budget, from a probe run (kept in folder/probe.json)."""
    path = folder / PROBE_NAME
    if path.is_file():
        probe = json.loads(path.read_text())
    else:
        run = folder / "probe"
        _fresh(run)
        _train(choice, settings.seeds[0], PROBE_EPOCHS, settings.base, run)
        probe = {"seconds_per_epoch": seconds_per_epoch(run / "history.csv")}
        _write_json(path, probe)
    epochs = epochs_for_budget(settings.budget_seconds, probe["seconds_per_epoch"])
    log.info(f"{choice.name}: {probe['seconds_per_epoch']:.1f} s per epoch, {epochs} epochs in the budget")
    return epochs


def _fresh(run: Path) -> None:
    shutil.rmtree(run, ignore_errors=True)
    run.parent.mkdir(parents=True, exist_ok=True)


def _train(choice: Choice, seed: int, epochs: int, base: dict[str, Any], run: Path):
    from cryo_forum.tensorflow_quiet import keras
    from cryo_forum.training.config import configure
    from cryo_forum.training.trainer import train

    keras.backend.clear_session()
    config = configure(**base, **choice.settings, epochs=epochs, seed=seed)
    return train(config, run)


def train_and_test(choice: Choice, seed: int, epochs: int, base: dict[str, Any], run: Path, test_set) -> dict:
    """Train one (choice, seed) from scratch into ``run`` and test it; its record, also written to record.json."""
    from cryo_forum import geometry
    from cryo_forum.io.star import ANGLE_PSI, ANGLE_ROT, ANGLE_TILT, OUTLIER
    from cryo_forum.prediction.predict import predict_particles
    from cryo_forum.training.run import load_run

    _fresh(run)
    started = time.perf_counter()
    _train(choice, seed, epochs, base, run)
    train_seconds = time.perf_counter() - started
    model, _, preprocessor = load_run(run)
    table = predict_particles(model, test_set, preprocessor, progress=False)
    predicted = geometry.euler_to_quaternion(table[[ANGLE_ROT, ANGLE_TILT, ANGLE_PSI]].to_numpy())
    inliers = test_set.table[OUTLIER].to_numpy() == 0
    errors = np.degrees(geometry.geodesic_distance(predicted, test_set.quaternions()))[inliers]
    record = {
        "factor": choice.factor,
        "choice": choice.name,
        "settings": choice.settings,
        "seed": seed,
        "epochs": epochs,
        "median_deg": float(np.median(errors)),
        "mean_deg": float(np.mean(errors)),
        "within_5_percent": float(np.mean(errors <= 5) * 100),
        "within_10_percent": float(np.mean(errors <= 10) * 100),
        "seconds_per_epoch": seconds_per_epoch(run / "history.csv"),
        "train_seconds": round(train_seconds, 1),
        "parameters": int(model.count_params()),
    }
    _write_json(run / RECORD_NAME, record)
    return record


def _write_json(path: Path, values: dict[str, Any]) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(values, indent=2) + "\n")


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per choice (in the records' order): the mean and standard deviation over seeds of the median and
    mean error and of the share within 5 deg, the median seconds per epoch, epochs and parameters, and a verdict against
    the default: ``better`` or ``worse`` when the mean median error differs from the default's by more than twice
    the standard error of the difference, else ``within spread`` (``one seed`` when either has a single seed)."""
    order = list(dict.fromkeys(record["choice"] for record in records))
    rows = []
    for name in order:
        runs = [record for record in records if record["choice"] == name]
        row = {"factor": runs[0]["factor"], "choice": name, "seeds": len(runs)}
        for key in ("median_deg", "mean_deg", "within_5_percent"):
            values = np.array([record[key] for record in runs])
            row[key] = float(values.mean())
            row[key.replace("_deg", "") + "_spread"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        row["seconds_per_epoch"] = float(np.median([record["seconds_per_epoch"] for record in runs]))
        row["epochs"] = runs[0]["epochs"]
        row["parameters"] = runs[0]["parameters"]
        rows.append(row)
    default = next((row for row in rows if row["factor"] == "default"), None)
    for row in rows:
        row["verdict"] = _verdict(row, default) if default is not None and row is not default else ""
    return rows


def _verdict(row: dict[str, Any], default: dict[str, Any]) -> str:
    if row["seeds"] < 2 or default["seeds"] < 2:
        return "one seed"
    error = math.sqrt(row["median_spread"] ** 2 / row["seeds"] + default["median_spread"] ** 2 / default["seeds"])
    difference = row["median_deg"] - default["median_deg"]
    if abs(difference) <= 2.0 * error:
        return "within spread"
    return "better" if difference < 0 else "worse"


def study_figure(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Median test error (mean over seeds, bars: their standard deviation) against seconds per epoch, and per
    choice as bars; the default's level dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    from cryo_forum.analysis.plots import save_png

    factors = list(dict.fromkeys(row["factor"] for row in rows))
    colours = {factor: f"C{number}" for number, factor in enumerate(factors)}
    spread = [0.0 if math.isnan(row["median_spread"]) else row["median_spread"] for row in rows]
    figure = Figure(figsize=(14, 0.3 * len(rows) + 3.5), dpi=100)
    cost, bars = figure.subplots(1, 2)
    for row, error in zip(rows, spread, strict=True):
        colour = colours[row["factor"]]
        cost.errorbar(row["seconds_per_epoch"], row["median_deg"], yerr=error, fmt="o", color=colour, capsize=3)
        cost.annotate(row["choice"], (row["seconds_per_epoch"], row["median_deg"]), xytext=(4, 3),
                      textcoords="offset points", fontsize=7)  # fmt: skip
    for factor, colour in colours.items():
        cost.scatter([], [], color=colour, label=factor)
    cost.set_xscale("log")
    cost.xaxis.set_major_formatter(ScalarFormatter())
    cost.xaxis.set_minor_formatter(NullFormatter())
    cost.set_xlabel("seconds per epoch (log)")
    cost.set_ylabel("median test error (deg), mean +- sd over seeds")
    cost.legend(fontsize=7)
    cost.set_title(title, fontsize=9)
    positions = np.arange(len(rows))
    bars.barh(positions, [row["median_deg"] for row in rows], xerr=spread, capsize=3,
              color=[colours[row["factor"]] for row in rows])  # fmt: skip
    default = next((row for row in rows if row["factor"] == "default"), None)
    if default is not None:
        bars.axvline(default["median_deg"], color="grey", linestyle="--", label="default")
        bars.legend(fontsize=7)
    bars.set_yticks(positions, [row["choice"] for row in rows], fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("median test error (deg)")
    return save_png(figure, path)
