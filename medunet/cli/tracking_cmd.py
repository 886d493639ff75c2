"""``medunet runs``: the latest MLflow runs of an experiment with their key metrics, as a table."""

from __future__ import annotations

import argparse

from medunet.cli.common import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "runs",
        help="list recent MLflow runs (train, evaluate, infer, bench) with their key metrics",
        description="List the latest runs of an MLflow experiment, newest first: name, status, network, "
        "git commit and key metrics (losses, Dice, parameter count, peak memory, latency).",
    )
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow server or store; default $MLFLOW_TRACKING_URI, else "
                             "sqlite:///<cwd>/mlruns/mlruns.db")
    parser.add_argument("--experiment", default="medunet", help="experiment name (default medunet)")
    parser.add_argument("--limit", type=positive_int, default=20, help="how many runs (default 20)")
    parser.add_argument("--metric", action="append", default=[], metavar="KEY",
                        help="also show this metric (repeatable), e.g. --metric val_dice_spleen")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medunet.profiling.table import markdown_table
    from medunet.tracking.cli import recent_runs
    from medunet.tracking.stores import resolve_tracking_uri

    rows = recent_runs(args.tracking_uri, args.experiment, args.limit, args.metric)
    uri = resolve_tracking_uri(args.tracking_uri)
    if not rows:
        print(f"no runs in experiment {args.experiment!r} at {uri}")
        return 0
    print(f"experiment {args.experiment!r} at {uri}, newest first:\n")
    print(markdown_table(rows))
    return 0
