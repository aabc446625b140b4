"""A plain `pip install .` gives a working tool: declared dependencies, a clean `pip check`, no tensorflow-addons."""

import os
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tensorflow_graphics_is_a_declared_dependency():
    requirements = metadata.requires("cryo-forum") or []
    assert any(requirement.startswith("tensorflow-graphics") for requirement in requirements), requirements


def test_installed_dependencies_are_consistent():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rotation_code_never_imports_tensorflow_addons():
    """tensorflow-graphics pulls in the discontinued tensorflow-addons, which no longer imports under TF 2.21."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from cryo_forum import geometry
        from cryo_forum.training.trainer import build_model
        from cryo_forum.streams.preprocess import Preprocessor
        from cryo_forum.training.config import ModelSettings, StarData, TrainingConfig
        q = geometry.random_quaternions(4, 0).astype(np.float32)
        geometry.quaternion_to_matrix_tf(q)
        geometry.quaternion_multiply_tf(q, q)
        build_model(TrainingConfig(StarData("x"), Preprocessor(image_size=32), ModelSettings(widths=[8])))
        print(sorted(name for name in sys.modules if name.startswith("tensorflow_addons")))
        """
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_built_wheel_declares_everything_and_carries_its_data(tmp_path):
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    command.append(str(ROOT))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    wheel = next(tmp_path.glob("cryo_forum-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        meta = next(name for name in names if name.endswith(".dist-info/METADATA"))
        requires = [line for line in archive.read(meta).decode().splitlines() if line.startswith("Requires-Dist:")]
        entry_points = archive.read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert any("tensorflow-graphics" in line for line in requires)
    assert "cryo-forum = cryo_forum.cli:main" in entry_points
    for data in ("example.mrc", "1a28_chainA.pdb", "5j0n.mrc", "LICENSE-5j0n.txt", "README.md"):
        assert f"cryo_forum/data/{data}" in names, data
