"""Training workflows on a tiny phantom: bundle-layout checkpoints, resume after SIGKILL, torchrun on gloo,
refusing broken data, and ``python -m monai.bundle run`` on the demo config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from mlflow.tracking import MlflowClient
from monai.handlers import CheckpointLoader

from medunet.cli import main
from medunet.engines import run_workflow
from medunet.engines.checkpoint import RunRecorder, checkpoint_epoch
from medunet.engines.demo import prepare_phantom
from medunet.errors import MedunetError
from medunet.networks import create_network
from medunet.paths import REPO_ROOT
from medunet.run_folder import CONFIG_FILE

DEMO_WORKFLOW = REPO_ROOT / "medunet" / "workflows" / "phantom_demo.json"
NETWORK = "lunet_small_4f"


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five 24x24x20 MRI phantoms (one validation case in fold 0) and their datalist."""
    task_dir = tmp_path_factory.mktemp("phantom") / "Task90_PhantomMRI"
    prepare_phantom(task_dir, num_cases=5, kind="mri", size=(24, 24, 20))
    return task_dir


def tiny_settings(task_dir: Path, run_dir: Path, epochs: int = 2, epoch_length: int = 2) -> dict:
    return {
        "dataset_dir": str(task_dir),
        "run_dir": str(run_dir),
        "network_name": NETWORK,
        "patch_size": [16, 16, 16],
        "max_epochs": epochs,
        "epoch_length": epoch_length,
        "val_interval": 1,
        "batch_size": 1,
        "num_samples": 2,
        "sw_batch_size": 2,
        "progress": False,
    }


def cli_args(settings: dict) -> list[str]:
    """The same settings as ``medunet train`` options."""
    args = ["train", "--workflow", str(DEMO_WORKFLOW), "--network", settings["network_name"],
            "--data-root", settings["dataset_dir"], "--run-dir", settings["run_dir"],
            "--epochs", str(settings["max_epochs"])]
    for key in ("patch_size", "epoch_length", "val_interval", "batch_size", "num_samples", "sw_batch_size", "progress"):
        args += ["--set", f"{key}={json.dumps(settings[key])}"]
    return args


def tiny_network() -> torch.nn.Module:
    return create_network(NETWORK, spatial_dims=3, in_channels=1, out_channels=3)


def test_training_writes_bundle_layout_checkpoints_metrics_and_config(tiny_task: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (summary,) = run_workflow(DEMO_WORKFLOW, tiny_settings(tiny_task, run_dir))
    assert summary["finished"] and summary["epochs"] == 2

    for name in ("model.pt", "model_last.pt"):
        checkpoint = torch.load(run_dir / "models" / name, weights_only=True)
        assert list(checkpoint) == ["model"]  # the MONAI bundle layout
        tiny_network().load_state_dict(checkpoint["model"])  # strict: every key matches
    # MONAI's own loader reads it the way bundles do.
    network = tiny_network()
    CheckpointLoader(str(run_dir / "models" / "model.pt"), {"model": network}).attach(engine := Engine(lambda e, b: None))
    engine.run([0], max_epochs=1)

    resume = torch.load(run_dir / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "run_state"} <= set(resume)
    assert checkpoint_epoch(resume) == 2 and resume["run_state"]["finished"]

    rows = (run_dir / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert rows[0].split(",")[:4] == ["epoch", "train_loss", "learning_rate", "val_mean_dice"]
    assert {"val_dice_organ", "val_dice_lesion"} <= set(rows[0].split(",")) and len(rows) == 3
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2] and metrics["best_epoch"] in (1, 2)

    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["network"]["name"] == NETWORK and config["network"]["args"]["out_channels"] == 3
    assert config["fold"] == 0 and Path(config["dataset_dir"]) == tiny_task.resolve()
    assert config["preset"]["patch_size"] == [16, 16, 16]
    workflow = json.loads((run_dir / "workflow.json").read_text(encoding="utf-8"))
    assert workflow["network_name"] == NETWORK and workflow["max_epochs"] == 2

    # Rerunning a finished run trains nothing and rewrites nothing, whatever else it is given.
    records = ("metrics.csv", "metrics.json", CONFIG_FILE, "workflow.json", "checkpoints/checkpoint_last.pt")
    before = {name: (run_dir / name).read_bytes() for name in records}
    (again,) = run_workflow(DEMO_WORKFLOW, {**tiny_settings(tiny_task, run_dir), "learning_rate": 0.5})
    assert again["finished"] and again["resumed_from_epoch"] == 2
    assert {name: (run_dir / name).read_bytes() for name in records} == before
    # A refused rerun (another network in this run folder) does not touch it either.
    with pytest.raises(MedunetError, match="holds a run of"):
        run_workflow(DEMO_WORKFLOW, {**tiny_settings(tiny_task, run_dir), "network_name": "lunet_small_2f"})
    assert {name: (run_dir / name).read_bytes() for name in records} == before


def test_sigkill_mid_epoch_then_rerun_resumes_from_last_checkpoint(tiny_task: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    settings = tiny_settings(tiny_task, run_dir, epochs=3, epoch_length=24)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    command = [sys.executable, "-m", "medunet", *cli_args(settings), "--tracking-uri", uri, "--experiment", "resume"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics_file = run_dir / "metrics.json"
    deadline = time.time() + 180
    while not metrics_file.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, f"training ended before the first checkpoint: {process.stderr.read().decode()}"
    # At once: epoch 1's files are complete (metrics.json is written last) and epoch 2 has begun. Waiting a share of
    # epoch 1's time let epochs 2 and 3 both finish first under CI load (epoch 1 carries the warm-up).
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()

    # Everything written before the kill is complete and loads.
    killed_at = checkpoint_epoch(torch.load(run_dir / "checkpoints" / "checkpoint_last.pt", weights_only=True))
    assert 1 <= killed_at < 3
    tiny_network().load_state_dict(torch.load(run_dir / "models" / "model.pt", weights_only=True)["model"])
    tiny_network().load_state_dict(torch.load(run_dir / "models" / "model_last.pt", weights_only=True)["model"])
    assert len(json.loads(metrics_file.read_text(encoding="utf-8"))["epochs"]) == killed_at

    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {run_dir} after epoch {killed_at}/3" in rerun.stdout
    metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    assert [row["epoch"] for row in metrics["epochs"]] == [1, 2, 3] and metrics["finished"]
    resume = torch.load(run_dir / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    assert checkpoint_epoch(resume) == 3
    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["resumed_from_epoch"] == killed_at
    # Each session is kept, so a run resumed on another machine still says where its first epochs ran.
    assert [session["from_epoch"] for session in config["sessions"]] == [1, killed_at + 1]
    assert all(session["device_name"].startswith("CPU") for session in config["sessions"])
    tiny_network().load_state_dict(torch.load(run_dir / "models" / "model.pt", weights_only=True)["model"])
    # The resumed session continued the killed session's MLflow run: one run, finished, every epoch in it.
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mean_dice")] == [1, 2, 3]
    # Temporary files of writes the kill interrupted are gone.
    assert not [path for path in run_dir.rglob(".tmp*") if path.is_file()]


def test_torchrun_two_cpu_processes_on_gloo_give_a_loadable_checkpoint(tiny_task: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    settings = tiny_settings(tiny_task, run_dir, epochs=1, epoch_length=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "medunet", *cli_args(settings)]
    result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    tiny_network().load_state_dict(torch.load(run_dir / "models" / "model.pt", weights_only=True)["model"])
    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["world_size"] == 2 and config["device"] == "cpu"
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["finished"] and metrics["epochs"][0]["val_mean_dice"] is not None


def test_training_refuses_broken_data_with_the_check_data_message(tiny_task: Path, tmp_path: Path, capsys) -> None:
    import shutil

    broken = tmp_path / "Task90_PhantomMRI"
    shutil.copytree(tiny_task, broken)
    label = broken / "labelsTr" / "phantom_002.nii.gz"
    label.write_bytes(label.read_bytes()[:200])  # truncated gzip
    (broken / "imagesTr" / "phantom_003.nii.gz").unlink()
    run_dir = tmp_path / "run"
    code = main(cli_args(tiny_settings(broken, run_dir)))
    error = capsys.readouterr().err
    assert code == 2
    assert "problem(s)" in error and "phantom_002" in error and "phantom_003" in error and "Fix:" in error
    assert not (run_dir / "checkpoints").exists()


def test_unknown_workflow_key_and_network_fail_before_training(tiny_task: Path, tmp_path: Path, capsys) -> None:
    args = cli_args(tiny_settings(tiny_task, tmp_path / "run"))
    assert main(args + ["--set", "learning_rat=0.1"]) == 2
    assert "no key(s) ['learning_rat']" in capsys.readouterr().err
    args[args.index("--network") + 1] = "lunet_tiny_999f"
    assert main(args) == 2
    assert "unknown network 'lunet_tiny_999f'" in capsys.readouterr().err


def test_monai_bundle_run_trains_the_demo_config(tmp_path: Path) -> None:
    """The workflow files are MONAI bundle configs: ``monai.bundle run`` merges the base and the demo's
    override as medunet does, generates the phantom and trains."""
    task_dir, run_dir = tmp_path / "Task91_PhantomMRI", tmp_path / "run"
    files = f"['{DEMO_WORKFLOW.with_name('base.json')}','{DEMO_WORKFLOW}']"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files,
               "--dataset_dir", str(task_dir), "--run_dir", str(run_dir), "--network_name", NETWORK,
               "--max_epochs", "1", "--epoch_length", "2", "--phantom_cases", "5", "--patch_size", "[16,16,16]",
               "--progress", "False", "--generate_phantom", "True"]
    result = subprocess.run(command, cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (task_dir / "dataset.json").is_file() and (task_dir / "folds.json").is_file()
    checkpoint = torch.load(run_dir / "models" / "model.pt", weights_only=True)
    tiny_network().load_state_dict(checkpoint["model"])
    assert json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["finished"]


def test_validation_with_test_time_mirroring_scores_the_mean_of_the_flipped_predictions(tiny_task: Path,
                                                                                         tmp_path: Path) -> None:
    from monai.inferers import SlidingWindowInferer
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    from medunet.data import load_task, preset_for_task, val_transforms
    from medunet.engines.inference import ProbabilityAverage

    run_dir = tmp_path / "tta"
    run_workflow(DEMO_WORKFLOW, {**tiny_settings(tiny_task, run_dir, epochs=2, epoch_length=4), "val_tta": "flip"})
    config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    assert config["sliding_window"]["tta"] == "flip"
    scored = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["epochs"][-1]["val_mean_dice"]

    # The same score by hand: the last model, every mirroring of each window, argmax of the mean probabilities.
    network = tiny_network()
    network.load_state_dict(torch.load(run_dir / "models" / "model_last.pt", weights_only=True)["model"])
    network.eval()
    datalist = json.loads((tiny_task / "folds.json").read_text(encoding="utf-8"))
    preset = preset_for_task(load_task(tiny_task))
    inferer = SlidingWindowInferer(roi_size=(16, 16, 16), sw_batch_size=2, overlap=0.25, mode="gaussian")
    dice = DiceMetric(include_background=False)
    for case in (c for c in datalist["training"] if c["fold"] == 0):
        data = val_transforms(preset)({"image": str(tiny_task / case["image"]), "label": str(tiny_task / case["label"])})
        image, label = data["image"][None], one_hot(data["label"][None], 3)
        with torch.no_grad():
            flipped = inferer(image, ProbabilityAverage([network], tta="flip")).argmax(1, keepdim=True)
        dice(one_hot(flipped, 3), label)
    # Equal to the mirrored score. (Whether the plain score differs depends on how far the 8 iterations got: in a
    # fresh-clone run both were 0.0343, so that is not asserted.)
    assert scored == pytest.approx(float(dice.aggregate().mean()), abs=1e-5)

    with pytest.raises(MedunetError, match="val_tta"):
        run_workflow(DEMO_WORKFLOW, {**tiny_settings(tiny_task, tmp_path / "bad"), "val_tta": "rotate"})


def test_a_second_training_into_a_run_folder_in_use_is_refused_naming_the_first(tiny_task: Path, tmp_path: Path) -> None:
    """While another process trains into RUN_DIR (it holds the run folder's lock), a second training there stops
    before reading or writing anything, naming that process; once it has ended (here by SIGKILL, which leaves no
    stale lock), training there runs."""
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from medunet.engines.run_lock import RunFolderLock; "
         f"lock = RunFolderLock({str(run_dir)!r}); lock.acquire(); print('READY', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "READY"
        with pytest.raises(MedunetError, match=rf"is being trained by pid {holder.pid} on .*another --run-dir"):
            run_workflow(DEMO_WORKFLOW, tiny_settings(tiny_task, run_dir, epochs=1))
        assert sorted(path.name for path in run_dir.iterdir()) == [".training.lock"]  # nothing else written
    finally:
        holder.kill()
        holder.wait(timeout=30)
    run_workflow(DEMO_WORKFLOW, tiny_settings(tiny_task, run_dir, epochs=1))
    assert json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["finished"]
    assert "on " in (run_dir / ".training.lock").read_text(encoding="utf-8")  # the last holder, for the record


def test_a_run_folder_whose_lock_or_models_link_elsewhere_is_refused_and_nothing_written_through(tiny_task: Path,
                                                                                                   tmp_path: Path) -> None:
    other_run = tmp_path / "my_other_run" / "models"
    other_run.mkdir(parents=True)
    (other_run / "model.pt").write_bytes(b"weights I keep")
    (tmp_path / ".bashrc").write_text("precious", encoding="utf-8")

    locked = tmp_path / "received_a"
    locked.mkdir()
    (locked / ".training.lock").symlink_to(tmp_path / ".bashrc")
    with pytest.raises(MedunetError, match=r"\.training\.lock is a symbolic link"):
        run_workflow(DEMO_WORKFLOW, tiny_settings(tiny_task, locked))
    linked = tmp_path / "received_b"
    linked.mkdir()
    (linked / "models").symlink_to(other_run)
    with pytest.raises(MedunetError, match=r"models is a symbolic link .*my_other_run.* Fix: delete the link"):
        run_workflow(DEMO_WORKFLOW, tiny_settings(tiny_task, linked))

    assert (tmp_path / ".bashrc").read_text(encoding="utf-8") == "precious"
    assert [p.name for p in other_run.iterdir()] == ["model.pt"] and (other_run / "model.pt").read_bytes() == b"weights I keep"
    assert sorted(p.name for p in linked.iterdir()) == [".training.lock", "models"]  # nothing else written


def test_the_same_seed_trains_the_same_weights_and_another_seed_other_ones(tiny_task: Path, tmp_path: Path) -> None:
    def trained(name: str, seed: int) -> dict[str, torch.Tensor]:
        run_dir = tmp_path / name
        run_workflow(DEMO_WORKFLOW, {**tiny_settings(tiny_task, run_dir, epochs=1, epoch_length=2), "seed": seed,
                                     "profile_memory": False})
        return torch.load(run_dir / "models" / "model_last.pt", weights_only=True)["model"]

    first, again, other = trained("first", 3), trained("again", 3), trained("other", 4)
    assert first.keys() == again.keys() and all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
    # The same through 'medunet train --network' (which resets network_def), at the workflow's seed 0.
    by_cli = []
    for name in ("cli_a", "cli_b"):
        settings = tiny_settings(tiny_task, tmp_path / name, epochs=1, epoch_length=2)
        assert main([*cli_args(settings), "--no-tracking", "--set", "profile_memory=false"]) == 0
        by_cli.append(torch.load(tmp_path / name / "models" / "model_last.pt", weights_only=True)["model"])
    assert all(torch.equal(by_cli[0][key], by_cli[1][key]) for key in by_cli[0])
    # The seed draws the initial weights without touching the global generator.
    state = torch.random.get_rng_state()
    a, b = (create_network(NETWORK, spatial_dims=3, in_channels=1, out_channels=3, seed=5) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


class Killed(Exception):
    """Stands for a kill: raised once epoch 1's checkpoint is written."""


def test_a_resumed_training_goes_on_with_its_random_streams_and_trains_as_the_uninterrupted_one(
        tiny_task: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Stopped after epoch 1 and resumed, a run draws epoch 2's patches and augmentations, not epoch 1's again: with
    epochs of the whole loader (4 training cases, batch 1) its weights after epoch 2 are the uninterrupted run's."""
    def settings(name: str) -> dict:
        return {**tiny_settings(tiny_task, tmp_path / name, epochs=2, epoch_length=4), "seed": 7,
                "profile_memory": False}

    def weights(name: str) -> dict[str, torch.Tensor]:
        return torch.load(tmp_path / name / "models" / "model_last.pt", weights_only=True)["model"]

    def stopped_after_epoch_1(name: str) -> None:
        record = RunRecorder._epoch_completed

        def record_then_stop(recorder: RunRecorder, engine: Engine) -> None:
            record(recorder, engine)
            if engine.state.epoch == 1:
                raise Killed

        with monkeypatch.context() as patch:
            patch.setattr(RunRecorder, "_epoch_completed", record_then_stop)
            with pytest.raises(Exception) as stopped:  # MONAI's config parser wraps it in a RuntimeError
                run_workflow(DEMO_WORKFLOW, settings(name))
        error: BaseException | None = stopped.value
        while error is not None and not isinstance(error, Killed):
            error = error.__cause__
        assert isinstance(error, Killed), stopped.value

    run_workflow(DEMO_WORKFLOW, settings("straight"))
    stopped_after_epoch_1("resumed")
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "checkpoint_last.pt", weights_only=True)
    assert checkpoint_epoch(saved) == 1 and saved["random_streams"]["transforms"]
    (summary,) = run_workflow(DEMO_WORKFLOW, settings("resumed"))
    assert summary["resumed_from_epoch"] == 1 and summary["finished"]
    straight, resumed = weights("straight"), weights("resumed")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    # A checkpoint from before the streams were kept still resumes (with freshly seeded streams).
    stopped_after_epoch_1("old")
    old = tmp_path / "old" / "checkpoints" / "checkpoint_last.pt"
    checkpoint = torch.load(old, weights_only=True)
    del checkpoint["random_streams"]
    torch.save(checkpoint, old)
    (summary,) = run_workflow(DEMO_WORKFLOW, settings("old"))
    assert summary["finished"] and summary["resumed_from_epoch"] == 1
    # Resumed with another augmentation (other random transforms), it says so and goes on.
    stopped_after_epoch_1("changed")
    capsys.readouterr()
    (summary,) = run_workflow(DEMO_WORKFLOW, {**settings("changed"), "augment": "nnunet"})
    assert summary["finished"] and summary["resumed_from_epoch"] == 1
    assert "they start from fresh seeds" in capsys.readouterr().out


def test_random_streams_go_on_where_they_stood_and_other_ranks_draw_their_own() -> None:
    """Restored, the streams give what they gave after the save, the transforms' inner generators included; a rank
    other than 0 restores rank 0's and then draws a stream of its own, the same one each time."""
    import random

    import numpy as np
    from monai.data import Dataset
    from monai.transforms import Compose, RandGaussianNoised, RandSpatialCropd

    from medunet.engines.checkpoint import RandomStreams

    dataset = Dataset([{"image": torch.arange(512.0).reshape(1, 8, 8, 8)}],
                      transform=Compose([RandGaussianNoised(keys="image", prob=1.0),
                                         RandSpatialCropd(keys="image", roi_size=(4, 4, 4), random_size=False)]))
    streams = RandomStreams(dataset)
    # The Compose, each dictionary transform and the array transform each draws from.
    assert len(streams.transforms()) >= 4

    def draw() -> tuple:
        return dataset[0]["image"].clone(), torch.rand(2), float(np.random.rand()), random.random()

    def same(a: tuple, b: tuple) -> bool:
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]

    saved = streams.state_dict()
    expected = draw()
    draw()
    streams.load_state_dict(saved)
    assert same(draw(), expected)
    RandomStreams(dataset, rank=1).load_state_dict(saved)
    other = draw()
    assert not torch.equal(other[0], expected[0]) and not torch.equal(other[1], expected[1])
    RandomStreams(dataset, rank=1).load_state_dict(saved)
    assert same(draw(), other)


class NeverLesion(torch.nn.Module):
    """The tiny network with its lesion logit held 10^4 below the others: a network that has lost the lesion class."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_network()
        self.register_buffer("offset", torch.tensor([0.0, 0.0, -1e4]).view(1, 3, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.offset


def test_a_class_the_network_never_predicts_is_named_lost_at_each_validation_and_at_the_end(tiny_task: Path,
                                                                                            tmp_path: Path,
                                                                                            capsys) -> None:
    from medunet.engines.checkpoint import LOST_CLASS_DICE
    from medunet.engines.training import SegmentationTraining

    run_dir = tmp_path / "lost"
    training = SegmentationTraining(run_dir, tiny_task, tiny_task / "folds.json", 0, NeverLesion(), max_epochs=2,
                                    epoch_length=2, batch_size=1, num_samples=2, patch_size=(16, 16, 16),
                                    sw_batch_size=2, progress=False, profile_memory=False)
    summary = training.run()
    output = capsys.readouterr().out

    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    best = next(row for row in metrics["epochs"] if row["epoch"] == metrics["best_epoch"])
    assert all(row["val_dice_lesion"] == 0.0 for row in metrics["epochs"])  # the validation case holds a lesion
    # Lost: every class below the threshold at the best epoch, the lesion among them, and no other.
    expected = [name for name in ("organ", "lesion") if best[f"val_dice_{name}"] < LOST_CLASS_DICE]
    assert "lesion" in expected and metrics["lost_classes"] == expected == summary["lost_classes"]
    for epoch in (1, 2):
        assert f"warning: epoch {epoch}: the network predicts almost none of" in output
    assert output.count("the network predicts almost none of") == 2 and "lesion 0.0000" in output
    assert f"warning: {run_dir}: the best model (epoch {metrics['best_epoch']}) has lost" in output
    assert "at epoch(s) 1, 2 (the run has 2)" in output and "--set seed=N" in output


def test_lost_classes_are_those_scored_below_the_threshold_not_those_no_case_holds() -> None:
    from medunet.engines.checkpoint import LOST_CLASS_DICE, lost_classes

    row = {"epoch": 3, "val_mean_dice": 0.004, "val_dice_organ": 0.5, "val_dice_lesion": LOST_CLASS_DICE / 2,
           "val_dice_cyst": None, "val_dice_vessel": float("nan"), "val_dice_duct": LOST_CLASS_DICE}
    assert lost_classes(row) == ["lesion"]
    assert lost_classes({"dice_lesion": 0.0, "mean_dice": 0.0}, prefix="dice_") == ["lesion"]
