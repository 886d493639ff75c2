"""Skip strategies: what travels from encoder level ``l`` to decoder level ``l``.

Both strategies share one interface, :class:`SkipStrategy`, called by :class:`~medunet.networks.skeleton.UNetSkeleton`:

- ``forward(level, feature, state) -> state`` as each encoder feature is produced;
- ``expand(level, state) -> skip`` when decoder level ``level`` needs its skip.

Optionally, ``add_into(level, x, state) -> x + skip``: the same sum computed into ``x``, which the skeleton uses
at inference (no autograd) where a decoder level adds its skip (``merge="add"``); a strategy without it is asked
for ``expand`` and the skeleton adds.

``state`` is the list of tensors the strategy keeps alive between the two: that list *is* the skip
memory, and the profiler measures it by hooking ``forward``.

:class:`OrdinarySkips` keeps every encoder feature (the classic U-Net). :class:`AggregatedSkips` is
UNet-- (Yin et al., arXiv 2412.18276): MSIAM folds each feature, as soon as it is produced, into one
single-scale tensor E' and lets the full map go; IEM regenerates each level's skip from E' lazily,
inside the decoder.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from medunet.errors import MedunetError
from medunet.networks.layers import (
    add_pixel_shuffled_,
    pixel_shuffle,
    pixel_unshuffle,
    pointwise,
    slab_bounds,
)

TARGETS = ("coarsest", "intermediate", "finest")
IEM_MODES = ("enhanced", "plain")


def _conv(dims: int):
    return F.conv2d if dims == 2 else F.conv3d


@runtime_checkable
class SkipStrategy(Protocol):
    """What :class:`~medunet.networks.skeleton.UNetSkeleton` asks of its skip module (an ``nn.Module``).

    A new strategy implements these two methods and lists its ``skip_levels``; no base class is needed.
    """

    #: The encoder levels whose features the decoder receives, finest first.
    skip_levels: list[int]

    def forward(self, level: int, feature: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """Take the level-``level`` encoder feature as it is produced; return the tensors kept for the decoder."""
        ...

    def expand(self, level: int, state: list[torch.Tensor]) -> torch.Tensor:
        """The skip of decoder level ``level``, made from (and released from) ``state``."""
        ...


class OrdinarySkips(nn.Module):
    """The classic U-Net skip: keep each level's encoder feature until its decoder stage pops it."""

    def __init__(self, skip_levels: list[int]) -> None:
        super().__init__()
        self.skip_levels = list(skip_levels)

    def forward(self, level: int, feature: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        if level in self.skip_levels:
            state.append(feature)
        return state

    def expand(self, level: int, state: list[torch.Tensor]) -> torch.Tensor:
        # The decoder visits levels in reverse order of the encoder: a stack.
        return state.pop()


def resolve_target(target: str | int, skip_levels: list[int]) -> int:
    """The aggregation level for a target name ('coarsest', 'intermediate', 'finest') or level index."""
    lo, hi = min(skip_levels), max(skip_levels)
    if isinstance(target, int):
        if not lo <= target <= hi:
            raise MedunetError(f"UNet-- target level {target} is outside the skip levels {lo}..{hi}")
        return target
    if target == "coarsest":
        return hi
    if target == "finest":
        return lo
    if target == "intermediate":
        return (lo + hi + 1) // 2
    raise MedunetError(f"UNet-- target must be one of {TARGETS} or a level index, got {target!r}")


class _Resize(nn.Module):
    """Move a tensor ``steps`` levels coarser (pixel-unshuffle, steps > 0) or finer (pixel-shuffle)."""

    def __init__(self, spatial_dims: int, steps: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.steps = steps
        self.factor = 2 ** abs(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.steps > 0:
            return pixel_unshuffle(x, self.spatial_dims, self.factor)
        if self.steps < 0:
            return pixel_shuffle(x, self.spatial_dims, self.factor)
        return x


class MSIAMPiece(nn.Module):
    """One level's share of MSIAM: reduce channels (RC), resize to the target (RS), project.

    The fusing 1x1 conv over the concatenation of all pieces is split into one bias-free 1x1 conv per
    piece whose outputs are summed. That is the same linear map with the same weights, but it lets
    the aggregate be a running sum, so only E' is ever held, not the pieces.
    """

    def __init__(self, spatial_dims: int, in_channels: int, piece_channels: int, steps: int, out_channels: int):
        super().__init__()
        scale = (2 ** abs(steps)) ** spatial_dims
        # Reduce before unshuffling (work at the fine resolution on few channels); expand before
        # shuffling (work at the coarse resolution): RC always runs at the cheaper side.
        reduced = max(1, round(piece_channels / scale)) if steps > 0 else piece_channels * (scale if steps < 0 else 1)
        self.reduce = pointwise(spatial_dims, in_channels, reduced)
        self.resize = _Resize(spatial_dims, steps)
        self.piece_channels = reduced * scale if steps > 0 else (reduced // scale if steps < 0 else reduced)
        self.fuse = pointwise(spatial_dims, self.piece_channels, out_channels, bias=False)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.resize(self.reduce(feature)))

    def add_into(self, aggregate: torch.Tensor | None, feature: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``aggregate + self(feature)`` written into ``aggregate`` (``None``: a new E' holding ``bias``), at
        inference (no autograd), without the full-size intermediates of :meth:`forward`.

        The three linear steps are folded into as few convolutions as the resolutions allow, with the module's own
        weights (checkpoints are unchanged); the sums run in another order, so the result differs from
        ``aggregate + forward(feature)`` by float rounding:

        - a level coarser than E' (pixel-shuffled up): reduce and fuse are one 1x1 conv at the coarse level, whose
          output channels are E''s channels per sub-pixel offset; it is added through a pixel-shuffled view of E',
          one slab at a time (:func:`slab_bounds`), so neither the expanded piece nor its shuffled copy, each as large
          as E', is ever whole;
        - the level of E': reduce and fuse are one 1x1 conv, added one slab at a time;
        - a finer level (pixel-unshuffled down): reduce at the fine resolution (few channels), then unshuffle and
          fuse as one stride-f conv (as :meth:`IEMExpand.project_coarser`).
        """
        dims = feature.dim() - 2
        conv, factor = _conv(dims), self.resize.factor
        fuse = self.fuse.weight.flatten(1)  # (E' channels, piece channels)
        reduce_weight, reduce_bias = self.reduce.weight.flatten(1), self.reduce.bias
        kernel = [1] * dims
        if aggregate is None:
            steps = self.resize.steps
            spatial = [s * factor for s in feature.shape[2:]] if steps < 0 else (
                [s // factor for s in feature.shape[2:]] if steps > 0 else list(feature.shape[2:]))
            aggregate = bias.view(1, -1, *kernel).expand(feature.shape[0], -1, *spatial).clone()
        if self.resize.steps > 0:
            weight = self.fuse.weight.view(fuse.shape[0], fuse.shape[1] // factor**dims, *[factor] * dims)
            return aggregate.add_(conv(self.reduce(feature), weight, None, stride=factor))
        if self.resize.steps == 0:
            weight, shift = (fuse @ reduce_weight).view(-1, reduce_weight.shape[1], *kernel), fuse @ reduce_bias
            for start, stop in slab_bounds(feature.shape[2]):
                aggregate[:, :, start:stop].add_(conv(feature[:, :, start:stop], weight, shift))
            return aggregate
        scale = factor**dims
        weight = torch.einsum("ap,psi->asi", fuse, reduce_weight.view(fuse.shape[1], scale, -1))
        weight = weight.reshape(-1, reduce_weight.shape[1], *kernel)
        shift = torch.einsum("ap,ps->as", fuse, reduce_bias.view(fuse.shape[1], scale)).reshape(-1)
        for start, stop in slab_bounds(feature.shape[2]):
            add_pixel_shuffled_(aggregate[:, :, start * factor:stop * factor],
                                conv(feature[:, :, start:stop], weight, shift), dims, factor)
        return aggregate


class IEMExpand(nn.Module):
    """IEM for one decoder level: enhance E', resize it to the level and project it to the level's width.

    All work runs at the coarser of the two resolutions (enhance and project before a pixel-shuffle,
    unshuffle before projecting), so the only full-size tensors IEM makes at a fine level are the
    projection and its shuffled copy. ``mode="enhanced"`` refines E' with a residual depthwise
    3x3(x3) conv and a sigmoid channel gate (squeeze-excitation style) before projecting; the paper
    does not publish its enhancement, so this design is ours and ``"plain"`` is kept to compare.
    """

    def __init__(self, spatial_dims: int, agg_channels: int, out_channels: int, steps: int, mode: str) -> None:
        super().__init__()
        if mode not in IEM_MODES:
            raise MedunetError(f"iem must be one of {IEM_MODES}, got {mode!r}")
        scale = (2 ** abs(steps)) ** spatial_dims
        self.steps = steps
        self.resize = _Resize(spatial_dims, -steps)
        if steps > 0:  # decoder level finer than the target: project, then pixel-shuffle
            self.project = pointwise(spatial_dims, agg_channels, out_channels * scale)
        else:  # same level or coarser: pixel-unshuffle, then project
            self.project = pointwise(spatial_dims, agg_channels * scale, out_channels)
        self.enhanced = mode == "enhanced"
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        channels = agg_channels if self.enhanced else 1
        self.refine = conv(channels, channels, 3, padding=1, groups=channels) if self.enhanced else nn.Identity()
        self.gate = pointwise(spatial_dims, channels, channels) if self.enhanced else nn.Identity()

    def forward(self, aggregate: torch.Tensor) -> torch.Tensor:
        x = self.enhance(aggregate)
        if self.steps > 0:
            return self.resize(self.project(x))
        return self.project(self.resize(x))

    def enhance(self, aggregate: torch.Tensor, in_place: bool = False, keep_aggregate: bool = True) -> torch.Tensor:
        """E' refined and gated (``mode="enhanced"``; else E' itself).

        ``in_place`` (inference only: the backward of the refinement and of the gate need their inputs) writes the
        sum and the gated product into the refinement's fresh output, or, if not ``keep_aggregate``, into E'
        itself. The same sums and products as out of place, bit for bit.
        """
        if not self.enhanced:
            return aggregate
        refined = self.refine(aggregate)
        if not in_place:
            x = aggregate + refined
        elif keep_aggregate:
            x = refined.add_(aggregate)
        else:
            x = aggregate.add_(refined)
        del refined
        gate = torch.sigmoid(self.gate(x.mean(dim=list(range(2, x.dim())), keepdim=True)))
        return x.mul_(gate) if in_place else x * gate

    def add_into(self, x: torch.Tensor, held: list[torch.Tensor], last: bool) -> torch.Tensor:
        """``x + self(E')`` written into ``x``, at inference (no autograd): E' is ``held[0]``, handed over.

        Finer than E' (``steps > 0``), the projection is added through a pixel-shuffled view of ``x``
        (:func:`~medunet.networks.layers.add_pixel_shuffled_`): no shuffled copy, which at the finest level is as
        large as the skip itself. The enhancement runs in place (:meth:`enhance`); ``last``: nothing reads E'
        after this level, so it is enhanced in E' itself and released as soon as it is projected. The sums are those of ``forward`` in the same order: bit-identical.
        """
        if self.steps > 0:
            aggregate = self.enhance(held.pop(), in_place=True, keep_aggregate=not last)
            projection = self.project(aggregate)
            del aggregate
            return add_pixel_shuffled_(x, projection, self.resize.spatial_dims, self.resize.factor)
        # At E''s level or coarser, E' is as large as the level's feature or larger: enhance and project it one slab
        # at a time (two passes when enhanced: the gate needs the mean of the whole enhanced E' first), and leave
        # E' itself unchanged. Only the slabs are made, never an enhanced copy of E'.
        aggregate = held.pop()
        factor = self.resize.factor
        bounds = slab_bounds(aggregate.shape[2], factor)
        gate = self._gate_by_slabs(aggregate, bounds) if self.enhanced else None
        for start, stop in bounds:
            part = self._enhanced_slab(aggregate, start, stop, gate)
            x[:, :, start // factor:stop // factor].add_(
                self.project(part) if self.steps == 0 else self.project_coarser(part))
            del part  # before the next slab is made
        return x

    def _refined_slab(self, aggregate: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``refine(aggregate)[:, :, start:stop]`` from that slab and its halo (zero padding at E''s borders)."""
        dims = aggregate.dim() - 2
        halo, size = int(self.refine.padding[0]), aggregate.shape[2]
        low, high = max(start - halo, 0), min(stop + halo, size)
        window = F.pad(aggregate[:, :, low:high], [0, 0] * (dims - 1) + [halo - (start - low), halo - (high - stop)])
        return _conv(dims)(window, self.refine.weight, self.refine.bias, padding=[0] + [halo] * (dims - 1),
                           groups=self.refine.groups)

    def _gate_by_slabs(self, aggregate: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """:meth:`enhance`'s channel gate, the mean of ``E' + refine(E')`` summed slab by slab."""
        spatial = list(range(2, aggregate.dim()))
        total = torch.zeros(aggregate.shape[:2], dtype=aggregate.dtype, device=aggregate.device)
        for start, stop in bounds:
            total += self._refined_slab(aggregate, start, stop).add_(aggregate[:, :, start:stop]).sum(dim=spatial)
        mean = (total / math.prod(aggregate.shape[2:])).view(*aggregate.shape[:2], *[1] * len(spatial))
        return torch.sigmoid(self.gate(mean))

    def _enhanced_slab(self, aggregate: torch.Tensor, start: int, stop: int, gate: torch.Tensor | None) -> torch.Tensor:
        part = aggregate[:, :, start:stop]
        if gate is None:
            return part
        return self._refined_slab(aggregate, start, stop).add_(part).mul_(gate)

    def project_coarser(self, aggregate: torch.Tensor) -> torch.Tensor:
        """``project(resize(E'))`` for a level coarser than E', without the pixel-unshuffled copy of E'.

        A pixel-unshuffle by ``f`` followed by a 1x1 conv is one kernel-``f``, stride-``f`` conv whose weights are
        the 1x1 weights reshaped (the unshuffled channels are channel-major, then the sub-pixel offsets, which is
        a conv weight's ``(in, *kernel)`` order). ``project`` keeps its 1x1 weights, so checkpoints are unchanged;
        the sums run in another order, so the result differs from ``forward``'s by float rounding.
        """
        factor, dims = self.resize.factor, self.resize.spatial_dims
        weight = self.project.weight
        kernel = weight.view(weight.shape[0], weight.shape[1] // factor**dims, *[factor] * dims)
        return _conv(dims)(aggregate, kernel, self.project.bias, stride=factor)


class AggregatedSkips(nn.Module):
    """UNet--: MSIAM aggregates the encoder features into one tensor E'; IEM regenerates the skips.

    Args:
        spatial_dims: 2 or 3.
        channels: width of the encoder feature at each level.
        skip_levels: the levels whose features the decoder would otherwise receive.
        skip_channels: the width each decoder level expects from its skip.
        target: aggregation level: ``"coarsest"``, ``"intermediate"``, ``"finest"`` or a level index.
        agg_channels: channels of E' (default: the encoder width at the target level).
        piece_channels: channels each level contributes to the concatenation before the fusing 1x1
            conv (default: ``ceil(agg_channels / number of levels)``; at least one channel per
            sub-pixel position for finer levels).
        iem: ``"enhanced"`` (default) or ``"plain"`` projection.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: list[int],
        skip_levels: list[int],
        skip_channels: dict[int, int],
        target: str | int = "coarsest",
        agg_channels: int | None = None,
        piece_channels: int | None = None,
        iem: str = "enhanced",
    ) -> None:
        super().__init__()
        self.skip_levels = sorted(skip_levels)
        self.target = resolve_target(target, self.skip_levels)
        self.agg_channels = agg_channels or channels[self.target]
        piece = piece_channels or math.ceil(self.agg_channels / len(self.skip_levels))
        self.pieces = nn.ModuleList(
            MSIAMPiece(spatial_dims, channels[level], piece, self.target - level, self.agg_channels)
            for level in self.skip_levels
        )
        self.fuse_bias = nn.Parameter(torch.zeros(self.agg_channels))
        self.expanders = nn.ModuleList(
            IEMExpand(spatial_dims, self.agg_channels, skip_channels[level], self.target - level, iem)
            for level in self.skip_levels
        )
        self.last_level = self.skip_levels[0]

    def forward(self, level: int, feature: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        if not torch.is_grad_enabled() and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            return self._forward_inference(level, feature, state)
        return self._forward_plain(level, feature, state)

    def _forward_plain(self, level: int, feature: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """``forward`` as written in the paper's terms (training, TorchScript, ONNX): each piece made whole, then
        summed into a new E'."""
        for i, piece in enumerate(self.pieces):
            if self.skip_levels[i] == level:
                contribution = piece(feature)
                if len(state) == 0:
                    shape = [1, -1] + [1] * (contribution.dim() - 2)
                    state.append(contribution + self.fuse_bias.view(shape))
                else:
                    state[0] = state[0] + contribution
        return state

    @torch.jit.unused
    def _forward_inference(self, level: int, feature: torch.Tensor, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """``forward`` without autograd: each piece is added into E' in place (:meth:`MSIAMPiece.add_into`), so E'
        is the only full-size tensor MSIAM holds. The same sums up to float rounding."""
        for i, piece in enumerate(self.pieces):
            if self.skip_levels[i] == level:
                aggregate = state.pop() if state else None
                state.append(piece.add_into(aggregate, feature, self.fuse_bias))
        return state

    def expand(self, level: int, state: list[torch.Tensor]) -> torch.Tensor:
        aggregate = state[0]
        if level == self.last_level:
            state.clear()  # E' is not needed after the finest skip: free it before the last stage
        out = aggregate
        for i, expander in enumerate(self.expanders):
            if self.skip_levels[i] == level:
                out = expander(aggregate)
        return out

    def add_into(self, level: int, x: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        """``x + expand(level, state)``, computed into ``x`` without a full-size shuffled copy (inference only:
        see :meth:`IEMExpand.add_into`). At the finest skip level E' leaves ``state`` and is enhanced in place."""
        last = level == self.last_level
        held = [state.pop()] if last else [state[0]]
        for i, expander in enumerate(self.expanders):
            if self.skip_levels[i] == level:
                return expander.add_into(x, held, last)
        return x
