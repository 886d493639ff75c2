"""``medunet train`` records its run in MLflow: config, per-epoch metrics, model facts, the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from medunet.cli import main
from medunet.engines.demo import prepare_phantom
from medunet.run_folder import CONFIG_FILE
from tests.test_workflows_training import cli_args, tiny_settings


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    task_dir = tmp_path_factory.mktemp("phantom") / "Task90_PhantomMRI"
    prepare_phantom(task_dir, num_cases=5, kind="mri", size=(24, 24, 20))
    return task_dir


def test_train_command_tracks_config_epochs_model_facts_and_checkpoint(tiny_task: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    settings = tiny_settings(tiny_task, tmp_path / "run", epochs=2)
    assert main([*cli_args(settings), "--tracking-uri", uri, "--experiment", "tiny", "--set", "profile_memory=false"]) == 0

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "train"
    assert run.data.params["network.name"] == "lunet_small_4f" and run.data.params["fold"] == "0"
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    assert len(client.get_metric_history(run.info.run_id, "val_mean_dice")) == 2
    assert {"val_dice_organ", "val_dice_lesion", "lr"} <= set(run.data.metrics)
    assert run.data.metrics["model_params"] == float(run.data.params["network.parameters"])
    assert run.data.metrics["skip_memory_mb"] > 0 and run.data.metrics["latency_ms"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"models", "metrics.csv", CONFIG_FILE} <= artifacts


def test_no_tracking_leaves_the_store_untouched(tiny_task: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tiny_task, tmp_path / "run", epochs=1)
    assert main([*cli_args(settings), "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db", "--no-tracking"]) == 0
    assert not (tmp_path / "mlruns.db").exists()
