"""The U-Net every medunet network is: encoder stages, decoder stages, and how the skips connect.

The three papers cut a U-Net at three independent seams, and so does this module:

- *blocks* (OneNet changes them): what each encoder/decoder stage computes;
- *widths* (Lean UNet changes them): the channel count of each level;
- *skips* (UNet-- changes them): what travels from encoder level ``l`` to decoder level ``l``.

A family module (``conv_unet``, ``onenet``, ``nafnet``) builds :class:`UNetParts` for given widths and
merge mode; :class:`UNetSkeleton` runs them with any :mod:`medunet.networks.skips` strategy.

Deep supervision (``deep_supervision=K``, as nnU-Net trains): K extra 1x1 heads read the outputs of the K decoder
stages above the finest. In training mode the network returns, as MONAI's ``DynUNet`` does, one tensor
``(B, 1 + K, C, *spatial)``: the main logits, then the heads' logits upsampled (nearest) to the output size,
finest first; :class:`medunet.engines.losses.StackedDeepSupervisionLoss` weighs them 1, 1/2, 1/4... In eval mode the
heads are not run: the output, its cost and an exported graph are those of the network without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
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
    #: Output channels of each decoder stage (``decoder[i]``) and of the network: what deep-supervision heads need.
    decoder_channels: list[int] = field(default_factory=list)
    out_channels: int = 0
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
        deep_supervision: auxiliary heads on the decoder stages above the finest (0: none, at most
            ``len(parts.decoder) - 1``); in training mode forward then returns ``(B, 1 + K, C, *spatial)``.
    """

    def __init__(self, spatial_dims: int, parts: UNetParts, skips: nn.Module, pad_input: bool = True,
                 deep_supervision: int = 0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise MedunetError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        most = len(parts.decoder) - 1
        if isinstance(deep_supervision, bool) or not isinstance(deep_supervision, int) or not 0 <= deep_supervision <= most:
            raise MedunetError(f"deep_supervision is {deep_supervision!r}; this network has {most} decoder stages above "
                               f"the finest, so it takes 0..{most} heads. Fix: e.g. deep_supervision={min(most, 3)}.")
        if deep_supervision and (len(parts.decoder_channels) != len(parts.decoder) or parts.out_channels < 1):
            raise MedunetError("deep supervision needs UNetParts.decoder_channels and out_channels from the family "
                               "builder. Fix: set them where the parts are built, or use deep_supervision=0.")
        self.spatial_dims = spatial_dims
        self.encoder = nn.ModuleList(parts.encoder)
        self.decoder = nn.ModuleList(parts.decoder)
        self.skips = skips
        self.head = parts.head
        # Built only to reproduce published parameter counts; never used in forward.
        self.aux_heads = nn.ModuleList(parts.aux_heads)
        self.size_divisor = parts.input_stride * 2 ** (len(parts.encoder) - 1)
        self.pad_input = pad_input
        self.deep_supervision = deep_supervision
        conv = Conv[Conv.CONV, spatial_dims]
        top = len(parts.decoder) - 1
        # ds_heads[j] reads decoder stage top - 1 - j: level j + 1, the finest supervised level first.
        self.ds_heads = nn.ModuleList(
            [conv(parts.decoder_channels[top - 1 - j], parts.out_channels, kernel_size=1) for j in range(deep_supervision)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = x.shape[2:]
        x = self._pad(x)
        state: list[torch.Tensor] = []
        for level, stage in enumerate(self.encoder):
            x = stage(x)
            state = self.skips(level, x, state)
        top = len(self.decoder) - 1
        supervised = self.training and self.deep_supervision > 0
        features: list[torch.Tensor] = []  # decoder outputs the heads read, coarsest first
        for i, stage in enumerate(self.decoder):
            x = stage.up(x)
            if stage.has_skip:
                # The skip is produced (or popped) right here so nothing holds it after the merge.
                x = stage.join(x, self.skips.expand(top - i, state))
            x = stage.blocks(x)
            if supervised and top - self.deep_supervision <= i < top:
                features.append(x)
        x = self.head(x)
        if supervised:
            outputs = [x]
            for j, head in enumerate(self.ds_heads):
                outputs.append(F.interpolate(head(features[len(features) - 1 - j]), size=x.shape[2:], mode="nearest"))
            x = torch.stack(outputs, dim=1)
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
        # The trailing axes are spatial, also in the stacked deep-supervision output.
        if self.spatial_dims == 2:
            return x[..., : spatial[0], : spatial[1]]
        return x[..., : spatial[0], : spatial[1], : spatial[2]]
