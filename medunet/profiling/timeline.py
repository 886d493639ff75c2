"""Live tensor memory through one forward, module by module, with the skip-held share as its own band.

The UNet-- paper (Yin et al., arXiv 2412.18276, Figure 1(b)) draws the memory the skips hold over the
forward pass. :func:`record_timeline` measures that and the rest of the live memory on the real tensors:

- ``method="tensors"`` (the default on the CPU): a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
  sees every tensor an op returns; each new storage is counted (by ``data_ptr``) until a weak reference's
  callback says it was freed. The figure is the sum of live storages' ``nbytes``: deterministic, and
  independent of machine load and of allocator caching. It does not see scratch memory an op allocates
  and frees inside one kernel (a convolution's workspace), which the process's RSS does.
- ``method="allocator"`` (the default on CUDA): ``torch.cuda.memory_allocated`` at each sample and
  ``max_memory_allocated`` between samples, workspaces included.

Samples are taken before and after every leaf module (forward pre/post hooks), each with the module's
qualified name; between two samples the high-water mark is kept, and with ``method="tensors"`` also the op
that reached it (``torch.cat`` in a decoder's merge runs in no leaf module). Parameters, buffers and the
input are not in the live figure: they are reported separately. Skip-held bytes are those of the live
tensors the network keeps for its decoder (:class:`SkipWatcher`): what a medunet
:class:`~medunet.networks.skeleton.UNetSkeleton`'s skip strategy puts in its ``state`` list (seen by a
forward hook on ``skips``, so the normal forward carries nothing extra), or, for MONAI's networks, the
tensors their decoders will read, marked where they are produced.

Example::

    timeline = record_timeline("lunet_small_8f_unshuffle", "1x1x64x64x64")
    print(timeline.peak_bytes / 2**20, timeline.peak_where, timeline.peak_skip_bytes / 2**20)
    plot_timelines([timeline], "timeline.png")
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from medunet.checks import parse_shape
from medunet.networks.layers import runs_child_by_child

MIB = 2**20
METHODS = ("tensors", "allocator")


@dataclass
class TimelineSample:
    """One sample: at a leaf module's boundary (``event`` "pre"/"post"), or after an op in backward ("op")."""

    index: int
    event: str
    module: str
    stage: str
    #: Live activation bytes at this moment (parameters, buffers and input excluded).
    live_bytes: int
    #: Of ``live_bytes``, those held by the skips.
    skip_bytes: int
    #: The most live bytes since the previous sample, and where that was reached.
    high_bytes: int
    high_where: str
    high_skip_bytes: int


@dataclass
class Timeline:
    """What :func:`record_timeline` measured: the samples and the peak."""

    name: str
    input_shape: tuple[int, ...]
    device: str
    method: str
    phase: str
    params_bytes: int
    buffers_bytes: int
    input_bytes: int
    samples: list[TimelineSample] = field(default_factory=list)

    @property
    def peak_sample(self) -> TimelineSample:
        return max(self.samples, key=lambda s: s.high_bytes)

    @property
    def peak_bytes(self) -> int:
        """Most live activation bytes at any moment of the pass (parameters, buffers, input excluded)."""
        return self.peak_sample.high_bytes

    @property
    def peak_where(self) -> str:
        return self.peak_sample.high_where

    @property
    def peak_skip_bytes(self) -> int:
        """Skip-held bytes at the moment of the peak."""
        return self.peak_sample.high_skip_bytes

    @property
    def max_skip_bytes(self) -> int:
        return max((s.skip_bytes for s in self.samples), default=0)

    def as_dict(self) -> dict[str, Any]:
        facts = asdict(self)
        facts.update(peak_bytes=self.peak_bytes, peak_where=self.peak_where, peak_skip_bytes=self.peak_skip_bytes,
                     max_skip_bytes=self.max_skip_bytes)
        return facts

    @classmethod
    def from_dict(cls, facts: dict[str, Any]) -> Timeline:
        known = {k: v for k, v in facts.items() if k in cls.__dataclass_fields__}
        known["input_shape"] = tuple(known["input_shape"])
        known["samples"] = [TimelineSample(**s) for s in known.get("samples", [])]
        return cls(**known)


class LiveTensorTracker(TorchDispatchMode):
    """Counts the bytes of storages created by ops inside the mode while they are alive.

    Storages that exist before (parameters, the input: ``exclude``) are never counted, nor are views and
    in-place results (their storage is already known). ``on_new_high`` is called with the op name each time
    the live total rises above the high-water mark set by :meth:`reset_high`.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.live_bytes = 0
        self.high_bytes = 0
        self.high_op = ""
        self.on_new_high: Callable[[str], None] | None = None
        #: Called with the op name after every op (the backward of a training step is sampled this way).
        self.after_op: Callable[[str], None] | None = None

    def reset_high(self) -> None:
        self.high_bytes = self.live_bytes
        self.high_op = ""

    def _free(self, key: int, ref: weakref.ref) -> None:
        if self._refs.get(key) is ref:
            del self._refs[key]
            self.live_bytes -= self.live.pop(key)

    def _add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self._excluded:
            return
        known = self._refs.get(key)
        if known is not None and known() is storage:
            return  # a view or an in-place result: already counted
        if known is not None:  # a freed storage whose address was reused before its callback ran
            self.live_bytes -= self.live.pop(key)
        self._refs[key] = weakref.ref(storage, lambda ref, key=key: self._free(key, ref))
        self.live[key] = nbytes
        self.live_bytes += nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                self._add(item)
        if self.live_bytes > self.high_bytes:
            self.high_bytes = self.live_bytes
            self.high_op = str(func.overloadpacket.__name__)
            if self.on_new_high is not None:
                self.on_new_high(self.high_op)
        if self.after_op is not None:
            self.after_op(str(func.overloadpacket.__name__))
        return out


def _unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class SkipWatcher:
    """Knows, at any moment of a forward, how many bytes the network's skips hold.

    A skip tensor is one the network keeps for its decoder: for a :class:`UNetSkeleton`, each tensor its
    skip strategy puts in its ``state`` list (caught by a forward hook on ``skips``: ordinary skips' encoder
    features, UNet--'s aggregate E'); for MONAI's networks, the tensors their decoders will read
    (``medunet.profiling.skips._skip_sources``). Each counts for as long as it is alive: a popped skip until
    its merge is done, E' until the last IEM has read it.
    """

    def __init__(self, net: nn.Module) -> None:
        from medunet.networks.baselines import PadToDivisible
        from medunet.networks.skeleton import UNetSkeleton
        from medunet.profiling.skips import _skip_sources

        self._marked: dict[int, tuple[weakref.ref, int]] = {}
        self.handles: list[Any] = []
        inner = net.network if isinstance(net, PadToDivisible) else net
        if isinstance(inner, UNetSkeleton):
            self.handles.append(inner.skips.register_forward_hook(lambda m, args, state: self._mark(state)))
            return
        for module, where in _skip_sources(inner):
            if where == "output":
                self.handles.append(module.register_forward_hook(lambda m, args, out: self._mark(out)))
            else:
                self.handles.append(module.register_forward_pre_hook(lambda m, args: self._mark(args[0])))

    def _mark(self, tensors: object) -> None:
        for tensor in tree_flatten(tensors)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self._marked[storage.data_ptr()] = (weakref.ref(storage), storage.nbytes())

    def held_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self._marked.values() if ref() is not None)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def stage_labeller(net: nn.Module) -> Callable[[str], str]:
    """A function from a module's qualified name to the stage it belongs to (``enc 2``, ``dec 0``, ``head``).

    Understands medunet's :class:`UNetSkeleton` (MSIAM pieces count to their encoder level, IEM expanders to
    their decoder level) and MONAI's ``UNet`` (nested ``SkipConnection``); other names keep their first part.
    """
    from medunet.networks.baselines import PadToDivisible
    from medunet.networks.skeleton import UNetSkeleton

    prefix = "network." if isinstance(net, PadToDivisible) else ""
    inner = net.network if isinstance(net, PadToDivisible) else net
    if isinstance(inner, UNetSkeleton):
        top = len(inner.decoder) - 1
        skip_levels = sorted(getattr(inner.skips, "skip_levels", []))

        def skeleton_stage(name: str) -> str:
            parts = name.removeprefix(prefix).split(".")
            if parts[0] == "encoder":
                return f"enc {parts[1]}"
            if parts[0] == "decoder":
                return f"dec {top - int(parts[1])}"
            if parts[0] == "skips" and len(parts) > 2 and parts[1] in ("pieces", "expanders"):
                level = skip_levels[int(parts[2])]
                return f"enc {level}" if parts[1] == "pieces" else f"dec {level}"
            return parts[0]

        return skeleton_stage

    def generic_stage(name: str) -> str:
        rest = name.removeprefix(prefix)
        if rest.startswith("model."):  # MONAI UNet: model = [down, SkipConnection(submodule), up], nested
            rest, depth = rest[len("model."):], 0
            while rest.startswith("1.submodule."):
                rest, depth = rest[len("1.submodule."):], depth + 1
            first = rest.split(".")[0]
            return {"0": f"enc {depth}", "2": f"dec {depth}"}.get(first, "bottom")
        return rest.split(".")[0] or "net"

    return generic_stage


class _Recorder:
    """Hooks on every module: a stack of active names, and a sample at each leaf module's boundary."""

    def __init__(self, net: nn.Module, device: torch.device, method: str, skips: SkipWatcher,
                 stage_of: Callable[[str], str], tracker: LiveTensorTracker | None) -> None:
        self.device, self.method, self.skips, self.stage_of, self.tracker = device, method, skips, stage_of, tracker
        self.samples: list[TimelineSample] = []
        self.stack: list[str] = []
        self.last_leaf = "input"
        self.last_event = "post"
        self.high_where = ""
        self.high_skip = 0
        self.handles: list[Any] = []
        self.baseline = torch.cuda.memory_allocated(device) if method == "allocator" else 0
        for name, module in net.named_modules():
            leaf = next(module.children(), None) is None
            if not leaf and runs_child_by_child(module):
                # A hooked container is called as a whole, which would keep its input alive through it: the
                # no-grad forward runs plain Sequentials and residual units child by child
                # (networks.layers.run_releasing) only while they have no hooks. Their leaves carry their names anyway.
                continue
            self.handles.append(module.register_forward_pre_hook(self._pre(name or "<net>", leaf)))
            self.handles.append(module.register_forward_hook(self._post(name or "<net>", leaf)))
        if tracker is not None:
            tracker.on_new_high = self._new_high

    def _where(self, op: str) -> str:
        """Where the forward is now: the active leaf module, or the container running code between leaves."""
        if self.last_event == "pre":
            place = self.last_leaf
        else:
            place = f"{self.stack[-1] if self.stack else '<net>'} after {self.last_leaf}"
        return f"{place} [{op}]" if op else place

    def _new_high(self, op: str) -> None:
        self.high_where = self._where(op)
        self.high_skip = self.skips.held_bytes()

    def live(self) -> int:
        if self.tracker is not None:
            return self.tracker.live_bytes
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device) - self.baseline

    def sample(self, event: str, module: str) -> None:
        live, skip = self.live(), self.skips.held_bytes()
        if self.tracker is not None:
            high = max(self.tracker.high_bytes, live)
            # Where the tracker saw the high-water rise, else (it did not rise) here, at the boundary.
            where, high_skip = (self.high_where, self.high_skip) if self.high_where else (self._where(""), skip)
            self.tracker.reset_high()
        else:
            torch.cuda.synchronize(self.device)
            high = max(torch.cuda.max_memory_allocated(self.device) - self.baseline, live)
            # The allocator cannot say when inside the interval: the skips held at most this much in it.
            where, high_skip = self._where(""), max(skip, self.high_skip)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.samples.append(TimelineSample(len(self.samples), event, module, self.stage_of(module), live, skip,
                                           high, where, high_skip))
        self.high_where, self.high_skip = "", skip

    def _pre(self, name: str, leaf: bool) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self.stack.append(name)
            if leaf:
                self.sample("pre", name)  # the interval that ends here ran between leaves
                self.last_leaf, self.last_event = name, "pre"

        return hook

    def _post(self, name: str, leaf: bool) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Any) -> None:
            if leaf:
                self.sample("post", name)  # the interval that ends here ran inside this leaf
                self.last_leaf, self.last_event = name, "post"
            if self.stack:
                self.stack.pop()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def record_timeline(
    network: nn.Module | str,
    input_shape: tuple[int, ...] | str,
    device: str | torch.device = "cpu",
    method: str | None = None,
    train: bool = False,
    name: str | None = None,
    **overrides: Any,
) -> Timeline:
    """Live memory through one forward of ``network`` on a random input, sampled at every leaf module.

    Args:
        network: an ``nn.Module`` or a registry preset name (built for the input's channels and dimensions
            plus ``overrides``, e.g. ``out_channels=2``).
        input_shape: ``(B, C, *spatial)`` or ``"1x1x128x128x128"``.
        device: where to run.
        method: ``"tensors"`` (live storages, any device; default on the CPU) or ``"allocator"`` (CUDA's
            ``memory_allocated``; default on CUDA).
        train: record a training step instead: a forward in train mode with autograd, then the backward of
            the mean logit (sampled after each backward op; gradients count as live).
        name: the name in the report (default: the preset name or the class name).

    Returns:
        a :class:`Timeline`; ``peak_bytes`` excludes parameters, buffers and the input (reported apart).
    """
    from medunet.profiling.profiler import build

    shape = parse_shape(input_shape) if isinstance(input_shape, str) else tuple(input_shape)
    device = torch.device(device)
    method = method or ("allocator" if device.type == "cuda" else "tensors")
    if method not in METHODS:
        raise ValueError(f"timeline method must be one of {METHODS}, got {method!r}")
    if method == "allocator" and device.type != "cuda":
        raise ValueError(f"method='allocator' reads CUDA's allocator; device is {device}. Use method='tensors'.")
    torch.manual_seed(0)
    net = build(network, shape, **overrides).to(device).train(train)
    x = torch.randn(shape, device=device)
    params, buffers = list(net.parameters()), list(net.buffers())
    timeline = Timeline(
        name=name or (network if isinstance(network, str) else type(network).__name__),
        input_shape=shape, device=str(device), method=method, phase="training" if train else "inference",
        params_bytes=_unique_storage_bytes(params), buffers_bytes=_unique_storage_bytes(buffers), input_bytes=_unique_storage_bytes([x]),
    )
    tracker = LiveTensorTracker(exclude=[*params, *buffers, x]) if method == "tensors" else None
    skips = SkipWatcher(net)
    if method == "allocator":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    recorder = _Recorder(net, device, method, skips, stage_labeller(net), tracker)
    try:
        with torch.set_grad_enabled(train), tracker if tracker is not None else contextlib.nullcontext():
            recorder.sample("pre", "input")
            out = net(x)
            recorder.close()
            skips.close()
            if train:
                _record_backward(out, recorder)
            del out
            recorder.sample("post", "freed")
    finally:
        recorder.close()
        skips.close()
        if tracker is not None:
            tracker.on_new_high = tracker.after_op = None
    timeline.samples = recorder.samples
    return timeline


def _record_backward(out: torch.Tensor, recorder: _Recorder) -> None:
    """Backward of the mean logit, sampled after each op (module hooks do not fire in backward)."""
    recorder.last_leaf, recorder.last_event, recorder.stack = "backward", "pre", []
    loss = out.float().mean()
    tracker = recorder.tracker
    if tracker is None:
        loss.backward()
        recorder.sample("op", "backward")
        return
    tracker.after_op = lambda op: recorder.sample("op", f"backward.{op}")
    try:
        loss.backward()
    finally:
        tracker.after_op = None


def timeline_rows(timelines: Sequence[Timeline], baseline: str | None = None) -> list[dict[str, str]]:
    """One row per timeline: peak live MiB (and its ratio to ``baseline``), where, skip-held MiB at the peak."""
    reference = next((t for t in timelines if t.name == baseline), None)
    rows = []
    for timeline in timelines:
        peak = f"{timeline.peak_bytes / MIB:.1f}"
        if reference is not None and timeline is not reference and reference.peak_bytes:
            peak += f" ({timeline.peak_bytes / reference.peak_bytes:.2f}x)"
        share = timeline.peak_skip_bytes / timeline.peak_bytes if timeline.peak_bytes else 0.0
        rows.append({
            "network": timeline.name,
            "peak live MiB": peak,
            "at": timeline.peak_where,
            "skip-held at peak MiB": f"{timeline.peak_skip_bytes / MIB:.2f} ({share:.0%})",
            "max skip-held MiB": f"{timeline.max_skip_bytes / MIB:.2f}",
            "params MiB": f"{(timeline.params_bytes + timeline.buffers_bytes) / MIB:.2f}",
            "input MiB": f"{timeline.input_bytes / MIB:.1f}",
        })
    return rows


def _stage_ticks(samples: Sequence[TimelineSample]) -> list[tuple[int, str]]:
    """The first sample of each run of one stage, labelled by it: sparse ticks along the x axis. A bare
    ``skips`` call (ordinary skips: a list append) belongs to the encoder level before it: no tick."""
    ticks, previous = [], None
    for sample in samples:
        stage = "backward" if sample.event == "op" else sample.stage
        if stage != previous and stage not in ("skips", "input", "freed"):
            ticks.append((sample.index, stage))
            previous = stage
    return ticks


def plot_timelines(timelines: Sequence[Timeline], path: str | Path, title: str | None = None) -> Path:
    """Draw the timelines one above the other on one memory scale (MiB), like the UNet-- paper's Figure 1(b):
    skip-held memory as its own shaded band under the rest of the live memory, the high-water between samples
    as a thin line, and the peak marked. Returns the path written (PNG, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    count = len(timelines)
    figure, axes = plt.subplots(count, 1, figsize=(11, 2.6 * count + 0.8), sharey=True, squeeze=False)
    for axis, timeline in zip(axes[:, 0], timelines):
        index = [s.index for s in timeline.samples]
        live = [s.live_bytes / MIB for s in timeline.samples]
        skip = [s.skip_bytes / MIB for s in timeline.samples]
        high = [s.high_bytes / MIB for s in timeline.samples]
        axis.fill_between(index, 0, skip, step="post", color="tab:blue", alpha=0.55, label="held by skips", lw=0)
        axis.fill_between(index, skip, live, step="post", color="tab:orange", alpha=0.35, label="other live tensors", lw=0)
        # The high-water of the interval ending at sample i was reached before it: draw it over that interval.
        axis.step(index, high, where="pre", color="tab:red", lw=0.6, alpha=0.8, label="high-water between samples")
        peak = timeline.peak_sample
        axis.plot([peak.index], [peak.high_bytes / MIB], "v", color="black", ms=7)
        axis.annotate(f"peak {peak.high_bytes / MIB:.1f} MiB\n{peak.high_where}\nskips {peak.high_skip_bytes / MIB:.2f} MiB",
                      (peak.index, peak.high_bytes / MIB), xytext=(-10 if peak.index > 0.6 * len(index) else 10, -2),
                      textcoords="offset points", fontsize=7, va="top",
                      ha="right" if peak.index > 0.6 * len(index) else "left")
        ticks = _stage_ticks(timeline.samples)
        axis.set_xticks([i for i, _ in ticks], [label for _, label in ticks], fontsize=7, rotation=0)
        for i, _ in ticks:
            axis.axvline(i, color="grey", lw=0.3, alpha=0.5)
        axis.set_xlim(0, max(index) if index else 1)
        axis.set_ylabel("MiB")
        axis.set_title(f"{timeline.name}: {timeline.phase}, {'x'.join(map(str, timeline.input_shape))}, "
                       f"{timeline.method} (params {timeline.params_bytes / MIB:.2f} MiB, input "
                       f"{timeline.input_bytes / MIB:.1f} MiB not included)", fontsize=9, loc="left")
        axis.grid(axis="y", lw=0.3, alpha=0.5)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper right", ncol=3, fontsize=8, frameon=False)
    axes[-1, 0].set_xlabel("module calls in forward order (stage of the first call of each run)")
    figure.suptitle(title or "live tensor memory through the pass", fontsize=10, x=0.01, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.2 / figure.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def write_timelines_json(timelines: Sequence[Timeline], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([t.as_dict() for t in timelines], indent=1), encoding="utf-8")
    return path


def read_timelines_json(path: str | Path) -> list[Timeline]:
    return [Timeline.from_dict(facts) for facts in json.loads(Path(path).read_text(encoding="utf-8"))]
