"""``medunet export-deploy``: a trained run as a folder that segments whole volumes without PyTorch or MONAI.

The folder (``OUT/``) holds:

- ``model.onnx``: the network at the sliding-window size (fp32, dynamic batch; :func:`medunet.bundle.onnx.export_onnx`);
- ``model.int8.onnx``: onnxruntime static quantization (``quantize_static``, QDQ format, per-channel int8 weights,
  uint8 activations, MinMax calibration) on windows of the run's training cases, preprocessed exactly as the
  runner preprocesses them;
- ``plan.json``: the preprocessing and postprocessing as data (orientation, spacing, intensity, crop, window),
  from the run's recorded preset;
- ``run.py``: :mod:`medunet.deploy.runner`, copied unchanged (onnxruntime, numpy, nibabel; SimpleITK optional);
- ``requirements.txt`` and ``README.md``.

Every file is written atomically; the folder works wherever it is copied (nothing in it names an absolute path
that is read back).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medunet.atomic import atomic_folder, atomic_path
from medunet.deploy import runner
from medunet.errors import MedunetError

FP32_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"
RUNNER_FILE = "run.py"
REQUIREMENTS = """# The runner needs only these (no torch, no MONAI): pip install -r requirements.txt
onnxruntime>=1.17
numpy>=1.24
nibabel>=5.0
# optional, for MHA/NRRD inputs: SimpleITK>=2.2
"""


@dataclass(frozen=True)
class DeployExport:
    """What :func:`export_deploy` wrote.

    Args:
        folder: the deployment folder.
        files: the files written, by role.
        onnx_max_abs_difference: largest |onnxruntime fp32 - PyTorch| on the export check.
        calibration_windows: windows the int8 model was calibrated on (0: no int8 model).
        int8_window_agreement: fraction of voxels whose argmax label int8 and fp32 agree, on those windows.
    """

    folder: Path
    files: dict[str, Path] = field(default_factory=dict)
    onnx_max_abs_difference: float = 0.0
    calibration_windows: int = 0
    int8_window_agreement: float | None = None


def deploy_plan(preset: Any, sliding_window: dict[str, Any], network_name: str | None, int8: bool) -> dict[str, Any]:
    """The runner's ``plan.json``: the preset's preprocessing and the sliding window, as plain data.

    Args:
        preset: the run's :class:`~medunet.data.TaskPreset`.
        sliding_window: ``roi_size``, ``overlap``, ``sw_batch_size`` (the run's record).
        network_name: the registry name of the network, for people.
        int8: whether ``model.int8.onnx`` is part of the folder.
    """
    from medunet import __version__
    from medunet.data.transforms import non_finite_fill_value

    intensity = ({"kind": "ct_window", "window": list(preset.ct_window)} if preset.is_ct
                 else {"kind": "zscore_nonzero_channelwise"})
    return {
        "format": "medunet-deploy",
        "version": 1,
        "medunet_version": __version__,
        "task": preset.name,
        "network": network_name,
        "labels": {str(value): name for value, name in preset.labels.items()},
        "in_channels": preset.in_channels,
        "out_channels": preset.out_channels,
        "orientation": "RAS",
        "target_spacing": list(preset.target_spacing) if preset.target_spacing is not None else None,
        "intensity": intensity,
        "crop_foreground": preset.is_ct,
        "non_finite_fill": non_finite_fill_value(preset),
        "sliding_window": {"roi_size": [int(v) for v in sliding_window["roi_size"]],
                           "overlap": float(sliding_window["overlap"]),
                           "sw_batch_size": int(sliding_window["sw_batch_size"]),
                           "mode": "gaussian", "sigma_scale": 0.125},
        "models": {"fp32": FP32_MODEL, **({"int8": INT8_MODEL} if int8 else {})},
    }


def calibration_windows(images: Sequence[str | Path], plan: dict[str, Any], per_case: int = 2,
                        limit: int = 32) -> list[np.ndarray]:
    """Windows ``(1, C, *roi)`` of ``images`` preprocessed by the runner: the window with the most foreground
    intensity and evenly spread others, ``per_case`` per image, at most ``limit`` in all."""
    roi = plan["sliding_window"]["roi_size"]
    windows: list[np.ndarray] = []
    for image in images:
        array, affine = runner.read_image(image)
        volume, _ = runner.preprocess(array, affine, plan, where=str(image))
        pad = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for r, s in zip(roi, volume.shape[1:])]
        volume = np.pad(volume, [(0, 0), *pad])
        starts = [runner.window_starts(volume.shape[axis + 1], roi[axis], 0.5) for axis in range(3)]
        positions = [(x, y, z) for x in starts[0] for y in starts[1] for z in starts[2]]
        crops = [volume[:, x:x + roi[0], y:y + roi[1], z:z + roi[2]] for x, y, z in positions]
        order = np.argsort([-float(np.abs(crop).mean()) for crop in crops])
        chosen = [int(order[0])] + [int(i) for i in np.linspace(0, len(crops) - 1, per_case)[1:].round()]
        for index in dict.fromkeys(chosen[:per_case]):
            windows.append(np.ascontiguousarray(crops[index][None], dtype=np.float32))
        if len(windows) >= limit:
            break
    return windows[:limit]


def _calibration_images(record: Any, images: Sequence[str | Path] | None, limit: int) -> list[Path]:
    """The calibration images: ``images`` when given, else the run's training cases."""
    if images:
        from medunet.engines.inference import collect_inputs

        return [Path(item["image"]) for item in collect_inputs(images)][:limit]
    from medunet.data import load_fold

    dataset, datalist = record.dataset_path, record.datalist_path  # recorded relative to the repository, or absolute
    if not dataset or not datalist or not Path(dataset).is_dir() or not Path(datalist).is_file():
        raise MedunetError(
            f"the run's training cases ({dataset}, datalist {datalist}) are not found from here, and the int8 model "
            "is calibrated on them. Fix: pass --calibration-images with a few training images, run from the "
            "folder the run was trained in, or pass --no-int8."
        )
    train, _ = load_fold(datalist, record.fold or 0, data_root=dataset)
    return [Path(item["image"]) for item in train[:limit]]


class _WindowReader:
    """An onnxruntime ``CalibrationDataReader`` over prepared windows."""

    def __init__(self, windows: Sequence[np.ndarray], input_name: str) -> None:
        self._windows: Iterator[np.ndarray] = iter(windows)
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        window = next(self._windows, None)
        return None if window is None else {self._input_name: window}


def quantize_int8(fp32_model: str | Path, int8_model: str | Path, windows: Sequence[np.ndarray]) -> None:
    """Static int8 quantization of ``fp32_model`` (QDQ, per-channel weights) calibrated on ``windows``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_WindowReader, CalibrationDataReader):
        pass

    int8_model = Path(int8_model)
    prepared = int8_model.with_name(f".tmp{os.getpid()}.prepared.onnx")  # hidden: a killed export leaves no clutter
    try:
        quant_pre_process(str(fp32_model), str(prepared), skip_symbolic_shape=True)
        with atomic_path(int8_model) as temporary:
            quantize_static(str(prepared), str(temporary), Reader(windows, runner_input_name(prepared)),
                            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
                            activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)


def runner_input_name(model: str | Path) -> str:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return session.get_inputs()[0].name


def label_agreement(first: str | Path, second: str | Path, windows: Sequence[np.ndarray]) -> float:
    """Fraction of window voxels whose argmax label the two ONNX models agree on."""
    run_first, run_second = runner.onnx_predictor(first), runner.onnx_predictor(second)
    same = total = 0
    for window in windows:
        a, b = run_first(window).argmax(axis=1), run_second(window).argmax(axis=1)
        same += int((a == b).sum())
        total += a.size
    return same / max(total, 1)


def export_deploy(
    run_dir: str | Path,
    out_dir: str | Path,
    checkpoint: str = "best",
    int8: bool = True,
    calibration_images: Sequence[str | Path] | None = None,
    calibration_cases: int = 16,
    opset: int = 17,
    overlap: float | None = None,
    conv3d_as_2d: bool = True,
) -> DeployExport:
    """Write the deployment folder of a trained run (see the module docstring).

    Args:
        run_dir: the training run folder (read through :func:`medunet.run_folder.read_run_record`).
        out_dir: the deployment folder (created; existing deployment files are replaced).
        checkpoint: ``"best"``, ``"last"`` or a ``.pt`` file.
        int8: also write ``model.int8.onnx``.
        calibration_images: images to calibrate on (default: the run's training cases).
        calibration_cases: at most this many images are used for calibration (two windows each).
        opset: ONNX opset.
        overlap: the runner's default window overlap (default: ``medunet infer``'s, 0.5).
        conv3d_as_2d: export 3D convolutions as 2D ones over depth slices (see
            :func:`medunet.bundle.onnx.export_onnx`; same outputs, faster under onnxruntime on a CPU).

    Example::

        export_deploy("runs/task04/lunet", "deploy/task04")   # then: python deploy/task04/run.py --input ...
    """
    from medunet.bundle.onnx import export_onnx
    from medunet.engines.inference import DEFAULT_OVERLAP, load_run

    network, preset, record = load_run(run_dir, checkpoint)
    out_dir = Path(out_dir)
    window = {**record.sliding_window, "overlap": DEFAULT_OVERLAP if overlap is None else overlap}
    plan = deploy_plan(preset, window, record.network.name, int8)
    agreement, count = None, 0
    # Built beside out_dir and moved in only once complete, the plan last: a failed export (no calibration windows,
    # a quantization error, a kill) leaves the previous deployment whole, never a new model with an old plan.
    with atomic_folder(out_dir, merge=True, last=runner.PLAN_FILE) as building:
        exported = export_onnx(network, building / FP32_MODEL, (1, preset.in_channels, *plan["sliding_window"]["roi_size"]),
                               opset=opset, conv3d_as_2d=conv3d_as_2d)
        if int8:
            images = _calibration_images(record, calibration_images, calibration_cases)
            windows = calibration_windows(images, plan)
            if not windows:
                raise MedunetError("no calibration windows could be made. Fix: pass --calibration-images.")
            quantize_int8(building / FP32_MODEL, building / INT8_MODEL, windows)
            agreement, count = label_agreement(building / FP32_MODEL, building / INT8_MODEL, windows), len(windows)
        shutil.copyfile(Path(runner.__file__), building / RUNNER_FILE)
        (building / "requirements.txt").write_text(REQUIREMENTS, encoding="utf-8")
        (building / "README.md").write_text(_readme(plan, agreement, count), encoding="utf-8")
        (building / runner.PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    if not int8:  # once the new plan (without int8) is in: a stale int8 model would not match this export
        (out_dir / INT8_MODEL).unlink(missing_ok=True)
    files = {"fp32": out_dir / FP32_MODEL, **({"int8": out_dir / INT8_MODEL} if int8 else {}),
             "plan": out_dir / runner.PLAN_FILE, "runner": out_dir / RUNNER_FILE,
             "requirements": out_dir / "requirements.txt", "readme": out_dir / "README.md"}
    return DeployExport(out_dir, files, exported.max_abs_difference, count, agreement)


def _readme(plan: dict[str, Any], agreement: float | None, windows: int) -> str:
    int8 = (f"`model.int8.onnx` (static int8, QDQ, per-channel; calibrated on {windows} windows of training cases, "
            f"argmax agreement with fp32 on them {100 * agreement:.2f}%)" if agreement is not None else "no int8 model")
    return f"""# {plan['task']}: {plan['network']} (medunet deployment)

```bash
pip install -r requirements.txt          # onnxruntime, numpy, nibabel: no torch
python run.py --input CASE.nii.gz --output PRED.nii.gz [--int8] [--threads N]
```

Labels: {', '.join(f"{value} {name}" for value, name in plan['labels'].items())}.
Models: `model.onnx` (fp32, input 1x{plan['in_channels']}x{'x'.join(map(str, plan['sliding_window']['roi_size']))},
dynamic batch) and {int8}. Preprocessing and postprocessing are described in `plan.json`.
"""
