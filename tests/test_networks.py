"""Every registered network: shapes in 2D and 3D, gradients, TorchScript, bundle configs."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.utils import convert_to_torchscript

from medunet.errors import MedunetError
from medunet.networks import LUNet, OneNet, create_network, get_preset, list_networks


def build_tiny(name: str, spatial_dims: int) -> torch.nn.Module:
    torch.manual_seed(0)
    # Each preset registers its own test size (widths shrunk, depth and blocks its own).
    overrides = get_preset(name).test_overrides
    return create_network(name, spatial_dims=spatial_dims, in_channels=2, out_channels=3, **overrides)


ALL = list_networks()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_forward_keeps_any_input_size(name: str, spatial_dims: int) -> None:
    net = build_tiny(name, spatial_dims).eval()
    size = (19, 23, 21)[:spatial_dims]  # divisible by no power of two
    with torch.no_grad():
        out = net(torch.randn(1, 2, *size))
    assert out.shape == (1, 3, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL)
def test_gradients_reach_every_parameter(name: str) -> None:
    net = build_tiny(name, 3).train()
    net(torch.randn(2, 2, 32, 32, 32)).square().mean().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient for {missing}"
    assert any(p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("name", ALL)
def test_torchscript_conversion_verifies(name: str) -> None:
    if not get_preset(name).scriptable:
        pytest.skip(f"{name} is registered as not scriptable: {get_preset(name).description}")
    net = build_tiny(name, 3).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    scripted = convert_to_torchscript(net, verify=True, inputs=[x], device="cpu", rtol=1e-4, atol=1e-4)
    assert torch.allclose(scripted(x), net(x), atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_bundle_config_instantiates_by_dotted_path(name: str) -> None:
    preset = get_preset(name)
    target = f"{preset.factory.__module__}.{preset.factory.__qualname__}"
    if preset.factory.__module__.startswith("medunet.networks.") and isinstance(preset.factory, type):
        target = f"medunet.networks.{preset.factory.__name__}"  # the public path users write
    kwargs = {**preset.defaults, **preset.test_overrides, "spatial_dims": 3, "in_channels": 2, "out_channels": 3}
    config = {"network_def": {"_target_": target, **{k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}}}
    net = ConfigParser(config).get_parsed_content("network_def")
    reference = build_tiny(name, 3)
    assert type(net) is type(reference)
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in reference.parameters())


def test_registry_names_the_known_networks_on_a_typo() -> None:
    with pytest.raises(MedunetError, match="lunet_small_8f"):
        create_network("lunet_smal_8f")


def test_class_names_build_with_their_defaults() -> None:
    assert isinstance(create_network("LUNet", spatial_dims=2), LUNet)


def test_unpadded_network_says_which_sizes_work() -> None:
    net = OneNet(spatial_dims=2, in_channels=1, out_channels=2, features=2, levels=4, pad_input=False)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 1, 40, 40))
    assert net(torch.randn(1, 1, 48, 32)).shape == (1, 2, 48, 32)
