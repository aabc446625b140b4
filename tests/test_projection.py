"""The Fourier-slice projector against real-space projection and RELION's orientation convention."""

import numpy as np
import pytest
from scipy import ndimage

from cryo_forum import geometry, resources
from cryo_forum.errors import InvalidSetting
from cryo_forum.physics.projection import FourierProjector, project
from cryo_forum.tensorflow_quiet import tf


def gaussian_blobs(size: int, blobs: list[tuple[float, float, float, float, float]]) -> np.ndarray:
    """Volume [z, y, x] holding Gaussians given as (x, y, z, sigma, height) in voxels from the centre."""
    z, y, x = np.indices((size,) * 3) - size // 2
    volume = np.zeros((size,) * 3)
    for bx, by, bz, sigma, height in blobs:
        volume += height * np.exp(-((x - bx) ** 2 + (y - by) ** 2 + (z - bz) ** 2) / (2 * sigma**2))
    return volume


def random_blob_map(size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blobs = [(*rng.uniform(-size / 5, size / 5, 3), rng.uniform(1.5, 3.0), rng.uniform(0.5, 1.5)) for _ in range(10)]
    return gaussian_blobs(size, blobs)


def real_space_projection(volume: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """image(x, y) = sum over z of V(A^T [x, y, z]), by cubic-spline interpolation (x = column, y = row)."""
    size = volume.shape[0]
    z, y, x = np.indices((size,) * 3) - size // 2
    points = np.stack([x, y, z], axis=-1).reshape(-1, 3).astype(np.float64)
    source = points @ matrix  # each row is (A^T r)^T
    coords = source[:, ::-1].T + size // 2  # (z, y, x) array indices
    rotated = ndimage.map_coordinates(volume, coords, order=3, mode="constant").reshape((size,) * 3)
    return rotated.sum(axis=0)


def test_projection_matches_real_space_projection_at_random_poses():
    volume = random_blob_map(32, seed=0)
    quaternions = geometry.random_quaternions(6, rng=1)
    images = project(volume, quaternions)
    assert images.shape == (6, 32, 32) and images.dtype == np.float32
    for image, matrix in zip(images, geometry.quaternion_to_matrix(quaternions), strict=True):
        reference = real_space_projection(volume, matrix)
        assert np.corrcoef(image.ravel(), reference.ravel())[0, 1] > 0.999
        assert np.abs(image - reference).max() < 0.03 * np.abs(reference).max()


def test_projection_preserves_the_total_and_is_zero_beyond_nyquist():
    volume = random_blob_map(24, seed=2)
    images = project(volume, geometry.random_quaternions(3, rng=3))
    np.testing.assert_allclose(images.sum(axis=(1, 2)), volume.sum(), rtol=1e-4)
    spectra = np.abs(np.fft.fftshift(np.fft.fft2(images), axes=(1, 2)))
    ky, kx = np.indices((24, 24)) - 12
    beyond = np.hypot(kx, ky) >= 12
    assert spectra[:, beyond].max() < 1e-4 * spectra.max()


# Blobs at +x (8 voxels), +y (6) and +z (10) of different heights; the expected images below are worked out by
# hand from image(x, y) = integral of V(A^T [x, y, z]) dz with A = R_zyz(rot, tilt, psi)^T (RELION).
BLOBS = [(8, 0, 0, 1.5, 3.0), (0, 6, 0, 1.5, 2.0), (0, 0, 10, 1.5, 1.0)]
HAND_PICKED = {
    # (rot, tilt, psi): image positions (x = column, y = row) of the +x, +y and +z blobs (None: on the axis)
    (0, 0, 0): [(8, 0), (0, 6), (0, 0)],  # looking down z: x and y stay, z projects onto the centre
    (90, 0, 0): [(0, -8), (6, 0), (0, 0)],  # A^T = Rz(90): image(x, y) = V(-y, x, .)
    (0, 90, 0): [(0, 0), (0, 6), (-10, 0)],  # A^T = Ry(90): image(x, y) = V(z, y, -x): +z comes to -x
    (0, 90, 90): [(0, 0), (6, 0), (0, 10)],  # A^T = Ry(90) Rz(90): image(x, y) = V(z, x, y)
}


@pytest.mark.parametrize("angles", list(HAND_PICKED))
def test_projection_follows_relion_orientation(angles):
    size = 32
    volume = gaussian_blobs(size, BLOBS)
    image = project(volume, geometry.euler_to_matrix(np.array([angles], dtype=float)))[0]
    y, x = np.indices((size, size)) - size // 2
    expected = np.zeros((size, size))
    for (px, py), (_, _, _, sigma, height) in zip(HAND_PICKED[angles], BLOBS, strict=True):
        expected += height * np.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * sigma**2))
    assert np.corrcoef(image.ravel(), expected.ravel())[0, 1] > 0.99


def test_in_plane_rotation_by_a_quarter_turn_is_psi_minus_alpha():
    """DESIGN.md: content rotated by +alpha (out(p) = in(Rz(-alpha)(p - c) + c)) is the projection at psi - alpha.

    For alpha = 90 degrees and odd D that rotation is the exact permutation out[y, x] = in[2c - x, y].
    """
    size = 33
    volume = random_blob_map(size, seed=4)
    rot, tilt, psi = 30.0, 50.0, 20.0
    euler = np.array([[rot, tilt, psi], [rot, tilt, psi - 90.0], [rot, tilt, psi + 90.0]])
    base, minus, plus = project(volume, geometry.euler_to_matrix(euler))
    rotated = np.flipud(base).T
    assert np.corrcoef(rotated.ravel(), minus.ravel())[0, 1] > 0.999
    assert np.corrcoef(rotated.ravel(), plus.ravel())[0, 1] < 0.9


def test_quaternions_matrices_tf_function_and_tf_data_agree():
    volume = random_blob_map(24, seed=5)
    projector = FourierProjector(volume)
    quaternions = geometry.random_quaternions(4, rng=6)
    from_matrices = projector.project(geometry.quaternion_to_matrix(quaternions)).numpy()

    @tf.function
    def in_graph(q):
        return projector.project(q)

    from_quaternions = in_graph(tf.constant(quaternions, tf.float32)).numpy()
    np.testing.assert_allclose(from_quaternions, from_matrices, atol=1e-4 * np.abs(from_matrices).max())
    np.testing.assert_allclose(projector.project_numpy(quaternions, batch_size=3), from_matrices, rtol=1e-5, atol=1e-5)
    pipeline = tf.data.Dataset.from_tensor_slices(quaternions.astype(np.float32)).batch(2).map(projector.project)
    from_pipeline = np.concatenate([batch.numpy() for batch in pipeline])
    np.testing.assert_allclose(from_pipeline, from_matrices, atol=1e-4 * np.abs(from_matrices).max())


def test_projector_rejects_non_cubic_volumes():
    with pytest.raises(ValueError, match="cubic"):
        FourierProjector(np.zeros((8, 8, 6)))


@pytest.mark.parametrize(("size", "oversampling"), [(12, 2), (11, 2), (9, 3), (10, 1)])
def test_padded_spectrum_is_the_centred_fft_of_the_corrected_padded_map(size, oversampling):
    """Built plane by plane in single precision, it equals numpy's fftshift(fftn(ifftshift(box))) of the map
    divided by the trilinear footprint, zero-padded about voxel D // 2, with the exact total at frequency zero,
    and one periodic plane on either side of every axis."""
    volume = random_blob_map(size, seed=7)
    padded = size * oversampling
    footprint = np.sinc((np.arange(size) - size // 2) / padded) ** 2
    box = np.zeros((padded,) * 3)
    start = padded // 2 - size // 2
    box[start : start + size, start : start + size, start : start + size] = volume / np.einsum(
        "i,j,k->ijk", footprint, footprint, footprint
    )
    expected = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(box)))
    expected[padded // 2, padded // 2, padded // 2] = volume.sum()
    table = FourierProjector(volume, oversampling).table.values.numpy().reshape((padded + 2,) * 3)
    assert table.dtype == np.complex64
    np.testing.assert_allclose(table, np.pad(expected, 1, mode="wrap"), atol=1e-6 * np.abs(expected).max())


def test_a_projector_that_cannot_fit_is_refused_before_anything_is_allocated():
    volume = np.broadcast_to(np.float32(0.0), (100_000,) * 3)  # a 100 000^3 map that takes no memory
    with pytest.raises(InvalidSetting, match=r"a 100000 px map needs \d+ TB of memory for its projector") as caught:
        FourierProjector(volume)
    assert caught.value.setting == "size"


def test_large_boxes_are_projected_a_few_images_per_call(monkeypatch):
    volume = random_blob_map(16, seed=8)
    projector = FourierProjector(volume)
    quaternions = geometry.random_quaternions(7, rng=9)
    whole = projector.project_numpy(quaternions)
    calls = []
    project_matrices = projector._project_matrices
    monkeypatch.setattr(projector, "_project_matrices", lambda m: calls.append(len(m)) or project_matrices(m))
    monkeypatch.setattr(resources, "PROJECTION_POINTS", 3 * 16 * 9)  # three 16 px images' half spectra
    np.testing.assert_allclose(projector.project_numpy(quaternions), whole, atol=1e-6 * np.abs(whole).max())
    assert calls == [3, 3, 1]
