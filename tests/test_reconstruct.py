"""Direct Fourier reconstruction: agrees with the map the particles were simulated from (true poses, noise-free),
with a brute-force full-grid reference, and pins the pose, shift and symmetry conventions; the command writes
the maps, the mask and their FSC (FSC-weighted by default with half maps, a constant Wiener term on request or
without half maps) and refuses bad input."""

import json

import numpy as np
import pandas as pd
import pytest

from cryo_forum import cli, geometry
from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.mrc import read_volume, write_stack, write_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.ctf import compute_ctf
from cryo_forum.physics.reconstruction import (
    FourierAccumulator,
    backproject,
    half_maps,
    reconstruct,
    reference_map,
    split_halves,
)
from cryo_forum.physics.resolution import fsc
from cryo_forum.streams.simulation import write_simulation

SIZE = 32
PIXEL_SIZE = 2.5


@pytest.fixture(scope="module")
def molecule():
    volume, pixel_size = load_volume(example_map_path(), pixel_size=PIXEL_SIZE, size=SIZE)
    return volume, pixel_size


def simulated(folder, volume, pixel_size, n, **options):
    write_simulation(folder, volume, pixel_size, n, seed=3, **options)
    return ParticleSet.open(folder / "particles.star"), read_volume(folder / "volume.mrc")[0]


@pytest.fixture(scope="module")
def no_ctf(tmp_path_factory, molecule):
    return simulated(tmp_path_factory.mktemp("no_ctf"), *molecule, 150, snr=None, ctf=False, max_shift_px=3.0)


@pytest.fixture(scope="module")
def with_ctf(tmp_path_factory, molecule):
    return simulated(tmp_path_factory.mktemp("ctf"), *molecule, 200, snr=None, ctf=True, max_shift_px=3.0)


def correlation(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def fsc_up_to(volume, reference, fraction_of_nyquist):
    _, curve = fsc(volume, reference, PIXEL_SIZE)
    return curve[1 : int(fraction_of_nyquist * (SIZE // 2)) + 1]


def test_noise_free_without_ctf_recovers_the_source_map(no_ctf):
    particles, source = no_ctf
    volume, pixel_size = reconstruct(particles)
    assert volume.shape == (SIZE,) * 3 and volume.dtype == np.float32 and pixel_size == PIXEL_SIZE
    assert fsc_up_to(volume, source, 0.8).min() > 0.9
    assert correlation(volume, source) > 0.98
    assert (volume * source).sum() / (source**2).sum() == pytest.approx(1.0, abs=0.1)  # absolute scale


def test_noise_free_with_ctf_recovers_the_source_map(with_ctf):
    particles, source = with_ctf
    assert particles.has_ctf
    volume, _ = reconstruct(particles)
    assert fsc_up_to(volume, source, 0.8).min() > 0.9
    assert correlation(volume, source) > 0.98


def test_wrong_poses_or_shifts_give_a_clearly_worse_map(no_ctf):
    particles, source = no_ctf
    images = particles.images(np.arange(len(particles)))
    matrices = geometry.quaternion_to_matrix(particles.quaternions())
    shifts = particles.shifts_px()

    def build(poses, origins):
        accumulator = FourierAccumulator(SIZE)
        accumulator.insert(images, poses, origins)
        volume = accumulator.volume()
        return correlation(volume, source), fsc_up_to(volume, source, 0.8)[4:].mean()  # beyond 0.3 Nyquist

    right = build(matrices, shifts)
    assert right[0] > 0.98 and right[1] > 0.95
    for wrong in (build(matrices.transpose(0, 2, 1), shifts), build(matrices, -shifts), build(matrices, 0 * shifts)):
        assert wrong[0] < right[0] - 0.1 and wrong[1] < 0.3  # A^T for A; origins the wrong way round or ignored


def test_half_grid_insertion_equals_a_brute_force_full_grid_reference():
    """Same maths with the whole (2D)^3 grid, every image frequency and np.add.at: the half-grid, conjugate-folding
    and bincount shortcuts must not change the result."""
    size, padded, rng = 8, 16, np.random.default_rng(0)
    images = rng.standard_normal((5, size, size))
    matrices = geometry.quaternion_to_matrix(geometry.random_quaternions(5, rng))
    shifts = rng.uniform(-2, 2, (5, 2))
    defocus = rng.uniform(5e3, 2e4, (3, 5))
    ctf = compute_ctf(size, 3.0, defocus[0], defocus[1], defocus[2])
    ctf_half = compute_ctf(size, 3.0, defocus[0], defocus[1], defocus[2], rfft=True)
    wiener = 1.0

    accumulator = FourierAccumulator(size, symmetry="C2")
    accumulator.insert(images, matrices, shifts, ctf_half)
    fast = accumulator.volume(wiener)

    spectra = np.fft.fft2(np.fft.ifftshift(images, axes=(-2, -1)))
    k = np.fft.fftfreq(size) * size
    ky, kx = np.meshgrid(k, k, indexing="ij")
    spectra = spectra * np.exp(-2j * np.pi * (kx * shifts[:, 0, None, None] + ky * shifts[:, 1, None, None]) / size)
    inside = kx**2 + ky**2 < (size / 2) ** 2
    data = np.zeros((padded,) * 3, complex)
    weight = np.zeros((padded,) * 3)
    for n in range(5):
        for g in geometry.symmetry_matrices("C2"):
            pose = matrices[n] @ g.T
            for row, column in zip(*np.nonzero(inside), strict=True):
                point = 2 * (kx[row, column] * pose[0] + ky[row, column] * pose[1])  # (x, y, z)
                base = np.floor(point).astype(int)
                for corner in np.ndindex(2, 2, 2):
                    w = np.prod(np.where(corner, point - base, 1 - point + base))
                    x, y, z = (base + corner) % padded
                    np.add.at(data, (z, y, x), w * ctf[n, row, column] * spectra[n, row, column])
                    np.add.at(weight, (z, y, x), w * ctf[n, row, column] ** 2)
    spectrum = data / (weight + wiener / 8)
    g = np.fft.fftfreq(padded) * padded
    spectrum[g[:, None, None] ** 2 + g[None, :, None] ** 2 + g[None, None, :] ** 2 >= (padded / 2) ** 2] = 0
    box = np.fft.fftshift(np.fft.ifftn(spectrum).real)[4:12, 4:12, 4:12]
    footprint = np.sinc((np.arange(size) - size // 2) / padded) ** 2
    reference = box / (footprint[:, None, None] * footprint[None, :, None] * footprint)
    np.testing.assert_allclose(fast, reference, atol=1e-5 * np.abs(reference).max())


def test_accumulators_of_disjoint_sets_add_up(no_ctf):
    particles, _ = no_ctf
    together = backproject(particles, np.arange(40))
    first = backproject(particles, np.arange(25))
    first += backproject(particles, np.arange(25, 40))
    np.testing.assert_allclose(first.volume(), together.volume(), atol=1e-5 * np.abs(together.volume()).max())


def c4_molecule(size):
    """Gaussian blobs at g c_i for every g of C4 (RELION's orientation): V(g x) = V(x) exactly."""
    rng = np.random.default_rng(7)
    centres = rng.uniform(-7, 7, (6, 3))
    heights = rng.uniform(0.5, 1.5, 6)
    z, y, x = np.indices((size,) * 3) - size // 2
    volume = np.zeros((size,) * 3)
    for g in geometry.symmetry_matrices("C4"):
        for (cx, cy, cz), height in zip(centres @ g.T, heights, strict=True):
            volume += height * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * 1.3**2))
    return volume


def test_symmetry_c4_from_few_particles_beats_c1(tmp_path):
    particles, source = simulated(
        tmp_path, c4_molecule(SIZE), PIXEL_SIZE, 12, snr=None, ctf=False, symmetry="C4", max_shift_px=1.0
    )
    c1, _ = reconstruct(particles, symmetry="C1")
    c4, _ = reconstruct(particles, symmetry="C4")
    assert correlation(c4, source) > 0.95
    assert correlation(c4, source) > correlation(c1, source) + 0.05
    assert fsc_up_to(c4, source, 0.8).mean() > fsc_up_to(c1, source, 0.8).mean() + 0.15


def test_half_maps_of_noisy_data_give_a_falling_fsc(tmp_path, molecule):
    particles, source = simulated(tmp_path, *molecule, 200, snr=0.05, ctf=True)
    maps = half_maps(particles)
    first, second = split_halves(particles)
    subsets = particles.table[star.RANDOM_SUBSET].to_numpy()
    assert (subsets[first] == 1).all() and (subsets[second] == 2).all() and len(first) + len(second) == 200
    np.testing.assert_allclose(maps.half1, reconstruct(particles, first)[0], atol=1e-6 * np.abs(maps.half1).max())
    _, curve = fsc(maps.half1, maps.half2, maps.pixel_size)
    assert curve[1:3].min() > 0.9  # signal at low resolution
    assert curve[-6:].mean() < 0.2  # noise near Nyquist
    assert correlation(maps.full, source) > max(correlation(maps.half1, source), correlation(maps.half2, source))


def test_halves_alternate_without_a_subset_column(no_ctf):
    particles, _ = no_ctf
    first, second = split_halves(particles, subset_column="rlnNoSuchColumn")
    np.testing.assert_array_equal(first, np.arange(0, len(particles), 2))
    np.testing.assert_array_equal(second, np.arange(1, len(particles), 2))


def test_particles_without_poses_are_refused(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 8, 8)), 1.0)
    with pytest.raises(CryoForumError, match=r"s\.mrcs: no poses"):
        reconstruct(ParticleSet.open(tmp_path / "s.mrcs"))


# ---------------------------------------------------------------- the command


@pytest.fixture
def reconstruct_only(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ["reconstruct"])


def test_command_writes_map_half_maps_mask_and_fsc(reconstruct_only, no_ctf, tmp_path, capsys):
    particles, _ = no_ctf
    out = tmp_path / "maps" / "map.mrc"
    assert cli.main(["reconstruct", "--star", str(particles.source), "--out", str(out), "--half-maps"]) == 0
    expected = reference_map(particles)
    for name, volume in (("map", expected.map), ("map_half1", expected.half1), ("map_mask", expected.mask)):
        written, pixel_size = read_volume(out.parent / f"{name}.mrc")
        assert pixel_size == pytest.approx(PIXEL_SIZE)
        np.testing.assert_allclose(written, volume, atol=1e-5 * np.abs(volume).max())
    for name in ("map_half2.mrc", "map_fsc/fsc.json", "map_fsc/fsc.png"):
        assert (out.parent / name).is_file(), name
    report = json.loads((out.parent / "map_fsc" / "fsc.json").read_text())
    assert report["box_size"] == SIZE and report["pixel_size"] == pytest.approx(PIXEL_SIZE)
    assert report["regularisation"] == {"kind": "fsc_weighted", "iterations": 2}
    assert report["fsc_curve"] == "masked_corrected" and report["mask"] == str(out.parent / "map_mask.mrc")
    assert report["fsc"] == pytest.approx(expected.fsc.corrected.tolist(), abs=1e-6)
    assert report["unmasked"]["fsc"] == pytest.approx(expected.fsc.unmasked.tolist(), abs=1e-6)
    printed = capsys.readouterr().out
    assert f"(FSC = 0.143): {report['resolution']['0.143']['angstrom']:.2f} A" in printed
    assert "(masked, corrected by phase randomisation)" in printed
    assert f"unmasked {report['unmasked']['resolution']['0.143']['angstrom']:.2f} A" in printed


def test_command_constant_wiener_with_and_without_half_maps(reconstruct_only, no_ctf, tmp_path, capsys):
    particles, _ = no_ctf
    star_file = str(particles.source)
    constant, _ = reconstruct(particles, wiener_constant=0.5)
    out = tmp_path / "halves" / "map.mrc"
    assert cli.main(["reconstruct", "--star", star_file, "--out", str(out), "--half-maps", "--wiener", "0.5"]) == 0
    np.testing.assert_allclose(read_volume(out)[0], constant, atol=1e-5 * np.abs(constant).max())
    report = json.loads((out.parent / "map_fsc" / "fsc.json").read_text())
    assert report["regularisation"] == {"kind": "wiener", "constant": 0.5}
    out = tmp_path / "single" / "map.mrc"
    assert cli.main(["reconstruct", "--star", star_file, "--out", str(out)]) == 0
    assert "constant Wiener term C = 1" in capsys.readouterr().err
    np.testing.assert_allclose(read_volume(out)[0], reconstruct(particles)[0], atol=1e-5 * np.abs(constant).max())
    assert sorted(path.name for path in out.parent.iterdir()) == ["map.mrc"]


def test_command_uses_a_given_mask_and_writes_none(reconstruct_only, no_ctf, tmp_path):
    particles, _ = no_ctf
    mask = np.zeros((SIZE,) * 3, dtype=np.float32)
    mask[4:-4, 4:-4, 4:-4] = 1.0
    write_volume(tmp_path / "mask.mrc", mask, PIXEL_SIZE)
    out = tmp_path / "maps" / "map.mrc"
    arguments = ["reconstruct", "--star", str(particles.source), "--out", str(out), "--half-maps"]
    assert cli.main([*arguments, "--mask", str(tmp_path / "mask.mrc")]) == 0
    assert not (out.parent / "map_mask.mrc").exists()
    report = json.loads((out.parent / "map_fsc" / "fsc.json").read_text())
    expected = reference_map(particles, mask=mask)
    assert report["mask"] == str(tmp_path / "mask.mrc")
    assert report["fsc"] == pytest.approx(expected.fsc.corrected.tolist(), abs=1e-6)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--half-maps", "--wiener", "-1"], "--wiener: must be >= 0"),
        (["--half-maps", "--iterations", "0"], "--iterations: must be a positive integer"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer"),
        (["--mask", "mask.mrc"], "--mask: is used with --half-maps only"),
    ],
)
def test_command_refuses_bad_settings(reconstruct_only, no_ctf, tmp_path, capsys, arguments, message):
    particles, _ = no_ctf
    write_volume(tmp_path / "mask.mrc", np.ones((SIZE,) * 3, dtype=np.float32), PIXEL_SIZE)
    arguments = [str(tmp_path / a) if a == "mask.mrc" else a for a in arguments]
    out = tmp_path / "out" / "map.mrc"
    assert cli.main(["reconstruct", "--star", str(particles.source), "--out", str(out), *arguments]) == 1
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_command_refuses_a_star_file_without_poses(reconstruct_only, no_ctf, tmp_path, capsys):
    particles, _ = no_ctf
    table = particles.table.drop(columns=list(star.ANGLES))
    path = tmp_path / "no_poses.star"
    optics = pd.DataFrame({star.OPTICS_GROUP: [1], star.IMAGE_PIXEL_SIZE: [PIXEL_SIZE], star.IMAGE_SIZE: [SIZE]})
    stack = particles.resolve_stack(particles.stack_names[0])
    table[star.IMAGE_NAME] = [f"{i + 1:06d}@{stack}" for i in range(len(table))]
    star.write_star(path, {"optics": optics, "particles": table[[star.IMAGE_NAME, star.OPTICS_GROUP]]})
    out = tmp_path / "out" / "map.mrc"
    assert cli.main(["reconstruct", "--star", str(path), "--out", str(out), "--half-maps"]) == 1
    error = capsys.readouterr().err
    assert "no_poses.star" in error and "no poses" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_command_refuses_an_unknown_point_group_and_writing_over_the_input(reconstruct_only, no_ctf, capsys):
    particles, _ = no_ctf
    star_file = str(particles.source)
    assert cli.main(["reconstruct", "--star", star_file, "--out", "x.mrc", "--symmetry", "Q7"]) == 1
    assert "--symmetry" in capsys.readouterr().err
    stack = str(particles.resolve_stack(particles.stack_names[0]))
    assert cli.main(["reconstruct", "--star", star_file, "--out", stack]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
