"""Loading maps and atomic models: resampling, centring, boxing, orientation and errors."""

import logging

import gemmi
import numpy as np
import pytest
from scipy import ndimage

from cryo_forum.errors import CryoForumError, InvalidSetting
from cryo_forum.io.maps import center_of_mass, example_map_path, example_model_path, load_volume
from cryo_forum.io.mrc import read_volume, write_volume


def gaussian(shape, centre_zyx, sigma_vox):
    z, y, x = np.indices(shape)
    cz, cy, cx = centre_zyx
    return np.exp(-((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) / (2 * sigma_vox**2))


def write_model(path, atoms):
    """A PDB file with one sulfur atom (B = 10) per (x, y, z) position in A."""
    structure = gemmi.Structure()
    model = gemmi.Model("1")
    chain = gemmi.Chain("A")
    for number, position in enumerate(atoms, start=1):
        residue = gemmi.Residue()
        residue.name = "MET"
        residue.seqid = gemmi.SeqId(number, " ")
        atom = gemmi.Atom()
        atom.name = "SD"
        atom.element = gemmi.Element("S")
        atom.pos = gemmi.Position(*position)
        atom.b_iso = 10.0
        atom.occ = 1.0
        residue.add_atom(atom)
        chain.add_residue(residue)
    model.add_chain(chain)
    structure.add_model(model)
    structure.write_pdb(str(path))


def test_map_at_its_own_pixel_size_is_moved_by_whole_voxels_into_a_cube(tmp_path):
    rng = np.random.default_rng(0)
    volume = (gaussian((20, 24, 28), (7, 15, 9), 2.0) + 1e-4 * rng.random((20, 24, 28))).astype(np.float32)
    write_volume(tmp_path / "map.mrc", volume, 1.5)
    loaded, pixel_size = load_volume(tmp_path / "map.mrc", size=32)
    assert loaded.shape == (32, 32, 32) and pixel_size == pytest.approx(1.5)
    np.testing.assert_allclose(center_of_mass(loaded), 16, atol=0.5)
    shift = np.round(center_of_mass(volume)).astype(int) - 16  # input voxel = output voxel + shift
    np.testing.assert_array_equal(loaded[16 - shift[0], 16 - shift[1], 16 - shift[2]], volume[16, 16, 16])
    assert loaded.sum() == pytest.approx(volume.sum(), rel=1e-3)  # only a little background is cut off


def test_resampling_to_a_coarser_pixel_matches_the_analytic_map(tmp_path):
    sigma = 4.0  # A
    fine = gaussian((40, 40, 40), (20, 20, 20), sigma / 1.0)
    write_volume(tmp_path / "fine.mrc", fine.astype(np.float32), 1.0)
    coarse, pixel_size = load_volume(tmp_path / "fine.mrc", pixel_size=2.5, size=20)
    assert pixel_size == 2.5
    expected = gaussian((20, 20, 20), (10, 10, 10), sigma / 2.5)
    assert np.corrcoef(coarse.ravel(), expected.ravel())[0, 1] > 0.999
    # the integral (sum times voxel volume) is kept
    assert coarse.sum() * 2.5**3 == pytest.approx(fine.sum() * 1.0**3, rel=0.02)


def test_default_box_holds_the_whole_map(tmp_path):
    write_volume(tmp_path / "map.mrc", gaussian((10, 12, 15), (5, 6, 7), 1.5).astype(np.float32), 2.0)
    loaded, _ = load_volume(tmp_path / "map.mrc", pixel_size=1.0)
    assert loaded.shape == (30, 30, 30)


def test_model_map_has_the_atoms_where_the_model_puts_them(tmp_path):
    """Atoms at the origin, 12 A along x and 8 A along y appear 12 voxels apart on the last array axis and 8 on
    the middle one (arrays are [z, y, x])."""
    write_model(tmp_path / "atoms.pdb", [(0.0, 0.0, 0.0), (12.0, 0.0, 0.0), (0.0, 8.0, 0.0)])
    volume, pixel_size = load_volume(tmp_path / "atoms.pdb", pixel_size=1.0, size=32)
    assert volume.shape == (32, 32, 32) and pixel_size == 1.0
    peaks = np.argwhere((volume == ndimage.maximum_filter(volume, size=5)) & (volume > 0.5 * volume.max()))
    assert len(peaks) == 3
    differences = {tuple(a - b) for a in peaks for b in peaks}
    assert (0, 0, 12) in differences and (0, 8, 0) in differences
    np.testing.assert_allclose(center_of_mass(volume), 16, atol=0.5)
    assert volume.min() > -0.02 * volume.max()  # band-limited without ringing


def test_model_pixel_size_is_chosen_to_fit_the_box(tmp_path):
    write_model(tmp_path / "atoms.pdb", [(0.0, 0.0, 0.0), (40.0, 0.0, 0.0)])
    volume, pixel_size = load_volume(tmp_path / "atoms.pdb", size=32)
    assert volume.shape == (32, 32, 32)
    assert 1.5 * 46.0 / 32 <= pixel_size < 1.5 * 46.0 / 32 + 0.011  # (40 + 2 * 3 A margin) spans 2/3 of the box


def test_shipped_example_is_small_and_rebuilt_from_the_shipped_model():
    path = example_map_path()
    assert path.is_file() and path.stat().st_size < 1.5e6
    volume, pixel_size = read_volume(path)
    assert volume.shape == (48, 48, 48) and pixel_size == pytest.approx(2.0)
    assert example_model_path().stat().st_size < 300e3
    rebuilt, _ = load_volume(example_model_path(), pixel_size=2.0, size=48)
    np.testing.assert_allclose(rebuilt, volume, atol=1e-5 * volume.max())


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.mrc", None, "not found"),
        ("corrupt.mrc", b"\x00\x01garbage" * 10, "MRC"),
        ("garbage.pdb", b"this is not a model\n", "no atoms"),
        ("table.csv", b"a,b\n1,2\n", "unknown file type"),
    ],
)
def test_bad_files_raise_a_message_naming_them(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CryoForumError, match=message) as caught:
        load_volume(path, pixel_size=1.0, size=16)
    assert name in str(caught.value)


def test_map_without_pixel_size_needs_one(tmp_path):
    write_volume(tmp_path / "map.mrc", np.ones((4, 4, 4), np.float32), 0.0)
    with pytest.raises(CryoForumError, match="pixel size"):
        load_volume(tmp_path / "map.mrc")
    volume, pixel_size = load_volume(tmp_path / "map.mrc", pixel_size=3.0, size=6)
    assert pixel_size == 3.0 and volume.shape == (6, 6, 6)


def test_an_absurd_box_is_refused_before_the_map_is_resampled_into_it(tmp_path):
    write_volume(tmp_path / "map.mrc", np.ones((4, 4, 4), np.float32), 2.0)
    with pytest.raises(InvalidSetting, match=r"a 100000 px box needs \d+ TB of memory") as caught:
        load_volume(tmp_path / "map.mrc", size=100_000)
    assert caught.value.setting == "size"
    with pytest.raises(InvalidSetting, match=r"a 50000 px box needs \d+ TB of memory") as caught:
        load_volume(example_model_path(), pixel_size=1.0, size=50_000)
    assert caught.value.setting == "size"
    for options, setting in ((dict(size=0), "size"), (dict(size=7.5), "size"), (dict(pixel_size=-1.0), "pixel_size")):
        with pytest.raises(InvalidSetting) as caught:
            load_volume(tmp_path / "map.mrc", **options)
        assert caught.value.setting == setting


def test_resampling_is_logged_in_one_line(tmp_path):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("cryo_forum")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    write_volume(tmp_path / "map.mrc", gaussian((10, 12, 14), (5, 6, 7), 1.5).astype(np.float32), 2.0)
    try:
        load_volume(example_map_path(), pixel_size=3.0, size=32)
        load_volume(tmp_path / "map.mrc", size=16)
        load_volume(example_map_path())  # its own box and pixel size: nothing to say
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert messages == [
        f"{example_map_path()}: resampling the map from 48 px at 2.000 A/px to 32 px at 3.000 A/px",
        f"{tmp_path / 'map.mrc'}: resampling the map from 14 x 12 x 10 px at 2.000 A/px to 16 px at 2.000 A/px",
    ]
