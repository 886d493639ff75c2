"""Bytes held by skip connections during one forward, measured on the real tensors with hooks.

For medunet networks the skip strategy's ``state`` list is exactly what is held between encoder and
decoder; a hook on it records the largest total. For MONAI's networks the tensors their decoders
will read are recorded where they are produced; all of them are alive together at the bottleneck,
so their sum is the peak.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.layers.simplelayers import SkipConnection
from monai.networks.nets import BasicUNet, DynUNet, SegResNet
from monai.networks.nets.dynunet import DynUNetSkipLayer
from torch import nn

from medunet.networks.skeleton import UNetSkeleton


def _nbytes(tensors: object) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, (list, tuple)):
        return sum(_nbytes(t) for t in tensors)
    return 0


def _skip_sources(net: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, 'input' | 'output') pairs whose tensors a MONAI network keeps for its decoder."""
    if isinstance(net, BasicUNet):
        return [(net.conv_0, "output"), (net.down_1, "output"), (net.down_2, "output"), (net.down_3, "output")]
    if isinstance(net, SegResNet):
        return [(layer, "output") for layer in list(net.down_layers)[:-1]]
    if isinstance(net, DynUNet):
        return [(m.downsample, "output") for m in net.modules() if isinstance(m, DynUNetSkipLayer)]
    return [(m, "input") for m in net.modules() if isinstance(m, SkipConnection)]


def measure_skip_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of skip tensors held during ``net(x)`` (run under ``torch.no_grad``)."""
    from medunet.networks.baselines import PadToDivisible

    handles = []
    inner = net.network if isinstance(net, PadToDivisible) else net
    if isinstance(inner, UNetSkeleton):
        peak = [0]

        def record_state(module: nn.Module, args: tuple, state: list[torch.Tensor]) -> None:
            peak[0] = max(peak[0], _nbytes(state))

        handles.append(inner.skips.register_forward_hook(record_state))
    else:
        peak = [0]

        def add(tensors: object) -> None:
            peak[0] += _nbytes(tensors)

        for module, where in _skip_sources(inner):
            hook: Callable = (lambda m, args, out: add(out)) if where == "output" else (lambda m, args: add(args[0]))
            handles.append(module.register_forward_hook(hook) if where == "output" else module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            net(x)
    finally:
        for handle in handles:
            handle.remove()
    return peak[0]
