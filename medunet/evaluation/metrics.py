"""Per-case, per-label segmentation metrics in the original image space, with the real voxel spacing.

For every foreground label of one case this computes overlap (Dice, IoU, sensitivity, precision, TP/FP/FN/TN
voxel counts), volumes in mL and the volume error, and surface metrics in mm: HD95, average symmetric
surface distance (ASSD) and normalised surface Dice (NSD) at a tolerance in mm set per label.

Definitions (chosen to match MONAI 1.6 where MONAI has the metric; ``tests/test_evaluation_metrics.py``
checks the agreement):

- **Surface** of a mask: its voxels removed by one binary erosion with the 6-connected (face) structuring
  element, ``mask ^ binary_erosion(mask)``, with everything outside the image counted as background. This is
  MONAI's ``get_mask_edges`` without sub-voxel areas.
- **Surface distances**: for every surface voxel of one mask, the Euclidean distance in mm (voxel centres,
  real spacing) to the nearest surface voxel of the other mask. Computed with scipy's
  ``distance_transform_edt`` on a bounding box around both masks (plus a one-voxel margin), which is exact
  because every surface voxel lies inside that box; MONAI uses a KD-tree for the same numbers.
- **HD95** = max(95th percentile of pred→ref distances, 95th percentile of ref→pred distances), linear
  interpolation between order statistics: MONAI's ``HausdorffDistanceMetric(percentile=95)`` and DeepMind's
  ``surface-distance``. medpy's ``hd95`` and some challenge scripts instead take the 95th percentile of the
  two directed sets pooled together, which is never larger and is smaller when one direction is much worse;
  we keep the max so a prediction cannot hide a bad direction behind a good one.
- **ASSD** = mean of both directed distance sets pooled, MONAI's ``SurfaceDistanceMetric(symmetric=True)``.
- **NSD** = fraction of both surfaces (counted in voxels) within the tolerance of the other surface, ``<=``
  tolerance, MONAI's ``SurfaceDiceMetric`` with ``use_subvoxels=False``. Voxel counting slightly
  over-weights surface patches that run diagonally to the grid; the sub-voxel area variant is not used
  because it is slower and MONAI's default is the voxel count.

Empty and missed structures (the rule, per label and case; MONAI would give NaN or inf and drop the case):

============================  =====  =====  ===========  =========  ============  ===  ===========
reference / prediction        Dice   IoU    sensitivity  precision  HD95, ASSD    NSD  ``status``
============================  =====  =====  ===========  =========  ============  ===  ===========
present / present             value  value  value        value      value         val  ``ok``
present / empty (missed)      0      0      0            NaN        penalty       0    ``missed``
empty / present (false pos.)  0      0      NaN          0          penalty       0    ``false_positive``
empty / empty                 NaN    NaN    NaN          NaN        NaN           NaN  ``both_empty``
============================  =====  =====  ===========  =========  ============  ===  ===========

The distance **penalty** is the diagonal of the whole image in mm (the largest distance two voxels of the
image can have), unless ``distance_penalty_mm`` is given. So a missed structure enters the mean with the
worst possible distance instead of silently dropping out of it. NaN means "not defined" and is left out of
means; ``both_empty`` is never a failure. A **failure** is a structure present in the reference or the
prediction with no overlap at all (Dice 0), which covers missed and false-positive structures and
predictions that are missing or do not match the reference (see :mod:`medunet.evaluation.evaluate`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

# Columns of one per-case row, in the order they appear in the CSV.
OVERLAP_METRICS = ("dice", "iou", "sensitivity", "precision")
COUNT_METRICS = ("tp", "fp", "fn", "tn", "n_ref", "n_pred")
VOLUME_METRICS = ("ref_volume_ml", "pred_volume_ml", "volume_error_ml", "volume_error_pct")
SURFACE_METRICS = ("hd95_mm", "assd_mm", "nsd")
METRIC_NAMES = OVERLAP_METRICS + COUNT_METRICS + VOLUME_METRICS + SURFACE_METRICS

# Statuses where the prediction and the reference do not overlap at all although one of them is present.
FAILURE_STATUSES = ("missed", "false_positive", "missing_prediction", "shape_mismatch")

DEFAULT_TOLERANCE_MM = 2.0


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The largest distance between two voxel centres of an image, in mm: the default distance penalty."""
    return float(np.linalg.norm((np.asarray(shape) - 1) * np.asarray(spacing, dtype=float)))


def tolerance_for(label: int, name: str, tolerance_mm: float | Mapping[int | str, float]) -> float:
    """The NSD tolerance of one label: a single number for all, or a mapping by label value or name."""
    if not isinstance(tolerance_mm, Mapping):
        return float(tolerance_mm)
    for key in (label, str(label), name):
        if key in tolerance_mm:
            return float(tolerance_mm[key])
    return float(tolerance_mm.get("default", DEFAULT_TOLERANCE_MM))


def evaluate_case(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[int, str] | Sequence[int],
    tolerances: float | Mapping[int | str, float] = DEFAULT_TOLERANCE_MM,
    distance_penalty_mm: float | None = None,
) -> dict[int, dict[str, float | str]]:
    """Metrics of every foreground label of one case.

    Args:
        pred: predicted label map (integers), same shape as ``ref``.
        ref: reference label map.
        spacing: voxel size in mm along each axis of the arrays.
        labels: the foreground labels to evaluate, as ``{value: name}`` or a list of values; 0 is skipped.
        tolerances: NSD tolerance in mm, one for all labels or ``{label or name: mm}``.
        distance_penalty_mm: HD95/ASSD given to missed and false-positive structures; default the image
            diagonal.

    Returns:
        ``{label: {metric: value, ..., "status": str}}`` with the metrics of :data:`METRIC_NAMES`.

    Example:
        >>> ref = np.zeros((8, 8, 8), np.uint8); ref[2:6, 2:6, 2:6] = 1
        >>> evaluate_case(ref, ref, (1.0, 1.0, 2.0), {1: "cube"})[1]["dice"]
        1.0
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    names = dict(labels) if isinstance(labels, Mapping) else {int(v): str(v) for v in labels}
    names.pop(0, None)
    spacing = tuple(float(s) for s in spacing)
    penalty = distance_penalty_mm if distance_penalty_mm is not None else image_diagonal_mm(ref.shape, spacing)
    pred_boxes = _label_boxes(pred, max(names, default=0))
    ref_boxes = _label_boxes(ref, max(names, default=0))
    results = {}
    for label, name in sorted(names.items()):
        box = _union_box(pred_boxes[label - 1], ref_boxes[label - 1], ref.shape, margin=1)
        tolerance = tolerance_for(label, name, tolerances)
        if box is None:
            results[label] = label_metrics(np.zeros(0, bool), np.zeros(0, bool), spacing, tolerance, penalty)
        else:
            results[label] = label_metrics(pred[box] == label, ref[box] == label, spacing, tolerance, penalty)
        results[label]["tn"] = float(ref.size) - sum(results[label][k] for k in ("tp", "fp", "fn"))
    return results


def empty_prediction_metrics(
    ref: np.ndarray,
    spacing: Sequence[float],
    labels: Mapping[int, str] | Sequence[int],
    tolerances: float | Mapping[int | str, float],
    status: str,
) -> dict[int, dict[str, float | str]]:
    """Metrics of a case whose prediction is missing or unusable: scored as an empty prediction."""
    results = evaluate_case(np.zeros_like(ref), ref, spacing, labels, tolerances)
    for metrics in results.values():
        metrics["status"] = status
    return results


def label_metrics(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float], tolerance_mm: float, penalty_mm: float
) -> dict[str, float | str]:
    """All metrics of one binary structure; the masks may be a crop that contains both structures."""
    tp = float(np.count_nonzero(pred_mask & ref_mask))
    n_pred = float(np.count_nonzero(pred_mask))
    n_ref = float(np.count_nonzero(ref_mask))
    status = _presence_status(n_ref, n_pred)
    metrics: dict[str, float | str] = {"status": status}
    metrics.update(overlap_metrics(tp, fp=n_pred - tp, fn=n_ref - tp))
    metrics.update(volume_metrics(n_ref, n_pred, spacing))
    if status == "ok":
        metrics.update(surface_metrics(pred_mask, ref_mask, spacing, tolerance_mm))
    elif status == "both_empty":
        metrics.update(hd95_mm=np.nan, assd_mm=np.nan, nsd=np.nan)
    else:
        metrics.update(hd95_mm=penalty_mm, assd_mm=penalty_mm, nsd=0.0)
    return metrics


def overlap_metrics(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Dice, IoU, sensitivity and precision from voxel counts; 0/0 is NaN (see the module docstring)."""
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "n_ref": tp + fn,
        "n_pred": tp + fp,
    }


def volume_metrics(n_ref: float, n_pred: float, spacing: Sequence[float]) -> dict[str, float]:
    """Reference and predicted volume in mL, and the signed error predicted minus reference."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ref_ml, pred_ml = n_ref * voxel_ml, n_pred * voxel_ml
    return {
        "ref_volume_ml": ref_ml,
        "pred_volume_ml": pred_ml,
        "volume_error_ml": pred_ml - ref_ml,
        "volume_error_pct": _ratio(100.0 * (pred_ml - ref_ml), ref_ml),
    }


def surface_distances(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm: (each pred surface voxel → ref surface, each ref → pred).

    Both masks must be non-empty. Pass a crop around both masks for speed: the result is the same.
    """
    pred_surface = surface_voxels(pred_mask)
    ref_surface = surface_voxels(ref_mask)
    pred_to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)[pred_surface]
    ref_to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)[ref_surface]
    return pred_to_ref, ref_to_pred


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """The voxels of a mask that have a face neighbour outside it (the image border counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def surface_metrics(
    pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float], tolerance_mm: float
) -> dict[str, float]:
    """HD95, ASSD and NSD of two non-empty masks (definitions in the module docstring)."""
    pred_to_ref, ref_to_pred = surface_distances(pred_mask, ref_mask, spacing)
    both = np.concatenate([pred_to_ref, ref_to_pred])
    return {
        "hd95_mm": float(max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))),
        "assd_mm": float(both.mean()),
        "nsd": float(np.count_nonzero(both <= tolerance_mm) / both.size),
    }


def _presence_status(n_ref: float, n_pred: float) -> str:
    if n_ref and n_pred:
        return "ok"
    if n_ref:
        return "missed"
    return "false_positive" if n_pred else "both_empty"


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else float("nan")


def _label_boxes(label_map: np.ndarray, max_label: int) -> list[tuple[slice, ...] | None]:
    """Bounding box of each label 1..max_label in one pass (None where the label is absent)."""
    if max_label < 1:
        return []
    as_int = label_map if label_map.dtype.kind in "ui" else np.rint(label_map).astype(np.int32)
    boxes = ndimage.find_objects(np.clip(as_int, 0, None), max_label=max_label)
    return boxes + [None] * (max_label - len(boxes))


def _union_box(
    a: tuple[slice, ...] | None, b: tuple[slice, ...] | None, shape: Sequence[int], margin: int
) -> tuple[slice, ...] | None:
    """The smallest box holding both boxes, grown by ``margin`` voxels and clipped to the image."""
    boxes = [box for box in (a, b) if box is not None]
    if not boxes:
        return None
    return tuple(
        slice(max(0, min(box[d].start for box in boxes) - margin), min(size, max(box[d].stop for box in boxes) + margin))
        for d, size in enumerate(shape)
    )
