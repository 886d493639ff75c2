"""``medunet train``, ``medunet infer`` and ``medunet demo``: the workflows of :mod:`medunet.engines`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medunet.cli.common import (
    add_tracking_arguments,
    device_name,
    fraction_0_1,
    non_negative_int,
    positive_int,
    tracking_settings,
)
from medunet.errors import MedunetError

# Shown in ``medunet train --help`` and the README: what a workflow file is allowed to do.
WORKFLOWS_ARE_CODE = (
    "Workflow files are MONAI bundle configs: their '$' values are Python expressions that run when the "
    "workflow runs (imports, function calls), so run only workflow files you trust, as you would a script. "
    "--set takes plain JSON values only (numbers, strings, lists, objects, true/false/null); a string starting "
    "with '$', '@' or '%' is refused: put expressions and references in a workflow file you own instead."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_train(subparsers)
    _register_infer(subparsers)
    _register_demo(subparsers)


# -- train ------------------------------------------------------------------------------------------------
def _register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a network on one fold of an MSD task (resumes an interrupted run)",
        description="Run a workflow config (medunet/workflows/*.json or your own, MONAI bundle style) with the options below as "
        "overrides. Rerunning the same command after a crash resumes from RUN_DIR/checkpoints/checkpoint_last.pt. "
        "Under torchrun every process runs this command and rank 0 writes. " + WORKFLOWS_ARE_CODE,
    )
    parser.add_argument("task_dir", nargs="?", type=Path,
                        help="MSD task folder; picks medunet/workflows/<task>.json and sets --data-root (or use --workflow)")
    parser.add_argument("--workflow", type=Path, help="workflow config file (default: the task's, from TASK_DIR)")
    parser.add_argument("--network", help="network name from 'medunet networks' (default: the workflow's)")
    parser.add_argument("--fold", type=non_negative_int, help="validation fold of the datalist (default: the workflow's, 0)")
    parser.add_argument("--data-root", type=Path, help="MSD task folder the datalist paths are relative to")
    parser.add_argument("--datalist", type=Path, help="k-fold datalist JSON (default: the workflow's)")
    parser.add_argument("--run-dir", type=Path, help="run folder (default: the workflow's run_dir)")
    parser.add_argument("--epochs", type=positive_int, help="max_epochs")
    parser.add_argument("--plan", type=Path, help="plan.json to train with (from 'medunet plan'), instead of the "
                        "shipped preset of an MSD task; a task without one uses TASK_DIR/plan.json, planned if absent")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any top-level workflow key, VALUE as plain JSON (no '$' expressions or "
                        "'@' references); repeatable (e.g. --set learning_rate=3e-4 --set epoch_length=50 "
                        "--set cache=disk)")
    add_tracking_arguments(parser)
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from medunet.engines.config import build_overrides, parse_settings, run_workflow, workflow_for_task

    if args.workflow is None and args.task_dir is None:
        raise MedunetError("name a task folder or a workflow. Fix: 'medunet train TASK_DIR' or "
                           "'medunet train --workflow medunet/workflows/task04_hippocampus.json --data-root TASK_DIR'.")
    workflow = args.workflow or workflow_for_task(args.task_dir)
    overrides = build_overrides(network=args.network, fold=args.fold, data_root=args.data_root or args.task_dir,
                                datalist=args.datalist, run_dir=args.run_dir, epochs=args.epochs,
                                settings={**tracking_settings(args), **parse_settings(args.set),
                                          **({"plan": str(args.plan)} if args.plan else {})})
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("medunet").setLevel(logging.INFO)  # epoch metrics; ignite's per-epoch chatter stays off
    results = run_workflow(workflow, overrides)
    summary = next((r for r in results if isinstance(r, dict) and "run_dir" in r), None)
    if summary is not None and _is_main():
        print(json.dumps(summary, indent=2))
    return 0


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


# -- infer ------------------------------------------------------------------------------------------------
def _register_infer(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "infer",
        help="predict label maps for a folder, files or a DICOM series with a trained run",
        description="Sliding-window inference with RUN_DIR/models/model.pt; writes OUT/<case>.nii.gz in each "
        "input's original space (same shape and affine), ready for 'medunet evaluate --pred OUT --ref labelsTr'.",
    )
    parser.add_argument("--run-dir", required=True, type=Path, nargs="+",
                        help="a training run folder (config.json, models/); several (e.g. the folds of one network) "
                        "are ensembled: their softmax probabilities are averaged")
    parser.add_argument("--input", required=True, type=Path, nargs="+",
                        help="image files, folders of images (NIfTI/NRRD/MHA), or DICOM series folders")
    parser.add_argument("--output", type=Path, help="output folder (default: RUN_DIR/predictions of the first run)")
    parser.add_argument("--engine", choices=("torch", "onnx", "onnx-int8"), default="torch",
                        help="torch (default), onnx (fp32) or onnx-int8 (static int8) under onnxruntime; the ONNX "
                        "models are exported to RUN_DIR/deploy on first use (as 'medunet export-deploy')")
    parser.add_argument("--tta", choices=("flip",), default=None,
                        help="test-time mirroring: average the probabilities over all flips of each window (8x work)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch and onnxruntime (default: all)")
    parser.add_argument("--memory-budget", type=_memory_size, metavar="SIZE",
                        help="keep the process's peak memory under SIZE (e.g. 2GiB): streaming stitching with the "
                        "window batch and float32/float16 accumulation planned per case; a budget too small is "
                        "refused with the smallest feasible one (NIfTI inputs)")
    parser.add_argument("--checkpoint", default="best", help="'best' (models/model.pt), 'last' or a .pt file")
    parser.add_argument("--device", type=device_name,
                        help="cpu, cuda, cuda:N or mps (default: cuda when present, else cpu)")
    parser.add_argument("--stitch-on-cpu", action="store_true",
                        help="stitch the sliding-window output on the CPU, for volumes that do not fit on the GPU")
    parser.add_argument("--overlap", type=fraction_0_1, default=0.5,
                        help="sliding-window overlap, in [0, 1) (default 0.5)")
    parser.add_argument("--sw-batch-size", type=positive_int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="predict again the cases whose OUT/<case>.nii.gz exists (default: skip them)")
    add_tracking_arguments(parser)
    parser.set_defaults(func=_infer)


def _memory_size(text: str) -> int:
    from medunet.deploy.memory import parse_memory_size

    try:
        return parse_memory_size(text)
    except MedunetError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _infer(args: argparse.Namespace) -> int:
    import time

    from medunet.checks import check_writable_dir
    from medunet.cli.common import tracker_from_args
    from medunet.engines.inference import plan_outputs, predict_runs

    output = args.output or args.run_dir[0] / "predictions"
    check_writable_dir(output, "--output")
    plan_outputs(args.input, output)  # refuse overwriting inputs up front

    import torch

    from medunet.engines.distributed import barrier, init_distributed, shutdown

    if args.threads:
        torch.set_num_threads(args.threads)
    # Under torchrun each rank predicts its share of the cases (i % WORLD_SIZE == RANK); alone, all of them.
    context = init_distributed(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = {"run_dir": [str(p) for p in args.run_dir], "inputs": [str(p) for p in args.input],
                "checkpoint": args.checkpoint, "engine": args.engine, "tta": args.tta, "device": args.device,
                "stitch_on_cpu": args.stitch_on_cpu, "overlap": args.overlap, "sw_batch_size": args.sw_batch_size,
                "overwrite": args.overwrite, "memory_budget": args.memory_budget, "world_size": context.world_size}
    try:
        tracking = args if context.is_main else argparse.Namespace(**{**vars(args), "no_tracking": True})
        with tracker_from_args(tracking, output, tags={"kind": "infer"}) as tracker:
            tracker.log_params({"infer": settings})
            start = time.perf_counter()
            written = predict_runs(args.run_dir, args.input, args.output, checkpoint=args.checkpoint,
                                   engine=args.engine, threads=args.threads, tta=args.tta, device=context.device,
                                   stitch_on_cpu=args.stitch_on_cpu, overlap=args.overlap,
                                   sw_batch_size=args.sw_batch_size, overwrite=args.overwrite,
                                   shard=(context.rank, context.world_size), progress=context.is_main,
                                   memory_budget=args.memory_budget)
            barrier(context)
            tracker.log_metrics({"infer_cases": len(written), "infer_seconds": time.perf_counter() - start})
    finally:
        shutdown(context)
    out = written[0].parent if written else output
    rank = f"rank {context.rank}/{context.world_size}: " if context.is_distributed else ""
    print(f"{rank}wrote {len(written.written)} prediction(s) to {out}", flush=True)  # one write: ranks share stdout
    if written.skipped:
        print(f"skipped {len(written.skipped)} case(s) whose prediction already exists in {out} "
              "(pass --overwrite to predict them again)")
    return 0


# -- demo -------------------------------------------------------------------------------------------------
def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="phantom task -> brief training -> inference -> evaluation report, in a few minutes on a CPU",
        description="Generate a synthetic MRI task (organ + lesion), train on fold 0, predict the held-out cases in their original "
        "space, evaluate them and write the HTML/PDF report.",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"),
                        help="output folder: the phantom task OUT/Task91_PhantomMRI, made once and reused, and the "
                        "run (default runs/demo)")
    parser.add_argument("--run-dir", type=Path,
                        help="run folder (default OUT/run); a new one trains another network on the same phantom")
    parser.add_argument("--network", help="network name from 'medunet networks' (default: the demo workflow's)")
    parser.add_argument("--epochs", type=positive_int, help="training epochs (default: the demo workflow's)")
    add_tracking_arguments(parser)
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from medunet.engines.demo import run_demo

    run_demo(args.out, network=args.network, epochs=args.epochs, run_dir=args.run_dir, **tracking_settings(args))
    return 0
