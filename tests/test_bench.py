"""``medunet bench`` and ``medunet profile`` end to end on tiny inputs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medunet.cli import main
from medunet.profiling import count_macs, measure_skip_bytes, profile
from medunet.profiling.profiler import FIXED_MMAP_THRESHOLD


def test_profile_counts_what_it_should() -> None:
    net = torch.nn.Conv3d(1, 4, 3, padding=1)
    x = torch.randn(1, 1, 8, 8, 8)
    assert count_macs(net, x) == 4 * 1 * 27 * 8**3
    result = profile("lunet_small_2f", "1x1x32x32x32", train=False, memory=False, repeats=1)
    assert result.params == sum(p.numel() for p in result_network_params("lunet_small_2f"))
    assert result.macs > 0 and result.latency_ms > 0


def result_network_params(name: str) -> list[torch.nn.Parameter]:
    from medunet.networks import create_network

    return list(create_network(name, spatial_dims=3, in_channels=1).parameters())


_ALLOCATE_64_MIB = """
import json, torch
from medunet.profiling import PeakMemory
with PeakMemory("cpu") as memory:
    block = torch.ones(64 * 2**20 // 4)
    del block
print(json.dumps({"peak": memory.peak_bytes, "method": memory.method}))
"""


def test_peak_memory_sees_a_large_allocation() -> None:
    # In a fresh process with glibc's mmap threshold fixed, as measure_peak runs it: in a long-lived process (a test
    # worker) the block can come from freed heap pages that are still resident, and the process shows no growth.
    done = subprocess.run([sys.executable, "-c", _ALLOCATE_64_MIB], capture_output=True, text=True, check=True,
                          env={**os.environ, **FIXED_MMAP_THRESHOLD})
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 60 * 2**20 <= result["peak"] < 200 * 2**20, result
    assert "RSS" in result["method"]


def test_skip_memory_of_the_monai_unet_is_the_sum_of_its_skip_inputs() -> None:
    from medunet.networks import create_network

    net = create_network("monai_unet_spleen", channels=(2, 4, 8, 16, 32)).eval()
    # MONAI's UNet keeps the input of each SkipConnection: each strided conv's output (it never keeps
    # the full-resolution input), down to the one beside the bottom block.
    expected = 4 * (2 * 16**3 + 4 * 8**3 + 8 * 4**3 + 16 * 2**3)
    assert measure_skip_bytes(net, torch.randn(1, 1, 32, 32, 32)) == expected


def test_isolated_peak_is_measured_in_a_fresh_process() -> None:
    result = profile("lunet_small_2f", "1x1x32x32x32", train=True, memory=True, repeats=1)
    assert result.peak_infer_bytes > 0 and result.peak_train_bytes > result.peak_infer_bytes
    assert "RSS" in result.memory_method


def test_profile_command_prints_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["profile", "lunet_small_2f", "unet_small_2f", "--shape", "1x1x32x32x32", "--no-memory", "--no-train",
                 "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "ratios to lunet_small_2f" in out and "x)" in out


def test_bench_quick_writes_csv_markdown_and_tracks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench"
    code = main(["bench", "--networks", "lunet_small_2f", "--baseline", "unet_small_2f", "--shapes", "1x1x32x32x32",
                 "--volume", "48x48x32", "--no-train", "--repeats", "1", "--out", str(out),
                 "--tracking-uri", f"sqlite:///{tmp_path}/mlruns.db"])
    assert code == 0
    rows = list(csv.DictReader((out / "efficiency.csv").open(encoding="utf-8")))
    assert [r["name"] for r in rows] == ["unet_small_2f", "lunet_small_2f"]
    assert all(float(r["throughput_vps"]) > 0 and int(r["peak_infer_bytes"]) > 0 for r in rows)
    table = (out / "efficiency.md").read_text(encoding="utf-8")
    assert "Ratios are to `unet_small_2f`" in table and "lunet_small_2f" in table
    assert json.loads((out / "efficiency.json").read_text(encoding="utf-8"))[1]["params"] < json.loads((out / "efficiency.json").read_text(encoding="utf-8"))[0]["params"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    experiment = client.get_experiment_by_name("medunet")
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'bench'")
    assert run.data.metrics["lunet_small_2f.1x1x32x32x32_model_params"] == float(rows[1]["params"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["bench"]


def test_sliding_window_throughput_feeds_the_network_its_input_channels() -> None:
    from medunet.bench.efficiency import sliding_window_throughput
    from medunet.profiling.profiler import build

    # The unshuffle stem's first convolution takes 8 channels; the network itself takes 1.
    net = build("lunet_small_8f_unshuffle", (1, 1, 32, 32, 32), out_channels=2)
    assert sliding_window_throughput(net, (40, 36, 32), roi_size=(32, 32, 32)) > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the results head names the GPU there")
def test_the_results_head_names_the_cpu_model_and_its_instruction_set() -> None:
    # CPU peak memory and time depend on the instruction set (oneDNN's layouts): a figure needs its machine named.
    from medunet.bench.results import provenance_line
    from medunet.environment import cpu_model

    line = provenance_line()
    assert cpu_model() in line and torch.backends.cpu.get_cpu_capability() in line and line.count(", CPU (") == 1


def test_interleaved_latency_times_every_network_in_turn(monkeypatch) -> None:
    from medunet.bench import efficiency

    order: list[str] = []
    real_build = efficiency.build

    def traced(name, shape, **overrides):
        net = real_build(name, shape, **overrides)
        net.register_forward_hook(lambda *_: order.append(name))
        return net

    monkeypatch.setattr(efficiency, "build", traced)
    latency = efficiency.interleaved_latency(["lunet_small_1f", "lunet_small_2f"], "1x1x16x16x16", repeats=3)
    assert set(latency) == {"lunet_small_1f", "lunet_small_2f"} and min(latency.values()) > 0
    # one warm-up each, then three rounds that alternate: a drift in time reaches both networks alike
    assert order == ["lunet_small_1f", "lunet_small_2f"] * 4
