"""The accuracy half of ``medunet bench``: real trainings on a tiny MRI phantom, reuse, the CLI end to end."""

from __future__ import annotations

import csv
import json
import re
import shlex
import time
from pathlib import Path
from typing import Any

import pytest

from medunet.bench.accuracy import RECIPE, recipe_with, run_accuracy
from medunet.cli import build_parser, main
from medunet.engines.demo import prepare_phantom
from medunet.errors import MedunetError
from medunet.paths import REPO_ROOT
from medunet.run_folder import CONFIG_FILE

WORKFLOW = REPO_ROOT / "workflows" / "phantom_demo.json"
NETWORKS = ["lunet_small_2f", "unet_small_2f"]
# The recipe at a smoke-test budget; the memory profile after training is left out to keep the tests short.
TINY = {"patch_size": [16, 16, 16], "profile_memory": False}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    task_dir = tmp_path_factory.mktemp("data") / "Task90_PhantomMRI"
    prepare_phantom(task_dir, num_cases=5, kind="mri", size=(24, 24, 20))
    return task_dir


@pytest.fixture(scope="module")
def first_run(phantom: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    uri = f"sqlite:///{out}/mlruns.db"
    rows = run_accuracy(NETWORKS, phantom, WORKFLOW, fold=0, out_dir=out, recipe=recipe_with(TINY, epochs=1, epoch_length=2),
                        tracking_uri=uri, progress=False)
    return {"out": out, "uri": uri, "rows": rows}


def test_run_accuracy_trains_each_network_and_scores_dice_per_label(first_run: dict[str, Any]) -> None:
    rows, out = first_run["rows"], first_run["out"]
    assert [row["network"] for row in rows] == NETWORKS
    for row in rows:
        run_dir = out / "runs" / row["network"]
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        assert metrics["finished"] and len(metrics["epochs"]) == 1
        assert row["params"] == json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))["network"]["parameters"] > 0
        assert {key for key in row if key.startswith("dice_")} == {"dice_organ", "dice_lesion"}
        assert all(0.0 <= row[key] <= 1.0 for key in ("mean_dice", "dice_organ", "dice_lesion"))
        assert row["mean_dice"] == pytest.approx(metrics["epochs"][-1]["val_mean_dice"])
        assert row["scored_epoch"] == 1 and row["best_epoch"] == 1 and row["reused"] is False
        assert row["train_seconds"] > 0
        workflow = json.loads((run_dir / "workflow.json").read_text(encoding="utf-8"))
        assert workflow["max_epochs"] == 1 and workflow["epoch_length"] == 2 and workflow["patch_size"] == [16, 16, 16]
        assert workflow["optimizer"] == RECIPE["optimizer"] and workflow["loss"] == RECIPE["loss"]
    assert rows[0]["params"] < rows[1]["params"]  # the lean U-Net is the smaller one

    from mlflow.tracking import MlflowClient

    client = MlflowClient(first_run["uri"])
    experiment = client.get_experiment_by_name("medunet")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'train'")
    assert sorted(run.info.run_name for run in runs) == sorted(NETWORKS)  # one MLflow run per training


def test_a_second_call_reuses_finished_runs_without_training(phantom: Path, first_run: dict[str, Any]) -> None:
    out = first_run["out"]
    files = [out / "runs" / name / file for name in NETWORKS for file in ("metrics.json", "models/model.pt")]
    stamps = [path.stat().st_mtime_ns for path in files]
    start = time.perf_counter()
    rows = run_accuracy(NETWORKS, phantom, WORKFLOW, fold=0, out_dir=out, recipe=recipe_with(TINY, epochs=1, epoch_length=2),
                        tracking_uri=first_run["uri"], progress=False)
    assert time.perf_counter() - start < 5
    assert [path.stat().st_mtime_ns for path in files] == stamps
    assert all(row["reused"] for row in rows)
    for again, before in zip(rows, first_run["rows"]):
        assert {k: v for k, v in again.items() if k != "reused"} == {k: v for k, v in before.items() if k != "reused"}


def test_a_run_of_another_recipe_is_refused_not_mixed(phantom: Path, first_run: dict[str, Any]) -> None:
    with pytest.raises(MedunetError, match="max_epochs: 1 -> 3"):
        run_accuracy(NETWORKS[:1], phantom, WORKFLOW, fold=0, out_dir=first_run["out"],
                     recipe=recipe_with(TINY, epochs=3, epoch_length=2), tracking=False, progress=False)


def test_bench_accuracy_command_writes_csv_plot_and_results(phantom: Path, tmp_path: Path) -> None:
    out, results, uri = tmp_path / "bench", tmp_path / "report" / "RESULTS.md", f"sqlite:///{tmp_path}/mlruns.db"
    code = main(["bench", "--networks", "lunet_small_2f", "--baseline", "unet_small_2f", "--shapes", "1x1x16x16x16",
                 "--volume", "none", "--no-train", "--repeats", "1", "--out", str(out), "--accuracy",
                 "--task-dir", str(phantom), "--workflow", str(WORKFLOW), "--epochs", "1", "--epoch-length", "2",
                 "--set", "patch_size=[16,16,16]", "--set", "profile_memory=false", "--results", str(results),
                 "--tracking-uri", uri, "--jobs", "2"])
    assert code == 0
    rows = list(csv.DictReader((out / "accuracy.csv").open(encoding="utf-8")))
    assert [row["network"] for row in rows] == ["unet_small_2f", "lunet_small_2f"]  # the baseline is trained too
    for name in ("unet_small_2f", "lunet_small_2f"):  # trained side by side, each in its own process and log
        assert "Epoch" in (out / "runs" / name / "train.log").read_text(encoding="utf-8")
    assert all(0.0 <= float(row["dice_organ"]) <= 1.0 and 0.0 <= float(row["dice_lesion"]) <= 1.0 for row in rows)
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (results.parent / "pareto.png").is_file()

    text = results.read_text(encoding="utf-8")
    assert "## Efficiency" in text and "## Accuracy" in text and "](pareto.png)" in text
    efficiency, accuracy = text.split("## Efficiency", 1)[1].split("## Accuracy", 1)
    assert re.search(r"\| lunet_small_2f +\| [\d.]+k \(0\.\d+x\)", efficiency)  # params with ratio to the baseline
    assert "dice_organ" in accuracy and "dice_lesion" in accuracy
    (lean_row,) = [line for line in accuracy.splitlines() if line.startswith("| lunet_small_2f")]
    assert re.search(r"\d\.\d{4} \([+-]\d\.\d{4}\)", lean_row)  # mean Dice with its difference to the baseline
    assert '"epoch_length": 2' in text  # the recipe as run
    command = text.split("```bash\n", 1)[1].split("\n```", 1)[0]
    again = build_parser().parse_args(shlex.split(command)[1:])  # the recorded command repeats this run
    assert again.accuracy and again.epochs == 1 and again.epoch_length == 2 and again.out == out and again.jobs == 2
    assert again.set == ["patch_size=[16,16,16]", "profile_memory=false"] and again.task_dir == phantom

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("medunet")
    (bench,) = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'bench'")
    assert bench.data.metrics["lunet_small_2f.mean_dice"] == pytest.approx(float(rows[1]["mean_dice"]))
    assert "unet_small_2f.dice_lesion" in bench.data.metrics
    logged = {Path(a.path).name for a in client.list_artifacts(bench.info.run_id, "bench")}
    assert {"accuracy.csv", "accuracy.md", "pareto.png", "RESULTS.md", "efficiency.csv"} <= logged
    assert not any(name == "runs" for name in logged)  # checkpoints stay out of the bench run
    trainings = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'train'")
    assert sorted(run.info.run_name for run in trainings) == ["lunet_small_2f", "unet_small_2f"]
