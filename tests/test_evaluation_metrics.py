"""Per-case metrics and aggregates: analytic shapes, the empty-structure rule, agreement with MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from medunet.evaluation import evaluate_case
from medunet.evaluation.aggregate import aggregate, bootstrap_ci, describe
from medunet.evaluation.metrics import image_diagonal_mm, tolerance_for

SPACING = (0.7, 0.9, 1.3)  # anisotropic on purpose; the largest voxel side is the distance tolerance
SHAPE = (48, 40, 30)


def sphere(center_mm: tuple[float, float, float], radius_mm: float, shape=SHAPE, spacing=SPACING) -> np.ndarray:
    grid = np.indices(shape, dtype=float) * np.asarray(spacing)[:, None, None, None]
    distance = np.sqrt(sum((grid[d] - center_mm[d]) ** 2 for d in range(3)))
    return (distance <= radius_mm).astype(np.uint8)


def lens_volume(big: float, small: float, offset: float) -> float:
    """Volume of the intersection of two spheres whose centres are ``offset`` apart (partial overlap)."""
    return (math.pi * (big + small - offset) ** 2
            * (offset**2 + 2 * offset * small - 3 * small**2 + 2 * offset * big + 6 * small * big - 3 * big**2)
            / (12 * offset))


def sphere_points(radius: float, n: int = 20000) -> np.ndarray:
    """Evenly spread points on a sphere around the origin (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    polar, azimuth = np.arccos(1 - 2 * i / n), np.pi * (1 + 5**0.5) * i
    return radius * np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], 1)


CENTER = (16.5, 18.0, 19.5)


def test_concentric_spheres_give_analytic_dice_volume_and_distances():
    big, small = 12.0, 9.0
    metrics = evaluate_case(sphere(CENTER, small), sphere(CENTER, big), SPACING, {1: "sphere"}, 5.0)[1]
    voxel = max(SPACING)
    assert metrics["status"] == "ok"
    assert metrics["dice"] == pytest.approx(2 * small**3 / (big**3 + small**3), abs=0.02)
    assert metrics["ref_volume_ml"] == pytest.approx(4 / 3 * math.pi * big**3 / 1000, rel=0.03)
    assert metrics["volume_error_ml"] == pytest.approx(4 / 3 * math.pi * (small**3 - big**3) / 1000, rel=0.05)
    assert metrics["hd95_mm"] == pytest.approx(big - small, abs=voxel)
    assert metrics["assd_mm"] == pytest.approx(big - small, abs=voxel)
    assert metrics["nsd"] == 1.0  # every surface point is within 3 mm + one voxel < 5 mm of the other
    strict = evaluate_case(sphere(CENTER, small), sphere(CENTER, big), SPACING, {1: "sphere"}, 1.0)[1]
    assert strict["nsd"] < 0.05  # no point is closer than 3 mm - one voxel > 1 mm


def test_offset_spheres_match_continuous_geometry_within_one_voxel():
    big, small, offset = 10.0, 8.0, 5.0
    pred_center = (CENTER[0] + offset, CENTER[1], CENTER[2])
    metrics = evaluate_case(sphere(pred_center, small), sphere(CENTER, big), SPACING, [1])[1]
    overlap = lens_volume(big, small, offset)
    expected_dice = 2 * overlap / (4 / 3 * math.pi * (big**3 + small**3))
    assert metrics["dice"] == pytest.approx(expected_dice, abs=0.02)
    # Distances between the continuous surfaces, sampled evenly by area (voxel surfaces weight by area too).
    shift = np.array([offset, 0.0, 0.0])
    pred_to_ref = np.abs(np.linalg.norm(sphere_points(small) + shift, axis=1) - big)
    ref_to_pred = np.abs(np.linalg.norm(sphere_points(big) - shift, axis=1) - small)
    hd95 = max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))
    assd = (small**2 * pred_to_ref.mean() + big**2 * ref_to_pred.mean()) / (small**2 + big**2)
    assert metrics["hd95_mm"] == pytest.approx(hd95, abs=max(SPACING))
    assert metrics["assd_mm"] == pytest.approx(assd, abs=max(SPACING))


def test_both_empty_structure_is_undefined_not_a_zero():
    empty = np.zeros(SHAPE, np.uint8)
    metrics = evaluate_case(empty, empty, SPACING, {1: "a"})[1]
    assert metrics["status"] == "both_empty"
    for name in ("dice", "iou", "sensitivity", "precision", "hd95_mm", "assd_mm", "nsd"):
        assert math.isnan(metrics[name]), name
    assert metrics["ref_volume_ml"] == metrics["pred_volume_ml"] == 0.0


def test_missed_structure_scores_zero_and_the_image_diagonal_penalty():
    ref = sphere(CENTER, 6.0)
    metrics = evaluate_case(np.zeros_like(ref), ref, SPACING, {1: "a"})[1]
    diagonal = image_diagonal_mm(SHAPE, SPACING)
    assert metrics["status"] == "missed"
    assert (metrics["dice"], metrics["iou"], metrics["sensitivity"], metrics["nsd"]) == (0.0, 0.0, 0.0, 0.0)
    assert math.isnan(metrics["precision"])
    assert metrics["hd95_mm"] == metrics["assd_mm"] == pytest.approx(diagonal)
    assert diagonal == pytest.approx(math.dist((0, 0, 0), [(s - 1) * d for s, d in zip(SHAPE, SPACING, strict=True)]))


def test_false_positive_structure_scores_zero_and_penalty():
    pred = sphere(CENTER, 6.0)
    metrics = evaluate_case(pred, np.zeros_like(pred), SPACING, {1: "a"}, distance_penalty_mm=100.0)[1]
    assert metrics["status"] == "false_positive"
    assert metrics["dice"] == metrics["precision"] == 0.0
    assert math.isnan(metrics["sensitivity"])
    assert metrics["hd95_mm"] == 100.0


def random_label_map(rng: np.random.Generator, shape=(40, 36, 20)) -> np.ndarray:
    smooth = ndimage.gaussian_filter(rng.random(shape), 3)
    labels = (smooth > np.quantile(smooth, 0.8)).astype(np.uint8)
    labels[: shape[0] // 3] *= 2  # a second label in part of the volume
    return labels


def one_hot(label_map: np.ndarray, n_classes: int = 3) -> torch.Tensor:
    tensor = torch.as_tensor(label_map.astype(np.int64))
    return torch.nn.functional.one_hot(tensor, n_classes).permute(3, 0, 1, 2)[None].float()


def test_agrees_with_monai_metric_classes():
    from monai.metrics import (
        DiceMetric,
        HausdorffDistanceMetric,
        MeanIoU,
        SurfaceDiceMetric,
        SurfaceDistanceMetric,
    )

    rng = np.random.default_rng(0)
    pred, ref = random_label_map(rng), random_label_map(rng)
    spacing = (0.8, 1.1, 2.5)
    ours = evaluate_case(pred, ref, spacing, {1: "a", 2: "b"}, {1: 2.0, 2: 3.0})
    monai_metrics = {
        "dice": (DiceMetric(include_background=False), {}),
        "iou": (MeanIoU(include_background=False), {}),
        "hd95_mm": (HausdorffDistanceMetric(percentile=95), {"spacing": spacing}),
        "assd_mm": (SurfaceDistanceMetric(symmetric=True), {"spacing": spacing}),
        "nsd": (SurfaceDiceMetric([2.0, 3.0]), {"spacing": spacing}),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (metric, kwargs) in monai_metrics.items():
            expected = metric(one_hot(pred), one_hot(ref), **kwargs).numpy().ravel()
            assert [ours[1][name], ours[2][name]] == pytest.approx(expected, rel=1e-5), name


def test_labels_may_be_float_and_are_cropped_without_changing_counts():
    ref = sphere(CENTER, 7.0)
    pred = np.roll(ref, 2, axis=0)
    as_int = evaluate_case(pred, ref, SPACING, [1])[1]
    as_float = evaluate_case(pred.astype(np.float32), ref.astype(np.float32), SPACING, [1])[1]
    assert as_int == as_float
    assert as_int["tp"] + as_int["fp"] + as_int["fn"] + as_int["tn"] == ref.size
    assert as_int["tp"] + as_int["fn"] == ref.sum()


def test_tolerance_per_label_by_value_name_or_default():
    assert tolerance_for(1, "liver", 2.5) == 2.5
    assert tolerance_for(1, "liver", {1: 1.0}) == 1.0
    assert tolerance_for(1, "liver", {"liver": 4.0, "default": 1.0}) == 4.0
    assert tolerance_for(2, "spleen", {"liver": 4.0, "default": 1.0}) == 1.0


def test_describe_matches_numpy_and_leaves_nan_out():
    values = [0.9, 0.8, float("nan"), 0.7, 0.95, 0.85]
    stats = describe(values, n_failures=1)
    finite = np.array([0.9, 0.8, 0.7, 0.95, 0.85])
    assert (stats["n_cases"], stats["n_valid"], stats["n_failures"]) == (6, 5, 1)
    assert stats["mean"] == pytest.approx(finite.mean())
    assert stats["std"] == pytest.approx(finite.std(ddof=1))
    assert [stats["q25"], stats["median"], stats["q75"]] == pytest.approx(np.percentile(finite, [25, 50, 75]))
    assert stats["ci_low"] < stats["mean"] < stats["ci_high"]


def test_bootstrap_interval_narrows_with_more_cases():
    rng = np.random.default_rng(1)
    few, many = rng.normal(0.8, 0.1, 10), rng.normal(0.8, 0.1, 400)
    (few_low, few_high), (many_low, many_high) = bootstrap_ci(few), bootstrap_ci(many)
    assert many_high - many_low < (few_high - few_low) / 3
    assert all(math.isnan(bound) for bound in bootstrap_ci(np.array([0.5])))  # undefined for one case


def test_foreground_aggregate_averages_labels_per_case_and_counts_failures():
    rows = [
        {"case": "a", "label": 1, "failure": False, "dice": 0.8, "tp": 10.0},
        {"case": "a", "label": 2, "failure": False, "dice": 0.6, "tp": 5.0},
        {"case": "b", "label": 1, "failure": True, "dice": 0.0, "tp": 0.0},
        {"case": "b", "label": 2, "failure": False, "dice": float("nan"), "tp": 0.0},
    ]
    rows = [{**dict.fromkeys(_all_metrics(), 0.0), **row} for row in rows]
    stats = aggregate(rows, {1: "x", 2: "y"})
    assert stats["1"]["dice"]["mean"] == pytest.approx(0.4)
    assert stats["2"]["dice"]["n_valid"] == 1
    assert stats["foreground"]["dice"]["mean"] == pytest.approx((0.7 + 0.0) / 2)
    assert stats["foreground"]["tp"]["mean"] == pytest.approx((15 + 0) / 2)
    assert stats["1"]["dice"]["n_failures"] == 1 and stats["foreground"]["dice"]["n_failures"] == 1


def _all_metrics():
    from medunet.evaluation.metrics import METRIC_NAMES

    return METRIC_NAMES
