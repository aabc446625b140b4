"""ParticleSet: metadata merged with optics, lazy images across stacks, path resolution, errors, STAR output."""

import inspect
import os
import tracemalloc

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryo_forum.errors import CryoForumError
from cryo_forum.io import particles as particles_module
from cryo_forum.io import star
from cryo_forum.io.mrc import stack_writer, write_stack, write_volume
from cryo_forum.io.particles import ParticleSet
from cryo_forum.physics.ctf import compute_ctf

BOX = 32


def write_stacks(folder, counts=(("a.mrcs", 5), ("b.mrcs", 4)), box=BOX):
    """Stacks whose image k of stack s is constant 100 (s + 1) + k, so a value names its source."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, (name, n) in enumerate(counts):
        values = 100 * (s + 1) + np.arange(n)
        write_stack(folder / name, np.broadcast_to(values[:, None, None], (n, box, box)), 1.0)


# particles interleave the two stacks; expected image value of each particle:
NAMES = ["000003@a.mrcs", "000001@b.mrcs", "000001@a.mrcs", "000004@b.mrcs", "000005@a.mrcs", "000002@b.mrcs"]
VALUES = [102, 200, 100, 203, 104, 201]
GROUPS = [1, 2, 1, 2, 1, 2]


def relion31_blocks(names=NAMES, stack_prefix=""):
    n = len(names)
    rng = np.random.default_rng(0)
    optics = pd.DataFrame(
        {
            star.OPTICS_GROUP_NAME: ["opticsGroup1", "opticsGroup2"],
            star.OPTICS_GROUP: [1, 2],
            star.IMAGE_PIXEL_SIZE: [1.0, 2.0],
            star.IMAGE_SIZE: [BOX, BOX],
            star.VOLTAGE: [300.0, 200.0],
            star.CS: [2.7, 2.0],
            star.AMPLITUDE_CONTRAST: [0.1, 0.07],
            "rlnMicrographOriginalPixelSize": [0.5, 1.0],
        }
    )
    particles = pd.DataFrame(
        {
            star.IMAGE_NAME: [name.replace("@", "@" + stack_prefix) for name in names],
            star.OPTICS_GROUP: GROUPS[:n],
            star.ANGLE_ROT: rng.uniform(-180, 180, n).round(4),
            star.ANGLE_TILT: rng.uniform(0, 180, n).round(4),
            star.ANGLE_PSI: rng.uniform(-180, 180, n).round(4),
            star.ORIGIN_X_ANGST: rng.normal(0, 3, n).round(4),
            star.ORIGIN_Y_ANGST: rng.normal(0, 3, n).round(4),
            star.DEFOCUS_U: rng.uniform(1e4, 2e4, n).round(2),
            star.DEFOCUS_V: rng.uniform(1e4, 2e4, n).round(2),
            star.DEFOCUS_ANGLE: rng.uniform(0, 180, n).round(2),
            "rlnTomoName": ["TS_01"] * n,
        }
    )
    return {star.OPTICS_BLOCK: optics, star.PARTICLES_BLOCK: particles}


@pytest.fixture
def relion31(tmp_path):
    write_stacks(tmp_path)
    path = tmp_path / "particles.star"
    star.write_star(path, relion31_blocks(), version=30001)
    return path


def test_images_across_two_stacks_keep_the_requested_order(relion31):
    particles = ParticleSet.open(relion31)
    assert len(particles) == 6 and particles.box_size == BOX
    order = [3, 0, 5, 1, 2, 4, 0]
    images = particles.images(order)
    assert images.dtype == np.float32 and images.shape == (7, BOX, BOX)
    np.testing.assert_array_equal(images[:, 5, 7], np.array(VALUES)[order])
    batches = list(particles.iter_batches(4))
    np.testing.assert_array_equal(np.concatenate([i for i, _ in batches]), np.arange(6))
    np.testing.assert_array_equal(np.concatenate([b for _, b in batches])[:, 0, 0], VALUES)
    subset = particles.subset([4, 1])
    np.testing.assert_array_equal(subset.images([0, 1])[:, 0, 0], [104, 200])
    assert subset.table[star.IMAGE_NAME].tolist() == [NAMES[4], NAMES[1]]


def test_reading_allocates_only_the_requested_images(tmp_path):
    path = tmp_path / "big.mrcs"
    n, box = 1000, 64  # a 16 MB stack
    with stack_writer(path, n, box, pixel_size=1.0) as out:
        out[:] = np.arange(n, dtype=np.float32)[:, None, None]
    particles = ParticleSet.open(path)
    tracemalloc.start()
    images = particles.images([999, 3])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(images[:, 0, 0], [999, 3])
    assert peak < 1_000_000  # two 16 kB images plus bookkeeping, not the 16 MB stack


def test_shuffled_repeated_reads_over_many_stacks_match_memory_maps(tmp_path, monkeypatch):
    """Stacks of several MRC modes; any order with repeats equals the memory-map reference, few files open."""
    monkeypatch.setattr(particles_module, "_OPEN_STACKS", 2)
    rng = np.random.default_rng(5)
    dtypes = [np.float32, np.int16, np.uint16, np.float16, np.int8, np.float32]
    names, reference = [], []
    for s, dtype in enumerate(dtypes):
        count = 3 + s
        stack = (rng.normal(size=(count, 8, 8)) * 30 + (60 if dtype in (np.uint16,) else 0)).astype(dtype)
        with mrcfile.new(tmp_path / f"s{s}.mrcs") as handle:
            handle.set_data(stack)
            handle.set_image_stack()
        names += [f"{k + 1:06d}@s{s}.mrcs" for k in range(count)]
        reference.append(mrcfile.mmap(tmp_path / f"s{s}.mrcs", mode="r").data.astype(np.float32))
    reference = np.concatenate(reference)
    path = tmp_path / "many.star"
    star.write_star(path, {"particles": pd.DataFrame({star.IMAGE_NAME: names})})
    particles = ParticleSet.open(path)
    fds = len(os.listdir("/proc/self/fd"))
    for order in (rng.permutation(len(names)), rng.integers(0, len(names), 40), np.arange(len(names))[::-1]):
        for batch in np.array_split(order, 4):
            np.testing.assert_array_equal(particles.images(batch), reference[batch])
        assert len(os.listdir("/proc/self/fd")) <= fds + 2  # dropped readers close their files
    particles.validate()


def test_validate_finds_the_highest_index_of_every_stack(tmp_path):
    write_stacks(tmp_path)
    path = tmp_path / "particles.star"
    names = ["000002@b.mrcs", "000006@a.mrcs", "000004@b.mrcs", "000001@a.mrcs", "000003@b.mrcs", "000002@a.mrcs"]
    star.write_star(path, relion31_blocks(names=names))
    assert_fails_naming(r"a.mrcs: image 6 requested but the stack holds 5", ParticleSet.open(path).validate, tmp_path)


def test_optics_values_are_merged_per_particle(relion31):
    particles = ParticleSet.open(relion31)
    table = particles.table
    np.testing.assert_array_equal(table[star.IMAGE_PIXEL_SIZE], np.where(np.array(GROUPS) == 1, 1.0, 2.0))
    np.testing.assert_array_equal(table[star.VOLTAGE], np.where(np.array(GROUPS) == 1, 300.0, 200.0))
    assert table["rlnMicrographOriginalPixelSize"].tolist() == [0.5, 1.0] * 3
    with pytest.raises(CryoForumError, match=r"particles.star.*different pixel sizes"):
        _ = particles.pixel_size
    assert particles.subset(np.array(GROUPS) == 2).pixel_size == 2.0
    psize = table[star.IMAGE_PIXEL_SIZE].to_numpy()
    angstrom = table[[star.ORIGIN_X_ANGST, star.ORIGIN_Y_ANGST]].to_numpy()
    np.testing.assert_allclose(particles.shifts_angstrom(), angstrom)
    np.testing.assert_allclose(particles.shifts_px(), angstrom / psize[:, None])
    assert particles.relion_version == "3.1" and particles.has_poses and particles.has_ctf


def test_quaternions_match_scipy(relion31):
    particles = ParticleSet.open(relion31)
    euler = particles.table[list(star.ANGLES)].to_numpy()
    reference = Rotation.from_euler("ZYZ", euler, degrees=True).inv().as_quat()  # quaternion of A = R^T
    q = particles.quaternions()
    np.testing.assert_allclose(np.abs(np.sum(q * reference, axis=1)), 1.0, atol=1e-9)
    assert (q[:, 3] >= 0).all()


def test_ctf_parameters_fit_compute_ctf(relion31):
    particles = ParticleSet.open(relion31)
    params = particles.ctf_parameters()
    expected = set(inspect.signature(compute_ctf).parameters) - {"size", "pixel_size", "rfft"}
    assert set(params) == expected
    np.testing.assert_array_equal(params["defocus_u"], particles.table[star.DEFOCUS_U])
    np.testing.assert_array_equal(params["spherical_aberration"], np.where(np.array(GROUPS) == 1, 2.7, 2.0))
    np.testing.assert_array_equal(params["phase_shift"], np.zeros(6))
    ctf = compute_ctf(BOX, 1.0, **params)
    assert ctf.shape == (6, BOX, BOX)
    assert ctf[1, 0, 0] == pytest.approx(0.07)  # the amplitude contrast of optics group 2 at zero frequency


def test_relion30_pixel_size_shifts_and_round_trip(tmp_path):
    write_stacks(tmp_path)
    block = pd.DataFrame(
        {
            star.IMAGE_NAME: NAMES[:3],
            star.ORIGIN_X: [1.0, -2.0, 0.5],
            star.ORIGIN_Y: [0.0, 3.0, -1.5],
            star.DETECTOR_PIXEL_SIZE: [5.0] * 3,
            star.MAGNIFICATION: [25000.0] * 3,
            star.VOLTAGE: [300.0] * 3,
            star.DEFOCUS_U: [1e4] * 3,
        }
    )
    source = tmp_path / "relion30.star"
    star.write_star(source, {"": block})
    particles = ParticleSet.open(source)
    assert particles.relion_version == "3.0" and particles.optics is None and not particles.has_poses
    assert particles.pixel_size == pytest.approx(2.0)  # 5 um / 25000
    np.testing.assert_allclose(particles.shifts_px(), block[[star.ORIGIN_X, star.ORIGIN_Y]])
    np.testing.assert_allclose(particles.shifts_angstrom(), 2.0 * block[[star.ORIGIN_X, star.ORIGIN_Y]])
    with pytest.raises(CryoForumError, match=r"relion30.star.*no CTF"):
        particles.ctf_parameters()  # Cs and amplitude contrast are missing
    with pytest.raises(CryoForumError, match=r"relion30.star.*no poses"):
        particles.quaternions()
    out = tmp_path / "out30.star"
    particles.write_star(out, columns={star.ANGLE_ROT: [10.0, 20.0, 30.0]})
    plain = starfile.read(out, always_dict=True)
    assert list(plain) == [""]
    expected = block.assign(**{star.ANGLE_ROT: [10.0, 20.0, 30.0]})
    pd.testing.assert_frame_equal(plain[""], expected, check_dtype=False)


def test_write_star_adds_columns_for_kept_particles_and_keeps_the_rest(relion31, tmp_path):
    particles = ParticleSet.open(relion31)
    original = relion31_blocks()
    out = tmp_path / "kept.star"
    keep = np.array([True, False, True, True, False, True])
    trace = np.linspace(0, 1, 6)
    particles.write_star(out, columns={star.DISPERSION_TRACE: trace, star.ANGLE_ROT: trace * 10}, keep=keep)
    plain = starfile.read(out, always_dict=True)
    assert list(plain) == ["optics", "particles"]
    pd.testing.assert_frame_equal(plain["optics"], original["optics"], check_dtype=False)
    expected = original["particles"][keep].reset_index(drop=True)
    expected[star.ANGLE_ROT] = trace[keep] * 10
    expected[star.DISPERSION_TRACE] = trace[keep]
    pd.testing.assert_frame_equal(plain["particles"], expected, check_dtype=False, atol=1e-6)
    assert star.star_version(out) == 30001
    per_kept = pd.DataFrame({star.OUTLIER: [0, 1, 0, 1]})
    particles.write_star(tmp_path / "flags.star", columns=per_kept, keep=keep)
    assert starfile.read(tmp_path / "flags.star")["particles"][star.OUTLIER].tolist() == [0, 1, 0, 1]


def test_relion5_file_survives_particle_set_round_trip(tmp_path):
    write_stacks(tmp_path)
    blocks = {"general": {"rlnTomoSubTomosAre2DStacks": 1}, **relion31_blocks()}
    blocks["optics"]["rlnCtfDataAreCtfPremultiplied"] = 0
    blocks["particles"]["rlnCoordinateZ"] = np.arange(6) * 1.5
    source = tmp_path / "relion5.star"
    star.write_star(source, blocks, version=50001)
    particles = ParticleSet.open(source)
    assert particles.relion_version == "5"
    out = tmp_path / "out5.star"
    particles.write_star(out, columns={star.EIGEN_GAP: np.arange(6.0)})
    plain = starfile.read(out, always_dict=True)
    assert list(plain) == ["general", "optics", "particles"] and star.star_version(out) == 50001
    assert plain["general"] == blocks["general"]
    pd.testing.assert_frame_equal(plain["optics"], blocks["optics"], check_dtype=False)
    expected = blocks["particles"].assign(**{star.EIGEN_GAP: np.arange(6.0)})
    pd.testing.assert_frame_equal(plain["particles"], expected, check_dtype=False, atol=1e-6)


def test_writing_over_the_source_is_refused(relion31):
    before = relion31.read_bytes()
    listing = sorted(relion31.parent.iterdir())
    with pytest.raises(CryoForumError, match=r"particles.star.*overwrite"):
        ParticleSet.open(relion31).write_star(relion31, columns={star.OUTLIER: np.zeros(6, int)})
    assert relion31.read_bytes() == before and sorted(relion31.parent.iterdir()) == listing


def test_stack_paths_resolve_beside_star_then_cwd_then_datadir(tmp_path, monkeypatch):
    write_stacks(tmp_path / "project" / "Extract")
    meta = tmp_path / "meta" / "particles.star"
    star.write_star(meta, relion31_blocks(stack_prefix="Extract/"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    monkeypatch.chdir(tmp_path / "project")  # RELION's convention: relative to the project folder
    np.testing.assert_array_equal(ParticleSet.open(meta).images([1, 0])[:, 0, 0], [200, 102])

    monkeypatch.chdir(elsewhere)
    with pytest.raises(CryoForumError, match=r"particles.star.*Extract/a.mrcs.*looked in") as error:
        ParticleSet.open(meta).images([0])
    assert str(tmp_path / "meta" / "Extract" / "a.mrcs") in str(error.value)
    assert str(elsewhere / "Extract" / "a.mrcs") in str(error.value)
    with_datadir = ParticleSet.open(meta, datadir=tmp_path / "project")
    np.testing.assert_array_equal(with_datadir.images([1, 0])[:, 0, 0], [200, 102])
    with_datadir.validate()

    # written elsewhere, stacks found only through datadir become absolute paths that resolve anywhere
    out = tmp_path / "results" / "out.star"
    with_datadir.write_star(out)
    names = starfile.read(out)["particles"][star.IMAGE_NAME]
    assert names[0] == f"000003@{tmp_path / 'project' / 'Extract' / 'a.mrcs'}"
    np.testing.assert_array_equal(ParticleSet.open(out).images([1, 0])[:, 0, 0], [200, 102])


def test_stacks_beside_the_star_file_are_found_from_any_working_folder(relion31, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    particles = ParticleSet.open(relion31)
    particles.validate()
    np.testing.assert_array_equal(particles.images([2])[:, 0, 0], [100])
    out = tmp_path / "results" / "out.star"
    particles.write_star(out)
    np.testing.assert_array_equal(ParticleSet.open(out).images(np.arange(6))[:, 0, 0], VALUES)


def test_bare_stack_opens_without_metadata(tmp_path):
    write_stacks(tmp_path, counts=(("only.mrcs", 3),))
    particles = ParticleSet.open(tmp_path / "only.mrcs")
    assert len(particles) == 3 and particles.box_size == BOX and particles.pixel_size == 1.0
    assert not particles.has_poses and not particles.has_ctf
    np.testing.assert_array_equal(particles.images([2, 0])[:, 0, 0], [102, 100])
    np.testing.assert_array_equal(particles.shifts_px(), np.zeros((3, 2)))
    particles.write_star(tmp_path / "only.star")
    plain = starfile.read(tmp_path / "only.star", always_dict=True)
    assert list(plain) == ["optics", "particles"]
    assert plain["particles"][star.IMAGE_NAME].tolist() == ["000001@only.mrcs", "000002@only.mrcs", "000003@only.mrcs"]
    write_stack(tmp_path / "unknown.mrcs", np.zeros((2, 8, 8)), 0.0)
    with pytest.raises(CryoForumError, match=r"unknown.mrcs: no pixel size"):
        _ = ParticleSet.open(tmp_path / "unknown.mrcs").pixel_size


def assert_fails_naming(path_fragment, action, folder):
    listing = sorted(folder.rglob("*"))
    with pytest.raises(CryoForumError, match=path_fragment):
        action()
    assert sorted(folder.rglob("*")) == listing  # nothing written


def test_index_out_of_range(tmp_path):
    write_stacks(tmp_path)
    path = tmp_path / "particles.star"
    star.write_star(path, relion31_blocks(names=[*NAMES[:5], "000009@b.mrcs"]))
    particles = ParticleSet.open(path)
    assert_fails_naming(r"b.mrcs: image 9 .*holds 4", particles.validate, tmp_path)
    assert_fails_naming(r"b.mrcs: image 9 .*particle 5", lambda: particles.images([0, 5]), tmp_path)
    np.testing.assert_array_equal(particles.images([0, 1])[:, 0, 0], VALUES[:2])


def test_mismatched_box_sizes(tmp_path):
    write_stacks(tmp_path)
    write_stacks(tmp_path, counts=(("small.mrcs", 2),), box=16)
    names = [*NAMES[:5], "000001@small.mrcs"]
    blocks = relion31_blocks(names=names)
    del blocks["optics"][star.IMAGE_SIZE]  # so the sizes come from the stacks themselves
    path = tmp_path / "particles.star"
    star.write_star(path, blocks)
    particles = ParticleSet.open(path)
    assert_fails_naming(
        r"particles.star: stacks have different box sizes.*small.mrcs: 16 px", particles.validate, tmp_path
    )
    assert_fails_naming(r"small.mrcs: images are 16 px", lambda: particles.images([5]), tmp_path)


def test_missing_and_corrupt_stacks(tmp_path):
    write_stacks(tmp_path)
    path = tmp_path / "particles.star"
    star.write_star(path, relion31_blocks())
    (tmp_path / "b.mrcs").write_bytes((tmp_path / "b.mrcs").read_bytes()[:-1000])
    particles = ParticleSet.open(path)
    assert_fails_naming(r"b.mrcs: corrupt or truncated", particles.validate, tmp_path)
    (tmp_path / "b.mrcs").unlink()
    assert_fails_naming(r"b.mrcs: MRC file not found", lambda: particles.images([1]), tmp_path)
    fresh = ParticleSet.open(path)
    assert_fails_naming(r"particles.star: image stack b.mrcs not found", lambda: fresh.images([1]), tmp_path)


@pytest.mark.filterwarnings("ignore:Data array contains NaN values")
def test_nan_image_names_stack_and_particle(tmp_path):
    images = np.ones((4, BOX, BOX), np.float32)
    images[2, 3, 4] = np.nan
    write_stack(tmp_path / "a.mrcs", images, 1.0)
    path = tmp_path / "particles.star"
    star.write_star(path, relion31_blocks(names=["000001@a.mrcs", "000002@a.mrcs", "000003@a.mrcs"]))
    particles = ParticleSet.open(path)
    assert_fails_naming(r"a.mrcs: image 3 \(particle 2\).*NaN", lambda: particles.images([0, 2]), tmp_path)
    assert particles.images([0, 1]).shape == (2, BOX, BOX)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: b["particles"].drop(columns=[star.IMAGE_NAME]), "no particle table with an rlnImageName"),
        (lambda b: b["particles"].assign(**{star.OPTICS_GROUP: 7}), "particles refer to optics group 7"),
        (lambda b: b["particles"].assign(**{star.IMAGE_NAME: "abc@a.mrcs"}), "bad rlnImageName 'abc@a.mrcs'"),
    ],
    ids=["no-image-name", "unknown-optics-group", "bad-image-name"],
)
def test_bad_metadata_names_the_star_file(tmp_path, change, message):
    blocks = relion31_blocks()
    blocks["particles"] = change(blocks)
    path = tmp_path / "bad.star"
    star.write_star(path, blocks)
    assert_fails_naming(f"bad.star: {message}", lambda: ParticleSet.open(path), tmp_path)


def test_unsupported_inputs(tmp_path):
    write_volume(tmp_path / "map.mrc", np.zeros((8, 8, 8)), 1.0)
    with pytest.raises(CryoForumError, match=r"map.mrc.*volume"):
        ParticleSet.open(tmp_path / "map.mrc")
    with pytest.raises(CryoForumError, match=r"notes.txt.*unknown"):
        ParticleSet.open(tmp_path / "notes.txt")
    with pytest.raises(CryoForumError, match=r"absent.star.*not found"):
        ParticleSet.open(tmp_path / "absent.star")
