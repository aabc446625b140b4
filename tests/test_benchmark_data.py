"""Every map the benchmarks, recipes and notebooks need ships with the package, with its provenance and licence.

A clone of the repository must rerun every benchmark: nothing may read a map from beside the checkout (the old
`../shared/data/5j0n.mrc`), and every command that simulates particles from a map takes --volume for another one.
"""

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from cryo_forum.io.maps import benchmark_map_path, example_map_path, load_volume

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "cryo_forum" / "data"
SCANNED = ("bench", "data_prep", "notebooks", "src")
FORBIDDEN = ("../shared", "shared/data")
GENERATED = {"__pycache__", ".ipynb_checkpoints", "notebook_runs"}
# bench and data_prep commands that simulate particles from a map (and must take --volume), and those that do not
SIMULATING = {
    "bench/accuracy.py": benchmark_map_path(),
    "bench/accuracy_vs_snr.py": benchmark_map_path(),
    "bench/design_choices.py": benchmark_map_path(),
    "bench/realistic.py": benchmark_map_path(),
    "bench/scaling.py": example_map_path(),
    "bench/throughput.py": example_map_path(),
    "data_prep/simulate_5j0n.py": benchmark_map_path(),
    "data_prep/simulate_example.py": example_map_path(),
    "data_prep/simulate_job.py": benchmark_map_path(),
}
WITHOUT_MAP = {"bench/cleanup.py", "bench/comparison.py", "data_prep/make_example_map.py"}  # they reuse runs
COMMANDS = sorted(
    str(path.relative_to(ROOT)) for folder in ("bench", "data_prep") for path in (ROOT / folder).glob("[!_]*.py")
)


def recorded_sha256() -> str:
    """The 5j0n map's sha256 as its provenance section in cryo_forum/data/README.md states it."""
    readme = (DATA / "README.md").read_text()
    section = readme.split("## The benchmark map: `5j0n.mrc`", 1)[1]
    return re.search(r"sha256 `([0-9a-f]{64})`", section).group(1)


def scanned_files() -> list[Path]:
    """The project's own files under bench/, data_prep/, notebooks/ and src/ (not caches, builds or run outputs)."""
    files = (path for folder in SCANNED for path in (ROOT / folder).rglob("*") if path.is_file())
    return [
        path
        for path in files
        if not GENERATED.intersection(path.parts)
        and not any(part.endswith(".egg-info") for part in path.parts)
        and (ROOT / "bench" / "results") not in path.parents
    ]


def load_script(relative: str):
    """Import a file of the repository as a module."""
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_map_is_shipped_and_loads_at_the_benchmark_setting():
    path = benchmark_map_path()
    assert path == DATA / "5j0n.mrc"
    volume, pixel_size = load_volume(path)
    assert pixel_size == pytest.approx(3.667, abs=1e-3)
    assert volume.shape == (76, 76, 76)  # 75 x 57 x 69 voxels boxed in the smallest even cube
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no density may fall outside the benchmarks' box
        volume, pixel_size = load_volume(path, pixel_size=4.58, size=64)
    assert volume.shape == (64, 64, 64) and pixel_size == 4.58
    assert np.isfinite(volume).all() and volume.max() > 0


def test_benchmark_map_matches_the_recorded_sha256():
    assert hashlib.sha256(benchmark_map_path().read_bytes()).hexdigest() == recorded_sha256()


def test_benchmark_map_licence_is_beside_it():
    licence = (DATA / "LICENSE-5j0n.txt").read_text()
    assert licence.startswith("MIT License\n\nCopyright (c) 2019 Jelena Banjac\n")
    assert "The above copyright notice and this permission notice shall be included" in licence


def test_every_data_file_is_installed_with_the_package():
    setup = (ROOT / "setup.py").read_text()
    patterns = re.search(r"package_data=\{\"cryo_forum\": \[([^\]]*)\]\}", setup).group(1)
    suffixes = {pattern.strip().strip('"').removeprefix("data/*") for pattern in patterns.split(",")}
    assert {path.suffix for path in DATA.iterdir() if path.is_file()} <= suffixes


def test_nothing_reads_maps_from_beside_the_checkout():
    offending = [
        str(path.relative_to(ROOT))
        for path in scanned_files()
        if any(text.encode() in path.read_bytes() for text in FORBIDDEN)
    ]
    assert not offending, f"these files refer to data outside the repository: {offending}"


def test_every_command_is_classified():
    assert set(COMMANDS) == set(SIMULATING) | WITHOUT_MAP


@pytest.mark.parametrize("script", COMMANDS)
def test_help_runs_and_lists_volume_where_a_map_is_simulated(script):
    """`--help` is fast and, for a command that simulates, offers --volume with a shipped map as its default."""
    environment = {**os.environ, "COLUMNS": "1000"}  # one line per option, so the default path is not wrapped
    command = [sys.executable, script, "--help"]
    done = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("--volume MAP" in done.stdout) == (script in SIMULATING)
    if script in SIMULATING:
        assert str(SIMULATING[script]) in done.stdout


def test_a_kept_simulation_is_reused_only_with_its_own_map(tmp_path):
    maps = load_script("bench/_maps.py")
    record = maps.record_map(tmp_path, benchmark_map_path())
    assert record == {"path": str(benchmark_map_path().resolve()), "sha256": recorded_sha256()}
    maps.check_recorded_map(tmp_path, benchmark_map_path())
    with pytest.raises(SystemExit, match="not from"):
        maps.check_recorded_map(tmp_path, example_map_path())
    with pytest.raises(SystemExit, match="unrecorded map"):
        maps.check_recorded_map(tmp_path / "elsewhere", benchmark_map_path())
