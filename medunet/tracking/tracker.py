"""One MLflow run per medunet command: an observer that never stops the command.

The records that matter are written by the stages themselves, atomically, into their folders (a training's
run folder, an evaluation's output folder). Tracking copies them to MLflow. If the store cannot be reached or
fails during the run, the tracker warns once, says how to push the folder later (``medunet track FOLDER
--tracking-uri URI``) and stops tracking: nothing is lost, since the folder holds every figure.

Only :class:`mlflow.MlflowClient` is used, never MLflow's global "active run", so trackers of different runs
(or a tracker beside a user's own MLflow code) do not interfere. MLflow itself splits large batches and
resolves the source, git and user tags (``mlflow.tracking.context.registry.resolve_tags``).
"""

from __future__ import annotations

import json
import logging
import platform
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medunet.environment import git_commit, software_versions
from medunet.tracking import stores
from medunet.tracking.values import MAX_TAG_LENGTH, clean_key, clip, flatten_metrics, flatten_params

logger = logging.getLogger("medunet.tracking")


class Tracker:
    """One MLflow run: parameters, metrics over time, artifacts and tags.

    Args:
        tracking_uri: where to track (see :func:`~medunet.tracking.stores.resolve_tracking_uri`):
            ``http://host:5000``, ``sqlite:////abs/mlruns.db``, a folder or ``.db`` path; default
            ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns/mlruns.db``.
        experiment: MLflow experiment name, created when missing (default ``medunet``).
        run_name: the run's name; default the run folder's name, else ``medunet-<date>-<time>``.
        run_dir: the folder whose records this run mirrors; named in the warning when tracking fails.
        enabled: False makes every method a no-op (``--no-tracking``), so callers need no ``if``.
        tags: extra tags, set beside the automatic ones (source, git commit, user, versions, device).
        device: the device the run computes on, for the ``device`` tag.
        resume_run_id: an MLflow run to continue (a resumed training logs into the run it started) when it
            exists in this store and experiment; otherwise a new run is created, tagged ``resumed_from_run``,
            and the old one, if still ``RUNNING`` (its process was killed), is marked ``KILLED``.

    Use it as a context manager: the run ends ``FINISHED``, ``FAILED`` on an exception, ``KILLED`` on Ctrl-C.

    Example:
        >>> with Tracker(run_dir="runs/spleen_f0") as tracker:  # doctest: +SKIP
        ...     tracker.log_params({"network": {"name": "lunet_small_8f"}, "fold": 0})
        ...     tracker.log_metrics({"train_loss": 0.41}, step=1)
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "medunet", run_name: str | None = None,
                 run_dir: str | Path | None = None, enabled: bool = True, tags: Mapping[str, Any] | None = None,
                 device: str | None = None, resume_run_id: str | None = None) -> None:
        self.enabled = enabled
        self.experiment = experiment
        self.run_dir = Path(run_dir).expanduser().resolve() if run_dir is not None else None
        self.run_name = run_name or (self.run_dir.name if self.run_dir else time.strftime("medunet-%Y%m%d-%H%M%S"))
        self.tracking_uri = stores.resolve_tracking_uri(tracking_uri) if enabled else ""
        self.uri = self.tracking_uri
        self.resume_run_id = resume_run_id
        self.resumed = False  # whether the run continues resume_run_id
        self.failed = False  # the store failed: tracking stopped, the folder keeps the records
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._extra_tags = {"device": device or "cpu", **dict(tags or {})}
        self._client: Any = None
        self._params: dict[str, str] = {}
        self._warned: set[str] = set()
        self._started = self._ended = False

    @property
    def active(self) -> bool:
        """Whether values are being sent (enabled, not failed, not ended)."""
        return self.enabled and not self.failed and not self._ended

    def start(self) -> Tracker:
        """Create (or continue) the run; returns ``self``. A store failure warns and disables tracking."""
        if not self.active or self._started:
            return self
        self._started = True
        try:
            self._open()
        except Exception as error:  # noqa: BLE001 - any store failure stops tracking, never the command
            self._fail(error)
            return self
        tags = {f"version.{name}": version for name, version in software_versions().items()}
        tags.update(host=platform.node() or "unknown", command=shlex.join(sys.argv) if sys.argv else "")
        commit = git_commit()  # of the medunet checkout: MLflow's own tag looks only at the entry script
        if commit is not None:
            tags["mlflow.source.git.commit"], dirty = commit
            tags["git_dirty"] = str(dirty).lower()
        if self.resume_run_id and not self.resumed:
            tags["resumed_from_run"] = self.resume_run_id
        self.set_tags({**tags, **self._extra_tags})
        logger.info("tracking %s", self.describe())
        return self

    def end(self, status: str = "FINISHED") -> None:
        """End the run with MLflow status ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if self.active and self._started and self.run_id is not None:
            self._call(lambda: self._client.set_terminated(self.run_id, status))
        self._ended = True

    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.end(status)

    @property
    def run_url(self) -> str | None:
        """The run's page on a tracking server (None for local stores: use ``mlflow ui``)."""
        if self.run_id is None or not stores.is_remote(self.uri):
            return None
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"

    def describe(self) -> str:
        """One line saying where the run is, for the command's output."""
        if not self.enabled:
            return "tracking disabled"
        if self.failed:
            return f"run {self.run_name!r}: tracking at {self.uri} failed; {self._push_hint()}"
        where = self.run_url or f"{self.uri} (view: mlflow ui --backend-store-uri {self.uri})"
        return f"MLflow run {self.run_name!r} ({self.run_id}) in experiment {self.experiment!r}: {where}"

    # -------------------------------------------------------------------------------------- logging
    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        """Log parameters; nested dicts become ``a.b.c`` keys, values text clipped to 6000 characters.

        MLflow keeps a parameter's first value: logging the same key again with another value is
        skipped with a warning (log it under a new name, or as a metric if it changes over time).
        """
        new: dict[str, str] = {}
        for key, value in flatten_params(params, prefix).items():
            old = self._params.get(key)
            if old is None:
                new[key] = value
            elif old != value:
                self._warn_once(f"param:{key}", f"parameter {key!r} was logged as {old!r}; the new value "
                                f"{value!r} is not logged (MLflow keeps a parameter's first value)")
        if new and self.active:
            self._params.update(new)
            self._batch(params=new)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, prefix: str = "") -> dict[str, float]:
        """Log plain numbers at ``step`` (default 0; nested dicts as ``key_sub``); returns what was logged.
        ``prefix`` is added to keys lacking it; NaN is left out, other non-numbers with a warning."""
        values, skipped = flatten_metrics(metrics, prefix)
        for key in skipped:
            self._warn_once(f"metric:{key}", f"metric {key!r} is not a number and is not logged")
        if values and self.active:
            stamp = int(time.time() * 1000)
            self._batch(metrics=[(key, value, stamp, int(step or 0)) for key, value in values.items()])
        return values

    def log_results(self, result: Any, prefix: str = "", step: int | None = None) -> dict[str, float]:
        """Log any result that offers plain ``as_params()`` and ``metrics()`` dicts (a profile, an evaluation).

        ``prefix`` (e.g. ``"lunet_small_8f.1x1x128x128x128"``) keeps several results apart in one run.
        """
        if hasattr(result, "as_params"):
            self.log_params(result.as_params(), prefix=prefix)
        metrics = result.metrics() if hasattr(result, "metrics") else {}
        return self.log_metrics(metrics, step=step, prefix=prefix)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text, clipped to 8000 characters); a tag set again is overwritten."""
        cleaned = {clean_key(key): clip(str(value), MAX_TAG_LENGTH) for key, value in tags.items()}
        if cleaned and self.active:
            self._batch(tags=cleaned)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder with its content, under ``artifact_path`` in the run."""
        path = Path(path).expanduser().resolve()
        if not path.exists():
            self._warn_once(f"artifact:{path}", f"artifact {path} does not exist and is not logged")
            return
        if self.active and self._ensure_started():
            upload = self._client.log_artifacts if path.is_dir() else self._client.log_artifact
            self._call(lambda: upload(self.run_id, str(path), artifact_path))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Save ``data`` as a JSON (or ``.yaml``) artifact file, e.g. the executed config."""
        if self.active and self._ensure_started():
            snapshot = json.loads(json.dumps(data, default=str))
            self._call(lambda: self._client.log_dict(self.run_id, snapshot, artifact_file))

    def log_config(self, path: str | Path) -> None:
        """Log a JSON config file (e.g. ``RUN_DIR/config.json``): flattened as parameters, uploaded as it is."""
        path = Path(path)
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            self._warn_once(f"config:{path}", f"config {path} could not be read ({error}); not logged")
            return
        if isinstance(loaded, Mapping):
            self.log_params(loaded)
        self.log_artifact(path)

    # ------------------------------------------------------------------------------------ the store
    def _open(self) -> None:
        """Connect, find or create the experiment, continue or create the run."""
        from mlflow import MlflowClient
        from mlflow.tracking.context.registry import resolve_tags

        stores.prepare_store(self.uri)
        stores.check_reachable(self.uri)
        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            experiment_id = stores.create_experiment(client, self.experiment, self.uri)
        elif experiment.lifecycle_stage != "active":
            raise RuntimeError(f"experiment {self.experiment!r} is deleted in {self.uri}: restore it "
                               f"(mlflow experiments restore) or choose another --experiment")
        else:
            experiment_id = experiment.experiment_id
        run = self._resumed_run(client, experiment_id)
        if run is None:
            run = client.create_run(experiment_id, run_name=self.run_name, tags=resolve_tags())
        self._client, self.experiment_id, self.run_id = client, experiment_id, run.info.run_id

    def _resumed_run(self, client: Any, experiment_id: str) -> Any:
        """The run to continue, reopened as ``RUNNING`` with its parameters known; None to start a new one
        (after marking a dead ``RUNNING`` predecessor ``KILLED``)."""
        from mlflow.exceptions import MlflowException

        if not self.resume_run_id:
            return None
        try:
            run = client.get_run(self.resume_run_id)
        except MlflowException:
            return None
        if run.info.experiment_id != experiment_id or run.info.lifecycle_stage != "active":
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
            return None
        client.update_run(run.info.run_id, status="RUNNING")
        self._params.update(run.data.params)  # same values are not sent again; changed ones are warned about
        self.resumed = True
        return run

    def _ensure_started(self) -> bool:
        if not self._started:
            self.start()
        return self.active and self.run_id is not None

    def _batch(self, **batch: Any) -> None:
        """One ``log_batch`` request (MLflow splits it to its limits)."""
        from mlflow.entities import Metric, Param, RunTag

        if not self._ensure_started():
            return
        params = [Param(key, value) for key, value in batch.get("params", {}).items()]
        tags = [RunTag(key, value) for key, value in batch.get("tags", {}).items()]
        metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in batch.get("metrics", [])]
        self._call(lambda: self._client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags))

    def _call(self, request: Any) -> None:
        """Send one request; a refused value warns, any other failure stops tracking (see :meth:`_fail`)."""
        try:
            stores.check_reachable(self.uri)
            request()
        except Exception as error:  # noqa: BLE001 - tracking must never stop the command
            if stores.is_rejected_value(error):
                self._warn_once(f"rejected:{error}", f"MLflow refused a value: {stores.short_error(error)}")
            else:
                self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self.failed = True
        logger.warning("MLflow tracking at %s failed (%s); the command goes on untracked. %s",
                       self.uri, stores.short_error(error), self._push_hint())

    def _push_hint(self) -> str:
        folder = self.run_dir if self.run_dir is not None else "the output folder"
        return (f"Its records are complete in {folder}: once the store is back, push them with "
                f"'medunet track {folder} --tracking-uri {self.uri} --experiment {self.experiment}'.")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

