"""The U-Net every medunet network is: encoder stages, decoder stages, and how the skips connect.

The three papers cut a U-Net at three independent seams, and so does this module:

- *blocks* (OneNet changes them): what each encoder/decoder stage computes;
- *widths* (Lean UNet changes them): the channel count of each level;
- *skips* (UNet-- changes them): what travels from encoder level ``l`` to decoder level ``l``.

The seams are three independent arguments, composed the way nnU-Net's ``dynamic_network_architectures``
composes an encoder, a decoder and a block type:

- a family module (``conv_unet``, ``onenet``, ``nafnet``) defines a :class:`UNetBlocks`: the stage it builds at
  one level for given widths;
- :func:`level_widths` is the width schedule every family takes: doubling, constant (``flat``) or an explicit list;
- :func:`compose_unet` walks the levels, asks the blocks for each stage and returns :class:`UNetParts`;
  :class:`UNetSkeleton` runs them with any :class:`~medunet.networks.skips.SkipStrategy`.

Deep supervision (``deep_supervision=K``, as nnU-Net trains): K extra 1x1 heads read the outputs of the K decoder
stages above the finest. In training mode the network returns, as MONAI's ``DynUNet`` does, one tensor
``(B, 1 + K, C, *spatial)``: the main logits, then the heads' logits upsampled (nearest) to the output size,
finest first; :class:`medunet.engines.losses.StackedDeepSupervisionLoss` weighs them 1, 1/2, 1/4... In eval mode the
heads are not run: the output, its cost and an exported graph are those of the network without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

from medunet.errors import MedunetError
from medunet.networks.layers import concat_block_releasing, crop_spatial, pad_to_multiple, run_releasing
from medunet.networks.skips import SkipStrategy

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
    #: The head is called as ``head(x, image)`` with the (padded) network input too
    #: (:class:`~medunet.networks.layers.ImageGuidedHead`, :class:`~medunet.networks.layers.RefinedHead`).
    head_reads_input: bool = False

    def __post_init__(self) -> None:
        if not self.skip_channels:
            self.skip_channels = {level: self.channels[level] for level in self.skip_levels}


def level_widths(*, features: int, levels: int | None, flat: bool = False,
                 widths: Sequence[int] | None = None) -> list[int]:
    """The width seam: the channel count of each resolution level, level 0 (the finest) first.

    Args:
        features: the base width: of level 0, and of every level when ``flat``.
        levels: how many resolution levels (``None``: as many as ``widths`` lists).
        flat: constant width (Lean UNet) instead of ``features * 2**level`` (doubling, the classic U-Net).
        widths: an explicit width per level, e.g. ``(16, 24, 32, 32, 32)``; replaces ``features`` and ``flat``.
    """
    if widths is not None:
        widths = [int(w) for w in widths]
        if len(widths) < 2 or min(widths) < 1 or (levels is not None and len(widths) != levels):
            wanted = f"{levels}" if levels is not None else "at least 2"
            raise MedunetError(f"widths must list {wanted} positive level widths, got {widths}. "
                               f"Fix: one width per resolution level, e.g. {[16] * (levels or 2)}.")
        return widths
    if features < 1 or levels is None or levels < 2:
        raise MedunetError(f"a U-Net needs features >= 1 and at least 2 resolution levels, got features={features}, "
                           f"levels={levels}")
    return [features if flat else features * 2**level for level in range(levels)]


class UNetBlocks:
    """The block seam: what one family (conv, OneNet, NAFNet) builds at each level, for any widths.

    :func:`compose_unet` calls the builders level by level, encoder first (finest to coarsest), then the decoder
    (coarsest to finest), then the head, so a seeded network is initialised in that order. A family overrides
    :meth:`encoder_stage`, :meth:`decoder_stage` and :meth:`head`; the rest has defaults most families keep.
    """

    #: How much the first encoder stage shrinks the input before level 0 (2 for a pixel-unshuffle stem).
    input_stride: int = 1
    #: Whether :meth:`head` builds a head that also reads the network input (``head(x, image)``).
    head_reads_input: bool = False

    def skip_levels(self, levels: int) -> list[int]:
        """Levels whose encoder feature reaches the decoder: every level above the coarsest."""
        return list(range(levels - 1))

    def encoder_stage(self, level: int, widths: list[int], in_channels: int) -> nn.Module:
        """The stage producing the level-``level`` feature (``widths[level]`` channels); level 0 reads the input."""
        raise NotImplementedError

    def decoder_stage(self, level: int, widths: list[int], merge: str) -> tuple[nn.Module, nn.Module, int]:
        """``(up, blocks, out_channels)`` of decoder level ``level``: ``up`` reads the stage below (level + 1),
        ``blocks`` the result of merging the skip (``merge``: concat, add, or none where the level has no skip)."""
        raise NotImplementedError

    def aux_head(self, level: int, channels: int, out_channels: int) -> nn.Module | None:
        """A per-level head of the paper's code, counted in its parameters but never run (OneNet); default none."""
        return None

    def head(self, in_channels: int, out_channels: int) -> nn.Module:
        """The last layer: from the finest decoder output to ``out_channels`` logits at full resolution."""
        raise NotImplementedError


def compose_unet(blocks: UNetBlocks, *, in_channels: int, out_channels: int, widths: Sequence[int],
                 merge: str = "concat", auxiliary_heads: bool = False) -> UNetParts:
    """A U-Net's stages: ``blocks`` built at every level of ``widths``, skips merged by ``merge``.

    Args:
        blocks: the block family.
        in_channels: input channels.
        out_channels: output channels (logits).
        widths: the encoder width of each level (:func:`level_widths`); ``len(widths) - 1`` downsamplings.
        merge: how a decoder level takes its skip: ``"concat"``, ``"add"`` (same width) or ``"none"``.
        auxiliary_heads: keep the family's :meth:`UNetBlocks.aux_head` modules (built in any case, so that a
            seeded initialisation does not depend on it).
    """
    widths = list(widths)
    levels = len(widths)
    skip_levels = blocks.skip_levels(levels)
    encoder = [blocks.encoder_stage(level, widths, in_channels) for level in range(levels)]
    decoder: list[DecoderStage] = []
    decoder_channels: list[int] = []
    aux_heads: list[nn.Module] = []
    for level in range(levels - 2, -1, -1):
        stage_merge = merge if level in skip_levels else "none"
        up, refine, channels = blocks.decoder_stage(level, widths, stage_merge)
        decoder.append(DecoderStage(up, refine, stage_merge))
        decoder_channels.append(channels)
        aux = blocks.aux_head(level, channels, out_channels)
        if aux is not None:
            aux_heads.append(aux)
    head = blocks.head(decoder_channels[-1], out_channels)
    return UNetParts(
        encoder, decoder, head, widths, skip_levels, aux_heads=aux_heads if auxiliary_heads else [],
        decoder_channels=decoder_channels, out_channels=out_channels, input_stride=blocks.input_stride,
        head_reads_input=blocks.head_reads_input,
    )


class UNetSkeleton(nn.Module):
    """Runs :class:`UNetParts` with a skip strategy; pads inputs to a multiple of ``2**levels``.

    Args:
        spatial_dims: 2 or 3.
        parts: the stages built by a family builder.
        skips: a :class:`~medunet.networks.skips.SkipStrategy` module (ordinary per-level skips, or MSIAM/IEM).
        pad_input: pad each spatial size up to a multiple of ``2**downsamplings`` and crop the output
            back (default). If False, other sizes raise an error that says which sizes work.
        deep_supervision: auxiliary heads on the decoder stages above the finest (0: none, at most
            ``len(parts.decoder) - 1``); in training mode forward then returns ``(B, 1 + K, C, *spatial)``.
    """

    # A constant to TorchScript, which then compiles only the head call this network makes.
    __constants__ = ["head_reads_input"]

    def __init__(self, spatial_dims: int, parts: UNetParts, skips: SkipStrategy, pad_input: bool = True,
                 deep_supervision: int = 0) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise MedunetError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not isinstance(skips, nn.Module) or not isinstance(skips, SkipStrategy):
            raise MedunetError(f"skips must be an nn.Module with forward(level, feature, state) and expand(level, state) "
                               f"(medunet.networks.skips.SkipStrategy), got {type(skips).__name__}. "
                               "Fix: pass OrdinarySkips(parts.skip_levels) or an AggregatedSkips.")
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
        self.head_reads_input = parts.head_reads_input
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
        supervised = self.training and self.deep_supervision > 0
        if not torch.is_grad_enabled() and not supervised and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            return self._forward_releasing(x)
        return self._forward_plain(x, supervised)

    def _forward_plain(self, x: torch.Tensor, supervised: bool = False) -> torch.Tensor:
        """The forward as a plain loop (training, TorchScript, ONNX export): each stage called on a variable, the
        skips by ``expand``; ``supervised`` adds the deep-supervision outputs."""
        spatial = x.shape[2:]
        x = self._pad(x)
        image = x
        state: list[torch.Tensor] = []
        for level, stage in enumerate(self.encoder):
            x = stage(x)
            state = self.skips(level, x, state)
        top = len(self.decoder) - 1
        features: list[torch.Tensor] = []  # decoder outputs the heads read, coarsest first
        for i, stage in enumerate(self.decoder):
            x = stage.up(x)
            if stage.has_skip:
                # The skip is produced (or popped) right here so nothing holds it after the merge.
                x = stage.join(x, self.skips.expand(top - i, state))
            x = stage.blocks(x)
            if supervised and top - self.deep_supervision <= i < top:
                features.append(x)
        x = self.head(x, image) if self.head_reads_input else self.head(x)
        if supervised:
            outputs = [x]
            for j, head in enumerate(self.ds_heads):
                outputs.append(F.interpolate(head(features[len(features) - 1 - j]), size=x.shape[2:], mode="nearest"))
            x = torch.stack(outputs, dim=1)
        # The trailing axes are spatial, also in the stacked deep-supervision output.
        return crop_spatial(x, spatial)

    @torch.jit.unused
    def _forward_releasing(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` without autograd (``torch.no_grad()``, ``torch.inference_mode()``), freeing as it goes.

        The same layers on the same tensors, so the output is the same, bit for bit where no level splits a
        convolution over a concatenation (below). Three things differ, all for the peak memory of inference:

        - every tensor is handed from layer to layer in one list, never kept in a variable, and the stages' plain
          ``nn.Sequential`` containers are run child by child (:func:`~medunet.networks.layers.run_releasing`):
          a stage's input is freed as soon as its first layer has its output, not when the whole stage returns;
        - a level that adds its skip (``merge="add"``) asks the skip strategy to add it into the decoder feature
          (``add_into``, if the strategy has it: UNet--'s IEM adds through a pixel-shuffled view, no copy);
        - a level that concatenates its skip does not make the concatenation where its block starts with a
          convolution: the skip's share of that convolution is computed and the skip freed before the up-convolution
          runs, then the upsampled feature's share is added
          (:func:`~medunet.networks.layers.concat_block_releasing`; float rounding apart, the same output). Otherwise
          the concatenation is made first, the skip copied in and freed, and the upsampled feature written into it
          (:func:`~medunet.networks.layers.concat_releasing`).

        With autograd none of this saves anything (the graph keeps what backward needs), so training runs the plain
        loop above. TorchScript and the ONNX tracer also take the plain loop: this one recurses over modules of
        any type and reads the module classes, which TorchScript cannot compile, and in-place adds into a view
        are not something an exported graph needs.
        """
        spatial = x.shape[2:]
        slot = [self._pad(x)]  # the one reference to the tensor in flight
        # The caller's input stays alive in the caller; a padded copy dies in the first stage, unless the head reads it.
        image = slot[0] if self.head_reads_input else None
        del x
        state: list[torch.Tensor] = []
        for level, stage in enumerate(self.encoder):
            slot.append(run_releasing(stage, slot))
            state = self.skips(level, slot[0], state)
        add_into = getattr(self.skips, "add_into", None)
        top = len(self.decoder) - 1
        for i, stage in enumerate(self.decoder):
            if stage.merge == "concat" and isinstance(getattr(stage.up, "out_channels", None), int):
                slot.append(concat_block_releasing(stage.blocks, stage.up, slot, [self.skips.expand(top - i, state)]))
                continue
            slot.append(run_releasing(stage.up, slot))
            if stage.has_skip:
                if stage.merge == "add" and add_into is not None:
                    slot.append(add_into(top - i, slot.pop(), state))
                else:
                    slot.append(stage.join(slot.pop(), self.skips.expand(top - i, state)))
            slot.append(run_releasing(stage.blocks, slot))
        if image is not None:
            return crop_spatial(self.head(slot.pop(), image), spatial)
        return crop_spatial(run_releasing(self.head, slot), spatial)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        divisor = self.size_divisor
        shape = x.shape[2:]
        if not self.pad_input:
            for size in shape:
                if size % divisor != 0:
                    raise ValueError(
                        f"input spatial size {list(shape)} is not divisible by {divisor}: use sizes that are "
                        f"multiples of {divisor}, or build the network with pad_input=True"
                    )
        return pad_to_multiple(x, divisor)
