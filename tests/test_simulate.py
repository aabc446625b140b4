"""Simulated particles: CTF, SNR, shifts, outliers, symmetry, reproducibility, files and the CLI."""

import dataclasses
import re

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryo_forum import cli, geometry, resources
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.maps import example_map_path, example_model_path, load_volume
from cryo_forum.io.mrc import read_volume
from cryo_forum.physics.ctf import compute_ctf
from cryo_forum.physics.fourier import translate_images
from cryo_forum.physics.projection import project
from cryo_forum.streams import simulation
from cryo_forum.streams.preprocess import CTF_KEYS
from cryo_forum.streams.simulation import (
    OUTLIER_KINDS,
    SimulationSettings,
    simulate_particles,
    simulated_batches,
    write_simulation,
)

SIZE = 32
PIXEL_SIZE = 3.0


@pytest.fixture(scope="module")
def volume():
    volume, _ = load_volume(example_map_path(), pixel_size=PIXEL_SIZE, size=SIZE)
    return volume


def true_quaternions(particles):
    return geometry.euler_to_quaternion(particles[list(star.ANGLES)].to_numpy())


def origins_px(particles):
    return particles[[star.ORIGIN_X_ANGST, star.ORIGIN_Y_ANGST]].to_numpy() / PIXEL_SIZE


def test_noise_free_images_are_shifted_projections_at_the_poses_of_the_table(volume):
    images, _, particles = simulate_particles(volume, PIXEL_SIZE, 12, ctf=False, max_shift_px=4.0, seed=1)
    shifts = origins_px(particles)
    assert np.abs(shifts).max() > 1.0 and np.abs(shifts).max() <= 4.0
    centred = project(volume, true_quaternions(particles))  # from the angles written to the table
    np.testing.assert_allclose(images, translate_images(centred, -shifts), atol=1e-3 * np.abs(centred).max())
    # independent of translate_images: the particle's centre of mass sits at (its centred place) - origin
    for image, reference, shift in zip(images, centred, shifts, strict=True):
        moved = np.subtract(_centroid(image), _centroid(reference))  # (rows, columns)
        np.testing.assert_allclose(moved, -shift[::-1], atol=0.15)


def _centroid(image):
    """(row, column) centre of mass of a noise-free particle image (positive density, no CTF)."""
    rows, cols = np.indices(image.shape)
    weights = np.clip(image, 0, None)
    return (rows * weights).sum() / weights.sum(), (cols * weights).sum() / weights.sum()


def test_ctf_multiplies_the_spectrum_with_the_table_defocus(volume):
    options = dict(max_shift_px=2.0, bfactor=(0.0, 50.0), seed=2)
    plain, _, _ = simulate_particles(volume, PIXEL_SIZE, 6, ctf=False, **options)
    images, optics, particles = simulate_particles(volume, PIXEL_SIZE, 6, ctf=True, **options)
    ctf = compute_ctf(
        SIZE,
        optics[star.IMAGE_PIXEL_SIZE][0],
        particles[star.DEFOCUS_U].to_numpy(),
        particles[star.DEFOCUS_V].to_numpy(),
        particles[star.DEFOCUS_ANGLE].to_numpy(),
        optics[star.VOLTAGE][0],
        optics[star.CS][0],
        optics[star.AMPLITUDE_CONTRAST][0],
        particles[star.CTF_BFACTOR].to_numpy(),
    )
    spectra, plain_spectra = np.fft.fft2(images), np.fft.fft2(plain)
    scale = np.abs(plain_spectra).max()
    np.testing.assert_allclose(spectra, plain_spectra * ctf, atol=1e-4 * scale)
    assert np.abs(spectra[np.abs(ctf) < 0.02]).max() < 0.03 * scale  # zeros of the CTF are zeros of the image
    defocus = particles[[star.DEFOCUS_U, star.DEFOCUS_V]].to_numpy()
    assert (defocus >= 10000 - 500).all() and (defocus <= 25000 + 500).all()
    assert (particles[star.DEFOCUS_U] >= particles[star.DEFOCUS_V]).all()


def test_snr_measured_on_the_output_matches_the_request(volume):
    clean, _, _ = simulate_particles(volume, PIXEL_SIZE, 300, seed=3)
    noisy, _, _ = simulate_particles(volume, PIXEL_SIZE, 300, snr=0.5, seed=3)
    noise = noisy - clean
    assert abs(noise.mean()) < 0.01 * noise.std()
    measured = np.var(clean, axis=(1, 2)).mean() / np.var(noise)
    assert measured == pytest.approx(0.5, rel=0.1)


def test_outliers_are_labelled_in_the_requested_fraction_and_differ_from_particles(volume):
    n = 200
    reference, _, _ = simulate_particles(volume, PIXEL_SIZE, n, seed=4)
    images, _, particles = simulate_particles(volume, PIXEL_SIZE, n, outlier_fraction=0.25, seed=4)
    labels = particles[star.OUTLIER].to_numpy()
    kinds = particles[star.OUTLIER_KIND].to_numpy()
    assert set(np.unique(labels)) == {0, 1}
    assert labels.mean() == pytest.approx(0.25, abs=0.1)  # each particle an outlier with probability 0.25: 3 sigma
    assert set(kinds[labels == 1]) == set(OUTLIER_KINDS)
    assert set(kinds[labels == 0]) == {"none"}
    scale = np.abs(reference).max()
    np.testing.assert_allclose(images[labels == 0], reference[labels == 0], atol=1e-6 * scale)  # same particles
    for i in np.flatnonzero(labels):
        correlation = np.corrcoef(images[i].ravel(), reference[i].ravel())[0, 1]
        assert correlation < 0.95, (kinds[i], correlation)  # a broken particle seen along its cut looks alike
        assert np.isfinite(images[i]).all() and images[i].std() > 0.1 * reference.std()


def test_symmetry_restricts_poses_to_the_asymmetric_unit(volume):
    _, _, particles = simulate_particles(volume, PIXEL_SIZE, 50, symmetry="D2", ctf=False, seed=5)
    quaternions = true_quaternions(particles)
    reduced = geometry.reduce_to_asymmetric_unit(quaternions, "D2")
    np.testing.assert_allclose(geometry.geodesic_distance(quaternions, reduced), 0.0, atol=1e-4)
    _, _, unrestricted = simulate_particles(volume, PIXEL_SIZE, 50, ctf=False, seed=5)
    free = true_quaternions(unrestricted)
    moved = geometry.geodesic_distance(free, geometry.reduce_to_asymmetric_unit(free, "D2"))
    assert (moved > 1e-3).mean() > 0.5  # uniform poses mostly lie outside one quarter of SO(3)


def test_a_seed_reproduces_everything_and_chunks_do_not_matter(volume, tmp_path):
    options = dict(snr=1.0, max_shift_px=2.0, outlier_fraction=0.3, seed=6)
    first = simulate_particles(volume, PIXEL_SIZE, 20, **options)
    second = simulate_particles(volume, PIXEL_SIZE, 20, **options)
    np.testing.assert_array_equal(first.images, second.images)
    assert first.particles.equals(second.particles)
    other = simulate_particles(volume, PIXEL_SIZE, 20, **{**options, "seed": 7})
    assert not np.allclose(first.images, other.images)
    fewer = simulate_particles(volume, PIXEL_SIZE, 6, **options)  # particle i does not depend on n
    # up to float32 rounding, which depends on the batch's size (batched FFTs); another particle differs by O(1)
    np.testing.assert_allclose(fewer.images, first.images[:6], atol=1e-5 * np.abs(first.images).max())
    pd.testing.assert_frame_equal(fewer.particles, first.particles.iloc[:6], rtol=1e-6)  # float32 rounding
    write_simulation(tmp_path / "sim", volume, PIXEL_SIZE, 20, chunk_size=7, **options)
    with mrcfile.open(tmp_path / "sim" / "particles.mrcs") as mrc:
        np.testing.assert_allclose(mrc.data, first.images, atol=1e-5 * np.abs(first.images).max())


def test_written_files_read_back_as_relion_31(volume, tmp_path):
    out = tmp_path / "sim"
    sim = simulate_particles(volume, PIXEL_SIZE, 10, snr=1.0, outlier_fraction=0.2, seed=8)
    write_simulation(out, volume, PIXEL_SIZE, 10, snr=1.0, outlier_fraction=0.2, seed=8)
    assert sorted(p.name for p in out.iterdir()) == ["particles.mrcs", "particles.star", "volume.mrc"]
    blocks = starfile.read(out / "particles.star", always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    optics, particles = blocks["optics"], blocks["particles"]
    assert optics[star.VOLTAGE][0] == 300 and optics[star.CS][0] == 2.7
    assert optics[star.AMPLITUDE_CONTRAST][0] == 0.1 and optics[star.IMAGE_SIZE][0] == SIZE
    assert optics[star.IMAGE_PIXEL_SIZE][0] == PIXEL_SIZE
    assert particles[star.IMAGE_NAME].tolist() == [f"{i:06d}@particles.mrcs" for i in range(1, 11)]
    np.testing.assert_allclose(particles[list(star.ANGLES)], sim.particles[list(star.ANGLES)], atol=1e-5)
    np.testing.assert_array_equal(particles[star.OUTLIER_KIND], sim.particles[star.OUTLIER_KIND])
    np.testing.assert_array_equal(particles[star.OUTLIER], particles[star.OUTLIER_KIND] != "none")
    with mrcfile.open(out / "volume.mrc") as mrc:
        np.testing.assert_allclose(mrc.data, volume, rtol=1e-6)
        assert mrc.voxel_size.x == pytest.approx(PIXEL_SIZE)
    with mrcfile.open(out / "particles.mrcs") as mrc:
        assert mrc.data.shape == (10, SIZE, SIZE) and mrc.voxel_size.x == pytest.approx(PIXEL_SIZE)


def test_a_failure_while_writing_leaves_nothing(volume, tmp_path, monkeypatch):
    render = simulation.ParticleRenderer.render

    def fail_on_second_chunk(self, index, seed):
        if index[0] > 0:
            raise RuntimeError("disk full")
        return render(self, index, seed)

    monkeypatch.setattr(simulation.ParticleRenderer, "render", fail_on_second_chunk)
    with pytest.raises(RuntimeError):
        write_simulation(tmp_path / "sim", volume, PIXEL_SIZE, 10, chunk_size=4)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_write_over_its_input(volume, tmp_path):
    source = tmp_path / "volume.mrc"
    source.write_bytes(b"input")
    with pytest.raises(CryoForumError, match="overwrite"):
        write_simulation(tmp_path, volume, PIXEL_SIZE, 2, inputs=(source,))
    assert source.read_bytes() == b"input"


# ---------------------------------------------------------------- the command line


def test_cli_writes_exactly_the_three_files(tmp_path):
    out = tmp_path / "sim"
    argv = ["simulate", "--volume", str(example_map_path()), "--n", "12", "--box-size", "32", "--apix", "3"]
    argv += ["--snr", "1", "--outliers", "0.25", "--max-shift", "2", "--defocus-range", "8000", "12000"]
    assert cli.main([*argv, "--seed", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["particles.mrcs", "particles.star", "volume.mrc"]
    blocks = starfile.read(out / "particles.star", always_dict=True)
    assert blocks["optics"][star.IMAGE_SIZE][0] == 32 and blocks["optics"][star.IMAGE_PIXEL_SIZE][0] == 3.0
    assert len(blocks["particles"]) == 12 and blocks["particles"][star.OUTLIER].sum() > 0
    kinds = blocks["particles"][star.OUTLIER_KIND]
    np.testing.assert_array_equal(blocks["particles"][star.OUTLIER], kinds != "none")
    assert set(kinds) <= {"none", *OUTLIER_KINDS}
    assert blocks["particles"][star.DEFOCUS_V].min() >= 8000 - 500


def test_cli_model_input_gives_the_same_map_as_the_shipped_example(tmp_path):
    argv = ["simulate", "--n", "4", "--box-size", "32", "--apix", "3", "--no-ctf"]
    assert cli.main([*argv, "--volume", str(example_model_path()), "--out", str(tmp_path / "model")]) == 0
    assert cli.main([*argv, "--volume", str(example_map_path()), "--out", str(tmp_path / "map")]) == 0
    blocks = starfile.read(tmp_path / "model" / "particles.star", always_dict=True)
    assert star.DEFOCUS_U not in blocks["particles"]  # --no-ctf
    with mrcfile.open(tmp_path / "model" / "volume.mrc") as a, mrcfile.open(tmp_path / "map" / "volume.mrc") as b:
        assert np.corrcoef(a.data.ravel(), b.data.ravel())[0, 1] > 0.98


def test_the_command_and_the_training_stream_give_particle_i_the_same_image(tmp_path):
    """`cryo-forum simulate --seed S` writes particle i as batch i // B of simulated_batches(seed=S) shows it, for
    particles and for every outlier kind, with the same pose, label and CTF."""
    out, seed, n, batch_size = tmp_path / "sim", 5, 40, 8
    argv = ["simulate", "--volume", str(example_map_path()), "--n", str(n), "--box-size", "32", "--apix", "3"]
    argv += ["--snr", "0.5", "--outliers", "0.6", "--max-shift", "2", "--bfactor", "0", "80", "--seed", str(seed)]
    assert cli.main([*argv, "--out", str(out)]) == 0
    particles = starfile.read(out / "particles.star", always_dict=True)["particles"]
    kinds = particles[star.OUTLIER_KIND].to_numpy()
    assert set(kinds) == {"none", *OUTLIER_KINDS}
    with mrcfile.open(out / "particles.mrcs") as mrc:
        written = mrc.data.copy()
    volume, pixel_size = read_volume(out / "volume.mrc")
    settings = SimulationSettings(
        n=1, snr=0.5, outlier_fraction=0.6, max_shift_px=2.0, bfactor=(0.0, 80.0), seed=seed
    )  # n does not matter
    stream = simulated_batches(volume, pixel_size, settings, batch_size, seed=seed, start=1)
    batches = list(stream.take(n // batch_size - 1).as_numpy_iterator())
    index = np.concatenate([batch.index for batch in batches])
    np.testing.assert_array_equal(index, np.arange(batch_size, n))
    images = np.concatenate([batch.images for batch in batches])
    for kind in ("none", *OUTLIER_KINDS):
        rows = index[kinds[index] == kind]
        assert len(rows), kind
        np.testing.assert_allclose(images[rows - batch_size], written[rows], atol=1e-5 * np.abs(written).max())
    outlier = np.concatenate([batch.outlier for batch in batches])
    np.testing.assert_array_equal(outlier, particles[star.OUTLIER].to_numpy()[index])
    quaternions = np.concatenate([batch.quaternion for batch in batches])
    distance = geometry.geodesic_distance(quaternions, true_quaternions(particles)[index])
    assert distance.max() < 1e-3
    defocus = np.concatenate([batch.ctf[:, CTF_KEYS.index("defocus_u")] for batch in batches])
    origins = np.concatenate([batch.origin for batch in batches])
    np.testing.assert_allclose(
        origins * pixel_size, particles[[star.ORIGIN_X_ANGST, star.ORIGIN_Y_ANGST]].to_numpy()[index], atol=1e-4
    )
    np.testing.assert_allclose(defocus, particles[star.DEFOCUS_U].to_numpy()[index], rtol=1e-6)


@pytest.mark.parametrize(
    "change, named",
    [
        (["--n", "0"], "--n"),
        (["--box-size", "-4"], "--box-size"),
        (["--snr", "0"], "--snr"),
        (["--outliers", "1.5"], "--outliers"),
        (["--outliers", "-0.1"], "--outliers"),
        (["--max-shift", "-1"], "--max-shift"),  # the field is max_shift_px
        (["--symmetry", "X7"], "--symmetry"),
        (["--apix", "0"], "--apix"),
        (["--defocus-range", "20000", "10000"], "--defocus-range"),
        (["--outlier-kinds", "noise,gremlins"], "--outlier-kinds"),
        (["--volume", "missing.mrc"], "missing.mrc"),
    ],
)
def test_cli_bad_options_fail_with_one_line_and_write_nothing(tmp_path, capsys, change, named):
    options = {"--volume": [str(example_map_path())], "--n": ["4"], "--box-size": ["32"]}
    options[change[0]] = change[1:]
    argv = ["simulate", *[part for key, values in options.items() for part in (key, *values)]]
    assert cli.main([*argv, "--out", str(tmp_path / "sim")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and named in error
    assert not re.search(r"\b[a-z]+_[a-z_]+:", error)  # options, not the settings' field names (max_shift_px: ...)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (["--box-size", "100000"], r"--box-size: a 100000 px box needs \d+ TB of memory for the projector"),
        (["--n", "1000000000000"], r"--n: 1000000000000 particles of 32 px need \d+ TB on disk; .* free"),
        (
            ["--box-size", "1000", "--n", "10", "--outliers", "0.5"],
            r"--box-size: a 1000 px box needs \d+ GB of memory for the projectors of the map and its 4 outlier maps",
        ),
    ],
)
def test_cli_refuses_absurd_requests_up_front_with_their_cost(tmp_path, capsys, monkeypatch, change, message):
    from cryo_forum.io import maps

    monkeypatch.setattr(maps, "load_volume", _must_not_run)  # refused before the map is resampled into the box
    monkeypatch.setattr(resources, "available_memory", lambda: 16 * 10**9)
    options = {"--volume": [str(example_map_path())], "--n": ["4"], "--box-size": ["32"]}
    for key, value in zip(change[::2], change[1::2], strict=True):
        options[key] = [value]
    argv = ["simulate", *[part for key, values in options.items() for part in (key, *values)]]
    assert cli.main([*argv, "--out", str(tmp_path / "sim")]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and re.search(message, error), error
    assert "this machine has 16 GB available" in error or "on disk" in error
    assert list(tmp_path.iterdir()) == []


def _must_not_run(*args, **kwargs):
    raise AssertionError("the map was loaded")


def test_library_functions_refuse_what_cannot_fit(volume, tmp_path, monkeypatch):
    huge = np.broadcast_to(np.float32(0.0), (100_000,) * 3)  # a map that takes no memory
    with pytest.raises(InvalidSetting, match="TB of memory") as caught:
        simulate_particles(huge, PIXEL_SIZE, 2)
    assert caught.value.setting == "size"
    with pytest.raises(InvalidSetting, match="TB of memory") as caught:
        write_simulation(tmp_path / "big", volume, PIXEL_SIZE, 2, size=100_000)
    assert caught.value.setting == "size"
    with pytest.raises(InvalidSetting, match="TB on disk") as caught:
        write_simulation(tmp_path / "many", volume, PIXEL_SIZE, 10**12)
    assert caught.value.setting == "n"
    images = resources.stack_bytes(10**6, SIZE)  # 4 GB of images in memory, against 1 GB available
    monkeypatch.setattr(resources, "available_memory", lambda: 10**9)
    with pytest.raises(InvalidSetting, match="simulating 1000000 particles of 32 px in memory needs") as caught:
        simulate_particles(volume, PIXEL_SIZE, 10**6)
    assert caught.value.setting == "n" and images > 10**9
    assert list(tmp_path.iterdir()) == []


def test_large_boxes_are_rendered_a_few_images_at_a_time(volume, tmp_path, monkeypatch):
    calls = []
    render = simulation.ParticleRenderer.render

    def counted(self, index, seed):
        calls.append(list(index))
        return render(self, index, seed)

    monkeypatch.setattr(simulation.ParticleRenderer, "render", counted)
    monkeypatch.setattr(resources, "CHUNK_VALUES", 3 * SIZE**2)  # as if the box were large: 3 images per chunk
    options = dict(snr=1.0, outlier_fraction=0.3, seed=9)
    write_simulation(tmp_path / "sim", volume, PIXEL_SIZE, 10, chunk_size=256, **options)
    assert calls == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]  # one shape: the last chunk rendered whole
    monkeypatch.undo()
    reference = simulate_particles(volume, PIXEL_SIZE, 10, **options).images
    with mrcfile.open(tmp_path / "sim" / "particles.mrcs") as mrc:
        np.testing.assert_allclose(mrc.data, reference, atol=1e-5 * np.abs(reference).max())


def test_every_option_states_its_default_and_the_settings_keep_their_names():
    parser = cli.build_parser()
    command = next(action for action in parser._actions if action.dest == "command").choices["simulate"]
    for action in command._actions:
        if action.option_strings and action.dest != "help":
            stated = "(required)" if action.required else "default"
            assert stated in action.help, action.option_strings
    fields = {field.name for field in dataclasses.fields(SimulationSettings)}
    assert {"n", "snr", "ctf", "defocus_range", "max_shift_px", "outlier_fraction", "outlier_kinds", "seed"} <= fields
