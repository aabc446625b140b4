"""MRC stacks and volumes: round trips, memory maps, row reads by offset, atomic writers and errors naming the file."""

import os

import mrcfile
import numpy as np
import pytest
from mrcfile.dtypes import HEADER_DTYPE

from cryo_forum.errors import CryoForumError
from cryo_forum.io import mrc


def test_stack_round_trip_is_a_read_only_memory_map(tmp_path):
    images = np.random.default_rng(0).normal(size=(5, 16, 16)).astype(np.float32)
    path = tmp_path / "stack.mrcs"
    mrc.write_stack(path, images, pixel_size=1.5)
    stack = mrc.open_stack(path)
    assert isinstance(stack, np.memmap)
    assert not stack.flags.writeable
    np.testing.assert_array_equal(stack, images)
    with mrcfile.open(path, header_only=True) as handle:
        assert int(handle.header.ispg) == 0
        assert handle.voxel_size.x == pytest.approx(1.5)
    info = mrc.mrc_info(path)
    assert info.shape == (5, 16, 16) and not info.is_volume and info.pixel_size == pytest.approx(1.5)


def test_single_image_is_a_stack_of_one(tmp_path):
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    path = tmp_path / "one.mrc"
    with mrcfile.new(path) as handle:
        handle.set_data(image)
    stack = mrc.open_stack(path)
    assert stack.shape == (1, 8, 8)
    np.testing.assert_array_equal(stack[0], image)


def test_volume_round_trip(tmp_path):
    volume = np.random.default_rng(1).normal(size=(6, 7, 8))
    path = tmp_path / "map.mrc"
    mrc.write_volume(path, volume, pixel_size=3.67)
    data, pixel_size = mrc.read_volume(path)
    assert data.dtype == np.float32 and data.shape == (6, 7, 8)
    np.testing.assert_allclose(data, volume, rtol=1e-6)
    assert pixel_size == pytest.approx(3.67)
    with mrcfile.open(path, header_only=True) as handle:
        assert int(handle.header.ispg) == 1
    assert mrc.mrc_info(path).is_volume


def test_stack_writer_fills_in_place_and_renames_on_success(tmp_path):
    path = tmp_path / "big.mrcs"
    with mrc.stack_writer(path, n=4, size=8, pixel_size=2.0) as out:
        assert not path.exists()
        for i in range(4):
            out[i] = i
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.mrcs"]
    stack = mrc.open_stack(path)
    np.testing.assert_array_equal(stack[:, 0, 0], [0, 1, 2, 3])
    assert mrc.mrc_info(path).pixel_size == pytest.approx(2.0)


def test_stack_writer_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "big.mrcs"
    with pytest.raises(RuntimeError), mrc.stack_writer(path, n=4, size=8, pixel_size=2.0) as out:
        out[0] = 1
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_writers_refuse_to_overwrite_inputs(tmp_path):
    path = tmp_path / "in.mrcs"
    mrc.write_stack(path, np.zeros((2, 8, 8)), 1.0)
    before = path.read_bytes()
    with pytest.raises(CryoForumError, match=r"in\.mrcs"):
        mrc.write_stack(path, np.ones((2, 8, 8)), 1.0, inputs=[path])
    with pytest.raises(CryoForumError, match=r"in\.mrcs"), mrc.stack_writer(path, 2, 8, 1.0, inputs=[path]):
        pass
    assert path.read_bytes() == before


def write_valid(path):
    mrc.write_stack(path, np.ones((3, 16, 16)), 1.0)
    return path.read_bytes()


@pytest.mark.parametrize(
    "damage",
    [
        lambda good: None,
        lambda good: good[:-100],
        lambda good: good[:500],
        lambda good: b"this is not an MRC file" * 100,
        lambda good: good[:12] + (99).to_bytes(4, "little") + good[16:],
        lambda good: good[:92] + (10**9).to_bytes(4, "little") + good[96:],
    ],
    ids=["missing", "truncated-data", "truncated-header", "garbage", "bad-mode", "huge-extended-header"],
)
def test_bad_mrc_files_raise_naming_the_file(tmp_path, damage):
    good = write_valid(tmp_path / "good.mrcs")
    path = tmp_path / "bad.mrcs"
    content = damage(good)
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CryoForumError, match=r"bad\.mrcs"):
        mrc.open_stack(path)
    with pytest.raises(CryoForumError, match=r"bad\.mrcs"):
        mrc.read_volume(path)


def test_wrong_dimensionality_is_refused(tmp_path):
    image = tmp_path / "image.mrc"
    with mrcfile.new(image) as handle:
        handle.set_data(np.zeros((8, 8), np.float32))
    with pytest.raises(CryoForumError, match=r"image.mrc.*3-D"):
        mrc.read_volume(image)
    rectangular = tmp_path / "rect.mrcs"
    mrc.write_stack(rectangular, np.zeros((2, 8, 10)), 1.0)
    with pytest.raises(CryoForumError, match=r"rect.mrcs.*square"):
        mrc.open_stack(rectangular)


MODES = {np.int8: 0, np.int16: 1, np.float32: 2, np.uint16: 6, np.float16: 12}


def write_raw_stack(path, images, byte_order="<", extended=b""):
    """An MRC stack built byte by byte with numpy (not mrcfile's writer), in either byte order."""
    n, ny, nx = images.shape
    header = np.zeros((), HEADER_DTYPE.newbyteorder(byte_order))
    header["nx"], header["ny"], header["nz"] = nx, ny, n
    header["mx"], header["my"], header["mz"] = nx, ny, n
    header["mode"] = MODES[images.dtype.type]
    header["cella"] = (nx * 1.5, ny * 1.5, n * 1.5)
    header["cellb"] = (90.0, 90.0, 90.0)
    header["mapc"], header["mapr"], header["maps"] = 1, 2, 3
    header["nsymbt"] = len(extended)
    header["exttyp"] = b"MRCO"
    header["nversion"] = 20140
    header["map"] = b"MAP "
    header["machst"] = (0x44, 0x44, 0, 0) if byte_order == "<" else (0x11, 0x11, 0, 0)
    path.write_bytes(header.tobytes() + extended + images.astype(images.dtype.newbyteorder(byte_order)).tobytes())


@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("dtype", list(MODES), ids=[np.dtype(t).name for t in MODES])
def test_stack_reader_matches_the_memory_map_in_any_order(tmp_path, dtype, byte_order):
    rng = np.random.default_rng(3)
    images = (rng.normal(size=(9, 6, 6)) * 40).clip(-120, 120).astype(dtype)
    path = tmp_path / "stack.mrcs"
    write_raw_stack(path, images, byte_order, extended=b"x" * 100)  # data starts at byte 1124
    reference = mrcfile.mmap(path, mode="r", permissive=True).data
    assert reference.dtype.byteorder in ("=", "|", "<" if byte_order == "<" else ">")
    np.testing.assert_array_equal(reference, images)
    reader = mrc.StackReader(path)
    assert reader.shape == (9, 6, 6) and len(reader) == 9
    for rows in ([0], [8], [3, 4, 5], [2, 7, 0, 7, 7, 1, 2, 3, 8], rng.permutation(9), np.arange(9), []):
        got = reader.read(rows)
        assert got.dtype == np.float32 and got.shape == (len(rows), 6, 6)
        np.testing.assert_array_equal(got, reference[np.asarray(rows, dtype=int)].astype(np.float32))


def test_stack_reader_of_a_single_image_and_out_of_range_rows(tmp_path):
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    path = tmp_path / "one.mrc"
    with mrcfile.new(path) as handle:
        handle.set_data(image)
    reader = mrc.StackReader(path)
    np.testing.assert_array_equal(reader.read([0, 0]), [image, image])
    with pytest.raises(IndexError, match=r"one\.mrc"):
        reader.read([1])
    with pytest.raises(IndexError, match=r"one\.mrc"):
        reader.read([-1])


def test_stack_reader_names_a_file_truncated_after_opening(tmp_path):
    path = tmp_path / "shrinking.mrcs"
    mrc.write_stack(path, np.ones((4, 8, 8)), 1.0)
    reader = mrc.StackReader(path)
    np.testing.assert_array_equal(reader.read([3]), np.ones((1, 8, 8)))
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 8 * 8 * 4)
    with pytest.raises(CryoForumError, match=r"shrinking\.mrcs: corrupt or truncated"):
        reader.read([2, 3])
    np.testing.assert_array_equal(reader.read([2]), np.ones((1, 8, 8)))


@pytest.mark.parametrize("damage", test_bad_mrc_files_raise_naming_the_file.pytestmark[0].args[1][1:])
def test_stack_reader_refuses_bad_files_like_open_stack(tmp_path, damage):
    good = write_valid(tmp_path / "good.mrcs")
    path = tmp_path / "bad.mrcs"
    path.write_bytes(damage(good))
    with pytest.raises(CryoForumError, match=r"bad\.mrcs"):
        mrc.StackReader(path)


def write_map(path, shape, ispg, voxel_size=1.0):
    """A float32 file with the given space group and mz = nz (mrcfile's header for 3-D data, and Chimera's)."""
    with mrcfile.new(path, overwrite=True) as handle:
        handle.set_data(np.zeros(shape, np.float32))
        handle.header.ispg = ispg
        if voxel_size:
            handle.voxel_size = voxel_size
    return path


@pytest.mark.parametrize(
    ("name", "shape", "ispg", "volume"),
    [
        ("chimera.mrc", (69, 57, 75), 0, True),  # Chimera: ispg 0, mz = nz = 69, non-square sections
        ("cube.mrc", (30, 30, 30), 0, True),
        ("tall.mrc", (128, 32, 32), 0, True),  # mz = 128
        ("map.mrc", (8, 8, 8), 1, True),
        ("relion.mrcs", (8, 8, 8), 1, False),  # a .mrcs is a stack whatever its header says
        ("relion0.mrcs", (8, 8, 8), 0, False),
        ("tilts.st", (8, 8, 8), 0, False),  # IMOD tilt series: ispg 0, mz = nz
        ("section.mrc", (1, 8, 8), 1, False),  # a single section is one image
        ("image.mrc", (8, 8), 0, False),
    ],
)
def test_volume_or_images_by_the_mrc2014_rule(tmp_path, name, shape, ispg, volume):
    path = write_map(tmp_path / name, shape, ispg)
    assert mrc.mrc_info(path).is_volume is volume
    if volume:
        data, _ = mrc.read_volume(path)
        assert data.shape == shape


def test_marked_image_stack_is_a_stack_whatever_the_suffix(tmp_path):
    path = tmp_path / "stack.mrc"
    with mrcfile.new(path) as handle:
        handle.set_data(np.zeros((5, 8, 8), np.float32))
        handle.set_image_stack()  # ispg 0, mz 1
    assert not mrc.mrc_info(path).is_volume
    assert mrc.open_stack(path).shape == (5, 8, 8)


@pytest.mark.parametrize("n", [1, 4])
def test_our_stack_writers_mark_their_output_as_stacks(tmp_path, n):
    mrc.write_stack(tmp_path / "written.mrc", np.zeros((n, 8, 8)), 1.0)
    with mrc.stack_writer(tmp_path / "mapped.mrc", n=n, size=8, pixel_size=1.0) as out:
        out[...] = 1
    for name in ("written.mrc", "mapped.mrc"):
        with mrcfile.open(tmp_path / name, header_only=True) as handle:
            assert (int(handle.header.ispg), int(handle.header.mz)) == (0, 1)
        assert not mrc.mrc_info(tmp_path / name).is_volume
        assert mrc.open_stack(tmp_path / name).shape == (n, 8, 8)


def test_missing_pixel_size_is_zero(tmp_path):
    path = write_map(tmp_path / "map.mrc", (8, 8, 8), 1, voxel_size=None)
    assert mrc.mrc_info(path).pixel_size == 0.0
    assert mrc.read_volume(path)[1] == 0.0


def test_mrc_info_reads_the_header_only_and_reports_truncation(tmp_path, monkeypatch):
    path = tmp_path / "cut.mrcs"
    mrc.write_stack(path, np.ones((4, 8, 8)), 1.5)
    os.truncate(path, path.stat().st_size - 100)
    monkeypatch.setattr(mrcfile, "mmap", None)  # the header is read without mrcfile's memory map
    info = mrc.mrc_info(path)
    assert info.shape == (4, 8, 8) and info.truncated and info.pixel_size == pytest.approx(1.5)
    monkeypatch.undo()
    with pytest.raises(CryoForumError, match=r"cut\.mrcs: corrupt or truncated"):
        mrc.open_stack(path)
