"""Turn medunet's nested configs and metric dicts into what MLflow accepts.

MLflow keys may hold letters, digits and ``_ - . / : space`` (at most 250 characters); parameter values
are strings of at most 6000 characters, tag values 8000; metric values are floats.
"""

from __future__ import annotations

import json
import math
import numbers
import posixpath
import re
from collections.abc import Mapping
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


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts as ``a.b.c`` keys; values as text (lists and dicts as compact JSON), clipped to 6000.

    >>> flatten_params({"network": {"name": "lunet_small_8f", "dropout": 0.1}, "fold": 0})
    {'network.name': 'lunet_small_8f', 'network.dropout': '0.1', 'fold': '0'}
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            text = json.dumps(value, default=str, separators=(",", ":")) if isinstance(value, (list, tuple, dict)) else str(value)
            flat[clean_key(name)] = clip(text, MAX_PARAM_LENGTH)
    return flat


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, float], list[str]]:
    """Plain numbers as ``{key: float}`` (nested dicts as ``key_sub``; NaN left out), and the keys that are
    not numbers.

    ``prefix`` is put in front of keys that do not start with it yet (``dice`` -> ``val_dice``).
    """
    flat: dict[str, float] = {}
    skipped: list[str] = []
    for key, value in metrics.items():
        name = str(key) if not prefix or str(key).startswith(prefix) else f"{prefix}_{key}"
        if isinstance(value, Mapping):
            sub_flat, sub_skipped = flatten_metrics(value)
            flat.update({clean_key(f"{name}_{sub}"): number for sub, number in sub_flat.items()})
            skipped += [f"{name}_{sub}" for sub in sub_skipped]
        elif isinstance(value, numbers.Real):  # Python and NumPy numbers
            if not math.isnan(value):  # NaN (a 0/0 Dice) is no figure: left out, not warned about
                flat[clean_key(name)] = float(value)
        else:
            skipped.append(name)
    return flat, skipped
