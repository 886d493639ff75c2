"""``medunet.profiling.timeline`` and ``medunet profile --timeline``: live tensor memory through one forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from medunet.cli import main
from medunet.networks import create_network
from medunet.profiling import measure_skip_bytes
from medunet.profiling.timeline import plot_timelines, read_timelines_json, record_timeline

SHAPE = (1, 1, 32, 32, 32)
TINY = {"features": 4}  # small widths, the preset's levels and skips


class _Ones(nn.Module):
    """Returns a new float32 tensor of ``count`` elements: 4 * count bytes."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(self.count)


class _Scratch(nn.Module):
    """Allocates a scratch tensor of ``scratch`` floats, freed when it returns a new one of ``keep`` floats."""

    def __init__(self, scratch: int, keep: int) -> None:
        super().__init__()
        self.scratch, self.keep = scratch, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.ones(self.scratch)
        scratch.add_(1)  # in place: no new storage
        scratch.view(-1, 1)  # a view: no new storage
        return torch.zeros(self.keep)


class _Known(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.make = _Ones(1000)
        self.scratch = _Scratch(3000, 500)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.make(x)
        return self.scratch(a)


def test_tracker_peak_is_the_exact_bytes_alive_together() -> None:
    timeline = record_timeline(_Known(), (1, 4))
    # Inside ``scratch``: ``make``'s output, the scratch and the kept result, all float32.
    assert timeline.peak_bytes == 4 * (1000 + 3000 + 500)
    assert timeline.peak_where.startswith("scratch")
    after_scratch = next(s for s in timeline.samples if s.module == "scratch" and s.event == "post")
    assert after_scratch.live_bytes == 4 * (1000 + 500)  # the scratch was freed on return
    assert timeline.samples[0].live_bytes == 0 and timeline.samples[-1].live_bytes == 0
    assert timeline.input_bytes == 4 * 4 and timeline.params_bytes == 0


def test_parameters_and_input_are_counted_apart() -> None:
    net = nn.Conv3d(1, 3, 3, padding=1)
    timeline = record_timeline(net, (1, 1, 8, 8, 8))
    assert timeline.params_bytes == 4 * (3 * 27 + 3)
    assert timeline.input_bytes == 4 * 8**3
    assert timeline.peak_bytes == 4 * 3 * 8**3  # only the output is new


def test_timeline_is_deterministic_and_leaves_no_hooks() -> None:
    net = create_network("lunet_small_16f_unshuffle", spatial_dims=3, in_channels=1, **TINY)
    first, second = record_timeline(net, SHAPE), record_timeline(net, SHAPE)
    assert [(s.module, s.live_bytes, s.high_bytes) for s in first.samples] == \
           [(s.module, s.live_bytes, s.high_bytes) for s in second.samples]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert {"enc 0", "enc 4", "dec 0", "head"} <= {s.stage for s in first.samples}


@pytest.mark.parametrize("name", ["lunet_small_16f_unshuffle", "monai_unet_spleen"])
def test_skip_held_bytes_at_most_are_all_skip_tensors(name: str) -> None:
    overrides = {"channels": (2, 4, 8, 16, 32)} if name.startswith("monai") else TINY
    net = create_network(name, spatial_dims=3, in_channels=1, **overrides).eval()
    timeline = record_timeline(net, SHAPE)
    assert timeline.max_skip_bytes == measure_skip_bytes(net, torch.randn(SHAPE)) > 0
    assert all(s.skip_bytes <= s.live_bytes for s in timeline.samples)


def test_aggregated_skips_hold_less_than_ordinary_skips() -> None:
    ordinary = record_timeline("lunet_small_16f_unshuffle", SHAPE, **TINY)
    aggregated = record_timeline("unetmm_lunet_small_16f_unshuffle_coarsest", SHAPE, **TINY)
    assert 0 < aggregated.max_skip_bytes < ordinary.max_skip_bytes
    # Ordinary skips hold the level-0 feature until decoder level 0 takes it (into its concatenation, before the
    # up-convolution runs), and nothing after.
    first_dec_0 = next(i for i, s in enumerate(ordinary.samples) if s.stage == "dec 0")
    assert ordinary.samples[first_dec_0 - 1].skip_bytes > 0 and ordinary.samples[-1].skip_bytes == 0


def test_training_step_ends_with_the_gradients_alive() -> None:
    inference = record_timeline("lunet_small_16f_unshuffle", (1, 1, 64, 64, 64), **TINY)
    training = record_timeline("lunet_small_16f_unshuffle", (1, 1, 64, 64, 64), train=True, **TINY)
    assert training.phase == "training" and any(s.event == "op" for s in training.samples)
    assert training.peak_bytes > inference.peak_bytes
    assert training.samples[-1].live_bytes == training.params_bytes  # one gradient per parameter


def test_plot_writes_a_png(tmp_path: Path) -> None:
    timelines = [record_timeline(name, SHAPE, **TINY)
                 for name in ("lunet_small_16f_unshuffle", "unetmm_lunet_small_16f_unshuffle_intermediate")]
    path = plot_timelines(timelines, tmp_path / "sub" / "timeline.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_profile_timeline_command_prints_the_peak_and_writes_files(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    plot, samples = tmp_path / "t.png", tmp_path / "t.json"
    code = main(["profile", "lunet_small_2f", "unetmm_lunet_small_8f_coarsest", "--shape", "1x1x32x32x32",
                 "--timeline", "--plot", str(plot), "--timeline-json", str(samples)])
    out = capsys.readouterr().out
    assert code == 0
    assert "peak live MiB" in out and "skip-held at peak" in out and "unetmm_lunet_small_8f_coarsest" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    first, second = read_timelines_json(samples)
    assert first.name == "lunet_small_2f" and first.peak_bytes > 0 and second.peak_where
    assert f"{first.peak_bytes / 2**20:.1f}" in out


def test_timeline_options_without_timeline_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "lunet_small_2f", "--plot", "t.png"]) == 2
    assert "--timeline" in capsys.readouterr().err


def test_allocator_method_needs_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        record_timeline(nn.Conv3d(1, 1, 1), (1, 1, 4, 4, 4), device="cpu", method="allocator")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_allocator_sees_at_least_the_live_tensors() -> None:
    tensors = record_timeline("lunet_small_16f_unshuffle", SHAPE, device="cuda", method="tensors", **TINY)
    allocator = record_timeline("lunet_small_16f_unshuffle", SHAPE, device="cuda", **TINY)
    assert allocator.method == "allocator"
    assert allocator.peak_bytes >= tensors.peak_bytes  # block rounding and workspaces come on top
    assert allocator.max_skip_bytes == tensors.max_skip_bytes > 0
