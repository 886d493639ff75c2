"""Sliding-window inference: images, folders or DICOM series -> NIfTI label maps in the original image space.

Each input goes through the preset's inference chain (load, RAS, target spacing, intensity, CT body crop),
``SlidingWindowInferer`` (Gaussian-weighted windows of the training patch size), argmax, then ``Invertd``
undoes the chain so the label map has the input's shape and affine, and ``SaveImage`` writes
``OUT/<case>.nii.gz`` (uint8; ``<case>`` is the file name without suffix, or the DICOM folder name), which
``medunet evaluate --pred OUT --ref labelsTr`` matches by name. Label maps are written atomically, and a rerun
skips the cases already predicted unless ``overwrite=True`` (``medunet infer --overwrite``).

The network runs on ``device`` (CUDA when present); ``stitch_on_cpu=True`` keeps the full-size output and the
Gaussian weights on the CPU and sends only the windows to the device, for volumes that do not fit in GPU memory.

Engines (``medunet infer --engine``): ``torch`` runs the trained network; ``onnx`` and ``onnx-int8`` run the
models of ``RUN_DIR/deploy`` (exported on first use by :func:`medunet.deploy.export_deploy`) with onnxruntime,
through the same preprocessing, stitching and inversion, so every engine writes the same files. The sliding
window averages softmax probabilities (Gaussian-weighted) of one or several networks (fold ensembling,
:func:`predict_runs`), each optionally over the mirrored copies of every window (``tta="flip"``: test-time
mirroring over all spatial axes, :class:`ProbabilityAverage`, usable by a validation evaluator as well).
Under ``torchrun`` the cases are sharded across the ranks (case ``i`` goes to rank ``i % WORLD_SIZE``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
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
from medunet.data.transforms import class_to_label_transform
from medunet.errors import MedunetError
from medunet.run_folder import (
    PREDICTIONS_DIR,
    RunRecord,
    check_own_folders,
    load_trained_network,
    read_run_record,
)


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


#: Sliding-window overlap of inference (``medunet infer --overlap``, the deployment plan); validation uses the run's.
DEFAULT_OVERLAP = 0.5
#: Test-time augmentations: None (plain) or "flip" (all mirrorings over the spatial axes).
TTA_MODES = (None, "flip")
#: Inference engines: the trained PyTorch network, or its ONNX export (fp32 or static int8) under onnxruntime.
ENGINES = ("torch", "onnx", "onnx-int8")


def mirror_axes(spatial_dims: int) -> list[tuple[int, ...]]:
    """Every subset of the spatial axes of a ``(B, C, *spatial)`` tensor, the empty one (no flip) first."""
    axes = range(2, 2 + spatial_dims)
    return [combo for count in range(spatial_dims + 1) for combo in itertools.combinations(axes, count)]


class ProbabilityAverage(torch.nn.Module):
    """The mean softmax probabilities of several networks, each over mirrored copies of its input.

    Fold ensembling and test-time mirroring in one place: for each network and each flip, the input is flipped,
    the network's logits turned into probabilities and flipped back; the result is their mean. Use it wherever
    a network goes: ``SlidingWindowInferer()(image, ProbabilityAverage([net], tta="flip"))`` (also in a
    validation evaluator: argmax of probabilities and of logits agree for one network without flips).

    Args:
        networks: callables ``(B, C, *spatial) -> logits (B, K, *spatial)``: modules or onnxruntime wrappers.
        tta: None (no flips) or ``"flip"`` (all ``2**spatial_dims`` mirrorings, nnU-Net's test-time mirroring).
        spatial_dims: 2 or 3.
    """

    def __init__(self, networks: Sequence[Callable[[torch.Tensor], torch.Tensor]], tta: str | None = None,
                 spatial_dims: int = 3) -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise MedunetError(f"tta {tta!r} is not one of {TTA_MODES}. Fix: pass --tta flip, or leave it out.")
        if not networks:
            raise MedunetError("no networks to average. Fix: pass at least one run.")
        self.members = list(networks)
        self.networks = torch.nn.ModuleList([m for m in self.members if isinstance(m, torch.nn.Module)])
        self.flips = mirror_axes(spatial_dims) if tta == "flip" else [()]

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for network in self.members:
            for axes in self.flips:
                logits = network(image.flip(axes) if axes else image)
                probabilities = torch.softmax(logits.float(), dim=1)
                probabilities = probabilities.flip(axes) if axes else probabilities
                total = probabilities if total is None else total + probabilities
        assert total is not None
        return total / (len(self.members) * len(self.flips))


class OnnxNetwork:
    """An ONNX model under onnxruntime (CPU) as a ``tensor -> tensor`` network for MONAI inferers.

    Args:
        path: the ``.onnx`` file (fixed spatial size, dynamic batch, as :func:`medunet.bundle.onnx.export_onnx`).
        threads: windows run at the same time, one onnxruntime thread each (default: torch's thread count;
            :func:`medunet.deploy.runner.onnx_predictor`).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from medunet.deploy.runner import onnx_predictor

        self.path = Path(path)
        self._predict = onnx_predictor(self.path, threads or torch.get_num_threads())

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        output = self._predict(image.detach().float().cpu().numpy())
        return torch.from_numpy(output).to(image.device)


def predict(
    network: Callable[[torch.Tensor], torch.Tensor] | Sequence[Callable[[torch.Tensor], torch.Tensor]],
    preset: TaskPreset,
    inputs: Sequence[str | Path] | str | Path,
    output_dir: str | Path,
    roi_size: Sequence[int] | None = None,
    sw_batch_size: int = 4,
    overlap: float = DEFAULT_OVERLAP,
    device: str | torch.device | None = None,
    stitch_on_cpu: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    tta: str | None = None,
    shard: tuple[int, int] | None = None,
    memory_budget: int | None = None,
) -> PredictionFiles:
    """Predict label maps for ``inputs`` and write them to ``output_dir/<case>.nii.gz`` in the original space.

    Each file is written atomically (temporary file + ``os.replace``, see :mod:`medunet.atomic`), so a killed
    run leaves only complete label maps; a rerun skips the cases whose label map exists, like training resumes,
    and removes the temporary files the killed run left. Inputs that would overwrite an input or each other
    (same case name) are refused before any inference.

    Args:
        network: a trained network (logits out), or several (an ensemble: their probabilities are averaged);
            modules are moved to ``device`` and set to eval mode, other callables (:class:`OnnxNetwork`) run as
            they are.
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
        tta: None, or ``"flip"`` for test-time mirroring (see :class:`ProbabilityAverage`).
        shard: ``(rank, world_size)``: predict only the cases ``i`` with ``i % world_size == rank`` (the others
            are left to the other processes, and the returned list names only this process's label maps).
        memory_budget: peak resident bytes of the process not to exceed: each case runs the streaming pipeline
            of :mod:`medunet.deploy.memory` with the window batch and stitching dtype planned for it (at most
            ``sw_batch_size``); NIfTI inputs only.

    Returns:
        The label map files, one per input (of this shard), in input order (``.skipped`` lists the kept ones).
    """
    items, targets = plan_outputs(inputs, output_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    skipped = [] if overwrite else [target for target in targets if target.is_file()]
    rank, world_size = shard or (0, 1)
    mine = [index for index in range(len(items)) if index % world_size == rank]
    items, targets = [items[i] for i in mine], [targets[i] for i in mine]
    skipped = [target for target in skipped if target in targets]
    pending = [(item, target) for item, target in zip(items, targets) if target not in skipped]

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preprocess = infer_transforms(preset)
    to_labels = class_to_label_transform(preset)  # classes 0..N-1 back to the task's values (e.g. 0, 1, 2, 4)
    postprocess = Compose([
        AsDiscreted(keys="pred", argmax=True),
        *([to_labels] if to_labels is not None else []),
        # Undo spacing, orientation and crop: the label map lands on the input's own voxel grid.
        Invertd(keys="pred", transform=preprocess, orig_keys="image", nearest_interp=True, to_tensor=True),
    ])
    save = SaveImage(output_ext=".nii.gz", output_dtype=np.uint8, resample=False, print_log=False)
    inferer = SlidingWindowInferer(
        roi_size=tuple(roi_size or preset.patch_size), sw_batch_size=sw_batch_size, overlap=overlap,
        mode="gaussian", sw_device=device, device=torch.device("cpu") if stitch_on_cpu else device,
    )
    members = list(network) if isinstance(network, Sequence) else [network]
    for member in members:
        if isinstance(member, torch.nn.Module):
            member.to(device).eval()
    combined = ProbabilityAverage(members, tta=tta, spatial_dims=len(preset.patch_size))
    roi = tuple(roi_size or preset.patch_size)
    if memory_budget is not None:
        for item, target in tqdm(pending, desc="infer", unit="case", disable=not progress):
            _predict_within_budget(combined, preset, item["image"], target, roi, overlap, sw_batch_size, device,
                                   memory_budget)
        return PredictionFiles(targets, skipped)
    loader = DataLoader(Dataset([item for item, _ in pending], transform=preprocess), batch_size=1, num_workers=0)
    with torch.no_grad():
        batches = tqdm(loader, desc="infer", unit="case", disable=not progress)
        for batch, (_, target) in zip(batches, pending):
            image = batch["image"] if stitch_on_cpu else batch["image"].to(device)
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                batch["pred"] = inferer(image, combined)
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


def _predict_within_budget(network: ProbabilityAverage, preset: TaskPreset, image: str, target: Path,
                           roi: tuple[int, ...], overlap: float, max_batch: int, device: torch.device,
                           budget: int) -> None:
    """One case through the streaming pipeline of :mod:`medunet.deploy.runner`, planned to stay under ``budget``."""
    from medunet.deploy import memory, runner
    from medunet.deploy.export import deploy_plan

    plan = deploy_plan(preset, {"roi_size": roi, "overlap": overlap, "sw_batch_size": max_batch}, None, False)

    def probabilities(windows: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return network(torch.from_numpy(windows).to(device)).float().cpu().numpy()

    source, grid, _ = memory.header_shapes(image, preset.target_spacing)
    working = memory.window_working_bytes(probabilities, (preset.in_channels, *roi))
    chosen = memory.plan_memory(budget, memory.resident_bytes(), source, grid, preset.in_channels,
                                preset.out_channels, roi, max_batch, working, case=image)
    volume, state = runner.preprocess(*runner.read_image(image), plan, where=image)  # the raw image is freed early
    affine = state["affine"]
    labels = runner.sliding_window_labels(volume, probabilities, roi, preset.out_channels, overlap=overlap,
                                          batch_size=chosen.sw_batch_size, accumulate_dtype=chosen.accumulate_dtype,
                                          outputs="probabilities")
    del volume
    runner.write_labels(runner.postprocess(labels, state), affine, target)


def _same_task(records: Sequence[tuple[Path, RunRecord]]) -> None:
    """Refuse an ensemble of runs that do not share the preset (labels, channels, spacing, intensity, patch)."""
    first_dir, first = records[0]
    for run_dir, record in records[1:]:
        mine, theirs = first.preset.to_dict(), record.preset.to_dict()
        different = [key for key in mine if mine[key] != theirs.get(key)]
        if different:
            raise MedunetError(
                f"runs {first_dir} and {run_dir} differ in {', '.join(different)} ({mine[different[0]]!r} against "
                f"{theirs.get(different[0])!r}): their probabilities cannot be averaged. Fix: ensemble only runs "
                "trained on the same task with the same preset (e.g. the folds of one network)."
            )


def engine_network(run_dir: str | Path, engine: str = "torch", checkpoint: str = "best",
                   threads: int | None = None) -> tuple[Callable[[torch.Tensor], torch.Tensor], RunRecord]:
    """The network of a run under ``engine`` and the run's record.

    ``onnx``/``onnx-int8`` use ``RUN_DIR/deploy/model.onnx`` / ``model.int8.onnx``, exported (and, for int8,
    calibrated on the run's training cases) by :func:`medunet.deploy.export_deploy` when missing or older
    than the weights.

    Args:
        run_dir: the training run folder.
        engine: one of :data:`ENGINES`.
        checkpoint: ``"best"``, ``"last"`` or a ``.pt`` file.
        threads: onnxruntime threads (ONNX engines).
    """
    from medunet.run_folder import weights_file

    if engine not in ENGINES:
        raise MedunetError(f"engine {engine!r} is not one of {', '.join(ENGINES)}. Fix: pick one.")
    record = read_run_record(run_dir)
    if engine == "torch":
        return load_trained_network(run_dir, record, checkpoint), record
    from medunet.deploy.export import FP32_MODEL, INT8_MODEL, export_deploy

    folder = Path(run_dir) / DEPLOY_DIR
    model = folder / (INT8_MODEL if engine == "onnx-int8" else FP32_MODEL)
    weights = weights_file(run_dir, checkpoint)
    if not model.is_file() or model.stat().st_mtime < weights.stat().st_mtime or checkpoint != "best":
        if checkpoint != "best":
            folder = Path(run_dir) / f"{DEPLOY_DIR}_{Path(checkpoint).stem}"
            model = folder / model.name
        export_deploy(run_dir, folder, checkpoint=checkpoint, int8=engine == "onnx-int8")
    return OnnxNetwork(model, threads), record


#: Where the ONNX engines keep the run's exported models.
DEPLOY_DIR = "deploy"


def predict_runs(
    run_dirs: Sequence[str | Path] | str | Path,
    inputs: Sequence[str | Path] | str | Path,
    output_dir: str | Path | None = None,
    checkpoint: str = "best",
    engine: str = "torch",
    threads: int | None = None,
    **kwargs: Any,
) -> PredictionFiles:
    """:func:`predict` with the networks, weights and preset of one or several training runs.

    Several runs are a fold ensemble: their softmax probabilities are averaged, window by window. They must
    share the preset (task, labels, channels, spacing, intensity, patch), else :class:`MedunetError`.

    Args:
        run_dirs: one training run folder, or several.
        inputs: files, folders or DICOM series folders.
        output_dir: default ``RUN_DIR/predictions`` of the first run.
        checkpoint: ``"best"``, ``"last"`` or a ``.pt`` file.
        engine: ``"torch"``, ``"onnx"`` or ``"onnx-int8"`` (see :func:`engine_network`).
        threads: onnxruntime threads (ONNX engines).
        kwargs: passed to :func:`predict` (``device``, ``tta``, ``stitch_on_cpu``, ``overlap``, ``sw_batch_size``...).
    """
    run_dirs = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(r) for r in run_dirs]
    if not run_dirs:
        raise MedunetError("no run folder given. Fix: pass --run-dir RUN_DIR [RUN_DIR ...].")
    if output_dir is None:  # the run folder's own predictions/: not through a link that came with the folder
        check_own_folders(run_dirs[0], (PREDICTIONS_DIR,))
    networks, records = [], []
    for run_dir in run_dirs:
        network, record = engine_network(run_dir, engine, checkpoint, threads)
        networks.append(network)
        records.append((run_dir, record))
    _same_task(records)
    first = records[0][1]
    kwargs.setdefault("sw_batch_size", first.sliding_window["sw_batch_size"])
    kwargs.setdefault("roi_size", first.sliding_window["roi_size"])  # the window the run validated (and exported) at
    output_dir = Path(output_dir) if output_dir is not None else run_dirs[0] / PREDICTIONS_DIR
    return predict(networks, first.preset, inputs, output_dir, **kwargs)


def predict_run(
    run_dir: str | Path,
    inputs: Sequence[str | Path] | str | Path,
    output_dir: str | Path | None = None,
    checkpoint: str = "best",
    **kwargs: Any,
) -> PredictionFiles:
    """:func:`predict` with the network, weights and preset of a training run (:func:`predict_runs` of one).

    Args:
        run_dir: the training run folder.
        inputs: files, folders or DICOM series folders.
        output_dir: default ``RUN_DIR/predictions``.
        checkpoint: ``"best"``, ``"last"`` or a ``.pt`` file.
        kwargs: passed to :func:`predict_runs` (``engine``, ``tta``, ``device``, ``overlap``, ``sw_batch_size``...).
    """
    return predict_runs([run_dir], inputs, output_dir, checkpoint, **kwargs)
