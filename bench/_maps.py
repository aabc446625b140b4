"""The benchmarks' --volume option and the record of which map a benchmark simulated its particles from.

A record is the map's absolute path and sha256. It goes into each result.json and, as map.json, into every
folder of simulated particles that a later invocation reuses, so a reused folder is never credited to another map.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

RECORD_FILE = "map.json"


def add_volume_option(parser: argparse.ArgumentParser, default: Path, name: str) -> None:
    """Add --volume MAP (a map or an atomic model) with ``default``, the map called ``name``, in the help."""
    parser.add_argument(
        "--volume",
        type=Path,
        default=default,
        metavar="MAP",
        help=f"map (.mrc, .map) or atomic model (.pdb, .cif) to simulate from (default: {name}, {default})",
    )


def map_record(path: Path) -> dict:
    """Absolute path and sha256 of a map or model file."""
    path = Path(path).resolve()
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def same_map(first: Path, second: Path) -> bool:
    """Whether two files hold the same bytes (a map moved or copied is still the same map); False if one is gone."""
    if not (Path(first).is_file() and Path(second).is_file()):
        return False
    return map_record(first)["sha256"] == map_record(second)["sha256"]


def record_map(folder: Path, volume: Path) -> dict:
    """Write the record of ``volume`` into ``folder`` (just simulated from it) as map.json; the record."""
    record = map_record(volume)
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def recorded_map(folder: Path) -> dict | None:
    """The record kept in a folder of simulated particles; None when it has none."""
    path = folder / RECORD_FILE
    return json.loads(path.read_text()) if path.exists() else None


def check_recorded_map(folder: Path, volume: Path) -> None:
    """Stop unless the particles kept in ``folder`` were simulated from ``volume`` (same sha256)."""
    record = recorded_map(folder)
    if record is None:
        raise SystemExit(f"{folder} holds particles simulated from an unrecorded map: delete it to simulate them again")
    if record["sha256"] != map_record(volume)["sha256"]:
        raise SystemExit(
            f"{folder} holds particles simulated from {record['path']}, not from {volume}: "
            "delete it or choose another --out"
        )
