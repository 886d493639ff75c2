"""A tiny trained run on MRI phantoms, shared by the deployment and inference-engine tests."""

from __future__ import annotations

from pathlib import Path

from medunet.engines import run_workflow
from medunet.engines.demo import prepare_phantom
from medunet.paths import REPO_ROOT

DEMO_WORKFLOW = REPO_ROOT / "medunet" / "workflows" / "phantom_demo.json"


def train_tiny_run(root: Path, iterations: int = 30) -> tuple[Path, Path]:
    """``(run_dir, task_dir)``: lunet_small_4f trained for ``iterations`` steps on six 32 x 28 x 20 MRI phantoms
    (16^3 patches: several windows per case), in seconds on a CPU."""
    task_dir, run_dir = root / "Task90_PhantomMRI", root / "run"
    prepare_phantom(task_dir, num_cases=6, kind="mri", size=(32, 28, 20))
    run_workflow(DEMO_WORKFLOW, {
        "dataset_dir": str(task_dir), "run_dir": str(run_dir), "network_name": "lunet_small_4f",
        "patch_size": [16, 16, 16], "max_epochs": 1, "epoch_length": iterations, "val_interval": 1,
        "batch_size": 2, "num_samples": 2, "sw_batch_size": 2, "progress": False, "tracking": False,
    })
    return run_dir, task_dir
