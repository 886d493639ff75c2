"""``medunet profile NAME... --shape ...``: side-by-side efficiency table with ratios to a baseline.

``--timeline`` records instead the live tensor memory through one forward, module by module, with the
skip-held share (:mod:`medunet.profiling.timeline`), and ``--plot FILE`` draws it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medunet.cli.common import device_name, input_shape, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="measure parameters, MACs, peak memory, skip memory and latency of networks side by side",
        description="Profile registered networks (see `medunet networks`) on one input shape. Peak memory is "
        "measured in a fresh process per figure on the CPU, with CUDA allocator statistics on a GPU.",
    )
    parser.add_argument("names", nargs="+", help="registry names, e.g. lunet_small_8f monai_unet_spleen")
    parser.add_argument("--shape", type=input_shape, default="1x1x128x128x128", help="input BxCx[D]xHxW (default 1x1x128x128x128)")
    parser.add_argument("--out-channels", type=positive_int, default=2, help="classes the networks output (default 2)")
    parser.add_argument("--baseline", help="name to divide by (default: the first name)")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    parser.add_argument("--no-train", action="store_true", help="skip the training-step figures")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory figures (faster)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per latency figure (default 3)")
    parser.add_argument("--json", type=Path, help="also write the raw results to this JSON file")
    timeline = parser.add_argument_group(
        "memory timeline", "live tensor memory through one forward, per module, with the skip-held share "
        "(instead of the table above)")
    timeline.add_argument("--timeline", action="store_true",
                          help="record and print each network's peak live memory, where it is, and the skips' share")
    timeline.add_argument("--plot", type=Path, help="with --timeline: draw the timelines into this PNG")
    timeline.add_argument("--timeline-json", type=Path, help="with --timeline: write the samples to this JSON file")
    timeline.add_argument("--timeline-train", action="store_true",
                          help="with --timeline: record a training step (forward with autograd + backward) instead")
    timeline.add_argument("--timeline-method", choices=("tensors", "allocator"),
                          help="tensors: live storages, deterministic (default on the CPU); allocator: CUDA's "
                               "memory_allocated, workspaces included (default on CUDA)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.timeline:
        return run_timeline(args)
    if args.plot or args.timeline_json or args.timeline_train or args.timeline_method:
        from medunet.errors import MedunetError

        raise MedunetError("--plot, --timeline-json, --timeline-train and --timeline-method belong to the memory "
                           "timeline. Fix: add --timeline.")
    from tqdm import tqdm

    from medunet.networks import get_preset
    from medunet.profiling import comparison_rows, markdown_table, profile

    shape = args.shape  # a tuple: argparse applies type= to the default string too
    for name in args.names:
        get_preset(name)  # fail fast, before minutes of profiling, on a misspelt name
    results = []
    for name in tqdm(args.names, desc="profiling", unit="net"):
        results.append(
            profile(name, shape, device=args.device, train=not args.no_train, memory=not args.no_memory,
                    repeats=args.repeats, out_channels=args.out_channels)
        )
    baseline = args.baseline or args.names[0]
    print(f"\ninput {'x'.join(map(str, shape))} on {args.device}; ratios to {baseline}")
    print(markdown_table(comparison_rows(results, baseline)))
    if results[0].memory_method:
        print(f"peak memory: {results[0].memory_method}")
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=2), encoding="utf-8")
    return 0


def run_timeline(args: argparse.Namespace) -> int:
    from medunet.networks import get_preset
    from medunet.profiling import markdown_table
    from medunet.profiling.timeline import (
        plot_timelines,
        record_timeline,
        timeline_rows,
        write_timelines_json,
    )

    shape = args.shape
    for name in args.names:
        get_preset(name)
    timelines = []
    for name in args.names:
        timelines.append(record_timeline(name, shape, device=args.device, method=args.timeline_method,
                                         train=args.timeline_train, out_channels=args.out_channels))
        print(f"recorded {name}: {len(timelines[-1].samples)} samples", flush=True)
    baseline = args.baseline or args.names[0]
    first = timelines[0]
    print(f"\n{first.phase} timeline, input {'x'.join(map(str, shape))} on {args.device}, method {first.method}; "
          f"ratios to {baseline}")
    print(markdown_table(timeline_rows(timelines, baseline)))
    print("live MiB: activations only; parameters, buffers and the input are counted apart (params MiB, input MiB)")
    if args.plot:
        print(f"plot: {plot_timelines(timelines, args.plot)}")
    if args.timeline_json:
        print(f"samples: {write_timelines_json(timelines, args.timeline_json)}")
    return 0
