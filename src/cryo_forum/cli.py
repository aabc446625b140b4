"""The ``cryo-forum`` command line: one module per command in :mod:`cryo_forum.commands`.

Each command module has a docstring (its help), ``add_args(parser)`` and ``main(args)``. User errors
(:class:`~cryo_forum.errors.CryoForumError`, bad files, bad options) end with a one-line message on
stderr and exit status 1; argparse's own usage errors exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from cryo_forum import __version__
from cryo_forum.errors import CryoForumError

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
]


def build_parser() -> argparse.ArgumentParser:
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
        module.add_args(sub)
        sub.set_defaults(func=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except CryoForumError as error:
        print(f"cryo-forum {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cryo-forum {args.command}: interrupted; no partial output was kept", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
