"""Pre-training from a consensus set's own map: its noise measured from the residuals, and `train --star`
reconstructing the set, training on particles simulated from that map with the set's CTFs, noise and origins,
then fine-tuning on the real images."""

import numpy as np
import pytest
import yaml

from cryo_forum.cli import main
from cryo_forum.io import star as star_io
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.mrc import read_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.renderer import ParticleRenderer
from cryo_forum.physics.settings import SimulationSettings
from cryo_forum.streams.simulation import SNRCurriculum, write_simulation
from cryo_forum.training.pretraining import noise_estimate, origin_sigma
from cryo_forum.training.run import Run

SIZE = 32
TINY = ["--image-size", "32", "--batch-size", "32", "--widths", "8", "16", "--seed", "1"]


def coloured_spectrum(size: int) -> np.ndarray:
    shells = np.arange(size // 2 + 1)
    spectrum = 1.0 / (1.0 + (shells / 6.0) ** 2)
    return spectrum / spectrum.mean()


@pytest.fixture(scope="module")
def consensus(tmp_path_factory):
    """300 particles at SNR 0.1 with coloured noise, CTFs and origins of 1.5 px: a small consensus set."""
    folder = tmp_path_factory.mktemp("consensus")
    volume, pixel_size = load_volume(example_map_path(), pixel_size=3.0, size=SIZE)
    options = dict(snr=0.1, ctf=True, seed=2, origin_sigma_px=1.5, max_shift_px=4.0)
    write_simulation(folder, volume, pixel_size, 300, noise_spectrum=tuple(coloured_spectrum(SIZE)), **options)
    return folder


def test_noise_estimate_recovers_snr_and_coloured_spectrum(consensus):
    particles = ParticleSet.open(consensus / "particles.star")
    reference, _ = read_volume(consensus / "volume.mrc")
    estimate = noise_estimate(particles, np.arange(len(particles)), reference)
    assert estimate.particles == 300
    assert estimate.snr == pytest.approx(0.1, rel=0.2)
    expected = coloured_spectrum(SIZE)
    np.testing.assert_allclose(estimate.spectrum[1:], expected[1:], rtol=0.2)
    assert origin_sigma(particles) == pytest.approx(1.5, rel=0.15)


def test_train_star_pretrains_on_its_own_map_then_fine_tunes(consensus, tmp_path, capsys):
    run = tmp_path / "run"
    star = consensus / "particles.star"
    argv = ["train", "--star", str(star), "--out", str(run), "--pretrain-epochs", "1", "--epochs", "1", *TINY]
    assert main(argv) == 0
    log = capsys.readouterr().err
    steps = [line.split(":")[0] for line in log.splitlines() if line.startswith("pre-training, step")]
    assert steps == [f"pre-training, step {k} of 3" for k in (1, 2, 3)]
    assert "fine-tuning on 240 training" in log

    reference, pixel_size = read_volume(run / "reference.mrc")
    assert reference.shape == (SIZE,) * 3 and pixel_size == pytest.approx(3.0)
    truth, _ = read_volume(consensus / "volume.mrc")
    assert np.corrcoef(reference.ravel(), truth.ravel())[0, 1] > 0.5  # the set's own map, not noise

    simulated = yaml.safe_load((run / "pretrain" / "config.yaml").read_text())["data"]
    assert simulated["volume"] == str(run / "reference.mrc")
    assert simulated["ctf_from"] == str(star)
    assert len(simulated["noise_spectrum"]) == SIZE // 2 + 1
    assert simulated["snr"] == pytest.approx(0.1, rel=0.5)  # against a map of the same noisy particles
    assert simulated["origin_sigma_px"] is None and simulated["max_shift_px"] == pytest.approx(1.0)  # centred
    assert Run(run).load_origin_spread() == pytest.approx(1.5 * 3.0, rel=0.2)  # where predict looks, in A
    assert (run / "pretrain" / "model.keras").is_file() and (run / "model.keras").is_file()

    assert main([*argv, "--resume"]) == 0  # a finished run: neither stage is repeated
    log = capsys.readouterr().err
    assert "step 1 of 3" not in log and "step 2 of 3" not in log
    assert "training had already finished" in log

    blocks = star_io.read_star(star)  # the same particles, picked but never aligned: no origins, no poses
    columns = [star_io.ORIGIN_X_ANGST, star_io.ORIGIN_Y_ANGST, *star_io.ANGLES]
    blocks[star_io.PARTICLES_BLOCK] = blocks[star_io.PARTICLES_BLOCK].drop(columns=columns)
    star_io.write_star(consensus / "picked.star", blocks, version=30001)
    out = tmp_path / "predicted.star"
    assert main(["predict", "--model", str(run), "--star", str(consensus / "picked.star"), "--out", str(out)]) == 0
    predicted = ParticleSet.open(out)
    assert star_io.SHIFT_SCORE in predicted.table and np.isfinite(predicted.table[star_io.SHIFT_SCORE]).all()
    assert predicted.has_origins and np.all(np.isfinite(predicted.shifts_px()))
    refined = [star_io.MATCH_SCORE, star_io.REFINED_ERROR]  # refined against the run's reference by default
    assert all(np.isfinite(predicted.table[column]).all() for column in refined)
    bounds = predicted.table[[star_io.ERROR_BOUND, star_io.REFINED_BOUND]].to_numpy()  # calibrated; the fit's own
    assert np.all(np.isfinite(bounds) & (bounds > 0))
    assert "recommended" in Run(run).load_calibration()["metrics"]["fit_junk_score"]  # from the refined validation set
    kept = tmp_path / "kept.star"
    assert (
        main(["filter", "--star", str(out), "--out", str(kept), "--model", str(run), "--metric", "fit_junk_score"]) == 0
    )
    assert "with fit_junk_score <=" in capsys.readouterr().out and kept.exists()
    centred = tmp_path / "centred.star"  # one trial, at the centre: two searches of 1.5 px (and parabolas) around it
    argv = ["predict", "--model", str(run), "--star", str(consensus / "picked.star"), "--out", str(centred)]
    assert main([*argv, "--max-shift", "0", "--no-refine"]) == 0
    network = ParticleSet.open(centred)
    assert np.all(np.hypot(*network.shifts_px().T) <= 2 * (1.5 + np.sqrt(0.5)) + 1e-6)
    assert not any(column in network.table for column in refined)


def test_the_snr_curriculum_starts_clear_and_ends_at_the_sets_snr():
    curriculum = SNRCurriculum(start_snr=1.0, ramp_steps=100)
    factors = [float(curriculum.noise_factor(step, 0.04)) for step in (0, 50, 100, 400)]
    assert factors[0] == pytest.approx(0.2)  # sqrt(0.04 / 1)
    assert factors[1] == pytest.approx(np.sqrt(0.2))  # SNR 0.2, halfway on the log scale
    assert factors[2] == pytest.approx(1.0) and factors[3] == pytest.approx(1.0)


def test_a_noise_factor_scales_only_the_noise_of_the_same_particles():
    volume, pixel_size = load_volume(example_map_path(), pixel_size=3.0, size=SIZE)
    renderer = ParticleRenderer(volume, pixel_size, SimulationSettings(n=8, snr=0.1, ctf=True, seed=4))
    index = np.arange(8)
    full, draws = renderer.render(index, 7)
    half, _ = renderer.render(index, 7, 0.5)
    signal = renderer.signal(draws)
    np.testing.assert_allclose(half - signal, 0.5 * (full - signal), atol=1e-4)
