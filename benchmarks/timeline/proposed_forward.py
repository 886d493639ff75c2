"""Proposed inference-time forward changes for UNet-- (issue 14), tried by monkeypatching (medunet/networks is
untouched), measured with medunet.profiling.timeline; each patched output is checked against the original forward.

Written against commit cf29a36. Changes eager and iem are in the package since (README.md, "After the change"), so at
later commits the "as is" step measures the new forward: check out cf29a36 to reproduce proposed.json.

    python benchmarks/timeline/proposed_forward.py 1x1x128x128x128 lunet_small_16f_unshuffle \
        unetmm_lunet_small_16f_unshuffle_intermediate --out benchmarks/timeline

Changes (combined as STEPS lists them):
  eager   - UNetSkeleton.forward hands each stage's input over (no caller frame keeps a consumed tensor alive),
            running nn.Sequential children one by one.
  bn      - BatchNorm in eval mode in place (x * scale + shift into x).
  iem     - IEM at a finer level adds its projection into the decoder feature through a pixel-shuffled *view*
            (no shuffled copy); the last level's enhancement runs in place on E'.
  head    - the pixel-shuffle head computes each sub-pixel offset's 1x1 conv into a strided view of the output
            (no pre-shuffle tensor of out_channels * 8 channels).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medunet.networks import create_network
from medunet.networks.layers import PixelShuffle
from medunet.networks.skeleton import UNetSkeleton
from medunet.networks.skips import AggregatedSkips, IEMExpand
from medunet.profiling import markdown_table
from medunet.profiling.timeline import plot_timelines, record_timeline, timeline_rows

MIB = 2**20
ORIGINAL_FORWARD = UNetSkeleton.forward
ORIGINAL_BN = nn.modules.batchnorm._BatchNorm.forward
ENABLED: set[str] = set()


def run_owned(module: nn.Module, holder: list[torch.Tensor]) -> torch.Tensor:
    """Run ``module`` on the tensor in ``holder`` (emptied: ownership passes), a plain nn.Sequential child by child
    so that each consumed input is freed as soon as the next layer has its output."""
    x = holder.pop()
    if "head" in ENABLED and getattr(module, "_shuffle_head", False):
        return shuffled_head(module[0], x)
    if type(module).forward is nn.Sequential.forward:  # nn.Sequential, MONAI Convolution, ADN
        for child in module:
            box = [x]
            del x
            x = run_owned(child, box)
        return x
    return module(x)


def shuffled_head(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv1x1 then pixel-shuffle by 2 in 3D, one sub-pixel offset at a time, into the output's strided view."""
    b, _, d, h, w = x.shape
    out_channels = conv.out_channels // 8
    out = x.new_empty(b, out_channels, 2 * d, 2 * h, 2 * w)
    weight = conv.weight.view(out_channels, 8, -1, 1, 1, 1)
    bias = conv.bias.view(out_channels, 8) if conv.bias is not None else None
    for offset in range(8):
        i, j, k = offset // 4, (offset // 2) % 2, offset % 2
        part = F.conv3d(x, weight[:, offset], None if bias is None else bias[:, offset])
        out[:, :, i::2, j::2, k::2].copy_(part)
        del part
    return out


def add_shuffled_(x: torch.Tensor, projection: torch.Tensor, factor: int) -> torch.Tensor:
    """x += pixel_shuffle(projection, factor), through a view of x: no shuffled copy of the projection."""
    b, c, d, h, w = x.shape
    view = x.view(b, c, d // factor, factor, h // factor, factor, w // factor, factor)
    shuffled = projection.view(b, c, factor, factor, factor, d // factor, h // factor, w // factor)
    view.add_(shuffled.permute(0, 1, 5, 2, 6, 3, 7, 4))
    return x


def enhance(expander: IEMExpand, aggregate: torch.Tensor, in_place: bool) -> torch.Tensor:
    if not expander.enhanced:
        return aggregate
    refined = expander.refine(aggregate)
    x = aggregate.add_(refined) if in_place else aggregate + refined
    del refined
    gate = torch.sigmoid(expander.gate(x.mean(dim=list(range(2, x.dim())), keepdim=True)))
    return x.mul_(gate) if in_place else x * gate


def merge_skip(self: UNetSkeleton, stage: nn.Module, level: int, x: torch.Tensor, state: list) -> torch.Tensor:
    skips = self.skips
    if "iem" in ENABLED and isinstance(skips, AggregatedSkips) and stage.merge == "add":
        aggregate = state[0]
        last = level == skips.last_level
        if last:
            state.clear()
        expander = skips.expanders[skips.skip_levels.index(level)]
        enhanced = enhance(expander, aggregate, in_place=last)
        del aggregate
        if expander.steps > 0:
            projection = expander.project(enhanced)
            del enhanced
            return add_shuffled_(x, projection, expander.resize.factor)
        return x.add_(expander.project(expander.resize(enhanced)))
    return stage.join(x, skips.expand(level, state))


def lean_forward(self: UNetSkeleton, x: torch.Tensor) -> torch.Tensor:
    if self.training:
        return ORIGINAL_FORWARD(self, x)
    spatial = x.shape[2:]
    x = self._pad(x)
    state: list[torch.Tensor] = []
    for level, stage in enumerate(self.encoder):
        box = [x]
        del x
        x = run_owned(stage, box)
        state = self.skips(level, x, state)
    top = len(self.decoder) - 1
    for i, stage in enumerate(self.decoder):
        box = [x]
        del x
        x = run_owned(stage.up, box)
        if stage.has_skip:
            x = merge_skip(self, stage, top - i, x, state)
        box = [x]
        del x
        x = run_owned(stage.blocks, box)
    box = [x]
    del x
    x = run_owned(self.head, box)
    return self._crop(x, spatial)


def inplace_bn(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if self.training or self.running_mean is None or torch.is_grad_enabled():
        return ORIGINAL_BN(self, x)
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    shift = -self.running_mean * scale
    if self.bias is not None:
        shift = shift + self.bias
    shape = [1, -1] + [1] * (x.dim() - 2)
    return x.mul_(scale.view(shape)).add_(shift.view(shape))


def mark_shuffle_heads(net: nn.Module) -> None:
    for module in net.modules():
        if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[1], PixelShuffle):
            module._shuffle_head = True


def enable(changes: set[str]) -> None:
    ENABLED.clear()
    ENABLED.update(changes)
    UNetSkeleton.forward = lean_forward if changes & {"eager", "iem", "head"} else ORIGINAL_FORWARD
    nn.modules.batchnorm._BatchNorm.forward = inplace_bn if "bn" in changes else ORIGINAL_BN


def build(name: str, shape: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    net = create_network(name, spatial_dims=3, in_channels=shape[1], out_channels=2).eval()
    mark_shuffle_heads(net)
    return net


STEPS = [("as is", set()), ("bn", {"bn"}), ("eager", {"eager"}), ("eager+iem", {"eager", "iem"}),
         ("eager+iem+bn", {"eager", "bn", "iem"}), ("eager+iem+bn+head", {"eager", "bn", "iem", "head"})]

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", help="input BxCxDxHxW, e.g. 1x1x128x128x128")
    parser.add_argument("names", nargs="+", help="registry names (UNetSkeleton networks)")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for proposed.json and proposed.png")
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    check_shape = (1, 1, 32, 32, 32)
    results, timelines = [], []
    for name in args.names:
        torch.manual_seed(1)
        x = torch.randn(check_shape)
        enable(set())
        with torch.no_grad():
            reference = build(name, check_shape)(x)
        for label, changes in STEPS:
            enable(changes)
            with torch.no_grad():
                difference = (build(name, check_shape)(x) - reference).abs().max().item()
            timeline = record_timeline(build(name, shape), shape, name=f"{name} [{label}]")
            enable(set())
            results.append({"network": name, "changes": label, "peak_mib": timeline.peak_bytes / MIB,
                            "where": timeline.peak_where, "skip_at_peak_mib": timeline.peak_skip_bytes / MIB,
                            "max_abs_diff_vs_original": difference})
            timelines.append(timeline)
            print(json.dumps(results[-1]), flush=True)
    print(markdown_table(timeline_rows(timelines)))
    args.out.mkdir(parents=True, exist_ok=True)
    shown = [t for t in timelines if t.name.endswith(("[as is]", "[eager+iem]"))]
    plot_timelines(shown, args.out / "proposed.png",
                   title="original forward vs eager freeing + IEM shuffled-view add (inference, monkeypatched)")
    (args.out / "proposed.json").write_text(json.dumps(results, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
