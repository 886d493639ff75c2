"""One inference entry point, several engines: torch, ONNX fp32 and int8 write the same files; test-time mirroring;
fold ensembling; cases sharded across torchrun ranks."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.cli import main
from medunet.data import get_preset, infer_transforms
from medunet.engines.inference import (
    ProbabilityAverage,
    engine_network,
    mirror_axes,
    predict,
    predict_run,
    predict_runs,
)
from medunet.errors import MedunetError
from medunet.paths import REPO_ROOT
from medunet.run_folder import read_run_record, write_run_record
from tests.deploy_helpers import train_tiny_run


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def symmetric_conv(seed: int, symmetric: bool) -> torch.nn.Module:
    """A 3x3x3 conv 'network' (1 -> 3 classes); with ``symmetric`` its kernels are mirror-symmetric on every axis,
    so it commutes with every flip of its input."""
    conv = torch.nn.Conv3d(1, 3, 3, padding=1)
    with torch.no_grad():
        weight = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(seed))
        if symmetric:
            weight = sum(weight.flip(axes) for axes in mirror_axes(3)) / 8
        conv.weight.copy_(weight * 3.0)
    return conv.eval()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_tiny_run(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def images(trained_run: tuple[Path, Path]) -> list[Path]:
    return sorted((trained_run[1] / "imagesTr").iterdir())[:3]


def test_onnx_engines_write_the_same_files_as_torch(trained_run, images: list[Path], tmp_path: Path) -> None:
    run_dir, _ = trained_run
    outputs = {engine: predict_run(run_dir, images, tmp_path / engine, engine=engine, progress=False)
               for engine in ("torch", "onnx", "onnx-int8")}
    assert [p.name for p in outputs["onnx"]] == [p.name for p in outputs["torch"]]
    for torch_file, onnx_file, int8_file in zip(outputs["torch"], outputs["onnx"], outputs["onnx-int8"]):
        reference = labels_of(torch_file)
        assert nib.load(onnx_file).shape == reference.shape
        np.testing.assert_allclose(nib.load(onnx_file).affine, nib.load(torch_file).affine)
        assert (labels_of(onnx_file) == reference).mean() >= 0.999
        assert nib.load(int8_file).shape == reference.shape
        # A network trained for one short epoch on phantoms has many near-ties that int8 rounding flips (0.95-0.99
        # of voxels agree, depending on the training's thread count; real Hippocampus cases agree on 99.8%): the
        # test below compares int8 and torch where torch is not near a tie.
        assert (labels_of(int8_file) == reference).mean() >= 0.9
    assert (run_dir / "deploy" / "model.int8.onnx").is_file()  # exported once, reused by later runs


def test_int8_labels_equal_torch_ones_wherever_torch_is_not_near_a_tie(trained_run, images: list[Path]) -> None:
    run_dir, _ = trained_run
    networks = {engine: engine_network(run_dir, engine)[0] for engine in ("torch", "onnx-int8")}
    record = read_run_record(run_dir)
    roi = record.sliding_window["roi_size"]
    volumes = [infer_transforms(record.preset)({"image": str(image)})["image"] for image in images]
    windows = torch.from_numpy(np.stack([np.asarray(volume[(slice(None), *(slice(0, size) for size in roi))])
                                         for volume in volumes])).float()
    with torch.no_grad():
        reference = torch.softmax(networks["torch"].eval()(windows), dim=1)
        int8 = networks["onnx-int8"](windows)
    top2 = reference.topk(2, dim=1).values
    # The two likeliest classes more than 0.1 apart. How many voxels that leaves varies from one tiny training to the
    # next (a fifth to nearly all of them were measured), so the test asks for enough of them to say something.
    clear = (top2[:, 0] - top2[:, 1]) > 0.1
    assert clear.sum() >= 1000, f"only {int(clear.sum())} clear voxels: too few for this test to say anything"
    agree = int8.argmax(1) == reference.argmax(1)
    assert agree[clear].float().mean() >= 0.995
    assert (reference.argmax(1)[clear] > 0).any()  # foreground among the clear voxels, not background alone


def test_tta_of_a_mirror_symmetric_network_equals_the_plain_prediction() -> None:
    network = symmetric_conv(0, symmetric=True)
    image = torch.randn(2, 1, 12, 10, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = ProbabilityAverage([network])(image)
        mirrored = ProbabilityAverage([network], tta="flip")(image)
    torch.testing.assert_close(mirrored, plain, atol=1e-6, rtol=1e-5)


def test_tta_differs_from_plain_for_an_asymmetric_network() -> None:
    network = symmetric_conv(0, symmetric=False)
    image = torch.randn(2, 1, 12, 10, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = ProbabilityAverage([network])(image)
        mirrored = ProbabilityAverage([network], tta="flip")(image)
    assert (mirrored - plain).abs().max() > 0.05
    assert (mirrored.argmax(1) != plain.argmax(1)).float().mean() > 0.01


def test_tta_label_maps_equal_plain_ones_for_a_symmetric_network_on_a_mirror_symmetric_image(tmp_path: Path) -> None:
    volume = np.random.default_rng(0).normal(size=(20, 18, 16)).astype(np.float32)
    for axis in range(3):
        volume = volume + np.flip(volume, axis)  # mirror-symmetric on every axis
    image = tmp_path / "images" / "symmetric.nii.gz"
    image.parent.mkdir()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), image)
    preset = dataclasses.replace(get_preset("PhantomMRI"), patch_size=(16, 16, 16))
    for symmetric, equal in ((True, True), (False, False)):
        network = symmetric_conv(3, symmetric=symmetric)
        (plain,) = predict(network, preset, image, tmp_path / f"plain{symmetric}", progress=False)
        (mirrored,) = predict(network, preset, image, tmp_path / f"tta{symmetric}", tta="flip", progress=False)
        same = (labels_of(plain) == labels_of(mirrored)).mean()
        assert same == 1.0 if equal else same < 0.99


def test_an_ensemble_of_one_run_equals_that_run_and_of_two_identical_runs_equals_one(
    trained_run, images: list[Path], tmp_path: Path
) -> None:
    run_dir, _ = trained_run
    twin = shutil.copytree(run_dir, tmp_path / "twin", ignore=shutil.ignore_patterns("deploy", "predictions"))
    single = predict_run(run_dir, images, tmp_path / "single", progress=False)
    one = predict_runs([run_dir], images, tmp_path / "one", progress=False)
    two = predict_runs([run_dir, twin], images, tmp_path / "two", progress=False)
    for a, b, c in zip(single, one, two):
        np.testing.assert_array_equal(labels_of(a), labels_of(b))
        np.testing.assert_array_equal(labels_of(a), labels_of(c))
    # A different run changes the ensemble: the test can tell runs apart.
    other = shutil.copytree(run_dir, tmp_path / "other", ignore=shutil.ignore_patterns("deploy", "predictions"))
    weights = torch.load(other / "models" / "model.pt", weights_only=True)
    weights["model"] = {k: (v.flip(0) if v.is_floating_point() and v.ndim > 1 else v) for k, v in weights["model"].items()}
    torch.save(weights, other / "models" / "model.pt")
    mixed = predict_runs([run_dir, other], images[:1], tmp_path / "mixed", progress=False)
    assert (labels_of(mixed[0]) != labels_of(single[0])).any()


def test_an_ensemble_of_runs_with_different_presets_is_refused(trained_run, images: list[Path], tmp_path: Path) -> None:
    run_dir, _ = trained_run
    other = shutil.copytree(run_dir, tmp_path / "other", ignore=shutil.ignore_patterns("deploy", "predictions"))
    record = read_run_record(other)
    preset = dataclasses.replace(record.preset, labels={0: "background", 1: "organ", 2: "tumour"})
    write_run_record(dataclasses.replace(record, preset=preset), other)
    with pytest.raises(MedunetError, match="labels.*Fix: ensemble only runs"):
        predict_runs([run_dir, other], images, tmp_path / "pred", progress=False)


def test_cli_infer_with_engine_tta_and_two_runs(trained_run, images: list[Path], tmp_path: Path, capsys) -> None:
    run_dir, _ = trained_run
    code = main(["infer", "--run-dir", str(run_dir), str(run_dir), "--input", *map(str, images[:2]),
                 "--output", str(tmp_path / "pred"), "--engine", "onnx", "--tta", "flip", "--threads", "1",
                 "--no-tracking"])
    assert code == 0
    assert "wrote 2 prediction(s)" in capsys.readouterr().out
    assert main(["infer", "--run-dir", str(run_dir), "--input", str(images[0]), "--engine", "tensorrt"]) == 2


@pytest.mark.slow
def test_torchrun_shards_cases_across_ranks_each_written_once_and_rerun_skips(trained_run, tmp_path: Path) -> None:
    run_dir, task_dir = trained_run
    inputs = task_dir / "imagesTr"
    output = tmp_path / "pred"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "medunet", "infer", "--run-dir", str(run_dir), "--input", str(inputs), "--output", str(output),
               "--no-tracking", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # The ranks share one stdout: read their reports wherever the lines landed.
    reports = dict(re.findall(r"rank (\d)/2: wrote (\d+) prediction", result.stdout))
    assert sorted(reports) == ["0", "1"] and [int(reports[r]) for r in "01"] == [3, 3], result.stdout[-2000:]
    names = sorted(p.name for p in output.iterdir())
    assert names == sorted(p.name for p in inputs.iterdir())  # every case once, no temporaries
    again = subprocess.run(command, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert again.returncode == 0 and again.stdout.count("wrote 0 prediction(s)") == 2


# -- whole-volume memory budget ---------------------------------------------------------------------------
BUDGET_DRIVER = """
import json, sys
import torch
from medunet.data import get_preset
from medunet.deploy.memory import peak_resident_bytes
from medunet.engines.inference import predict
from medunet.errors import MedunetError
torch.manual_seed(0)
network = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(8, 3, 3, padding=1))
try:
    predict(network, get_preset("PhantomCT"), sys.argv[1], sys.argv[2], memory_budget=int(sys.argv[3]),
            sw_batch_size=4, progress=False)
except MedunetError as error:
    print(json.dumps({"error": str(error)}))
else:
    print(json.dumps({"peak": peak_resident_bytes()}))
"""


def run_budget(image: Path, output: Path, budget: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "-c", BUDGET_DRIVER, str(image), str(output), str(budget)],
                            env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def test_parse_memory_size_and_a_too_small_budget_names_the_smallest_feasible(tmp_path: Path) -> None:
    from medunet.data import make_phantom_task
    from medunet.deploy.memory import parse_memory_size

    assert parse_memory_size("2GiB") == 2 * 2**30 and parse_memory_size("1.5G") == 1_500_000_000
    with pytest.raises(MedunetError, match="not a memory size"):
        parse_memory_size("lots")
    task = make_phantom_task(tmp_path / "task", kind="ct", num_cases=1, num_test=0, size=(40, 36, 20))
    image = task / "imagesTr" / "phantom_000.nii.gz"
    with pytest.raises(MedunetError, match=r"smallest feasible budget is about [\d.]+[MG]iB.*Fix: pass --memory-budget"):
        predict(symmetric_conv(0, False), get_preset("PhantomCT"), image, tmp_path / "pred",
                memory_budget=parse_memory_size("1MiB"), progress=False)
    assert main(["infer", "--run-dir", str(tmp_path), "--input", str(image), "--memory-budget", "2 lots"]) == 2


@pytest.mark.slow
def test_memory_budget_keeps_the_measured_peak_under_three_budgets(tmp_path: Path) -> None:
    import re

    from medunet.data import make_phantom_task
    from medunet.deploy.memory import parse_memory_size

    task = make_phantom_task(tmp_path / "task", kind="ct", num_cases=1, num_test=0, size=(200, 200, 80))
    image = task / "imagesTr" / "phantom_000.nii.gz"
    refused = run_budget(image, tmp_path / "none", 2**20)
    smallest = parse_memory_size(re.search(r"smallest feasible budget is about (\S+) ", refused["error"]).group(1))
    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv3d(8, 3, 3, padding=1))
    (plain,) = predict(network, get_preset("PhantomCT"), image, tmp_path / "plain", sw_batch_size=4, progress=False)
    for budget in (smallest, smallest + 64 * 2**20, 2 * smallest):
        result = run_budget(image, tmp_path / f"budget{budget}", budget)
        assert "error" not in result, result
        assert result["peak"] <= budget, (result["peak"] / 2**20, budget / 2**20)
        written = tmp_path / f"budget{budget}" / image.name
        assert (labels_of(written) == labels_of(plain)).mean() >= 0.999


def test_onnx_engine_matches_torch_on_real_hippocampus_cases(
    hippocampus_dir: Path, trained_run: tuple[Path, Path], tmp_path: Path
) -> None:
    # The phantom-trained network (MRI, 1 channel, 3 labels) under the Task04 preset: varied labels on real cases.
    run_dir = shutil.copytree(trained_run[0], tmp_path / "run", ignore=shutil.ignore_patterns("deploy", "predictions"))
    record = read_run_record(run_dir)
    write_run_record(dataclasses.replace(record, preset=get_preset("Task04_Hippocampus")), run_dir)
    images = sorted((hippocampus_dir / "imagesTr").iterdir())[:3]
    torch_files = predict_run(run_dir, images, tmp_path / "torch", progress=False)
    onnx_files = predict_runs([run_dir], images, tmp_path / "onnx", engine="onnx", progress=False)
    for a, b in zip(torch_files, onnx_files):
        assert labels_of(a).shape == nib.load(hippocampus_dir / "imagesTr" / a.name).shape
        assert len(np.unique(labels_of(a))) > 1  # not a constant map, which any engine would match
        assert (labels_of(a) == labels_of(b)).mean() >= 0.999
