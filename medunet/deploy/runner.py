"""Whole-volume segmentation with an exported medunet network: onnxruntime, numpy and nibabel only.

This file is copied, unchanged, into every folder ``medunet export-deploy`` writes (``OUT/run.py``); it must
never import torch, MONAI or medunet. Next to it, ``plan.json`` holds the preprocessing and postprocessing as
data (recorded from the training run's preset) and ``model.onnx`` / ``model.int8.onnx`` the network at the
sliding-window size. Usage, from anywhere::

    python OUT/run.py --input CASE.nii.gz --output PRED.nii.gz [--int8] [--threads N]

The steps reproduce medunet's MONAI inference chain (``medunet.data.infer_transforms`` + ``SlidingWindowInferer``
+ ``Invertd``): NaN/Inf voxels to background, channel first, RAS orientation, linear resampling to the target
spacing (border padding, voxel centres mapped through the affines as MONAI's ``Spacing`` does), CT window to
[0, 1] and crop to the body, or MRI z-score over non-zero voxels; Gaussian-weighted sliding windows
(``sigma = 0.125 * roi``) averaging softmax probabilities; then the label map is put back on the input's grid
(uncrop, nearest-neighbour resampling, inverse orientation) and written as uint8 with the input's affine.

Stitching streams along the last axis: only the windows of one row of positions are accumulated at a time
(``classes x X x Y x roi_z`` values instead of ``classes x volume``), and finished slabs are reduced to uint8
labels at once, so the peak memory of a CT volume is the image plus a few slabs, not the full probability map.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

PLAN_FILE = "plan.json"
#: Off-diagonal tolerance of the voxel-to-voxel map of resampling (sheared affines are refused).
_AFFINE_TOLERANCE = 1e-4


class DeployError(ValueError):
    """A problem with the input, the options or the deployment folder; printed as one line."""


# -- reading and writing ----------------------------------------------------------------------------------
def load_plan(folder: str | Path) -> dict[str, Any]:
    """The deployment plan (``plan.json``) of ``folder``."""
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        raise DeployError(f"{path} does not exist. Fix: run this script from a folder written by "
                          "'medunet export-deploy' (it holds plan.json and model.onnx).")
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DeployError(f"{path} is not valid JSON ({error}). Fix: export it again.") from None
    if not isinstance(plan, dict) or plan.get("format") != "medunet-deploy" or plan.get("version") != 1:
        raise DeployError(f"{path} is not a medunet deployment plan of version 1. Fix: export it again.")
    check_plan(plan, str(path))
    return plan


def check_plan(plan: dict[str, Any], where: str) -> None:
    """Refuse a plan whose values are not what ``medunet export-deploy`` writes (a deployment folder is data people
    copy to devices): every number finite and in range, the model files plain names inside the folder.

    Raises:
        DeployError: naming the field, its value and the fix.
    """
    def refuse(field: str, expected: str) -> None:
        value = repr(_field(plan, field))[:80]
        raise DeployError(f"{where}: {field} is {value}; expected {expected}. Fix: export the folder again with "
                          "'medunet export-deploy'.")

    def count(value: Any, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    labels = plan.get("labels")
    if not (isinstance(labels, dict) and labels and all(isinstance(key, str) and key.isdigit() and isinstance(name, str)
                                                        for key, name in labels.items())):
        refuse("labels", "an object of label values (digits) to names")
    for field, least in (("in_channels", 1), ("out_channels", 2)):
        if not count(plan.get(field), least):
            refuse(field, f"an integer >= {least}")
    if plan["out_channels"] != len(labels):
        refuse("out_channels", f"the number of labels ({len(labels)})")
    spacing = plan.get("target_spacing")
    if spacing is not None and not (isinstance(spacing, list) and len(spacing) == 3
                                    and all(number(v) and v > 0 for v in spacing)):
        refuse("target_spacing", "null or three positive numbers (mm)")
    intensity = plan.get("intensity")
    kind = intensity.get("kind") if isinstance(intensity, dict) else None
    if kind == "ct_window":
        window = intensity.get("window")
        if not (isinstance(window, list) and len(window) == 2 and all(map(number, window)) and window[0] < window[1]):
            refuse("intensity.window", "two numbers, low < high (HU)")
    elif kind != "zscore_nonzero_channelwise":
        refuse("intensity.kind", "'ct_window' or 'zscore_nonzero_channelwise'")
    if not isinstance(plan.get("crop_foreground", False), bool):
        refuse("crop_foreground", "true or false")
    if not number(plan.get("non_finite_fill")):
        refuse("non_finite_fill", "a finite number")
    window = plan.get("sliding_window")
    if not isinstance(window, dict):
        refuse("sliding_window", "an object")
    roi = window.get("roi_size")
    if not (isinstance(roi, list) and len(roi) == 3 and all(count(v, 1) for v in roi)):
        refuse("sliding_window.roi_size", "three positive integers")
    if not (number(window.get("overlap")) and 0 <= window["overlap"] < 1):
        refuse("sliding_window.overlap", "a number in [0, 1)")
    if not count(window.get("sw_batch_size", 1), 1):
        refuse("sliding_window.sw_batch_size", "an integer >= 1")
    if not (number(window.get("sigma_scale", 0.125)) and window.get("sigma_scale", 0.125) > 0):
        refuse("sliding_window.sigma_scale", "a positive number")
    models = plan.get("models")
    if not isinstance(models, dict) or "fp32" not in models:
        refuse("models", "an object naming the 'fp32' model file")
    for key, name in models.items():
        if not (isinstance(name, str) and name not in ("", ".", "..") and name.isprintable()
                and "/" not in name and "\\" not in name):
            refuse(f"models.{key}", "a file name inside the deployment folder")


def _field(plan: dict[str, Any], field: str) -> Any:
    """A dotted field of the plan, or None where the path is missing."""
    value: Any = plan
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(array (C, X, Y, Z) float32, affine 4x4 RAS world)`` of a NIfTI file (or, with SimpleITK, MHA/NRRD)."""
    path = Path(path)
    if not path.is_file():
        raise DeployError(f"input {path} does not exist. Fix: check the path.")
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        image = nib.load(str(path))
        stored = np.asarray(image.dataobj)  # the file's dtype (scaled if the header says so), Fortran order
        # One pass that converts to float32 and to C order together: about 2.5x faster on a 512x512x200 CT than
        # reading as float32 and then making it contiguous (two passes over 200 MB, one of them a transposing copy).
        array = np.empty(stored.shape, dtype=np.float32)
        array[...] = stored
        del stored
        affine = np.asarray(image.affine, dtype=np.float64)
        array = array[None] if array.ndim == 3 else np.moveaxis(array.reshape(*array.shape[:3], -1), -1, 0)
        return np.ascontiguousarray(array), affine
    try:
        import SimpleITK as sitk
    except ImportError:
        raise DeployError(f"{path} is not NIfTI; other formats need SimpleITK. Fix: pip install SimpleITK, or "
                          "convert the image to .nii.gz.") from None
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x[, c])
    components = image.GetNumberOfComponentsPerPixel()
    array = np.moveaxis(array, -1, 0) if components > 1 else array[None]
    array = np.ascontiguousarray(np.transpose(array, (0, 3, 2, 1)))
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = image.GetOrigin()
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # ITK's LPS world to NIfTI's RAS world


def write_labels(labels: np.ndarray, affine: np.ndarray, path: str | Path) -> Path:
    """Write ``labels`` (uint8) as NIfTI with ``affine``, atomically (hidden temporary file + ``os.replace``)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        image = nib.Nifti1Image(labels.astype(np.uint8), affine)
        image.set_data_dtype(np.uint8)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, str(temporary))
        with open(temporary, "rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


# -- geometry ---------------------------------------------------------------------------------------------
def _orientation(affine: np.ndarray) -> np.ndarray:
    import nibabel.orientations as orientations

    return orientations.ornt_transform(orientations.io_orientation(affine), orientations.axcodes2ornt("RAS"))


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``(C, X, Y, Z)`` to RAS voxel axes (flips and axis swaps only, as MONAI's ``Orientation``)."""
    import nibabel.orientations as orientations

    transform = _orientation(affine)
    shape = array.shape[1:]
    if (transform == [[0, 1], [1, 1], [2, 1]]).all():
        return array, affine  # already RAS: no copy
    oriented = np.stack([orientations.apply_orientation(channel, transform) for channel in array])
    return np.ascontiguousarray(oriented), affine @ orientations.inv_ornt_aff(transform, shape)


def from_ras(labels: np.ndarray, original_affine: np.ndarray) -> np.ndarray:
    """Undo :func:`to_ras` on a ``(X, Y, Z)`` label map."""
    import nibabel.orientations as orientations

    inverse = orientations.ornt_transform(orientations.axcodes2ornt("RAS"), orientations.io_orientation(original_affine))
    return np.ascontiguousarray(orientations.apply_orientation(labels, inverse))


def _spacing_of(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((affine[:3, :3] ** 2).sum(axis=0))


def spacing_grid(affine: np.ndarray, shape: Sequence[int], spacing: Sequence[float]) -> tuple[np.ndarray, tuple[int, ...]]:
    """The affine and shape of the grid at ``spacing`` (MONAI ``Spacing``: same directions, same first voxel).

    Returns:
        ``(scale, offset, shape)`` packed as ``(map, shape)`` where ``map[i] = (scale_i, offset_i)`` sends an output
        voxel index ``j`` to the input voxel coordinate ``scale_i * j + offset_i``.
    """
    old = _spacing_of(affine)
    new = np.asarray(spacing, dtype=np.float64)
    factors = new / old
    out_shape = tuple(int(v) for v in np.round((np.asarray(shape, dtype=np.float64) - 1.0) / factors + 1.0))
    return np.stack([factors, np.zeros(3)], axis=1), out_shape


def _check_axis_aligned(affine: np.ndarray, where: str) -> None:
    rzs = affine[:3, :3]
    gram = rzs.T @ rzs
    off = gram - np.diag(np.diag(gram))
    if np.abs(off).max() > _AFFINE_TOLERANCE * np.abs(np.diag(gram)).max():
        raise DeployError(f"{where}: the image's voxel axes are not perpendicular (a sheared affine); this runner "
                          "resamples along the voxel axes only. Fix: resample the image first, or use "
                          "'medunet infer'.")


def resample_linear(array: np.ndarray, mapping: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """Separable (bi/tri)linear resampling of ``(C, X, Y, Z)``; coordinates outside clamp to the border.

    The axes are resampled one after the other, the most shrinking first, so the intermediate arrays stay small.
    """
    result = array
    order = sorted(range(3), key=lambda axis: out_shape[axis] / array.shape[axis + 1])
    for axis in order:
        size = result.shape[axis + 1]
        scale, offset = mapping[axis]
        coords = np.clip(scale * np.arange(out_shape[axis], dtype=np.float64) + offset, 0.0, size - 1.0)
        low = np.floor(coords).astype(np.int64)
        high = np.minimum(low + 1, size - 1)
        shape = [1] * result.ndim
        shape[axis + 1] = -1
        weight = (coords - low).astype(np.float32).reshape(shape)
        if not weight.any():  # every output voxel sits on an input voxel (e.g. 2.5 mm slices to 5 mm): a gather
            result = np.take(result, low, axis=axis + 1)
            continue
        upper = np.take(result, high, axis=axis + 1)
        upper -= (lower := np.take(result, low, axis=axis + 1))
        upper *= weight
        lower += upper
        del upper
        result = lower
    return result


def resample_nearest(labels: np.ndarray, mapping: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resampling of a ``(X, Y, Z)`` label map (border clamping)."""
    index = []
    for axis in range(3):
        scale, offset = mapping[axis]
        coords = np.rint(scale * np.arange(out_shape[axis], dtype=np.float64) + offset)
        index.append(np.clip(coords, 0, labels.shape[axis] - 1).astype(np.int64))
    return labels[np.ix_(*index)]


def foreground_box(array: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The bounding box of voxels > 0 in any channel (MONAI ``CropForeground``), None when there are none."""
    mask = (array > 0).any(axis=0)
    box = []
    for axis in range(3):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def normalise(array: np.ndarray, plan: dict[str, Any]) -> np.ndarray:
    """The preset's intensity normalisation: CT window to [0, 1], or z-score over non-zero voxels per channel."""
    intensity = plan["intensity"]
    if intensity["kind"] == "ct_window":
        low, high = intensity["window"]
        out = array - np.float32(low)
        out *= np.float32(1.0 / (high - low))
        return np.clip(out, 0.0, 1.0, out=out)
    out = array.copy()
    for channel in range(array.shape[0]):
        values = array[channel]
        mask = values != 0
        if not mask.any():
            continue
        selected = values[mask].astype(np.float64)
        std = float(selected.std())
        out[channel][mask] = ((selected - selected.mean()) / (std if std > 0 else 1.0)).astype(np.float32)
    return out


# -- preprocessing and postprocessing ---------------------------------------------------------------------
def preprocess(array: np.ndarray, affine: np.ndarray, plan: dict[str, Any], where: str = "input") -> tuple[np.ndarray, dict]:
    """The network input ``(C, X, Y, Z)`` and what :func:`postprocess` needs to go back to the input's grid."""
    if array.shape[0] != plan["in_channels"]:
        raise DeployError(f"{where} has {array.shape[0]} channel(s); the network takes {plan['in_channels']}. "
                          "Fix: pass an image with the modalities the network was trained on.")
    bad = ~np.isfinite(array)
    if bad.any():
        print(f"warning: {where}: {int(bad.sum())} NaN/infinite voxels set to background", file=sys.stderr)
        array = np.where(bad, np.float32(plan["non_finite_fill"]), array)
    # Class i of the network is the i-th smallest label value (labels with gaps, e.g. 0, 1, 2, 4, are trained as 0..3).
    state: dict[str, Any] = {"affine": affine, "shape": array.shape[1:],
                             "label_values": sorted(int(value) for value in plan["labels"])}
    array, ras_affine = to_ras(array, affine)
    state["ras_shape"] = array.shape[1:]
    if plan.get("target_spacing") is not None:
        _check_axis_aligned(ras_affine, where)
        mapping, out_shape = spacing_grid(ras_affine, array.shape[1:], plan["target_spacing"])
        array = resample_linear(array, mapping, out_shape)
        state["spacing_map"] = mapping
    state["spacing_shape"] = array.shape[1:]
    array = normalise(array, plan)
    box = foreground_box(array) if plan.get("crop_foreground") else None
    if box is not None:
        array = np.ascontiguousarray(array[(slice(None), *box)])
    state["box"] = box
    return array, state


def postprocess(labels: np.ndarray, state: dict[str, Any]) -> np.ndarray:
    """Put a label map of the network's grid back on the input's grid (classes to label values, uncrop, resample,
    reorient)."""
    values = state.get("label_values")
    if values is not None and values != list(range(len(values))):
        labels = np.asarray(values, dtype=np.uint8)[labels]
    if state["box"] is not None:
        full = np.zeros(state["spacing_shape"], dtype=labels.dtype)
        full[state["box"]] = labels
        labels = full
    if "spacing_map" in state:
        scale = state["spacing_map"][:, 0]
        inverse = np.stack([1.0 / scale, -state["spacing_map"][:, 1] / scale], axis=1)
        labels = resample_nearest(labels, inverse, state["ras_shape"])
    return from_ras(labels, state["affine"])


# -- sliding window ---------------------------------------------------------------------------------------
def gaussian_importance(roi_size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's Gaussian window weights (``compute_importance_map(mode="gaussian")``), float32."""
    weights = np.ones((), dtype=np.float64)
    for size in roi_size:
        x = np.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1)
        weights = np.multiply.outer(weights, np.exp(x ** 2 / (-2 * (sigma_scale * size) ** 2)))
    weights = weights.astype(np.float32)
    return np.maximum(weights, max(float(weights.min()), 1e-3))


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window start positions along one axis (MONAI ``dense_patch_slices`` with its scan interval)."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    count = next(d for d in range(math.ceil(size / interval)) if d * interval + roi >= size) + 1
    return [i * interval - max(i * interval + roi - size, 0) for i in range(count)]


def _weighted_probabilities_(outputs: np.ndarray, importance: np.ndarray, kind: str) -> np.ndarray:
    """``softmax(outputs, axis=1) * importance`` (``kind="logits"``) or ``outputs * importance``, computed in
    ``outputs``' own buffer (a fresh float32 array from the network): the Gaussian weight is folded into the
    softmax's normalisation, so one array of window size is made instead of three of classes x window size."""
    if kind == "logits":
        outputs -= outputs.max(axis=1, keepdims=True)
        np.exp(outputs, out=outputs)
        outputs *= importance / outputs.sum(axis=1, keepdims=True)
    else:
        outputs *= importance
    return outputs


def sliding_window_labels(
    volume: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    roi_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 4,
    accumulate_dtype: Any = np.float32,
    progress: Callable[[int, int], None] | None = None,
    outputs: str = "logits",
) -> np.ndarray:
    """Argmax of the Gaussian-weighted average of softmax probabilities over sliding windows, as uint8.

    Windows are processed one row of last-axis positions at a time; the accumulator holds
    ``num_classes x X x Y x roi_z`` values (``accumulate_dtype``), and each finished slab is reduced to labels
    immediately. The weighted sum is not divided by the summed weights: a positive factor per voxel does not
    change the argmax.

    Args:
        volume: ``(C, X, Y, Z)`` float32, already preprocessed.
        predict: windows ``(B, C, *roi_size)`` -> logits ``(B, num_classes, *roi_size)``.
        roi_size: the window size (the network's input size).
        num_classes: output channels.
        overlap: window overlap in [0, 1).
        batch_size: windows per call of ``predict``.
        accumulate_dtype: dtype of the accumulator (float32, or float16 to halve it).
        progress: called with (windows done, windows in all).
        outputs: what ``predict`` returns: ``"logits"`` (softmax is applied here) or ``"probabilities"``.
    """
    roi = [int(r) for r in roi_size]
    shape = volume.shape[1:]
    pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, shape)]
    if any(p != (0, 0) for p in pad):
        volume = np.pad(volume, [(0, 0), *pad])
    padded = volume.shape[1:]
    starts = [window_starts(padded[axis], roi[axis], overlap) for axis in range(3)]
    importance = gaussian_importance(roi)
    labels = np.zeros(padded, dtype=np.uint8)
    buffer = np.zeros((num_classes, padded[0], padded[1], roi[2]), dtype=accumulate_dtype)
    low = starts[2][0]
    total = len(starts[0]) * len(starts[1]) * len(starts[2])
    done = 0
    for z in starts[2]:
        if z > low:  # slabs before z receive no more windows: reduce them and slide the buffer
            step = z - low
            labels[:, :, low:z] = buffer[:, :, :, :step].argmax(axis=0)
            buffer[:, :, :, :-step] = buffer[:, :, :, step:].copy()
            buffer[:, :, :, -step:] = 0
            low = z
        positions = [(x, y) for x in starts[0] for y in starts[1]]
        for first in range(0, len(positions), batch_size):
            chunk = positions[first:first + batch_size]
            windows = np.stack([volume[:, x:x + roi[0], y:y + roi[1], z:z + roi[2]] for x, y in chunk])
            probabilities = np.array(predict(windows), dtype=np.float32, copy=None)  # ours to overwrite
            _weighted_probabilities_(probabilities, importance, outputs)
            for (x, y), window in zip(chunk, probabilities):
                buffer[:, x:x + roi[0], y:y + roi[1], :] += window
            done += len(chunk)
            if progress is not None:
                progress(done, total)
    labels[:, :, low:low + roi[2]] = buffer.argmax(axis=0)
    crop = tuple(slice(before, before + size) for (before, _), size in zip(pad, shape))
    return np.ascontiguousarray(labels[crop])


# -- onnxruntime ------------------------------------------------------------------------------------------
def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def onnx_predictor(model: str | Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A ``predict(windows) -> logits`` function running ``model`` with onnxruntime on the CPU.

    A batch is run one window at a time, ``threads`` windows (default: the CPUs this process may use) at the same
    time on one thread each; a lone window runs on all threads inside onnxruntime. onnxruntime parallelises its
    convolutions but runs the layout and (de)quantization nodes around them on one thread, so a second thread
    inside it barely speeds up an int8 graph, while whole windows in parallel scale every node; and one window per
    run keeps the network's working memory at ``threads`` windows whatever the window batch
    (``benchmarks/deploy/deploy.md``).
    """
    import onnxruntime

    def session(intra_op_threads: int) -> Any:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = intra_op_threads, 1
        return onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])

    threads = threads or usable_cpus()
    serial = session(1)
    input_name = serial.get_inputs()[0].name
    pool = ThreadPoolExecutor(threads, thread_name_prefix="onnx-window") if threads > 1 else None
    wide = functools.cache(lambda: session(threads))  # the all-threads session, made when a lone window first comes

    def run_one(window: np.ndarray) -> np.ndarray:
        return serial.run(None, {input_name: window[None]})[0][0]

    def predict(windows: np.ndarray) -> np.ndarray:
        windows = np.ascontiguousarray(windows, dtype=np.float32)
        if pool is None:
            return np.stack([run_one(window) for window in windows])
        if len(windows) == 1:
            return wide().run(None, {input_name: windows})[0]
        return np.stack(list(pool.map(run_one, windows)))

    return predict


def _session_predictor(model: Path, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """:func:`onnx_predictor`, made once per model file and thread count for all the cases of a process (creating
    an onnxruntime session optimises the graph: about 0.1 s, as long as a small case's whole segmentation). A file
    written again (another size or modification time) gets a new session."""
    stat = model.stat()
    return _cached_predictor(str(model.resolve()), stat.st_mtime_ns, stat.st_size, threads)


@functools.lru_cache(maxsize=4)
def _cached_predictor(model: str, _mtime_ns: int, _size: int, threads: int | None) -> Callable[[np.ndarray], np.ndarray]:
    return onnx_predictor(model, threads)


def segment(
    image: str | Path,
    output: str | Path,
    folder: str | Path | None = None,
    int8: bool = False,
    threads: int | None = None,
    overlap: float | None = None,
    batch_size: int | None = None,
    accumulate_dtype: Any = np.float32,
    quiet: bool = False,
) -> Path:
    """Segment ``image`` with the deployment in ``folder`` (default: this file's folder) and write ``output``."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    plan = load_plan(folder)
    model = folder / plan["models"].get("int8" if int8 else "fp32", "model.int8.onnx")
    if not model.is_file():
        raise DeployError(f"{model} does not exist. Fix: export it again with 'medunet export-deploy'"
                          + (" (without --no-int8), or drop --int8." if int8 else "."))
    window = plan["sliding_window"]
    volume, state = preprocess(*read_image(image), plan, where=str(image))  # no reference to the raw image kept
    affine = state["affine"]

    def report(done: int, total: int) -> None:
        if not quiet and (done == total or done % max(total // 10, 1) == 0):
            print(f"\r{Path(image).name}: {done}/{total} windows", end="\n" if done == total else "",
                  file=sys.stderr, flush=True)

    predict = _session_predictor(model, threads)
    labels = sliding_window_labels(volume, predict, window["roi_size"], plan["out_channels"],
                                   overlap=window["overlap"] if overlap is None else overlap,
                                   batch_size=batch_size or window["sw_batch_size"],
                                   accumulate_dtype=accumulate_dtype, progress=report)
    del volume
    return write_labels(postprocess(labels, state), affine, output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Segment a volume with this exported medunet network "
                                     "(onnxruntime, numpy, nibabel).")
    parser.add_argument("--input", required=True, nargs="+", type=Path, help="NIfTI image(s) (or MHA/NRRD with SimpleITK)")
    parser.add_argument("--output", required=True, type=Path,
                        help="the label map file (one input), or a folder for several inputs (OUT/<case>.nii.gz)")
    parser.add_argument("--int8", action="store_true", help="run the int8 model (model.int8.onnx)")
    parser.add_argument("--threads", type=int, default=None,
                        help="windows run at the same time, one thread each (default: the CPUs this process may use)")
    parser.add_argument("--overlap", type=float, default=None, help="window overlap in [0, 1) (default: the plan's)")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: the plan's)")
    parser.add_argument("--fp16-accumulation", action="store_true", help="halve the stitching buffer (float16)")
    args = parser.parse_args(argv)
    try:
        if args.overlap is not None and not 0 <= args.overlap < 1:
            raise DeployError(f"--overlap {args.overlap} is outside [0, 1). Fix: pass e.g. 0.5.")
        several = len(args.input) > 1 or args.output.is_dir()
        for image in args.input:
            name = image.name
            for suffix in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd"):
                if name.lower().endswith(suffix):
                    name = name[: -len(suffix)]
                    break
            target = args.output / f"{name}.nii.gz" if several else args.output
            start = time.perf_counter()
            segment(image, target, int8=args.int8, threads=args.threads, overlap=args.overlap,
                    batch_size=args.batch_size, accumulate_dtype=np.float16 if args.fp16_accumulation else np.float32)
            print(f"wrote {target} ({time.perf_counter() - start:.1f} s)")
    except DeployError as error:
        print(f"run.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
