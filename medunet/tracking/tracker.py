"""One MLflow run per medunet command, that never stops the command and never loses what was logged.

Every value logged through a :class:`Tracker` is kept in a journal in memory (params, metrics, tags,
artifact paths) and written to the store at once. If the store fails for any reason other than refusing
one value (server unreachable or timing out, database locked, no permission), the tracker says so once,
opens the local fallback store (``<run_dir>/mlruns/mlruns.db``, else ``<cwd>/mlruns/mlruns.db``), creates
the run there, replays the whole journal into it and carries on there. Should that fail too, the journal
is written as JSON (``<run_dir>/tracking_journal.json``) so the values remain. Artifacts are replayed
from their paths, so a file rewritten after it was logged is replayed in its new version.

Only :class:`mlflow.MlflowClient` is used, never MLflow's global "active run", so trackers of different
runs (or a tracker beside a user's own MLflow code) do not interfere.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medunet.run_folder import CONFIG_FILE
from medunet.tracking import stores
from medunet.tracking.values import MAX_TAG_LENGTH, clean_key, clip, flatten_metrics, flatten_params

if TYPE_CHECKING:
    from medunet.evaluation import EvaluationResult
    from medunet.profiling import ProfileResult

logger = logging.getLogger("medunet.tracking")

JOURNAL_FILE = "tracking_journal.json"
_BATCH_PARAMS_TAGS = 100  # MLflow's limits per log_batch call
_BATCH_METRICS = 1000
_EVALUATION_FILES = ("summary.json", "cases.csv", "report.html", "report.pdf")


@dataclass
class _Op:
    """One logged thing, kept so it can be replayed into the fallback store."""

    kind: str  # "params" | "metrics" | "tags" | "artifact" | "dict"
    payload: Any


class Tracker:
    """One MLflow run: parameters, metrics over time, model facts, artifacts and automatic tags.

    Args:
        tracking_uri: where to track (see :func:`~medunet.tracking.stores.resolve_tracking_uri`):
            ``http://host:5000``, ``sqlite:////abs/mlruns.db``, a folder or ``.db`` path; default
            ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlruns/mlruns.db``.
        experiment: MLflow experiment name, created when missing (default ``medunet``).
        run_name: the run's name; default the run directory's name, else ``medunet-<date>-<time>``.
        run_dir: the run directory; the fallback store and journal go there when the store fails.
        enabled: False makes every method a no-op (``--no-tracking``), so callers need no ``if``.
        tags: extra tags, set beside the automatic ones (git commit, versions, device, host, command).
        device: the device the run computes on, for the ``device`` tag (default cuda when present).
        resume_run_id: an MLflow run to continue (a resumed training logs into the run it started) when it
            exists in this store and experiment; otherwise a new run is created, tagged ``resumed_from_run``,
            and the old one, if still ``RUNNING`` (its process was killed), is marked ``KILLED``.

    Use it as a context manager: the run ends ``FINISHED``, ``FAILED`` on an exception, ``KILLED`` on
    Ctrl-C. Tracking problems are reported as warnings on the ``medunet.tracking`` logger, never raised.

    Example:
        >>> with Tracker(run_dir="runs/spleen_f0") as tracker:  # doctest: +SKIP
        ...     tracker.log_params({"network": {"name": "lunet_small_8f"}, "fold": 0})
        ...     tracker.log_metrics({"train_loss": 0.41}, step=1)
        ...     tracker.log_artifact("runs/spleen_f0/models/model.pt", "models")
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "medunet",
        run_name: str | None = None,
        run_dir: str | Path | None = None,
        enabled: bool = True,
        tags: Mapping[str, Any] | None = None,
        device: str | None = None,
        resume_run_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.resume_run_id = resume_run_id
        self.resumed = False  # whether the run continues resume_run_id
        self.experiment = experiment
        self.run_dir = Path(run_dir).expanduser().resolve() if run_dir is not None else None
        self.run_name = run_name or (self.run_dir.name if self.run_dir else time.strftime("medunet-%Y%m%d-%H%M%S"))
        self.tracking_uri = stores.resolve_tracking_uri(tracking_uri) if enabled else ""
        self.uri = self.tracking_uri  # the store written to now; the fallback store after a failure
        self.failed_uri: str | None = None  # the store that failed, once the run moved to the fallback
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.journal_file: Path | None = None  # set when even the fallback store failed
        self._extra_tags = dict(tags or {})
        self._device = device
        self._client: Any = None
        self._journal: list[_Op] = []
        self._params: dict[str, str] = {}
        self._warned: set[str] = set()
        self._started = False
        self._ended = False
        self._before_end: list[Callable[[], None]] = []

    # ----------------------------------------------------------------------------------------- life
    def start(self) -> Tracker:
        """Create the run (at the latest on the first value logged); returns ``self``."""
        if not self.enabled or self._started or self._ended:
            return self
        self._started = True
        try:
            self._open(self.uri)
        except Exception as error:  # noqa: BLE001 - any store failure moves the run, never stops it
            self._fall_back(error)
        from medunet.tracking.tags import run_tags

        link = {"resumed_from_run": self.resume_run_id} if self.resume_run_id and not self.resumed else {}
        self.set_tags({**run_tags(self._device), **self._extra_tags, **link})
        logger.info("tracking %s", self.describe())
        return self

    def end(self, status: str = "FINISHED") -> None:
        """End the run with MLflow status ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if not self.enabled or not self._started or self._ended:
            return
        for flush in self._before_end:
            with contextlib.suppress(Exception):
                flush()
        self._ended = True
        if self.journal_file is None:
            try:
                self._terminate(status)
            except Exception as error:  # noqa: BLE001
                self._fall_back(error)
                if self.journal_file is None:
                    with contextlib.suppress(Exception):
                        self._terminate(status)
        if self.journal_file is not None:
            self._write_journal(status)

    def __enter__(self) -> Tracker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        self.end(status)

    @property
    def fell_back(self) -> bool:
        """Whether the run moved to the local fallback store because its store failed."""
        return self.failed_uri is not None

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
        if self.journal_file is not None:
            return f"run {self.run_name!r}: tracking failed, values saved in {self.journal_file}"
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
        if new and self.enabled:
            self._params.update(new)
            self._record(_Op("params", new))

    def log_metrics(
        self,
        metrics: Mapping[str, Any],
        step: int | None = None,
        prefix: str = "",
        names: Sequence[str] | Mapping[int, str] | None = None,
    ) -> dict[str, float]:
        """Log numeric values at ``step`` (default 0); returns the ``{key: value}`` logged.

        Tensors and NumPy values are accepted; a vector (e.g. per-label Dice) becomes one metric per
        entry named by ``names`` (``val_dice_spleen``) or index; ``prefix`` is added to keys lacking it.
        """
        values, skipped = flatten_metrics(metrics, prefix, names)
        for key in skipped:
            self._warn_once(f"metric:{key}", f"metric {key!r} is not a number and is not logged")
        if values and self.enabled:
            timestamp = int(time.time() * 1000)
            self._record(_Op("metrics", [(key, value, timestamp, int(step or 0)) for key, value in values.items()]))
        return values

    def log_series(self, key: str, points: Sequence[tuple[int, float, int]]) -> None:
        """Log many steps of one metric in one request: ``(step, value, timestamp in ms)`` points.

        The handler batches per-iteration losses this way, so a remote server gets one request an
        epoch rather than one an iteration.
        """
        if points and self.enabled:
            name = clean_key(key)
            self._record(_Op("metrics", [(name, float(value), int(stamp), int(step)) for step, value, stamp in points]))

    def before_end(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the run ends, before it is closed (e.g. to flush buffered values)."""
        self._before_end.append(callback)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values as text, clipped to 8000 characters); a tag set again is overwritten."""
        cleaned = {clean_key(key): clip(str(value), MAX_TAG_LENGTH) for key, value in tags.items()}
        if cleaned and self.enabled:
            self._record(_Op("tags", cleaned))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder with its content, under ``artifact_path`` in the run."""
        path = Path(path).expanduser().resolve()
        if not path.exists():
            self._warn_once(f"artifact:{path}", f"artifact {path} does not exist and is not logged")
            return
        if self.enabled:
            self._record(_Op("artifact", (str(path), artifact_path)))

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        """Save ``data`` as a JSON (or ``.yaml``) artifact file, e.g. the executed config."""
        if self.enabled:
            snapshot = json.loads(json.dumps(data, default=str))  # later changes of `data` must not leak in
            self._record(_Op("dict", (snapshot, artifact_file)))

    def log_config(self, config: Mapping[str, Any] | str | Path, artifact_file: str = CONFIG_FILE) -> None:
        """Log a run's executed config: flattened as parameters and saved as an artifact.

        ``config`` is a dict (saved as ``artifact_file``), or the path of a JSON/YAML file (uploaded as it is,
        under its own name).
        """
        if isinstance(config, Mapping):
            self.log_params(config)
            self.log_dict(config, artifact_file)
            return
        path = Path(config)
        try:
            text = path.read_text(encoding="utf-8")
            loaded = json.loads(text) if path.suffix == ".json" else _load_yaml(text)
        except (OSError, ValueError) as error:
            self._warn_once(f"config:{path}", f"config {path} could not be read ({error}); not logged")
            return
        if isinstance(loaded, Mapping):
            self.log_params(loaded)
        self.log_artifact(path)

    def log_profile(self, result: ProfileResult, prefix: str = "") -> dict[str, float]:
        """Log the profiler's model facts as metrics (MB = MiB, as in ``medunet profile``).

        ``prefix`` (e.g. ``"lunet_small_8f.1x1x128x128x128"``) keeps several profiles apart in one run.

        ``model_params``, ``model_size_mb``, ``model_macs``, ``skip_memory_mb``, ``latency_ms`` and, when
        measured, ``peak_infer_mb``, ``peak_train_mb``, ``train_latency_ms``; the profiled network, input
        shape, device and memory method as ``profile.*`` parameters.
        """
        from medunet.profiling.profiler import MIB

        facts: dict[str, float | None] = {
            "model_params": result.params,
            "model_size_mb": result.size_mb,
            "model_macs": result.macs,
            "skip_memory_mb": result.skip_bytes / MIB,
            "latency_ms": result.latency_ms,
            "peak_infer_mb": None if result.peak_infer_bytes is None else result.peak_infer_bytes / MIB,
            "peak_train_mb": None if result.peak_train_bytes is None else result.peak_train_bytes / MIB,
            "train_latency_ms": result.train_latency_ms,
        }
        self.log_params({f"profile.{prefix}".rstrip("."): {
            "network": result.name,
            "input_shape": "x".join(map(str, result.input_shape)),
            "device": result.device,
            "memory_method": result.memory_method or "not measured",
        }})
        return self.log_metrics({key: value for key, value in facts.items() if value is not None}, prefix=prefix)

    def log_evaluation(
        self,
        source: EvaluationResult | str | Path,
        prefix: str = "eval",
        artifact_path: str = "evaluation",
        step: int | None = None,
    ) -> dict[str, float]:
        """Log an evaluation: mean of each metric per label as ``<prefix>_<metric>_<label name>``.

        ``source`` is an :class:`~medunet.evaluation.EvaluationResult`, a ``summary.json`` or its folder.
        Also logs ``<prefix>_n_cases`` and uploads summary.json, cases.csv and the report (HTML, PDF)
        under ``artifact_path``. Counts (TP, FP, ...) are left to the CSV. Returns the metrics logged.
        """
        from medunet.evaluation.metrics import COUNT_METRICS  # TP, FP, ... summed over cases: left to the CSV

        if isinstance(source, (str, Path)):
            summary_file = Path(source) / "summary.json" if Path(source).is_dir() else Path(source)
            try:
                medunet_block = json.loads(summary_file.read_text(encoding="utf-8"))["medunet"]
                statistics, labels = medunet_block["statistics"], medunet_block["labels"]
            except (OSError, ValueError, KeyError) as error:
                self._warn_once(f"evaluation:{summary_file}", f"{summary_file} is not a medunet summary.json "
                                f"({error!r}); evaluation not logged")
                return {}
            files = [summary_file.parent / name for name in _EVALUATION_FILES]
        else:
            statistics, labels = source.aggregates, source.labels
            files = list(source.files.values())
        label_names = {str(value): str(name) for value, name in labels.items()}
        metrics: dict[str, float] = {}
        for label_key, per_metric in statistics.items():
            label = label_names.get(str(label_key), str(label_key))
            for metric, stats in per_metric.items():
                if metric not in COUNT_METRICS:
                    metrics[f"{prefix}_{metric}_{label}"] = stats["mean"]
                    metrics.setdefault(f"{prefix}_n_cases", stats.get("n_cases", float("nan")))
        logged = self.log_metrics(metrics, step=step)
        for file in files:
            if Path(file).is_file():
                self.log_artifact(file, artifact_path)
        return logged

    # ------------------------------------------------------------------------------------- internals
    def _record(self, op: _Op) -> None:
        """Journal ``op`` and write it; a failing store moves the run to the fallback store."""
        if self._ended:
            self._warn_once("ended", f"run {self.run_name!r} has ended: values logged after end() are dropped")
            return
        if not self._started:
            self.start()
        self._journal.append(op)
        if self.journal_file is not None:
            return  # both stores failed: values stay in the journal, written at the end
        try:
            self._apply(op)
        except Exception as error:  # noqa: BLE001
            if stores.is_rejected_value(error):
                self._warn_once(f"rejected:{op.kind}:{error}", f"MLflow refused a value: {stores.short_error(error)}")
            else:
                self._fall_back(error)

    def _open(self, uri: str) -> None:
        """Connect to ``uri``, find or create the experiment, create the run."""
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        stores.prepare_store(uri)
        with self._limits(uri, probe=True):
            client = MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                try:
                    experiment_id = client.create_experiment(self.experiment, stores.artifact_location(uri))
                except MlflowException as error:  # created meanwhile by a concurrent run
                    if getattr(error, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
                        raise
                    experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
            elif experiment.lifecycle_stage != "active":
                raise RuntimeError(f"experiment {self.experiment!r} is deleted in {uri}: restore it "
                                   f"(mlflow experiments restore) or choose another --experiment")
            else:
                experiment_id = experiment.experiment_id
            run = self._resumed_run(client, experiment_id) if uri == self.tracking_uri else None
            if run is None:
                run = client.create_run(experiment_id, run_name=self.run_name)
        self._client, self.uri = client, uri
        self.experiment_id, self.run_id = experiment_id, run.info.run_id

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

    def _apply(self, op: _Op) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, run_id = self._client, self.run_id
        with self._limits(self.uri, probe=False):
            if op.kind == "params":
                items = [Param(key, value) for key, value in op.payload.items()]
                for chunk in _chunks(items, _BATCH_PARAMS_TAGS):
                    client.log_batch(run_id, params=chunk)
            elif op.kind == "tags":
                items = [RunTag(key, value) for key, value in op.payload.items()]
                for chunk in _chunks(items, _BATCH_PARAMS_TAGS):
                    client.log_batch(run_id, tags=chunk)
            elif op.kind == "metrics":
                items = [Metric(key, value, timestamp, step) for key, value, timestamp, step in op.payload]
                for chunk in _chunks(items, _BATCH_METRICS):
                    client.log_batch(run_id, metrics=chunk)
            elif op.kind == "artifact":
                path, artifact_path = op.payload
                if Path(path).is_dir():
                    client.log_artifacts(run_id, path, artifact_path)
                else:
                    client.log_artifact(run_id, path, artifact_path)
            elif op.kind == "dict":
                data, artifact_file = op.payload
                client.log_dict(run_id, data, artifact_file)

    def _fall_back(self, error: BaseException) -> None:
        """Move the run to the local fallback store and replay the journal; if that fails, keep the journal."""
        target = stores.local_store_uri((self.run_dir or Path.cwd()) / stores.STORE_FOLDER)
        if self.fell_back or target == self.uri:
            self._give_up(error, self.uri)
            return
        self.failed_uri = self.uri
        logger.warning(
            "MLflow tracking at %s failed (%s). The run goes on: everything of run %r is recorded in the "
            "local store %s instead (view: mlflow ui --backend-store-uri %s).",
            self.failed_uri, stores.short_error(error), self.run_name, target, target,
        )
        try:
            self._open(target)
            self._journal.insert(0, _Op("tags", {"fallback_from": self.failed_uri,
                                                 "fallback_reason": clip(stores.short_error(error), 500)}))
            for op in self._journal:
                self._replay(op)
        except Exception as fallback_error:  # noqa: BLE001
            self._give_up(fallback_error, target)

    def _replay(self, op: _Op) -> None:
        if op.kind == "artifact" and not Path(op.payload[0]).exists():
            self._warn_once(f"artifact:{op.payload[0]}", f"artifact {op.payload[0]} was removed before it could "
                            "be copied to the fallback store")
            return
        try:
            self._apply(op)
        except Exception as error:
            if not stores.is_rejected_value(error):
                raise

    def _give_up(self, error: BaseException, uri: str) -> None:
        """Both stores failed: keep values in the journal and write it to a JSON file now and at the end."""
        if self.run_dir is not None:
            self.journal_file = self.run_dir / JOURNAL_FILE
        else:
            self.journal_file = Path.cwd() / stores.STORE_FOLDER / f"tracking_journal_{clean_key(self.run_name)}.json"
        self._write_journal("RUNNING")
        logger.warning("MLflow tracking failed in %s too (%s); tracking stops for run %r and its values are "
                       "saved in %s.", uri, stores.short_error(error), self.run_name, self.journal_file)

    def _write_journal(self, status: str) -> None:
        record: dict[str, Any] = {"tracking_uri": self.tracking_uri, "experiment": self.experiment,
                                  "run_name": self.run_name, "status": status, "params": {}, "tags": {},
                                  "metrics": [], "artifacts": [], "dicts": []}
        for op in self._journal:
            if op.kind in ("params", "tags"):
                record[op.kind].update(op.payload)
            elif op.kind == "metrics":
                record["metrics"] += [dict(zip(("key", "value", "timestamp", "step"), m, strict=True)) for m in op.payload]
            else:
                record["artifacts" if op.kind == "artifact" else "dicts"].append(list(op.payload))
        try:
            self.journal_file.parent.mkdir(parents=True, exist_ok=True)
            self.journal_file.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
        except OSError as error:
            self._warn_once("journal", f"the tracking journal could not be written to {self.journal_file}: {error}")

    def _terminate(self, status: str) -> None:
        with self._limits(self.uri, probe=False):
            self._client.set_terminated(self.run_id, status)

    @staticmethod
    def _limits(uri: str, probe: bool) -> contextlib.AbstractContextManager:
        return stores.http_limits(probe) if stores.is_remote(uri) else contextlib.nullcontext()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def _chunks(items: list, size: int) -> list[list]:
    return [items[start:start + size] for start in range(0, len(items), size)]


def _load_yaml(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)
