"""Sliding-window inference: images, folders or DICOM series -> NIfTI label maps in the original image space.

Each input goes through the preset's inference chain (load, RAS, target spacing, intensity, CT body crop),
``SlidingWindowInferer`` (Gaussian-weighted windows of the training patch size), argmax, then ``Invertd``
undoes the chain so the label map has the input's shape and affine, and ``SaveImaged`` writes
``OUT/<case>.nii.gz`` (uint8; ``<case>`` is the file name without suffix, or the DICOM folder name), which
``medunet evaluate --pred OUT --ref labelsTr`` matches by name.

The network runs on ``device`` (CUDA when present); ``stitch_on_cpu=True`` keeps the full-size output and the
Gaussian weights on the CPU and sends only the windows to the device, for volumes that do not fit in GPU memory.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, decollate_batch
from monai.inferers import SlidingWindowInferer
from monai.transforms import AsDiscreted, Compose, Invertd, SaveImaged
from tqdm.auto import tqdm

from medunet.data import TaskPreset, infer_transforms
from medunet.data.readers import IMAGE_SUFFIXES, has_suffix, simpleitk
from medunet.engines.checkpoint import LAST_MODEL_FILE, MODEL_FILE, load_model_weights
from medunet.errors import MedunetError

PREDICTIONS_DIR = "predictions"


def _is_dicom_series(folder: Path) -> bool:
    return bool(simpleitk().ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def collect_inputs(paths: Sequence[str | Path] | str | Path) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for image files, folders of images and DICOM series folders.

    Args:
        paths: files (NIfTI, NRRD, MHA, ...), folders holding such files (not recursive), or folders holding one
            DICOM series each.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    items: list[dict[str, str]] = []
    for path in map(Path, paths):
        if path.is_file():
            items.append({"image": str(path)})
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and has_suffix(p, IMAGE_SUFFIXES)
                           and not has_suffix(p, (".dcm",)))
            if files:
                items += [{"image": str(p)} for p in files]
            elif _is_dicom_series(path):
                items.append({"image": str(path)})
            else:
                raise MedunetError(f"{path} holds no images (NIfTI/NRRD/MHA) and no DICOM series. Fix: point "
                                   "--input at image files, a folder of them, or a DICOM series folder.")
        else:
            raise MedunetError(f"input {path} does not exist. Fix: check the path.")
    if not items:
        raise MedunetError("no input images given. Fix: pass image files or folders with --input.")
    return items


def predict(
    network: torch.nn.Module,
    preset: TaskPreset,
    inputs: Sequence[str | Path] | str | Path,
    output_dir: str | Path,
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 4,
    overlap: float = 0.5,
    device: str | torch.device | None = None,
    stitch_on_cpu: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Predict label maps for ``inputs`` and write them to ``output_dir/<case>.nii.gz`` in the original space.

    Args:
        network: a trained network (logits out); moved to ``device`` and set to eval mode.
        preset: the preprocessing the network was trained with.
        inputs: files, folders or DICOM series folders (see :func:`collect_inputs`).
        output_dir: where the ``.nii.gz`` label maps go (created).
        roi_size: sliding-window size; default the preset's patch size.
        sw_batch_size: windows per forward pass.
        overlap: window overlap (0..1).
        device: where the network runs; default CUDA when present, else CPU.
        stitch_on_cpu: accumulate the full-size output on the CPU (only windows go to ``device``).
        progress: show a progress bar.

    Returns:
        The written files, one per input, in input order.
    """
    items = collect_inputs(inputs)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    preprocess = infer_transforms(preset)
    postprocess = Compose([
        AsDiscreted(keys="pred", argmax=True),
        # Undo spacing, orientation and crop: the label map lands on the input's own voxel grid.
        Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=True, to_tensor=True),
        SaveImaged(keys="pred", output_dir=output_dir, output_postfix="", output_ext=".nii.gz", resample=False,
                   separate_folder=False, output_dtype=np.uint8, print_log=False, savepath_in_metadict=True),
    ])
    inferer = SlidingWindowInferer(
        roi_size=tuple(roi_size or preset.patch_size), sw_batch_size=sw_batch_size, overlap=overlap,
        mode="gaussian", sw_device=device, device=torch.device("cpu") if stitch_on_cpu else device,
    )
    network = network.to(device).eval()
    loader = DataLoader(Dataset(items, transform=preprocess), batch_size=1, num_workers=0)
    written: list[Path] = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="infer", unit="case", disable=not progress):
            image = batch["image"] if stitch_on_cpu else batch["image"].to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                batch["pred"] = inferer(image, network)
            batch["pred"] = batch["pred"].float().cpu()
            batch["image"] = batch["image"].cpu()
            for item in decollate_batch(batch):
                result = postprocess(item)
                written.append(Path(result["pred"].meta["saved_to"]))
    return written


def load_run(run_dir: str | Path, checkpoint: str = "best") -> tuple[torch.nn.Module, TaskPreset, dict[str, Any]]:
    """The trained network, its preset and ``config.json`` of a training run folder.

    Args:
        run_dir: a folder written by :class:`~medunet.engines.SegmentationTraining`.
        checkpoint: ``"best"`` (``models/model.pt``), ``"last"`` (``models/model_last.pt``) or a ``.pt`` file.
    """
    from medunet.networks import create_network

    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise MedunetError(f"{run_dir} has no config.json, so it is not a training run folder. "
                           "Fix: pass the --run-dir used with 'medunet train'.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    weights = {"best": run_dir / MODEL_FILE, "last": run_dir / LAST_MODEL_FILE}.get(checkpoint, Path(checkpoint))
    if not weights.is_file():
        raise MedunetError(f"checkpoint {weights} does not exist. Fix: train first, or pass --checkpoint last.")
    network_config = config["network"]
    if not network_config.get("name"):
        raise MedunetError(f"{config_file}: the network ({network_config.get('class')}) is not a registry name. "
                           "Fix: build it yourself and call medunet.engines.inference.predict(network, preset, ...).")
    network = create_network(network_config["name"], **network_config.get("args", {}))
    network.load_state_dict(load_model_weights(weights))
    settings = config["preset"]
    preset = TaskPreset(
        name=config["task"], modality=settings["modality"],
        labels={int(value): name for value, name in config["labels"].items()},
        in_channels=settings["in_channels"],
        target_spacing=tuple(settings["target_spacing"]) if settings["target_spacing"] else None,
        patch_size=tuple(settings["patch_size"]),
        ct_window=tuple(settings["ct_window"]) if settings["ct_window"] else None,
    )
    return network, preset, config


def predict_run(
    run_dir: str | Path,
    inputs: Sequence[str | Path] | str | Path,
    output_dir: str | Path | None = None,
    checkpoint: str = "best",
    **kwargs: Any,
) -> list[Path]:
    """:func:`predict` with the network, weights and preset of a training run.

    Args:
        run_dir: the training run folder.
        inputs: files, folders or DICOM series folders.
        output_dir: default ``RUN_DIR/predictions``.
        checkpoint: ``"best"``, ``"last"`` or a ``.pt`` file.
        kwargs: passed to :func:`predict` (``device``, ``stitch_on_cpu``, ``overlap``, ``sw_batch_size``...).
    """
    network, preset, config = load_run(run_dir, checkpoint)
    kwargs.setdefault("sw_batch_size", config.get("sliding_window", {}).get("sw_batch_size", 4))
    output_dir = Path(output_dir) if output_dir is not None else Path(run_dir) / PREDICTIONS_DIR
    return predict(network, preset, inputs, output_dir, **kwargs)
