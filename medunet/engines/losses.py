"""Losses the training builder wraps around the workflow's loss.

:class:`StackedDeepSupervisionLoss` is MONAI's ``DeepSupervisionLoss`` for networks that return their
deep-supervision outputs stacked in one tensor ``(B, 1 + K, C, *spatial)`` in training mode, as MONAI's
``DynUNet`` and medunet's :class:`~medunet.networks.skeleton.UNetSkeleton` (``deep_supervision=K``) do: one
tensor keeps the network's return type fixed, so it still compiles with TorchScript.
"""

from __future__ import annotations

import torch
from monai.losses import DeepSupervisionLoss
from torch.nn.modules.loss import _Loss


class StackedDeepSupervisionLoss(DeepSupervisionLoss):
    """``DeepSupervisionLoss`` over the outputs stacked along dim 1; a plain ``(B, C, *spatial)`` prediction gets
    the wrapped loss alone.

    Args:
        loss: the loss of one output, e.g. ``DiceCELoss(to_onehot_y=True, softmax=True)``.
        weight_mode: ``"exp"`` (default: 1, 1/2, 1/4... from the main output down the decoder, as nnU-Net),
            ``"same"`` or ``"two"`` (see MONAI's ``DeepSupervisionLoss``).
        weights: explicit weights per output, overriding ``weight_mode``.

    Example::

        loss = StackedDeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))
        value = loss(torch.randn(2, 4, 3, 16, 16, 16), torch.randint(0, 3, (2, 1, 16, 16, 16)))
    """

    def __init__(self, loss: _Loss, weight_mode: str = "exp", weights: list[float] | None = None) -> None:
        super().__init__(loss, weight_mode=weight_mode, weights=weights)

    def forward(self, input: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if isinstance(input, torch.Tensor) and input.ndim == target.ndim + 1:
            input = list(torch.unbind(input, dim=1))
        return super().forward(input, target)


def deep_supervision_heads(network: torch.nn.Module) -> int:
    """How many deep-supervision outputs ``network`` adds in training mode (0 for a plain network).

    Reads ``deep_supervision`` of medunet's skeleton networks, and ``deep_supr_num`` of a MONAI ``DynUNet`` built
    with ``deep_supervision=True``, also inside a wrapper with a ``.network`` or DDP ``.module``.
    """
    module = network
    while True:
        heads = getattr(module, "deep_supervision", 0)
        if isinstance(heads, bool):  # DynUNet: a flag; the count is deep_supr_num
            heads = int(getattr(module, "deep_supr_num", 0)) if heads else 0
        if isinstance(heads, int) and heads > 0:
            return heads
        inner = getattr(module, "module", None) or getattr(module, "network", None)
        if not isinstance(inner, torch.nn.Module):
            return 0
        module = inner
