"""The U-Net every medunet network is: encoder stages, decoder stages, and how the skips connect.

The three papers cut a U-Net at three independent seams, and so does this module:

- *blocks* (OneNet changes them): what each encoder/decoder stage computes;
- *widths* (Lean UNet changes them): the channel count of each level;
- *skips* (UNet-- changes them): what travels from encoder level ``l`` to decoder level ``l``.

A family module (``conv_unet``, ``onenet``, ``nafnet``) builds :class:`UNetParts` for given widths and
merge mode; :class:`UNetSkeleton` runs them with any :mod:`medunet.networks.skips` strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medunet.errors import MedunetError

MERGE_MODES = ("concat", "add", "none")


class DecoderStage(nn.Module):
    """Upsample the coarser feature, merge the skip of this level (concat, add or none), then refine."""

    def __init__(self, up: nn.Module, blocks: nn.Module, merge: str) -> None:
        super().__init__()
        if merge not in MERGE_MODES:
            raise MedunetError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
        self.up = up
        self.blocks = blocks
        self.merge = merge
        self.has_skip = merge != "none"

    def join(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.merge == "concat":
            return torch.cat([x, skip], dim=1)
        # In place: ``x`` is the fresh output of ``up`` and no backward needs its old value, so
        # this saves one full-size tensor at the finest level.
        return x.add_(skip)


@dataclass
class UNetParts:
    """What a family builder returns: the stages, the head, and the facts the skip strategy needs.

    ``encoder[l]`` produces the level-``l`` feature (level 0 is full resolution, each level halves it);
    ``decoder[i]`` produces level ``len(decoder) - 1 - i``; ``channels[l]`` is the width of the
    level-``l`` encoder feature and ``skip_channels[l]`` what decoder level ``l`` expects from its
    skip (normally the same).
    """

    encoder: list[nn.Module]
    decoder: list[DecoderStage]
    head: nn.Module
    channels: list[int]
    skip_levels: list[int]
    skip_channels: dict[int, int] = field(default_factory=dict)
    aux_heads: list[nn.Module] = field(default_factory=list)
    #: How much the first encoder stage shrinks the input before level 0 (2 for a pixel-unshuffle stem).
    input_stride: int = 1

    def __post_init__(self) -> None:
        if not self.skip_channels:
            self.skip_channels = {level: self.channels[level] for level in self.skip_levels}


class UNetSkeleton(nn.Module):
    """Runs :class:`UNetParts` with a skip strategy; pads inputs to a multiple of ``2**levels``.

    Args:
        spatial_dims: 2 or 3.
        parts: the stages built by a family builder.
        skips: a module from :mod:`medunet.networks.skips` (ordinary per-level skips, or MSIAM/IEM).
        pad_input: pad each spatial size up to a multiple of ``2**downsamplings`` and crop the output
            back (default). If False, other sizes raise an error that says which sizes work.
    """

    def __init__(self, spatial_dims: int, parts: UNetParts, skips: nn.Module, pad_input: bool = True) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise MedunetError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.encoder = nn.ModuleList(parts.encoder)
        self.decoder = nn.ModuleList(parts.decoder)
        self.skips = skips
        self.head = parts.head
        # Built only to reproduce published parameter counts; never used in forward.
        self.aux_heads = nn.ModuleList(parts.aux_heads)
        self.size_divisor = parts.input_stride * 2 ** (len(parts.encoder) - 1)
        self.pad_input = pad_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        x = self._pad(x)
        state: list[torch.Tensor] = []
        for level, stage in enumerate(self.encoder):
            x = stage(x)
            state = self.skips(level, x, state)
        top = len(self.decoder) - 1
        for i, stage in enumerate(self.decoder):
            x = stage.up(x)
            if stage.has_skip:
                # The skip is produced (or popped) right here so nothing holds it after the merge.
                x = stage.join(x, self.skips.expand(top - i, state))
            x = stage.blocks(x)
        x = self.head(x)
        return self._crop(x, spatial)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        divisor = self.size_divisor
        shape = x.shape[2:]
        extra = [(divisor - s % divisor) % divisor for s in shape]
        if sum(extra) == 0:
            return x
        if not self.pad_input:
            raise ValueError(
                f"input spatial size {list(shape)} is not divisible by {divisor}: use sizes that are "
                f"multiples of {divisor}, or build the network with pad_input=True"
            )
        pad: list[int] = []
        for amount in extra[::-1]:  # F.pad lists the last dimension first
            pad += [0, amount]
        return F.pad(x, pad)

    def _crop(self, x: torch.Tensor, spatial: list[int]) -> torch.Tensor:
        if self.spatial_dims == 2:
            return x[:, :, : spatial[0], : spatial[1]]
        return x[:, :, : spatial[0], : spatial[1], : spatial[2]]
