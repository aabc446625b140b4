"""The simulated refinement job: its files, the consensus and the rest, optics groups, the Fourier crop of the
extraction, preferred views, the junk kinds, the noise, atomic writing and determinism from the seed."""

import json

import numpy as np
import pytest

from cryo_forum import geometry
from cryo_forum.analysis.coverage import viewing_coverage
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.maps import benchmark_map_path, example_map_path, load_volume
from cryo_forum.io.mrc import read_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.fourier import FourierGrid, fourier_crop
from cryo_forum.streams import job
from cryo_forum.streams.job import JOB_KINDS, JUNK_KINDS, JobSettings, JobSimulator, plan_job, write_job_from_files

SETTINGS = JobSettings(
    n=80, n_consensus=48, box=32, extract_box=64, pixel_size=9.16, particles_per_micrograph=20, seed=5
)  # 32 px at 9.16 A/px, extracted at 64 px and 4.58 A/px: the benchmark's 293 A box


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_job_from_files(
        tmp_path_factory.mktemp("jobs") / "job", benchmark_map_path(), example_map_path(), SETTINGS
    )


@pytest.fixture(scope="module")
def simulator():
    maps = [benchmark_map_path(), example_map_path()]
    volumes = [load_volume(path, SETTINGS.extraction_pixel_size, SETTINGS.extract_box)[0] for path in maps]
    return JobSimulator(*(volume.astype(np.float64) for volume in volumes), SETTINGS)


@pytest.fixture(scope="module")
def truth(written):
    return ParticleSet.open(written / job.TRUTH_STAR)


def by_name(particles: ParticleSet, truth: ParticleSet) -> np.ndarray:
    """Rows of ``truth`` holding each particle of ``particles`` (matched by rlnImageName)."""
    rows = {name: row for row, name in enumerate(truth.table[star.IMAGE_NAME])}
    return np.array([rows[name] for name in particles.table[star.IMAGE_NAME]])


def test_the_job_has_its_files_and_counts(written, truth):
    names = {path.name for path in written.iterdir()}
    assert names == {"consensus.star", "rest.star", "truth.star", "map.mrc", "job.json", "Particles"}
    stacks = sorted((written / "Particles").iterdir())
    assert [path.name for path in stacks] == [f"mic{number:05d}.mrcs" for number in range(1, 5)]  # 20 a micrograph
    record = json.loads((written / "job.json").read_text())
    assert JobSettings(**record["settings"]) == SETTINGS
    assert record["maps"]["map"]["path"] == str(benchmark_map_path().resolve())
    assert len(record["maps"]["other_map"]["sha256"]) == 64
    counts = record["counts"]
    assert counts["all"] == {"none": 64, "aggregate": 4, "carbon": 4, "other_protein": 4, "empty": 4}  # 20 % junk
    assert sum(counts["consensus"].values()) == 48 and sum(counts["rest"].values()) == 32
    table = truth.table
    for part in ("consensus", "rest"):
        kinds = table[star.OUTLIER_KIND][table[job.JOB_SET] == part]
        assert kinds.value_counts().to_dict() == {kind: count for kind, count in counts[part].items() if count}
    volume, pixel_size = read_volume(written / "map.mrc")
    assert volume.shape == (32, 32, 32) and pixel_size == pytest.approx(9.16, rel=1e-5)


def test_consensus_poses_are_near_the_truth_and_junk_is_not_flagged(written, truth):
    consensus = ParticleSet.open(written / job.CONSENSUS_STAR)
    assert not {star.OUTLIER, star.OUTLIER_KIND, job.JOB_SET} & set(consensus.table.columns)
    rows = by_name(consensus, truth)
    assert (truth.table[job.JOB_SET].to_numpy()[rows] == "consensus").all()
    errors = np.degrees(geometry.geodesic_distance(consensus.quaternions(), truth.quaternions()[rows]))
    shifts = consensus.shifts_px() - truth.shifts_px()[rows]
    junk = truth.table[star.OUTLIER].to_numpy()[rows] == 1
    assert np.sqrt(np.mean(errors[~junk] ** 2)) == pytest.approx(1.5, abs=0.4) and errors[~junk].max() < 5.0
    assert shifts[~junk].std() == pytest.approx(0.3, abs=0.1)
    assert np.median(errors[junk]) > 30.0  # the junk's poses are anything
    assert set(consensus.table[star.RANDOM_SUBSET]) == {1, 2}


def test_the_rest_has_ctf_and_optics_but_no_angles_or_origins(written, truth):
    rest = ParticleSet.open(written / job.REST_STAR)
    assert len(rest) == 32 and rest.has_ctf and not rest.has_poses
    assert not {star.ORIGIN_X_ANGST, star.ORIGIN_Y_ANGST, star.ORIGIN_X, star.ORIGIN_Y} & set(rest.table.columns)
    rows = by_name(rest, truth)
    assert (truth.table[job.JOB_SET].to_numpy()[rows] == "rest").all()
    for key, values in rest.ctf_parameters().items():
        np.testing.assert_array_equal(values, truth.ctf_parameters()[key][rows])


def test_optics_groups_differ_in_optics_but_share_pixel_size_and_box(written):
    for name in (job.CONSENSUS_STAR, job.REST_STAR, job.TRUTH_STAR):
        particles = ParticleSet.open(written / name)
        assert len(particles.optics) == 3 and particles.pixel_size == pytest.approx(9.16)
        assert particles.box_size == 32
        particles.validate()
        assert particles.images(np.arange(len(particles))).shape == (len(particles), 32, 32)
        assert all(stack.startswith("Particles/mic") for stack in particles.stack_names)  # relative to the STAR
    table = ParticleSet.open(written / job.TRUTH_STAR).table
    voltage = table.groupby(star.OPTICS_GROUP)[star.VOLTAGE].first().to_dict()
    assert voltage == {1: 300.0, 2: 300.0, 3: 200.0}
    groups = table.groupby(star.MICROGRAPH_NAME)[star.OPTICS_GROUP].nunique()
    assert (groups == 1).all()  # a micrograph is in one group


def test_written_images_are_the_extraction_rendering_fourier_cropped(written, truth, simulator):
    rows = np.array([0, 7, 21, 63, 79])
    extracted = simulator.extracted(rows)
    assert extracted.shape == (5, 64, 64)
    written_images = truth.images(rows)
    np.testing.assert_allclose(written_images, fourier_crop(extracted, 32), atol=1e-5 * np.abs(written_images).max())
    assert np.abs(written_images - extracted[:, ::2, ::2]).max() > 0.1 * np.abs(written_images).max()  # not decimated
    tables = job.job_tables(simulator.plan, SETTINGS)  # the same plan: the seed fixes everything
    np.testing.assert_allclose(truth.table[star.ANGLE_ROT], tables[job.TRUTH_STAR][star.ANGLE_ROT], atol=1e-5)


def test_snr_and_noise_spectrum_hold_at_the_working_size(truth, simulator):
    rows = np.arange(80)
    signal = fourier_crop(simulator.signal(rows), 32)
    noise = truth.images(rows) - signal
    inliers = simulator.plan.kind == 0
    snr = np.mean(np.var(signal[inliers], axis=(1, 2))) / np.mean(np.var(noise, axis=(1, 2)))
    assert snr == pytest.approx(SETTINGS.snr, rel=0.25)
    grid = FourierGrid(32)
    power = np.mean(np.abs(np.fft.rfft2(noise)) ** 2, axis=0)
    measured = np.array([power[grid.shells == shell].mean() for shell in range(2, 16)])
    expected = np.asarray(SETTINGS.noise_spectrum())[2:16]  # the same frequencies in the extraction box's shells
    np.testing.assert_allclose(measured / measured.mean(), expected / expected.mean(), rtol=0.2)
    assert measured[0] / measured[-1] > 1.3  # coloured: falling with frequency (by 1.5 over this band)


def test_preferred_views_gather_most_particles_in_a_few_clusters():
    plan = plan_job(JobSettings())  # the default job's plan, no images
    inliers = plan.quaternion[plan.kind == 0]
    directions = geometry.quaternion_to_matrix(inliers)[:, 2, :]
    cosine = np.cos(np.radians(30))
    near = np.max(directions @ job.view_centres(JobSettings()).T, axis=1) > cosine
    clustered = 1 - np.exp(-20 * (1 - cosine))  # of a cluster's particles (von Mises-Fisher, concentration 20)
    by_chance = 3 * (1 - cosine) / 2  # of the uniform ones: three caps of 30 deg
    assert near.mean() == pytest.approx(0.65 * clustered + 0.35 * by_chance, abs=0.03)
    uniform = viewing_coverage(geometry.random_quaternions(len(inliers), 0))
    assert viewing_coverage(inliers) < 0.6 * uniform
    in_plane = geometry.quaternion_to_euler(inliers)[:, 2]
    assert np.histogram(in_plane, bins=6, range=(-180, 180))[0].min() > 0.8 * len(inliers) / 6  # psi uniform


def test_each_junk_kind_is_present_labelled_and_looks_its_part(truth, simulator):
    table = truth.table
    kinds = table[star.OUTLIER_KIND].to_numpy()
    assert set(kinds) == set(JOB_KINDS)
    np.testing.assert_array_equal(table[star.OUTLIER].to_numpy(), (kinds != "none").astype(int))
    signal = simulator.signal(np.arange(80))
    std = signal.std(axis=(1, 2)) / simulator.signal_std
    np.testing.assert_array_equal(signal[kinds == "empty"], 0.0)  # the noise alone
    np.testing.assert_allclose(std[kinds == "carbon"], simulator.plan.carbon_contrast[kinds == "carbon"], rtol=1e-4)
    assert 0.5 < np.median(std[kinds == "other_protein"]) < 2.0  # another molecule at the particles' contrast
    y, x = np.indices((64, 64)) - 32
    spread = np.sqrt(np.sum(np.abs(signal) * (x**2 + y**2), axis=(1, 2)) / np.sum(np.abs(signal) + 1e-12, axis=(1, 2)))
    assert spread[kinds == "aggregate"].min() > np.median(spread[kinds == "none"])  # copies beside the particle
    assert set(JUNK_KINDS) == set(JOB_KINDS) - {"none"}


def test_the_plan_follows_from_the_seed():
    first, again = plan_job(SETTINGS), plan_job(SETTINGS)
    other = plan_job(JobSettings(**{**SETTINGS.__dict__, "seed": 6}))
    for field in ("quaternion", "origin", "kind", "consensus", "copy_offset"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    assert not np.allclose(first.quaternion, other.quaternion)
    np.testing.assert_array_equal(first.ctf["defocus_u"], again.ctf["defocus_u"])


def test_bad_settings_and_used_folders_are_refused_and_a_failed_job_leaves_nothing(tmp_path, written, monkeypatch):
    with pytest.raises(InvalidSetting, match="n_consensus"):
        write_job_from_files(tmp_path / "a", benchmark_map_path(), None, JobSettings(n=10, n_consensus=11))
    with pytest.raises(CryoForumError, match="not empty"):
        write_job_from_files(written, benchmark_map_path(), example_map_path(), SETTINGS)
    with pytest.raises(InvalidSetting, match="other_protein junk needs another map"):
        write_job_from_files(tmp_path / "b", benchmark_map_path(), None, SETTINGS)

    def fail(*_):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(JobSimulator, "images", fail)
    with pytest.raises(RuntimeError):
        write_job_from_files(tmp_path / "c", benchmark_map_path(), example_map_path(), SETTINGS)
    assert not (tmp_path / "c").exists() and list(tmp_path.iterdir()) == []
