"""Long work kept in blocks beside its output, so an interrupted command resumes where it stopped.

A :class:`PartialResults` folder (``OUT.partial`` beside the output ``OUT``) holds one ``.npz`` file of arrays per
finished block of particles, each written atomically, and the fingerprint of the work's inputs and settings.
A later invocation with the same fingerprint takes the finished blocks and does only the rest; with another one
the folder is started afresh. The command removes the folder once its output is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from cryo_forum.io.atomic import atomic_output

FINGERPRINT_NAME = "fingerprint.json"


def fingerprint(*parts: object) -> str:
    """The sha256 of arrays (their dtype, shape and bytes) and of the text of everything else."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            array = np.ascontiguousarray(part)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
        else:
            digest.update(repr(part).encode())
    return digest.hexdigest()


class PartialResults:
    """Finished blocks of one piece of work, in ``folder``, valid for the inputs that gave ``key``."""

    def __init__(self, folder: str | Path, key: str) -> None:
        self.folder = Path(folder)
        path = self.folder / FINGERPRINT_NAME
        recorded = json.loads(path.read_text()).get("key") if path.is_file() else None
        if recorded != key:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            with atomic_output(path) as tmp:
                tmp.write_text(json.dumps({"key": key}) + "\n")

    @staticmethod
    def beside(output: str | Path) -> Path:
        """The partial folder of an output file: ``OUT.partial``."""
        output = Path(output)
        return output.with_name(output.name + ".partial")

    def _block(self, begin: int) -> Path:
        return self.folder / f"block-{begin:010d}.npz"

    def load(self, begin: int) -> dict[str, np.ndarray] | None:
        """The arrays of the block starting at particle ``begin``, None when it was not finished."""
        path = self._block(begin)
        if not path.is_file():
            return None
        with np.load(path) as stored:
            return {name: stored[name] for name in stored.files}

    def save(self, begin: int, arrays: dict[str, np.ndarray]) -> None:
        with atomic_output(self._block(begin)) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)

    def finished(self) -> int:
        """How many blocks are finished."""
        return len(list(self.folder.glob("block-*.npz")))

    @staticmethod
    def discard(folder: str | Path) -> None:
        """Remove a partial folder (once the output it was kept for is written); nothing if there is none."""
        shutil.rmtree(folder, ignore_errors=True)
