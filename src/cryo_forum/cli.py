"""The ``cryo-forum`` command line: one module per command in :mod:`cryo_forum.commands`.

Each command module has a docstring (its help), ``add_args(parser)`` and ``main(args)``, and imports nothing
heavy at module level; only the command being run adds its options, so ``--help`` and option errors answer
at once. Results go to stdout, progress and
notes to stderr (the ``cryo_forum`` logger). User errors (:class:`~cryo_forum.errors.CryoForumError`, files
that cannot be read or written) end with one line on stderr and exit status 1; argparse's usage errors exit
with status 2, an interrupt with 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cryo_forum import __version__
from cryo_forum.commands.options import setting_message
from cryo_forum.errors import CryoForumError, InvalidSetting

COMMANDS = [
    "info",
    "simulate",
    "train",
    "predict",
    "export",
    "demo",
    "evaluate",
    "filter",
    "reconstruct",
    "fsc",
    "match",
    "refine",
]
BROKEN_PIPE_STATUS = 141  # 128 + SIGPIPE, as a shell reports a reader that went away


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or with ``command`` given, of that command's options only (a fast --help)."""
    parser = argparse.ArgumentParser(
        prog="cryo-forum",
        description="Orientation estimation with uncertainty for single-particle cryo-EM.",
    )
    parser.add_argument("--version", action="version", version=f"cryo-forum {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"cryo_forum.commands.{name.replace('-', '_')}")
        doc = (module.__doc__ or "").strip()
        sub = subparsers.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command is not None and name != command:
            continue
        module.add_args(sub)
        options = {option for action in sub._actions for option in action.option_strings}
        sub.set_defaults(func=module.main, options=options)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (tests swap it), warnings marked as such."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


def _error_line(command: str, error: BaseException, options: set[str]) -> str:
    if isinstance(error, InvalidSetting):
        text = setting_message(error.setting, error.message, options)
    elif isinstance(error, OSError) and error.filename is not None:
        text = f"{error.filename}: {error.strerror or error}"
    else:
        text = str(error)
    return f"cryo-forum {command}: error: {text}"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((word for word in argv if not word.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    logger = logging.getLogger("cryo_forum")
    handler = None
    if not any(isinstance(existing, _StderrHandler) for existing in logger.handlers):  # not nested (demo)
        handler = _StderrHandler()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        result = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of stdout went away (``cryo-forum info FILE | head``): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_STATUS
    except (CryoForumError, OSError) as error:
        print(_error_line(args.command, error, args.options), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cryo-forum {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    finally:
        if handler is not None:
            logger.removeHandler(handler)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
