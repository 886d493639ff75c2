"""``medunet networks``: list the registered networks (filled in by the networks package)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("networks", help="list the registered networks and presets")
    parser.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    from medunet.networks import list_networks

    for name in list_networks():
        print(name)
    return 0
