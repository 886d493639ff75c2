"""Build the MONAI dataset for a datalist with the chosen caching.

``cache="none"``: ``monai.data.Dataset`` (transforms run every time).
``cache="memory"``: ``monai.data.CacheDataset`` (deterministic prefix cached in RAM, random tail per epoch).
``cache="disk"``: ``monai.data.PersistentDataset`` (deterministic prefix cached as files in ``cache_dir``,
reused when a run resumes; delete the folder after changing the preprocessing).

MONAI names a disk-cache file by a hash of the data dict, that is of the file *paths*: an image edited since (a label
map repaired after ``medunet check-data``) would be read back from its stale cache, and a run folder from elsewhere
could carry cache files standing in for the user's own images. :func:`file_state_hashing` adds each file's size and
modification time to the hash, so either gets a new cache entry computed from the file as it is now.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing

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
        return PersistentDataset(data, transform=transform, cache_dir=cache_dir, hash_func=file_state_hashing)
    raise MedunetError(f"unknown cache mode {cache!r}. Fix: use one of {CACHE_MODES}.")


def file_state_hashing(item: Any) -> bytes:
    """MONAI's ``pickle_hashing`` of a data dict with each file path's size and modification time beside it.

    Args:
        item: a data dict (``{"image": path, "label": path}``; a value may be a list of paths, one per channel).
    """
    if not isinstance(item, dict):
        return pickle_hashing(item)
    return pickle_hashing({key: (value, _file_state(value)) for key, value in item.items()})


def _file_state(value: Any) -> Any:
    """(size, mtime in ns) of a path that names a file; a list of those for a list; None otherwise."""
    if isinstance(value, (list, tuple)):
        return [_file_state(part) for part in value]
    if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
        state = os.stat(value)
        return state.st_size, state.st_mtime_ns
    return None
