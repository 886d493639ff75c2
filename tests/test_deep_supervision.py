"""Deep supervision of the U-Net skeleton: heads in training only, the loss that weighs them, a real training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from medunet.bundle.onnx import export_onnx
from medunet.engines.config import build_overrides, run_workflow
from medunet.engines.demo import prepare_phantom
from medunet.engines.losses import StackedDeepSupervisionLoss, deep_supervision_heads
from medunet.errors import MedunetError
from medunet.networks import create_network
from medunet.paths import REPO_ROOT
from medunet.run_folder import CONFIG_FILE, load_trained_network, read_run_record

# One per family and skip strategy: conv (full and unshuffle stem), OneNet_ed, NAFNet, UNet--.
NETWORKS = ["lunet_small_2f", "lunet_small_8f_unshuffle", "onenet_ed4_8f", "nafnet_w8_light",
            "unetmm_lunet_small_8f_coarsest"]
SHAPE = (2, 1, 20, 36, 28)  # not a multiple of 16: the padding and crop are exercised too


def _pair(name: str, heads: int, out_channels: int = 3) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = create_network(name, spatial_dims=3, in_channels=1, out_channels=out_channels)
    torch.manual_seed(0)
    supervised = create_network(name, spatial_dims=3, in_channels=1, out_channels=out_channels, deep_supervision=heads)
    missing = supervised.load_state_dict(plain.state_dict(), strict=False)
    assert not missing.unexpected_keys and all(key.startswith("ds_heads.") for key in missing.missing_keys)
    return plain, supervised


@pytest.mark.parametrize("name", NETWORKS)
def test_heads_add_only_their_parameters_and_leave_the_eval_output_unchanged(name: str) -> None:
    plain, supervised = _pair(name, heads=2)
    head_params = sum(p.numel() for p in supervised.ds_heads.parameters())
    assert head_params > 0
    assert sum(p.numel() for p in supervised.parameters()) == sum(p.numel() for p in plain.parameters()) + head_params
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert torch.equal(supervised.eval()(x), plain.eval()(x))  # heads are not run at inference
    assert deep_supervision_heads(supervised) == 2 and deep_supervision_heads(plain) == 0


@pytest.mark.parametrize("name", NETWORKS)
def test_training_mode_stacks_the_main_logits_and_one_output_per_decoder_level(name: str) -> None:
    plain, supervised = _pair(name, heads=2)
    x = torch.randn(SHAPE)
    stacked = supervised.train()(x)
    assert stacked.shape == (SHAPE[0], 3, 3, *SHAPE[2:])
    assert torch.allclose(stacked[:, 0], plain.train()(x), atol=1e-5)  # the main output is the plain network's
    # Each auxiliary output is a coarse map upsampled by nearest neighbours: constant over (at least) 2x2x2 blocks.
    level1 = stacked[:, 1].detach()
    assert not torch.allclose(level1, stacked[:, 0].detach())
    assert torch.equal(level1[..., 0::2, 0::2, 0::2], level1[..., 1::2, 1::2, 1::2])
    stacked.float().mean().backward()
    assert all(p.grad is not None for p in supervised.ds_heads.parameters())  # the heads are trained


def test_torchscript_and_onnx_exports_in_eval_mode_have_the_plain_graph(tmp_path: Path) -> None:
    plain, supervised = _pair("lunet_small_2f", heads=3)
    supervised.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    scripted = torch.jit.script(supervised)  # the training branch compiles too: one tensor in both modes
    with torch.no_grad():
        assert torch.allclose(scripted(x), plain.eval()(x), atol=1e-5)
        assert scripted(x).shape == (1, 3, 32, 32, 32)
    onnx = pytest.importorskip("onnx")
    exported = export_onnx(supervised, tmp_path / "supervised.onnx", (1, 1, 32, 32, 32))
    reference = export_onnx(plain, tmp_path / "plain.onnx", (1, 1, 32, 32, 32))
    graph, plain_graph = onnx.load(str(exported.path)).graph, onnx.load(str(reference.path)).graph
    assert len(graph.output) == 1 and list(graph.output[0].type.tensor_type.shape.dim)[1].dim_value == 3
    assert len(graph.node) == len(plain_graph.node)  # no head is run: the same operators
    weights = sum(int(np.prod(t.dims)) for t in graph.initializer)
    assert weights == sum(int(np.prod(t.dims)) for t in plain_graph.initializer)  # the heads' weights are dropped


def test_too_many_heads_are_refused_with_the_range_that_works() -> None:
    with pytest.raises(MedunetError, match=r"0\.\.3 heads.*Fix"):
        create_network("lunet_small_2f", spatial_dims=3, in_channels=1, out_channels=2, deep_supervision=4)
    with pytest.raises(MedunetError, match="monai_segresnet has no deep-supervision heads.*Fix"):
        create_network("monai_segresnet", deep_supervision=2)


def test_the_loss_weighs_levels_by_halves_differs_from_the_plain_loss_and_training_reduces_it() -> None:
    torch.manual_seed(0)
    net = create_network("lunet_small_4f", spatial_dims=3, in_channels=1, out_channels=3, deep_supervision=2)
    x = torch.randn(2, 1, 16, 16, 16)
    label = torch.zeros(2, 1, 16, 16, 16)
    label[:, :, 4:12, 4:12, 4:12] = 1
    label[:, :, 6:9, 6:9, 6:9] = 2
    x = x + label  # the classes are visible in the image
    plain_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    loss = StackedDeepSupervisionLoss(plain_loss)
    out = net.train()(x)
    value = loss(out, label)
    by_hand = sum(w * plain_loss(out[:, level], label) for level, w in enumerate((1.0, 0.5, 0.25)))
    assert value.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert abs(value.item() - plain_loss(out[:, 0], label).item()) > 1e-3
    assert loss(out[:, 0], label).item() == pytest.approx(plain_loss(out[:, 0], label).item())  # plain prediction

    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    first = None
    for _ in range(15):
        optimizer.zero_grad()
        step = loss(net(x), label)
        step.backward()
        optimizer.step()
        first = step.item() if first is None else first
    assert loss(net(x), label).item() < 0.8 * first


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    task_dir = tmp_path_factory.mktemp("data") / "Task90_PhantomMRI"
    prepare_phantom(task_dir, num_cases=5, kind="mri", size=(24, 24, 20))
    return task_dir


def test_a_workflow_with_heads_trains_on_the_wrapped_loss_and_validates_the_plain_output(phantom: Path,
                                                                                       tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = build_overrides(network="lunet_small_2f", data_root=phantom, datalist=phantom / "folds.json",
                                run_dir=run_dir, epochs=2, settings={
                                    "epoch_length": 3, "val_interval": 1, "patch_size": [16, 16, 16],
                                    "deep_supervision": 2, "augment": "nnunet", "tracking": False,
                                    "profile_memory": False, "progress": False})
    (summary,) = run_workflow(REPO_ROOT / "medunet" / "workflows" / "phantom_demo.json", overrides)
    assert summary["finished"] and summary["epochs"] == 2
    record = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    assert record["network"]["args"]["deep_supervision"] == 2
    assert record["deep_supervision"] == 2 and record["augment"] == "nnunet"
    assert record["loss"].startswith("StackedDeepSupervisionLoss")
    recipe = read_run_record(run_dir).recipe
    assert recipe["deep_supervision"] == 2 and recipe["augment"] == "nnunet"
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert all(0.0 <= row["val_mean_dice"] <= 1.0 for row in metrics["epochs"])  # validation ran on plain logits
    # The saved model rebuilds from the record (heads included) and predicts plain logits.
    net = load_trained_network(run_dir, read_run_record(run_dir), "best")
    assert deep_supervision_heads(net) == 2 and not net.training
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 3, 16, 16, 16)
