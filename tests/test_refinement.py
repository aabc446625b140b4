"""Local refinement: the network's poses and origins finished against the map, its search as wide as it is unsure."""

import numpy as np
import pytest

from cryo_forum import geometry
from cryo_forum.cli import main as cli
from cryo_forum.io import star
from cryo_forum.io.maps import benchmark_map_path, load_volume
from cryo_forum.io.mrc import read_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.prediction.refine_settings import RefineSettings
from cryo_forum.prediction.refinement import refine_particles
from cryo_forum.streams.simulation import write_simulation


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """40 particles of 48 px at SNR 1, centred, and the map they were made from."""
    folder = tmp_path_factory.mktemp("refine") / "sim"
    volume, pixel_size = load_volume(benchmark_map_path(), pixel_size=6.0, size=48)
    write_simulation(folder, volume, pixel_size, 40, snr=1.0, ctf=True, seed=4)
    return ParticleSet.open(folder / "particles.star"), read_volume(folder / "volume.mrc")[0]


def _rotated_away(quaternions: np.ndarray, degrees: float, seed: int) -> np.ndarray:
    """The poses rotated by ``degrees`` about random axes."""
    axes = np.random.default_rng(seed).normal(size=(len(quaternions), 3))
    axes *= np.radians(degrees) / np.linalg.norm(axes, axis=1, keepdims=True)
    return geometry.quaternion_multiply(geometry.matrix_to_quaternion(geometry.rotvec_to_matrix(axes)), quaternions)


def _errors(table, particles) -> tuple[np.ndarray, np.ndarray]:
    """Pose errors (degrees) and origin errors (px) of refined columns against the particles' truth."""
    poses = geometry.euler_to_quaternion(table[list(star.ANGLES)].to_numpy())
    angles = np.degrees(geometry.geodesic_distance(poses, particles.quaternions()))
    origins = table[[star.ORIGIN_X_ANGST, star.ORIGIN_Y_ANGST]].to_numpy() / particles.pixel_size
    return angles, np.hypot(*(origins - particles.shifts_px()).T)


def test_a_particle_8_degrees_and_2_px_away_is_recovered(simulated):
    particles, volume = simulated
    start = _rotated_away(particles.quaternions(), 8.0, 0)
    directions = np.random.default_rng(1).uniform(0, 2 * np.pi, len(particles))
    origins = particles.shifts_px() + 2.0 * np.stack([np.cos(directions), np.sin(directions)], axis=1)
    table = refine_particles(particles, volume, start, np.full(len(particles), 6.0), origins, progress=False)
    angles, shifts = _errors(table, particles)
    assert np.median(angles) < 1.0 and np.percentile(angles, 80) < 2.0
    assert np.median(shifts) < 0.3
    assert np.all(np.isfinite(table[star.REFINED_ERROR]))
    covered = np.mean(angles <= table[star.REFINED_BOUND].to_numpy())  # the fit's own 90 % bound, against the true map
    assert 0.75 <= covered, covered


def test_an_unsure_particle_gets_the_wider_search(simulated):
    """40 degrees off: the search a sure network (2 degrees) earns cannot reach that far (its stages' steps add up
    to less), an unsure one's (20 degrees: a radius beyond global_above_deg, so a global search first) finds it."""
    particles, volume = simulated
    start = _rotated_away(particles.quaternions(), 40.0, 2)
    settings = RefineSettings(shift_px=0.0)
    reach = settings.iterations * settings.steps()[settings.first_stages(np.array([2.0]))[0] :].sum()
    assert reach < 30.0
    sure = refine_particles(particles, volume, start, np.full(len(particles), 2.0), settings=settings, progress=False)
    unsure = refine_particles(
        particles, volume, start, np.full(len(particles), 20.0), settings=settings, progress=False
    )
    assert np.median(_errors(sure, particles)[0]) > 10.0
    assert np.median(_errors(unsure, particles)[0]) < 1.5


def test_an_interrupted_refinement_resumes_with_the_blocks_it_finished(simulated, tmp_path, monkeypatch):
    from cryo_forum.prediction import refinement

    particles, volume = simulated
    start = _rotated_away(particles.quaternions(), 4.0, 5)
    widths = np.full(len(particles), 3.0)
    settings = RefineSettings(batch_size=8, retry_above=np.inf)  # one pass: its blocks are counted below
    monkeypatch.setattr(refinement, "CHECKPOINT_PARTICLES", 8)  # 5 blocks of one batch
    calls = []
    original = refinement.LocalRefiner.refine

    def interrupted_at_third(self, indices, *rest):
        calls.append(indices[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, indices, *rest)

    monkeypatch.setattr(refinement.LocalRefiner, "refine", interrupted_at_third)
    partial = tmp_path / "refined.star.partial"
    with pytest.raises(KeyboardInterrupt):
        refine_particles(particles, volume, start, widths, settings=settings, progress=False, partial=partial)
    assert len(list(partial.glob("block-*.npz"))) == 2
    calls.clear()
    monkeypatch.setattr(refinement.LocalRefiner, "refine", lambda self, *a: calls.append(a[0][0]) or original(self, *a))
    resumed = refine_particles(particles, volume, start, widths, settings=settings, progress=False, partial=partial)
    assert calls == [16, 24, 32]  # only the blocks not kept
    whole = refine_particles(particles, volume, start, widths, settings=settings, progress=False)
    np.testing.assert_allclose(resumed.to_numpy(dtype=np.float64), whole.to_numpy(dtype=np.float64), atol=1e-9)
    calls.clear()
    elsewhere = _rotated_away(particles.quaternions(), 4.0, 6)  # other inputs: nothing kept applies
    refine_particles(particles, volume, elsewhere, widths, settings=settings, progress=False, partial=partial)
    assert calls == [0, 8, 16, 24, 32]


def test_a_particle_centred_5_px_off_is_found_by_the_wide_second_search(simulated):
    """A quarter of the particles start 5 px from their origin, beyond the 2 px of the first search: their fit is
    weak for their view, and the second search over origins within 7 px finds them; without it they stay lost."""
    particles, volume = simulated
    off = np.arange(len(particles)) < 10
    directions = np.random.default_rng(8).uniform(0, 2 * np.pi, len(particles))
    origins = particles.shifts_px() + 5.0 * off[:, None] * np.stack([np.cos(directions), np.sin(directions)], axis=1)
    start = _rotated_away(particles.quaternions(), 30.0, 9)
    widths = np.full(len(particles), 20.0)  # unsure: a global search first
    once = refine_particles(
        particles, volume, start, widths, origins, RefineSettings(retry_above=np.inf), progress=False
    )
    twice = refine_particles(
        particles, volume, start, widths, origins, RefineSettings(wide_shift_px=7.0), progress=False
    )
    lost, found = _errors(once, particles)[0], _errors(twice, particles)[0]
    assert np.median(lost[off]) > 10.0 and np.median(lost[~off]) < 1.0
    assert np.median(found[off]) < 1.0 and np.median(found[~off]) < 1.0
    assert np.median(_errors(twice, particles)[1][off]) < 0.3


def test_search_widths_follow_the_expected_error():
    settings = RefineSettings()
    first = settings.first_stages(np.array([0.5, 2.0, 6.0, 14.0, 40.0, np.nan]))
    assert np.all(np.diff(first[:4]) <= 0) and first[0] > first[3]  # less sure: an earlier, wider first stage
    np.testing.assert_array_equal(first[4:], [-1, -1])  # beyond global_above_deg or unknown: global search
    steps = settings.steps()
    assert steps[-1] <= settings.step_deg < steps[-2]


def test_refine_command_writes_refined_columns_and_keeps_the_rest(simulated, tmp_path, capsys):
    particles, volume = simulated
    table = particles.table.copy()
    euler = geometry.quaternion_to_euler(_rotated_away(particles.quaternions(), 5.0, 3))
    columns = {name: euler[:, i] for i, name in enumerate(star.ANGLES)} | {
        star.EXPECTED_ERROR: np.full(len(table), 4.0)
    }
    particles.write_star(tmp_path / "predicted.star", columns=columns)
    from cryo_forum.io.mrc import write_volume

    write_volume(tmp_path / "map.mrc", volume, particles.pixel_size)
    out = tmp_path / "refined.star"
    assert (
        cli(
            [
                "refine",
                "--star",
                str(tmp_path / "predicted.star"),
                "--volume",
                str(tmp_path / "map.mrc"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "refined 40 particles" in capsys.readouterr().out
    assert not (tmp_path / "refined.star.partial").exists()  # the finished blocks go once the output is whole
    refined = ParticleSet.open(out)
    angles, _ = _errors(refined.table, particles)
    assert np.median(angles) < 1.0
    assert set(table.columns) <= set(refined.table.columns)
    np.testing.assert_array_equal(refined.table[star.EXPECTED_ERROR], 4.0)  # the network's, kept
    assert refined.table[star.REFINED_ERROR].median() < 4.0


def test_refine_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    volume, pixel_size = load_volume(benchmark_map_path(), pixel_size=12.0, size=24)
    write_simulation(tmp_path / "sim", volume, pixel_size, 4, snr=1.0, seed=0)
    particles = ParticleSet.open(tmp_path / "sim" / "particles.star")
    from cryo_forum.io.star import write_star

    write_star(tmp_path / "bare.star", {"particles": particles.table.drop(columns=list(star.ANGLES))})
    particles.write_star(tmp_path / "text.star", columns={star.EXPECTED_ERROR: ["abc", "1", "2", "3"]})
    good_star, good_map = tmp_path / "sim" / "particles.star", tmp_path / "sim" / "volume.mrc"
    out = tmp_path / "refined.star"
    cases = [
        (good_star, tmp_path / "none.mrc", [], "none.mrc: file not found"),
        (good_star, good_map, ["--refine-step", "0"], "--refine-step"),
        (good_star, good_map, ["--mask", str(tmp_path / "no_mask.mrc")], "--mask: "),
        (tmp_path / "text.star", good_map, [], f"text.star: non-numeric values in {star.EXPECTED_ERROR}"),
    ]
    for star_file, volume_file, extra, message in cases:
        status = cli(["refine", "--star", str(star_file), "--volume", str(volume_file), "--out", str(out), *extra])
        error = capsys.readouterr().err
        assert status == 1 and message in error and len(error.strip().splitlines()) == 1, error
        assert not out.exists()


def test_particles_without_poses_are_searched_globally(simulated, tmp_path):
    """`refine` on particles that were never aligned: the global grid, then the local fit (match's search with
    refinement's finish)."""
    particles, volume = simulated
    from cryo_forum.io.mrc import write_volume
    from cryo_forum.io.star import write_star

    bare = particles.source.parent / "never_aligned.star"  # beside its stack
    write_star(bare, {"particles": particles.table.drop(columns=list(star.ANGLES))})
    write_volume(tmp_path / "map.mrc", volume, particles.pixel_size)
    out = tmp_path / "refined.star"
    assert cli(["refine", "--star", str(bare), "--volume", str(tmp_path / "map.mrc"), "--out", str(out)]) == 0
    angles, shifts = _errors(ParticleSet.open(out).table, particles)
    assert np.median(angles) < 1.0 and np.median(shifts) < 0.3


def test_images_the_map_cannot_explain_score_as_junk(tmp_path):
    """Pure noise (a weak fit) and another molecule (power the projection leaves over) score above the particles."""
    volume, pixel_size = load_volume(benchmark_map_path(), pixel_size=6.0, size=48)
    options = dict(snr=0.5, ctf=True, seed=7, outlier_fraction=0.3, outlier_kinds=("noise", "decoy"))
    write_simulation(tmp_path / "sim", volume, pixel_size, 120, **options)
    particles = ParticleSet.open(tmp_path / "sim" / "particles.star")
    kinds = particles.table[star.OUTLIER_KIND].to_numpy()
    assert {"noise", "decoy"} <= set(kinds)
    table = refine_particles(particles, volume, particles.quaternions(), np.full(len(particles), 60.0), progress=False)
    scores = table[star.FIT_JUNK_SCORE].to_numpy()
    for kind in ("noise", "decoy"):
        assert np.median(scores[kinds == kind]) > np.percentile(scores[kinds == "none"], 90), kind
    particles.write_star(tmp_path / "refined.star", columns=table)
    kept = tmp_path / "kept.star"
    argv = ["filter", "--star", str(tmp_path / "refined.star"), "--out", str(kept), "--metric", "fit_junk_score"]
    assert cli([*argv, "--threshold", "3"]) == 0
    kept_kinds = ParticleSet.open(kept).table[star.OUTLIER_KIND].to_numpy()
    assert np.mean(kept_kinds == "none") > np.mean(kinds == "none") and np.sum(kept_kinds == "none") > 0.8 * np.sum(
        kinds == "none"
    )
