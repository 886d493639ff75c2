"""``medunet export-deploy RUN_DIR OUT``: a trained run as a folder that runs with onnxruntime, numpy and nibabel."""

from __future__ import annotations

import argparse
from pathlib import Path

from medunet.cli.common import positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-deploy",
        help="write a torch-free deployment folder: ONNX fp32 + int8 models, plan.json, run.py, requirements.txt",
        description="Export a trained run for whole-volume inference without PyTorch or MONAI: OUT/model.onnx (fp32), "
        "OUT/model.int8.onnx (onnxruntime static quantization, QDQ, per-channel, calibrated on the run's training "
        "cases), OUT/plan.json (orientation, spacing, intensity, crop, sliding window), OUT/run.py and "
        "OUT/requirements.txt. Then: pip install -r OUT/requirements.txt; "
        "python OUT/run.py --input CASE.nii.gz --output PRED.nii.gz [--int8].",
    )
    parser.add_argument("run_dir", type=Path, help="run folder of 'medunet train' (config.json, models/model.pt)")
    parser.add_argument("out", type=Path, help="the deployment folder to write")
    parser.add_argument("--checkpoint", default="best", help="'best' (models/model.pt), 'last' or a .pt file")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 model (no calibration data needed)")
    parser.add_argument("--calibration-images", type=Path, nargs="+",
                        help="images to calibrate the int8 model on (default: the run's training cases)")
    parser.add_argument("--calibration-cases", type=positive_int, default=16,
                        help="at most this many calibration images, two windows each (default 16)")
    parser.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--plain-conv3d", action="store_true",
                        help="keep 3D convolutions as 3D ONNX Conv nodes (default: 2D convolutions over depth "
                        "slices, same outputs, about 1.2x faster in fp32 and 1.8x in int8 under onnxruntime's CPU "
                        "kernels)")
    parser.set_defaults(func=run_export_deploy)


def run_export_deploy(args: argparse.Namespace) -> int:
    from medunet.deploy import export_deploy

    result = export_deploy(args.run_dir, args.out, checkpoint=args.checkpoint, int8=not args.no_int8,
                           calibration_images=args.calibration_images, calibration_cases=args.calibration_cases,
                           opset=args.opset, conv3d_as_2d=not args.plain_conv3d)
    print(f"deployment written to {result.folder}: {', '.join(sorted(p.name for p in result.files.values()))}")
    print(f"  fp32 ONNX matches PyTorch within {result.onnx_max_abs_difference:.1e}")
    if result.int8_window_agreement is not None:
        print(f"  int8 calibrated on {result.calibration_windows} windows; argmax agreement with fp32 on them "
              f"{100 * result.int8_window_agreement:.2f}%")
    print(f"run it: pip install -r {result.folder}/requirements.txt && "
          f"python {result.folder}/run.py --input CASE.nii.gz --output PRED.nii.gz")
    return 0
