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
from mlflow import MlflowClient

from medunet.cli import main
from medunet.evaluation import evaluate_folders
from medunet.run_folder import CONFIG_FILE
from medunet.tracking import MLflowTrackingHandler, Tracker, local_store_uri

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


def train(tracker: Tracker, run_dir: Path, epochs: int = EPOCHS):
    """A real MONAI training: lunet_small_2f on random 2D images, validated each epoch, checkpoint logged."""
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import MeanDice, ValidationHandler, from_engine
    from monai.losses import DiceCELoss
    from monai.transforms import AsDiscreted, Compose

    from medunet.networks import create_network

    torch.manual_seed(0)
    network = create_network("lunet_small_2f", spatial_dims=2, in_channels=1, out_channels=2)
    data = [{"image": torch.rand(1, 32, 32), "label": (torch.rand(1, 32, 32) > 0.5).float()} for _ in range(4)]
    loader = DataLoader(data, batch_size=2)
    post = Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=2), AsDiscreted(keys="label", to_onehot=2)])
    pairs = from_engine(["pred", "label"])
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=network, postprocessing=post,
        key_val_metric={"val_mean_dice": MeanDice(include_background=False, output_transform=pairs)},
        additional_metrics={"val_dice": MeanDice(include_background=True, reduction="mean_batch",
                                                 output_transform=pairs)},
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=network,
        optimizer=torch.optim.Adam(network.parameters(), 1e-3),
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True),
        train_handlers=[ValidationHandler(validator=evaluator, interval=1)],
    )
    MLflowTrackingHandler(tracker, label_names=LABEL_NAMES).attach(trainer, evaluator)
    tracker.log_config({"network": {"name": "lunet_small_2f", "spatial_dims": 2}, "task": "random", "fold": 0})
    trainer.run()
    (run_dir / "models").mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), run_dir / "models" / "model.pt")
    tracker.log_artifact(run_dir / "models" / "model.pt", "models")
    return trainer


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
        tracker.log_profile(result)
        tracker.log_evaluation(evaluation)
        tracker.log_evaluation(tmp_path / "evaluation", prefix="from_file", artifact_path="evaluation_copy")
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
    assert {CONFIG_FILE, "evaluation", "evaluation_copy"} <= artifacts
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert logged == {"evaluation/summary.json", "evaluation/cases.csv"}
    assert list((tmp_path / "mlruns" / "artifacts").rglob("cases.csv"))  # artifacts beside the database

    assert main(["runs", "--metric", "eval_dice_left"]) == 0
    table = capsys.readouterr().out
    assert "| local" in table and "FINISHED" in table and "eval_dice_left" in table and "lunet_small_2f" in table


def test_unreachable_server_warns_once_and_the_run_is_complete_in_the_run_dir(tmp_path, caplog):
    closed = f"http://127.0.0.1:{free_port()}"  # bound, then released: nothing listens there
    run_dir = tmp_path / "run"
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="medunet.tracking"):
        with Tracker(tracking_uri=closed, experiment="offline", run_dir=run_dir) as tracker:
            tracker.log_params({"network": "lunet_small_2f"})
            trainer = train(tracker, run_dir)
    assert trainer.state.epoch == EPOCHS
    assert time.perf_counter() - started < 60  # no minutes of HTTP retries
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1, warnings
    fallback = local_store_uri(run_dir / "mlruns")
    assert closed in warnings[0] and fallback in warnings[0]
    assert tracker.fell_back and tracker.uri == fallback

    client, run = the_run(fallback, "offline")
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.tags["fallback_from"] == closed
    assert run.data.params["network"] == "lunet_small_2f" and run.data.params["max_epochs"] == str(EPOCHS)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == EPOCHS
    assert [f.path for f in client.list_artifacts(run.info.run_id, "models")] == ["models/model.pt"]


def test_training_logged_over_http_to_a_real_server(mlflow_server, tmp_path, caplog):
    url = mlflow_server.wait_ready()
    run_dir = tmp_path / "http_run"
    with caplog.at_level(logging.WARNING, logger="medunet.tracking"):
        with Tracker(tracking_uri=url, experiment="http", run_dir=run_dir) as tracker:
            train(tracker, run_dir)
    assert not tracking_warnings(caplog) and not tracker.fell_back
    assert tracker.run_url.startswith(f"{url}/#/experiments/")
    assert not (run_dir / "mlruns").exists()  # nothing went to the fallback store

    client, run = the_run(url, "http")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, EPOCHS + 1))
    assert len(client.get_metric_history(run_id, "train_loss_iter")) == EPOCHS * 2  # 2 batches an epoch
    assert [m.step for m in client.get_metric_history(run_id, "val_mean_dice")] == [1, 2]
    assert {"val_dice_background", "val_dice_foreground", "lr", "val_best_metric"} <= set(run.data.metrics)
    assert run.data.metrics["lr"] == pytest.approx(1e-3)
    params = run.data.params
    assert params["network.name"] == "lunet_small_2f" and params["max_epochs"] == str(EPOCHS)
    assert params["batch_size"] == "2" and params["optimizer"] == "Adam" and params["loss_function"] == "DiceCELoss"
    assert run.data.tags["mlflow.runName"] == "http_run" and "version.monai" in run.data.tags
    downloaded = client.download_artifacts(run_id, "models/model.pt", str(tmp_path / "download"))
    assert torch.load(downloaded, weights_only=True).keys() == torch.load(run_dir / "models" / "model.pt").keys()
    assert json.loads(Path(client.download_artifacts(run_id, CONFIG_FILE, str(tmp_path))).read_text(encoding="utf-8"))["fold"] == 0


def test_server_dying_mid_run_moves_everything_to_the_fallback_store(mlflow_server, tmp_path, caplog):
    """Runs last: it stops the module's server."""
    url = mlflow_server.wait_ready()
    run_dir = tmp_path / "dies"
    with caplog.at_level(logging.WARNING, logger="medunet.tracking"):
        with Tracker(tracking_uri=url, experiment="dies", run_dir=run_dir) as tracker:
            tracker.log_params({"fold": 3})
            tracker.log_metrics({"train_loss": 0.8}, step=1)
            mlflow_server.stop()
            tracker.log_metrics({"train_loss": 0.6}, step=2)
            tracker.log_metrics({"train_loss": 0.5}, step=3)
    warnings = tracking_warnings(caplog)
    assert len(warnings) == 1 and url in warnings[0], warnings
    client, run = the_run(local_store_uri(run_dir / "mlruns"), "dies")
    assert run.data.params["fold"] == "3" and run.data.tags["fallback_from"] == url
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0.8, 0.6, 0.5]
    assert run.info.status == "FINISHED"
