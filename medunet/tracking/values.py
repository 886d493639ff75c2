"""Turn medunet's nested configs and metric dicts into what MLflow accepts.

MLflow keys may hold letters, digits and ``_ - . / : space`` (at most 250 characters); parameter values
are strings of at most 6000 characters, tag values 8000; metric values are floats.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Mapping, Sequence
from typing import Any

MAX_KEY_LENGTH = 250
MAX_PARAM_LENGTH = 6000
MAX_TAG_LENGTH = 8000
_INVALID_KEY_CHARACTERS = re.compile(r"[^\w.\- /:]")


def clean_key(key: Any) -> str:
    """A valid MLflow key: other characters become ``_``, clipped to 250 characters."""
    text = _INVALID_KEY_CHARACTERS.sub("_", str(key)).strip() or "_"
    if posixpath.normpath(text) != text or text.startswith(("/", ".")):
        text = text.replace("/", "_").lstrip(".") or "_"
    return text[:MAX_KEY_LENGTH]


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in ``...`` when cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def param_text(value: Any) -> str:
    """A parameter value as text: lists and dicts as compact JSON, paths and others by ``str``."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as ``a.b.c`` keys; values as text clipped to MLflow's 6000 characters.

    >>> flatten_params({"network": {"name": "lunet_small_8f", "dropout": 0.1}, "fold": 0})
    {'network.name': 'lunet_small_8f', 'network.dropout': '0.1', 'fold': '0'}
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            flat[clean_key(name)] = clip(param_text(value), MAX_PARAM_LENGTH)
    return flat


def as_float(value: Any) -> float | None:
    """A number (Python, NumPy or one-element tensor) as float; None for anything else."""
    if isinstance(value, bool):
        return float(value)
    if hasattr(value, "numel") and hasattr(value, "item"):  # torch.Tensor without importing torch
        return float(value.item()) if value.numel() == 1 else None
    if hasattr(value, "size") and hasattr(value, "item"):  # numpy scalar or array
        return float(value.item()) if value.size == 1 else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def flatten_metrics(
    metrics: Mapping[str, Any], prefix: str = "", names: Sequence[str] | Mapping[int, str] | None = None
) -> tuple[dict[str, float], list[str]]:
    """Metric values as ``{key: float}`` and the keys whose values are not numbers.

    Nested dicts become ``key_sub``; vectors (a per-label Dice tensor from ``reduction="mean_batch"``,
    a list) become one metric per entry, ``key_<name>`` with ``names[i]`` when given else ``key_<i>``.
    ``prefix`` is put in front of keys that do not start with it yet (``dice`` -> ``val_dice``).
    """
    flat: dict[str, float] = {}
    skipped: list[str] = []
    for key, value in metrics.items():
        name = str(key)
        if prefix and not name.startswith(prefix):
            name = f"{prefix}_{name}"
        number = as_float(value)
        if number is not None:
            flat[clean_key(name)] = number
            continue
        entries = _entries(value, names)
        if entries is None:
            skipped.append(name)
            continue
        sub_flat, sub_skipped = flatten_metrics(entries, "", names)
        flat.update({clean_key(f"{name}_{sub}"): v for sub, v in sub_flat.items()})
        skipped += [f"{name}_{sub}" for sub in sub_skipped]
    return flat, skipped


def _entries(value: Any, names: Sequence[str] | Mapping[int, str] | None) -> dict[str, Any] | None:
    """The entries of a dict or vector keyed by label name or index; None if not a container."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None
    flat = list(_flat(value))
    return {_entry_name(i, names): v for i, v in enumerate(flat)}


def _flat(values: Sequence[Any]):
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from _flat(value)
        else:
            yield value


def _entry_name(index: int, names: Sequence[str] | Mapping[int, str] | None) -> str:
    if isinstance(names, Mapping):
        return str(names.get(index, index))
    if names is not None and index < len(names):
        return str(names[index])
    return str(index)
