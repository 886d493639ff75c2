"""``medunet export-deploy``: the folder segments whole volumes with onnxruntime, numpy and nibabel only, and its
numpy preprocessing, stitching and inversion reproduce medunet's MONAI inference chain."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.bundle.onnx import export_onnx
from medunet.cli import main
from medunet.data import get_preset, infer_transforms, make_phantom_task
from medunet.deploy import deploy_plan, export_deploy, runner
from medunet.engines.inference import predict, predict_run
from medunet.errors import MedunetError
from medunet.run_folder import CONFIG_FILE
from tests.deploy_helpers import train_tiny_run

# Runs a script with torch, MONAI and medunet made unimportable: the runner must not need them.
NO_TORCH = textwrap.dedent("""
    import runpy, sys
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "monai", "medunet"):
                raise ImportError(f"{name} is not allowed in the deployment runner")
    sys.meta_path.insert(0, Refuse())
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
""")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


class SoftThreshold(torch.nn.Module):
    """A fixed, exportable 'network': label 1 where the preprocessed image is above 0.5, label 2 nowhere."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        foreground = torch.sigmoid((image[:, :1] - 0.5) * 40.0)
        return torch.cat([1.0 - foreground, foreground, torch.zeros_like(foreground) - 1.0], dim=1) * 4.0


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_tiny_run(tmp_path_factory.mktemp("deploy"))


@pytest.fixture(scope="module")
def deployment(trained_run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir, _ = trained_run
    return export_deploy(run_dir, tmp_path_factory.mktemp("out") / "deploy").folder


@pytest.mark.parametrize("kind, preset_name", [("ct", "PhantomCT"), ("mri", "PhantomMRI")])
def test_runner_preprocessing_equals_the_monai_inference_chain(kind: str, preset_name: str, tmp_path: Path) -> None:
    # CT phantoms: anisotropic voxels, x/y flipped and rotated about z, resampled, windowed and cropped.
    task = make_phantom_task(tmp_path / "task", kind=kind, num_cases=2, num_test=0, size=(40, 36, 20))
    preset = get_preset(preset_name)
    plan = deploy_plan(preset, {"roi_size": preset.patch_size, "overlap": 0.5, "sw_batch_size": 2}, None, False)
    for image in sorted((task / "imagesTr").iterdir()):
        expected = infer_transforms(preset)({"image": str(image)})["image"].numpy()
        array, affine = runner.read_image(image)
        got, _ = runner.preprocess(array, affine, plan)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_runner_stitching_equals_monai_sliding_window_inference() -> None:
    from monai.inferers import SlidingWindowInferer

    generator = torch.Generator().manual_seed(0)
    network = torch.nn.Conv3d(2, 3, 3, padding=1).eval()
    volume = torch.rand(1, 2, 37, 30, 23, generator=generator)
    with torch.no_grad():
        probabilities = SlidingWindowInferer((16, 16, 16), sw_batch_size=3, overlap=0.5, mode="gaussian")(
            volume, lambda x: torch.softmax(network(x), dim=1))
        labels = runner.sliding_window_labels(volume[0].numpy(), lambda x: network(torch.from_numpy(x)).numpy(),
                                              (16, 16, 16), num_classes=3, overlap=0.5, batch_size=3)
    np.testing.assert_array_equal(labels, probabilities[0].argmax(0).numpy())


def test_runner_inverts_crop_spacing_and_orientation_like_medunet_infer(tmp_path: Path) -> None:
    task = make_phantom_task(tmp_path / "task", kind="ct", num_cases=2, num_test=0, size=(40, 36, 20))
    preset = get_preset("PhantomCT")
    folder = tmp_path / "deploy"
    export_onnx(SoftThreshold(), folder / "model.onnx", (1, 1, *preset.patch_size))
    plan = deploy_plan(preset, {"roi_size": preset.patch_size, "overlap": 0.5, "sw_batch_size": 2}, None, False)
    (folder / runner.PLAN_FILE).write_text(json.dumps(plan), encoding="utf-8")
    for image in sorted((task / "imagesTr").iterdir()):
        (expected,) = predict(SoftThreshold(), preset, image, tmp_path / "torch", progress=False)
        got = runner.segment(image, tmp_path / "runner" / image.name, folder=folder, quiet=True)
        original = nib.load(image)
        assert nib.load(got).shape == original.shape
        np.testing.assert_allclose(nib.load(got).affine, original.affine, atol=1e-4)
        assert (labels_of(got) == labels_of(expected)).mean() >= 0.999
        assert (labels_of(got) == 1).sum() > 50  # the organ is found, not an empty map


def test_export_deploy_folder_is_complete_and_works_where_it_is_copied(
    trained_run: tuple[Path, Path], deployment: Path, tmp_path: Path
) -> None:
    run_dir, task_dir = trained_run
    names = {p.name for p in deployment.iterdir()}
    assert {"model.onnx", "model.int8.onnx", "plan.json", "run.py", "requirements.txt", "README.md"} <= names
    assert not [name for name in names if name.startswith(".")]  # no temporaries left
    plan = json.loads((deployment / "plan.json").read_text(encoding="utf-8"))
    assert plan["labels"] == {"0": "background", "1": "organ", "2": "lesion"}
    assert plan["sliding_window"]["roi_size"] == [16, 16, 16]
    lines = (deployment / "requirements.txt").read_text(encoding="utf-8").splitlines()
    packages = {line.split(">=")[0] for line in lines if line and not line.startswith("#")}
    assert packages == {"onnxruntime", "numpy", "nibabel"}

    copied = shutil.copytree(deployment, tmp_path / "elsewhere" / "model")
    image = sorted((task_dir / "imagesTr").iterdir())[0]
    (expected,) = predict_run(run_dir, image, tmp_path / "torch", progress=False)
    for flag in ([], ["--int8"]):
        output = tmp_path / f"pred{''.join(flag)}.nii.gz"
        result = subprocess.run([sys.executable, "-c", NO_TORCH, str(copied / "run.py"), "--input", str(image),
                                 "--output", str(output), "--threads", "1", *flag],
                                cwd=tmp_path, env=ENV, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)
        assert result.returncode == 0, result.stderr
        assert nib.load(output).shape == nib.load(image).shape
        np.testing.assert_allclose(nib.load(output).affine, nib.load(image).affine, atol=1e-4)
        agreement = (labels_of(output) == labels_of(expected)).mean()
        # int8 moves near-tied logits, and this 30-step network has many: repeated runs on 2026-12-07 gave 0.969, 0.978
        # and above 0.98 (the figure varies from run to run); a broken quantization agrees far less.
        assert agreement >= (0.999 if not flag else 0.95), agreement


def test_int8_model_is_quantized_and_agrees_with_fp32_on_its_calibration_windows(trained_run, tmp_path: Path) -> None:
    import onnx

    result = export_deploy(trained_run[0], tmp_path / "deploy")
    model = onnx.load(str(result.files["int8"]))
    operators = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= operators  # QDQ format
    assert result.calibration_windows > 0
    assert result.int8_window_agreement is not None and result.int8_window_agreement > 0.95


def test_export_without_calibration_data_names_the_fix(trained_run, tmp_path: Path) -> None:
    run_dir, _ = trained_run
    moved = shutil.copytree(run_dir, tmp_path / "run")
    config = json.loads((moved / CONFIG_FILE).read_text(encoding="utf-8"))
    config["dataset_dir"] = str(tmp_path / "gone")
    (moved / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(MedunetError, match="calibration-images"):
        export_deploy(moved, tmp_path / "deploy")
    assert not (tmp_path / "deploy").exists()  # nothing half-made
    assert main(["export-deploy", str(moved), str(tmp_path / "deploy"), "--no-int8"]) == 0
    assert not (tmp_path / "deploy" / "model.int8.onnx").exists()
    # A later export that fails after the fp32 model was made leaves the deployment that works, byte for byte.
    (tmp_path / "deploy" / "notes.txt").write_text("mine", encoding="utf-8")
    before = {p.name: p.read_bytes() for p in (tmp_path / "deploy").iterdir()}
    with pytest.raises(MedunetError, match="calibration-images"):
        export_deploy(moved, tmp_path / "deploy", opset=18)  # another graph than the working one
    assert {p.name: p.read_bytes() for p in (tmp_path / "deploy").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deploy", "run"]  # no build folder left
    assert main(["export-deploy", str(moved), str(tmp_path / "deploy"), "--no-int8"]) == 0
    assert (tmp_path / "deploy" / "notes.txt").read_text(encoding="utf-8") == "mine"  # a user's file is kept


def test_runner_refuses_a_missing_input_in_one_line(deployment: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(deployment / "run.py"), "--input", str(tmp_path / "none.nii.gz"),
                             "--output", str(tmp_path / "p.nii.gz")], env=ENV, capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Fix:" in result.stderr


def _plan(preset_name: str = "PhantomCT") -> dict:
    window = {"roi_size": [32, 32, 32], "overlap": 0.25, "sw_batch_size": 2}
    return json.loads(json.dumps(deploy_plan(get_preset(preset_name), window, "lunet_small_2f", int8=True)))


HOSTILE_PLANS = {  # field path, value, the words of the refusal
    "model outside the folder": (("models", "fp32"), "../../elsewhere/model.onnx", "models.fp32"),
    "model by absolute path": (("models", "int8"), "/tmp/model.onnx", "models.int8"),
    "NaN overlap": (("sliding_window", "overlap"), float("nan"), "sliding_window.overlap"),
    "overlap of one": (("sliding_window", "overlap"), 1.0, "sliding_window.overlap"),
    "string roi": (("sliding_window", "roi_size"), "32", "sliding_window.roi_size"),
    "zero spacing": (("target_spacing",), [1.0, 0.0, 1.0], "target_spacing"),
    "inverted window": (("intensity", "window"), [400, -100], "intensity.window"),
    "unknown normalisation": (("intensity", "kind"), "exec", "intensity.kind"),
    "infinite fill": (("non_finite_fill",), float("inf"), "non_finite_fill"),
    "more classes than labels": (("out_channels",), 7, "out_channels"),
    "label names not a mapping": (("labels",), ["background", "organ"], "labels"),
}


@pytest.mark.parametrize("preset_name", ["PhantomCT", "PhantomMRI"])
def test_the_plans_export_deploy_writes_pass_the_runners_check(preset_name: str) -> None:
    runner.check_plan(_plan(preset_name), "plan.json")


@pytest.mark.parametrize("case", HOSTILE_PLANS)
def test_a_plan_with_a_value_export_deploy_never_writes_is_refused_naming_the_field(case: str) -> None:
    path, value, field = HOSTILE_PLANS[case]
    plan = _plan()
    target = plan
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(runner.DeployError, match=rf"plan\.json: {field.replace('.', chr(92) + '.')} is .*expected .*Fix: "
                                                 "export the folder again"):
        runner.check_plan(plan, "plan.json")


def test_the_runner_refuses_a_planted_plan_in_one_line_before_loading_any_model(deployment: Path,
                                                                                tmp_path: Path) -> None:
    copied = Path(shutil.copytree(deployment, tmp_path / "copied"))
    plan = json.loads((copied / "plan.json").read_text(encoding="utf-8"))
    plan["models"]["fp32"] = "../../../../tmp/planted.onnx"
    (copied / "plan.json").write_text(json.dumps(plan), encoding="utf-8")
    result = subprocess.run([sys.executable, str(copied / "run.py"), "--input", str(tmp_path / "any.nii.gz"),
                             "--output", str(tmp_path / "p.nii.gz")], env=ENV, capture_output=True, text=True,
                            encoding="utf-8", errors="replace")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "models.fp32 is '../../../../tmp/planted.onnx'; expected a file name inside the deployment folder" in result.stderr
    (copied / "plan.json").write_text('{"format": "medunet-deploy", "version": 1, "labels": NaN', encoding="utf-8")
    result = subprocess.run([sys.executable, str(copied / "run.py"), "--input", str(tmp_path / "any.nii.gz"),
                             "--output", str(tmp_path / "p.nii.gz")], env=ENV, capture_output=True, text=True,
                            encoding="utf-8", errors="replace")
    assert result.returncode == 2 and "is not valid JSON" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_deployment_runs_in_a_virtual_environment_without_torch(trained_run, deployment: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(deployment / "requirements.txt")],
                   check=True, timeout=600)
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    image = sorted((trained_run[1] / "imagesTr").iterdir())[0]
    output = tmp_path / "pred.nii.gz"
    subprocess.run([str(python), str(deployment / "run.py"), "--input", str(image), "--output", str(output),
                    "--int8"], check=True, env=ENV, timeout=120, cwd=tmp_path)
    assert nib.load(output).shape == nib.load(image).shape
