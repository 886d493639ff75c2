"""``medunet bench``: the side-by-side efficiency (and accuracy) benchmark, as CSV, markdown and plots."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark networks side by side: efficiency at fixed inputs, accuracy on a Hippocampus fold",
        description="Profiles each network at the same inputs (parameters, MACs, measured peak memory of "
        "inference and of a training step, skip memory, latency, sliding-window throughput), with ratios "
        "to a baseline measured in the same run, and optionally trains each with one recipe on a fold.",
    )
    parser.add_argument("--quick", action="store_true", help="4 networks at 1x1x64^3, small volume: minutes on 2 cores")
    parser.add_argument("--networks", nargs="+", help="registry names (default: the benchmark set; 'all' for every preset)")
    parser.add_argument("--shapes", nargs="+", help="input shapes like 1x1x128x128x128 (default: 96^3, 128^3, 3x256^2)")
    parser.add_argument("--baseline", default="monai_unet_spleen", help="ratios are to this network (default monai_unet_spleen)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--volume", default=None, help="sliding-window volume DxHxW (default 512x512x128; 'none' to skip)")
    parser.add_argument("--no-train", action="store_true", help="skip training-step memory and latency")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/latest"), help="output folder (default benchmarks/latest)")
    from medunet.tracking import add_tracking_arguments

    add_tracking_arguments(parser)
    parser.set_defaults(func=run)


def _volume(text: str | None, quick: bool) -> tuple[int, int, int] | None:
    from medunet.bench.efficiency import FULL_VOLUME, QUICK_VOLUME

    if text is None:
        return QUICK_VOLUME if quick else FULL_VOLUME
    if text.lower() == "none":
        return None
    return tuple(int(v) for v in text.lower().split("x"))  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from medunet.bench.efficiency import (
        BENCH_NETWORKS,
        FULL_SHAPES,
        QUICK_NETWORKS,
        QUICK_SHAPES,
        run_efficiency,
    )
    from medunet.bench.results import efficiency_tables, provenance_line, write_csv
    from medunet.networks import get_preset, list_networks
    from medunet.tracking import tracker_from_args

    networks = args.networks or list(QUICK_NETWORKS if args.quick else BENCH_NETWORKS)
    if networks == ["all"]:
        networks = list_networks()
    if args.baseline not in networks:
        networks.insert(0, args.baseline)
    for name in networks:
        get_preset(name)  # fail fast on a misspelt name
    shapes = args.shapes or list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    args.out.mkdir(parents=True, exist_ok=True)
    with tracker_from_args(args, args.out, tags={"kind": "bench"}, device=args.device) as tracker:
        tracker.log_params({"networks": networks, "shapes": shapes, "baseline": args.baseline, "quick": args.quick})
        results = run_efficiency(
            networks, shapes, device=args.device, memory=True, train=not args.no_train, repeats=args.repeats,
            volume=_volume(args.volume, args.quick),
        )
        write_csv([r.as_dict() for r in results], args.out / "efficiency.csv")
        tables = efficiency_tables(results, args.baseline)
        report = f"# medunet bench\n\n{provenance_line()}\n\nRatios are to `{args.baseline}`, measured in the same run.\n\n{tables}\n"
        (args.out / "efficiency.md").write_text(report)
        (args.out / "efficiency.json").write_text(json.dumps([r.as_dict() for r in results], indent=2, default=str))
        for result in results:
            shape = "x".join(map(str, result.profile.input_shape))
            tracker.log_profile(result.profile, prefix=f"{result.profile.name}.{shape}")
        tracker.log_artifact(args.out, "bench")
    print(report)
    print(f"written: {args.out}/efficiency.csv, efficiency.md, efficiency.json")
    print(tracker.describe())
    return 0
