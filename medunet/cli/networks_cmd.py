"""``medunet networks``: the registered networks and presets, with what each one is."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("networks", help="list the registered networks and presets")
    parser.add_argument("--family", help="only this family: onenet, lunet, nafnet, unet--, baseline")
    parser.add_argument("--names", action="store_true", help="names only, one per line")
    parser.set_defaults(func=_list)


def _list(args: argparse.Namespace) -> int:
    from medunet.networks import get_preset, list_networks

    names = list_networks(family=args.family)
    if args.names:
        print("\n".join(names))
        return 0
    width = max(map(len, names), default=0)
    for name in names:
        preset = get_preset(name)
        print(f"{name:<{width}}  {preset.family:<8}  {preset.description.strip().splitlines()[0]}")
    print(f"\n{len(names)} networks. Build one: medunet.networks.create_network(NAME, spatial_dims=3, ...)")
    return 0
