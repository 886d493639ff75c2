"""Command-line glue: the tracking options every run command shares, and the table of recent runs.

A command adds the options with :func:`add_tracking_arguments` and builds its tracker with
:func:`tracker_from_args`::

    add_tracking_arguments(parser)                       # in register()
    with tracker_from_args(args, run_dir) as tracker:    # in run()
        ...
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medunet.cli.common import add_tracking_arguments  # noqa: F401 - re-exported; defined light for the CLI
from medunet.errors import MedunetError
from medunet.tracking.stores import resolve_tracking_uri, sqlite_path
from medunet.tracking.tracker import Tracker

#: Metrics shown by ``medunet runs`` when some listed run has them, in this order.
KEY_METRICS = (
    "train_loss",
    "val_mean_dice",
    "val_best_metric",
    "eval_dice_foreground",
    "model_params",
    "peak_train_mb",
    "latency_ms",
)
# Parameters naming the network, as the training config, ``log_profile`` or a user may log it.
_NETWORK_PARAMS = ("network.name", "network", "profile.network")


def tracker_from_args(
    args: argparse.Namespace, run_dir: str | Path | None = None, run_name: str | None = None, **kwargs: Any
) -> Tracker:
    """The :class:`Tracker` the options ask for (disabled with ``--no-tracking``); ``kwargs`` go to it."""
    return Tracker(
        tracking_uri=getattr(args, "tracking_uri", None),
        experiment=getattr(args, "experiment", "medunet"),
        run_name=run_name,
        run_dir=run_dir,
        enabled=not getattr(args, "no_tracking", False),
        **kwargs,
    )


def recent_runs(
    tracking_uri: str | None = None, experiment: str = "medunet", limit: int = 20, metrics: Sequence[str] = ()
) -> list[dict[str, str]]:
    """The latest runs of ``experiment``, newest first, as table rows of text.

    Columns: run name, id, kind (the ``kind`` tag: train, infer, evaluate, bench), status, start, network,
    commit, then each of :data:`KEY_METRICS` and
    ``metrics`` that at least one run has (its last value).
    """
    from mlflow import MlflowClient

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
