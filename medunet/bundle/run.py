"""What a bundle export needs from a trained run folder: its validated record and its weights.

The run is read through :func:`medunet.run_folder.read_run_record`, so a run folder someone sent cannot make the
export import or call anything outside medunet's network registry, nor put a ``$`` expression, ``@`` reference
or ``_target_`` into the bundle's configs. Only ``RUN_DIR/config.json`` and ``RUN_DIR/models/model.pt`` are
required; a hand-written ``config.json`` may name only ``task`` and ``network.name`` (the task's registered
preset fills the rest).

Optional files: ``metrics.json`` (best validation Dice) and ``evaluation/summary.json`` (test metrics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn

from medunet.data import TaskPreset
from medunet.engines.checkpoint import LOST_CLASS_DICE
from medunet.errors import MedunetError
from medunet.networks import get_preset as get_network_preset
from medunet.run_folder import (
    CONFIG_FILE,
    METRICS_JSON,
    MODEL_FILE,
    SUMMARY_FILE,
    RunRecord,
    check_literal,
    load_trained_network,
    read_json_file,
    read_metrics_record,
    read_run_record,
)

METRICS_FILE = METRICS_JSON


@dataclass(frozen=True)
class TrainedRun:
    """A trained run as the bundle export sees it.

    Args:
        run_dir: the run folder.
        network_name: registry name of the network.
        network_class: ``module.Class`` of the network (information for the model card).
        network_args: constructor keywords, channels and ``spatial_dims`` included (plain data).
        preset: preprocessing preset (labels, modality, spacing, patch size, CT window).
        roi_size: sliding-window ROI (the bundle's input patch).
        sw_batch_size: windows per forward.
        sw_overlap: sliding-window overlap.
        config: the record as plain data (``RunRecord.to_dict()``), for the model card.
        record: the validated run record.
    """

    run_dir: Path
    network_name: str
    network_class: str
    network_args: dict[str, Any]
    preset: TaskPreset
    roi_size: tuple[int, ...]
    sw_batch_size: int = 4
    sw_overlap: float = 0.25
    config: dict[str, Any] = field(default_factory=dict)
    record: RunRecord | None = None

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return dict(self.preset.labels)

    @property
    def scriptable(self) -> bool:
        """Whether TorchScript can compile the network (registry flag)."""
        return get_network_preset(self.network_name).scriptable

    def build_network(self) -> nn.Module:
        """A fresh, untrained instance of the run's network (registry networks only)."""
        from medunet.networks import create_network

        return create_network(self.network_name, **self.network_args)

    def load_network(self) -> nn.Module:
        """The run's network with the weights of ``models/model.pt`` (tensors only), in eval mode."""
        return load_trained_network(self.run_dir, self.record, "best")


def read_run(run_dir: str | Path) -> TrainedRun:
    """Read and validate ``RUN_DIR/config.json`` and check the weights file exists.

    Args:
        run_dir: a run folder written by ``medunet train``.

    Raises:
        MedunetError: naming the missing file or bad key and the fix.
    """
    run_dir = Path(run_dir)
    source = run_dir / CONFIG_FILE
    record = read_run_record(run_dir)
    network = record.network
    if network.name is None:
        network.build(where=str(source))  # raises the message that explains the registry-only rule
    preset = record.preset
    args = dict(network.args)
    args.setdefault("spatial_dims", len(preset.patch_size))
    for key, expected in (("in_channels", preset.in_channels), ("out_channels", preset.out_channels)):
        args.setdefault(key, expected)
        if isinstance(args[key], bool) or not isinstance(args[key], int) or args[key] != expected:
            raise MedunetError(
                f"{source}: network.args.{key} is {args[key]!r} but the labels/preset give {expected}. "
                "Fix: make 'labels', 'preset' and 'network.args' agree."
            )
    window = record.sliding_window
    roi = tuple(int(s) for s in window["roi_size"])
    if not (run_dir / MODEL_FILE).is_file():
        raise MedunetError(
            f"{run_dir / MODEL_FILE} does not exist. Fix: let training validate at least once (it writes the best "
            "model there), or copy models/model_last.pt to models/model.pt to export the last epoch."
        )
    factory = get_network_preset(network.name).factory
    record = replace(record, network=replace(network, args=args))
    return TrainedRun(
        run_dir=run_dir,
        network_name=network.name,
        network_class=network.class_path or f"{factory.__module__}.{factory.__qualname__}",
        network_args=args,
        preset=preset,
        roi_size=roi,
        sw_batch_size=window["sw_batch_size"],
        sw_overlap=window["overlap"],
        config=check_literal(record.to_dict(), str(source)),
        record=record,
    )


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _entry(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, dict) else None


def read_metrics(run: TrainedRun) -> dict[str, Any]:
    """The run's quality figures for ``eval_metrics`` and the model card (empty if it has none).

    ``evaluation/summary.json`` (nnU-Net style, from ``medunet evaluate``) wins over ``metrics.json``
    (validation Dice during training).
    """
    summary = read_json_file(run.run_dir / SUMMARY_FILE, "the evaluation summary")
    if isinstance(summary, dict):
        cases = summary.get("metric_per_case")
        metrics: dict[str, Any] = {"source": SUMMARY_FILE, "cases": len(cases) if isinstance(cases, list) else 0}
        mean_dice = _number(_entry(summary.get("foreground_mean"), "Dice"))
        if mean_dice is not None:
            metrics["mean_dice"] = round(mean_dice, 4)
        means = summary.get("mean")
        for value, per_label in (means.items() if isinstance(means, dict) else ()):
            dice = _number(_entry(per_label, "Dice"))
            if dice is not None and str(value).isdigit() and int(value) in run.labels:  # labels the run knows
                metrics[f"dice_{run.labels[int(value)]}"] = round(dice, 4)
        return metrics
    record = read_metrics_record(run.run_dir)
    if isinstance(record, dict):
        best = _number(record.get("best_metric"))
        if best is not None:
            epoch = record.get("best_epoch")
            metrics = {"source": f"{METRICS_FILE} (validation during training)", "val_mean_dice": round(best, 4),
                       "best_epoch": epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None}
            lost = record.get("lost_classes")  # checked by read_metrics_record: a list of names
            if lost:
                metrics["lost_classes"] = (f"{', '.join(lost)}: validation Dice below {LOST_CLASS_DICE}, the model "
                                           "predicts (almost) none of it (a failed training)")
            return metrics
    return {}
