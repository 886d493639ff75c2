"""A medunet network replaces ``network_def`` in a standard MONAI bundle and trains, evaluates, infers and
exports there, all through ``python -m monai.bundle`` (the README's worked example, on phantoms).

The bundle is ``tests/bundles/phantom_seg`` (model-zoo layout, MONAI components only, a MONAI UNet by default);
``--bundle_root`` points at a temporary folder so checkpoints and predictions never land in the repository.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from medunet.data import make_phantom_task
from medunet.networks import LUNet, create_network
from tests.bundle_helpers import monai_bundle

pytestmark = pytest.mark.slow  # real monai.bundle subprocesses and a short training run

BUNDLE = Path(__file__).parent / "bundles" / "phantom_seg"
NETWORK = {"_target_": "medunet.networks.create_network", "name": "lunet_small_2f",
           "spatial_dims": 3, "in_channels": 1, "out_channels": 3}
# The same network written inline with its class: lunet_small_2f is LUNet with features=2.
INLINE_NETWORK = "{'_target_': 'medunet.networks.LUNet', 'spatial_dims': 3, 'in_channels': 1, 'out_channels': 3, 'features': 2}"



@pytest.fixture(scope="module")
def plugged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Train the standard bundle for one epoch with a medunet network, tracked in a SQLite MLflow store."""
    work = tmp_path_factory.mktemp("plugin")
    task = make_phantom_task(work / "Task90_PhantomCT", kind="ct", num_cases=3, num_test=1, size=(48, 48, 32))
    (work / "override.json").write_text(json.dumps({"network_def": NETWORK}), encoding="utf-8")
    root = work / "bundle_root"
    root.mkdir()
    store = f"sqlite:///{work / 'mlflow.db'}"
    monai_bundle(
        "run", "--config_file", str(BUNDLE / "configs" / "train.json"), "--bundle_root", str(root),
        "--dataset_dir", str(task), "--network_def", "%override.json#network_def", "--max_epochs", "1",
        "--tracking", "mlflow", "--tracking_uri", store, "--experiment_name", "phantom_seg_plugin",
        cwd=work, tracking_uri=store,
    )
    return {"work": work, "task": task, "root": root, "store": store}


def test_training_in_a_standard_bundle_saves_the_medunet_network(plugged: dict[str, Any]) -> None:
    checkpoint = torch.load(plugged["root"] / "models" / "model.pt", map_location="cpu", weights_only=True)
    weights = checkpoint.get("model", checkpoint)
    network = create_network("lunet_small_2f", spatial_dims=3, in_channels=1, out_channels=3)
    network.load_state_dict(weights)  # strict: every key of the LUNet, none of the bundle's MONAI UNet
    assert isinstance(network, LUNet)


def test_training_is_tracked_in_the_sqlite_mlflow_store(plugged: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=plugged["store"])
    experiment = client.get_experiment_by_name("phantom_seg_plugin")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert "train_loss" in run.data.metrics and "val_mean_dice" in run.data.metrics
    assert 0.0 <= run.data.metrics["val_mean_dice"] <= 1.0


def test_evaluate_config_scores_the_trained_medunet_network(plugged: dict[str, Any]) -> None:
    configs = f"['{BUNDLE / 'configs' / 'train.json'}','{BUNDLE / 'configs' / 'evaluate.json'}']"
    monai_bundle("run", "--config_file", configs, "--bundle_root", str(plugged["root"]),
                 "--dataset_dir", str(plugged["task"]), "--network_def", "%override.json#network_def",
                 cwd=plugged["work"])
    per_case = (plugged["root"] / "eval" / "val_mean_dice_raw.csv").read_text(encoding="utf-8").splitlines()
    assert len(per_case) == 2  # header + the one validation case
    assert "phantom_002" in per_case[1]


def test_inference_config_writes_label_maps_on_the_input_grid(plugged: dict[str, Any]) -> None:
    # The inline form of the override: the same network written as a dict on the command line.
    out = plugged["work"] / "predictions"
    monai_bundle("run", "--config_file", str(BUNDLE / "configs" / "inference.json"),
                 "--bundle_root", str(plugged["root"]), "--dataset_dir", str(plugged["task"]),
                 "--network_def", INLINE_NETWORK, "--output_dir", str(out), cwd=plugged["work"])
    image = nib.load(plugged["task"] / "imagesTs" / "phantom_003.nii.gz")
    prediction = nib.load(out / "phantom_003_seg.nii.gz")
    assert prediction.shape == image.shape
    np.testing.assert_allclose(prediction.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(prediction.dataobj))) <= {0, 1, 2}


def test_ckpt_export_and_verify_net_in_out_accept_the_medunet_network(plugged: dict[str, Any]) -> None:
    work, root = plugged["work"], plugged["root"]
    configs = BUNDLE / "configs"
    monai_bundle("verify_net_in_out", "network_def", "--meta_file", str(configs / "metadata.json"),
                 "--config_file", str(configs / "inference.json"), "--network_def", "%override.json#network_def",
                 cwd=work)
    monai_bundle("ckpt_export", "network_def", "--filepath", str(root / "models" / "model.ts"),
                 "--ckpt_file", str(root / "models" / "model.pt"), "--meta_file", str(configs / "metadata.json"),
                 "--config_file", str(configs / "inference.json"), "--bundle_root", str(root),
                 "--network_def", "%override.json#network_def", cwd=work)
    scripted = torch.jit.load(str(root / "models" / "model.ts"))
    network = create_network("lunet_small_2f", spatial_dims=3, in_channels=1, out_channels=3)
    checkpoint = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    network.load_state_dict(checkpoint.get("model", checkpoint))
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), network.eval()(x), atol=1e-5, rtol=1e-4)
