"""Sliding-window inference: images, folders or DICOM series -> NIfTI label maps in the original image space.

Each input goes through the preset's inference chain (load, RAS, target spacing, intensity, CT body crop),
``SlidingWindowInferer`` (Gaussian-weighted windows of the training patch size), argmax, then ``Invertd``
undoes the chain so the label map has the input's shape and affine, and ``SaveImage`` writes
``OUT/<case>.nii.gz`` (uint8; ``<case>`` is the file name without suffix, or the DICOM folder name), which
``medunet evaluate --pred OUT --ref labelsTr`` matches by name. Label maps are written atomically, and a rerun
skips the cases already predicted unless ``overwrite=True`` (``medunet infer --overwrite``).

The network runs on ``device`` (CUDA when present); ``stitch_on_cpu=True`` keeps the full-size output and the
Gaussian weights on the CPU and sends only the windows to the device, for volumes that do not fit in GPU memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, decollate_batch
from monai.inferers import SlidingWindowInferer
from monai.transforms import AsDiscreted, Compose, Invertd, SaveImage
from tqdm.auto import tqdm

from medunet.atomic import atomic_path, is_hidden, remove_stale_temporaries
from medunet.data import TaskPreset, infer_transforms
from medunet.data.readers import IMAGE_SUFFIXES, has_suffix, simpleitk, strip_image_suffix
from medunet.errors import MedunetError
from medunet.run_folder import PREDICTIONS_DIR, RunRecord, load_trained_network, read_run_record


def _is_dicom_series(folder: Path) -> bool:
    return bool(simpleitk().ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def collect_inputs(paths: Sequence[str | Path] | str | Path) -> list[dict[str, str]]:
    """``[{"image": path}, ...]`` for image files, folders of images and DICOM series folders.

    Hidden files in folders (``.name``, e.g. temporary files of a killed run) are not inputs.

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
                           and not has_suffix(p, (".dcm",)) and not is_hidden(p))
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


def prediction_file(image: str | Path, output_dir: str | Path) -> Path:
    """Where :func:`predict` writes the label map of ``image``: ``output_dir/<case>.nii.gz``.

    ``<case>`` is the file name without its image suffix, or the name of a DICOM series folder.
    """
    return Path(output_dir) / f"{strip_image_suffix(Path(image).name)}.nii.gz"


class PredictionFiles(list[Path]):
    """The label maps of :func:`predict`, one per input in input order; ``skipped`` are those that already
    existed and were kept, ``written`` those predicted now."""

    def __init__(self, files: Sequence[Path], skipped: Sequence[Path]) -> None:
        super().__init__(files)
        self.skipped = list(skipped)

    @property
    def written(self) -> list[Path]:
        """The files predicted and written by this call."""
        return [path for path in self if path not in self.skipped]


def plan_outputs(
    inputs: Sequence[str | Path] | str | Path, output_dir: str | Path
) -> tuple[list[dict[str, str]], list[Path]]:
    """The inputs (see :func:`collect_inputs`) and their label map files, checked before any inference.

    Raises :class:`MedunetError` when a label map would land on an input, in a folder that holds inputs, or on
    another input's label map (two inputs with the same case name, e.g. ``a/case1.nii.gz`` and
    ``b/case1.nii.gz``, or ``case1.nii.gz`` and ``case1.nrrd``).

    Args:
        inputs: files, folders or DICOM series folders.
        output_dir: the folder of the label maps.
    """
    items = collect_inputs(inputs)
    output_dir = Path(output_dir)
    targets = [prediction_file(item["image"], output_dir) for item in items]
    output_folder = output_dir.resolve()
    input_of: dict[Path, tuple[str, Path]] = {}
    for item, target in zip(items, targets):
        image = item["image"]
        source = Path(image).resolve()
        if output_folder == (source if source.is_dir() else source.parent):
            raise MedunetError(f"--output {output_dir} is the folder of the input {image}: label maps would be "
                               "written among (and over) the images. Fix: pass an --output folder that holds "
                               "no inputs.")
        if target.resolve() == source:  # e.g. OUT/<case>.nii.gz is a link to the input
            raise MedunetError(f"the prediction of {image} would overwrite the input itself ({target}). "
                               "Fix: pass an --output folder that holds no inputs.")
        if target.resolve() in input_of:
            first, first_source = input_of[target.resolve()]
            both = "is given twice" if first_source == source else f"and {image} have the same case name"
            raise MedunetError(f"input {first} {both}, so both would be written to {target} and one would be "
                               "lost. Fix: rename one of them, or predict them in separate runs with different "
                               "--output folders.")
        input_of[target.resolve()] = image, source
    return items, targets


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
    overwrite: bool = False,
) -> PredictionFiles:
    """Predict label maps for ``inputs`` and write them to ``output_dir/<case>.nii.gz`` in the original space.

    Each file is written atomically (temporary file + ``os.replace``, see :mod:`medunet.atomic`), so a killed
    run leaves only complete label maps; a rerun skips the cases whose label map exists, like training resumes,
    and removes the temporary files the killed run left. Inputs that would overwrite an input or each other
    (same case name) are refused before any inference.

    Args:
        network: a trained network (logits out); moved to ``device`` and set to eval mode.
        preset: the preprocessing the network was trained with.
        inputs: files, folders or DICOM series folders (see :func:`collect_inputs`).
        output_dir: where the ``.nii.gz`` label maps go (created); not a folder that holds inputs.
        roi_size: sliding-window size; default the preset's patch size.
        sw_batch_size: windows per forward pass.
        overlap: window overlap (0..1).
        device: where the network runs; default CUDA when present, else CPU.
        stitch_on_cpu: accumulate the full-size output on the CPU (only windows go to ``device``).
        progress: show a progress bar.
        overwrite: predict again the cases whose label map already exists (default: keep and skip them).

    Returns:
        The label map files, one per input, in input order (a list; ``.skipped`` lists the kept ones).
    """
    items, targets = plan_outputs(inputs, output_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    skipped = [] if overwrite else [target for target in targets if target.is_file()]
    pending = [(item, target) for item, target in zip(items, targets) if target not in skipped]

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preprocess = infer_transforms(preset)
    postprocess = Compose([
        AsDiscreted(keys="pred", argmax=True),
        # Undo spacing, orientation and crop: the label map lands on the input's own voxel grid.
        Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=True, to_tensor=True),
    ])
    save = SaveImage(output_ext=".nii.gz", output_dtype=np.uint8, resample=False, print_log=False)
    inferer = SlidingWindowInferer(
        roi_size=tuple(roi_size or preset.patch_size), sw_batch_size=sw_batch_size, overlap=overlap,
        mode="gaussian", sw_device=device, device=torch.device("cpu") if stitch_on_cpu else device,
    )
    network = network.to(device).eval()
    loader = DataLoader(Dataset([item for item, _ in pending], transform=preprocess), batch_size=1, num_workers=0)
    with torch.no_grad():
        batches = tqdm(loader, desc="infer", unit="case", disable=not progress)
        for batch, (_, target) in zip(batches, pending):
            image = batch["image"] if stitch_on_cpu else batch["image"].to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                batch["pred"] = inferer(image, network)
            batch["pred"] = batch["pred"].float().cpu()
            batch["image"] = batch["image"].cpu()
            (item,) = decollate_batch(batch)
            result = postprocess(item)
            with atomic_path(target) as temporary:
                # SaveImage appends output_ext; the temporary name keeps it, so nibabel gzips the file.
                save(result["pred"], filename=str(temporary)[: -len(".nii.gz")])
    return PredictionFiles(targets, skipped)


def load_run(run_dir: str | Path, checkpoint: str = "best") -> tuple[torch.nn.Module, TaskPreset, RunRecord]:
    """The trained network, its preset and its record (``config.json``) of a training run folder.

    Args:
        run_dir: a folder written by :class:`~medunet.engines.SegmentationTraining`.
        checkpoint: ``"best"`` (``models/model.pt``), ``"last"`` (``models/model_last.pt``) or a ``.pt`` file.
    """
    record = read_run_record(run_dir)
    return load_trained_network(run_dir, record, checkpoint), record.preset, record


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
    network, preset, record = load_run(run_dir, checkpoint)
    kwargs.setdefault("sw_batch_size", record.sliding_window["sw_batch_size"])
    output_dir = Path(output_dir) if output_dir is not None else Path(run_dir) / PREDICTIONS_DIR
    return predict(network, preset, inputs, output_dir, **kwargs)
