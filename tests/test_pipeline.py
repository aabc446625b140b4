"""Input pipeline: augmentation sign convention, splits, RawBatch streams, HDF5 cache, model and prediction inputs."""

import json

import mrcfile
import numpy as np
import pytest
import starfile

from cryo_forum import geometry
from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io import star
from cryo_forum.io.maps import example_map_path, load_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.fourier import translate_images
from cryo_forum.physics.projection import FourierProjector
from cryo_forum.streams import cache as cache_module
from cryo_forum.streams import readers
from cryo_forum.streams.augment import Augmentation
from cryo_forum.streams.batch import to_model_batches
from cryo_forum.streams.preprocess import CTF_KEYS, Preprocessor
from cryo_forum.streams.simulation import write_simulation
from cryo_forum.streams.splits import SPLIT_NAMES, Split, split_indices
from cryo_forum.tensorflow_quiet import tf

BOX = 32
PIXEL_SIZE = 3.0
N = 40


def simulate(folder, seed=1):
    volume, _ = load_volume(example_map_path(), pixel_size=PIXEL_SIZE, size=BOX)
    write_simulation(folder, volume, PIXEL_SIZE, N, snr=1.0, max_shift_px=1.0, outlier_fraction=0.25, seed=seed)
    return ParticleSet.open(folder / "particles.star")


@pytest.fixture(scope="module")
def particles(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("sim"))


@pytest.fixture(scope="module")
def stack(particles):
    """Every image, read with mrcfile directly (independent of ParticleSet)."""
    with mrcfile.open(particles.source.parent / "particles.mrcs", permissive=True) as handle:
        return np.asarray(handle.data, dtype=np.float32).copy()


@pytest.fixture(scope="module")
def star_table(particles):
    return starfile.read(particles.source)["particles"]


@pytest.fixture(scope="module")
def preprocessor():
    return Preprocessor(image_size=24, pixel_size_in=PIXEL_SIZE, input_size=BOX, phase_flip=True, mask_radius=0.9)


def collect(dataset):
    """All RawBatches of a finite dataset, concatenated per field (CTF columns as 'ctf/key')."""
    out = {}
    for batch in dataset.as_numpy_iterator():
        flat = batch._asdict()
        ctf = flat.pop("ctf")
        flat |= {f"ctf/{key}": ctf[:, column] for column, key in enumerate(CTF_KEYS)}
        for key, value in flat.items():
            out.setdefault(key, []).append(value)
    return {key: np.concatenate(values) for key, values in out.items()}


def direct_preprocessing(particles, stack, preprocessor, indices):
    """What every stream should give: each particle re-centred by its origin, flipped, cropped, normalised."""
    ctf = {key: values[indices] for key, values in particles.ctf_parameters().items()}
    return preprocessor(stack[indices], ctf, particles.shifts_px()[indices])


# ---------------------------------------------------------------- the augmentation sign convention


def correlation(a, b, mask):
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))


@pytest.fixture(scope="module")
def projector():
    """Projector of an asymmetric map of Gaussian blobs [40, 40, 40] (the example protein is too round at this
    size for a decisive wrong-sign correlation in every view)."""
    z, y, x = np.indices((40, 40, 40)) - 20
    centres = [(0, 0, 0), (6, 0, 0), (6, 5, 0), (6, 5, 4), (-5, -3, 2), (-2, 7, -5)]  # (x, y, z)
    widths = [2.5, 2.0, 2.0, 1.5, 3.0, 1.5]
    volume = sum(
        np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * w**2))
        for (cx, cy, cz), w in zip(centres, widths, strict=True)
    )
    return FourierProjector(volume)


@pytest.mark.parametrize("method", ["fourier", "bilinear"])
def test_rotated_image_is_the_projection_at_the_updated_pose_and_not_at_the_opposite_sign(projector, method):
    poses = geometry.random_quaternions(12, 7)
    images = projector.project_numpy(poses)
    out, new_poses = Augmentation(rotate=True, method=method)(
        images, poses.astype(np.float32), tf.constant([3, 4], tf.int64)
    )
    out, new_poses = out.numpy(), new_poses.numpy().astype(np.float64)
    # the pose changed by a rotation about z applied on the left: q' = q_z(alpha) (x) q
    turn = geometry.quaternion_multiply(new_poses, geometry.quaternion_conjugate(poses))
    np.testing.assert_allclose(turn[:, :2], 0.0, atol=1e-5)
    alpha = 2.0 * np.arctan2(turn[:, 2], turn[:, 3])
    wrong = geometry.quaternion_multiply(
        np.stack([0 * alpha, 0 * alpha, np.sin(-alpha / 2), np.cos(alpha / 2)], -1), poses
    )
    at_new, at_wrong = projector.project_numpy(new_poses), projector.project_numpy(wrong)
    disc = np.hypot(*(np.indices(images.shape[1:]) - images.shape[-1] // 2)) < 0.45 * images.shape[-1]
    large = np.abs(np.sin(alpha)) > 0.5  # the wrong sign differs by an in-plane turn of 2 alpha, >= 60 degrees
    assert large.sum() >= 4
    for k in range(len(poses)):
        assert correlation(out[k], at_new[k], disc) > 0.99
        if large[k]:
            assert correlation(out[k], at_wrong[k], disc) < 0.9


@pytest.mark.parametrize("method", ["fourier", "bilinear"])
def test_shifts_move_the_content_and_keep_the_pose(projector, method):
    poses = geometry.random_quaternions(6, 8).astype(np.float32)
    images = projector.project_numpy(poses)
    augmentation = Augmentation(rotate=False, max_shift_px=3.0, method=method)
    out, new_poses = augmentation(images, poses, tf.constant([0, 9], tf.int64))
    out = out.numpy()
    np.testing.assert_array_equal(new_poses.numpy(), poses)
    disc = np.hypot(*(np.indices(images.shape[1:]) - 20)) < 16
    moves = []
    for before, after in zip(images, out, strict=True):
        spectrum = np.fft.fft2(after) * np.conj(np.fft.fft2(before))
        cross = np.fft.ifft2(spectrum / np.maximum(np.abs(spectrum), 1e-12)).real  # phase correlation
        peak = np.array(np.unravel_index(np.argmax(cross), cross.shape))
        shift = np.where(peak > 20, peak - 40, peak)[::-1]  # (x, y), to the nearest pixel
        assert np.all(np.abs(shift) <= 3)
        moves.append(shift)
        # refine to sub-pixel by a local search, then the image is the shifted original
        grid = [shift + np.array([dx, dy]) for dx in np.linspace(-0.5, 0.5, 11) for dy in np.linspace(-0.5, 0.5, 11)]
        best = max(grid, key=lambda s: correlation(translate_images(before, s), after, disc))
        assert correlation(translate_images(before, best), after, disc) > 0.995
    assert np.any(np.abs(moves) > 0)
    again, _ = augmentation(images, poses, tf.constant([0, 9], tf.int64))
    other, _ = augmentation(images, poses, tf.constant([0, 10], tf.int64))
    np.testing.assert_array_equal(again.numpy(), out)
    assert not np.allclose(other.numpy(), out)


def test_both_methods_make_the_same_move_for_the_same_seed(projector):
    poses = geometry.random_quaternions(6, 9).astype(np.float32)
    images = projector.project_numpy(poses)
    seed = tf.constant([1, 2], tf.int64)
    fourier, q_fourier = Augmentation(max_shift_px=3.0, method="fourier")(images, poses, seed)
    bilinear, q_bilinear = Augmentation(max_shift_px=3.0, method="bilinear")(images, poses, seed)
    np.testing.assert_array_equal(q_fourier.numpy(), q_bilinear.numpy())
    disc = np.hypot(*(np.indices(images.shape[1:]) - 20)) < 16
    for a, b in zip(fourier.numpy(), bilinear.numpy(), strict=True):
        assert correlation(a, b, disc) > 0.995


def test_augmentation_settings_are_checked():
    for options, setting in (({"method": "cubic"}, "method"), ({"max_shift_px": -1.0}, "max_shift_px")):
        with pytest.raises(InvalidSetting) as error:
            Augmentation(**options)
        assert error.value.setting == setting


# ---------------------------------------------------------------- splits


def test_split_is_reproducible_disjoint_and_covering():
    split = split_indices(50, 0.2, 0.1, seed=3)
    assert [len(split[k]) for k in ("train", "val", "test")] == [35, 10, 5]
    np.testing.assert_array_equal(np.sort(np.concatenate(list(split.values()))), np.arange(50))
    for indices in split.values():
        assert np.all(np.diff(indices) > 0) and indices.dtype == np.int64
    again = split_indices(50, 0.2, 0.1, seed=3)
    assert all(np.array_equal(split[k], again[k]) for k in split)
    other = split_indices(50, 0.2, 0.1, seed=4)
    assert not np.array_equal(split["val"], other["val"])
    assert len(split_indices(50, 0.2, 0.0, seed=3)["test"]) == 0


@pytest.mark.parametrize(
    ("val", "test", "option"),
    [(-0.1, 0.1, "val_fraction"), (0.1, float("nan"), "test_fraction"), (0.6, 0.4, "val_fraction"),
     (0.01, 0.1, "val_fraction"), (0.1, 0.02, "test_fraction")],
)  # fmt: skip
def test_bad_fractions_name_the_setting(val, test, option):
    with pytest.raises(InvalidSetting) as error:
        split_indices(20, val, test, seed=0)
    assert error.value.setting == option


def test_split_document_round_trip_and_mismatches(particles, star_table):
    indices = split_indices(len(particles), 0.2, 0.2, seed=1)
    split = Split.of_particles(particles, indices, val_fraction=0.2, test_fraction=0.2, seed=1)
    document = json.loads(json.dumps(split.to_document()))
    loaded = Split.from_document(document, "split.json")
    checked = loaded.indices_for(particles)
    assert all(np.array_equal(indices[k], checked[k]) for k in SPLIT_NAMES)
    assert (document["mode"], document["seed"], document["val_fraction"]) == ("star", 1, 0.2)
    names = star_table[star.IMAGE_NAME].to_numpy()
    assert document["subsets"]["val"]["names"] == names[indices["val"]].tolist()

    with pytest.raises(CryoForumError, match="made for 40 particles"):  # another number of particles
        loaded.indices_for(particles.subset(np.arange(N - 1)))
    with pytest.raises(CryoForumError, match="does not match"):  # same n, other order
        loaded.indices_for(particles.subset(np.roll(np.arange(N), 1)))
    document["subsets"]["test"]["indices"][0] = document["subsets"]["val"]["indices"][0]
    with pytest.raises(CryoForumError, match=r"split.json.*overlap"):
        Split.from_document(document, "split.json")


def test_map_runs_keep_the_same_schema():
    split = Split.of_map("map.mrc", {"val": "val/particles.star", "test": "test/particles.star"}, seed=3)
    document = split.to_document()
    assert document["subsets"]["train"] == {"fresh": True}
    loaded = Split.from_document(json.loads(json.dumps(document)), "split.json")
    assert loaded.files == split.files and loaded.mode == "map"
    with pytest.raises(CryoForumError, match=r"simulated from map\.mrc"):
        loaded.indices_for(None)


# ---------------------------------------------------------------- RawBatch streams


def test_batches_carry_images_poses_flags_and_ctf_in_the_requested_order(particles, stack, star_table):
    order = np.random.default_rng(2).permutation(N)[:30]
    dataset = readers.particle_batches(particles, order, batch_size=7)
    assert dataset.element_spec.images.shape.as_list() == [None, BOX, BOX]
    got = collect(dataset)
    np.testing.assert_array_equal(got["index"], order)
    np.testing.assert_array_equal(got["images"], stack[order])
    np.testing.assert_allclose(got["quaternion"], particles.quaternions()[order], atol=1e-6)
    outliers = star_table[star.OUTLIER].to_numpy(dtype=np.float32)
    assert 0 < outliers.sum() < N
    np.testing.assert_array_equal(got["outlier"], outliers[order])
    assert {key.removeprefix("ctf/") for key in got if key.startswith("ctf/")} == set(CTF_KEYS)
    np.testing.assert_allclose(got["ctf/defocus_u"], star_table[star.DEFOCUS_U].to_numpy()[order], rtol=1e-6)
    for key, values in particles.ctf_parameters().items():
        np.testing.assert_allclose(got[f"ctf/{key}"], values[order], rtol=1e-6)


def epochs_of(dataset, count):
    iterator_orders = []
    for _ in range(count):
        iterator_orders.append(np.concatenate([b.index for b in dataset.as_numpy_iterator()]))
    return iterator_orders


def test_shuffle_is_new_every_epoch_reproducible_and_keeps_images_with_their_index(particles, stack):
    dataset = readers.particle_batches(particles, None, batch_size=8, shuffle=True, seed=5)
    first, second = epochs_of(dataset, 2)
    for order in (first, second):
        np.testing.assert_array_equal(np.sort(order), np.arange(N))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(N))
    again = epochs_of(readers.particle_batches(particles, None, batch_size=8, shuffle=True, seed=5), 2)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], second)
    other = epochs_of(readers.particle_batches(particles, None, batch_size=8, shuffle=True, seed=6), 1)
    assert not np.array_equal(other[0], first)
    batch = next(iter(dataset))
    np.testing.assert_array_equal(batch.images.numpy(), stack[batch.index.numpy()])

    repeated = readers.particle_batches(particles, None, 16, shuffle=True, seed=5, repeat=True, drop_remainder=True)
    assert repeated.element_spec.images.shape.as_list() == [16, BOX, BOX]
    orders = [b.index for b in repeated.take(4).as_numpy_iterator()]  # two epochs of 2 full batches each
    epoch_a, epoch_b = np.concatenate(orders[:2]), np.concatenate(orders[2:])
    assert len(np.unique(epoch_a)) == 32 and len(np.unique(epoch_b)) == 32
    assert not np.array_equal(epoch_a, epoch_b)


def test_sets_without_poses_flags_or_ctf_give_zeros(particles, stack):
    bare = ParticleSet.open(particles.source.parent / "particles.mrcs")
    got = collect(readers.particle_batches(bare, [5, 3, 9], batch_size=2))
    assert all(np.all(got[f"ctf/{key}"] == 0) for key in CTF_KEYS)
    np.testing.assert_array_equal(got["origin"], np.zeros((3, 2)))
    np.testing.assert_array_equal(got["quaternion"], np.zeros((3, 4)))
    np.testing.assert_array_equal(got["outlier"], np.zeros(3))
    np.testing.assert_array_equal(got["images"], stack[[5, 3, 9]])


def test_bad_stream_arguments_are_refused(particles):
    with pytest.raises(CryoForumError, match="batch_size"):
        readers.particle_batches(particles, None, batch_size=0)
    with pytest.raises(CryoForumError, match="50 is more than the 40 particles"):
        readers.particle_batches(particles, None, batch_size=50, drop_remainder=True)
    with pytest.raises(CryoForumError, match=r"\[0, 40\)"):
        readers.particle_batches(particles, [0, 40], batch_size=4)
    mask = np.zeros(N, dtype=bool)
    mask[[3, 17]] = True
    np.testing.assert_array_equal(collect(readers.particle_batches(particles, mask, batch_size=4))["index"], [3, 17])


# ---------------------------------------------------------------- cache


def test_cache_equals_direct_preprocessing_is_reused_and_checked(particles, stack, preprocessor, tmp_path, monkeypatch):
    path = tmp_path / "cache.h5"
    cache = cache_module.open_cache(path, particles, preprocessor, progress=False)  # built: it did not exist
    direct = direct_preprocessing(particles, stack, preprocessor, np.arange(N))
    order = np.array([7, 2, 39, 0, 2 + 10, 11])
    np.testing.assert_allclose(cache.images(order), direct[order], atol=1e-6)
    got = collect(cache_module.cached_batches(cache, order, batch_size=4))
    np.testing.assert_allclose(got["images"], direct[order], atol=1e-6)
    np.testing.assert_array_equal(got["index"], order)
    np.testing.assert_allclose(got["quaternion"], particles.quaternions()[order], atol=1e-6)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a matching cache must be reused")

    with monkeypatch.context() as patch:
        patch.setattr(cache_module, "build_cache", no_rebuild)
        reused = cache_module.open_cache(path, particles, preprocessor, progress=False)
    np.testing.assert_allclose(reused.images([3]), direct[[3]], atol=1e-6)

    smaller = Preprocessor(image_size=16, pixel_size_in=PIXEL_SIZE, input_size=BOX, phase_flip=True)
    with pytest.raises(CryoForumError, match=r"cache.h5.*preprocessor"):
        cache_module.open_cache(path, particles, smaller, progress=False)
    rebuilt = cache_module.open_cache(path, particles, smaller, rebuild=True, progress=False)
    assert rebuilt.images([0]).shape == (1, 16, 16)

    (tmp_path / "not_a_cache.h5").write_bytes(b"hello")
    with pytest.raises(CryoForumError, match=r"not_a_cache.h5"):
        cache_module.open_cache(tmp_path / "not_a_cache.h5", particles, preprocessor, rebuild=True, progress=False)
    assert (tmp_path / "not_a_cache.h5").read_bytes() == b"hello"


def test_cache_of_other_images_under_the_same_names_is_detected(particles, preprocessor, tmp_path):
    path = tmp_path / "cache.h5"
    cache_module.build_cache(particles, preprocessor, path, progress=False)
    resimulated = simulate(tmp_path / "other", seed=2)  # same n, same rlnImageName, other images
    with pytest.raises(CryoForumError, match=r"cache.h5.*sample"):
        cache_module.open_cache(path, resimulated, preprocessor, progress=False)


# ---------------------------------------------------------------- model and prediction inputs


def test_model_batches_preprocesses_then_gives_model_shapes(particles, stack, preprocessor, tmp_path):
    raw = readers.particle_batches(particles, np.arange(20), batch_size=8)
    model_inputs = to_model_batches(raw, preprocessor, None, recentre=True)
    images_spec, targets_spec = model_inputs.element_spec
    assert images_spec.shape.as_list() == [None, 24, 24, 1] and images_spec.dtype == tf.float32
    assert targets_spec.quaternion.shape.as_list() == [None, 4]
    assert targets_spec.outlier.shape.as_list() == [None]
    images = np.concatenate([x for x, _ in model_inputs.as_numpy_iterator()])
    direct = direct_preprocessing(particles, stack, preprocessor, np.arange(20))
    np.testing.assert_allclose(images[..., 0], direct, atol=1e-5)  # FFTs of other batch sizes round differently
    unmoved = np.concatenate([x for x, _ in to_model_batches(raw, preprocessor, None).as_numpy_iterator()])
    assert not np.allclose(unmoved[..., 0], direct, atol=1e-3)  # the particles have origins of up to 1 px

    cache = cache_module.build_cache(particles, preprocessor, tmp_path / "cache.h5", progress=False)
    from_cache = to_model_batches(cache_module.cached_batches(cache, np.arange(20), 8), None, None)
    np.testing.assert_allclose(np.concatenate([x for x, _ in from_cache.as_numpy_iterator()]), images, atol=1e-5)


def test_model_batches_augments_differently_each_epoch_and_reproducibly(particles, preprocessor):
    def build(seed):
        raw = readers.particle_batches(particles, np.arange(16), batch_size=16)
        return to_model_batches(raw, preprocessor, Augmentation(max_shift_px=1.0), seed=seed)

    dataset = build(seed=1)
    (x1, y1), (_, y2) = (next(dataset.as_numpy_iterator()) for _ in range(2))
    assert x1.shape == (16, 24, 24, 1) and x1.dtype == np.float32 and y1.quaternion.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(y1.quaternion, axis=1), 1.0, atol=1e-5)
    assert np.all(y1.quaternion[:, 3] >= 0)
    assert not np.allclose(y1.quaternion, y2.quaternion)  # a new rotation every epoch
    x3, y3 = next(build(seed=1).as_numpy_iterator())
    np.testing.assert_array_equal(y3.quaternion, y1.quaternion)
    np.testing.assert_array_equal(x3, x1)
    np.testing.assert_array_equal(y1.outlier, y2.outlier)


def test_model_batches_refuses_mismatched_inputs(particles, preprocessor):
    bare = ParticleSet.open(particles.source.parent / "particles.mrcs")  # no CTF
    with pytest.raises(CryoForumError, match="phase flipping needs CTF"):
        to_model_batches(readers.particle_batches(bare, None, 8), preprocessor, None, has_ctf=bare.has_ctf)
    wrong = Preprocessor(image_size=24, pixel_size_in=PIXEL_SIZE, input_size=48)
    with pytest.raises(CryoForumError, match="expects 48 px"):
        to_model_batches(readers.particle_batches(particles, None, 8), wrong, None)


def test_prediction_batches_visit_every_particle_once_in_order(particles, stack, preprocessor):
    dataset = readers.prediction_batches(particles, preprocessor, batch_size=16)
    indices, images = zip(*dataset.as_numpy_iterator(), strict=True)
    assert [len(i) for i in indices] == [16, 16, 8]
    np.testing.assert_array_equal(np.concatenate(indices), np.arange(N))
    direct = direct_preprocessing(particles, stack, preprocessor, np.arange(N))
    np.testing.assert_allclose(np.concatenate(images)[..., 0], direct, atol=1e-5)
    chosen = np.array([30, 4, 17])
    indices, images = next(readers.prediction_batches(particles, preprocessor, 8, indices=chosen).as_numpy_iterator())
    np.testing.assert_array_equal(indices, chosen)
    np.testing.assert_allclose(images[..., 0], direct[chosen], atol=1e-5)
