"""The output guard: one place that knows everything a command reads and keeps its outputs off it.

A command registers its inputs (particle files with every stack they name, maps, run folders with every file
in them) and checks each output path before any computation starts, so a bad ``--out`` fails in a second
instead of after an hour, and no output ever replaces an input. The checks also refuse outputs that could
not be written (a folder that is not writable, a file name that is an existing folder).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cryo_forum.errors import CryoForumError


class OutputGuard:
    """The inputs of one command and the checks that keep its outputs off them."""

    def __init__(self) -> None:
        self._files: dict[Path, str] = {}

    def protect(self, path: str | os.PathLike | None, what: str = "an input") -> OutputGuard:
        """Protect a file, or every file inside a folder (a run folder: its model, config, checkpoints)."""
        if path is None:
            return self
        path = Path(path)
        if path.is_dir():
            for item in path.rglob("*"):
                if item.is_file():
                    self._files[item.resolve()] = f"{what} ({path})"
        else:
            self._files[path.resolve()] = what
        return self

    def protect_particles(self, particles) -> OutputGuard:
        """Protect a ParticleSet's source file and every stack it names that can be found."""
        self.protect(particles.source, "an input particle file")
        for name in particles.stack_names:
            try:
                self.protect(particles.resolve_stack(name), f"an image stack of {particles.source}")
            except CryoForumError:
                continue  # a missing stack cannot be overwritten; reading it fails later with its own message
        return self

    def check_file(self, output: str | os.PathLike) -> Path:
        """Refuse an output file that is an input, an existing folder, or lies where nothing can be written."""
        output = Path(output)
        self._refuse_input(output)
        if output.is_dir():
            raise CryoForumError(f"{output}: is a folder; give a file name")
        _check_writable(output, output.parent)
        return output

    def check_folder(self, output: str | os.PathLike, produces: Iterable[str] | None = None) -> Path:
        """Refuse an output folder that would replace inputs or is not writable.

        ``produces`` names the files the command writes into it: an existing folder is accepted when none of
        them is an input. Without ``produces`` the folder must be new or empty (data sets and exports, whose
        files other STAR files or runs may point at).
        """
        output = Path(output)
        if output.exists() and not output.is_dir():
            raise CryoForumError(f"{output}: exists and is not a folder")
        if produces is None:
            if output.is_dir() and any(output.iterdir()):
                raise CryoForumError(f"{output}: folder is not empty; choose a new folder")
        else:
            for name in produces:
                self._refuse_input(output / name)
        if output.resolve() in self._files:
            self._refuse_input(output)
        _check_writable(output)
        return output

    def _refuse_input(self, output: Path) -> None:
        what = self._files.get(output.resolve())
        if what is not None:
            raise CryoForumError(f"{output}: refusing to overwrite an input ({what} of this command)")


def _check_writable(path: Path, start: Path | None = None) -> None:
    """The nearest existing one of ``start`` (default ``path``) and its ancestors must be a folder we can create
    files in, so that ``path`` can be written.

    Tried by creating (and removing) a temporary file: permission bits say nothing for root or read-only mounts.
    """
    existing = path if start is None else start
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise CryoForumError(f"{path}: cannot be created, {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise CryoForumError(f"{path}: cannot write in {existing} ({error.strerror or error})") from None
