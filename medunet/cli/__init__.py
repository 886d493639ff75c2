"""The ``medunet`` command line: one sub-command per module, registered below.

The command modules import torch, MONAI and MLflow only inside the functions that run a command, so
``medunet --help`` and argument errors answer in well under a second (``benchmarks/cli_startup.py``).
Every user error ends as one line on stderr and exit code 2: argparse errors, :class:`MedunetError`, and
an ``OSError`` such as a full disk or a read-only run folder.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from medunet.checks import WRITE_FIXES, write_problem
from medunet.cli.common import OneLineParser
from medunet.errors import MedunetError, user_error_inside

# Each module defines ``register(subparsers)`` that adds its sub-command(s) and sets ``func``.
COMMAND_MODULES = (
    "medunet.cli.data_cmd",
    "medunet.cli.networks_cmd",
    "medunet.cli.profile_cmd",
    "medunet.cli.bench_cmd",
    "medunet.cli.evaluate_cmd",
    "medunet.cli.tracking_cmd",
    "medunet.cli.bundle_cmd",
    "medunet.cli.deploy_cmd",
    "medunet.cli.workflow_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="medunet",
        description="Efficient U-Nets for 3D medical image segmentation on MONAI.",
    )
    from medunet import __version__

    parser.add_argument("--version", action="version", version=f"medunet {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``medunet ARGV``; return the exit code (0 done, 2 a user error, printed as one line)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or an argument error already printed as one line
        return exit_.code if isinstance(exit_.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader left (``medunet networks | head``): not an error of the command
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except MedunetError as error:
        # Errors raised by medunet already name the file or case and the fix: print them plainly.
        print(f"medunet {args.command}: error: {error}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as error:
        # MONAI wraps errors raised inside a transform chain or a config evaluation in a RuntimeError: a
        # medunet error inside (a truncated file met by LoadImaged) is still the user's, printed as one line;
        # so is a full disk, a read-only or forbidden folder.
        user_error = user_error_inside(error)
        if user_error is not None:
            print(f"medunet {args.command}: error: {user_error}", file=sys.stderr)
            return 2
        os_error = _os_error_inside(error)
        if os_error is None:
            raise
        print(f"medunet {args.command}: error: {write_problem(os_error)}", file=sys.stderr)
        return 2


def _os_error_inside(error: BaseException) -> OSError | None:
    """The OSError naming a file, or saying a disk is full or read-only, that ``error`` is or wraps (None: a
    bug, whose traceback should show)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and (seen.filename is not None or seen.errno in WRITE_FIXES):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
