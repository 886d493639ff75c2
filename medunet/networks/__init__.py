"""medunet networks: OneNet, Lean UNet, NAFNet and UNet--, plus the MONAI baselines, in one registry.

Every network takes MONAI-style ``spatial_dims, in_channels, out_channels`` first, works in 2D and 3D,
returns logits, and scripts with TorchScript. Build any of them by name::

    from medunet.networks import create_network, list_networks
    net = create_network("lunet_small_8f", spatial_dims=3, in_channels=1, out_channels=3)

or from a MONAI bundle config: ``{"_target_": "medunet.networks.LUNet", "spatial_dims": 3, ...}``.
"""

from medunet.networks import baselines  # noqa: F401  (registers the MONAI baselines)
from medunet.networks.conv_unet import LUNet
from medunet.networks.nafnet import NAFNet
from medunet.networks.onenet import OneNet
from medunet.networks.registry import (
    NetworkPreset,
    create_network,
    get_preset,
    list_networks,
    register_preset,
)
from medunet.networks.skeleton import UNetSkeleton
from medunet.networks.unet_minus import UNetMinus

__all__ = [
    "LUNet",
    "NAFNet",
    "NetworkPreset",
    "OneNet",
    "UNetMinus",
    "UNetSkeleton",
    "create_network",
    "get_preset",
    "list_networks",
    "register_preset",
]
