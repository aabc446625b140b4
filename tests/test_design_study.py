"""The design-choice study: its choices, budgets and verdicts, and bench/design_choices.py's quick form."""

import json
import math
from pathlib import Path

import pytest

from cryo_forum import choices
from cryo_forum.analysis import design_study

ROOT = Path(__file__).resolve().parents[1]


def test_every_alternative_of_every_factor_is_one_change_from_the_defaults():
    study = design_study.default_choices()
    assert study[0].factor == "default" and study[0].settings == {}
    names = [choice.name for choice in study]
    assert len(set(names)) == len(names)
    varied = {key: value for choice in study[1:] for key, value in choice.settings.items() if key != "loss_schedule"}
    heads = {choice.settings["head"] for choice in study if "head" in choice.settings}
    assert heads == set(choices.HEAD_NAMES) - {"qcqp"}
    poolings = {choice.settings["pooling"] for choice in study if "pooling" in choice.settings}
    assert poolings == set(choices.POOLINGS) - {"avg"}
    assert varied["lowpass"] is True and varied["uncertainty_weight"] == 0.0
    off = next(choice for choice in study if choice.factor == "distance loss")
    assert off.settings == {"loss_schedule": "constant", "distance_weight": 0.0}
    assert all(len(choice.settings) == 1 for choice in study[1:] if choice.factor != "distance loss")


def test_choices_are_selected_by_name_or_factor_with_the_default_always_kept():
    study = design_study.default_choices()
    picked = design_study.select(["head", "pooling=max"], study)
    assert [choice.name for choice in picked] == ["default", "pooling=max", "head=quaternion", "head=6d", "head=9d"]
    with pytest.raises(ValueError, match="colour"):
        design_study.select(["colour"], study)


@pytest.mark.parametrize(("budget", "per_epoch", "epochs"), [(90.0, 4.0, 22), (90.0, 200.0, 1), (10.0, 2.5, 4)])
def test_a_budget_is_whole_epochs_and_at_least_one(budget, per_epoch, epochs):
    assert design_study.epochs_for_budget(budget, per_epoch) == epochs


def test_a_budget_needs_positive_times():
    with pytest.raises(ValueError):
        design_study.epochs_for_budget(90.0, 0.0)


def _record(choice, seed, median):
    return {"factor": "default" if choice == "default" else "f", "choice": choice, "seed": seed, "epochs": 3,
            "median_deg": median, "mean_deg": median + 1, "within_5_percent": 10.0, "seconds_per_epoch": 2.0,
            "parameters": 100}  # fmt: skip


def test_verdicts_weigh_the_difference_against_the_spread_over_seeds():
    records = [_record("default", s, m) for s, m in enumerate((20.0, 21.0, 22.0))]
    records += [_record("far", s, m) for s, m in enumerate((10.0, 10.5, 11.0))]
    records += [_record("near", s, m) for s, m in enumerate((19.0, 21.5, 23.0))]
    records += [_record("worse", s, m) for s, m in enumerate((40.0, 41.0, 39.0))]
    records += [_record("single", 0, 5.0)]
    rows = {row["choice"]: row for row in design_study.summarise(records)}
    assert rows["default"]["median_deg"] == pytest.approx(21.0)
    assert rows["default"]["median_spread"] == pytest.approx(1.0)
    assert rows["default"]["verdict"] == ""
    assert rows["far"]["verdict"] == "better"
    assert rows["near"]["verdict"] == "within spread"
    assert rows["worse"]["verdict"] == "worse"
    assert rows["single"]["verdict"] == "one seed" and math.isnan(rows["single"]["median_spread"])


@pytest.mark.slow
def test_the_bench_quick_form_writes_its_table_and_plot_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import design_choices

    out = tmp_path / "study"
    arguments = ["--quick", "--choices", "pooling=max", "--out", str(out)]
    assert design_choices.main(arguments) == 0
    result = json.loads((out / "result.json").read_text())
    rows = {row["choice"]: row for row in result["choices"]}
    assert set(rows) == {"default", "pooling=max"}
    assert all(row["seeds"] == 2 and math.isfinite(row["median_spread"]) for row in rows.values())
    assert all(0 <= run["median_deg"] <= 180 and run["parameters"] > 0 for run in result["runs"])
    assert rows["pooling=max"]["verdict"] in ("better", "worse", "within spread")
    assert (out / "design_choices.png").stat().st_size > 10_000
    records = sorted((out / "runs").glob("*/seed*/record.json"))
    assert len(records) == 4
    written = [path.stat().st_mtime_ns for path in records]
    capsys.readouterr()
    assert design_choices.main(arguments) == 0
    assert [path.stat().st_mtime_ns for path in records] == written, "finished runs are reused, not retrained"
    assert "pooling=max" in capsys.readouterr().out
