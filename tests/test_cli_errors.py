"""Bad arguments and settings end as one line on stderr with exit code 2, before any work, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.cli import main
from medunet.data import make_phantom_task, write_datalist
from medunet.paths import REPO_ROOT
from medunet.run_folder import CONFIG_FILE

DEMO_WORKFLOW = REPO_ROOT / "medunet" / "workflows" / "phantom_demo.json"


def one_error_line(capsys: pytest.CaptureFixture, *words: str) -> str:
    """The single stderr line of a failed command; it must name each of ``words``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    assert "Fix:" in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["infer", "--run-dir", "r", "--input", "i", "--overlap", "1.5"], "--overlap"),
        (["infer", "--run-dir", "r", "--input", "i", "--sw-batch-size", "0"], "--sw-batch-size"),
        (["infer", "--run-dir", "r", "--input", "i", "--sw-batch-size", "-1"], "--sw-batch-size"),
        (["infer", "--run-dir", "r", "--input", "i", "--device", "banana"], "--device"),
        (["profile", "lunet_small_8f", "--shape", "garbage"], "--shape"),
        (["profile", "lunet_small_8f", "--repeats", "0"], "--repeats"),
        (["profile", "lunet_small_8f", "--out-channels", "0"], "--out-channels"),
        (["profile", "lunet_small_8f", "--device", "cuda:99"], "--device"),
        (["train", "--epochs", "0"], "--epochs"),
        (["train", "--fold", "-1"], "--fold"),
        (["make-phantom", "somewhere", "--cases", "0"], "--cases"),
        (["make-datalist", "somewhere", "--folds", "x"], "--folds"),
        (["evaluate", "--pred", "p", "--ref", "r", "--tolerance-mm", "-1"], "--tolerance-mm"),
        (["evaluate", "--pred", "p", "--ref", "r", "--tolerance-mm", "spleen=0"], "--tolerance-mm"),
    ],
)
def test_bad_argument_is_one_line_and_exit_2(argv: list[str], option: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    one_error_line(capsys, option, argv[-1].split("=")[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_infer_on_cuda_without_cuda_says_so(capsys: pytest.CaptureFixture) -> None:
    assert main(["infer", "--run-dir", "r", "--input", "i", "--device", "cuda"]) == 2
    one_error_line(capsys, "--device", "'cuda'", "no CUDA device")


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    task = make_phantom_task(tmp_path_factory.mktemp("errors") / "Task91_PhantomMRI", kind="mri", num_cases=5,
                             num_test=0, size=(12, 12, 8))
    write_datalist(task, task / "folds.json")
    return task


def train_args(task: Path, run_dir: Path, *settings: str) -> list[str]:
    args = ["train", "--workflow", str(DEMO_WORKFLOW), "--data-root", str(task), "--run-dir", str(run_dir),
            "--network", "lunet_small_2f", "--no-tracking", "--set", "progress=false"]
    for setting in settings:
        args += ["--set", setting]
    return args


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ("batch_size=0", "batch_size"),
        ("num_samples=0", "num_samples"),
        ("epoch_length=-3", "epoch_length"),
        ("max_epochs=0", "max_epochs"),
        ("val_interval=0", "val_interval"),
        ("learning_rate=-1", "learning_rate"),
        ("sw_batch_size=0", "sw_batch_size"),
        ("sw_overlap=1.5", "sw_overlap"),
        ("num_workers=-1", "num_workers"),
        ("early_stop_patience=-1", "early_stop_patience"),
        ("cache=ram", "cache"),
        ("patch_size=[0,8,8]", "patch_size"),
        ('device="banana"', "device"),
    ],
)
def test_bad_workflow_setting_fails_before_training(
    setting: str, key: str, tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    assert main(train_args(tiny_task, run_dir, setting)) == 2
    one_error_line(capsys, key)
    assert not (run_dir / CONFIG_FILE).exists() and not (run_dir / "metrics.csv").exists()  # nothing trained


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_on_cuda_without_cuda_fails_at_once(tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(train_args(tiny_task, tmp_path / "run", 'device="cuda"')) == 2
    one_error_line(capsys, "device", "no CUDA device")


@pytest.mark.parametrize("value", ['"$__import__(\'os\').system(\'true\')"', '"@learning_rate"', '"%other.json#x"',
                                   '{"features": "$8 * 2"}', '["@a"]', "$1+1"])
def test_set_refuses_expressions_and_references(value: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--workflow", str(DEMO_WORKFLOW), "--set", f"network_args={value}"]) == 2
    one_error_line(capsys, "--set network_args", "plain JSON", "workflow file")


def test_read_only_run_folder_is_one_line(tiny_task: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        run_dir = locked / "run"
    else:  # root writes through permissions; sysfs refuses new folders even to root
        run_dir = Path("/sys/medunet-test-run")
        try:
            run_dir.mkdir()
        except OSError:
            pass
        else:
            run_dir.rmdir()
            pytest.skip("no unwritable folder to test with")
    assert main(train_args(tiny_task, run_dir)) == 2
    one_error_line(capsys, str(run_dir), "cannot write")


def test_full_disk_is_one_line(tiny_task: Path, capsys: pytest.CaptureFixture) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    assert main(["make-datalist", str(tiny_task), "--out", "/dev/full"]) == 2
    one_error_line(capsys, "No space left", "free disk space")


def test_phantom_workflow_does_not_invent_a_task(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nonexistent" / "task"
    assert main(["train", "--workflow", str(DEMO_WORKFLOW), "--data-root", str(missing), "--run-dir",
                 str(tmp_path / "run"), "--no-tracking"]) == 2
    one_error_line(capsys, str(missing), "dataset.json", "make-phantom")
    assert not missing.exists()


def test_make_phantom_refuses_an_existing_task_unless_forced(tiny_task: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    before = (tiny_task / "dataset.json").read_text(encoding="utf-8")
    assert main(["make-phantom", str(tiny_task), "--cases", "1", "--test-cases", "0", "--size", "6", "6", "6"]) == 2
    one_error_line(capsys, str(tiny_task), "--force")
    assert (tiny_task / "dataset.json").read_text(encoding="utf-8") == before
    copy = tmp_path / "Task92_Phantom"
    copy.mkdir()
    (copy / "notes.txt").write_text("mine", encoding="utf-8")
    args = ["make-phantom", str(copy), "--cases", "1", "--test-cases", "0", "--size", "6", "6", "6"]
    assert main(args) == 2
    assert main([*args, "--force"]) == 0
    assert json.loads((copy / "dataset.json").read_text(encoding="utf-8"))["numTraining"] == 1


def test_make_datalist_writes_beside_the_task_by_default(tiny_task: Path, tmp_path: Path) -> None:
    task = make_phantom_task(tmp_path / "Task93_PhantomCT", num_cases=2, num_test=0, size=(6, 6, 6))
    assert main(["make-datalist", str(task), "--folds", "2"]) == 0
    assert json.loads((task / "folds.json").read_text(encoding="utf-8"))["num_folds"] == 2


def test_skip_missing_is_one_summary_line_not_problems(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    label = np.zeros((6, 6, 6), dtype=np.uint8)
    label[2:4, 2:4, 2:4] = 1
    for index in range(6):
        nib.save(nib.Nifti1Image(label, np.eye(4)), ref_dir / f"case_{index}.nii.gz")
    nib.save(nib.Nifti1Image(label, np.eye(4)), pred_dir / "case_0.nii.gz")
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(tmp_path / "out"),
                 "--skip-missing", "--no-report", "--no-tracking", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "warning: missing prediction" not in out
    summary = [line for line in out.splitlines() if "without a prediction" in line]
    assert len(summary) == 1 and "5 reference(s)" in summary[0] and "case_1" in summary[0], out


def test_parser_imports_no_heavy_packages() -> None:
    code = ("import sys, medunet.cli; medunet.cli.build_parser(); "
            "print([m for m in ('torch', 'monai', 'mlflow', 'ignite', 'numpy') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=60, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_help_works_for_every_sub_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["--help"]) == 0
    assert main(["train", "--help"]) == 0
    assert "Python expressions" in capsys.readouterr().out
