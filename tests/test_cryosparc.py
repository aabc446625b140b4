"""cryoSPARC .cs import: conventions (DESIGN.md) checked against scipy and direct arithmetic."""

import numpy as np
import pytest
import starfile
from scipy.spatial.transform import Rotation

from cryo_forum.errors import CryoForumError
from cryo_forum.io import star
from cryo_forum.io.cryosparc import read_cs
from cryo_forum.io.mrc import write_stack
from cryo_forum.io.particles import ParticleSet

CS_DTYPE = [
    ("uid", "<u8"),
    ("blob/path", "S64"),
    ("blob/idx", "<u4"),
    ("blob/shape", "<u4", (2,)),
    ("blob/psize_A", "<f4"),
    ("alignments3D/pose", "<f4", (3,)),
    ("alignments3D/shift", "<f4", (2,)),
    ("alignments3D/psize_A", "<f4"),
    ("ctf/accel_kv", "<f4"),
    ("ctf/cs_mm", "<f4"),
    ("ctf/amp_contrast", "<f4"),
    ("ctf/df1_A", "<f4"),
    ("ctf/df2_A", "<f4"),
    ("ctf/df_angle_rad", "<f4"),
    ("ctf/phase_shift_rad", "<f4"),
]


def make_cs(path, stack="J1/imported/stack.mrcs", n=8, psize=(1.5,), box=16, seed=0):
    """A .cs file as cryoSPARC writes it (np.save to an open handle keeps the .cs suffix)."""
    rng = np.random.default_rng(seed)
    data = np.zeros(n, dtype=CS_DTYPE)
    data["uid"] = rng.integers(0, 2**63, n, dtype=np.uint64)
    data["blob/path"] = f">{stack}".encode()
    data["blob/idx"] = rng.permutation(n)
    data["blob/shape"] = box
    data["blob/psize_A"] = np.resize(psize, n)
    data["alignments3D/pose"] = Rotation.random(n, random_state=seed).as_rotvec()
    data["alignments3D/shift"] = rng.normal(0, 2, (n, 2))
    data["alignments3D/psize_A"] = data["blob/psize_A"]
    data["ctf/accel_kv"] = 300.0
    data["ctf/cs_mm"] = 2.7
    data["ctf/amp_contrast"] = 0.07
    data["ctf/df1_A"] = rng.uniform(10000, 20000, n)
    data["ctf/df2_A"] = data["ctf/df1_A"] - 300
    data["ctf/df_angle_rad"] = rng.uniform(-np.pi, np.pi, n)
    data["ctf/phase_shift_rad"] = rng.uniform(0, 1, n)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.save(handle, data)
    return data


def test_poses_follow_the_rotation_vector_convention(tmp_path):
    data = make_cs(tmp_path / "particles.cs")
    particles, _ = read_cs(tmp_path / "particles.cs")
    euler = particles[list(star.ANGLES)].to_numpy()
    # DESIGN.md: from_rotvec(pose).as_matrix() == A^T, and A^T == from_euler('ZYZ', [rot, tilt, psi]).as_matrix()
    a_transpose = Rotation.from_euler("ZYZ", euler, degrees=True).as_matrix()
    np.testing.assert_allclose(a_transpose, Rotation.from_rotvec(data["alignments3D/pose"]).as_matrix(), atol=1e-5)


def test_names_shifts_and_ctf_are_converted(tmp_path):
    data = make_cs(tmp_path / "particles.cs", psize=(1.5,))
    particles, optics = read_cs(tmp_path / "particles.cs")
    expected = [f"{i + 1:06d}@J1/imported/stack.mrcs" for i in data["blob/idx"]]
    assert particles[star.IMAGE_NAME].tolist() == expected
    np.testing.assert_allclose(particles[star.ORIGIN_X_ANGST], data["alignments3D/shift"][:, 0] * 1.5, rtol=1e-6)
    np.testing.assert_allclose(particles[star.ORIGIN_Y_ANGST], data["alignments3D/shift"][:, 1] * 1.5, rtol=1e-6)
    np.testing.assert_allclose(particles[star.DEFOCUS_U], data["ctf/df1_A"])
    np.testing.assert_allclose(particles[star.DEFOCUS_V], data["ctf/df2_A"])
    np.testing.assert_allclose(particles[star.DEFOCUS_ANGLE], np.degrees(data["ctf/df_angle_rad"]), rtol=1e-6)
    np.testing.assert_allclose(particles[star.PHASE_SHIFT], np.degrees(data["ctf/phase_shift_rad"]), rtol=1e-6)
    assert len(optics) == 1
    row = optics.iloc[0]
    assert row[star.IMAGE_PIXEL_SIZE] == pytest.approx(1.5)
    assert row[star.IMAGE_SIZE] == 16 and row[star.VOLTAGE] == pytest.approx(300)
    assert row[star.CS] == pytest.approx(2.7) and row[star.AMPLITUDE_CONTRAST] == pytest.approx(0.07)
    assert (particles[star.OPTICS_GROUP] == 1).all()


def test_one_optics_group_per_pixel_size(tmp_path):
    make_cs(tmp_path / "particles.cs", n=6, psize=(1.0, 2.0, 2.0))
    particles, optics = read_cs(tmp_path / "particles.cs")
    assert optics[star.OPTICS_GROUP].tolist() == [1, 2]
    assert optics[star.IMAGE_PIXEL_SIZE].tolist() == [1.0, 2.0]
    assert particles[star.OPTICS_GROUP].tolist() == [1, 2, 2, 1, 2, 2]


def test_datadir_prefixes_relative_blob_paths(tmp_path):
    make_cs(tmp_path / "particles.cs", n=2)
    particles, _ = read_cs(tmp_path / "particles.cs", datadir=tmp_path / "project")
    assert all(
        name.split("@")[1] == str(tmp_path / "project" / "J1/imported/stack.mrcs")
        for name in particles[star.IMAGE_NAME]
    )


def test_particle_set_from_cs_reads_images_and_writes_relion31(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    project = tmp_path / "project"
    images = np.random.default_rng(3).normal(size=(8, 16, 16)).astype(np.float32)
    write_stack(project / "J1/imported/stack.mrcs", images, 1.5)
    data = make_cs(project / "J2/particles.cs")
    particles = ParticleSet.open(project / "J2/particles.cs", datadir=project)
    assert len(particles) == 8 and particles.pixel_size == pytest.approx(1.5) and particles.box_size == 16
    np.testing.assert_array_equal(particles.images(np.arange(8)), images[data["blob/idx"]])
    np.testing.assert_allclose(particles.shifts_px(), data["alignments3D/shift"], atol=1e-5)

    out = tmp_path / "out" / "particles.star"
    particles.write_star(out)
    blocks = starfile.read(out, always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    assert blocks["optics"][star.IMAGE_PIXEL_SIZE].tolist() == [1.5]
    again = ParticleSet.open(out)
    assert again.relion_version == "3.1"
    np.testing.assert_array_equal(again.images([0, 5]), images[data["blob/idx"][[0, 5]]])
    np.testing.assert_allclose(again.quaternions(), particles.quaternions(), atol=1e-5)


def test_bad_cs_files_name_the_file(tmp_path):
    with pytest.raises(CryoForumError, match=r"missing\.cs"):
        read_cs(tmp_path / "missing.cs")
    (tmp_path / "text.cs").write_text("not numpy")
    with pytest.raises(CryoForumError, match=r"text\.cs"):
        read_cs(tmp_path / "text.cs")
    with open(tmp_path / "noblob.cs", "wb") as handle:
        np.save(handle, np.zeros(3, dtype=[("uid", "<u8")]))
    with pytest.raises(CryoForumError, match=r"noblob.cs.*blob/idx"):
        read_cs(tmp_path / "noblob.cs")
