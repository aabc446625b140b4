"""The demo runs the whole pipeline end to end on the built-in example (tiny settings)."""

import json

import numpy as np
import pytest

from cryo_forum.cli import main


@pytest.mark.slow
def test_demo_runs_every_step_and_summarises(tmp_path, capsys):
    """Every step runs; the map of the true poses must reach near Nyquist (4 A), which a broken simulation, CTF or
    reconstruction could not, and the untrained model's poses must give a clearly worse map."""
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--n", "150", "--snr", "10", "--epochs", "1", "--particles-per-epoch", "64"]
    argv += ["--seed", "3"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in (
        "particles/particles.star",
        "run/model.keras",
        "run/calibration.json",
        "predicted.star",
        "kept.star",
        "maps/map_true.mrc",
        "maps/map_all_half1.mrc",
        "maps/map_kept_fsc/fsc.json",
        "report/metrics.json",
    ):
        assert (out / name).exists(), name
    assert summary["n_particles"] == 150
    assert set(summary["fsc_0143_angstrom"]) == {"true poses", "all particles", "kept particles"}
    resolution = summary["fsc_0143_angstrom"]
    assert all(np.isfinite(value) and value >= 4.0 for value in resolution.values())  # >= Nyquist
    assert resolution["true poses"] <= 5.5 and resolution["all particles"] > 1.5 * resolution["true poses"]
    assert 0.0 <= summary["outlier_auroc"] <= 1.0
    printed = capsys.readouterr().out
    assert "FSC 0.143 resolution" in printed and "roc.png" in printed


def test_demo_refuses_nonsense_and_an_existing_demo(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "0"]) == 1
    assert "--n" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    (out / "summary.json").write_text("{}")
    assert main(["demo", "--out", str(out)]) == 1
    assert "folder is not empty" in capsys.readouterr().err
