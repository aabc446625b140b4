"""On-the-fly synthetic particles: exact agreement with simulate.py for the same draws, same statistics, labels,
symmetry, reproducibility and the RawBatch interface."""

import numpy as np
import pytest

from cryo_forum import geometry
from cryo_forum.io import star
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.physics.ctf import compute_ctf
from cryo_forum.physics.fourier import translate_images
from cryo_forum.physics.projection import project
from cryo_forum.streams.preprocess import CTF_KEYS
from cryo_forum.streams.simulation import OUTLIER_KINDS, SimulationSettings, simulate_particles
from cryo_forum.streams.synthetic import KINDS, SyntheticParticles
from cryo_forum.tensorflow_quiet import tf

SIZE = 32
PIXEL_SIZE = 3.0
MIXED = dict(ctf=True, shift_px=3.0, bfactor=(0.0, 80.0), outlier_fraction=0.5, seed=3)


@pytest.fixture(scope="module")
def volume():
    volume, _ = load_volume(example_map_path(), pixel_size=PIXEL_SIZE, size=SIZE)
    return volume


@pytest.fixture(scope="module")
def mixed(volume):
    """Noise-free particles with CTF, shifts and every outlier kind, from both simulators."""
    simulated = simulate_particles(volume, PIXEL_SIZE, 40, **MIXED)
    return simulated, SyntheticParticles(volume, PIXEL_SIZE, SimulationSettings(n=40, **MIXED))


def draws_of(particles, **overrides):
    """The draws behind a simulate.py particle table, as SyntheticParticles.render takes them."""
    n = len(particles)
    draws = {
        "quaternion": geometry.euler_to_quaternion(particles[list(star.ANGLES)].to_numpy()),
        "origin": particles[[star.ORIGIN_X_ANGST, star.ORIGIN_Y_ANGST]].to_numpy() / PIXEL_SIZE,
        "defocus_u": particles[star.DEFOCUS_U].to_numpy(),
        "defocus_v": particles[star.DEFOCUS_V].to_numpy(),
        "defocus_angle": particles[star.DEFOCUS_ANGLE].to_numpy(),
        "bfactor": particles[star.CTF_BFACTOR].to_numpy(),
        "kind": np.array([KINDS.index(kind) for kind in particles[star.OUTLIER_KIND]]),
        "variant": np.arange(n) % 2,  # simulate.py gives particle i decoy or broken map i % 2
        "displacement": np.zeros((n, 2)),
        "ice": np.zeros(n, dtype=int),
        "ice_contrast": np.ones(n),
    }
    return draws | overrides


def reference_ctf(draws, size):
    return compute_ctf(
        size,
        PIXEL_SIZE,
        draws["defocus_u"],
        draws["defocus_v"],
        draws["defocus_angle"],
        300.0,
        2.7,
        0.1,
        draws["bfactor"],
        rfft=True,
    )


def radial_power(images):
    """Mean power spectrum over images [N, D, D], averaged in rings of 1 px up to Nyquist -> [D // 2]."""
    size = images.shape[-1]
    power = np.mean(np.abs(np.fft.fftshift(np.fft.fft2(images), axes=(-2, -1))) ** 2, axis=0)
    radius = np.round(np.hypot(*(np.indices((size, size)) - size // 2))).astype(int).ravel()
    sums = np.bincount(radius, weights=power.ravel())
    return (sums / np.bincount(radius))[: size // 2]


def batches(source, count, batch_size=64, seed=0):
    return list(source.dataset(batch_size, seed).take(count).as_numpy_iterator())


def test_particles_decoys_and_broken_maps_equal_simulate_for_the_same_draws(mixed):
    simulated, synthetic = mixed
    draws = draws_of(simulated.particles)
    images = synthetic.render(draws).numpy()
    kinds = simulated.particles[star.OUTLIER_KIND].to_numpy()
    same = np.isin(kinds, ("none", "decoy", "broken"))
    assert {"none", "decoy", "broken"} <= set(kinds[same])
    scale = np.abs(simulated.images).max()
    np.testing.assert_allclose(images[same], simulated.images[same], atol=2e-5 * scale)
    np.testing.assert_array_equal(images[kinds == "noise"], 0.0)  # noise outliers: only the noise added later


def test_off_centre_particles_are_moved_on_a_canvas_twice_the_box(mixed, volume):
    _, synthetic = mixed
    n = 3
    displacement = np.array([[10.0, -7.5], [-12.0, 3.0], [0.0, 11.0]])
    draws = {
        "quaternion": geometry.random_quaternions(n, 1),
        "origin": np.array([[1.5, -2.0], [0.0, 0.0], [-2.5, 1.0]]),
        "defocus_u": np.array([15000.0, 21000.0, 12000.0]),
        "defocus_v": np.array([14000.0, 20500.0, 11800.0]),
        "defocus_angle": np.array([10.0, 100.0, 45.0]),
        "bfactor": np.array([0.0, 50.0, 20.0]),
        "kind": np.full(n, KINDS.index("off_centre")),
        "variant": np.zeros(n, dtype=int),
        "displacement": displacement,
        "ice": np.zeros(n, dtype=int),
        "ice_contrast": np.ones(n),
    }
    canvas = np.zeros((n, 2 * SIZE, 2 * SIZE))
    canvas[:, SIZE // 2 : SIZE // 2 + SIZE, SIZE // 2 : SIZE // 2 + SIZE] = project(volume, draws["quaternion"])
    moved = translate_images(canvas, displacement - draws["origin"])
    filtered = np.fft.irfft2(np.fft.rfft2(moved) * reference_ctf(draws, 2 * SIZE), s=moved.shape[-2:])
    expected = filtered[:, SIZE // 2 : SIZE // 2 + SIZE, SIZE // 2 : SIZE // 2 + SIZE]
    images = synthetic.render(draws).numpy()
    np.testing.assert_allclose(images, expected, atol=2e-5 * np.abs(expected).max())
    periodic = translate_images(project(volume, draws["quaternion"]), displacement - draws["origin"])
    periodic = np.fft.irfft2(np.fft.rfft2(periodic) * reference_ctf(draws, SIZE), s=(SIZE, SIZE))
    assert np.abs(images - periodic).max() > 0.1 * np.abs(periodic).max()  # what leaves the box does not wrap


@pytest.mark.parametrize(
    "options",
    [
        dict(ctf=True, shift_px=3.0, bfactor=(0.0, 100.0), seed=1),  # the signal alone
        dict(ctf=True, snr=0.3, shift_px=2.0, outlier_fraction=0.2, seed=2),  # noise at simulate.py's level
        dict(ctf=False, snr=1.0, symmetry="D2", seed=4),
    ],
    ids=["signal", "noise-and-outliers", "no-ctf-d2"],
)
def test_batches_are_statistically_like_simulate(volume, options):
    simulated = simulate_particles(volume, PIXEL_SIZE, 512, **options).images
    synthetic = SyntheticParticles(volume, PIXEL_SIZE, SimulationSettings(n=1, **options))
    images = np.concatenate([batch["images"] for batch in batches(synthetic, 8)])
    assert np.isfinite(images).all()
    ratio = np.var(images, axis=(1, 2)).mean() / np.var(simulated, axis=(1, 2)).mean()
    assert ratio == pytest.approx(1.0, abs=0.1)
    correlation = np.corrcoef(np.log(radial_power(images)), np.log(radial_power(simulated)))[0, 1]
    assert correlation > 0.98


@pytest.mark.parametrize("kind", OUTLIER_KINDS)
def test_each_outlier_kind_is_statistically_like_simulate(volume, kind):
    options = dict(ctf=True, shift_px=2.0, outlier_fraction=1.0, outlier_kinds=(kind,), seed=5)
    simulated = simulate_particles(volume, PIXEL_SIZE, 256, **options).images
    synthetic = SyntheticParticles(volume, PIXEL_SIZE, SimulationSettings(n=1, **options))
    images = np.concatenate([batch["images"] for batch in batches(synthetic, 4)])
    ratio = np.var(images, axis=(1, 2)).mean() / np.var(simulated, axis=(1, 2)).mean()
    assert ratio == pytest.approx(1.0, abs=0.15)
    log_ratio = np.log(radial_power(images) / radial_power(simulated))  # correlation is no test for white noise
    assert np.abs(log_ratio).mean() < 0.25


def test_outliers_come_in_the_requested_fraction_and_labels_match_the_images(volume):
    settings = SimulationSettings(n=1, ctf=True, outlier_fraction=0.3, seed=6)  # no shifts, no noise
    synthetic = SyntheticParticles(volume, PIXEL_SIZE, settings)
    drawn = batches(synthetic, 12, batch_size=32)
    labels = np.concatenate([batch["outlier"] for batch in drawn])
    assert set(np.unique(labels)) == {0.0, 1.0}
    assert labels.mean() == pytest.approx(0.3, abs=0.06)  # 384 particles: 2.5 sigma is 0.058
    batch = drawn[0]
    ctf = {key: batch["ctf"][key].astype(np.float64) for key in CTF_KEYS}
    spectra = np.fft.rfft2(project(volume, batch["quaternion"])) * reference_ctf(ctf, SIZE)
    expected = np.fft.irfft2(spectra, s=(SIZE, SIZE))
    inliers = batch["outlier"] == 0
    scale = np.abs(expected).max()
    np.testing.assert_allclose(batch["images"][inliers], expected[inliers], atol=2e-5 * scale)
    for image, reference in zip(batch["images"][~inliers], expected[~inliers], strict=True):
        assert np.corrcoef(image.ravel(), reference.ravel())[0, 1] < 0.95


def test_every_outlier_kind_is_drawn_about_equally_often(mixed):
    _, synthetic = mixed
    kinds = np.concatenate([synthetic.draw(256, tf.constant([7, k])).get("kind").numpy() for k in range(4)])
    counts = np.bincount(kinds, minlength=len(KINDS))
    assert counts[0] == pytest.approx(512, abs=4 * 16)  # binomial(1024, 0.5): sigma 16
    for kind in OUTLIER_KINDS:
        assert counts[KINDS.index(kind)] == pytest.approx(102.4, abs=4 * 9.6)


def test_symmetric_poses_lie_in_the_asymmetric_unit(volume):
    synthetic = SyntheticParticles(volume, PIXEL_SIZE, SimulationSettings(n=1, ctf=False, symmetry="D2"))
    quaternions = synthetic.draw(300, tf.constant([0, 1])).get("quaternion").numpy()
    np.testing.assert_allclose(np.linalg.norm(quaternions, axis=1), 1.0, atol=1e-6)
    assert (quaternions[:, 3] >= 0).all()
    reduced = geometry.reduce_to_asymmetric_unit(quaternions, "D2")
    np.testing.assert_allclose(geometry.geodesic_distance(quaternions, reduced), 0.0, atol=1e-3)
    free = SyntheticParticles(volume, PIXEL_SIZE, SimulationSettings(n=1, ctf=False))
    uniform = free.draw(1000, tf.constant([0, 1])).get("quaternion").numpy()
    moved = geometry.geodesic_distance(uniform, geometry.reduce_to_asymmetric_unit(uniform, "D2"))
    assert (moved > 1e-3).mean() > 0.5
    assert np.abs(uniform[:, 3]).mean() == pytest.approx(4.0 / (3.0 * np.pi), abs=0.03)  # E|w| under Haar


def test_a_seed_reproduces_the_batches_and_batches_differ(mixed):
    _, synthetic = mixed
    first = batches(synthetic, 3, batch_size=8, seed=11)
    again = batches(synthetic, 3, batch_size=8, seed=11)
    other = batches(synthetic, 1, batch_size=8, seed=12)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["quaternion"], b["quaternion"])
        np.testing.assert_array_equal(a["outlier"], b["outlier"])
    assert not np.allclose(first[0]["images"], first[1]["images"])
    assert not np.allclose(first[0]["quaternion"], other[0]["quaternion"])


def test_batches_follow_the_raw_batch_interface_inside_tf_data(mixed, volume):
    _, synthetic = mixed
    dataset = synthetic.dataset(8, seed=0).prefetch(2)
    spec = dataset.element_spec
    assert set(spec) == {"images", "quaternion", "outlier", "ctf", "index"}
    assert tuple(spec["ctf"]) == CTF_KEYS
    assert spec["images"].shape == (8, SIZE, SIZE) and spec["quaternion"].shape == (8, 4)
    assert all(s.shape.is_fully_defined() for s in tf.nest.flatten(spec))
    assert spec["index"].dtype == tf.int64
    for batch in dataset.take(2).as_numpy_iterator():
        assert np.isfinite(batch["images"]).all()
        np.testing.assert_array_equal(batch["index"], -1)
        np.testing.assert_allclose(np.linalg.norm(batch["quaternion"], axis=1), 1.0, atol=1e-6)
        assert (batch["ctf"]["defocus_u"] >= batch["ctf"]["defocus_v"]).all()
        assert (batch["ctf"]["defocus_v"] >= 10000 - 500).all() and (batch["ctf"]["defocus_u"] <= 25500).all()
        np.testing.assert_array_equal(batch["ctf"]["voltage"], 300.0)
    plain = SyntheticParticles(volume, PIXEL_SIZE, SimulationSettings(n=1, ctf=False))
    assert "ctf" not in plain.dataset(4).element_spec
