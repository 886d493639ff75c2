"""MLflow tracking of medunet runs: one :class:`Tracker` per command, an ignite handler, CLI options.

- :mod:`stores`: which tracking URI (argument > ``MLFLOW_TRACKING_URI`` > ``<cwd>/mlruns/mlruns.db``),
  local SQLite stores, and which store failures move a run to the fallback store;
- :mod:`tracker`: :class:`Tracker`, the run (params, metrics, profile, evaluation, artifacts, tags),
  which never stops the command and loses nothing when the server is unreachable;
- :mod:`handler`: :class:`MLflowTrackingHandler`, losses/learning rate/validation metrics of engines;
- :mod:`cli`: ``--tracking-uri/--experiment/--no-tracking`` and the table of ``medunet runs``.
"""

from medunet.tracking.cli import add_tracking_arguments, recent_runs, tracker_from_args
from medunet.tracking.handler import MLflowTrackingHandler
from medunet.tracking.stores import default_store_uri, local_store_uri, resolve_tracking_uri
from medunet.tracking.tracker import Tracker

__all__ = [
    "MLflowTrackingHandler",
    "Tracker",
    "add_tracking_arguments",
    "default_store_uri",
    "local_store_uri",
    "recent_runs",
    "resolve_tracking_uri",
    "tracker_from_args",
]
