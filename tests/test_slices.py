"""Central slices: the reader and the insertion are adjoint, maps in one table are read independently, and whole
slices hold exactly the coefficients strictly below Nyquist."""

import numpy as np
import pytest

from cryo_forum import geometry
from cryo_forum.physics.fourier import FourierGrid
from cryo_forum.physics.slices import SpectrumTable, insert_slices


def centred_spectrum(table: SpectrumTable, number: int = 0) -> np.ndarray:
    """Map ``number``'s centred padded spectrum [P, P, P] as the table stores it (without its wrap planes)."""
    q = table.padded + 2
    return table.values.numpy().reshape(table.maps, q, q, q)[number, 1:-1, 1:-1, 1:-1]


def pairing(size: int, oversampling: int, seed: int, transpose: bool = False) -> tuple[float, float]:
    """(Re <read(V), x>, Re <H, insert(x)>) for a random real map (full spectrum V, half grid H) and random x."""
    rng = np.random.default_rng(seed)
    table = SpectrumTable([rng.standard_normal((size,) * 3)], oversampling)
    padded = table.padded
    spectrum = centred_spectrum(table).astype(np.complex128)
    half = np.fft.ifftshift(spectrum)[:, :, : padded // 2 + 1]  # rfftn layout: frequency zero at index 0
    matrices = geometry.quaternion_to_matrix(geometry.random_quaternions(5, rng)).astype(np.float32)
    frequencies = FourierGrid(size).inside_frequencies
    x = rng.standard_normal((5, len(frequencies))) + 1j * rng.standard_normal((5, len(frequencies)))
    read = table.read(matrices, frequencies).numpy().astype(np.complex128)
    inserted = np.zeros(half.size, np.complex128)
    poses = matrices.transpose(0, 2, 1) if transpose else matrices
    insert_slices(inserted, padded, poses, oversampling * frequencies, x)
    return float(np.sum(np.conj(read) * x).real), float(np.sum(np.conj(half.ravel()) * inserted).real)


@pytest.mark.parametrize(("size", "oversampling"), [(8, 2), (9, 2), (6, 3), (10, 1)])
def test_insertion_is_the_adjoint_of_the_reader(size, oversampling):
    forward, adjoint = pairing(size, oversampling, seed=size)
    assert adjoint == pytest.approx(forward, rel=1e-5)


def test_the_adjointness_test_sees_a_pose_convention_drift():
    forward, adjoint = pairing(8, 2, seed=1, transpose=True)  # A^T for A in the insertion
    assert adjoint != pytest.approx(forward, rel=0.05)


def test_maps_stacked_in_one_table_are_read_independently():
    rng = np.random.default_rng(3)
    volumes = [rng.standard_normal((12,) * 3) for _ in range(3)]
    together = SpectrumTable(volumes)
    matrices = geometry.quaternion_to_matrix(geometry.random_quaternions(6, rng)).astype(np.float32)
    maps = np.array([2, 0, 1, 1, 2, 0])
    slices = together.half_planes(matrices, maps).numpy()
    for number, volume in enumerate(volumes):
        alone = SpectrumTable([volume]).half_planes(matrices[maps == number]).numpy()
        np.testing.assert_allclose(slices[maps == number], alone, atol=1e-5 * np.abs(alone).max())
        np.testing.assert_allclose(centred_spectrum(together, number), centred_spectrum(SpectrumTable([volume])))


@pytest.mark.parametrize("size", [12, 11])
def test_whole_slices_hold_the_coefficients_below_nyquist_and_are_hermitian(size):
    rng = np.random.default_rng(4)
    table = SpectrumTable([rng.standard_normal((size,) * 3)])
    matrices = geometry.quaternion_to_matrix(geometry.random_quaternions(4, rng)).astype(np.float32)
    slices = table.half_planes(matrices).numpy()
    grid = FourierGrid(size)
    assert slices.shape == (4, *grid.shape)
    np.testing.assert_array_equal(slices[:, ~grid.inside], 0.0)
    assert (np.abs(slices[:, grid.inside]) > 0).all()
    np.testing.assert_allclose(slices[:, grid.inside], table.read(matrices, grid.inside_frequencies).numpy())
    column = slices[:, :, 0]  # kx = 0 holds each coefficient and its mirror: F(0, -ky) = conj F(0, ky)
    mirrored = np.conj(column[:, (-np.arange(size)) % size])
    np.testing.assert_allclose(column, mirrored, atol=1e-4 * np.abs(column).max())


def test_the_gradient_read_with_a_slice_is_the_interpolants_own():
    """Moving an image frequency by a small step along kx (or ky) moves the map's frequency along A[0] (or
    A[1]): the change of the read value is the gradient along that direction, within a cell exactly."""
    rng = np.random.default_rng(5)
    table = SpectrumTable([rng.standard_normal((16,) * 3)])
    matrices = geometry.quaternion_to_matrix(geometry.random_quaternions(3, rng)).astype(np.float32)
    frequencies = rng.uniform(-6.0, 6.0, size=(200, 2))
    values, gradients = (part.numpy().astype(np.complex128) for part in table.read_with_gradient(matrices, frequencies))
    np.testing.assert_allclose(values, table.read(matrices, frequencies).numpy(), atol=1e-5)
    step = 2e-3
    for axis in range(2):
        offset = np.zeros(2)
        offset[axis] = step
        ahead = table.read(matrices, frequencies + offset).numpy().astype(np.complex128)
        behind = table.read(matrices, frequencies - offset).numpy().astype(np.complex128)
        measured = (ahead - behind) / (2 * step)
        expected = np.einsum("nkc,nc->nk", gradients, matrices[:, axis, :])
        close = np.abs(measured - expected) <= 0.02 * np.abs(expected).max()
        assert close.mean() > 0.95, close.mean()  # the few straddling a cell's face see two gradients
