"""The accuracy half of ``medunet bench``: real trainings on a tiny MRI phantom, reuse, the CLI end to end."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from medunet.bench.accuracy import CPU_RECIPE, RECIPE, CoreShare, recipe_with, run_accuracy
from medunet.cli import build_parser, main
from medunet.engines.checkpoint import lost_classes
from medunet.engines.demo import prepare_phantom
from medunet.errors import MedunetError
from medunet.paths import REPO_ROOT
from medunet.run_folder import CONFIG_FILE
from tests.process_helpers import HAS_PROC, descendants, kill_all, survivors_after_sigterm

WORKFLOW = REPO_ROOT / "medunet" / "workflows" / "phantom_demo.json"
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
        assert row["lost_classes"] == lost_classes(metrics["epochs"][-1])
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
    assert (results.parent / f"{results.stem}_pareto.png").is_file()  # beside the results, named after them

    text = results.read_text(encoding="utf-8")
    assert "## Efficiency" in text and "## Accuracy" in text and f"]({results.stem}_pareto.png)" in text
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


# -- issue 10: the stronger recipe, cross-validation, protocols, repeated memory figures ---------------------
def test_the_recipe_is_nnunets_with_deep_supervision_where_a_decoder_has_room_and_the_cpu_protocol_is_smaller() -> None:
    from medunet.bench.accuracy import LIGHT_RECIPE, deep_supervision_for

    assert RECIPE["augment"] == "nnunet" and RECIPE["deep_supervision"] == 3
    assert LIGHT_RECIPE["augment"] == "light" and LIGHT_RECIPE["deep_supervision"] == 0
    cpu = recipe_with(protocol="cpu")
    assert cpu == CPU_RECIPE and cpu["augment"] == "nnunet"
    assert cpu["batch_size"] * cpu["num_samples"] == RECIPE["batch_size"] * RECIPE["num_samples"]  # the same batch
    assert cpu["max_epochs"] * cpu["epoch_length"] < RECIPE["max_epochs"] * RECIPE["epoch_length"]
    with pytest.raises(MedunetError, match="protocol is 'tpu'.*Fix: --protocol gpu"):
        recipe_with(protocol="tpu")
    # --recipe light is the recipe before issue 10 at either budget; --set still wins over it.
    assert recipe_with(recipe="light") == LIGHT_RECIPE
    light_cpu = recipe_with(protocol="cpu", recipe="light")
    assert light_cpu == {**CPU_RECIPE, "augment": "light", "deep_supervision": 0}
    assert recipe_with({"deep_supervision": 1}, protocol="cpu", recipe="light")["deep_supervision"] == 1
    with pytest.raises(MedunetError, match="recipe is 'heavy'.*Fix: --recipe nnunet"):
        recipe_with(recipe="heavy")
    assert deep_supervision_for("lunet_small_2f", 3) == 3 and deep_supervision_for("monai_segresnet", 3) == 0
    # A four-level decoder has two levels above the finest: it trains with both, not with none.
    assert deep_supervision_for("lunet_16f_4level_unshuffle_subpixel_in", 3) == 2
    assert deep_supervision_for("lunet_16f_4level_unshuffle_subpixel_in", 1) == 1
    assert deep_supervision_for("lunet_small_2f", 0) == 0


def _rows(values: dict[str, list[float]]) -> list[dict[str, Any]]:
    return [{"network": name, "fold": k, "mean_dice": v, "dice_a": v, "train_seconds": 60.0}
            for name, folds in values.items() for k, v in enumerate(folds)]


def test_fold_summary_and_comparisons_say_which_differences_exceed_the_spread() -> None:
    from medunet.bench.accuracy import compare_networks, fold_summary
    from medunet.bench.results import comparison_sentences

    summary = fold_summary(_rows({"ref": [0.80, 0.82, 0.84], "clear": [0.85, 0.87, 0.89], "noise": [0.81, 0.80, 0.86]}))
    ref, clear, noise = summary
    assert ref["mean_dice"] == pytest.approx(0.82) and ref["mean_dice_sd"] == pytest.approx(0.02)
    assert clear["dice_a"] == pytest.approx(0.87) and clear["train_seconds"] == 180.0
    comparisons = {c["network"]: c for c in compare_networks(summary, ["ref", "absent"])}
    assert comparisons["clear"]["difference"] == pytest.approx(0.05) and comparisons["clear"]["exceeds_spread"]
    assert comparisons["clear"]["wins"] == 3 and comparisons["clear"]["difference_sd"] == pytest.approx(0.0, abs=1e-12)
    assert comparisons["noise"]["difference"] == pytest.approx(0.0033, abs=1e-4)
    assert not comparisons["noise"]["exceeds_spread"]
    text = comparison_sentences(list(comparisons.values()), bar="ref")
    assert "`clear` vs `ref`: +0.0500" in text and "**exceeds the fold-to-fold spread**" in text
    assert "`noise` vs `ref`: +0.0033" in text and "within the fold-to-fold spread" in text
    assert "Beats `ref` by 0.005 beyond the spread: yes" in text and text.count(": no.") == 1


def test_a_run_that_lost_a_class_is_marked_and_each_pair_is_also_compared_without_it() -> None:
    from medunet.bench.accuracy import compare_networks, fold_summary
    from medunet.bench.results import LOST_MARK, comparison_sentences, cross_validation_table, lost_class_note

    # The reference lost a class on fold 3: over all folds the network is 0.095 above it, over the healthy ones below.
    rows = _rows({"ref": [0.83, 0.84, 0.82, 0.41], "net": [0.82, 0.83, 0.81, 0.82]})
    for row in rows:
        row["lost_classes"] = ["a"] if row["mean_dice"] < 0.5 else []
    summary = fold_summary(rows)
    assert summary[0]["lost"] == {3: ["a"]} and summary[1]["lost"] == {}
    (comparison,) = compare_networks(summary, ["ref"])
    assert comparison["failed_folds"] == [3] and comparison["difference"] == pytest.approx(0.095)
    healthy = comparison["healthy"]
    assert healthy["folds"] == 3 and healthy["difference"] == pytest.approx(-0.01) and healthy["wins"] == 0
    text = comparison_sentences([comparison], bar="ref")
    assert "Fold 3 counts a run that lost a class" in text and "without it: -0.0100" in text
    assert text.endswith("Beats `ref` by 0.005 beyond the spread on the healthy folds: no.")
    assert f"0.4100{LOST_MARK}" in cross_validation_table(summary, "ref")
    note = lost_class_note(rows)
    assert "`ref` fold 3 (a, mean Dice 0.4100)" in note and "`net`" not in note
    assert lost_class_note([row for row in rows if not row["lost_classes"]]) == ""
    # Without a healthy fold there is nothing to judge the bar on.
    (only_failed,) = compare_networks(fold_summary([r for r in rows if r["fold"] == 3]), ["ref"])
    assert "healthy" not in only_failed
    assert "no fold is left without one" in comparison_sentences([only_failed], bar="ref")
    assert comparison_sentences([only_failed], bar="ref").endswith(": no.")


def test_rank_agreement_counts_the_pairs_two_protocols_order_alike() -> None:
    from medunet.bench.accuracy import rank_agreement

    full = {"a": 0.90, "b": 0.88, "c": 0.86, "d": 0.84, "e": 0.80, "f": 0.70}
    same = rank_agreement(full, {name: value - 0.1 for name, value in full.items()})
    assert same["kendall_tau"] == 1.0 and same["spearman_rho"] == 1.0 and same["discordant"] == []
    swapped = rank_agreement(full, {**full, "c": 0.83, "only_here": 0.5})
    assert swapped["networks"] == 6 and swapped["discordant"] == [("c", "d")]
    assert swapped["kendall_tau"] == pytest.approx(13 / 15) and swapped["spearman_rho"] == pytest.approx(1 - 6 * 2 / 210)
    assert rank_agreement(full, {n: -v for n, v in full.items()})["kendall_tau"] == -1.0


def test_bench_cross_validation_writes_mean_sd_sentences_and_the_rank_agreement(phantom: Path, tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture) -> None:
    out, results = tmp_path / "bench", tmp_path / "RESULTS.md"
    other = tmp_path / "full"
    other.mkdir()
    (other / "accuracy.csv").write_text("network,fold,mean_dice\nunet_small_2f,0,0.8\nunet_small_2f,1,0.9\n"
                                        "lunet_small_2f,0,0.7\n", encoding="utf-8")
    args = ["bench", "--networks", "lunet_small_2f", "--baseline", "unet_small_2f", "--shapes", "1x1x16x16x16",
            "--volume", "none", "--no-train", "--repeats", "1", "--out", str(out), "--accuracy",
            "--task-dir", str(phantom), "--workflow", str(WORKFLOW), "--folds", "0", "1", "--protocol", "cpu",
            "--epochs", "1", "--epoch-length", "2", "--set", "patch_size=[16,16,16]",
            "--set", "profile_memory=false", "--results", str(results), "--no-tracking", "--compare", str(other),
            "--accuracy-networks", "lunet_small_2f"]
    assert main(args) == 0
    assert "unet_small_2f is trained too" in capsys.readouterr().out  # the baseline the user did not list is said
    rows = list(csv.DictReader((out / "accuracy.csv").open(encoding="utf-8")))
    assert [(row["network"], row["fold"]) for row in rows] == [("unet_small_2f", "0"), ("lunet_small_2f", "0"),
                                                               ("unet_small_2f", "1"), ("lunet_small_2f", "1")]
    assert all(row["deep_supervision"] == "3" and row["augment"] == "nnunet" for row in rows)
    for fold in (0, 1):
        workflow = json.loads((out / "runs" / f"fold{fold}" / "lunet_small_2f" / "workflow.json").read_text("utf-8"))
        assert workflow["fold"] == fold and workflow["num_samples"] == CPU_RECIPE["num_samples"]
        assert workflow["deep_supervision"] == 3 and workflow["augment"] == "nnunet"
    summary = {row["network"]: row for row in csv.DictReader((out / "accuracy_folds.csv").open(encoding="utf-8"))}
    lean = [float(row["mean_dice"]) for row in rows if row["network"] == "lunet_small_2f"]
    assert float(summary["lunet_small_2f"]["mean_dice"]) == pytest.approx(sum(lean) / 2)
    assert float(summary["lunet_small_2f"]["mean_dice_sd"]) == pytest.approx(abs(lean[0] - lean[1]) / 2 ** 0.5)
    text = results.read_text(encoding="utf-8")
    accuracy = text.split("## Accuracy", 1)[1]
    (lean_row,) = [line for line in accuracy.splitlines() if line.startswith("| lunet_small_2f")]
    assert re.search(r"\d\.\d{4} ± \d\.\d{4} \([+-]\d\.\d{4}\)", lean_row)
    assert "`lunet_small_2f` vs `unet_small_2f`" in text and "fold-to-fold spread" in text
    assert "Rank agreement between protocols" in text and "2 networks trained under both" in text
    command = text.split("```bash\n", 1)[1].split("\n```", 1)[0]
    again = build_parser().parse_args(shlex.split(command)[1:])
    assert again.folds == [0, 1] and again.protocol == "cpu" and again.compare == other

    # Another bench's table with a value that is no Dice is refused, naming the line (the runs above are reused).
    (other / "accuracy.csv").write_text("network,fold,mean_dice\nunet_small_2f,0,0.8\nlunet_small_2f,0,nan\n",
                                        encoding="utf-8")
    capsys.readouterr()
    assert main(args) == 2
    assert "accuracy.csv, line 3: mean_dice is 'nan', not a Dice in [0, 1]" in capsys.readouterr().err


def test_repeated_memory_figures_report_the_median_of_fresh_processes() -> None:
    from medunet.bench.efficiency import run_efficiency

    (result,) = run_efficiency(["lunet_small_2f"], ["1x1x16x16x16"], train=False, repeats=1, volume=None,
                               repeats_memory=3)
    runs = result.memory_runs["infer"]
    assert len(runs) == 3 and all(value > 0 for value in runs)
    assert result.profile.peak_infer_bytes == sorted(runs)[1]
    assert result.as_dict()["peak_infer_runs"] == runs and "train" not in result.memory_runs


def test_parallel_trainings_each_log_their_own_epochs_also_the_later_ones_of_a_worker(phantom: Path,
                                                                                          tmp_path: Path) -> None:
    """Four trainings two at a time: a worker process that trained once before must not log into the closed file
    of its first training (each training runs in a fresh process)."""
    rows = run_accuracy(NETWORKS, phantom, WORKFLOW, out_dir=tmp_path, folds=[0, 1], tracking=False, progress=False,
                        recipe=recipe_with(TINY, epochs=1, epoch_length=2), jobs=2)
    assert len(rows) == 4
    for row in rows:
        log = (Path(row["run_dir"]) / "train.log").read_text(encoding="utf-8")
        assert "Logging error" not in log and "I/O operation on closed file" not in log
        assert "val_mean_dice" in log  # the validation's log line reached this training's own log


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="threads are re-sized by a SIGALRM timer (POSIX)")
def test_a_parallel_training_takes_every_core_once_the_others_have_finished() -> None:
    """A training's thread pool follows the count of trainings in progress: its share while another runs,
    every core once it is alone; leaving gives its place back and stops the timer."""
    running = multiprocessing.get_context("spawn").Value("i", 1)  # one other training in progress
    before = torch.get_num_threads()
    try:
        with CoreShare(running, cores=4, interval=0.02):
            assert running.value == 2 and torch.get_num_threads() == 2
            with running.get_lock():
                running.value -= 1  # the other training finished
            deadline = time.monotonic() + 5
            while torch.get_num_threads() != 4 and time.monotonic() < deadline:
                time.sleep(0.01)  # the timer's handler runs in this thread, between statements
            assert torch.get_num_threads() == 4
        assert running.value == 0 and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not HAS_PROC, reason="reads the process table from /proc (Linux)")
def test_killing_a_parallel_bench_ends_its_trainings(phantom: Path, tmp_path: Path) -> None:
    """``kill`` (SIGTERM) of a bench training two networks at a time (``medunet bench --accuracy --jobs 2``): no training goes on as an orphan (it would
    compete for the cores and, on a rerun, train its run folder twice at once)."""
    out = tmp_path / "bench"
    recipe = recipe_with(TINY, epochs=500, epoch_length=10)  # never reached: both are killed once both have started
    bench = subprocess.Popen(
        [sys.executable, "-c", "from medunet.bench.accuracy import run_accuracy; "
         f"run_accuracy({NETWORKS!r}, {str(phantom)!r}, {str(WORKFLOW)!r}, out_dir={str(out)!r}, recipe={recipe!r}, "
         "tracking=False, progress=False, jobs=2)"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs = [out / "runs" / name for name in NETWORKS]
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while not all((run / "train.log").is_file() and "epoch 1/500" in (run / "train.log").read_text() for run in runs):
            assert bench.poll() is None and time.monotonic() < deadline, "the trainings did not start"
            time.sleep(0.2)
        workers = descendants(bench.pid)
        assert len(workers) >= 2  # two trainings (and the pool's resource tracker)
        assert not survivors_after_sigterm(bench, workers, patience=15), "processes of the killed bench still run"
    finally:
        kill_all(bench, workers)
    for run in runs:  # each stopped mid-training, saying why; it resumes on a rerun (test_workflows_training)
        assert "has ended; this worker ends too" in (run / "train.log").read_text(encoding="utf-8")
        assert not json.loads((run / "metrics.json").read_text(encoding="utf-8"))["finished"]
