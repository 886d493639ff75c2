"""Where the deployment runner's time goes on a CT-sized volume: one line per stage of ``run.segment``.

Builds (or reuses, under ``--work``) the same untrained deployment and 512x512x200 phantom as
``python -m medunet.bench.deploy ct``, then times each stage of the torch-free runner in a fresh process that
imports neither torch nor medunet: reading the NIfTI, preprocessing (orientation, resampling, normalisation, crop),
the network calls, the stitching (softmax, Gaussian weighting, accumulation, argmax), postprocessing and writing.

    OMP_NUM_THREADS=1 python benchmarks/deploy/stages.py --work /tmp/dbench_ct --threads 1 [--int8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: Runs in a process with only the deployment folder on the path: the runner's own functions, timed one by one.
STAGES = """
import json, sys, tempfile, time
from pathlib import Path
deploy, image, int8, threads = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
sys.path.insert(0, deploy)
import run
plan = run.load_plan(deploy)
window = plan["sliding_window"]
times, calls = {}, {"windows": 0}
def timed(name, function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
    return result
total = time.perf_counter()
array, affine = timed("read", run.read_image, image)
volume, state = timed("preprocess", run.preprocess, array, affine, plan)
del array
network = run.onnx_predictor(Path(deploy) / plan["models"]["int8" if int8 else "fp32"], threads)
def predict(windows):
    calls["windows"] += len(windows)
    return timed("network", network, windows)
start = time.perf_counter()
labels = run.sliding_window_labels(volume, predict, window["roi_size"], plan["out_channels"],
                                   overlap=window["overlap"], batch_size=window["sw_batch_size"])
times["stitching"] = time.perf_counter() - start - times["network"]
restored = timed("postprocess", run.postprocess, labels, state)
timed("write", run.write_labels, restored, affine, Path(tempfile.mkdtemp()) / "pred.nii.gz")
times["total"] = time.perf_counter() - total
assert "torch" not in sys.modules and "medunet" not in sys.modules
print(json.dumps({"seconds": times, "windows": calls["windows"], "network_input": list(volume.shape),
                  "roi_size": window["roi_size"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/dbench_ct"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--network", default=None, help="preset to deploy (default the bench's)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from medunet.bench import deploy

    network = args.network or deploy.PRESET
    phantom = str(deploy.ct_phantom(args.work / "ct512x512x200.nii.gz"))
    folder = args.work / ("deploy_ct" if network == deploy.PRESET else f"deploy_ct_{network}")
    if not (folder / "model.int8.onnx").is_file():
        deploy.untrained_deployment(network, "Task09_Spleen", folder, [phantom])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run([sys.executable, "-c", STAGES, str(folder), phantom, "1" if args.int8 else "0",
                             str(args.threads)], env=env, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    seconds = figures["seconds"]
    print(f"{network} {'int8' if args.int8 else 'fp32'} threads={args.threads}: {figures['windows']} windows of "
          f"{figures['roi_size']} over {figures['network_input']}")
    for stage, value in seconds.items():
        print(f"  {stage:12s} {value:7.2f} s  {100 * value / seconds['total']:5.1f}%")


if __name__ == "__main__":
    main()
