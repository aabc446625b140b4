"""Outputs written completely or not at all, and never over an input.

Every writer in cryo-forum goes through :func:`atomic_output` (one file) or :func:`atomic_directory`
(a folder of results): the content is written to a temporary sibling and renamed into place only when
it is complete, so an interrupted or failed command leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from cryo_forum.errors import CryoForumError


def refuse_overwriting_inputs(output: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Raise CryoForumError when ``output`` is the same file or folder as one of ``inputs``."""
    out = Path(output).resolve()
    for source in inputs:
        if source is not None and Path(source).resolve() == out:
            raise CryoForumError(f"{output}: refusing to overwrite an input file; choose another output path")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parents(path: Path) -> list[Path]:
    """Create the missing ancestors of ``path``; return them, deepest first, so a failure can remove them."""
    missing = [parent for parent in path.parents if not parent.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, on error delete it.

    The temporary name keeps the final suffix so that libraries choosing a format by extension work.
    """
    path = Path(path)
    created = _make_parents(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp creates 0600; outputs follow the umask like any file
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_if_empty(created)
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder; on success move its files into ``path`` (created if needed).

    Files already in ``path`` that the command does not produce are left alone; produced files replace
    earlier ones only after everything was written. On error the staging folder is removed.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CryoForumError(f"{path}: exists and is not a folder")
    created = _make_parents(path)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        path.mkdir(exist_ok=True)
        for item in sorted(staging.rglob("*")):
            target = path / item.relative_to(staging)
            if item.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(item, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_if_empty(created)
        raise
    shutil.rmtree(staging, ignore_errors=True)
