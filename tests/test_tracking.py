"""MLflow tracking against real stores: the default local SQLite store, a real ``mlflow server`` over HTTP,
an unreachable server (closed port) and a server that dies mid-run. Values are read back with MlflowClient.

The server is started once for the module, before the first test, so its start (~40 s on 2 busy cores,
mostly imports and database migrations) overlaps the local-store tests.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from mlflow import MlflowClient

from medunet.cli import main
from medunet.engines.demo import prepare_phantom
from medunet.evaluation import evaluate_folders
from medunet.run_folder import CONFIG_FILE
from medunet.tracking import RunFolderTracking, Tracker, local_store_uri, push_evaluation_folder

SERVER_START_TIMEOUT_S = 180
EPOCHS = 2
LABEL_NAMES = ["background", "foreground"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    url: str
    process: subprocess.Popen
    log: Path
    launched: float
    start_seconds: float | None = None
    watcher: threading.Thread | None = None

    def watch_start(self) -> None:
        """Poll ``/health`` (in a thread, while other tests run) and note when it first answers."""
        while self.process.poll() is None and time.perf_counter() - self.launched < SERVER_START_TIMEOUT_S:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.start_seconds = time.perf_counter() - self.launched
                        return
            except OSError:
                time.sleep(0.25)

    def wait_ready(self) -> str:
        """Block until ``/health`` answered; the URL. Fails with the server log if it does not start."""
        self.watcher.join(SERVER_START_TIMEOUT_S)
        if self.start_seconds is None:
            pytest.fail(f"mlflow server (exit code {self.process.poll()}) did not answer /health within "
                        f"{SERVER_START_TIMEOUT_S} s:\n{self.log.read_text(encoding='utf-8')[-3000:]}")
        print(f"mlflow server answered /health {self.start_seconds:.1f} s after its launch")
        return self.url

    def stop(self) -> None:
        """Stop the server and its workers (its own process group); idempotent."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite backend and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    executable = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [executable, "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
    log = root / "server.log"
    with open(log, "w", encoding="utf-8") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=root, env=env,
                                   start_new_session=True)
    server = MlflowServer(f"http://127.0.0.1:{port}", process, log, time.perf_counter())
    server.watcher = threading.Thread(target=server.watch_start, daemon=True)
    server.watcher.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def no_tracking_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [key for key in os.environ if key.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)


def tracking_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "medunet.tracking" and r.levelno >= logging.WARNING]


def the_run(uri: str, experiment: str = "medunet"):
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    task_dir = tmp_path_factory.mktemp("phantom") / "Task90_PhantomMRI"
    prepare_phantom(task_dir, num_cases=5, kind="mri", size=(24, 24, 20), generate=True)
    return task_dir


class _AfterEpoch:
    """An ignite handler calling ``action`` once, after ``epoch`` (attached after the tracking handler)."""

    def __init__(self, epoch: int, action) -> None:
        self.epoch, self.action = epoch, action

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(once=self.epoch), lambda _: self.action())


def train(task_dir: Path, run_dir: Path, uri: str, experiment: str, epochs: int = EPOCHS, *extra) -> dict:
    """A real medunet training (lunet_small_2f, 2 iterations an epoch) mirrored into MLflow as it runs."""
    from medunet.data import load_task, preset_for_task
    from medunet.engines import SegmentationTraining
    from medunet.networks import create_network

    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3}
    tracking = RunFolderTracking(run_dir, tracking_uri=uri, experiment=experiment)
    return SegmentationTraining(
        run_dir, task_dir, task_dir / "folds.json", 0, create_network("lunet_small_2f", **args),
        preset=preset_for_task(load_task(task_dir)), network_name="lunet_small_2f", network_args=args,
        max_epochs=epochs, epoch_length=2, batch_size=1, num_samples=2, patch_size=(16, 16, 16), progress=False,
        profile_memory=False, extra_handlers=[tracking, *extra],
    ).run()


def assert_complete_training_run(client: MlflowClient, run, run_dir: Path, epochs: int = EPOCHS) -> None:
    """Everything the run folder records is in the MLflow run, one point per epoch."""
    run_id, params, metrics = run.info.run_id, run.data.params, run.data.metrics
    assert params["network.name"] == "lunet_small_2f" and params["fold"] == "0"
    assert params["max_epochs"] == str(epochs) and params["profile.network"] == "lunet_small_2f"
    for key in ("train_loss", "val_mean_dice", "val_dice_organ", "val_dice_lesion", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == list(range(1, epochs + 1)), key
    assert metrics["model_params"] == float(params["network.parameters"]) and metrics["latency_ms"] > 0
    assert {f.path for f in client.list_artifacts(run_id)} >= {"models", "metrics.csv", CONFIG_FILE}
    downloaded = client.download_artifacts(run_id, "models/model.pt", str(run_dir.parent / "download"))
    assert torch.load(downloaded, weights_only=True).keys() == torch.load(run_dir / "models" / "model.pt").keys()
    lost = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["lost_classes"]
    assert run.data.tags.get("lost_classes") == (", ".join(lost) or None)  # tagged when the run lost a class


def write_label_folders(root: Path) -> tuple[Path, Path]:
    """Two 3D cases with labels 1 and 2; the prediction of case_b is shifted."""
    ref_dir, pred_dir = root / "labelsTr", root / "pred"
    for folder in (ref_dir, pred_dir):
        folder.mkdir(parents=True)
    for name, shift in (("case_a", 0), ("case_b", 2)):
        ref = np.zeros((20, 16, 12), np.uint8)
        ref[4:10, 4:10, 3:8], ref[12:18, 6:12, 4:9] = 1, 2
        nib.save(nib.Nifti1Image(ref, np.eye(4)), ref_dir / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(np.roll(ref, shift, axis=0), np.eye(4)), pred_dir / f"{name}.nii.gz")
    return pred_dir, ref_dir


def test_default_local_store_holds_params_metrics_profile_evaluation_and_artifacts(tmp_path, monkeypatch, capsys):
    from medunet.profiling import profile

    monkeypatch.chdir(tmp_path)
    result = profile("lunet_small_2f", (1, 1, 32, 32), memory=False, repeats=1, out_channels=2)
    pred_dir, ref_dir = write_label_folders(tmp_path / "eval_data")
    evaluation = evaluate_folders(pred_dir, ref_dir, tmp_path / "evaluation", labels={1: "left", 2: "right"},
                                  report=False, workers=1, progress=False)
    config_file = tmp_path / CONFIG_FILE
    config_file.write_text(json.dumps({"network": {"name": "lunet_small_2f", "features": 2}, "fold": 1}), encoding="utf-8")

    with Tracker(run_name="local") as tracker:
        tracker.log_config(config_file)
        tracker.log_params({"inferer": {"roi_size": [32, 32], "overlap": 0.5}, "notes": "x" * 7000})
        for step, loss in enumerate([0.9, 0.7, 0.5], start=1):
            tracker.log_metrics({"train_loss": loss}, step=step)
        tracker.log_results(result)
        push_evaluation_folder(tmp_path / "evaluation", tracker)
        push_evaluation_folder(tmp_path / "evaluation", tracker, prefix="from_file")
        uri = tracker.uri

    assert uri == f"sqlite:///{tmp_path / 'mlruns' / 'mlruns.db'}"  # the documented default
    client, run = the_run(uri)
    assert run.info.run_name == "local" and run.info.status == "FINISHED"
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["network.name"] == "lunet_small_2f" and params["fold"] == "1"
    assert params["inferer.roi_size"] == "[32,32]" and len(params["notes"]) == 6000
    assert params["profile.input_shape"] == "1x1x32x32"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0.9, 0.7, 0.5]
    assert metrics["model_params"] == result.params and metrics["model_macs"] == result.macs
    assert metrics["model_size_mb"] == pytest.approx(result.size_mb)
    assert metrics["skip_memory_mb"] == pytest.approx(result.skip_bytes / 2**20)
    assert {"latency_ms", "train_latency_ms"} <= set(metrics)
    assert "peak_infer_mb" not in metrics  # memory was not measured, so no figure is invented
    assert metrics["eval_dice_left"] == pytest.approx(evaluation.mean("dice", 1))
    assert metrics["eval_dice_foreground"] == pytest.approx(evaluation.mean("dice"))
    assert metrics["from_file_dice_right"] == pytest.approx(metrics["eval_dice_right"])
    assert metrics["eval_n_cases"] == 2 and "eval_tp_left" not in metrics
    assert tags["mlflow.source.git.commit"] and tags["version.mlflow"] and tags["device"] == "cpu"
    assert {"host", "command", "version.torch", "version.monai", "version.pytorch-ignite", "git_dirty"} <= set(tags)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {CONFIG_FILE, "evaluation"} <= artifacts
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert logged == {"evaluation/summary.json", "evaluation/cases.csv"}
    assert list((tmp_path / "mlruns" / "artifacts").rglob("cases.csv"))  # artifacts beside the database

    assert main(["runs", "--metric", "eval_dice_left"]) == 0
    table = capsys.readouterr().out
    assert "| local" in table and "FINISHED" in table and "eval_dice_left" in table and "lunet_small_2f" in table


def test_unreachable_server_warns_once_and_track_pushes_the_whole_run_later(tiny_task, tmp_path, caplog, capsys):
    closed = f"http://127.0.0.1:{free_port()}"  # bound, then released: nothing listens there
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="medunet.tracking"):
        summary = train(tiny_task, run_dir, closed, "offline")
    assert summary["finished"] and summary["epochs"] == EPOCHS
    assert time.perf_counter() - started < 90  # no minutes of HTTP retries
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert closed in warnings[0] and f"medunet track {run_dir.resolve()} --tracking-uri {closed}" in warnings[0]

    # Once a store answers, the run folder is pushed whole.
    store = local_store_uri(tmp_path / "later")
    assert main(["track", str(run_dir), "--tracking-uri", store, "--experiment", "offline"]) == 0
    client, run = the_run(store, "offline")
    assert run.info.run_name == "run" and run.info.status == "FINISHED" and run.data.tags["kind"] == "train"
    assert_complete_training_run(client, run, run_dir)
    # Pushing again sends nothing twice: the folder remembers what the run holds.
    assert main(["track", str(run_dir), "--tracking-uri", store, "--experiment", "offline"]) == 0
    client, again = the_run(store, "offline")
    assert again.info.run_id == run.info.run_id
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == EPOCHS


def test_training_mirrored_over_http_to_a_real_server(mlflow_server, tiny_task, tmp_path, caplog):
    url = mlflow_server.wait_ready()
    run_dir = tmp_path / "http_run"
    with caplog.at_level(logging.WARNING, logger="medunet.tracking"):
        train(tiny_task, run_dir, url, "http")
    assert not tracking_warnings(caplog)
    client, run = the_run(url, "http")
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "http_run"
    assert "version.monai" in run.data.tags and run.data.tags["mlflow.source.git.commit"]
    assert_complete_training_run(client, run, run_dir)
    assert json.loads(Path(client.download_artifacts(run.info.run_id, CONFIG_FILE, str(tmp_path))).read_text(
        encoding="utf-8"))["fold"] == 0


def test_server_dying_mid_run_stops_nothing_and_loses_nothing(mlflow_server, tiny_task, tmp_path, caplog):
    """Runs last: it stops the module's server after the first epoch."""
    url = mlflow_server.wait_ready()
    run_dir = tmp_path / "dies"
    with caplog.at_level(logging.WARNING, logger="medunet.tracking"):
        summary = train(tiny_task, run_dir, url, "dies", 3, _AfterEpoch(1, mlflow_server.stop))
    assert summary["finished"] and summary["epochs"] == 3
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and url in warnings[0] and "medunet track" in warnings[0], warnings
    store = local_store_uri(tmp_path / "later")
    assert main(["track", str(run_dir), "--tracking-uri", store, "--experiment", "dies"]) == 0
    client, run = the_run(store, "dies")
    assert_complete_training_run(client, run, run_dir, epochs=3)
