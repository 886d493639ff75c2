"""``medunet export-bundle``: a real training run becomes a MONAI bundle that MONAI's own tools accept.

One short real run (``SegmentationTraining``, one epoch on phantoms) is exported once per module with the CLI;
the bundle is then driven with ``python -m monai.bundle`` subprocesses exactly as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.bundle import check_metadata, preprocessing_config, read_run
from medunet.cli import main as medunet_main
from medunet.data import get_preset, load_task, preset_for_task, val_transforms
from medunet.engines import SegmentationTraining
from medunet.engines.demo import prepare_phantom
from medunet.errors import MedunetError
from medunet.networks import create_network
from medunet.run_folder import CONFIG_FILE
from tests.bundle_helpers import monai_bundle

pytestmark = pytest.mark.slow  # a short real training run and monai.bundle subprocesses

NETWORK = "lunet_small_2f"



@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train one epoch with the real training builder, then ``medunet export-bundle RUN_DIR OUT_DIR``."""
    work = tmp_path_factory.mktemp("export")
    task = work / "Task90_PhantomCT"
    datalist = prepare_phantom(task, num_cases=5, size=(48, 48, 32))
    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3}
    SegmentationTraining(
        work / "run", task, datalist, 0, create_network(NETWORK, **args), preset=preset_for_task(load_task(task)),
        network_name=NETWORK, network_args=args, max_epochs=1, num_samples=1, progress=False,
    ).run()
    assert medunet_main(["export-bundle", str(work / "run"), str(work / "bundle"), "--authors", "medunet tests"]) == 0
    return {"work": work, "task": task, "run": work / "run", "bundle": work / "bundle"}


def test_bundle_has_the_model_zoo_layout(exported: dict[str, Path]) -> None:
    bundle = exported["bundle"]
    for name in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/evaluate.json",
                 "models/model.pt", "models/model.ts", "docs/README.md", "LICENSE"):
        assert (bundle / name).is_file(), name
    assert set(torch.load(bundle / "models" / "model.pt", weights_only=True)) == {"model"}


def test_metadata_meets_the_specification_and_states_efficiency(exported: dict[str, Path]) -> None:
    metadata = json.loads((exported["bundle"] / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert check_metadata(metadata) == []
    efficiency = metadata["efficiency"]
    network = create_network(NETWORK, spatial_dims=3, in_channels=1, out_channels=3)
    assert efficiency["parameters"] == sum(p.numel() for p in network.parameters())
    assert efficiency["input_shape"] == [1, 1, 32, 32, 32]  # the bundle's ROI (PhantomCT patch)
    assert efficiency["multiply_adds"] > efficiency["parameters"]
    assert efficiency["peak_inference_memory_bytes"] > 0
    pred = metadata["network_data_format"]["outputs"]["pred"]
    assert pred["channel_def"] == {"0": "background", "1": "organ", "2": "lesion"}
    record = json.loads((exported["run"] / "metrics.json").read_text(encoding="utf-8"))
    assert metadata["eval_metrics"]["val_mean_dice"] == pytest.approx(record["best_metric"], abs=1e-4)
    card = (exported["bundle"] / "docs" / "README.md").read_text(encoding="utf-8")
    for section in ("## Intended use", "## Data", "## Metrics", "## Efficiency", "2,575"):
        assert section in card
    # A class the run lost is stated with the metrics (the tiny run may or may not have lost one).
    lost = metadata["eval_metrics"].get("lost_classes")
    assert (lost is not None) == bool(record["lost_classes"])
    assert lost is None or (lost.startswith(", ".join(record["lost_classes"])) and f"| lost_classes | {lost} |" in card)


def test_verify_net_in_out_and_ckpt_export_accept_the_bundle(exported: dict[str, Path]) -> None:
    bundle = exported["bundle"]
    meta, inference = str(bundle / "configs" / "metadata.json"), str(bundle / "configs" / "inference.json")
    monai_bundle("verify_net_in_out", "network_def", "--meta_file", meta, "--config_file", inference,
                 cwd=exported["work"])
    monai_bundle("ckpt_export", "network_def", "--filepath", str(exported["work"] / "again.ts"),
                 "--ckpt_file", str(bundle / "models" / "model.pt"), "--meta_file", meta,
                 "--config_file", inference, "--key_in_ckpt", "model", "--bundle_root", str(bundle),
                 cwd=exported["work"])
    x = torch.rand(1, 1, 32, 32, 32)
    ours, again = torch.jit.load(str(bundle / "models" / "model.ts")), torch.jit.load(str(exported["work"] / "again.ts"))
    torch.testing.assert_close(ours(x), again(x))


def test_inference_config_writes_predictions_with_the_inputs_shape_and_affine(exported: dict[str, Path]) -> None:
    images = exported["task"] / "imagesTs"
    out = exported["work"] / "predictions"
    monai_bundle("run", "--config_file", str(exported["bundle"] / "configs" / "inference.json"),
                 "--bundle_root", str(exported["bundle"]), "--dataset_dir", str(images), "--output_dir", str(out),
                 cwd=exported["work"])
    inputs = sorted(images.glob("*.nii.gz"))
    assert inputs
    for image_file in inputs:
        image = nib.load(image_file)
        prediction = nib.load(out / image_file.name.replace(".nii.gz", "_seg.nii.gz"))
        assert prediction.shape == image.shape
        np.testing.assert_allclose(prediction.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}


def test_train_and_evaluate_configs_parse_into_monai_engines(exported: dict[str, Path]) -> None:
    from monai.bundle import ConfigParser
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    configs = exported["bundle"] / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    parser.update({"bundle_root": str(exported["bundle"]), "dataset_dir": str(exported["task"])})
    assert isinstance(parser.get_parsed_content("train#trainer"), SupervisedTrainer)
    assert isinstance(parser.get_parsed_content("validate#evaluator"), SupervisedEvaluator)
    assert parser.get_parsed_content("network_def").__class__.__name__ == "LUNet"


@pytest.mark.parametrize("preset_name", ["PhantomCT", "Task04_Hippocampus"])
def test_bundle_preprocessing_matches_medunets_validation_chain(exported: dict[str, Path], preset_name: str) -> None:
    from monai.bundle import ConfigParser

    preset = get_preset(preset_name)
    case = {"image": str(exported["task"] / "imagesTr" / "phantom_000.nii.gz"),
            "label": str(exported["task"] / "labelsTr" / "phantom_000.nii.gz")}
    parser = ConfigParser({"chain": {"_target_": "Compose", "transforms": preprocessing_config(preset, ["image", "label"])}})
    ours, medunets = parser.get_parsed_content("chain")(dict(case)), val_transforms(preset)(dict(case))
    for key in ("image", "label"):
        torch.testing.assert_close(ours[key].as_tensor(), medunets[key].as_tensor())
        np.testing.assert_allclose(ours[key].affine, medunets[key].affine)


def test_export_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(MedunetError, match="config.json does not exist"):
        read_run(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"task": "PhantomCT", "network": {"name": NETWORK}}), encoding="utf-8")
    with pytest.raises(MedunetError, match="models/model.pt does not exist"):
        read_run(tmp_path)


def test_export_onnx_matches_pytorch(exported: dict[str, Path]) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    out = exported["work"] / "model.onnx"
    assert medunet_main(["export-onnx", str(exported["run"]), str(out)]) == 0
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    run = read_run(exported["run"])
    network = run.build_network()
    network.load_state_dict(torch.load(exported["run"] / "models" / "model.pt", weights_only=True)["model"])
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        expected = network.eval()(x).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x.numpy()})[0], expected, atol=1e-4)
