"""The demo command runs end to end on the built-in example."""

import json

import numpy as np

from cryo_forum.cli import main
from cryo_forum.io.particles import ParticleSet


def test_demo_simulates_and_summarises(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "60", "--outliers", "0.2", "--seed", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    particles = ParticleSet.open(out / "simulated" / "particles.star")
    assert summary["n_particles"] == len(particles) == 60
    assert summary["n_outliers"] == int(particles.table["cfIsOutlier"].sum()) == 12
    assert (out / "montage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.isfinite(particles.images(np.arange(5))).all()
    assert "montage.png" in capsys.readouterr().out


def test_demo_rejects_nonsense_options(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--n", "0"]) == 1
    assert "--n" in capsys.readouterr().err
    assert not out.exists()
