"""FSC: shell sums against a brute-force full-spectrum loop, limiting cases, resolution interpolation, phase
randomisation and the masked FSC, the report files and the `cryo-forum fsc` command (masks included; refusing bad
input and writing nothing then)."""

import json

import numpy as np
import pytest

from cryo_forum import cli
from cryo_forum.analysis.fsc import write_fsc, write_masked_fsc
from cryo_forum.io.mrc import read_volume, write_volume
from cryo_forum.physics.resolution import Resolution, fsc, masked_fsc, phase_randomised, resolution_at, shell_indices

SIZE = 16


def blobs(size, seed):
    rng = np.random.default_rng(seed)
    z, y, x = np.indices((size,) * 3) - size // 2
    volume = np.zeros((size,) * 3)
    for cx, cy, cz in rng.uniform(-size / 4, size / 4, (5, 3)):
        volume += np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / 4.0)
    return volume


@pytest.mark.parametrize("size", [16, 15])
def test_fsc_equals_a_full_spectrum_shell_loop(size):
    rng = np.random.default_rng(1)
    a = blobs(size, 0) + 0.3 * rng.standard_normal((size,) * 3)
    b = blobs(size, 0) + 0.3 * rng.standard_normal((size,) * 3)
    frequencies, curve = fsc(a, b, pixel_size=2.0)
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(size) * size
    radius = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2))
    expected = []
    for shell in range(size // 2 + 1):
        inside = radius == shell
        cross = np.sum(fa[inside] * np.conj(fb[inside])).real
        expected.append(cross / np.sqrt(np.sum(np.abs(fa[inside]) ** 2) * np.sum(np.abs(fb[inside]) ** 2)))
    np.testing.assert_allclose(curve, expected, atol=1e-10)
    np.testing.assert_allclose(frequencies, np.arange(size // 2 + 1) / (size * 2.0))


def test_fsc_of_a_map_with_itself_is_one_and_with_independent_noise_near_zero():
    volume = blobs(SIZE, 2)
    _, same = fsc(volume, volume)
    np.testing.assert_allclose(same, 1.0, atol=1e-12)
    rng = np.random.default_rng(3)
    _, noise = fsc(rng.standard_normal((32,) * 3), rng.standard_normal((32,) * 3))
    assert np.abs(noise[4:]).max() < 0.25  # shells of >= 200 coefficients: |FSC| ~ 1 / sqrt(n)


def test_mask_hides_differences_outside_it():
    volume = blobs(SIZE, 4)
    other = volume.copy()
    other[:3] += 5.0  # a slab the mask excludes
    mask = np.zeros_like(volume)
    mask[4:-4, 4:-4, 4:-4] = 1.0
    assert fsc(volume, other)[1][1:].min() < 0.9
    np.testing.assert_allclose(fsc(volume, other, mask=mask)[1], 1.0, atol=1e-12)


def test_resolution_is_interpolated_where_the_curve_first_falls_below_the_threshold():
    frequencies = np.linspace(0.0, 0.25, 11)  # 0.025 1/A per shell
    curve = np.array([1.0, 0.95, 0.9, 0.1, 0.6, 0.3, 0.2, 0.1, 0.05, 0.0, 0.0])
    # 0.5 is crossed between shells 2 (0.9) and 3 (0.1): 0.05 + 0.5 * 0.025, not at the later rebound.
    assert resolution_at(frequencies, curve, 0.5) == Resolution(pytest.approx(1.0 / 0.0625), False)
    linear = 1.0 - 4.0 * frequencies  # crosses 0.143 at (1 - 0.143) / 4, between shells: interpolation is exact
    assert resolution_at(frequencies, linear, 0.143).angstrom == pytest.approx(4.0 / (1.0 - 0.143))
    limited = resolution_at(frequencies, np.ones(11), 0.143)
    assert limited == Resolution(pytest.approx(4.0), True) and "Nyquist" in str(limited)


def test_resolution_when_even_shell_zero_is_below_the_threshold():
    frequencies = np.linspace(0.0, 0.25, 11)
    curve = np.array([-1.0, 0.1, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # noise: the DC term's sign is -1
    assert resolution_at(frequencies, curve, 0.143) == Resolution(pytest.approx(40.0), False)  # 1 / first shell


def test_phase_randomisation_keeps_amplitudes_and_scrambles_only_the_outer_shells():
    volume = blobs(SIZE, 7) + 0.1 * np.random.default_rng(8).standard_normal((SIZE,) * 3)
    shuffled = phase_randomised(volume, 4, np.random.default_rng(9))
    assert shuffled.dtype == np.float64 and shuffled.shape == volume.shape
    np.testing.assert_allclose(np.abs(np.fft.rfftn(shuffled)), np.abs(np.fft.rfftn(volume)), atol=1e-9)
    _, curve = fsc(volume, shuffled)
    np.testing.assert_allclose(curve[:4], 1.0, atol=1e-12)
    assert np.abs(curve[5:]).max() < 0.3
    inner = shell_indices(SIZE)[0] < 4
    np.testing.assert_allclose(np.fft.rfftn(shuffled)[inner], np.fft.rfftn(volume)[inner], atol=1e-9)


def test_masked_fsc_without_a_mask_is_the_unmasked_one_and_with_a_wide_one_barely_corrected():
    rng = np.random.default_rng(10)
    a, b = (blobs(SIZE, 11) + 0.3 * rng.standard_normal((SIZE,) * 3) for _ in range(2))
    plain = masked_fsc(a, b, None, 2.0)
    _, unmasked = fsc(a, b, 2.0)
    assert not plain.has_mask and plain.randomised_from == SIZE // 2 + 1 and not plain.randomised.any()
    for curve in (plain.unmasked, plain.masked, plain.corrected):
        np.testing.assert_array_equal(curve, unmasked)
    assert masked_fsc(a, b, np.zeros((SIZE,) * 3), 2.0).has_mask is False
    ones = masked_fsc(a, b, np.ones((SIZE,) * 3), 2.0, seed=1)
    np.testing.assert_allclose(ones.masked, unmasked, atol=1e-12)
    assert ones.has_mask and unmasked[ones.randomised_from] < 0.8 <= unmasked[1 : ones.randomised_from].min()
    assert np.abs(ones.randomised[ones.randomised_from :]).max() < 0.35  # random phases: no correlation left
    again, other = (masked_fsc(a, b, np.ones((SIZE,) * 3), 2.0, seed=seed) for seed in (1, 2))
    np.testing.assert_array_equal(again.randomised, ones.randomised)  # the seed fixes the random phases
    assert not np.array_equal(other.randomised, ones.randomised)


def test_write_masked_fsc_reports_every_curve(tmp_path):
    rng = np.random.default_rng(12)
    a, b = (blobs(SIZE, 13) + 0.3 * rng.standard_normal((SIZE,) * 3) for _ in range(2))
    mask = np.zeros((SIZE,) * 3)
    mask[3:-3, 3:-3, 3:-3] = 1.0
    result = masked_fsc(a, b, mask, 2.0)
    report = write_masked_fsc(tmp_path / "out", result, 2.0, regularisation={"kind": "x"})
    saved = json.loads((tmp_path / "out" / "fsc.json").read_text())
    assert saved == report and saved["fsc_curve"] == "masked_corrected" and saved["regularisation"] == {"kind": "x"}
    assert saved["fsc"] == pytest.approx(result.corrected.tolist(), abs=1e-6)
    assert saved["unmasked"]["fsc"] == pytest.approx(result.unmasked.tolist(), abs=1e-6)
    assert saved["masked"]["fsc"] == pytest.approx(result.masked.tolist(), abs=1e-6)
    assert saved["phase_randomised"]["from_shell"] == result.randomised_from
    assert saved["resolution"]["0.143"]["angstrom"] == pytest.approx(result.resolution().angstrom, abs=1e-3)
    unmasked = write_masked_fsc(tmp_path / "plain", masked_fsc(a, b, None, 2.0), 2.0)
    assert unmasked["fsc_curve"] == "unmasked" and unmasked["masked"] is None and unmasked["phase_randomised"] is None


def test_write_fsc_writes_json_and_png(tmp_path):
    frequencies = np.arange(9) / (16 * 1.5)
    curve = np.clip(1.2 - 3.5 * frequencies / frequencies[-1], -0.1, 1.0)
    report = write_fsc(tmp_path / "out", frequencies, curve, 1.5, extra_key="x")
    saved = json.loads((tmp_path / "out" / "fsc.json").read_text())
    assert saved == report and saved["extra_key"] == "x"
    assert saved["box_size"] == 16 and saved["pixel_size"] == 1.5 and saved["nyquist_angstrom"] == 3.0
    assert saved["fsc"] == pytest.approx(curve.tolist(), abs=1e-6)
    for key in ("0.143", "0.5"):
        expected = resolution_at(frequencies, curve, float(key))
        assert saved["resolution"][key]["angstrom"] == pytest.approx(expected.angstrom, abs=1e-3)
    assert (tmp_path / "out" / "fsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the command


@pytest.fixture
def fsc_only(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["fsc"])


@pytest.fixture
def maps(tmp_path):
    rng = np.random.default_rng(5)
    paths = []
    for number in (1, 2):
        path = tmp_path / f"half{number}.mrc"
        write_volume(path, blobs(SIZE, 6) + 0.05 * rng.standard_normal((SIZE,) * 3), 2.0)
        paths.append(path)
    return paths


def test_command_reports_both_thresholds_and_writes_the_report(fsc_only, maps, tmp_path, capsys):
    out = tmp_path / "fsc_out"
    assert cli.main(["fsc", str(maps[0]), str(maps[1]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "fsc.json").read_text())
    assert set(report["resolution"]) == {"0.143", "0.5"} and report["maps"] == [str(maps[0]), str(maps[1])]
    for key, entry in report["resolution"].items():
        assert f"(FSC = {key}): {entry['angstrom']:.2f} A" in printed
    assert (out / "fsc.png").is_file()
    assert report["fsc_curve"] == "unmasked" and report["mask"] is None


def test_command_auto_mask_writes_the_mask_and_the_masked_fsc(fsc_only, maps, tmp_path, capsys):
    out = tmp_path / "fsc_out"
    assert cli.main(["fsc", str(maps[0]), str(maps[1]), "--out", str(out), "--auto-mask"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "fsc.json").read_text())
    mask, pixel_size = read_volume(out / "mask.mrc")
    assert pixel_size == pytest.approx(2.0) and 0 < mask.mean() < 1 and mask.max() == pytest.approx(1.0)
    assert report["mask"] == str(out / "mask.mrc") and report["fsc_curve"] == "masked_corrected"
    assert report["masked"] is not None and report["unmasked"]["fsc"] != report["fsc"]
    assert "masked, corrected by phase randomisation" in printed


def test_command_mask_file_gives_the_corrected_masked_fsc(fsc_only, maps, tmp_path):
    mask = np.zeros((SIZE,) * 3, dtype=np.float32)
    mask[3:-3, 3:-3, 3:-3] = 1.0
    write_volume(tmp_path / "mask.mrc", mask, 2.0)
    out = tmp_path / "fsc_out"
    assert cli.main(["fsc", str(maps[0]), str(maps[1]), "--out", str(out), "--mask", str(tmp_path / "mask.mrc")]) == 0
    report = json.loads((out / "fsc.json").read_text())
    assert report["fsc_curve"] == "masked_corrected" and report["mask"] == str(tmp_path / "mask.mrc")
    assert not (out / "mask.mrc").exists()


@pytest.mark.parametrize("problem", ["missing", "box", "pixel size"])
def test_command_refuses_bad_maps_and_writes_nothing(fsc_only, maps, tmp_path, capsys, problem):
    other = tmp_path / "other.mrc"
    if problem == "box":
        write_volume(other, np.zeros((SIZE + 2,) * 3), 2.0)
    elif problem == "pixel size":
        write_volume(other, np.zeros((SIZE,) * 3), 3.0)
    out = tmp_path / "fsc_out"
    assert cli.main(["fsc", str(maps[0]), str(other), "--out", str(out)]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "other.mrc" in error
    assert problem.split()[0] in error or (problem == "missing" and "not found" in error)
    assert not out.exists()
