"""``medunet runs``: the latest MLflow runs of an experiment with their key metrics, as a table;
``medunet track FOLDER``: push a run folder or an evaluation folder to MLflow (after an outage, or to another
store)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from medunet.cli.common import positive_int
from medunet.errors import MedunetError

#: Metrics shown by ``medunet runs`` when some listed run has them, in this order.
KEY_METRICS = ("train_loss", "val_mean_dice", "val_best_metric", "eval_dice_foreground", "model_params",
               "peak_train_mb", "latency_ms")
# Parameters naming the network, as the training config, a profile or a user may log it.
_NETWORK_PARAMS = ("network.name", "network", "profile.network")


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

    track = subparsers.add_parser(
        "track",
        help="push a training run folder or an evaluation folder to MLflow (e.g. after the server was down)",
        description="Send what FOLDER records (a 'medunet train' run folder: config, per-epoch metrics, model "
        "facts, checkpoint; or a 'medunet evaluate' folder: metrics, summary, report) to an MLflow store. A run "
        "folder already tracked in that store continues its MLflow run with only what is new.",
    )
    track.add_argument("folder", type=Path, help="run folder (config.json) or evaluation folder (summary.json)")
    track.add_argument("--tracking-uri", default=None, help="MLflow server or store; default $MLFLOW_TRACKING_URI, "
                       "else sqlite:///<cwd>/mlruns/mlruns.db")
    track.add_argument("--experiment", default="medunet", help="experiment name (default medunet)")
    track.set_defaults(func=run_track)


def run(args: argparse.Namespace) -> int:
    from medunet.profiling.table import markdown_table
    from medunet.tracking.stores import resolve_tracking_uri

    rows = recent_runs(args.tracking_uri, args.experiment, args.limit, args.metric)
    uri = resolve_tracking_uri(args.tracking_uri)
    if not rows:
        print(f"no runs in experiment {args.experiment!r} at {uri}")
        return 0
    print(f"experiment {args.experiment!r} at {uri}, newest first:\n")
    print(markdown_table(rows))
    return 0


def run_track(args: argparse.Namespace) -> int:
    from medunet.tracking import track_folder

    tracker = track_folder(args.folder, args.tracking_uri, args.experiment)
    if tracker.failed:
        raise MedunetError(f"MLflow at {tracker.uri} did not take {args.folder}. Fix: check that the server runs "
                           "(and --tracking-uri), then run the command again.")
    print(tracker.describe())
    return 0


def recent_runs(tracking_uri: str | None = None, experiment: str = "medunet", limit: int = 20,
                metrics: Sequence[str] = ()) -> list[dict[str, str]]:
    """The latest runs of ``experiment``, newest first, as table rows of text.

    Columns: run name, id, kind (the ``kind`` tag: train, infer, evaluate, bench), status, start, network,
    commit, then each of :data:`KEY_METRICS` and
    ``metrics`` that at least one run has (its last value).
    """
    import time

    from mlflow import MlflowClient

    from medunet.tracking.stores import resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(tracking_uri)
    database = sqlite_path(uri)
    if database is not None and not database.is_file():  # MLflow would create an empty store there
        raise MedunetError(f"no MLflow store at {database}: track a run first, or pass --tracking-uri")
    client = MlflowClient(tracking_uri=uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise MedunetError(f"no experiment {experiment!r} in {uri}; experiments there: {', '.join(names) or 'none'}")
        runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)
    except MedunetError:
        raise
    except Exception as error:
        raise MedunetError(f"cannot read MLflow runs from {uri}: {error}; check --tracking-uri") from error
    wanted = list(dict.fromkeys([*KEY_METRICS, *metrics]))
    shown = [key for key in wanted if any(key in run.data.metrics for run in runs)]
    rows = []
    for run in runs:
        params, tags, values = run.data.params, run.data.tags, run.data.metrics
        row = {
            "run": run.info.run_name or "",
            "id": run.info.run_id[:8],
            "kind": tags.get("kind", "-"),
            "status": run.info.status,
            "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000)),
            "network": next((params[key] for key in _NETWORK_PARAMS if key in params), "-"),
            "commit": tags.get("mlflow.source.git.commit", "-")[:8],
        }
        row.update({key: f"{values[key]:.4g}" if key in values else "-" for key in shown})
        rows.append(row)
    return rows
