"""Evaluate a folder of predictions against a folder of references: match, compute in parallel, write.

This is the one entry point that ``medunet evaluate`` and the training/inference workflows call
(:func:`evaluate_folders`). It works on any folder of label maps, ours or another tool's (nnU-Net, MONAI),
matching cases by name (see :mod:`medunet.evaluation.cases`).

Problems are reported, never silently dropped:

- a reference without a prediction is scored as an empty prediction (status ``missing_prediction``): it
  counts as a failure in every label and enters the means with Dice 0 and the distance penalty, unless
  ``skip_missing=True`` leaves it out;
- a prediction whose shape differs from its reference is scored the same way (``shape_mismatch``);
- a prediction with the same shape but a different spacing, origin or direction is evaluated in the
  reference geometry and flagged in the ``note`` column;
- predictions without a reference, and label values outside the label set, are listed;
- ``strict=True`` turns any of these into a :class:`~medunet.errors.MedunetError` naming the cases.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medunet.atomic import remove_stale_temporaries
from medunet.errors import MedunetError
from medunet.evaluation import cases as case_io
from medunet.evaluation.aggregate import aggregate
from medunet.evaluation.metrics import (
    DEFAULT_TOLERANCE_MM,
    FAILURE_STATUSES,
    empty_prediction_metrics,
    evaluate_case,
    label_metrics,
    tolerance_for,
)
from medunet.evaluation.outputs import summary_json, write_case_csv, write_summary_json
from medunet.evaluation.provenance import build_provenance, peak_memory_mb
from medunet.evaluation.result import EvaluationResult
from medunet.workers import exit_with_parent


@dataclass
class CaseOutcome:
    """What one worker found for one case: per-label metrics, labels seen, and any problem."""

    pair: case_io.CasePair
    metrics: dict[int, dict[str, Any]]
    n_voxels: int
    ref_labels: set[int]
    pred_labels: set[int]
    note: str = ""


def evaluate_folders(
    pred_dir: str | Path,
    ref_dir: str | Path,
    out_dir: str | Path | None = None,
    report: bool = True,
    images_dir: str | Path | None = None,
    title: str | None = None,
    **options: Any,
) -> EvaluationResult:
    """Evaluate every reference in ``ref_dir`` against its prediction in ``pred_dir``
    (:func:`compute_evaluation`) and write the outputs (:func:`write_evaluation`).

    Args:
        pred_dir: folder of predicted label maps.
        ref_dir: folder of reference label maps (e.g. ``labelsTr``).
        out_dir: where ``cases.csv``, ``summary.json``, ``report.html`` and ``report.pdf`` go; default
            ``pred_dir/evaluation``.
        report: also write the HTML and PDF report.
        images_dir: images to show under the overlays (``case.nii.gz`` or ``case_0000.nii.gz``).
        title: report title.
        options: the keywords of :func:`compute_evaluation` (labels, dataset_json, tolerance_mm, provenance,
            workers, skip_missing, strict, progress, cases).

    Example:
        >>> result = evaluate_folders("preds", "Task04_Hippocampus/labelsTr", "eval")  # doctest: +SKIP
        >>> result.mean("dice", label=1)  # doctest: +SKIP
    """
    result = compute_evaluation(pred_dir, ref_dir, **options)
    out_dir = Path(out_dir) if out_dir is not None else Path(pred_dir) / "evaluation"
    return write_evaluation(result, out_dir, report=report, images_dir=images_dir, title=title)


def compute_evaluation(
    pred_dir: str | Path,
    ref_dir: str | Path,
    labels: Mapping | None = None,
    dataset_json: str | Path | None = None,
    tolerance_mm: float | Mapping[int | str, float] = DEFAULT_TOLERANCE_MM,
    provenance: Mapping[str, Any] | None = None,
    workers: int | None = None,
    skip_missing: bool = False,
    strict: bool = False,
    progress: bool = True,
    cases: Collection[str] | None = None,
) -> EvaluationResult:
    """Score every reference in ``ref_dir`` against its prediction in ``pred_dir``; writes nothing.

    Args:
        pred_dir: folder of predicted label maps.
        ref_dir: folder of reference label maps (e.g. ``labelsTr``).
        labels: ``{value: name}`` (or dataset.json's ``{"name": value}``); default from ``dataset_json``.
        dataset_json: MSD/nnU-Net ``dataset.json``; default the one in or next to ``ref_dir``; without
            either, the labels are those found in the references.
        tolerance_mm: NSD tolerance in mm, one for all labels or ``{label value or name: mm}``.
        provenance: what produced the predictions (network, checkpoint, ...), shown in the report.
        workers: processes computing cases in parallel; default up to 8 (the CPU count); 0 or 1 serial.
        skip_missing: leave references without a prediction out instead of counting them as failures.
        strict: raise :class:`MedunetError` on any missing, extra or mismatched prediction.
        progress: show a progress bar.
        cases: evaluate only these case names (e.g. one fold's validation cases); the other references
            are left out, not reported as missing predictions.
    """
    start = time.perf_counter()
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    pairs, extra = case_io.match_cases(pred_dir, ref_dir)
    problems = []
    if cases is not None:
        wanted = set(cases)
        problems += [f"case without reference: {name}" for name in sorted(wanted - {p.name for p in pairs})]
        pairs = [pair for pair in pairs if pair.name in wanted]
        extra = [name for name in extra if name in wanted]
        if not pairs:
            raise MedunetError(f"none of the {len(wanted)} requested case(s) has a reference in {ref_dir}")
    problems += [f"prediction without reference (ignored): {name}" for name in extra]
    missing = [pair.name for pair in pairs if pair.pred_file is None]
    skipped = "none"
    if skip_missing:  # left out on request: one summary line, not one problem per case
        pairs = [pair for pair in pairs if pair.pred_file is not None]
        if not pairs:
            raise MedunetError(f"no reference in {ref_dir} has a prediction in {pred_dir} (--skip-missing leaves "
                               "them all out). Fix: check --pred; predictions are matched by file name.")
        if missing:
            examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            skipped = f"{len(missing)} reference(s) without a prediction left out (--skip-missing): {examples}"
    else:
        problems += [f"missing prediction: {name}" for name in missing]
    label_names, dataset_json = _resolve_labels(labels, dataset_json, ref_dir)

    outcomes = _run_cases(pairs, label_names, tolerance_mm, workers, progress)
    if label_names is None:
        label_names = {label: str(label) for label in sorted(set().union(*(o.ref_labels for o in outcomes)))}
        if not label_names:
            raise MedunetError(f"the references in {ref_dir} contain no foreground label: check the folder")
    problems += _outcome_problems(outcomes, label_names)
    if strict and problems:
        raise MedunetError("evaluation problems (strict mode):\n  " + "\n  ".join(problems))
    problems += _never_predicted(outcomes, label_names)  # a finding about the network, scored: not refused by strict
    rows = [row for outcome in outcomes for row in _case_rows(outcome, label_names, tolerance_mm)]
    aggregates = aggregate(rows, label_names)
    settings = {
        "pred_dir": str(pred_dir),
        "ref_dir": str(ref_dir),
        "dataset_json": str(dataset_json) if dataset_json else "none (labels from the references)",
        "n_cases": len(outcomes),
        "nsd_tolerance_mm": {name: tolerance_for(v, name, tolerance_mm) for v, name in label_names.items()},
        "missing_predictions": skipped if skip_missing else "scored as failures",
        "runtime_s": round(time.perf_counter() - start, 2),
        "peak_memory_mb": peak_memory_mb(),
    }
    return EvaluationResult(rows, aggregates, label_names, problems, build_provenance(provenance, settings))


def evaluate_pair(
    pair: case_io.CasePair, labels: Mapping[int, str] | None, tolerance_mm: float | Mapping[int | str, float]
) -> CaseOutcome:
    """Read and evaluate one case (runs in a worker process). ``labels`` None: all labels present."""
    ref, ref_geometry = case_io.read_image(pair.ref_file)
    ref_labels = _labels_present(ref)
    if pair.pred_file is None:
        return CaseOutcome(pair, _empty(ref, ref_geometry, labels, ref_labels, tolerance_mm, "missing_prediction"),
                           ref.size, ref_labels, set())
    pred, pred_geometry = case_io.read_image(pair.pred_file)
    mismatch = ref_geometry.mismatch(pred_geometry)
    if pred.shape != ref.shape:
        note = f"{pair.name}: prediction {mismatch}; scored as an empty prediction"
        metrics = _empty(ref, ref_geometry, labels, ref_labels, tolerance_mm, "shape_mismatch")
        return CaseOutcome(pair, metrics, ref.size, ref_labels, set(), note)
    pred_labels = _labels_present(pred)
    to_evaluate = labels if labels is not None else sorted(ref_labels | pred_labels)
    metrics = evaluate_case(pred, ref, ref_geometry.spacing, to_evaluate, tolerance_mm)
    note = f"{pair.name}: prediction {mismatch}; evaluated in the reference geometry" if mismatch else ""
    return CaseOutcome(pair, metrics, ref.size, ref_labels, pred_labels, note)


def _empty(ref, geometry, labels, ref_labels, tolerance_mm, status) -> dict[int, dict[str, Any]]:
    to_evaluate = labels if labels is not None else sorted(ref_labels)
    return empty_prediction_metrics(ref, geometry.spacing, to_evaluate, tolerance_mm, status)


def _run_cases(
    pairs: Sequence[case_io.CasePair],
    labels: Mapping[int, str] | None,
    tolerance_mm: float | Mapping[int | str, float],
    workers: int | None,
    progress: bool,
) -> list[CaseOutcome]:
    """Evaluate all pairs, in a process pool when ``workers`` > 1; results in the order of ``pairs``."""
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    workers = min(workers, len(pairs))
    bar = tqdm(total=len(pairs), desc="evaluate", unit="case", disable=not progress)
    if workers <= 1:
        outcomes = []
        for pair in pairs:
            outcomes.append(evaluate_pair(pair, labels, tolerance_mm))
            bar.update()
        bar.close()
        return outcomes
    # The platform's default start method (fork on Linux up to Python 3.13): fast, and scripts without an
    # ``if __name__ == "__main__":`` guard keep working there. Workers use only numpy, scipy and SimpleITK.
    # They end with this process: killed, it would otherwise leave them waiting for work forever.
    by_name = {}
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(), initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = [pool.submit(evaluate_pair, pair, labels, tolerance_mm) for pair in pairs]
        for future in as_completed(futures):
            outcome = future.result()
            by_name[outcome.pair.name] = outcome
            bar.update()
    bar.close()
    return [by_name[pair.name] for pair in pairs]


def _case_rows(
    outcome: CaseOutcome, labels: Mapping[int, str], tolerance_mm: float | Mapping[int | str, float]
) -> list[dict[str, Any]]:
    """One row per label of a case; labels absent from both images get a ``both_empty`` row."""
    rows = []
    for label, name in labels.items():
        metrics = outcome.metrics.get(label)
        if metrics is None:  # labels were inferred and this case has the label in neither image
            metrics = label_metrics(np.zeros(0, bool), np.zeros(0, bool), (1.0,), math.nan, math.nan)
            metrics["tn"] = float(outcome.n_voxels)
        rows.append({
            "case": outcome.pair.name,
            "label": label,
            "label_name": name,
            "failure": metrics["status"] in FAILURE_STATUSES or metrics["dice"] == 0,
            **metrics,
            "nsd_tolerance_mm": tolerance_for(label, name, tolerance_mm),
            "prediction_file": str(outcome.pair.pred_file or ""),
            "reference_file": str(outcome.pair.ref_file),
            "note": outcome.note,
        })
    return rows


def _outcome_problems(outcomes: Sequence[CaseOutcome], labels: Mapping[int, str]) -> list[str]:
    problems = [outcome.note for outcome in outcomes if outcome.note]
    for outcome in outcomes:
        unknown = sorted(outcome.pred_labels - set(labels))
        if unknown:
            problems.append(f"{outcome.pair.name}: prediction has label values {unknown} not in the label set; ignored")
    return problems


def _never_predicted(outcomes: Sequence[CaseOutcome], labels: Mapping[int, str]) -> list[str]:
    """A label that references hold and no prediction does: the network never outputs it (a lost class)."""
    scored = [outcome for outcome in outcomes if outcome.pair.pred_file is not None and not outcome.note]
    if not scored:
        return []
    predicted = set().union(*(outcome.pred_labels for outcome in scored))
    problems = []
    for label, name in labels.items():
        holding = sum(label in outcome.ref_labels for outcome in scored)
        if holding and label not in predicted:
            problems.append(
                f"label {label} ({name}) is in the reference of {holding} of {len(scored)} case(s) and in none of "
                "their predictions: the network never outputs it (a training that lost the class, or predictions "
                "written with other label values). Fix: check the run's per-class validation Dice (metrics.csv, "
                "'lost_classes' in metrics.json) and retrain with another seed, or map the label values.")
    return problems


def _resolve_labels(
    labels: Mapping | None, dataset_json: str | Path | None, ref_dir: Path
) -> tuple[dict[int, str] | None, Path | None]:
    if labels is not None:
        return case_io.foreground_labels(labels), None
    dataset_json = Path(dataset_json) if dataset_json else case_io.find_dataset_json(ref_dir)
    if dataset_json is None:
        return None, None
    if not dataset_json.is_file():
        raise MedunetError(f"dataset.json {dataset_json} does not exist: pass the file of the dataset or leave it out")
    return case_io.read_labels(dataset_json), dataset_json


def _labels_present(array: np.ndarray) -> set[int]:
    """Non-zero label values in a label map (bincount for small integer labels: faster than unique)."""
    if array.dtype.kind in "ui" and array.size and 0 <= array.min() and array.max() < 65536:
        counts = np.bincount(array.ravel())
        return {int(v) for v in np.flatnonzero(counts) if v}
    return {int(v) for v in np.unique(np.rint(array)) if v}


def write_evaluation(
    result: EvaluationResult, out_dir: str | Path, report: bool = True, images_dir: str | Path | None = None,
    title: str | None = None,
) -> EvaluationResult:
    """Write ``cases.csv``, ``summary.json`` and (``report``) the HTML/PDF report into ``out_dir``, each
    atomically (temporaries of killed runs are removed); ``result.files`` names them.

    Args:
        result: what :func:`compute_evaluation` returned.
        out_dir: the output folder (created).
        report: also write ``report.html`` and ``report.pdf``.
        images_dir: images to show under the report's overlays.
        title: report title.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    result.files["cases_csv"] = write_case_csv(result.rows, out_dir / "cases.csv")
    extra = {"labels": result.labels, "problems": result.problems, "provenance": result.provenance,
             "metrics": result.metrics()}  # plain numbers, what tracking logs for this folder
    summary = summary_json(result.rows, result.aggregates, extra)
    result.files["summary_json"] = write_summary_json(summary, out_dir / "summary.json")
    if report:
        from medunet.evaluation.report import write_report

        result.files.update(write_report(result, out_dir, images_dir=images_dir, title=title))
    return result
