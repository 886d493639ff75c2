"""``medunet evaluate``: score a folder of predictions (ours or another tool's) against references."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from medunet.checks import check_number
from medunet.cli.common import add_tracking_arguments, non_negative_int
from medunet.errors import MedunetError

if TYPE_CHECKING:
    from medunet.evaluation import EvaluationResult


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="metrics, summary.json and an HTML/PDF report for a folder of predictions",
        description="Match predictions to references by case name and write cases.csv, summary.json "
        "(nnU-Net compatible), report.html and report.pdf.",
    )
    parser.add_argument("--pred", required=True, type=Path, help="folder of predicted label maps")
    parser.add_argument("--ref", required=True, type=Path, help="folder of reference label maps (e.g. labelsTr)")
    parser.add_argument("--out", type=Path, help="output folder (default: PRED/evaluation)")
    parser.add_argument("--dataset-json", type=Path, help="dataset.json with the label names "
                        "(default: the one in or next to --ref; else labels found in the references)")
    parser.add_argument("--images", type=Path, help="image folder shown under the overlays (e.g. imagesTr)")
    parser.add_argument("--tolerance-mm", action="append", metavar="MM or LABEL=MM", default=[],
                        help="NSD tolerance in mm, for all labels or per label value/name; repeatable "
                        "(default 2.0), e.g. --tolerance-mm 1.0 --tolerance-mm spleen=3")
    parser.add_argument("--provenance", type=Path, help="JSON file of provenance fields for the report "
                        "(network, parameters, checkpoint_sha256, data, fold, inferer, device, ...)")
    parser.add_argument("--workers", type=non_negative_int, help="parallel processes (default: CPU count up to 8)")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out references without a prediction instead of counting them as failures")
    parser.add_argument("--strict", action="store_true", help="fail on any missing, extra or mismatched case")
    parser.add_argument("--no-report", action="store_true", help="write only cases.csv and summary.json")
    parser.add_argument("--title", help="report title")
    add_tracking_arguments(parser)
    parser.set_defaults(func=_evaluate)


def parse_tolerances(values: list[str]) -> float | dict[str, float]:
    """``["1.5"]`` → 1.5; ``["1.0", "spleen=3"]`` → ``{"default": 1.0, "spleen": 3.0}``."""
    tolerances: dict[str, float] = {}
    for value in values:
        key, _, number = value.rpartition("=")
        try:
            tolerance = float(number)
        except ValueError:
            raise MedunetError(f"--tolerance-mm {value!r} is not MM or LABEL=MM. Fix: e.g. 2.0 or 1=1.5.") from None
        tolerances[key or "default"] = check_number(
            tolerance, "--tolerance-mm", low=0.0, low_open=True,
            fix="Fix: a distance in mm above 0, e.g. --tolerance-mm 2.0 or --tolerance-mm spleen=3.")
    if set(tolerances) <= {"default"}:
        return tolerances.get("default", 2.0)
    return tolerances


def _read_provenance(path: Path | None) -> dict | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MedunetError(f"cannot read provenance JSON {path}: {error}") from None


def _evaluate(args: argparse.Namespace) -> int:
    from medunet.cli.common import tracker_from_args
    from medunet.tracking import push_evaluation_folder

    parse_tolerances(args.tolerance_mm)  # a bad --tolerance-mm fails now, before any case is read
    out_dir = args.out or args.pred / "evaluation"
    with tracker_from_args(args, out_dir, tags={"kind": "evaluate"}) as tracker:
        tracker.log_params({"pred": str(args.pred), "ref": str(args.ref), "tolerance_mm": args.tolerance_mm})
        result = _run(args)
        push_evaluation_folder(out_dir, tracker)
    _print(result)
    print(tracker.describe())
    return 0


def _run(args: argparse.Namespace) -> EvaluationResult:
    from medunet.evaluation import evaluate_folders

    return evaluate_folders(
        args.pred,
        args.ref,
        out_dir=args.out,
        dataset_json=args.dataset_json,
        tolerance_mm=parse_tolerances(args.tolerance_mm),
        provenance=_read_provenance(args.provenance),
        report=not args.no_report,
        images_dir=args.images,
        workers=args.workers,
        skip_missing=args.skip_missing,
        strict=args.strict,
        title=args.title,
    )


def _print(result: EvaluationResult) -> None:
    for problem in result.problems:
        print(f"warning: {problem}")
    skipped = result.provenance.get("evaluation", {}).get("missing_predictions", "")
    if skipped not in ("none", "scored as failures", ""):
        print(skipped)  # one line for every case --skip-missing left out
    for label, name in result.labels.items():
        stats = result.aggregates[str(label)]
        print(f"{name:>20}: Dice {stats['dice']['mean']:.4f} ± {stats['dice']['std']:.4f}, "
              f"HD95 {stats['hd95_mm']['mean']:.2f} mm, failures {int(stats['dice']['n_failures'])}")
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
