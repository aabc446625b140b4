"""Projection matching: the SO(3) grids, central slices, and the search recovering known poses and origins."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from cryo_forum import geometry
from cryo_forum.cli import main as cli
from cryo_forum.io import star
from cryo_forum.io.particles import ParticleSet
from cryo_forum.matching import (
    COVERING,
    LOCAL_HALF_WIDTH,
    MatchSettings,
    global_grid,
    half_plane_frequencies,
    match_particles,
    particle_spectra,
)
from cryo_forum.projection import FourierProjector
from cryo_forum.simulate import write_simulation
from cryo_forum.volumes import example_map_path, load_volume


def nearest_angle_deg(grid: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Angle from each query rotation to its nearest grid rotation (both quaternion signs considered)."""
    tree = cKDTree(np.concatenate([grid, -grid]))
    chord, _ = tree.query(queries)
    return np.degrees(4.0 * np.arcsin(chord / 2.0))


def test_rotation_grid_has_relions_count_and_covers_so3_uniformly():
    grid = geometry.rotation_grid(15.0)
    assert grid.shape == (4608, 4)  # RELION's HEALPix order 2: 192 directions x 24 in-plane angles
    assert geometry.grid_size_for_spacing(7.5) == 36864
    np.testing.assert_allclose(np.linalg.norm(grid, axis=1), 1.0, atol=1e-12)
    assert (grid[:, 3] >= 0).all()
    distances = nearest_angle_deg(grid, geometry.random_quaternions(3000, rng=1))
    assert distances.max() < COVERING * 15.0 + 0.5
    # second moment of a uniform distribution on the 3-sphere is I / 4 (independent of the quaternion sign)
    np.testing.assert_allclose(grid.T @ grid / len(grid), np.eye(4) / 4, atol=2e-3)
    spacing = nearest_angle_deg(grid, geometry.quaternion_multiply(geometry.rotation_grid(15.0), [0, 0, 0, 1]))
    assert spacing.max() < 1e-6  # deterministic


def test_global_grid_with_symmetry_keeps_one_asymmetric_unit_that_still_covers_it():
    full, reduced = geometry.rotation_grid(15.0), global_grid(15.0, "D2")
    assert 0.25 < len(reduced) / len(full) < 0.4  # one unit of four, plus a border of one covering radius
    poses = geometry.reduce_to_asymmetric_unit(geometry.random_quaternions(3000, rng=2), "D2")
    assert nearest_angle_deg(reduced, poses).max() <= nearest_angle_deg(full, poses).max() + 1e-9
    assert nearest_angle_deg(reduced, poses).max() < COVERING * 15.0 + 0.5


def test_local_offsets_are_a_cube_of_rotation_vectors():
    offsets = geometry.local_rotation_offsets(2.0, 2)
    assert offsets.shape == (125, 4)
    angles = np.degrees(geometry.geodesic_distance(offsets, [0.0, 0.0, 0.0, 1.0]))
    ticks = 2.0 * np.arange(-2, 3)
    expected = np.linalg.norm(np.stack(np.meshgrid(ticks, ticks, ticks, indexing="ij"), -1).reshape(-1, 3), axis=1)
    np.testing.assert_allclose(angles, expected, atol=1e-9)


def test_local_steps_shrink_until_refine_and_cover_the_previous_cell():
    settings = MatchSettings(coarse_deg=7.5, refine_deg=1.0)
    steps = settings.local_steps()
    assert steps[-1] <= 1.0 < steps[-2]
    for previous, step in zip([7.5, *steps[:-1]], steps, strict=False):
        assert LOCAL_HALF_WIDTH * step >= COVERING * previous - 1e-12


def test_central_slices_are_the_spectra_of_the_projections():
    volume, _ = load_volume(example_map_path(), size=32)
    projector = FourierProjector(volume)
    quaternions = geometry.random_quaternions(5, rng=3)
    images = projector.project_numpy(quaternions)
    flat, frequencies, weights = half_plane_frequencies(32, 16)
    slices = projector.central_slices(geometry.quaternion_to_matrix(quaternions), frequencies).numpy()
    reference = particle_spectra(images)[:, flat]
    np.testing.assert_allclose(slices, reference, atol=1e-3 * np.abs(reference).max())
    # the Hermitian weights count every frequency of the full plane once: total = full-plane count without k = 0
    full = np.hypot(*np.meshgrid(np.fft.fftfreq(32) * 32, np.fft.fftfreq(32) * 32)) < 16
    assert weights.sum() == full.sum() - 1


@pytest.fixture(scope="module")
def shifted_particles(tmp_path_factory):
    """14 noise-free particles at 32 px with CTF and origins up to 2 px, and their map."""
    folder = tmp_path_factory.mktemp("match")
    volume, pixel_size = load_volume(example_map_path(), size=32)
    write_simulation(folder / "sim", volume, pixel_size, n=14, snr=10.0, ctf=True, shift_px=2.0, seed=4)
    return folder


def test_match_recovers_poses_and_origins(shifted_particles):
    folder = shifted_particles
    out = folder / "matched.star"
    command = [
        "match",
        "--star",
        str(folder / "sim" / "particles.star"),
        "--volume",
        str(folder / "sim" / "volume.mrc"),
    ]
    assert cli([*command, "--out", str(out), "--max-shift", "3"]) == 0
    truth = ParticleSet.open(folder / "sim" / "particles.star")
    found = ParticleSet.open(out)
    errors = np.degrees(geometry.geodesic_distance(found.quaternions(), truth.quaternions()))
    assert np.median(errors) < 2.0
    assert (errors < 5.0).mean() >= 0.85
    origin_errors = np.linalg.norm(found.shifts_px() - truth.shifts_px(), axis=1)
    assert np.median(origin_errors) < 0.5
    assert np.abs(truth.shifts_px()).max() > 1.0  # the origins were really searched
    assert set(truth.table.columns) <= set(found.table.columns)
    assert np.isfinite(found.table[star.MATCH_SCORE]).all()


def test_match_without_shift_search_keeps_the_files_origins(shifted_particles):
    particles = ParticleSet.open(shifted_particles / "sim" / "particles.star")
    volume, _ = load_volume(shifted_particles / "sim" / "volume.mrc")
    table = match_particles(particles.subset(np.arange(6)), volume, MatchSettings(), progress=False)
    assert star.ORIGIN_X_ANGST not in table  # nothing searched, nothing replaced
    errors = np.degrees(
        geometry.geodesic_distance(
            geometry.euler_to_quaternion(table[list(star.ANGLES)].to_numpy()), particles.quaternions()[:6]
        )
    )
    assert np.median(errors) < 2.0  # the search was centred on the file's (true) origins


def test_match_with_symmetry_finds_poses_in_the_asymmetric_unit(tmp_path):
    volume, pixel_size = load_volume(example_map_path(), size=32)
    write_simulation(tmp_path, volume, pixel_size, n=8, snr=10.0, ctf=True, symmetry="D2", seed=6)
    particles = ParticleSet.open(tmp_path / "particles.star")
    table = match_particles(particles, volume, MatchSettings(symmetry="D2"), progress=False)
    found = geometry.euler_to_quaternion(table[list(star.ANGLES)].to_numpy())
    errors = np.degrees(geometry.symmetric_distance(found, particles.quaternions(), "D2"))
    assert np.median(errors) < 2.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--coarse", "0"], "coarse must be positive"),
        (["--max-shift", "-1"], "max_shift must be >= 0"),
        (["--symmetry", "Q3"], "Q3"),
    ],
)
def test_match_rejects_bad_settings(shifted_particles, capsys, options, message):
    sim = shifted_particles / "sim"
    out = shifted_particles / "bad.star"
    command = ["match", "--star", str(sim / "particles.star"), "--volume", str(sim / "volume.mrc"), "--out", str(out)]
    assert cli([*command, *options]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_match_names_a_missing_map_and_refuses_to_overwrite_its_input(shifted_particles, capsys):
    sim = shifted_particles / "sim"
    missing = shifted_particles / "nothing.mrc"
    assert cli(["match", "--star", str(sim / "particles.star"), "--volume", str(missing), "--out", "x.star"]) == 1
    assert str(missing) in capsys.readouterr().err
    before = (sim / "particles.star").read_bytes()
    command = ["match", "--star", str(sim / "particles.star"), "--volume", str(sim / "volume.mrc")]
    assert cli([*command, "--out", str(sim / "particles.star")]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (sim / "particles.star").read_bytes() == before
