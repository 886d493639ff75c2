"""``medunet export-bundle RUN_DIR OUT_DIR`` and ``medunet export-onnx SOURCE OUT``: MONAI bundle and ONNX export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medunet.cli.common import input_shape, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    bundle = subparsers.add_parser(
        "export-bundle",
        help="turn a trained run into a complete MONAI bundle (configs, model.pt, model.ts, model card)",
        description="Write a MONAI bundle in the model-zoo layout from a run folder of `medunet train`: "
        "configs/{metadata,inference,train,evaluate}.json, models/model.pt, models/model.ts, docs/README.md, "
        "LICENSE. metadata.json holds every field the MONAI Bundle specification requires plus an 'efficiency' "
        "section (parameters, multiply-adds, peak inference memory at the ROI).",
    )
    bundle.add_argument("run_dir", type=Path, help="run folder (config.json, models/model.pt)")
    bundle.add_argument("out_dir", type=Path, help="bundle folder to create, e.g. bundles/spleen_ct_lunet")
    bundle.add_argument("--name", help="display name (default: task and network)")
    bundle.add_argument("--version", default="0.1.0", help="bundle version (default 0.1.0)")
    bundle.add_argument("--authors", default="medunet user", help="metadata authors")
    bundle.add_argument("--copyright", help="copyright line (default: 'Copyright (c) AUTHORS')")
    bundle.add_argument("--license", type=Path, help="file copied to LICENSE (default: an Apache-2.0 notice)")
    bundle.add_argument("--intended-use", help="intended-use statement (default: research, not clinical use)")
    bundle.add_argument("--dataset-dir", default="/workspace/data", help="default dataset_dir in the configs")
    bundle.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (faster)")
    bundle.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    bundle.set_defaults(func=run_export_bundle)

    onnx = subparsers.add_parser(
        "export-onnx",
        help="export a network or a trained run to ONNX, checked against PyTorch with onnxruntime",
        description="SOURCE is a run folder (its trained network at its ROI) or a registry name (fresh weights, "
        "for deployment tests). The spatial shape is fixed in the graph, the batch is dynamic. Needs the "
        "optional packages onnx and onnxruntime.",
    )
    onnx.add_argument("source", help="run folder, or a registry name from `medunet networks`")
    onnx.add_argument("out", type=Path, help="the .onnx file to write")
    onnx.add_argument("--shape", type=input_shape, help="input BxCxDxHxW (default for a run: 1xCxROI; required for a name)")
    onnx.add_argument("--out-channels", type=positive_int, default=2, help="classes for a registry name (default 2)")
    onnx.add_argument("--opset", type=positive_int, default=17, help="ONNX opset (default 17)")
    onnx.add_argument("--conv3d-as-2d", action="store_true",
                      help="write 3D convolutions as 2D ones over depth slices: same outputs, much faster under "
                      "onnxruntime on a CPU (int8 above all); keep the default for runtimes with fast 3D kernels")
    onnx.set_defaults(func=run_export_onnx)


def run_export_bundle(args: argparse.Namespace) -> int:
    from medunet.bundle import export_bundle

    out = export_bundle(
        args.run_dir, args.out_dir, name=args.name, version=args.version, authors=args.authors,
        copyright=args.copyright, license_file=args.license, intended_use=args.intended_use,
        dataset_dir=args.dataset_dir, memory=not args.no_memory, overwrite=args.force,
    )
    efficiency = json.loads((out / "configs" / "metadata.json").read_text(encoding="utf-8"))["efficiency"]
    print(f"bundle written to {out}: {efficiency['parameters']:,} parameters, "
          f"{efficiency['multiply_adds'] / 1e9:.3f} GMACs and peak inference memory "
          f"{efficiency['peak_inference_memory_mib']} MiB per {'x'.join(map(str, efficiency['input_shape'][2:]))} patch")
    print(f"run it: python -m monai.bundle run --config_file {out}/configs/inference.json --bundle_root {out} "
          "--dataset_dir IMAGES_DIR")
    return 0


def run_export_onnx(args: argparse.Namespace) -> int:
    from medunet.bundle.onnx import export_onnx
    from medunet.errors import MedunetError

    source = Path(args.source)
    if source.is_dir():
        from medunet.bundle.run import read_run

        run = read_run(source)
        network = run.load_network()
        shape = args.shape or (1, run.preset.in_channels, *run.roi_size)
    else:
        from medunet.networks import create_network

        if not args.shape:
            raise MedunetError(f"--shape is needed for the registry name {args.source!r}, e.g. --shape 1x1x96x96x96.")
        shape = args.shape
        network = create_network(args.source, spatial_dims=len(shape) - 2, in_channels=shape[1],
                                 out_channels=args.out_channels)
    result = export_onnx(network, args.out, shape, opset=args.opset, conv3d_as_2d=args.conv3d_as_2d)
    print(f"{result.path}: input {'x'.join(map(str, shape))} (dynamic batch), opset {result.opset}; "
          f"onnxruntime matches PyTorch within {result.max_abs_difference:.1e}")
    return 0
