"""The one forward model: each kind of particle against an independent NumPy rendering of the image model, draws
that depend only on (seed, index), their distributions, the noise level, and the training stream's interface."""

import numpy as np
import pytest

from cryo_forum import geometry
from cryo_forum.errors import InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.physics import keyed_random
from cryo_forum.physics import renderer as forward_model
from cryo_forum.physics.ctf import compute_ctf
from cryo_forum.physics.fourier import FourierGrid, translate_images
from cryo_forum.physics.projection import project
from cryo_forum.physics.renderer import ParticleRenderer
from cryo_forum.physics.settings import CTF_TABLE_COLUMNS, KINDS, OUTLIER_KINDS
from cryo_forum.physics.specimens import ICE_DRAWS, VARIANTS_PER_KIND, ice_images, outlier_volumes
from cryo_forum.streams.batch import RawBatch
from cryo_forum.streams.preprocess import CTF_KEYS
from cryo_forum.streams.simulation import SimulationSettings, simulate_particles, simulated_batches
from cryo_forum.tensorflow_quiet import tf

SIZE = 32
PIXEL_SIZE = 3.0
MIXED = dict(ctf=True, max_shift_px=3.0, bfactor=(0.0, 80.0), outlier_fraction=0.5, seed=3)


@pytest.fixture(scope="module")
def volume():
    volume, _ = load_volume(example_map_path(), pixel_size=PIXEL_SIZE, size=SIZE)
    return volume.astype(np.float64)


@pytest.fixture(scope="module")
def mixed(volume):
    """A noise-free renderer with CTF, shifts and every outlier kind."""
    return ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, **MIXED))


def numpy_draws(renderer, index, seed=0):
    return {key: value.numpy() for key, value in renderer.draw(np.asarray(index), seed).items()}


def ctf_of(draws, size):
    """The CTF of the draws on the rfft grid of a size px image (MIXED's optics)."""
    keys = ("defocus_u", "defocus_v", "defocus_angle")
    return compute_ctf(size, PIXEL_SIZE, *(draws[k] for k in keys), 300.0, 2.7, 0.1, draws["bfactor"], rfft=True)


def filtered(images, draws):
    return np.fft.irfft2(np.fft.rfft2(images) * ctf_of(draws, images.shape[-1]), s=images.shape[-2:])


def test_particles_decoys_and_broken_maps_are_ctf_filtered_shifted_projections(mixed, volume):
    draws = numpy_draws(mixed, np.arange(64))
    images = mixed.signal(draws).numpy()
    kinds = np.asarray(KINDS)[draws["kind"]]
    maps = {"none": [volume] * VARIANTS_PER_KIND, **outlier_volumes(volume, MIXED["seed"], ("decoy", "broken"))}
    scale = np.abs(images).max()
    for kind, variants in maps.items():
        for variant, map_ in enumerate(variants):
            rows = (kinds == kind) & ((draws["variant"] == variant) | (kind == "none"))
            assert rows.any(), (kind, variant)
            moved = translate_images(project(map_, draws["quaternion"][rows]), -draws["origin"][rows])
            chosen = {key: value[rows] for key, value in draws.items()}
            np.testing.assert_allclose(images[rows], filtered(moved, chosen), atol=2e-5 * scale)
    np.testing.assert_array_equal(images[kinds == "noise"], 0.0)  # noise outliers: only the noise added later


def test_off_centre_particles_are_moved_on_a_canvas_twice_the_box(mixed, volume):
    draws = numpy_draws(mixed, np.arange(3))
    draws["kind"][:] = KINDS.index("off_centre")
    draws["displacement"] = np.array([[10.0, -7.5], [-12.0, 3.0], [0.0, 11.0]], np.float32)
    canvas = np.zeros((3, 2 * SIZE, 2 * SIZE))
    canvas[:, SIZE // 2 : SIZE // 2 + SIZE, SIZE // 2 : SIZE // 2 + SIZE] = project(volume, draws["quaternion"])
    moved = translate_images(canvas, draws["displacement"] - draws["origin"])
    expected = filtered(moved, draws)[:, SIZE // 2 : SIZE // 2 + SIZE, SIZE // 2 : SIZE // 2 + SIZE]
    images = mixed.signal(draws).numpy()
    np.testing.assert_allclose(images, expected, atol=2e-5 * np.abs(expected).max())
    periodic = filtered(
        translate_images(project(volume, draws["quaternion"]), draws["displacement"] - draws["origin"]), draws
    )
    assert np.abs(images - periodic).max() > 0.1 * np.abs(periodic).max()  # what leaves the box does not wrap


def test_ice_is_its_texture_filtered_on_the_canvas_at_its_contrast(mixed):
    draws = numpy_draws(mixed, np.arange(4))
    draws["kind"][:] = KINDS.index("ice")
    texture = ice_images(tf.constant(draws["ice"]), 2 * SIZE, SIZE).numpy()
    cut = filtered(texture, draws)[:, SIZE // 2 : SIZE // 2 + SIZE, SIZE // 2 : SIZE // 2 + SIZE]
    expected = cut * (draws["ice_contrast"] * mixed.signal_std / cut.std(axis=(1, 2)))[:, None, None]
    images = mixed.signal(draws).numpy()
    np.testing.assert_allclose(images, expected, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(images.std(axis=(1, 2)), draws["ice_contrast"] * mixed.signal_std, rtol=1e-4)
    assert (texture.min(axis=(1, 2)) >= 0).all() and (texture.max(axis=(1, 2)) > 0.4).all()
    assert np.corrcoef(texture.reshape(4, -1))[np.triu_indices(4, 1)].max() < 0.9  # every particle its own ice


def test_ice_textures_have_one_to_three_blobs_and_an_edge_half_the_time():
    rng = np.random.default_rng(0)
    draws = rng.uniform(size=(200, ICE_DRAWS)).astype(np.float32)
    draws[:, 0] = np.repeat([0.1, 0.5, 0.9], [67, 67, 66])  # one, two, three blobs
    draws[:, -3] = 0.9  # no straight edge
    textures = ice_images(tf.constant(draws), 64, 32).numpy()
    mass = textures.sum(axis=(1, 2))
    assert mass[:67].mean() < mass[67:134].mean() < mass[134:].mean()
    draws[:, -3] = 0.1  # a straight edge: about half the canvas raised by one
    edged = ice_images(tf.constant(draws), 64, 32).numpy() - textures
    assert np.median(edged.mean(axis=(1, 2))) == pytest.approx(0.5, abs=0.2)


def test_a_particle_depends_only_on_its_seed_and_index(volume):
    renderer = ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, snr=0.5, **{**MIXED, "seed": 2}))
    images, draws = renderer.render(np.arange(16), seed=7)
    images = images.numpy()
    scale = np.abs(images).max()
    for index in ([9, 3, 15], [0], np.arange(15, -1, -1)):
        again, other = renderer.render(np.asarray(index), seed=7)
        np.testing.assert_allclose(again.numpy(), images[index], atol=1e-6 * scale)
        np.testing.assert_array_equal(other["kind"].numpy(), draws["kind"].numpy()[index])
    distant, _ = renderer.render(np.array([3, 10**12]), seed=7)  # any index, with no table of n draws
    np.testing.assert_allclose(distant.numpy()[0], images[3], atol=1e-6 * scale)
    other_seed, _ = renderer.render(np.arange(16), seed=8)
    assert np.abs(other_seed.numpy() - images).max() > 0.5 * scale


def test_outliers_come_in_the_requested_fraction_with_kinds_equally_likely(mixed):
    draws = numpy_draws(mixed, np.arange(2048), seed=11)
    counts = np.bincount(draws["kind"], minlength=len(KINDS))
    assert counts[0] == pytest.approx(1024, abs=4 * 23)  # binomial(2048, 0.5): sigma 23
    for kind in OUTLIER_KINDS:
        assert counts[KINDS.index(kind)] == pytest.approx(2048 * 0.1, abs=4 * 13.6)
    assert np.bincount(draws["variant"]).tolist() == pytest.approx([1024, 1024], abs=4 * 23)
    assert np.mean(draws["subset"] == 1) == pytest.approx(0.5, abs=0.05) and set(draws["subset"]) == {1, 2}


def test_draws_follow_their_distributions(mixed):
    draws = numpy_draws(mixed, np.arange(4000), seed=1)
    mean_defocus = (draws["defocus_u"] + draws["defocus_v"]) / 2
    astigmatism = draws["defocus_u"] - draws["defocus_v"]
    assert mean_defocus.min() >= 10000 and mean_defocus.max() <= 25000
    assert np.mean(mean_defocus) == pytest.approx(17500, abs=200)
    assert astigmatism.min() >= 0 and astigmatism.max() <= 1000
    assert 0 <= draws["defocus_angle"].min() and draws["defocus_angle"].max() < 180
    assert 0 <= draws["bfactor"].min() and draws["bfactor"].max() <= 80
    assert np.abs(draws["origin"]).max() <= 3.0 and np.abs(draws["origin"].mean(axis=0)).max() < 0.1
    reach = np.linalg.norm(draws["displacement"], axis=1) / SIZE
    assert reach.min() >= 0.25 - 1e-6 and reach.max() <= 0.4 + 1e-6
    q = draws["quaternion"]
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    assert (q[:, 3] >= 0).all()
    assert np.abs(q[:, 3]).mean() == pytest.approx(4.0 / (3.0 * np.pi), abs=0.02)  # E|w| under Haar


def test_the_renderers_quaternion_algebra_is_geometrys():
    q1, q2 = geometry.random_quaternions(50, 0), geometry.random_quaternions(50, 1)
    matrices = forward_model._rotation_matrices(tf.constant(q1, tf.float32)).numpy()
    np.testing.assert_allclose(matrices, geometry.quaternion_to_matrix(q1), atol=1e-6)
    product = forward_model._multiply(tf.constant(q1), tf.constant(q2)).numpy()
    np.testing.assert_allclose(product, geometry.quaternion_multiply(q1, q2), atol=1e-12)


def test_symmetric_poses_lie_in_the_asymmetric_unit(volume):
    renderer = ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, ctf=False, symmetry="D2"))
    quaternions = numpy_draws(renderer, np.arange(300))["quaternion"]
    reduced = geometry.reduce_to_asymmetric_unit(quaternions, "D2")
    np.testing.assert_allclose(geometry.geodesic_distance(quaternions, reduced), 0.0, atol=1e-3)
    free = numpy_draws(ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, ctf=False)), np.arange(300))
    moved = geometry.geodesic_distance(free["quaternion"], geometry.reduce_to_asymmetric_unit(free["quaternion"], "D2"))
    assert (moved > 1e-3).mean() > 0.5


def test_the_noise_level_comes_from_pilot_particles_of_the_settings_seed(mixed, volume):
    noisy = ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, snr=0.25, **MIXED))
    assert noisy.signal_std == mixed.signal_std  # the noise does not change the signal, nor its measurement
    assert noisy.noise_std == pytest.approx(noisy.signal_std / 0.5, rel=1e-12)
    draws = numpy_draws(mixed, np.arange(1024), seed=5)  # pilots are drawn like these: the same level
    draws["kind"][:] = 0
    signal = mixed.signal(draws).numpy()
    assert np.sqrt(np.var(signal, axis=(1, 2)).mean()) == pytest.approx(mixed.signal_std, rel=0.1)
    images, draws = noisy.render(np.arange(512), seed=0)
    inliers = draws["kind"].numpy() == 0
    noise = images.numpy()[inliers] - noisy.signal(draws).numpy()[inliers]
    assert noise.std() == pytest.approx(noisy.noise_std, rel=0.02)
    other = ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, **{**MIXED, "seed": 4}))
    assert other.signal_std != mixed.signal_std


def test_noise_outliers_of_a_noise_free_set_have_the_signals_standard_deviation(mixed):
    images, draws = mixed.render(np.arange(256), seed=0)
    noise = images.numpy()[draws["kind"].numpy() == KINDS.index("noise")]
    assert len(noise) > 10
    assert noise.std() == pytest.approx(mixed.signal_std, rel=0.05)
    assert abs(np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]) < 0.05  # white


def test_keyed_random_numbers_are_uniform_normal_and_independent():
    keys = keyed_random.particle_keys(0, 0, tf.range(2000, dtype=tf.int64))
    u = keyed_random.uniforms(keys, 9, first=3).numpy()
    assert 0 < u.min() and u.max() < 1
    assert u.mean() == pytest.approx(0.5, abs=0.01) and u.var() == pytest.approx(1 / 12, abs=0.003)
    assert np.abs(np.corrcoef(u.T)[np.triu_indices(9, 1)]).max() < 0.08
    z = keyed_random.normals(keys, 256).numpy()
    assert z.mean() == pytest.approx(0.0, abs=0.01) and z.std() == pytest.approx(1.0, abs=0.01)
    assert (z**4).mean() == pytest.approx(3.0, abs=0.05)
    neighbours = np.corrcoef(z[:-1].ravel(), z[1:].ravel())[0, 1]  # particles i and i + 1
    assert abs(neighbours) < 0.01
    np.testing.assert_array_equal(keyed_random.uniforms(keys[:1], 2, first=4).numpy(), u[:1, 2:4])
    other = keyed_random.particle_keys(1, 0, tf.range(2000, dtype=tf.int64))
    assert np.abs(np.corrcoef(keyed_random.normals(other, 256).numpy().ravel(), z.ravel())[0, 1]) < 0.01


def test_batches_follow_the_raw_batch_interface_inside_tf_data(volume):
    settings = SimulationSettings(n=1, snr=1.0, **MIXED)
    dataset = simulated_batches(volume, PIXEL_SIZE, settings, 8, seed=0).prefetch(2)
    spec = dataset.element_spec
    assert isinstance(spec, RawBatch)
    assert spec.images.shape == (8, SIZE, SIZE) and spec.quaternion.shape == (8, 4)
    assert spec.origin.shape == (8, 2) and spec.ctf.shape == (8, len(CTF_KEYS))
    assert all(s.shape.is_fully_defined() for s in tf.nest.flatten(spec))
    assert spec.index.dtype == tf.int64
    batches = list(dataset.take(3).as_numpy_iterator())
    column = {key: number for number, key in enumerate(CTF_KEYS)}
    for k, batch in enumerate(batches):
        assert np.isfinite(batch.images).all()
        np.testing.assert_array_equal(batch.index, np.arange(8 * k, 8 * k + 8))
        np.testing.assert_allclose(np.linalg.norm(batch.quaternion, axis=1), 1.0, atol=1e-6)
        assert (batch.ctf[:, column["defocus_u"]] >= batch.ctf[:, column["defocus_v"]]).all()
        np.testing.assert_array_equal(batch.ctf[:, column["voltage"]], 300.0)
        assert set(np.unique(batch.outlier)) <= {0.0, 1.0}
        assert 0 < np.abs(batch.origin).max() <= MIXED["max_shift_px"]
    resumed = next(simulated_batches(volume, PIXEL_SIZE, settings, 8, seed=0, start=2).as_numpy_iterator())
    np.testing.assert_allclose(resumed.images, batches[2].images, atol=1e-6 * np.abs(resumed.images).max())
    other = next(simulated_batches(volume, PIXEL_SIZE, settings, 8, seed=1).as_numpy_iterator())
    assert not np.allclose(other.quaternion, batches[0].quaternion)
    plain = simulated_batches(volume, PIXEL_SIZE, SimulationSettings(n=1, ctf=False), 4, seed=0)
    np.testing.assert_array_equal(next(plain.as_numpy_iterator()).ctf, 0.0)


# ---------------------------------------------------------------- measured properties of a data set


def radial_power(images):
    """Mean |rfft2|^2 per integer radial shell [D // 2 + 1] of images [N, D, D] (half plane, corners left out)."""
    grid = FourierGrid(images.shape[-1])
    power = np.mean(np.abs(np.fft.rfft2(images)) ** 2, axis=0)
    shells = np.arange(images.shape[-1] // 2 + 1)
    return np.array([power[grid.shells == shell].mean() for shell in shells])


def test_coloured_noise_has_the_requested_radial_power_spectrum(volume):
    shells = np.arange(SIZE // 2 + 1)
    spectrum = 0.1 + 1.0 / (1.0 + (shells / 4.0) ** 2)  # falling tenfold, then a floor
    options = dict(snr=0.5, outlier_fraction=1.0, outlier_kinds=("noise",), seed=3)  # noise only
    white = ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, **options))
    coloured = ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, noise_spectrum=spectrum, **options))
    assert coloured.noise_std == white.noise_std  # the level is the snr's, the spectrum only its shape
    images = coloured.render(np.arange(512), seed=1)[0].numpy()
    assert images.std() == pytest.approx(coloured.noise_std, rel=0.02)
    measured = radial_power(images)[1:]  # shell 0 holds a single coefficient
    np.testing.assert_allclose(measured / measured.mean(), spectrum[1:] / spectrum[1:].mean(), rtol=0.12)
    flat = radial_power(white.render(np.arange(512), seed=1)[0].numpy())[1:]
    assert flat.max() / flat.min() < 1.3 and measured.max() / measured.min() > 4
    np.testing.assert_allclose(forward_model.noise_filter(SIZE, np.ones(SIZE // 2 + 1)), 1.0)
    with pytest.raises(InvalidSetting, match=r"noise_spectrum: .* 17 values"):
        ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, noise_spectrum=spectrum[:-1], **options))


CTF_ROWS = (
    (8000.0, 7600.0, 10.0, 300.0, 2.7, 0.1, 40.0, 0.0),
    (21000.0, 20500.0, 95.0, 200.0, 2.7, 0.07, 120.0, 0.0),
    (15000.0, 15000.0, 0.0, 300.0, 0.01, 0.1, 0.0, 90.0),
)


def test_ctf_table_rows_are_what_particles_draw_and_what_batches_and_star_files_report(volume):
    settings = SimulationSettings(n=1, snr=1.0, ctf_table=CTF_ROWS, seed=3)
    assert hash(settings) == hash(SimulationSettings(n=1, snr=1.0, ctf_table=[list(row) for row in CTF_ROWS], seed=3))
    renderer = ParticleRenderer(volume, PIXEL_SIZE, settings)
    draws = numpy_draws(renderer, np.arange(600))
    drawn = np.stack([draws[key] for key in CTF_KEYS], axis=1)
    np.testing.assert_allclose(drawn, np.asarray(CTF_ROWS, np.float32)[draws["ctf_row"]])
    assert np.bincount(draws["ctf_row"], minlength=3).tolist() == pytest.approx([200, 200, 200], abs=4 * 11.5)
    again = numpy_draws(renderer, np.arange(600)[::-1])["ctf_row"][::-1]
    np.testing.assert_array_equal(again, draws["ctf_row"])  # keyed by (seed, index)
    # the images are filtered by their row's CTF: a projection through that CTF, whatever the other rows
    chosen = {key: value[:4] for key, value in draws.items()}
    chosen["kind"][:] = 0
    projections = translate_images(project(volume, chosen["quaternion"]), -chosen["origin"])
    ctf = compute_ctf(SIZE, PIXEL_SIZE, *(chosen[key] for key in CTF_KEYS), rfft=True)
    expected = np.fft.irfft2(np.fft.rfft2(projections) * ctf, s=(SIZE, SIZE))
    np.testing.assert_allclose(renderer.signal(chosen).numpy(), expected, atol=2e-5 * np.abs(expected).max())

    batch = next(simulated_batches(volume, PIXEL_SIZE, settings, 64, seed=0).as_numpy_iterator())
    rows = numpy_draws(renderer, np.arange(64))["ctf_row"]
    np.testing.assert_allclose(batch.ctf, np.asarray(CTF_ROWS, np.float32)[rows])
    simulated = simulate_particles(volume, PIXEL_SIZE, 64, snr=1.0, ctf_table=CTF_ROWS, seed=3)  # stream of seed 3
    assert len(simulated.optics) == 3  # one optics group per (voltage, Cs, amplitude contrast)
    table = simulated.particles.copy()
    optics = simulated.optics.set_index(star.OPTICS_GROUP)
    for column in (star.VOLTAGE, star.CS, star.AMPLITUDE_CONTRAST):
        table[column] = table[star.OPTICS_GROUP].map(optics[column])
    columns = [star.DEFOCUS_U, star.DEFOCUS_V, star.DEFOCUS_ANGLE, star.VOLTAGE, star.CS, star.AMPLITUDE_CONTRAST]
    columns += [star.CTF_BFACTOR, star.PHASE_SHIFT]
    rows = numpy_draws(renderer, np.arange(64), seed=3)["ctf_row"]
    np.testing.assert_allclose(table[columns].to_numpy(), np.asarray(CTF_ROWS)[rows], rtol=1e-6)


def test_normal_origins_have_the_requested_std_and_are_clipped_at_the_largest_shift(volume):
    normal = ParticleRenderer(volume, PIXEL_SIZE, SimulationSettings(n=1, ctf=False, origin_sigma_px=2.0))
    origins = numpy_draws(normal, np.arange(4000))["origin"]
    assert origins.std(axis=0) == pytest.approx([2.0, 2.0], rel=0.05)
    assert np.abs(origins.mean(axis=0)).max() < 0.1 and np.abs(origins).max() > 6.0  # normal, unbounded tails
    assert np.mean(np.abs(origins) < 2.0) == pytest.approx(0.683, abs=0.02)
    clipped = ParticleRenderer(
        volume, PIXEL_SIZE, SimulationSettings(n=1, ctf=False, origin_sigma_px=2, max_shift_px=3)
    )
    bounded = numpy_draws(clipped, np.arange(4000))["origin"]
    assert np.abs(bounded).max() == 3.0
    np.testing.assert_array_equal(bounded, np.clip(origins, -3.0, 3.0))


def test_settings_without_the_measured_properties_draw_what_they_drew_before(mixed, volume):
    """The new draws use key words of their own: poses, kinds, defoci and noise of a seed stay the same."""
    measured = ParticleRenderer(
        volume, PIXEL_SIZE, SimulationSettings(n=1, **{**MIXED, "origin_sigma_px": 1.0, "ctf_table": CTF_ROWS})
    )
    plain, other = numpy_draws(mixed, np.arange(32)), numpy_draws(measured, np.arange(32))
    for key in ("quaternion", "kind", "variant", "subset", "displacement", "ice"):
        np.testing.assert_array_equal(plain[key], other[key])
    assert not np.allclose(plain["origin"], other["origin"]) and not np.allclose(plain["defocus_u"], other["defocus_u"])
    np.testing.assert_array_equal(plain["voltage"], 300.0)
    np.testing.assert_array_equal(mixed.unit_noise(np.arange(4), 0).numpy(), measured.unit_noise(np.arange(4), 0))


@pytest.mark.parametrize(
    "field, value",
    [
        ("noise_spectrum", (1.0, -0.5, 1.0)),
        ("noise_spectrum", (0.0, 0.0)),
        ("ctf_table", ()),
        ("ctf_table", ((1e4, 1e4, 0.0, 300.0, 2.7, 1.5, 0.0, 0.0),)),
        ("ctf_table", ((1e4, 1e4, 0.0, 300.0),)),
        ("origin_sigma_px", -1.0),
    ],
)
def test_measured_properties_out_of_range_are_refused_by_name(field, value):
    with pytest.raises(InvalidSetting) as error:
        SimulationSettings(n=1, **{field: value}).validate()
    assert error.value.setting == field
    with pytest.raises(InvalidSetting, match="ctf_table: needs ctf=True"):
        SimulationSettings(n=1, ctf=False, ctf_table=CTF_ROWS).validate()


def test_the_ctf_table_columns_are_the_streams_ctf_keys():
    assert CTF_TABLE_COLUMNS == CTF_KEYS
