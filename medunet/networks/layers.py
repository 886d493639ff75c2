"""Small building blocks shared by the medunet networks, N-D through MONAI's layer factories.

Everything here works for ``spatial_dims`` 2 and 3 from one code path and is TorchScript-scriptable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.factories import Conv
from torch import nn

ActType = tuple | str | None
NormType = tuple | str | None
DropoutType = tuple | str | float | None


def conv_norm_act(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    act: ActType = ("relu", {"inplace": True}),
    norm: NormType = "batch",
    dropout: DropoutType = None,
    bias: bool = True,
    order: str = "NA",
    strides: int = 1,
) -> Convolution:
    """A convolution followed by norm/activation/dropout in ``order`` (MONAI ``adn_ordering`` letters).

    ``order="NA"`` is the usual conv -> norm -> act; ``"AN"`` is conv -> act -> norm, the order
    the OneNet and STAMP/Lean-UNet authors use. ``act=None, norm=None`` gives a plain convolution.
    """
    conv_only = act is None and norm is None and not dropout
    order = adn_order(order, act=act, norm=norm, dropout=dropout)
    return Convolution(
        spatial_dims,
        in_channels,
        out_channels,
        strides=strides,
        kernel_size=kernel_size,
        adn_ordering=order,
        act=act,
        norm=norm,
        dropout=dropout,
        bias=bias,
        conv_only=conv_only,
    )


def adn_order(order: str, *, act: ActType, norm: NormType, dropout: DropoutType) -> str:
    """MONAI's ``adn_ordering`` letters of ``order`` for the layers that exist: ``"AND"`` without dropout is ``"AN"``."""
    order = "".join(letter for letter in order if letter in "AND")
    if not dropout:
        order = order.replace("D", "")
    if act is None:
        order = order.replace("A", "")
    if norm is None:
        order = order.replace("N", "")
    return order


def pointwise(spatial_dims: int, in_channels: int, out_channels: int, bias: bool = True) -> nn.Module:
    """A 1x1(x1) convolution: the efficient, numerically identical form of OneNet's channel-wise 1D conv."""
    return Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=1, bias=bias)


def pixel_unshuffle(x: torch.Tensor, spatial_dims: int, factor: int) -> torch.Tensor:
    """(B, C, *S) -> (B, C * factor**dims, *S / factor); the inverse of :func:`pixel_shuffle`.

    Channel order matches ``torch.nn.functional.pixel_unshuffle`` in 2D (channel-major, then the
    sub-pixel offsets), extended to 3D the same way.
    """
    if factor == 1:
        return x
    if spatial_dims == 2:
        return F.pixel_unshuffle(x, factor)
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // factor, factor, h // factor, factor, w // factor, factor)
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * factor * factor * factor, d // factor, h // factor, w // factor)


def pixel_shuffle(x: torch.Tensor, spatial_dims: int, factor: int) -> torch.Tensor:
    """(B, C * factor**dims, *S) -> (B, C, *S * factor); the inverse of :func:`pixel_unshuffle`."""
    if factor == 1:
        return x
    if spatial_dims == 2:
        return F.pixel_shuffle(x, factor)
    b, c, d, h, w = x.shape
    out_channels = c // (factor * factor * factor)
    x = x.reshape(b, out_channels, factor, factor, factor, d, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, out_channels, d * factor, h * factor, w * factor)


#: At inference, a full-size result is made this many slabs at a time (along the first spatial axis), so that only
#: a slab of its intermediate, not the whole, is alive beside it (UNet--'s MSIAM and IEM, the 2x2 up-convolution).
INFERENCE_SLABS = 16


#: An inference convolution whose output is at least this large runs by slabs (:class:`OneDNNConv3d`; also the split
#: convolution over a concatenation and the sub-pixel head): 16 channels at 64³ are 16 MiB, at 32³ 2 MiB.
#: ``MEDUNET_INFERENCE_SLABS=0`` in the environment turns all three off (whole-volume convolutions, bit for bit the
#: plain composition), e.g. to measure what they save.
SLAB_CONV_MIN_BYTES: float = 8 * 2**20 if os.environ.get("MEDUNET_INFERENCE_SLABS", "1") != "0" else math.inf


def slab_bounds(size: int, multiple: int = 1, slabs: int = INFERENCE_SLABS) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(size)``: about ``slabs`` of them, each starting at a multiple of
    ``multiple`` (so a stride-``multiple`` conv or a pixel-(un)shuffle by ``multiple`` maps slab to slab)."""
    step = max(multiple, math.ceil(size / slabs / multiple) * multiple)
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def _shuffled_pair(x: torch.Tensor, y: torch.Tensor, spatial_dims: int, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of ``x`` and ``y`` with the same shape, such that element-wise ``x_view op= y_view`` is
    ``x op= pixel_shuffle(y)``. Splitting each spatial axis into (size / f, f) is a view of any strided tensor, so
    ``x`` may itself be a view (a slab of a larger tensor) and the result still lands in its storage."""
    b, c = x.shape[0], x.shape[1]
    if spatial_dims == 2:
        h, w = x.shape[2] // factor, x.shape[3] // factor
        # The index order of F.pixel_shuffle: y[c * f * f + i * f + j, h, w] lands at x[c, h * f + i, w * f + j].
        return (x.unflatten(3, (w, factor)).unflatten(2, (h, factor)),
                y.reshape(b, c, factor, factor, h, w).permute(0, 1, 4, 2, 5, 3))
    d, h, w = x.shape[2] // factor, x.shape[3] // factor, x.shape[4] // factor
    return (x.unflatten(4, (w, factor)).unflatten(3, (h, factor)).unflatten(2, (d, factor)),
            y.reshape(b, c, factor, factor, factor, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4))  # as pixel_shuffle


def add_pixel_shuffled_(x: torch.Tensor, y: torch.Tensor, spatial_dims: int, factor: int) -> torch.Tensor:
    """``x += pixel_shuffle(y, spatial_dims, factor)`` in place, through a view of ``x``: no shuffled copy of ``y``.

    The same sums as ``x + pixel_shuffle(y)``, element for element (bit-identical). ``x`` is written to, so use it
    where nothing else reads ``x`` afterwards and autograd does not need it (an addition's backward does not).
    """
    if factor == 1:
        return x.add_(y)
    target, source = _shuffled_pair(x, y, spatial_dims, factor)
    target.add_(source)
    return x


def run_releasing(module: nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``module(inputs.pop())``, without keeping the input alive any longer than the layer that reads it.

    The input is handed over in a list (emptied here) because a caller's variable, or ``nn.Module.__call__``'s
    argument tuple, would keep it alive until the call returns. A plain ``nn.Sequential`` (MONAI's
    ``Convolution`` and ``ADN`` are ones) is run child by child the same way, so that inside a conv block only one
    layer's input and output are alive at a time, not every container's input as well; a MONAI ``ResidualUnit`` the
    same way, its shortcut computed first and added in place. That is what it is for:
    without autograd nothing else holds on to those tensors. A container with hooks of its own (or while global
    module hooks are set) is called as usual instead, so every hook fires as it would without this; that container
    then keeps its input until it returns. Not TorchScript (it recurses over modules of any type).
    """
    if not runs_child_by_child(module) or _has_hooks(module):
        return module(inputs.pop())
    if type(module).forward is SubPixelHead.forward and module._by_slabs_applies(inputs[-1]):
        return module(inputs.pop())
    if type(module).forward in (nn.Sequential.forward, SubPixelHead.forward):
        for child in module:
            inputs.append(run_releasing(child, inputs))
        return inputs.pop()
    # A ResidualUnit. MONAI's forward is ``conv(x) + residual(x)``: x lives until the sum and the sum is a third
    # tensor. Here the shortcut comes first, x goes into the convs by hand-over (a projected x is freed after the first
    # conv) and the shortcut is added into the convs' fresh output.
    shortcut = module.residual(inputs[-1])
    return run_releasing(module.conv, inputs).add_(shortcut)


def concat_releasing(up: nn.Module, inputs: list[torch.Tensor], skips: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat([up(inputs.pop()), skips.pop()], dim=1)`` (a U-Net decoder's concatenating merge), with less alive.

    ``torch.cat`` needs both parts and the result alive at once: at a lean network's finest level that is the peak
    of inference (two 16 MiB parts and their 32 MiB concatenation at 1x1x128³ for 16 channels at half resolution).
    Here the result is allocated first and the skip copied into it and freed before ``up`` runs; a 2x2x2
    up-convolution on the CPU (:class:`ShuffleConvTranspose3d`) is then written straight into the result's first
    channels, slab by slab, and any other ``up`` is computed and copied. The same values as ``torch.cat``, bit for
    bit. ``up`` must say its ``out_channels`` (a transposed conv does); inputs and skips are handed over in lists,
    emptied here, as for :func:`run_releasing`.
    """
    skip = skips.pop()
    channels = up.out_channels
    out = skip.new_empty(skip.shape[0], channels + skip.shape[1], *skip.shape[2:])
    out[:, channels:].copy_(skip)
    del skip
    head = out[:, :channels]
    if (isinstance(up, ShuffleConvTranspose3d) and not _has_hooks(up) and not torch.is_grad_enabled()
            and inputs[-1].device.type == "cpu" and tuple(head.shape[2:]) == tuple(2 * s for s in inputs[-1].shape[2:])):
        up._by_slabs(inputs.pop(), head)
        return out
    upsampled = run_releasing(up, inputs)
    if upsampled.shape != head.shape:
        raise ValueError(f"the upsampled feature {list(upsampled.shape)} does not match the skip it is concatenated "
                         f"with ({list(head.shape)} for its channels): the encoder and decoder sizes disagree")
    head.copy_(upsampled)
    return out


def concat_block_releasing(blocks: nn.Module, up: nn.Module, inputs: list[torch.Tensor],
                           skips: list[torch.Tensor]) -> torch.Tensor:
    """``blocks(torch.cat([up(inputs.pop()), skips.pop()], 1))`` without making the concatenation, where it can.

    The block's first convolution (and, in a residual unit, its 1x1 projection) is linear in its input channels:
    its output is the sum of each part's share (:meth:`OneDNNConv3d.share`). The skip's share is computed first and
    the skip freed, then ``up`` runs and its share is added. So the decoder's last level holds at most three
    feature-sized tensors (the skip or the upsampled feature, the conv's output, the shortcut) instead of the
    concatenation (two) beside its parts and results. The same function up to float rounding (the sums are made
    in another order). Where the block is not a plain ``nn.Sequential`` or ``ResidualUnit`` starting with a
    :class:`OneDNNConv3d` that :meth:`~OneDNNConv3d.can_share`, or ``up`` is not a :class:`ShuffleConvTranspose3d`,
    it runs :func:`concat_releasing` and the block as usual; so it does for outputs under ``SLAB_CONV_MIN_BYTES``
    and for anything but float32 on the CPU (oneDNN's kernels, as :class:`OneDNNConv3d`).
    Inputs are handed over in lists, as for :func:`run_releasing`.
    """
    plan = _split_plan(blocks)
    skip = skips[-1]
    large = (plan is not None and skip.device.type == "cpu" and skip.dtype == torch.float32
             and skip[:, :1].numel() * plan[0].out_channels * 4 >= SLAB_CONV_MIN_BYTES)
    del skip  # the list holds the skip; a name here would keep it alive past concat_releasing
    if not large or not isinstance(up, ShuffleConvTranspose3d) or _has_hooks(up) or _watched():
        inputs.append(concat_releasing(up, inputs, skips))
        return run_releasing(blocks, inputs)
    first, rest, projection = plan
    skip = skips.pop()
    channels = up.out_channels
    out = first.share(skip, channels)
    shortcut = None if projection is None else projection.share(skip, channels)
    del skip
    upsampled = run_releasing(up, inputs)
    first.share(upsampled, 0, out)
    if shortcut is not None:
        projection.share(upsampled, 0, shortcut)
    del upsampled
    inputs.append(out)
    del out
    for module in rest:
        inputs.append(run_releasing(module, inputs))
    return inputs.pop() if shortcut is None else inputs.pop().add_(shortcut)


def _split_plan(blocks: nn.Module) -> tuple[OneDNNConv3d, list[nn.Module], OneDNNConv3d | None] | None:
    """``(first conv, what runs after it, residual projection or None)`` for :func:`concat_block_releasing`."""
    projection = None
    body = blocks
    if type(blocks).forward is ResidualUnit.forward:
        projection = blocks.residual
        if not (type(projection) is OneDNNConv3d and projection.can_share()) or _has_hooks(blocks):
            return None
        body = blocks.conv
    rest: list[nn.Module] = []
    while type(body).forward is nn.Sequential.forward and not _has_hooks(body) and len(body) > 0:
        rest = list(body)[1:] + rest
        body = body[0]
    if type(body) is not OneDNNConv3d or not body.can_share() or _has_hooks(body):
        return None
    return body, rest, projection


def runs_child_by_child(module: nn.Module) -> bool:
    """Whether :func:`run_releasing` runs ``module``'s children itself (a plain ``nn.Sequential``, MONAI's
    ``ResidualUnit``, a :class:`SubPixelHead` where it does not run by slabs) rather than calling it: a memory
    timeline must not hook such a container, or it would be called whole."""
    return type(module).forward in (nn.Sequential.forward, ResidualUnit.forward, SubPixelHead.forward)


def _has_hooks(module: nn.Module) -> bool:
    """Whether calling ``module`` would run a hook: its own, or a global one (``register_module_forward_hook``)."""
    from torch.nn.modules import module as torch_module

    return bool(module._forward_hooks or module._forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks)


def pad_to_multiple(x: torch.Tensor, divisor: int, min_size: int = 0) -> torch.Tensor:
    """Zero-pad each spatial axis at its end up to a multiple of ``divisor`` (and at least ``min_size``).

    The one padding every medunet network and wrapped MONAI baseline uses; :func:`crop_spatial` undoes it.
    """
    pad: list[int] = []
    for size in x.shape[2:][::-1]:  # F.pad lists the last dimension first
        padded = size + (divisor - size % divisor) % divisor
        pad += [0, max(padded, min_size) - size]
    return F.pad(x, pad) if sum(pad) > 0 else x


def crop_spatial(x: torch.Tensor, spatial: list[int]) -> torch.Tensor:
    """The first ``spatial`` voxels of the trailing (spatial) axes: undoes :func:`pad_to_multiple`.

    Only the trailing axes are cut, so a stacked deep-supervision output ``(B, 1 + K, C, *S)`` crops too.
    """
    if len(spatial) == 2:
        return x[..., : spatial[0], : spatial[1]]
    return x[..., : spatial[0], : spatial[1], : spatial[2]]


def _watched() -> bool:
    """Whether the ONNX exporter, ``torch.compile`` or a ``TorchDispatchMode`` (the FLOP counter, the memory
    timeline) is watching: then the CPU inference shortcuts below give way to the ordinary op, which they record."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


class OneDNNConv3d(nn.Conv3d):
    """``torch.nn.Conv3d`` that takes oneDNN's kernel for float32 on the CPU, where PyTorch would not.

    For a float32 CPU input ATen picks oneDNN (``use_mkldnn`` in ``aten/src/ATen/native/Convolution.cpp``) unless
    batch x channels x the first two spatial sizes is at most 20480 with a batch of 1; then it runs its native
    ``slow_conv3d``, which unfolds the input into im2col columns (in_channels x kernel volume x output voxels
    floats: 54 MiB for 16 channels at 32³) and is far slower (39 ms against 2 ms for that conv, 2 threads). Every
    lean 3D U-Net has such levels at inference (one window, 16 channels at 32³ and below). Same weights, same
    result up to float rounding (about 1e-7 on a network's outputs), same autograd.

    TorchScript, the ONNX exporter, ``torch.compile`` and any active ``TorchDispatchMode`` (the FLOP counter, the
    memory timeline) get the ordinary ``aten::convolution``.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if (not torch.jit.is_scripting() and not torch.jit.is_tracing() and input.device.type == "cpu"
                and input.dtype == torch.float32 and self.padding_mode == "zeros" and not isinstance(self.padding, str)):
            return self._onednn(input, weight, bias)
        if self.padding_mode != "zeros":
            return F.conv3d(F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode), weight, bias,
                            self.stride, [0, 0, 0], self.dilation, self.groups)
        return F.conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.jit.unused
    def _onednn(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _watched() or not torch.backends.mkldnn.is_available():
            return F.conv3d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if not torch.is_grad_enabled():
            out_depth = self._out_size(input.shape[2], 0)
            out_bytes = input.shape[0] * self.out_channels * out_depth * input.element_size() * math.prod(
                self._out_size(input.shape[axis], axis - 2) for axis in (3, 4))
            if out_bytes >= SLAB_CONV_MIN_BYTES and out_depth > 1:
                return self._by_slabs(input, weight, bias, out_depth)
        return torch.mkldnn_convolution(input, weight, bias, list(self.padding), list(self.stride), list(self.dilation),
                                        self.groups)

    def _out_size(self, size: int, axis: int) -> int:
        reach = self.dilation[axis] * (self.kernel_size[axis] - 1)
        return (size + 2 * self.padding[axis] - reach - 1) // self.stride[axis] + 1

    @torch.jit.unused
    def share(self, input: torch.Tensor, first_channel: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """What input channels ``first_channel, first_channel + 1, ...`` (``input``'s) contribute to this convolution
        of a concatenation, by slabs, added into ``out`` (or a new tensor, with the bias). The shares of the parts of
        ``torch.cat(parts, 1)`` sum to the convolution of it (up to float rounding: another summation order), so a
        part can be freed as soon as its share is in. Inference only: a stride-1 3D convolution of one group."""
        weight = self.weight[:, first_channel:first_channel + input.shape[1]].contiguous()
        bias = self.bias if out is None else None
        return self._by_slabs(input, weight, bias, self._out_size(input.shape[2], 0), out)

    def can_share(self) -> bool:
        """Whether :meth:`share` computes this convolution: stride 1, one group, zero padding, output size = input size."""
        return (self.stride == (1, 1, 1) and self.groups == 1 and self.padding_mode == "zeros"
                and not isinstance(self.padding, str)
                and all(2 * p == d * (k - 1) for p, d, k in zip(self.padding, self.dilation, self.kernel_size)))

    @torch.jit.unused
    def _by_slabs(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  out_depth: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution a slab of output depth at a time (:func:`slab_bounds`), each written into the output.

        oneDNN converts a whole input and output to its blocked layouts and back, so one convolution of a large
        volume holds about an output's worth of memory beside its input and output (39 MiB more than the 16 MiB
        output for 32 -> 16 channels at 64³, one thread); by slabs that is a slab's worth, and the smaller working
        set is no slower. Each slab reads the input rows its outputs need, zero-padded in depth at the volume's
        ends; height and width are padded by the convolution as usual. Same products and sums per output, so the
        same result (``torch.equal`` in the tests). With ``out`` each slab is added into it instead.
        """
        accumulate = out is not None
        if out is None:
            out = input.new_empty(input.shape[0], self.out_channels, out_depth,
                                  self._out_size(input.shape[3], 1), self._out_size(input.shape[4], 2))
        for start, stop, slab in self.slabs(input, weight, bias, out_depth):
            if accumulate:
                out[:, :, start:stop] += slab
            else:
                out[:, :, start:stop] = slab
        return out

    @torch.jit.unused
    def slabs(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              out_depth: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, output planes start..stop-1)`` of this convolution with ``weight`` and ``bias``, slab by slab."""
        stride, pad, reach = self.stride[0], self.padding[0], self.dilation[0] * (self.kernel_size[0] - 1)
        depth = input.shape[2]
        for start, stop in slab_bounds(out_depth):
            first, last = start * stride - pad, (stop - 1) * stride - pad + reach + 1  # input rows [first, last)
            rows = input[:, :, max(first, 0):min(last, depth)]
            if first < 0 or last > depth:
                rows = F.pad(rows, (0, 0, 0, 0, max(-first, 0), max(last - depth, 0)))
            yield start, stop, torch.mkldnn_convolution(rows.contiguous(), weight, bias,
                                                        [0, self.padding[1], self.padding[2]], list(self.stride),
                                                        list(self.dilation), self.groups)


class ShuffleConvTranspose3d(nn.ConvTranspose3d):
    """``torch.nn.ConvTranspose3d`` with kernel 2 and stride 2 (a U-Net's up-convolution), lighter at inference.

    Such a transposed conv is a 1x1 conv to ``8 x out_channels`` channels followed by a pixel-shuffle: each input
    voxel makes its own 2x2x2 output block. Without autograd on the CPU, it runs that way one slab at a time
    (:func:`slab_bounds`), each slab written pixel-shuffled into the output, so the col2vol columns of PyTorch's
    CPU kernel (as large as the output) are never made. Same weights, same result up to float rounding.
    TorchScript, the ONNX exporter and any active ``TorchDispatchMode`` get ``conv_transpose3d``.
    """

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if (not torch.jit.is_scripting() and not torch.jit.is_tracing() and output_size is None
                and not torch.is_grad_enabled() and input.device.type == "cpu"):
            return self._by_slabs(input)
        return F.conv_transpose3d(input, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                  self.groups, self.dilation)

    @torch.jit.unused
    def _by_slabs(self, input: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The up-convolution slab by slab, written into ``out`` (a new tensor if None; a view, such as the first
        channels of a concatenation, works as well)."""
        if _watched():
            upsampled = F.conv_transpose3d(input, self.weight, self.bias, 2)
            return upsampled if out is None else out.copy_(upsampled)
        b, _, d, h, w = input.shape
        if out is None:
            out = input.new_empty(b, self.out_channels, 2 * d, 2 * h, 2 * w)
        # weight (in, out, 2, 2, 2) -> a 1x1 conv whose output channel o * 8 + offset is pixel_shuffle's order.
        weight = self.weight.permute(1, 2, 3, 4, 0).reshape(-1, self.in_channels, 1, 1, 1)
        bias = None if self.bias is None else self.bias.repeat_interleave(8)
        for start, stop in slab_bounds(d):
            target, source = _shuffled_pair(out[:, :, 2 * start:2 * stop], F.conv3d(input[:, :, start:stop], weight, bias), 3, 2)
            target.copy_(source)
        return out


class DepthStackedConv3d(nn.Conv3d):
    """``torch.nn.Conv3d`` written as one 2D convolution over the depth slices, for ONNX graphs.

    Each output depth slice of a 3D convolution is a 2D convolution of the ``kernel_size[0]`` input slices around
    it, stacked as channels: the input is viewed as (batch x depth) images of ``kernel depth x in_channels``
    channels and convolved with the weight reshaped to 2D. The result is the same up to float rounding. Under
    onnxruntime on a CPU this is faster, in int8 above all: 2D convolutions get its blocked (NCHWc) fp32 kernels
    and its fast quantized 2D kernels, while 3D ones go through a generic im2col path
    (``benchmarks/deploy/conv2d_export.py``). Only for convolutions of stride and dilation 1 along the depth, one
    group and zero padding (:func:`conv3d_as_2d` picks those); the weight stays 3D, so state dicts are unchanged.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        depth_kernel, depth_padding = self.kernel_size[0], self.padding[0]
        slices = input.transpose(1, 2)  # (B, D, C, H, W): every depth slice an image
        if depth_padding:
            slices = F.pad(slices, (0, 0, 0, 0, 0, 0, depth_padding, depth_padding))
        depth = slices.shape[1] - depth_kernel + 1
        if depth_kernel > 1:  # channel k * C + c of slice d is channel c of input slice d + k
            slices = torch.cat([slices[:, k:k + depth] for k in range(depth_kernel)], dim=2)
        weight_2d = weight.transpose(1, 2).reshape(weight.shape[0], -1, weight.shape[3], weight.shape[4])
        out = F.conv2d(slices.reshape(-1, slices.shape[2], slices.shape[3], slices.shape[4]), weight_2d, bias,
                       self.stride[1:], self.padding[1:], self.dilation[1:])
        return out.reshape(-1, depth, out.shape[1], out.shape[2], out.shape[3]).transpose(1, 2)


def conv3d_as_2d(network: nn.Module) -> nn.Module:
    """Make every 3D convolution of ``network`` that :class:`DepthStackedConv3d` can compute one (in place;
    returns ``network``). Meant for a copy that is exported to ONNX, not for training or PyTorch inference."""
    for module in network.modules():
        if (isinstance(module, nn.Conv3d) and module.groups == 1 and module.stride[0] == 1
                and module.dilation[0] == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
            module.__class__ = DepthStackedConv3d
    return network


def _is_up_convolution(module: nn.Module) -> bool:
    return (type(module) is nn.ConvTranspose3d and module.kernel_size == (2, 2, 2) and module.stride == (2, 2, 2)
            and module.padding == (0, 0, 0) and module.output_padding == (0, 0, 0) and module.dilation == (1, 1, 1)
            and module.groups == 1)


def use_onednn_convs(network: nn.Module) -> nn.Module:
    """Make every plain ``torch.nn.Conv3d`` in ``network`` an :class:`OneDNNConv3d`, and every 2x2x2 up-convolution
    a :class:`ShuffleConvTranspose3d` (in place; returns ``network``).

    The subclasses add no state, so parameters, state-dict keys and checkpoints are unchanged; every network the
    registry builds (MONAI's baselines included, so comparisons stay fair) goes through this.
    """
    for module in network.modules():
        if type(module) is nn.Conv3d:
            module.__class__ = OneDNNConv3d
        elif _is_up_convolution(module):
            module.__class__ = ShuffleConvTranspose3d
    return network


class SubPixelHead(nn.Sequential):
    """A convolution to ``C x factor**dims`` channels, then :class:`PixelShuffle` (the unshuffle stem's head).

    At inference on the CPU, a 3D head of a large output runs the convolution by slabs
    (:meth:`OneDNNConv3d.slabs`) and writes each slab pixel-shuffled into the output, so the convolution's whole
    output (as large as the logits) is never made beside them. Same values, bit for bit. Otherwise, and in
    training, TorchScript and the ONNX exporter, it is the ``nn.Sequential`` it subclasses (same state-dict keys).
    """

    def __init__(self, conv: nn.Module, shuffle: PixelShuffle) -> None:
        super().__init__(conv, shuffle)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            return self._eager(input)
        for module in self:
            input = module(input)
        return input

    @torch.jit.unused
    def _eager(self, input: torch.Tensor) -> torch.Tensor:
        if self._by_slabs_applies(input):
            return self._by_slabs(input)
        for module in self:
            input = module(input)
        return input

    def _by_slabs_applies(self, input: torch.Tensor) -> bool:
        conv, shuffle = self[0], self[1]
        return (type(conv) is OneDNNConv3d and conv.can_share() and shuffle.spatial_dims == 3
                and not torch.is_grad_enabled() and input.device.type == "cpu" and input.dtype == torch.float32
                and input[:, :1].numel() * conv.out_channels * input.element_size() >= SLAB_CONV_MIN_BYTES
                and torch.backends.mkldnn.is_available() and not _watched()
                and not any(_has_hooks(module) for module in self))

    def _by_slabs(self, input: torch.Tensor) -> torch.Tensor:
        conv, factor = self[0], self[1].factor
        b, _, d, h, w = input.shape
        out = input.new_empty(b, conv.out_channels // factor**3, d * factor, h * factor, w * factor)
        for start, stop, slab in conv.slabs(input, conv.weight, conv.bias, d):
            target, source = _shuffled_pair(out[:, :, factor * start:factor * stop], slab, 3, factor)
            target.copy_(source)
        return out


class ImageGuidedHead(nn.Module):
    """A sub-pixel head whose logits also read the image itself at full resolution.

    The unshuffle stem's network sees each 2x2x2 block of voxels only through the features of its half-resolution
    voxel. This head adds, to the logits of ``head`` (a :class:`SubPixelHead`), a linear map of each block's own
    voxel intensities to that block's logits: a 1x1 convolution of the pixel-unshuffled image, pixel-shuffled back
    (``8 x in_channels x 8 x C`` weights, no bias). It gives the logits the sub-voxel intensity contrast (where an
    edge runs inside a block) that a half-resolution feature may have lost, for no full-resolution convolution.
    The map starts at zero, so an untrained head is ``head`` alone.

    Call it as ``head(x, image)`` with the (padded) network input. At inference (no autograd, outside TorchScript
    and the exporters) the image's share is added into the logits slab by slab (:func:`slab_bounds`), through a
    pixel-shuffled view: neither the unshuffled image nor its share is ever whole.
    """

    def __init__(self, head: SubPixelHead, image_channels: int) -> None:
        super().__init__()
        conv, shuffle = head[0], head[1]
        self.spatial_dims, self.factor = shuffle.spatial_dims, shuffle.factor
        self.head = head
        self.image = Conv[Conv.CONV, self.spatial_dims](image_channels * self.factor**self.spatial_dims,
                                                        conv.out_channels, kernel_size=1, bias=False)
        nn.init.zeros_(self.image.weight)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            return self._eager(x, image)
        return self._add_whole(self.head(x), image)

    def _add_whole(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        d, f = self.spatial_dims, self.factor
        return logits + pixel_shuffle(self.image(pixel_unshuffle(image, d, f)), d, f)

    @torch.jit.unused
    def _eager(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)
        if torch.is_grad_enabled() or _watched():
            return self._add_whole(logits, image)
        d, f = self.spatial_dims, self.factor
        for start, stop in slab_bounds(image.shape[2], multiple=f):
            share = self.image(pixel_unshuffle(image[:, :, start:stop], d, f))
            add_pixel_shuffled_(logits[:, :, start:stop], share, d, f)
        return logits


class RefinedHead(nn.Module):
    """A sub-pixel head followed by a thin refinement at full resolution, which reads the logits and the image.

    The unshuffle stem's network has no convolution at full resolution: each voxel's logits are a linear map of
    half-resolution features. This head adds a small non-linear full-resolution stage on top of ``head`` (a
    :class:`SubPixelHead`): a 3x3x3 convolution of the logits and the image to ``hidden`` channels, leaky ReLU, and a
    1x1 convolution back to the classes, added to the logits (``logits + refine(cat(logits, image))``). The last
    convolution starts at zero, so an untrained head is ``head`` alone. With 2 classes, one image channel and 8 hidden
    channels it is 674 weights.

    Call it as ``head(x, image)`` with the (padded) network input. At inference on the CPU (no autograd, outside
    TorchScript and the exporters) the refinement runs slab by slab along the depth (:func:`slab_bounds`) and adds
    each slab into the logits in place: the hidden channels and the concatenation only ever exist for a slab, so the
    stage adds a few MiB to the peak, not the 64 MiB of 8 channels at 128³. Each slab reads the original logits one
    plane beyond it on both sides (the plane before it, already refined, is kept from the previous slab), so the result
    is the whole-volume one up to float rounding.
    """

    def __init__(self, head: SubPixelHead, image_channels: int, hidden: int, negative_slope: float = 0.01) -> None:
        super().__init__()
        conv, shuffle = head[0], head[1]
        self.spatial_dims = shuffle.spatial_dims
        classes = conv.out_channels // shuffle.factor**self.spatial_dims
        self.head = head
        self.negative_slope = negative_slope
        conv_type = Conv[Conv.CONV, self.spatial_dims]
        self.refine = conv_type(classes + image_channels, hidden, kernel_size=3, padding=1)
        self.out = conv_type(hidden, classes, kernel_size=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not torch.jit.is_tracing():
            return self._eager(x, image)
        return self._add_whole(self.head(x), image)

    def _add_whole(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return logits + self.out(F.leaky_relu(self.refine(torch.cat([logits, image], 1)), self.negative_slope))

    @torch.jit.unused
    def _eager(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        logits = self.head(x)
        if self._by_slabs_applies(logits):
            return self._by_slabs(logits, image)
        return self._add_whole(logits, image)

    @torch.jit.unused
    def _by_slabs_applies(self, logits: torch.Tensor) -> bool:
        return (self.spatial_dims == 3 and not torch.is_grad_enabled() and logits.device.type == "cpu"
                and logits.dtype == torch.float32 and logits.shape[2] > 2 and torch.backends.mkldnn.is_available()
                and not _watched() and not any(_has_hooks(module) for module in self.modules()))

    @torch.jit.unused
    def _by_slabs(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        depth = logits.shape[2]
        weight, bias = self.refine.weight, self.refine.bias
        padding = [0, self.refine.padding[1], self.refine.padding[2]]
        before: torch.Tensor | None = None  # the original plane just before the slab (the slab before has been refined)
        for start, stop in slab_bounds(depth):
            last = min(stop + 1, depth)
            parts = [logits[:, :, start:last]] if before is None else [before, logits[:, :, start:last]]
            rows = torch.cat([torch.cat(parts, 2), image[:, :, max(start - 1, 0):last]], 1)
            rows = F.pad(rows, (0, 0, 0, 0, 1 if start == 0 else 0, 1 if stop == depth else 0))
            hidden = torch.mkldnn_convolution(rows, weight, bias, padding, [1, 1, 1], [1, 1, 1], 1)
            share = self.out(F.leaky_relu_(hidden, self.negative_slope))
            before = logits[:, :, stop - 1:stop].clone()
            logits[:, :, start:stop] += share
        return logits


class MaxPoolHalving(nn.Module):
    """Max pooling with kernel 2 and stride 2 (``torch.nn.MaxPool2d/3d(2)``), lighter at inference.

    Without autograd (and outside TorchScript and the ONNX tracer, which get the usual ``max_pool``), an input of
    even size is pooled as a max over a view that splits every axis into (size / 2, 2). The result is the same,
    element for element, but the CPU kernel of ``max_pool3d`` also makes the int64 indices of the maxima, twice
    the size of its output, and at the finest level those sit on the peak of a lean network's inference.
    """

    def __init__(self, spatial_dims: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        even = all(size % 2 == 0 for size in x.shape[2:])
        if even and not torch.is_grad_enabled() and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            for axis in range(x.dim() - 1, 1, -1):
                x = x.unflatten(axis, (x.shape[axis] // 2, 2))
            return x.amax(dim=[3 + 2 * i for i in range(self.spatial_dims)])
        return F.max_pool2d(x, 2) if self.spatial_dims == 2 else F.max_pool3d(x, 2)


class PixelUnshuffle(nn.Module):
    """Module form of :func:`pixel_unshuffle` (space-to-depth by ``factor``)."""

    def __init__(self, spatial_dims: int, factor: int = 2) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle(x, self.spatial_dims, self.factor)


class PixelShuffle(nn.Module):
    """Module form of :func:`pixel_shuffle` (depth-to-space by ``factor``)."""

    def __init__(self, spatial_dims: int, factor: int = 2) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle(x, self.spatial_dims, self.factor)


class FlatSpatialFilter(nn.Module):
    """OneNet's "spatial convolution": one ``kernel_size``-tap filter over the flattened tensor, then ReLU.

    The tensor is laid out channels-last and flattened to (B, 1, prod(S) * C), so after a
    pixel-unshuffle the filter mixes the sub-pixel positions of one voxel (and, at the ends, its
    neighbour's). Reflection padding keeps the length. ``kernel_size + 1`` parameters in all.

    The filter is computed as a sum of ``kernel_size`` shifted copies rather than by ``conv1d``: one input
    channel over a length of millions makes the convolution kernels (and above all their weight gradient)
    slow and, on the CPU, im2col-sized in memory; the shifted sum is the same function in a few
    elementwise passes. ``self.conv`` holds the weights, so checkpoints are unchanged.
    """

    def __init__(self, kernel_size: int = 9) -> None:
        super().__init__()
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"spatial filter kernel_size must be odd and >= 3, got {kernel_size}")
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=kernel_size // 2, padding_mode="reflect")
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        dims = x.dim()
        channels_last = x.movedim(1, dims - 1)
        flat = channels_last.reshape(shape[0], 1, -1)
        return self.act(self._filter(flat)).reshape(channels_last.shape).movedim(dims - 1, 1)

    def extra_macs(self, output: torch.Tensor) -> int:
        """Multiply-accumulates of one forward (the profiler's counter sees no convolution op here)."""
        return output.numel() * self.conv.weight.shape[-1]

    def _filter(self, flat: torch.Tensor) -> torch.Tensor:
        """``self.conv(flat)`` (cross-correlation, reflection padding) as a sum of shifted copies."""
        taps = self.conv.weight.shape[-1]
        length = flat.shape[-1]
        padded = F.pad(flat, (taps // 2, taps // 2), mode="reflect")
        weight = self.conv.weight.view(-1).to(flat.dtype)
        out = padded[..., 0:length] * weight[0]
        for tap in range(1, taps):
            out = out + padded[..., tap : tap + length] * weight[tap]
        bias = self.conv.bias
        return out + bias.to(flat.dtype) if bias is not None else out


class ChannelLayerNorm(nn.Module):
    """LayerNorm over channels at every pixel/voxel, with a per-channel affine (as in NAFNet), N-D."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        var = (x - mean).pow(2).mean(dim=1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class SimplifiedChannelAttention(nn.Module):
    """NAFNet's channel attention without the sigmoid: ``x * conv1x1(global_avg_pool(x))``."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.conv = pointwise(spatial_dims, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=list(range(2, x.dim())), keepdim=True)
        return x * self.conv(pooled)
