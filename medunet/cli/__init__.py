"""The ``medunet`` command line: one sub-command per module, registered below."""

from __future__ import annotations

import argparse
import importlib
import sys

from medunet.errors import MedunetError

# Each module defines ``register(subparsers)`` that adds its sub-command(s) and sets ``func``.
COMMAND_MODULES = (
    "medunet.cli.data_cmd",
    "medunet.cli.networks_cmd",
    "medunet.cli.profile_cmd",
    "medunet.cli.bench_cmd",
    "medunet.cli.evaluate_cmd",
    "medunet.cli.tracking_cmd",
    "medunet.cli.bundle_cmd",
    "medunet.cli.workflow_cmd",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MedunetError as error:
        # Errors raised by medunet already name the file or case and the fix: print them plainly.
        print(f"medunet {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
