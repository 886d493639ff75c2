"""Outputs survive kills: SIGKILL ``infer``/``evaluate`` at several moments, then every label map, CSV, JSON
and report under its final name is complete, and a rerun finishes, skipping the cases already predicted.
Also: inputs that would be overwritten or collide are refused before any inference."""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medunet.atomic import atomic_path, atomic_write_text, remove_stale_temporaries, temporary_path
from medunet.cli import main
from medunet.data import get_preset, make_phantom_task
from medunet.engines import run_workflow
from medunet.engines.demo import prepare_phantom
from medunet.engines.inference import predict
from medunet.errors import MedunetError
from medunet.evaluation import evaluate_folders
from medunet.evaluation.cases import list_images
from medunet.paths import REPO_ROOT

DEMO_WORKFLOW = REPO_ROOT / "medunet" / "workflows" / "phantom_demo.json"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
# A fixed 'network' for the driver scripts: label 1 above a threshold (no training needed).
THRESHOLD_NETWORK = """
import torch

class Threshold(torch.nn.Module):
    def forward(self, image):
        foreground = (image[:, :1] > 0.5).float()
        return torch.cat([1.0 - foreground, foreground, torch.zeros_like(foreground)], dim=1)
"""


class Threshold(torch.nn.Module):
    """The same fixed network, in-process."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        foreground = (image[:, :1] > 0.5).float()
        return torch.cat([1.0 - foreground, foreground, torch.zeros_like(foreground)], dim=1)


@pytest.fixture(scope="module")
def ct_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four CT phantoms large enough (96 x 96 x 40) that writing a label map takes a while."""
    return make_phantom_task(tmp_path_factory.mktemp("ct") / "Task90_PhantomCT", kind="ct", num_cases=4,
                             num_test=0, size=(96, 96, 40))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run folder trained for one iteration on five 24 x 24 x 20 MRI phantoms, and the task folder."""
    root = tmp_path_factory.mktemp("run")
    task_dir, run_dir = root / "Task90_PhantomMRI", root / "run"
    prepare_phantom(task_dir, num_cases=5, kind="mri", size=(24, 24, 20))
    run_workflow(DEMO_WORKFLOW, {
        "dataset_dir": str(task_dir), "run_dir": str(run_dir), "network_name": "lunet_small_4f",
        "patch_size": [16, 16, 16], "max_epochs": 1, "epoch_length": 1, "val_interval": 1, "batch_size": 1,
        "num_samples": 2, "sw_batch_size": 2, "progress": False, "tracking": False,
    })
    return run_dir, task_dir


def final_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []


def assert_label_maps_complete(folder: Path, images_dir: Path) -> dict[str, int]:
    """Every ``.nii.gz`` under its final name is a complete gzip stream and loads with the input's shape;
    returns their modification times."""
    mtimes = {}
    for path in final_files(folder):
        assert path.name.endswith(".nii.gz"), f"unexpected file {path}"
        with gzip.open(path) as stream:
            stream.read()  # EOFError / BadGzipFile when truncated
        prediction = nib.load(path)
        assert prediction.shape == nib.load(images_dir / path.name).shape
        assert np.asarray(prediction.dataobj).dtype == np.uint8
        mtimes[path.name] = path.stat().st_mtime_ns
    return mtimes


def kill_when(command: list[str], condition, delay: float = 0.0, timeout: float = 180) -> subprocess.Popen:
    """Start ``command``, SIGKILL it ``delay`` seconds after ``condition(process)`` holds; fail if it ended first."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not condition(process) and process.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    stderr = process.stderr.read().decode()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL, f"ended before the kill ({process.returncode}): {stderr[-2000:]}"
    return process


def writes_temporary(folder: Path):
    """True once the process writes a temporary file (``.tmp<PID>.*``) in ``folder``: a kill now is mid-write."""
    def condition(process: subprocess.Popen) -> bool:
        return folder.is_dir() and any(name.startswith(f".tmp{process.pid}.") for name in os.listdir(folder))
    return condition


# --------------------------------------------------------------------------------------------- predictions


def test_sigkill_during_predict_leaves_complete_label_maps_and_rerun_skips_them(ct_task: Path, tmp_path: Path):
    images, out = ct_task / "imagesTr", tmp_path / "pred"
    driver = tmp_path / "predict_driver.py"
    driver.write_text(THRESHOLD_NETWORK + textwrap.dedent("""
        import sys
        from medunet.data import get_preset
        from medunet.engines.inference import predict
        predict(Threshold(), get_preset("PhantomCT"), sys.argv[1], sys.argv[2], progress=False)
    """), encoding="utf-8")
    command = [sys.executable, str(driver), str(images), str(out)]
    finished: dict[str, int] = {}
    rng = random.Random(0)
    interrupted = 0
    for delay in (0.0, rng.uniform(0.0, 0.05)):  # each run dies while writing; at most one case done
        kill_when(command, writes_temporary(out), delay)
        interrupted += any(p.name.startswith(".tmp") for p in out.iterdir())
        mtimes = assert_label_maps_complete(out, images)
        assert {name: mtimes[name] for name in finished} == finished  # finished cases were skipped, not redone
        finished = mtimes
    assert len(finished) < 4 and interrupted  # at least one kill cut a label map half-way

    written = predict(Threshold(), get_preset("PhantomCT"), images, out, progress=False)
    assert [p.name for p in written] == [p.name for p in sorted(images.iterdir())]
    assert sorted(p.name for p in written.skipped) == sorted(finished)
    mtimes = assert_label_maps_complete(out, images)
    assert len(mtimes) == 4 and {name: mtimes[name] for name in finished} == finished
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the killed runs' temporaries are gone
    fresh = predict(Threshold(), get_preset("PhantomCT"), images, tmp_path / "fresh", progress=False)
    for path in fresh:  # resumed predictions equal uninterrupted ones
        np.testing.assert_array_equal(np.asarray(nib.load(out / path.name).dataobj), np.asarray(nib.load(path).dataobj))


def test_sigkill_during_cli_infer_then_rerun_skips_finished_cases(trained_run, tmp_path: Path, capsys):
    run_dir, task_dir = trained_run
    images, out = task_dir / "imagesTr", tmp_path / "pred"
    args = ["infer", "--run-dir", str(run_dir), "--input", str(images), "--output", str(out), "--no-tracking"]
    kill_when([sys.executable, "-m", "medunet", *args], writes_temporary(out))
    before = assert_label_maps_complete(out, images)
    assert len(before) < 5

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {5 - len(before)} prediction(s)" in printed
    assert (f"skipped {len(before)} case(s)" in printed) == bool(before)
    after = assert_label_maps_complete(out, images)
    assert len(after) == 5 and {name: after[name] for name in before} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_forced_export_killed_half_way_leaves_the_previous_bundle_and_the_rerun_replaces_it(trained_run,
                                                                                            tmp_path: Path):
    run_dir, _ = trained_run
    target = tmp_path / "bundles" / "model"
    assert main(["export-bundle", str(run_dir), str(target), "--no-memory"]) == 0
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    command = [sys.executable, "-m", "medunet", "export-bundle", str(run_dir), str(target), "--force", "--no-memory"]

    def building(process: subprocess.Popen) -> bool:  # the new bundle is being written beside the old one
        folder = target.parent / f".tmp{process.pid}.model" / "configs"
        return folder.is_dir() and any(folder.iterdir())

    kill_when(command, building)
    assert {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    assert any(p.name.startswith(".tmp") for p in target.parent.iterdir())  # the killed export's half bundle
    assert main(["export-bundle", str(run_dir), str(target), "--force", "--no-memory"]) == 0
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # replaced; the killed one's folder removed
    assert {p.relative_to(target) for p in target.rglob("*") if p.is_file()} == set(before)


def test_infer_into_a_received_run_folder_whose_predictions_link_elsewhere_is_refused(trained_run, tmp_path: Path,
                                                                                      capsys):
    run_dir, task_dir = trained_run
    received = tmp_path / "received"
    shutil.copytree(run_dir, received, ignore=shutil.ignore_patterns("predictions"))
    elsewhere = tmp_path / "my_scans"
    elsewhere.mkdir()
    (elsewhere / "phantom_000.nii.gz").write_bytes(b"my own file")
    (received / "predictions").symlink_to(elsewhere)
    args = ["infer", "--run-dir", str(received), "--input", str(task_dir / "imagesTr"), "--no-tracking"]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "predictions is a symbolic link" in error and "my_scans" in error and "Fix: delete the link" in error
    assert sorted(p.name for p in elsewhere.iterdir()) == ["phantom_000.nii.gz"]
    assert (elsewhere / "phantom_000.nii.gz").read_bytes() == b"my own file"
    # An output folder the user names is theirs to choose, link or not.
    assert main([*args, "--output", str(received / "predictions")]) == 0
    assert len(final_files(elsewhere)) == 5


def test_infer_rerun_skips_existing_predictions_and_overwrite_rewrites_them(trained_run, tmp_path: Path, capsys):
    run_dir, task_dir = trained_run
    images, out = task_dir / "imagesTr", tmp_path / "pred"
    args = ["infer", "--run-dir", str(run_dir), "--input", str(images), "--output", str(out), "--no-tracking"]
    assert main(args) == 0
    assert "wrote 5 prediction(s)" in capsys.readouterr().out
    first = assert_label_maps_complete(out, images)
    predicted = np.asarray(nib.load(out / "phantom_000.nii.gz").dataobj)

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote 0 prediction(s)" in printed and "skipped 5 case(s)" in printed and "--overwrite" in printed
    assert assert_label_maps_complete(out, images) == first

    stale = nib.load(out / "phantom_000.nii.gz")
    nib.save(nib.Nifti1Image(np.full(stale.shape, 7, np.uint8), stale.affine), out / "phantom_000.nii.gz")
    assert main([*args, "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 prediction(s)" in printed and "skipped" not in printed
    np.testing.assert_array_equal(np.asarray(nib.load(out / "phantom_000.nii.gz").dataobj), predicted)
    rewritten = assert_label_maps_complete(out, images)
    assert all(rewritten[name] != first[name] for name in first)


# ---------------------------------------------------------------------------------------------- evaluation


def assert_evaluation_complete(folder: Path, n_cases: int, n_labels: int) -> set[str]:
    """Every output under its final name parses completely; returns their names."""
    names = {p.name for p in final_files(folder)}
    assert names <= {"cases.csv", "summary.json", "report.html", "report.pdf"}, names
    if "cases.csv" in names:
        with open(folder / "cases.csv", newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        assert len(rows) == n_cases * n_labels and all(row["note"] is not None for row in rows)
    if "summary.json" in names:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        assert len(summary["metric_per_case"]) == n_cases
    if "report.html" in names:
        assert (folder / "report.html").read_text(encoding="utf-8").rstrip().endswith("</html>")
    if "report.pdf" in names:
        assert (folder / "report.pdf").read_bytes().rstrip().endswith(b"%%EOF")
    return names


def test_sigkill_during_evaluate_leaves_only_complete_outputs(ct_task: Path, tmp_path: Path):
    refs, preds, out = ct_task / "labelsTr", tmp_path / "pred", tmp_path / "evaluation"
    shutil.copytree(refs, preds)
    driver = tmp_path / "evaluate_driver.py"
    driver.write_text(textwrap.dedent("""
        import sys
        from medunet.evaluation import evaluate_folders
        evaluate_folders(sys.argv[1], sys.argv[2], sys.argv[3], workers=0, progress=False)
    """), encoding="utf-8")
    command = [sys.executable, str(driver), str(preds), str(refs), str(out)]
    n_labels = len(json.loads((ct_task / "dataset.json").read_text(encoding="utf-8"))["labels"]) - 1
    rng = random.Random(1)
    seen: set[str] = set()
    for delay in (0.0, 0.0, rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.2)):
        kill_when(command, writes_temporary(out), delay)
        seen |= assert_evaluation_complete(out, 4, n_labels)
    assert seen  # some outputs were finished before a kill, and they are complete

    result = evaluate_folders(preds, refs, out, workers=0, progress=False)
    assert assert_evaluation_complete(out, 4, n_labels) == {"cases.csv", "summary.json", "report.html", "report.pdf"}
    assert result.mean("dice") == pytest.approx(1.0)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_temporary_and_hidden_files_are_not_cases(tmp_path: Path):
    case = nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4))
    nib.save(case, tmp_path / "case1.nii.gz")
    (tmp_path / ".tmp12345.case2.nii.gz").write_bytes(b"\x1f\x8b truncated")
    (tmp_path / "._case1.nii.gz").write_bytes(b"macOS metadata")
    assert list(list_images(tmp_path, "prediction")) == ["case1"]


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    stale = tmp_path / f".tmp{int(dead.stdout)}.case1.nii.gz"
    stale.write_bytes(b"half")
    live = temporary_path(tmp_path / "case2.nii.gz")
    live.write_bytes(b"being written")
    keep = tmp_path / "case3.nii.gz"
    keep.write_bytes(b"complete")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert live.exists() and keep.exists() and not stale.exists()


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path: Path):
    path = tmp_path / "summary.json"
    atomic_write_text("old", path)
    with pytest.raises(RuntimeError), atomic_path(path) as temporary:
        temporary.write_text("new, half", encoding="utf-8")
        raise RuntimeError("killed")
    assert path.read_text(encoding="utf-8") == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_writes_never_follow_a_link_planted_in_the_folder(tmp_path: Path):
    from medunet.atomic import open_own_file
    from medunet.errors import MedunetError

    outside = tmp_path / "home"
    outside.mkdir()
    victims = {name: outside / name for name in (".bashrc", ".profile", "notes.txt")}
    for name, victim in victims.items():
        victim.write_text(f"precious {name}", encoding="utf-8")
    folder = tmp_path / "run_from_elsewhere"
    folder.mkdir()
    # A link where this process's temporary file goes, and one at the destination itself.
    temporary_path(folder / "metrics.json").symlink_to(victims[".bashrc"])
    (folder / "metrics.csv").symlink_to(victims[".profile"])
    atomic_write_text("new", folder / "metrics.json")
    atomic_write_text("new", folder / "metrics.csv")
    for name in ("metrics.json", "metrics.csv"):
        assert not (folder / name).is_symlink() and (folder / name).read_text(encoding="utf-8") == "new"
    assert sorted(p.name for p in folder.iterdir()) == ["metrics.csv", "metrics.json"]

    # Appended and locked files: a link, a folder or a named pipe in their place is refused, naming it.
    (folder / "train.log").symlink_to(victims["notes.txt"])
    with pytest.raises(MedunetError, match=r"train\.log is a symbolic link .*notes\.txt.* Fix: delete it"):
        open_own_file(folder / "train.log")
    (folder / "lock").mkdir()
    with pytest.raises(MedunetError, match="lock is a folder"):
        open_own_file(folder / "lock", "a+")
    os.mkfifo(folder / "pipe")
    with pytest.raises(MedunetError, match="pipe is not a regular file"):
        open_own_file(folder / "pipe")  # fails at once instead of waiting for a reader
    assert {name: victim.read_text(encoding="utf-8") for name, victim in victims.items()} == {
        name: f"precious {name}" for name in victims}
    with open_own_file(folder / "fresh.log") as stream, open_own_file(folder / "fresh.log") as again:
        stream.write("one\n")
        stream.flush()
        again.write("two\n")
    assert (folder / "fresh.log").read_text(encoding="utf-8") == "one\ntwo\n"


def test_atomic_folder_puts_back_what_a_killed_process_moved_aside_and_keeps_it_on_failure(tmp_path: Path):
    from medunet.atomic import atomic_folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          encoding="utf-8", errors="replace")
    pid = int(dead.stdout)
    target = tmp_path / "model"
    (tmp_path / f".old{pid}.model").mkdir()  # killed between moving the old folder aside and putting the new in place
    (tmp_path / f".old{pid}.model" / "weights.pt").write_text("old", encoding="utf-8")
    (tmp_path / f".tmp{pid}.model").mkdir()  # and its half-built new one
    with pytest.raises(RuntimeError), atomic_folder(target) as building:
        (building / "weights.pt").write_text("half", encoding="utf-8")
        raise RuntimeError("this export fails too")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (target / "weights.pt").read_text(encoding="utf-8") == "old"
    with atomic_folder(target) as building:
        (building / "weights.pt").write_text("new", encoding="utf-8")
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
    assert (target / "weights.pt").read_text(encoding="utf-8") == "new"


# ----------------------------------------------------------------------------- refusing to overwrite inputs


def copy_image(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return target


def test_output_folder_equal_to_an_input_folder_is_refused_and_inputs_are_untouched(ct_task: Path, tmp_path: Path):
    images = tmp_path / "images"
    shutil.copytree(ct_task / "imagesTr", images)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    preset = get_preset("PhantomCT")
    with pytest.raises(MedunetError, match="is the folder of the input .*Fix: pass an --output folder"):
        predict(Threshold(), preset, images, images, progress=False)
    with pytest.raises(MedunetError, match="is the folder of the input"):  # an output file equal to the input
        predict(Threshold(), preset, images / "phantom_000.nii.gz", images, progress=False)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "phantom_001.nii.gz").symlink_to(images / "phantom_001.nii.gz")
    with pytest.raises(MedunetError, match="would overwrite the input itself"):
        predict(Threshold(), preset, images / "phantom_001.nii.gz", linked, progress=False)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


def test_inputs_with_the_same_case_name_are_refused_before_any_inference(ct_task: Path, tmp_path: Path):
    source = ct_task / "imagesTr" / "phantom_000.nii.gz"
    a = copy_image(source, tmp_path / "a" / "case1.nii.gz")
    b = copy_image(source, tmp_path / "b" / "case1.nii.gz")
    nrrd = tmp_path / "a" / "case1.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(source)), str(nrrd))
    preset, out = get_preset("PhantomCT"), tmp_path / "pred"
    for inputs in ([a, b], [tmp_path / "a"], [a, a]):
        with pytest.raises(MedunetError, match=r"case1\.nii\.gz and one would be lost\. Fix: rename"):
            predict(Threshold(), preset, inputs, out, progress=False)
    with pytest.raises(MedunetError, match="given twice"):
        predict(Threshold(), preset, [a, a], out, progress=False)
    assert not out.exists()  # refused before anything was written


def test_cli_infer_refuses_an_input_folder_as_output_before_loading_the_run(ct_task: Path, tmp_path: Path, capsys):
    images = tmp_path / "images"
    shutil.copytree(ct_task / "imagesTr", images)
    code = main(["infer", "--run-dir", str(tmp_path / "no_run"), "--input", str(images), "--output", str(images),
                 "--no-tracking"])
    assert code == 2
    assert "is the folder of the input" in capsys.readouterr().err
