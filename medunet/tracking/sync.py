"""Mirror a folder's records into MLflow: a training's run folder (live, as an ignite handler, or later with
``medunet track``) and an evaluation's output folder.

The folder is the one source of the figures. A training run folder holds ``config.json`` (parameters),
``metrics.json`` (a row per epoch: ``train_loss``, ``learning_rate`` logged as ``lr``, ``val_mean_dice``,
``val_dice_<label>``, ``epoch_seconds``), ``profile.json`` (model facts at the training batch), the models and
``metrics.csv`` (artifacts). ``tracking.json`` remembers the MLflow run and how many epochs it holds, so a push
sends only what is new, and a resumed training (or a later ``medunet track``) continues the same run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from medunet.atomic import atomic_write_text
from medunet.errors import MedunetError
from medunet.run_folder import (
    CONFIG_FILE,
    METRICS_CSV,
    MODEL_FILE,
    PROFILE_FILE,
    TRACKING_FILE,
    read_json_file,
    read_metrics_record,
)
from medunet.tracking.tracker import Tracker

EVALUATION_FILES = ("summary.json", "cases.csv", "report.html", "report.pdf")
_RENAMED = {"learning_rate": "lr"}


def tracker_for_run_folder(run_dir: str | Path, tracking_uri: str | None = None, experiment: str = "medunet",
                           enabled: bool = True) -> Tracker:
    """A tracker that continues the run folder's MLflow run when it is in the same store, else starts one."""
    state = _state(run_dir)
    tracker = Tracker(tracking_uri, experiment, run_dir=run_dir, enabled=enabled, tags={"kind": "train"})
    if state.get("tracking_uri") == tracker.tracking_uri and isinstance(state.get("run_id"), str):
        tracker.resume_run_id = state["run_id"]
    return tracker


def push_run_folder(run_dir: str | Path, tracker: Tracker, final: bool = False) -> int:
    """Send what the run folder holds and the MLflow run does not yet: parameters and profile once, new epoch
    rows each time, artifacts when ``final``. Returns the number of epochs sent."""
    run_dir = Path(run_dir)
    # Both records checked before the MLflow run starts: a bad one leaves no run behind.
    record = read_metrics_record(run_dir) or {}
    profile = read_json_file(run_dir / PROFILE_FILE, "the model facts of the run", expect=dict) or {}
    for part in ("params", "metrics"):
        if not isinstance(profile.get(part) or {}, dict):
            raise MedunetError(f"{run_dir / PROFILE_FILE}: '{part}' is not an object. Fix: delete the file (the "
                               "model facts are then not logged) or restore the one the training wrote.")
    tracker.start()
    if not tracker.active:
        return 0
    state = _state(run_dir)
    same_run = state.get("run_id") == tracker.run_id
    pushed = state.get("epochs_pushed") if same_run else 0
    pushed = pushed if isinstance(pushed, int) and not isinstance(pushed, bool) and pushed >= 0 else 0
    if not same_run or not state.get("config_pushed"):
        tracker.log_config(run_dir / CONFIG_FILE)
        tracker.log_params(profile.get("params") or {})
        tracker.log_metrics(profile.get("metrics") or {})
    rows = record.get("epochs") or []
    for row in rows[pushed:]:
        values = {_RENAMED.get(key, key): value for key, value in row.items() if key != "epoch" and value is not None}
        tracker.log_metrics(values, step=int(row["epoch"]))
    if final:
        for name, folder in ((MODEL_FILE, "models"), (METRICS_CSV, None)):
            if (run_dir / name).is_file():
                tracker.log_artifact(run_dir / name, folder)
        lost = record.get("lost_classes")  # the classes the best model never predicts (checked: a list of names)
        if lost:
            tracker.set_tags({"lost_classes": ", ".join(lost)})
    if tracker.active:  # only what the store took counts as pushed
        atomic_write_text(json.dumps({"tracking_uri": tracker.uri, "experiment": tracker.experiment,
                                      "run_id": tracker.run_id, "config_pushed": True,
                                      "epochs_pushed": len(rows)}, indent=2) + "\n", run_dir / TRACKING_FILE)
    return max(len(rows) - pushed, 0)


def push_evaluation_folder(folder: str | Path, tracker: Tracker, prefix: str = "eval") -> dict[str, float]:
    """Log an evaluation folder's metrics (the plain ``medunet.metrics`` block of its ``summary.json``) and
    upload its summary, table and report."""
    folder = Path(folder)
    summary = read_json_file(folder / "summary.json", "the evaluation summary")
    block = summary.get("medunet") if isinstance(summary, dict) else None
    if not isinstance(block, dict) or not isinstance(block.get("metrics"), dict):
        raise MedunetError(f"{folder / 'summary.json'} is not a summary written by 'medunet evaluate'. Fix: "
                           "pass an evaluation output folder (or re-run medunet evaluate).")
    metrics = {key.replace("eval_", f"{prefix}_", 1): value for key, value in block["metrics"].items()}
    logged = tracker.log_metrics(metrics)
    for name in EVALUATION_FILES:
        if (folder / name).is_file():
            tracker.log_artifact(folder / name, "evaluation")
    return logged


def track_folder(folder: str | Path, tracking_uri: str | None = None, experiment: str = "medunet") -> Tracker:
    """``medunet track FOLDER``: push a training run folder or an evaluation folder; returns the tracker."""
    folder = Path(folder)
    if (folder / CONFIG_FILE).is_file():
        tracker = tracker_for_run_folder(folder, tracking_uri, experiment)
        push_run_folder(folder, tracker, final=True)
        finished = (read_metrics_record(folder) or {}).get("finished")
        tracker.end("FINISHED" if finished else "KILLED")
    elif (folder / "summary.json").is_file():
        tracker = Tracker(tracking_uri, experiment, run_name=folder.name, run_dir=folder, tags={"kind": "evaluate"})
        with tracker:
            push_evaluation_folder(folder, tracker)
    else:
        raise MedunetError(f"{folder} holds neither a training run (config.json) nor an evaluation (summary.json). "
                           "Fix: pass a run folder of 'medunet train' or an output folder of 'medunet evaluate'.")
    return tracker


class RunFolderTracking:
    """Ignite handler that mirrors a training's run folder into MLflow while it trains (rank 0 only).

    Attach it after the run's recorder (``SegmentationTraining(extra_handlers=[...])`` does), so each epoch's
    row is in ``metrics.json`` when it is pushed. If the store fails, training goes on and ``medunet track
    RUN_DIR`` pushes the rest later.

    Args:
        run_dir: the run folder.
        tracking_uri: the store (see :class:`~medunet.tracking.Tracker`).
        experiment: the MLflow experiment.
        enabled: False attaches nothing (``--no-tracking``).
    """

    def __init__(self, run_dir: str | Path, tracking_uri: str | None = None, experiment: str = "medunet",
                 enabled: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.tracking_uri, self.experiment, self.enabled = tracking_uri, experiment, bool(enabled)
        self.tracker: Tracker | None = None

    def attach(self, engine: Engine) -> None:
        if not self.enabled or int(os.environ.get("RANK", "0")) != 0:
            return
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda _: self._push())
        engine.add_event_handler(Events.COMPLETED, self._completed)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _started(self, engine: Engine) -> None:
        self.tracker = tracker_for_run_folder(self.run_dir, self.tracking_uri, self.experiment)
        self._push()

    def _push(self, final: bool = False) -> None:
        if self.tracker is not None:
            push_run_folder(self.run_dir, self.tracker, final=final)

    def _completed(self, engine: Engine) -> None:
        self._push(final=True)
        if self.tracker is not None:
            self.tracker.end("FINISHED")
            print(self.tracker.describe())

    def _failed(self, engine: Engine, error: BaseException) -> Any:
        if self.tracker is not None:
            self._push()
            self.tracker.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise error  # ignite re-raises only when no EXCEPTION_RAISED handler exists: keep the error


def _state(run_dir: str | Path) -> dict[str, Any]:
    state = read_json_file(Path(run_dir) / TRACKING_FILE, "the MLflow run of this folder")
    return state if isinstance(state, dict) else {}  # a hand-edited file is ignored, not trusted
