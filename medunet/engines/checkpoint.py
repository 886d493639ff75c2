"""Checkpoints and per-epoch records of a training run, written atomically by rank 0.

Why not MONAI's ``CheckpointSaver`` alone: ignite deletes the previous ``n_saved`` file *before* writing the
next, so a kill in between leaves no checkpoint, and a single saved object is written as a bare state_dict.
:class:`RunRecorder` writes every file to a temporary name in the same folder, fsyncs it and ``os.replace``-s
it over the old one: a SIGKILL at any moment leaves either the previous complete file or the new one.
Resuming still goes through MONAI's ``CheckpointLoader`` (see :mod:`medunet.engines.training`).

Files (``RUN_DIR`` layout in :mod:`medunet.engines`):

- ``models/model.pt``: best validation mean Dice, ``{"model": state_dict}`` as MONAI bundles load it;
- ``models/model_last.pt``: the last epoch, same layout;
- ``checkpoints/checkpoint_last.pt``: resume state ``{"network", "optimizer", "lr_scheduler", "trainer",
  "random_streams", "run_state"[, "scaler", "early_stop"]}``; ``run_state`` holds the history, the best score and
  whether the run finished; ``random_streams`` where the data's random generators stood (:class:`RandomStreams`);
- ``metrics.csv`` and ``metrics.json``: one row per epoch (train loss, learning rate, validation Dice, time);
  ``metrics.json`` also names the classes the best model has lost (``lost_classes``, :func:`lost_classes`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Randomizable

from medunet.atomic import atomic_write_text, replace_atomically
from medunet.run_folder import LAST_MODEL_FILE, METRICS_CSV, METRICS_JSON, MODEL_FILE, RESUME_FILE  # noqa: F401

KEY_METRIC = "val_mean_dice"
#: Below this validation Dice a class is, in effect, never predicted: the run has lost it. SegResNet did so in one
#: of ten Hippocampus runs of the CPU protocol (benchmarks/README.md, "A second seed"); such a run's mean Dice
#: measures a failed training, not the network.
LOST_CLASS_DICE = 0.01


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` that never leaves a half-written ``path`` (temporary file + ``os.replace``).

    Args:
        obj: what to save (state dicts, tensors, plain Python values).
        path: the destination file; its folder is created.
    """
    replace_atomically(path, lambda file: torch.save(obj, file))


class RandomStreams:
    """Where the random generators a training draws its data from stand, for the resume checkpoint.

    A training seeds its generators once (``set_determinism``, then MONAI's ``DataLoader`` seeds every random
    transform of the dataset). A resumed session seeds them the same way, so without this it would draw epoch 1's
    patches, augmentations and order again at the epoch it resumes from, and a run resumed often (a GPU lent for
    minutes at a time) would see the start of its data stream over and over. Saved: PyTorch's, NumPy's and Python's
    global generators and each random transform's own (``Randomizable.R``), found in ``datasets`` the way MONAI's
    ``set_rnd`` finds them. Restored when the resumed run starts, before its first batch is drawn, so each stream
    goes on where it stood. With the iterator restarting at each epoch (``epoch_length`` the loader's length, or
    unset) a resumed run then trains as the uninterrupted one does, bit for bit on the same machine and thread
    count; with shorter epochs the resumed epoch starts a new pass over the cases (ignite does not save an
    iterator's position), drawn from the continued streams. Data-loader worker processes seed their transforms from
    PyTorch's generator at each epoch, which is restored too. Plain values and tensors: ``weights_only`` loads it.

    Args:
        datasets: the datasets whose random transforms are saved (the training data).
        rank: this process's rank; ranks other than 0 (whose streams rank 0 did not save) restore rank 0's and then
            draw a seed of their own from them, so they neither replay nor copy rank 0's stream.
    """

    def __init__(self, *datasets: Any, rank: int = 0) -> None:
        self.datasets = datasets
        self.rank = rank

    def transforms(self) -> list[Any]:
        """The random transforms of the datasets, always in the same order."""
        found: list[Any] = []
        _find_randomizable(self.datasets, found, set())
        return found

    def state_dict(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(), "numpy": _numpy_state(np.random.get_state()),
                "python": _python_state(random.getstate()),
                "transforms": [_numpy_state(transform.R.get_state()) for transform in self.transforms()]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        transforms = self.transforms()
        torch.set_rng_state(state["torch"])
        np.random.set_state(_from_numpy_state(state["numpy"]))
        random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
        if len(state["transforms"]) == len(transforms):
            for transform, saved in zip(transforms, state["transforms"], strict=True):
                transform.R.set_state(_from_numpy_state(saved))
        else:  # e.g. resumed with another `augment`: legitimate, but those streams cannot go on
            print(f"warning: the resume checkpoint holds the random state of {len(state['transforms'])} data "
                  f"transforms and this training has {len(transforms)} (its augmentation changed since): they start "
                  "from fresh seeds, the global generators go on where they stood.", flush=True)
        if self.rank:
            seed = int(torch.randint(2**31 - 1, (1,)).item()) + self.rank
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            for offset, transform in enumerate(transforms):
                transform.set_random_state(seed=(seed + offset) % 2**32)


def _find_randomizable(obj: Any, found: list[Any], seen: set[int]) -> None:
    """Append the MONAI ``Randomizable`` objects (each with a generator ``R`` of its own) that ``obj`` holds, depth
    first in attribute order, through the attributes and lists ``monai.data.utils.set_rnd`` walks, and on into each
    random transform (MONAI's dictionary transforms draw from inner array transforms with generators of their own)."""
    if isinstance(obj, (tuple, list)):
        for item in obj:
            _find_randomizable(item, found, seen)
        return
    if not hasattr(obj, "__dict__") or id(obj) in seen or isinstance(obj, torch.Tensor):
        return
    seen.add(id(obj))
    if isinstance(obj, Randomizable):
        found.append(obj)
    for key, value in vars(obj).items():
        if not key.startswith("__"):
            _find_randomizable(value, found, seen)


def _numpy_state(state: tuple) -> dict[str, Any]:
    """A NumPy ``RandomState`` state as tensors and plain values (``weights_only`` loads no NumPy arrays)."""
    name, keys, position, has_gauss, cached = state
    return {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "position": int(position),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _from_numpy_state(state: Mapping[str, Any]) -> tuple:
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["position"], state["has_gauss"],
            state["cached_gaussian"])


def _python_state(state: tuple) -> list[Any]:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def load_model_weights(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The network state_dict of ``model.pt``/``model_last.pt`` (``{"model": ...}``) or of a bare state_dict.

    Args:
        path: a checkpoint file written by :class:`RunRecorder` or by a MONAI bundle.
        map_location: where to put the tensors.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    for key in ("model", "network"):
        if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


def checkpoint_epoch(checkpoint: Mapping[str, Any]) -> int:
    """The completed epochs recorded in a resume checkpoint (ignite stores the iteration and epoch length).

    Args:
        checkpoint: a loaded ``checkpoint_last.pt``.
    """
    trainer = checkpoint["trainer"]
    if "epoch" in trainer:
        return int(trainer["epoch"])
    return int(trainer["iteration"]) // int(trainer["epoch_length"])


def per_label_dice(evaluator: Engine, label_names: Mapping[int, str], key_metric: str = KEY_METRIC) -> dict[str, float | None]:
    """Each foreground label's mean validation Dice over the cases (``{name: Dice}``, None where no case has it).

    Read from the per-case details MONAI's ``MeanDice(save_details=True)`` leaves in ``evaluator.state``; empty when
    the metric kept none.

    Args:
        evaluator: a MONAI evaluator after its run.
        label_names: foreground label value -> name.
        key_metric: the name the Dice metric is registered under.
    """
    details = getattr(evaluator.state, "metric_details", {}).get(key_metric)
    if details is None:
        return {}
    per_label = torch.nanmean(torch.as_tensor(details, dtype=torch.float64), dim=0)  # (cases, labels) over ranks
    return {label_names[value]: _finite(score)
            for value, score in zip(sorted(label_names), per_label.tolist(), strict=False)}


def lost_classes(row: Mapping[str, Any], prefix: str = "val_dice_") -> list[str]:
    """The classes of a metrics row (``{prefix}<name>: Dice``) scored below :data:`LOST_CLASS_DICE`.

    A class no validation case contains (None or NaN) is not lost: there was nothing to find.

    Args:
        row: one epoch of ``metrics.json`` (or a benchmark row, with ``prefix="dice_"``).
        prefix: what precedes the class name in the keys.
    """
    return [key.removeprefix(prefix) for key, value in row.items()
            if key.startswith(prefix) and isinstance(value, (int, float)) and value < LOST_CLASS_DICE]


def _finite(value: Any) -> Any:
    """Plain float for tensors/numbers; NaN becomes None so JSON and CSV stay valid."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class RunRecorder:
    """Ignite handler recording a run: per-epoch history, best and last models, resume checkpoint.

    Attach with :meth:`attach` to the trainer and the evaluator *after* ``ValidationHandler`` and
    ``LrScheduleHandler`` so each epoch's files include that epoch's validation and scheduler step.

    Args:
        run_dir: the run folder.
        network: the network (unwrapped from DDP) whose weights are saved.
        resume_objects: what the resume checkpoint holds besides ``run_state`` (optimizer, scheduler, trainer...).
        label_names: foreground label value -> name, for the per-label Dice columns.
        write: whether this process writes (rank 0); other ranks only keep the history.
        key_metric: evaluator metric that picks the best model (higher is better).
    """

    def __init__(
        self,
        run_dir: str | Path,
        network: torch.nn.Module,
        resume_objects: Mapping[str, Any],
        label_names: Mapping[int, str],
        write: bool = True,
        key_metric: str = KEY_METRIC,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.network = network
        self.resume_objects = dict(resume_objects)
        self.label_names = dict(label_names)
        self.write = write
        self.key_metric = key_metric
        self.history: list[dict[str, Any]] = []
        self.best_metric = -1.0
        self.best_epoch = 0
        self.finished = False
        self.stop_reason = ""
        self._losses: list[float] = []
        self._validation: dict[str, Any] = {}
        self._epoch_start = 0.0
        self._learning_rate: float | None = None

    # ``run_state`` in the resume checkpoint: restored by MONAI's CheckpointLoader via load_state_dict.
    def state_dict(self) -> dict[str, Any]:
        """History, best score and completion flag (plain values, loadable with ``weights_only=True``)."""
        return {
            "history": self.history,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "finished": self.finished,
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.history = list(state.get("history", []))
        self.best_metric = float(state.get("best_metric", -1.0))
        self.best_epoch = int(state.get("best_epoch", 0))
        self.finished = bool(state.get("finished", False))
        self.stop_reason = str(state.get("stop_reason", ""))

    def lost_classes(self) -> list[str]:
        """The classes the best model (without one, the last validated epoch) scores below :data:`LOST_CLASS_DICE`."""
        validated = [row for row in self.history if row.get(self.key_metric) is not None]
        chosen = [row for row in validated if row["epoch"] == self.best_epoch] or validated[-1:]
        return lost_classes(chosen[0]) if chosen else []

    def attach(self, trainer: Engine, evaluator: Engine | None) -> None:
        """Hook the recorder to the trainer's epochs and iterations and to the evaluator's completion."""
        trainer.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, self._completed)
        if evaluator is not None:
            evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._validation_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self._losses, self._validation, self._epoch_start = [], {}, time.perf_counter()
        optimizer = self.resume_objects.get("optimizer")
        self._learning_rate = optimizer.param_groups[0]["lr"] if optimizer is not None else None

    def _iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output
        item = output[0] if isinstance(output, Sequence) and not isinstance(output, Mapping) else output
        if isinstance(item, Mapping) and "loss" in item:
            self._losses.append(float(item["loss"]))

    def _validation_completed(self, evaluator: Engine) -> None:
        metrics = evaluator.state.metrics
        mean_dice = _finite(metrics.get(self.key_metric))
        self._validation = {self.key_metric: mean_dice}
        for name, score in per_label_dice(evaluator, self.label_names, self.key_metric).items():
            self._validation[f"val_dice_{name}"] = score
        if mean_dice is not None and mean_dice > self.best_metric:
            self.best_metric, self.best_epoch = float(mean_dice), int(self.resume_objects["trainer"].state.epoch)
            if self.write:
                atomic_torch_save({"model": self.network.state_dict()}, self.run_dir / MODEL_FILE)

    def _epoch_completed(self, engine: Engine) -> None:
        losses = self._losses
        row = {
            "epoch": int(engine.state.epoch),
            "train_loss": sum(losses) / len(losses) if losses else None,
            "learning_rate": self._learning_rate,
            **self._validation,
            "epoch_seconds": round(time.perf_counter() - self._epoch_start, 2),
        }
        self.history = [r for r in self.history if r["epoch"] < row["epoch"]] + [row]
        self._save(engine)

    def _completed(self, engine: Engine) -> None:
        self.finished = True
        self.stop_reason = "early stop" if engine.should_terminate else "max_epochs reached"
        if self.write and not (self.run_dir / MODEL_FILE).exists():  # never validated: the last model is the best
            atomic_torch_save({"model": self.network.state_dict()}, self.run_dir / MODEL_FILE)
        self._save(engine)

    def _save(self, engine: Engine) -> None:
        if not self.write:
            return
        # Models first, then the resume checkpoint, then the tables: a kill between writes leaves a
        # checkpoint that is never ahead of the weights it describes.
        atomic_torch_save({"model": self.network.state_dict()}, self.run_dir / LAST_MODEL_FILE)
        resume = {name: obj.state_dict() for name, obj in self.resume_objects.items() if obj is not None}
        resume["run_state"] = self.state_dict()
        atomic_torch_save(resume, self.run_dir / RESUME_FILE)
        self.write_metrics()

    def write_metrics(self) -> None:
        """Rewrite ``metrics.csv`` and ``metrics.json`` from the history."""
        columns: list[str] = []
        for row in self.history:
            columns += [key for key in row if key not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.history)
        atomic_write_text(buffer.getvalue(), self.run_dir / METRICS_CSV)
        summary = {
            "best_metric": self.best_metric if self.best_epoch else None,
            "best_epoch": self.best_epoch or None,
            "key_metric": self.key_metric,
            "finished": self.finished,
            "stop_reason": self.stop_reason,
            "lost_classes": self.lost_classes(),
            "epochs": self.history,
        }
        atomic_write_text(json.dumps(summary, indent=2) + "\n", self.run_dir / METRICS_JSON)
