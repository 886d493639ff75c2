"""MLflow tracking of medunet runs, as an observer: it copies the records the stages write, and never steers.

- :mod:`stores`: which tracking URI (argument > ``MLFLOW_TRACKING_URI`` > ``<cwd>/mlruns/mlruns.db``), local
  SQLite stores, reachability and which failures are refused values;
- :mod:`tracker`: :class:`Tracker`, one MLflow run (params, metrics, artifacts, tags) that warns once and stops
  when the store fails, never stopping the command;
- :mod:`sync`: a run folder or evaluation folder pushed to MLflow, live (:class:`RunFolderTracking`) or later
  (``medunet track FOLDER``).
"""

from medunet.tracking.stores import local_store_uri, resolve_tracking_uri
from medunet.tracking.sync import RunFolderTracking, push_evaluation_folder, push_run_folder, track_folder
from medunet.tracking.tracker import Tracker

__all__ = [
    "RunFolderTracking",
    "Tracker",
    "local_store_uri",
    "push_evaluation_folder",
    "push_run_folder",
    "resolve_tracking_uri",
    "track_folder",
]
