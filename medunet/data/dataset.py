"""Build the MONAI dataset for a datalist with the chosen caching.

``cache="none"``: ``monai.data.Dataset`` (transforms run every time).
``cache="memory"``: ``monai.data.CacheDataset`` (deterministic prefix cached in RAM, random tail per epoch).
``cache="disk"``: ``monai.data.PersistentDataset`` (deterministic prefix cached as files in ``cache_dir``,
reused across runs; delete the folder after changing the preprocessing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset, PersistentDataset

from medunet.errors import MedunetError

CACHE_MODES = ("none", "memory", "disk")


def build_dataset(
    data: Sequence[dict[str, Any]],
    transform: Callable,
    cache: str = "none",
    cache_dir: str | Path | None = None,
    cache_rate: float = 1.0,
    num_workers: int | None = 0,
) -> Dataset:
    """A ``Dataset``/``CacheDataset``/``PersistentDataset`` over ``data`` per ``cache``.

    Args:
        data: MONAI data dicts (e.g. from ``load_fold``).
        transform: the transform chain (e.g. ``train_transforms(preset)``).
        cache: ``"none"``, ``"memory"`` or ``"disk"``.
        cache_dir: folder for ``cache="disk"`` (required there, created if missing).
        cache_rate: fraction of items cached in memory (``cache="memory"``).
        num_workers: threads filling the memory cache (0 = main thread, None = all cores).
    """
    if cache == "none":
        return Dataset(data, transform=transform)
    if cache == "memory":
        return CacheDataset(data, transform=transform, cache_rate=cache_rate, num_workers=num_workers, progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise MedunetError("cache='disk' needs a cache folder. Fix: pass cache_dir (e.g. runs/cache/Task04).")
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data, transform=transform, cache_dir=cache_dir)
    raise MedunetError(f"unknown cache mode {cache!r}. Fix: use one of {CACHE_MODES}.")
