"""``medunet bench --deploy``: whole-volume CPU inference, wall time and peak memory per case, one fresh process
per figure.

Compares the MONAI UNet (``monai_unet_spleen``) under torch with a medunet preset under torch, ONNX fp32 and
ONNX int8 (the deployment runner of ``medunet export-deploy``), at 1 and 2 threads:

- ``ct``: a 512 x 512 x 200 CT phantom at 0.8 x 0.8 x 2.5 mm, and the real spleen case of
  ``../shared/data/Task09_Spleen`` when present; Task09_Spleen preset (0.79 x 0.79 x 5 mm, ROI 160x192x64),
  overlap 0.5, window batch 4, untrained weights (cost only);
- ``hippocampus``: the validation cases of a trained Task04 run (``--run``): time per case and Dice of torch,
  ONNX fp32 and ONNX int8 against the reference labels.

Usage (from the repository root)::

    medunet bench --deploy --deploy-run RUN_DIR --out benchmarks/deploy     # both parts, 1 and 2 threads
    python -m medunet.bench.deploy ct --out benchmarks/deploy/deploy_ct.json
    python -m medunet.bench.deploy hippocampus --run RUN_DIR --out benchmarks/deploy/deploy_hippocampus.json

Peak memory is the process's ``VmHWM`` (everything: interpreter, libraries, weights, buffers), with the
resident set before the case subtracted as ``growth``. The torch figures run medunet's MONAI pipeline
(``medunet.engines.inference.predict``); the ONNX figures run ``OUT/run.py``'s code with no torch imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASELINE = "monai_unet_spleen"
PRESET = "lunet_small_16f_unshuffle"


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


# -- one figure, in its own process ---------------------------------------------------------------------
def one(args: argparse.Namespace) -> dict:
    """Predict ``args.images`` with one engine; wall time per case and the process's peak memory."""
    images = [Path(p) for p in args.images]
    out = Path(tempfile.mkdtemp())
    if args.engine == "torch":
        import torch

        torch.set_num_threads(args.threads)
        from medunet.data import get_preset
        from medunet.engines.inference import load_run, predict
        from medunet.networks import create_network

        if args.run:
            network, preset, _ = load_run(args.run)
        else:
            preset = get_preset(args.preset)
            torch.manual_seed(0)
            network = create_network(args.network, spatial_dims=3, in_channels=1, out_channels=preset.out_channels)
        before = _status("VmRSS")
        seconds = []
        for image in images:
            start = time.perf_counter()
            predict(network, preset, image, out, overlap=args.overlap, sw_batch_size=args.batch, progress=False,
                    device="cpu", overwrite=True, memory_budget=args.memory_budget)
            seconds.append(time.perf_counter() - start)
    else:
        raise SystemExit("ONNX figures run ONNX_FIGURE (no medunet, no torch); see figure()")
    return {"seconds": seconds, "peak_mib": _status("VmHWM") / 2**20, "before_mib": before / 2**20,
            "growth_mib": (_status("VmHWM") - before) / 2**20, "predictions": str(out)}


#: An ONNX figure: the deployment folder's own run.py in a process that imports neither medunet nor torch.
ONNX_FIGURE = """
import json, sys, tempfile, time
from pathlib import Path
deploy, engine, threads, overlap, batch, *images = sys.argv[1:]
sys.path.insert(0, deploy)
import run
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))
out = Path(tempfile.mkdtemp())
before, seconds = status("VmRSS"), []
for image in images:
    start = time.perf_counter()
    run.segment(image, out / Path(image).name, folder=deploy, int8=engine == "onnx-int8", threads=int(threads),
                overlap=float(overlap), batch_size=int(batch), quiet=True)
    seconds.append(time.perf_counter() - start)
assert "torch" not in sys.modules and "medunet" not in sys.modules
print(json.dumps({"seconds": seconds, "peak_mib": status("VmHWM") / 2**20, "before_mib": before / 2**20,
                  "growth_mib": (status("VmHWM") - before) / 2**20, "predictions": str(out)}))
"""


def figure(engine: str, images: list[str], threads: int, overlap: float, batch: int, network: str | None = None,
           preset: str | None = None, run: str | None = None, deploy: str | None = None,
           memory_budget: int | None = None) -> dict:
    command = [sys.executable, "-m", "medunet.bench.deploy", "one", "--engine", engine, "--threads", str(threads),
               "--overlap", str(overlap), "--batch", str(batch), "--images", *images]
    if memory_budget:
        command += ["--memory-budget", str(memory_budget)]
    for flag, value in (("--network", network), ("--preset", preset), ("--run", run), ("--deploy", deploy)):
        if value:
            command += [flag, value]
    if engine != "torch":
        command = [sys.executable, "-c", ONNX_FIGURE, str(deploy), engine, str(threads), str(overlap), str(batch),
                   *images]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", check=False)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    figure = json.loads(result.stdout.strip().splitlines()[-1])
    print(f"{engine:10s} {network or run or deploy} threads={threads}: {sum(figure['seconds']) / len(images):.2f} s/case,"
          f" peak {figure['peak_mib']:.0f} MiB (growth {figure['growth_mib']:.0f})", flush=True)
    return figure


# -- deployments of untrained networks (cost only) ------------------------------------------------------
def untrained_deployment(network_name: str, preset_name: str, folder: Path, calibration: list[str]) -> Path:
    import json as json_

    import torch

    from medunet.bundle.onnx import export_onnx
    from medunet.data import get_preset
    from medunet.deploy.export import calibration_windows, deploy_plan, quantize_int8
    from medunet.deploy.runner import PLAN_FILE
    from medunet.networks import create_network

    preset = get_preset(preset_name)
    torch.manual_seed(0)
    network = create_network(network_name, spatial_dims=3, in_channels=1, out_channels=preset.out_channels)
    plan = deploy_plan(preset, {"roi_size": preset.patch_size, "overlap": 0.5, "sw_batch_size": 4}, network_name, True)
    folder.mkdir(parents=True, exist_ok=True)
    export_onnx(network, folder / "model.onnx", (1, 1, *preset.patch_size), conv3d_as_2d=True)  # as export-deploy
    (folder / PLAN_FILE).write_text(json_.dumps(plan), encoding="utf-8")
    quantize_int8(folder / "model.onnx", folder / "model.int8.onnx", calibration_windows(calibration, plan, limit=4))
    from medunet.deploy import runner

    (folder / "run.py").write_text(Path(runner.__file__).read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def ct_phantom(path: Path) -> Path:
    """A 512 x 512 x 200 CT phantom at exactly 0.8 x 0.8 x 2.5 mm (int16 HU, as CT is stored)."""
    if path.is_file():
        return path
    import nibabel as nib
    import numpy as np

    from medunet.data import make_phantom_task

    task = make_phantom_task(path.parent / "task", kind="ct", num_cases=1, num_test=0, size=(512, 512, 200))
    image = nib.load(task / "imagesTr" / "phantom_000.nii.gz")
    data = np.asarray(image.dataobj).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), path)
    return path


def ct(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    phantom = str(ct_phantom(work / "ct512x512x200.nii.gz"))
    from medunet.paths import shared_data_dir

    spleen = shared_data_dir() / "Task09_Spleen" / "imagesTr" / "spleen_2.nii.gz"
    deployment = untrained_deployment(PRESET, "Task09_Spleen", work / "deploy_ct", [phantom])
    results: dict = {"volume": "512x512x200 at 0.8x0.8x2.5 mm", "preset": "Task09_Spleen", "overlap": 0.5,
                     "batch": 4, "figures": []}
    cases = [("phantom", phantom)] + ([("spleen_2", str(spleen))] if spleen.is_file() else [])
    budget = 3 * 2**30
    rows = {"baseline": ("torch", BASELINE, None, None), "preset": ("torch", PRESET, None, None),
            "preset-3GiB": ("torch", PRESET, None, budget), "onnx": ("onnx", PRESET, deployment, None),
            "onnx-int8": ("onnx-int8", PRESET, deployment, None)}
    for case, image in cases:
        if args.cases and case not in args.cases:
            continue
        for threads in args.threads:
            for row in args.rows or list(rows):
                engine, network, deploy, memory_budget = rows[row]
                got = figure(engine, [image], threads, 0.5, 4, network=None if deploy else network,
                             preset="Task09_Spleen", deploy=str(deploy) if deploy else None,
                             memory_budget=memory_budget)
                results["figures"].append({"case": case, "engine": engine, "network": network, "threads": threads,
                                           "memory_budget": memory_budget, **got})
    return results


def window_latency(deployment: Path, roi: tuple[int, ...], threads: list[int], batch: int = 4) -> dict:
    """Network-only latency of a batch of windows, fp32 against int8 (mean over 4 s after a warm-up)."""
    import numpy as np

    sys.path.insert(0, str(deployment))
    import run as runner

    windows = np.random.default_rng(0).random((batch, 1, *roi), dtype=np.float32)
    latency: dict = {}
    for count in threads:
        for name in ("model.onnx", "model.int8.onnx"):
            predict = runner.onnx_predictor(deployment / name, count)
            predict(windows)
            start, runs = time.perf_counter(), 0
            while time.perf_counter() - start < 4:
                predict(windows)
                runs += 1
            latency[f"{name} threads={count} batch={batch}"] = 1000 * (time.perf_counter() - start) / runs
    return latency


def hippocampus(args: argparse.Namespace) -> dict:
    import nibabel as nib
    import numpy as np

    from medunet.data import load_fold
    from medunet.deploy import export_deploy
    from medunet.run_folder import read_run_record

    record = read_run_record(args.run)
    _, val = load_fold(record.datalist_path, record.fold or 0, data_root=record.dataset_path)
    images, labels = [item["image"] for item in val], [item["label"] for item in val]
    deployment = Path(args.work) / "deploy_hippocampus"
    exported = export_deploy(args.run, deployment)
    results: dict = {"run": str(args.run), "network": record.network.name, "cases": len(images),
                     "int8_calibration_windows": exported.calibration_windows,
                     "int8_window_agreement": exported.int8_window_agreement, "figures": []}
    predictions: dict[str, str] = {}
    for threads in args.threads:
        for engine in ("torch", "onnx", "onnx-int8"):
            got = figure(engine, images, threads, 0.5, 4, run=args.run if engine == "torch" else None,
                         deploy=str(deployment) if engine != "torch" else None)
            predictions[engine] = got["predictions"]
            results["figures"].append({"engine": engine, "threads": threads, **got})
    results["window_latency_ms"] = window_latency(deployment, record.sliding_window["roi_size"], args.threads)
    names = record.preset.labels
    for engine, folder in predictions.items():
        dice = []
        for image, label in zip(images, labels):
            pred = np.asarray(nib.load(Path(folder) / Path(image).name).dataobj)
            ref = np.asarray(nib.load(label).dataobj)
            dice.append([2 * ((pred == k) & (ref == k)).sum() / max((pred == k).sum() + (ref == k).sum(), 1)
                         for k in names if k])
        results.setdefault("dice", {})[engine] = float(np.mean(dice))
    torch_labels = [np.asarray(nib.load(Path(predictions["torch"]) / Path(i).name).dataobj) for i in images]
    for engine in ("onnx", "onnx-int8"):
        same = [np.mean(np.asarray(nib.load(Path(predictions[engine]) / Path(i).name).dataobj) == t)
                for i, t in zip(images, torch_labels)]
        results.setdefault("agreement_with_torch", {})[engine] = float(np.mean(same))
    return results


def _mean(seconds: list[float]) -> float:
    return sum(seconds) / len(seconds)


def markdown(ct_results: dict | None, hippocampus_results: dict | None) -> str:
    """The results as markdown tables, with ratios to the MONAI UNet (CT) and to ONNX fp32 (int8)."""
    lines = ["# Whole-volume CPU inference (`medunet bench --deploy`)", ""]
    if ct_results:
        lines += [f"CT: {ct_results['volume']}, preset {ct_results['preset']}, overlap {ct_results['overlap']}, "
                  f"window batch {ct_results['batch']}; command `{ct_results['command']}`; load average at the end "
                  f"{', '.join(f'{v:.1f}' for v in ct_results['load_average_at_end'])}.", "",
                  "| case | threads | engine | network | s/case | peak MiB | growth MiB | time vs MONAI UNet | peak vs MONAI UNet |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for figure in ct_results["figures"]:
            base = next(f for f in ct_results["figures"] if f["case"] == figure["case"]
                        and f["threads"] == figure["threads"] and f["network"] == BASELINE)
            engine = figure["engine"] + (" --memory-budget 3GiB" if figure.get("memory_budget") else "")
            lines.append(f"| {figure['case']} | {figure['threads']} | {engine} | {figure['network']} | "
                         f"{_mean(figure['seconds']):.1f} | {figure['peak_mib']:.0f} | {figure['growth_mib']:.0f} | "
                         f"{_mean(figure['seconds']) / _mean(base['seconds']):.2f}x | "
                         f"{figure['peak_mib'] / base['peak_mib']:.2f}x |")
        lines.append("")
    if hippocampus_results:
        h = hippocampus_results
        lines += [f"Hippocampus: {h['cases']} validation cases of fold 0, run `{h['run']}` ({h['network']}); int8 "
                  f"calibrated on {h['int8_calibration_windows']} training windows; command `{h['command']}`.", "",
                  "| engine | threads | s/case | peak MiB | mean Dice | label agreement with torch |",
                  "|---|---|---|---|---|---|"]
        for figure in h["figures"]:
            agreement = h["agreement_with_torch"].get(figure["engine"])
            lines.append(f"| {figure['engine']} | {figure['threads']} | {_mean(figure['seconds']):.3f} | "
                         f"{figure['peak_mib']:.0f} | {h['dice'][figure['engine']]:.4f} | "
                         f"{'' if agreement is None else f'{100 * agreement:.2f}%'} |")
        lines += ["", "Network-only latency (ms per batch of windows):", ""]
        lines += [f"- {name}: {value:.1f}" for name, value in h.get("window_latency_ms", {}).items()]
        lines.append("")
    return "\n".join(lines)


def run_deploy_bench(out: Path, run: str | Path | None, threads: list[int]) -> Path:
    """Both parts (the Hippocampus one only with a trained ``run``) into ``out``; returns ``out/deploy.md``."""
    from medunet.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    parts = {}
    for mode in ("ct", "hippocampus") if run else ("ct",):
        command = [sys.executable, "-m", "medunet.bench.deploy", mode, "--out", str(out / f"deploy_{mode}.json"),
                   "--threads", *map(str, threads), *(["--run", str(run)] if mode == "hippocampus" else [])]
        subprocess.run(command, check=True)
        parts[mode] = json.loads((out / f"deploy_{mode}.json").read_text(encoding="utf-8"))
    atomic_write_text(markdown(parts.get("ct"), parts.get("hippocampus")), out / "deploy.md")
    return out / "deploy.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    single = sub.add_parser("one")
    single.add_argument("--engine", required=True)
    single.add_argument("--images", nargs="+", required=True)
    single.add_argument("--threads", type=int, default=1)
    single.add_argument("--overlap", type=float, default=0.5)
    single.add_argument("--batch", type=int, default=4)
    for flag in ("--network", "--preset", "--run", "--deploy"):
        single.add_argument(flag)
    single.add_argument("--memory-budget", type=int)
    report = sub.add_parser("report", help="markdown of finished results")
    report.add_argument("--ct", type=Path)
    report.add_argument("--hippocampus", type=Path)
    for name in ("ct", "hippocampus"):
        mode = sub.add_parser(name)
        mode.add_argument("--out", type=Path, required=True)
        mode.add_argument("--threads", type=int, nargs="+", default=[1, 2])
        mode.add_argument("--work", default=tempfile.mkdtemp(prefix="deploy_bench_"))
        mode.add_argument("--run", help="trained Task04 run (hippocampus)")
        mode.add_argument("--rows", nargs="+", help="ct: baseline preset preset-3GiB onnx onnx-int8 (default all)")
        mode.add_argument("--cases", nargs="+", help="ct: phantom spleen_2 (default both)")
    args = parser.parse_args()
    if args.mode == "one":
        print(json.dumps(one(args)))
        return
    if args.mode == "report":
        def read(path: Path | None) -> dict | None:
            return json.loads(path.read_text(encoding="utf-8")) if path else None

        print(markdown(read(args.ct), read(args.hippocampus)))
        return
    start = time.perf_counter()
    results = ct(args) if args.mode == "ct" else hippocampus(args)
    results["command"] = "python -m medunet.bench.deploy " + " ".join(sys.argv[1:])
    results["load_average_at_end"] = os.getloadavg()
    results["minutes"] = (time.perf_counter() - start) / 60
    from medunet.atomic import atomic_write_text

    atomic_write_text(json.dumps(results, indent=2) + "\n", args.out)


if __name__ == "__main__":
    main()
