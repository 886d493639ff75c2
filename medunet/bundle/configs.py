"""The config files of an exported bundle: ``templates/*.json`` filled with a run's network and preprocessing.

The templates are ordinary model-zoo-style configs (MONAI components only) whose run-specific slots hold
``null``; :func:`bundle_configs` fills every slot and refuses to leave one empty. The preprocessing is written
out as explicit MONAI transforms (:func:`preprocessing_config`) that mirror
:func:`medunet.data.transforms.preprocess_transforms` step for step, so a bundle user reads and edits plain
MONAI JSON; ``tests/test_bundle_export.py`` checks that both chains give the same tensors.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medunet.bundle.run import TrainedRun
from medunet.data import TaskPreset

TEMPLATES_DIR = Path(__file__).parent / "templates"
CONFIG_NAMES = ("inference", "train", "evaluate")


def preprocessing_config(preset: TaskPreset, keys: Sequence[str]) -> list[dict[str, Any]]:
    """The deterministic, invertible preprocessing as MONAI config items; ``keys[0]`` is the image.

    Mirrors :func:`medunet.data.transforms.preprocess_transforms`: load, channel first, RAS, target spacing,
    then the CT window scaled to [0, 1] and a crop to the body, or the MRI non-zero z-score per channel.

    Args:
        preset: the task preset.
        keys: data keys, e.g. ``["image", "label"]`` or ``["image"]``.
    """
    keys = list(keys)
    image = keys[0]
    chain: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS", "labels": None},
    ]
    if preset.target_spacing is not None:
        modes = ["bilinear"] + ["nearest"] * (len(keys) - 1)
        chain.append({"_target_": "Spacingd", "keys": keys, "pixdim": list(preset.target_spacing), "mode": modes})
    if preset.is_ct:
        low, high = preset.ct_window
        chain += [
            {"_target_": "ScaleIntensityRanged", "keys": image, "a_min": low, "a_max": high, "b_min": 0.0,
             "b_max": 1.0, "clip": True},
            {"_target_": "CropForegroundd", "keys": keys, "source_key": image, "allow_smaller": True},
        ]
    else:
        chain.append({"_target_": "NormalizeIntensityd", "keys": image, "nonzero": True, "channel_wise": True})
    if keys[1:] and not preset.labels_contiguous:
        chain.append(label_values_config(preset, keys[1:], to_classes=True))
    chain.append({"_target_": "EnsureTyped", "keys": keys, "track_meta": True})
    return chain


def label_values_config(preset: TaskPreset, key: str, to_classes: bool = False) -> dict[str, Any]:
    """``MapLabelValued`` between classes 0..N-1 and the task's label values (e.g. 0, 1, 2, 4)."""
    classes, values = list(range(len(preset.labels))), preset.label_values
    source, target = (values, classes) if to_classes else (classes, values)
    return {"_target_": "MapLabelValued", "keys": key, "orig_labels": source, "target_labels": target}


def network_def_config(run: TrainedRun) -> dict[str, Any]:
    """``network_def``: ``medunet.networks.create_network`` with the registry name and the run's arguments."""
    # network_args are plain data (checked when the run was read); "name" cannot be overridden by them.
    return {"_target_": "medunet.networks.create_network", **run.network_args, "name": run.network_name}


def load_template(name: str) -> dict[str, Any]:
    """A template config (``inference``, ``train`` or ``evaluate``) as a dict."""
    return json.loads((TEMPLATES_DIR / f"{name}.json").read_text(encoding="utf-8"))


def _fill(config: dict[str, Any], path: str, value: Any) -> None:
    """Set ``config[a][b]...`` for ``path = "a#b"``; the slot must exist in the template and hold null."""
    *parents, last = path.split("#")
    node = config
    for part in parents:
        node = node[part]
    if last not in node or node[last] is not None:
        raise KeyError(f"template slot {path!r} is missing or already filled; fix templates/ or configs.py")
    node[last] = copy.deepcopy(value)


def bundle_configs(run: TrainedRun, dataset_dir: str = "/workspace/data") -> dict[str, dict[str, Any]]:
    """``{"inference": ..., "train": ..., "evaluate": ...}`` for ``run``.

    Args:
        run: the trained run.
        dataset_dir: default ``dataset_dir`` written into the configs (users override it on the command line).
    """
    network_def = network_def_config(run)
    optimizer = run.config.get("optimizer") or {}
    learning_rate = float((optimizer.get("defaults") or {}).get("lr", 1e-3))
    shared = {
        "num_classes": run.preset.out_channels,
        "roi_size": list(run.roi_size),
        "network_def": network_def,
    }
    inference = load_template("inference")
    for key, value in shared.items():
        _fill(inference, key, value)
    _fill(inference, "preprocessing#transforms", preprocessing_config(run.preset, ["image"]))
    inference.update(dataset_dir=dataset_dir, sw_batch_size=run.sw_batch_size, sw_overlap=run.sw_overlap)
    if not run.preset.labels_contiguous:  # classes 0..N-1 back to the task's label values, before saving
        steps = inference["postprocessing"]["transforms"]
        at = next(i for i, step in enumerate(steps) if step["_target_"] == "AsDiscreted") + 1
        steps.insert(at, label_values_config(run.preset, "pred"))

    train = load_template("train")
    for key, value in shared.items():
        _fill(train, key, value)
    _fill(train, "train#deterministic_transforms", preprocessing_config(run.preset, ["image", "label"]))
    _fill(train, "max_epochs", int(run.config.get("max_epochs") or 100))
    _fill(train, "learning_rate", learning_rate)
    train.update(dataset_dir=dataset_dir, sw_batch_size=run.sw_batch_size, sw_overlap=run.sw_overlap,
                 batch_size=int(run.config.get("batch_size") or 2),
                 num_samples=int(run.config.get("num_samples") or 2))
    return {"inference": inference, "train": train, "evaluate": load_template("evaluate")}
