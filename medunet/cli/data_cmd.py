"""``medunet check-data``, ``make-phantom``, ``make-datalist``, ``plan``: validate, synthesise, split and plan
MSD-layout tasks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medunet.cli.common import non_negative_int, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the data sub-commands to the ``medunet`` parser."""
    check = subparsers.add_parser(
        "check-data", help="validate an MSD task folder before training (all problems at once)"
    )
    check.add_argument("task_dir", metavar="TASK_DIR", help="MSD task folder holding dataset.json")
    check.add_argument("--datalist", help="k-fold datalist JSON to check instead of dataset.json 'training'")
    check.add_argument(
        "--headers-only", action="store_true", help="read image headers only (faster; labels are still read)"
    )
    check.set_defaults(func=_check_data)

    phantom = subparsers.add_parser(
        "make-phantom", help="write a synthetic MSD-format task (CT or MRI)",
        description="Write a synthetic MSD-format task into OUT_DIR (relative to the current folder). An existing "
        "non-empty OUT_DIR is refused unless --force, so a real task is never overwritten.")
    phantom.add_argument("out_dir", metavar="OUT_DIR", type=Path,
                         help="task folder to write, e.g. data/Task90_PhantomCT (relative to the current folder)")
    phantom.add_argument("--kind", choices=("ct", "mri"), default="ct", help="CT in HU or MRI-like (default ct)")
    phantom.add_argument("--cases", type=positive_int, default=4, help="labelled training cases (default 4)")
    phantom.add_argument("--test-cases", type=non_negative_int, default=1, help="unlabelled cases in imagesTs (default 1)")
    phantom.add_argument("--size", type=positive_int, nargs=3, default=(48, 48, 32), metavar=("X", "Y", "Z"),
                         help="voxels per axis (default 48 48 32)")
    phantom.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    phantom.add_argument("--channels", type=positive_int, default=1, help="image channels; >1 writes 4D images (default 1)")
    phantom.add_argument("--label-values", type=int, nargs="+", metavar="V",
                         help="values for background, organ, lesion [, cyst], e.g. 0 1 2 4 (default 0 1 2)")
    phantom.add_argument("--name", help="dataset.json name (default PhantomCT/PhantomMRI; another name makes a task "
                         "no preset knows, trained from its plan)")
    phantom.add_argument("--force", action="store_true", help="write into OUT_DIR even if it holds files")
    phantom.set_defaults(func=_make_phantom)

    folds = subparsers.add_parser("make-datalist", help="write k-fold cross-validation splits for a task")
    folds.add_argument("task_dir", metavar="TASK_DIR", help="MSD task folder holding dataset.json")
    folds.add_argument("--folds", type=positive_int, default=5, help="number of folds (default 5)")
    folds.add_argument("--seed", type=int, default=0, help="shuffling seed (default 0)")
    folds.add_argument("--out", type=Path, help="output JSON (default TASK_DIR/folds.json, beside dataset.json)")
    folds.set_defaults(func=_make_datalist)

    plan = subparsers.add_parser(
        "plan", help="fingerprint a task and derive its preprocessing and patch size (plan.json), as nnU-Net does",
        description="Compute the dataset fingerprint (shapes, spacings, label volumes, foreground intensities; "
        "cached in TASK_DIR/fingerprint.json) and derive a plan from it: target spacing, normalisation, crop, "
        "patch size and levels, each with where it came from. 'medunet train TASK_DIR' uses the plan for tasks "
        "without a shipped preset. Edit plan.json freely; it is validated when read.")
    plan.add_argument("task_dir", metavar="TASK_DIR", type=Path, help="MSD task folder holding dataset.json")
    plan.add_argument("--out", type=Path, help="plan file (default TASK_DIR/plan.json); the fingerprint is cached "
                      "beside it")
    plan.add_argument("--patch-voxels", type=positive_int, default=128**3,
                      help="most voxels in a training patch: the memory budget (default 128^3 = 2097152)")
    plan.add_argument("--allow-single-case", action="store_true", help="plan from a task with one labelled case")
    plan.set_defaults(func=_plan)


def _check_data(args: argparse.Namespace) -> int:
    from medunet.data.check import assert_task_ok

    task = assert_task_ok(args.task_dir, args.datalist, read_images=not args.headers_only, progress=sys.stderr.isatty())
    print(
        f"{task.folder_name}: OK ({len(task.training)} training, {len(task.test)} test case(s), "
        f"{task.num_channels} channel(s), labels {task.labels})"
    )
    return 0


def _make_phantom(args: argparse.Namespace) -> int:
    from medunet.data.phantom import make_phantom_task

    root = make_phantom_task(
        args.out_dir, kind=args.kind, num_cases=args.cases, num_test=args.test_cases, size=tuple(args.size),
        seed=args.seed, channels=args.channels, overwrite=args.force, label_values=args.label_values,
        name=args.name,
    )
    print(f"wrote {args.kind.upper()} phantom task {root} ({args.cases} training, {args.test_cases} test case(s))")
    return 0


def _make_datalist(args: argparse.Namespace) -> int:
    from medunet.data.datalist import write_datalist

    # Beside the task's dataset.json, not in the current folder (which may be this repository).
    out = write_datalist(args.task_dir, args.out or Path(args.task_dir) / "folds.json", num_folds=args.folds,
                         seed=args.seed)
    print(f"wrote {out}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    import json

    from medunet.data.fingerprint import FINGERPRINT_FILE, compute_fingerprint
    from medunet.data.plan import PLAN_FILE, make_plan, write_plan

    out = args.out or Path(args.task_dir) / PLAN_FILE
    fingerprint = compute_fingerprint(args.task_dir, cache=out.parent / FINGERPRINT_FILE, progress=sys.stderr.isatty())
    plan = make_plan(fingerprint, patch_voxels=args.patch_voxels, allow_single_case=args.allow_single_case)
    write_plan(plan, out)
    preset = plan["preset"]
    print(json.dumps({key: preset[key] for key in ("modality", "target_spacing", "patch_size", "ct_window")}))
    for key, source in plan["sources"].items():
        print(f"  {key}: {source}")
    print(f"wrote {out}")
    return 0
