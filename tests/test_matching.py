"""Projection matching: the SO(3) grids, central slices, and the search recovering known poses and origins."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from cryo_forum import geometry, resources
from cryo_forum.cli import main as cli
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.prediction import matching
from cryo_forum.prediction.matching import (
    COVERING,
    LOCAL_HALF_WIDTH,
    MatchSettings,
    ProjectionMatcher,
    global_grid,
    half_plane_frequencies,
    match_memory,
    match_particles,
    particle_spectra,
    require_match_memory,
)
from cryo_forum.streams.simulation import write_simulation


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
    write_simulation(folder / "sim", volume, pixel_size, n=14, snr=10.0, ctf=True, max_shift_px=2.0, seed=4)
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
        (["--coarse", "120"], "--coarse: must be in (0, 30] degrees"),  # was a ZeroDivisionError
        (["--coarse", "0"], "--coarse: must be in (0, 30] degrees"),
        (["--coarse", "nan"], "--coarse: must be in (0, 30] degrees"),
        (["--refine", "10"], "--refine: must be from 0.01 to the coarse spacing, 7.5 degrees, got 10.0"),
        (["--refine", "0"], "--refine:"),
        (["--max-shift", "-1"], "--max-shift: must be >= 0 px, got -1.0"),
        (["--max-shift", "20"], "--max-shift: 20 px reaches beyond half the particles' 32 px box"),
        (["--max-shift", "2", "--shift-step", "3"], "--shift-step: must be at least 0.1 px and at most the largest"),
        (["--shift-step", "0.001"], "--shift-step: must be at least 0.1 px, got 0.001"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["--symmetry", "Q3"], "--symmetry:"),
    ],
)
def test_match_rejects_bad_settings_naming_the_option(shifted_particles, capsys, monkeypatch, options, message):
    monkeypatch.setattr(matching, "match_particles", _must_not_run)
    sim = shifted_particles / "sim"
    out = shifted_particles / "bad.star"
    command = ["match", "--star", str(sim / "particles.star"), "--volume", str(sim / "volume.mrc"), "--out", str(out)]
    assert cli([*command, *options]) == 1
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not out.exists()


def _must_not_run(*args, **kwargs):
    raise AssertionError("the search ran")


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        (dict(coarse_deg=120.0), "coarse_deg"),
        (dict(coarse_deg=-1.0), "coarse_deg"),
        (dict(coarse_deg=float("inf")), "coarse_deg"),
        (dict(refine_deg=8.0), "refine_deg"),
        (dict(coarse_band=0.1), "coarse_band"),  # a coarse band below two cycles per box: no frequencies left
        (dict(max_shift_px=float("nan")), "max_shift_px"),
        (dict(max_shift_px=1.0, shift_step_px=2.0), "shift_step_px"),
        (dict(shift_step_px=0.0), "shift_step_px"),
        (dict(oversampling=0), "oversampling"),
        (dict(oversampling=1.5), "oversampling"),
        (dict(oversampling=9), "oversampling"),
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2.5), "batch_size"),
        (dict(symmetry="Q3"), "symmetry"),
    ],
)
def test_match_settings_name_the_setting_out_of_range(settings, setting):
    with pytest.raises(InvalidSetting) as caught:
        MatchSettings(**settings).validate()
    assert caught.value.setting == setting


def test_match_settings_bounded_by_the_box():
    MatchSettings(max_shift_px=15.0).validate()
    with pytest.raises(InvalidSetting, match="half the particles' 32 px box") as caught:
        MatchSettings(max_shift_px=16.0).validate(box_size=32)
    assert caught.value.setting == "max_shift_px"
    with pytest.raises(CryoForumError, match="at least 8 px"):
        MatchSettings().validate(box_size=4)


def test_the_coarsest_grid_still_matches(shifted_particles):
    """30 degrees, the coarsest spacing allowed: a band of 3.8 cycles per box and 576 rotations still work."""
    particles = ParticleSet.open(shifted_particles / "sim" / "particles.star").subset(np.arange(2))
    volume, _ = load_volume(shifted_particles / "sim" / "volume.mrc")
    table = match_particles(particles, volume, MatchSettings(coarse_deg=30.0, refine_deg=5.0), progress=False)
    assert np.isfinite(table[star.MATCH_SCORE]).all()


def test_match_memory_grows_with_the_box_and_the_batch():
    settings = MatchSettings()
    small, large = match_memory(64, settings), match_memory(256, settings)
    assert 8 * (2 * 256) ** 3 < large and small < large  # at least the projector's padded spectrum
    assert match_memory(256, MatchSettings(batch_size=256)) > large
    assert match_memory(64, MatchSettings(coarse_deg=3.75)) > 8 * small  # 8 times the rotations, 4 times the band
    assert match_memory(100_000, settings) > 6.4e16  # the spectrum alone: 64 000 TB


def test_an_absurd_box_is_refused_before_anything_is_allocated():
    volume = np.broadcast_to(np.float32(0.0), (100_000,) * 3)  # a 100 000^3 map that takes no memory
    with pytest.raises(CryoForumError, match=r"matching 100000 px particles one at a time needs \d+ TB of memory"):
        ProjectionMatcher(volume, MatchSettings())


def test_a_batch_that_does_not_fit_names_the_batch_size_that_does(monkeypatch):
    settings = MatchSettings(batch_size=64, max_shift_px=4.0)
    fits = match_memory(128, MatchSettings(batch_size=16, max_shift_px=4.0))
    monkeypatch.setattr(resources, "available_memory", lambda: fits)
    with pytest.raises(InvalidSetting, match="use a batch size of at most 16") as caught:
        require_match_memory(128, settings)
    assert caught.value.setting == "batch_size" and "MB of memory; this machine has" in caught.value.message
    require_match_memory(128, MatchSettings(batch_size=16, max_shift_px=4.0))
    monkeypatch.setattr(resources, "available_memory", lambda: 1000)
    with pytest.raises(CryoForumError, match=r"one at a time needs .* of memory; this machine has 1\.0 kB available"):
        require_match_memory(128, settings)


def test_match_refuses_a_run_that_cannot_fit_before_loading_the_map(shifted_particles, capsys, monkeypatch):
    from cryo_forum.io import maps

    settings = MatchSettings(batch_size=4, max_shift_px=3.0)
    monkeypatch.setattr(resources, "available_memory", lambda: match_memory(32, settings) + resources.map_bytes(32))
    monkeypatch.setattr(maps, "load_volume", _must_not_run)
    sim = shifted_particles / "sim"
    out = shifted_particles / "refused.star"
    command = ["match", "--star", str(sim / "particles.star"), "--volume", str(sim / "volume.mrc"), "--out", str(out)]
    assert cli([*command, "--max-shift", "3", "--batch-size", "512"]) == 1
    error = capsys.readouterr().err
    assert "--batch-size: matching 32 px particles 512 at a time needs" in error
    assert "use a batch size of at most 4" in error and not out.exists()


def test_searching_in_small_blocks_finds_the_same_poses(shifted_particles, monkeypatch):
    """The coarse table, its scores and the local candidates are processed in blocks of CHUNK_VALUES values;
    blocks of a few particles' candidates, or of a few candidates of one particle, change nothing."""
    particles = ParticleSet.open(shifted_particles / "sim" / "particles.star").subset(np.arange(3))
    volume, _ = load_volume(shifted_particles / "sim" / "volume.mrc")
    settings = MatchSettings(coarse_deg=15.0, refine_deg=2.0, max_shift_px=2.0)
    whole = match_particles(particles, volume, settings, progress=False)
    frequencies = len(half_plane_frequencies(32, 16)[0])
    for values in (2 * 125 * frequencies, 10 * frequencies):  # two particles at a time; ten candidates
        monkeypatch.setattr(resources, "CHUNK_VALUES", values)
        blocks = match_particles(particles, volume, settings, progress=False)
        np.testing.assert_allclose(blocks.to_numpy(), whole.to_numpy(), rtol=1e-4, atol=1e-4)


def test_match_logs_how_the_map_is_resampled(tmp_path, capsys):
    volume, _ = load_volume(example_map_path(), pixel_size=3.0, size=32)
    write_simulation(tmp_path / "sim", volume, 3.0, n=2, snr=10.0, seed=1)
    out = tmp_path / "matched.star"
    command = ["match", "--star", str(tmp_path / "sim" / "particles.star"), "--volume", str(example_map_path())]
    assert cli([*command, "--out", str(out), "--coarse", "30", "--refine", "5"]) == 0
    error = capsys.readouterr().err
    assert f"{example_map_path()}: resampling the map from 48 px at 2.000 A/px to 32 px at 3.000 A/px" in error
    assert out.exists()


def test_match_names_a_missing_map_and_refuses_to_write_over_its_inputs(shifted_particles, capsys, monkeypatch):
    monkeypatch.setattr(matching, "match_particles", _must_not_run)
    sim = shifted_particles / "sim"
    missing = shifted_particles / "nothing.mrc"
    assert cli(["match", "--star", str(sim / "particles.star"), "--volume", str(missing), "--out", "x.star"]) == 1
    assert str(missing) in capsys.readouterr().err
    command = ["match", "--star", str(sim / "particles.star"), "--volume", str(sim / "volume.mrc")]
    for target, what in (
        ("particles.star", "input particle file"),
        ("particles.mrcs", "image stack"),
        ("volume.mrc", "reference map"),
    ):
        before = (sim / target).read_bytes()
        assert cli([*command, "--out", str(sim / target)]) == 1
        error = capsys.readouterr().err
        assert what in error and "refusing to overwrite an input" in error
        assert (sim / target).read_bytes() == before
    assert cli([*command, "--out", str(sim / "particles.star" / "matched.star")]) == 1  # checked before the search
    assert "is not a folder" in capsys.readouterr().err
