"""Read what a bundle export needs from a trained run folder (``RUN_DIR``, layout in :mod:`medunet.engines`).

Only ``RUN_DIR/config.json`` and ``RUN_DIR/models/model.pt`` are required. From ``config.json`` export reads:

==========================  ========  ================================================================
key                         needed    use
==========================  ========  ================================================================
``network.name``            one of    registry name: ``create_network(name, **args)``
``network.class``           these     importable class path, when ``name`` is null
``network.args``            no        constructor keywords (``spatial_dims``/channels filled if absent)
``task``                    yes*      preset name; *not needed when ``preset`` below is complete
``preset``                  no        ``modality``, ``in_channels``, ``target_spacing``, ``patch_size``,
                                      ``ct_window`` (else the registered preset of ``task``)
``labels``                  no        ``{"0": "background", ...}`` (else the preset's labels)
``sliding_window``          no        ``roi_size``, ``sw_batch_size``, ``overlap`` (else the patch size)
``max_epochs``, ``optimizer.defaults.lr``, ``fold``, ``num_train_cases``, ``num_val_cases``,
``dataset_dir``             no        written into train.json and the model card
==========================  ========  ================================================================

Optional files: ``metrics.json`` (best validation Dice) and ``evaluation/summary.json`` (test metrics).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from medunet.data import TaskPreset, get_preset
from medunet.engines.checkpoint import METRICS_JSON as METRICS_FILE
from medunet.engines.checkpoint import MODEL_FILE
from medunet.engines.training import CONFIG_FILE
from medunet.errors import MedunetError
from medunet.networks import create_network
from medunet.networks import get_preset as get_network_preset

SUMMARY_FILE = "evaluation/summary.json"


@dataclass(frozen=True)
class TrainedRun:
    """A trained run as the bundle export sees it.

    Args:
        run_dir: the run folder.
        network_name: registry name, or None for a network given by class path.
        network_class: importable ``module.Class`` of the network.
        network_args: constructor keywords, channels and ``spatial_dims`` included.
        preset: preprocessing preset (labels, modality, spacing, patch size, CT window).
        roi_size: sliding-window ROI (the bundle's input patch).
        sw_batch_size: windows per forward.
        sw_overlap: sliding-window overlap.
        config: the whole ``config.json``, for the model card.
    """

    run_dir: Path
    network_name: str | None
    network_class: str
    network_args: dict[str, Any]
    preset: TaskPreset
    roi_size: tuple[int, ...]
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return dict(self.preset.labels)

    @property
    def scriptable(self) -> bool:
        """Whether TorchScript can compile the network (registry flag; classes are assumed scriptable)."""
        if self.network_name is None:
            return True
        return get_network_preset(self.network_name).scriptable

    def build_network(self) -> nn.Module:
        """A fresh, untrained instance of the run's network."""
        if self.network_name is not None:
            return create_network(self.network_name, **self.network_args)
        return import_class(self.network_class, self.run_dir / CONFIG_FILE)(**self.network_args)


def import_class(path: str, source: Path) -> type[nn.Module]:
    """Import ``package.module.Class``; failures name ``source`` and the fix."""
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise MedunetError(
            f"{source}: network class {path!r} cannot be imported. Fix: install the package that defines it, "
            "or set network.name to a registry name ('medunet networks')."
        ) from None


def _need(mapping: Mapping[str, Any], key: str, source: Path, what: str) -> Any:
    if key not in mapping or mapping[key] is None:
        raise MedunetError(f"{source} has no '{key}' ({what}). Fix: add it, or re-run 'medunet train' to rewrite it.")
    return mapping[key]


def _preset(config: Mapping[str, Any], source: Path) -> TaskPreset:
    """The run's preset: ``config["preset"]`` where complete, else the registered preset of ``config["task"]``."""
    written = config.get("preset") or {}
    registered: TaskPreset | None = None
    if config.get("task"):
        try:
            registered = get_preset(str(config["task"]))
        except MedunetError:
            registered = None
    keys = ("modality", "in_channels", "target_spacing", "patch_size", "ct_window")
    if registered is None and not all(key in written for key in keys):
        raise MedunetError(
            f"{source} names no known task ('task': {config.get('task')!r}) and its 'preset' lacks "
            f"{[key for key in keys if key not in written]}. Fix: set 'task' to a preset name "
            "('Task04_Hippocampus', 'PhantomCT', ...) or write the missing preset keys."
        )
    labels = config.get("labels")
    if labels:
        labels = {int(value): str(name) for value, name in labels.items()}
    elif registered is not None:
        labels = dict(registered.labels)
    else:
        raise MedunetError(f"{source} has no 'labels'. Fix: add e.g. {{\"0\": \"background\", \"1\": \"spleen\"}}.")

    def pick(key: str) -> Any:
        return written[key] if key in written else getattr(registered, key)

    spacing, window = pick("target_spacing"), pick("ct_window")
    return TaskPreset(
        name=str(config.get("task") or (registered.name if registered else "custom")),
        modality=str(pick("modality")),
        labels=labels,
        in_channels=int(pick("in_channels")),
        target_spacing=tuple(float(s) for s in spacing) if spacing is not None else None,
        patch_size=tuple(int(s) for s in pick("patch_size")),
        ct_window=tuple(float(w) for w in window) if window is not None else None,
    )


def read_run(run_dir: str | Path) -> TrainedRun:
    """Read ``RUN_DIR/config.json`` (keys in the module docstring) and check the weights file exists.

    Args:
        run_dir: a run folder written by ``medunet train``.

    Raises:
        MedunetError: naming the missing file or key and the fix.
    """
    run_dir = Path(run_dir)
    source = run_dir / CONFIG_FILE
    if not source.is_file():
        raise MedunetError(
            f"{source} does not exist: {run_dir} is not a medunet run folder. Fix: pass the --run-dir of "
            "'medunet train' (it holds config.json and models/model.pt)."
        )
    try:
        config = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise MedunetError(f"{source} is not valid JSON ({error}). Fix: repair it or re-run training.") from None
    network = _need(config, "network", source, "the trained network: name or class, and args")
    name = network.get("name")
    class_path = network.get("class")
    if name is None and not class_path:
        raise MedunetError(f"{source}: 'network' has neither 'name' nor 'class'. Fix: add the registry name.")
    if name is not None:
        get_network_preset(name)  # fails with the list of known names
        factory = get_network_preset(name).factory
        class_path = class_path or f"{factory.__module__}.{factory.__qualname__}"
    preset = _preset(config, source)
    args = dict(network.get("args") or {})
    args.setdefault("spatial_dims", len(preset.patch_size))
    for key, expected in (("in_channels", preset.in_channels), ("out_channels", preset.out_channels)):
        args.setdefault(key, expected)
        if int(args[key]) != expected:
            raise MedunetError(
                f"{source}: network.args.{key} is {args[key]} but the labels/preset give {expected}. "
                "Fix: make 'labels', 'preset' and 'network.args' agree."
            )
    window = config.get("sliding_window") or {}
    roi = tuple(int(s) for s in (window.get("roi_size") or preset.patch_size))
    if not (run_dir / MODEL_FILE).is_file():
        raise MedunetError(
            f"{run_dir / MODEL_FILE} does not exist. Fix: let training validate at least once (it writes the best "
            "model there), or copy models/model_last.pt to models/model.pt to export the last epoch."
        )
    return TrainedRun(
        run_dir=run_dir,
        network_name=name,
        network_class=str(class_path),
        network_args=args,
        preset=preset,
        roi_size=roi,
        sw_batch_size=int(window.get("sw_batch_size", 4)),
        sw_overlap=float(window.get("overlap", 0.25)),
        config=config,
    )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not math.isnan(value) else None


def read_metrics(run: TrainedRun) -> dict[str, Any]:
    """The run's quality figures for ``eval_metrics`` and the model card (empty if it has none).

    ``evaluation/summary.json`` (nnU-Net style, from ``medunet evaluate``) wins over ``metrics.json``
    (validation Dice during training).
    """
    summary_file = run.run_dir / SUMMARY_FILE
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        metrics: dict[str, Any] = {"source": SUMMARY_FILE, "cases": len(summary.get("metric_per_case", []))}
        mean_dice = _number((summary.get("foreground_mean") or {}).get("Dice"))
        if mean_dice is not None:
            metrics["mean_dice"] = round(mean_dice, 4)
        for value, per_label in (summary.get("mean") or {}).items():
            dice = _number((per_label or {}).get("Dice"))
            name = run.labels.get(int(value), str(value)) if str(value).isdigit() else str(value)
            if dice is not None:
                metrics[f"dice_{name}"] = round(dice, 4)
        return metrics
    metrics_file = run.run_dir / METRICS_FILE
    if metrics_file.is_file():
        record = json.loads(metrics_file.read_text(encoding="utf-8"))
        best = _number(record.get("best_metric"))
        if best is not None:
            return {"source": f"{METRICS_FILE} (validation during training)", "val_mean_dice": round(best, 4),
                    "best_epoch": record.get("best_epoch")}
    return {}
