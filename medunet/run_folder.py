"""The run folder: its layout and the record of a training run (``config.json``), owned by this module alone.

Training writes :class:`RunRecord` with :func:`write_run_record`; inference, bundle export, the demo, the
benchmark and resume read it with :func:`read_run_record`. Nothing else opens ``config.json``. The per-epoch
``metrics.json`` (written by :class:`medunet.engines.checkpoint.RunRecorder`) is read back, checked, through
:func:`read_metrics_record` by the bench, bundle export and tracking.

A run folder is data people send each other, so reading one never runs code. :func:`read_run_record` builds
only what medunet's network registry knows (a registered preset name, or a class registered with
``medunet.networks.registry.register_class``: the allow-list), checks every network argument against the
constructor's signature and by type, and refuses any string that MONAI's ``ConfigParser`` would treat as code
or a reference (``$...``, ``@...``, ``%...``) and any ``_target_``-style key, wherever in the record it sits.
The values that reach bundle configs are therefore plain data.

Layout (``RUN_DIR``, rank 0 writes)::

    config.json                    this record (versioned; see FORMAT_VERSION)
    workflow.json                  the merged workflow config of ``medunet train`` (MONAI config: code you choose
                                   to run; it is written, never executed by medunet)
    tracking.json                  the MLflow run this folder is mirrored to, and how many epochs it holds
    profile.json                   model facts at the training batch (parameters, multiply-adds, memory, latency)
    models/model.pt, models/model_last.pt, checkpoints/checkpoint_last.pt, metrics.csv, metrics.json
    predictions/, evaluation/      ``medunet infer`` and ``medunet evaluate`` outputs
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medunet.errors import MedunetError

CONFIG_FILE = "config.json"
WORKFLOW_FILE = "workflow.json"
TRACKING_FILE = "tracking.json"
PROFILE_FILE = "profile.json"
MODEL_FILE = "models/model.pt"
LAST_MODEL_FILE = "models/model_last.pt"
RESUME_FILE = "checkpoints/checkpoint_last.pt"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
PREDICTIONS_DIR = "predictions"
EVALUATION_DIR = "evaluation"
SUMMARY_FILE = f"{EVALUATION_DIR}/summary.json"

#: Workflow keys holding paths: ``workflow.json`` writes them as they read on any machine with the same layout.
WORKFLOW_PATH_KEYS = ("dataset_dir", "datalist", "run_dir")
#: 1: config.json without ``format_version`` (medunet 0.1 before the run record); 2: this module.
FORMAT_VERSION = 2
#: Leading characters that make a string an expression, reference or macro in MONAI's ConfigParser.
CONFIG_SIGILS = ("$", "@", "%")
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
#: Dict keys that ConfigParser keeps as data: no leading '_' or sigil, no id separator ('#', '::').
_PLAIN_KEY = re.compile(r"^(?![_$@%])(?!.*(#|::))[^\x00-\x1f]+$")
_MAX_DEPTH = 8


# -- plain data only --------------------------------------------------------------------------------------
def check_literal(value: Any, where: str, depth: int = 0) -> Any:
    """Return ``value`` if it is plain JSON data that a MONAI config keeps as data; raise otherwise.

    Plain data: None, booleans, finite numbers, strings not starting with ``$``, ``@`` or ``%``, and lists or
    dicts of plain data whose keys do not start with ``_`` or a sigil (``_target_``, ``_requires_``... would make
    ConfigParser instantiate or run something; '#' and '::' separate ids).

    Args:
        value: the value read from a file.
        where: where it was read, for the message (``RUN_DIR/config.json: network.args.order``).
        depth: nesting depth so far (at most 8 levels).
    """
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise MedunetError(f"{where} is {value}, not a finite number. Fix: write a number.")
        return value
    if isinstance(value, str):
        if value.lstrip().startswith(CONFIG_SIGILS):
            raise MedunetError(
                f"{where} is {value[:80]!r}: a string starting with '$', '@' or '%' is code or a reference in a MONAI "
                "config, and medunet never runs code from a file it reads. Fix: write the plain value (or, if you "
                "wrote this yourself and mean it, build the network in your own workflow file)."
            )
        return value
    if depth >= _MAX_DEPTH:
        raise MedunetError(f"{where} is nested more than {_MAX_DEPTH} levels deep. Fix: write plain values.")
    if isinstance(value, (list, tuple)):
        return [check_literal(item, f"{where}[{index}]", depth + 1) for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str) or not _PLAIN_KEY.match(key):
                raise MedunetError(
                    f"{where} has the key {str(key)[:80]!r}; keys must be plain words (keys such as '_target_' make "
                    "MONAI build objects, '#' and '::' make references). Fix: remove it."
                )
        return {key: check_literal(item, f"{where}.{key}", depth + 1) for key, item in value.items()}
    raise MedunetError(f"{where} is a {type(value).__name__}, not plain JSON data. Fix: write a plain value.")


def _text(value: Any, where: str, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise MedunetError(f"{where} must be a non-empty string, got {value!r}. Fix: correct it, or re-run training.")
    return check_literal(value, where)


def _integer(value: Any, where: str, minimum: int | None = None, required: bool = True) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise MedunetError(f"{where} must be an integer{bound}, got {value!r}. Fix: correct it, or re-run training.")
    return value


def _number(value: Any, where: str, required: bool = True) -> float | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise MedunetError(f"{where} must be a finite number, got {value!r}. Fix: correct it, or re-run training.")
    return float(value)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise MedunetError(f"{where} must be a JSON object, got {type(value).__name__}. Fix: correct it.")
    return value


# -- the network ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NetworkRecord:
    """The trained network: a registry name (or a registered class) and the keywords it was built with.

    Args:
        name: registry name (``medunet networks``) or registered class name (``LUNet``); None for a network
            medunet's registry does not know (such a run can be read, not rebuilt).
        class_path: ``module.Class`` of the built module (information only: never imported).
        args: constructor keywords (plain data, checked against the constructor's signature).
        parameters: number of parameters, when recorded.
    """

    name: str | None
    class_path: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    parameters: int | None = None

    def build(self, where: str = "the run", **overrides: Any) -> Any:
        """A fresh, untrained instance: ``create_network(name, **args, **overrides)``; only registry networks."""
        from medunet.networks import create_network

        if self.name is None:
            raise MedunetError(
                f"{where}: the network ({self.class_path or 'no class recorded'}) is not in medunet's registry, and "
                "a run folder cannot name code to import. Fix: register the class with "
                "medunet.networks.registry.register_class in your own code before reading the run, or build the "
                "network yourself and call medunet.engines.inference.predict(network, preset, ...)."
            )
        return create_network(self.name, **{**self.args, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "class": self.class_path, "args": dict(self.args), "parameters": self.parameters}

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> NetworkRecord:
        """Validate a ``network`` entry: a registry name (or registered class), plain, known and typed arguments."""
        from medunet.networks.registry import get_preset, registered_name_of_class

        raw = _mapping(raw, f"{source}: network")
        class_path = _text(raw.get("class") or None, f"{source}: network.class", required=False) or ""
        name = raw.get("name")
        if name is None and class_path:
            name = registered_name_of_class(class_path)
        elif name is not None:
            name = _text(name, f"{source}: network.name")
        if name is None and not class_path:
            raise MedunetError(f"{source}: network has neither 'name' nor 'class'. Fix: set network.name to a "
                               "registry name ('medunet networks').")
        args = check_literal(dict(_mapping(raw.get("args"), f"{source}: network.args")), f"{source}: network.args")
        if name is not None:
            check_arguments(get_preset(name).factory, args, f"{source}: network.args")  # unknown names fail here
        return cls(name=name, class_path=class_path, args=args,
                   parameters=_integer(raw.get("parameters"), f"{source}: network.parameters", 0, required=False))


def check_arguments(factory: Callable[..., Any], args: Mapping[str, Any], where: str) -> None:
    """Refuse keywords ``factory`` does not take and values whose type contradicts the parameter's default.

    Args:
        factory: a network class or builder function.
        args: the keywords read from a file (already plain data).
        where: where they were read, for the message.
    """
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    accepted = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key, value in args.items():
        if key not in accepted:
            if takes_any and _NAME.match(key):
                continue
            raise MedunetError(f"{where}.{key}: {getattr(factory, '__name__', factory)} takes no argument {key!r}. "
                               f"Fix: remove it; it takes {sorted(accepted)}.")
        default = parameters[key].default
        if default is inspect.Parameter.empty or default is None or value is None:
            continue
        expected: tuple[type, ...] | None = None
        if isinstance(default, bool):
            expected = (bool,)
        elif isinstance(default, int):
            expected = (int,)
        elif isinstance(default, float):
            expected = (int, float)
        if expected is not None and (not isinstance(value, expected) or (bool not in expected and isinstance(value, bool))):
            raise MedunetError(f"{where}.{key} is {value!r}; a {type(default).__name__} is expected (default "
                               f"{default!r}). Fix: correct the value.")


# -- the record -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    """One training session of a run (a resumed run may have moved machines)."""

    from_epoch: int
    device_name: str | None = None
    amp: bool | None = None
    torch: str | None = None
    started: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"from_epoch": self.from_epoch, "device_name": self.device_name, "amp": self.amp,
                "torch": self.torch, "started": self.started}

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> Session:
        raw = _mapping(raw, where)
        amp = raw.get("amp")
        if amp is not None and not isinstance(amp, bool):
            raise MedunetError(f"{where}.amp must be true, false or null, got {amp!r}. Fix: correct it.")
        return cls(
            from_epoch=_integer(raw.get("from_epoch", 1), f"{where}.from_epoch", 1),
            device_name=_text(raw.get("device_name"), f"{where}.device_name", required=False),
            amp=amp,
            torch=_text(raw.get("torch"), f"{where}.torch", required=False),
            started=_text(raw.get("started"), f"{where}.started", required=False),
        )


#: The training recipe's keys, as they sit at the top level of config.json.
RECIPE_KEYS = ("loss", "optimizer", "lr_scheduler", "max_epochs", "val_interval", "batch_size", "num_samples",
               "epoch_length", "sliding_window", "early_stop_patience", "amp", "seed", "augment", "deep_supervision")
#: Where the run ran and with what: free text for people and tracking, never read back into a config.
PROVENANCE_KEYS = ("world_size", "device", "device_name", "resumed_from_epoch", "command", "started", "versions")


@dataclass(frozen=True)
class RunRecord:
    """What a training run records in ``RUN_DIR/config.json``.

    Args:
        preset: the preprocessing the network was trained with (task name, labels, modality, spacing, patch, window).
        network: the network (registry name and arguments).
        fold: the validation fold.
        dataset_dir: the task folder trained on, relative to the repository when it lay beside it
            (:func:`medunet.paths.portable_path`; :attr:`dataset_path` resolves it on this machine).
        datalist: the k-fold datalist file, written the same way (:attr:`datalist_path`).
        num_train_cases: training cases of the fold.
        num_val_cases: validation cases of the fold.
        recipe: the training recipe (loss, optimizer, epochs, batch, sliding window...), plain data.
        sessions: where each training session ran.
        provenance: devices, command, start time and versions, plain data.
        format_version: the record's format (``FORMAT_VERSION`` when written by this code).
    """

    preset: Any  # medunet.data.TaskPreset (imported lazily: this module is light)
    network: NetworkRecord
    fold: int | None = None
    dataset_dir: str | None = None
    datalist: str | None = None
    num_train_cases: int | None = None
    num_val_cases: int | None = None
    recipe: dict[str, Any] = field(default_factory=dict)
    sessions: tuple[Session, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def task(self) -> str:
        return self.preset.name

    @property
    def labels(self) -> dict[int, str]:
        """Label value -> name, background included."""
        return dict(self.preset.labels)

    @property
    def dataset_path(self) -> Path | None:
        """The task folder on this machine (recorded relative to the repository when it lay beside it)."""
        from medunet.paths import resolve_portable

        return resolve_portable(self.dataset_dir) if self.dataset_dir else None

    @property
    def datalist_path(self) -> Path | None:
        """The datalist file on this machine."""
        from medunet.paths import resolve_portable

        return resolve_portable(self.datalist) if self.datalist else None

    @property
    def sliding_window(self) -> dict[str, Any]:
        """``roi_size``, ``sw_batch_size``, ``overlap`` (defaults: the patch size, 4, 0.25)."""
        window = dict(self.recipe.get("sliding_window") or {})
        return {"roi_size": tuple(window.get("roi_size") or self.preset.patch_size),
                "sw_batch_size": int(window.get("sw_batch_size", 4)), "overlap": float(window.get("overlap", 0.25)),
                "mode": window.get("mode", "gaussian")}

    def to_dict(self) -> dict[str, Any]:
        preset = self.preset.to_dict()
        return {
            "format_version": self.format_version,
            "task": preset.pop("name"),
            "dataset_dir": self.dataset_dir,
            "datalist": self.datalist,
            "fold": self.fold,
            "num_train_cases": self.num_train_cases,
            "num_val_cases": self.num_val_cases,
            "labels": preset.pop("labels"),
            "network": self.network.to_dict(),
            "preset": preset,
            **self.recipe,
            **self.provenance,
            "sessions": [session.to_dict() for session in self.sessions],
        }

    @classmethod
    def from_dict(cls, raw: Any, source: str = CONFIG_FILE) -> RunRecord:
        """Validate and load a record (format 1 or 2); see the module docstring for what is refused.

        A hand-written record may name only ``task`` and ``network``: the registered preset of the task fills
        the rest.
        """
        raw = _mapping(raw, source)
        version = raw.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise MedunetError(f"{source}: format_version {version!r} is not a version number. Fix: repair the file.")
        if version > FORMAT_VERSION:
            raise MedunetError(
                f"{source} is run-record format {version}, written by a newer medunet; this one reads formats up to "
                f"{FORMAT_VERSION}. Fix: upgrade medunet (pip install -U medunet)."
            )
        if "network" not in raw:
            raise MedunetError(f"{source} has no 'network' (the trained network: name and args). Fix: add it, or "
                               "re-run 'medunet train' to rewrite it.")
        preset = _preset(raw, source)
        recipe = {key: check_literal(raw[key], f"{source}: {key}") for key in RECIPE_KEYS if key in raw}
        provenance = {key: check_literal(raw[key], f"{source}: {key}") for key in PROVENANCE_KEYS if key in raw}
        sessions = raw.get("sessions")
        if sessions is not None and not isinstance(sessions, list):
            raise MedunetError(f"{source}: sessions must be a list. Fix: repair the file.")
        if not sessions:  # records before sessions were kept: one session, described by the provenance
            sessions = [{"from_epoch": int(provenance.get("resumed_from_epoch") or 0) + 1,
                         "device_name": provenance.get("device_name") or provenance.get("device"),
                         "amp": recipe.get("amp"), "torch": (provenance.get("versions") or {}).get("torch"),
                         "started": provenance.get("started")}]
        return cls(
            preset=preset,
            network=NetworkRecord.from_dict(raw["network"], source),
            fold=_integer(raw.get("fold"), f"{source}: fold", 0, required=False),
            dataset_dir=_text(raw.get("dataset_dir"), f"{source}: dataset_dir", required=False),
            datalist=_text(raw.get("datalist"), f"{source}: datalist", required=False),
            num_train_cases=_integer(raw.get("num_train_cases"), f"{source}: num_train_cases", 0, required=False),
            num_val_cases=_integer(raw.get("num_val_cases"), f"{source}: num_val_cases", 0, required=False),
            recipe=recipe,
            sessions=tuple(Session.from_dict(s, f"{source}: sessions[{i}]") for i, s in enumerate(sessions)),
            provenance=provenance,
            format_version=version,
        )


def _preset(raw: Mapping[str, Any], source: str) -> Any:
    """The run's preset: the recorded ``task``/``labels``/``preset`` keys, completed by the registered preset."""
    from medunet.data import TaskPreset, get_preset

    task = _text(raw.get("task"), f"{source}: task", required=False)
    registered = None
    if task is not None:
        try:
            registered = get_preset(task)
        except MedunetError:
            registered = None
    written = dict(_mapping(raw.get("preset"), f"{source}: preset"))
    keys = ("modality", "in_channels", "target_spacing", "patch_size", "ct_window")
    if registered is None and not all(key in written for key in keys):
        raise MedunetError(
            f"{source} names no known task ('task': {task!r}) and its 'preset' lacks "
            f"{[key for key in keys if key not in written]}. Fix: set 'task' to a preset name "
            "('Task04_Hippocampus', 'PhantomCT', ...) or write the missing preset keys."
        )
    values = registered.to_dict() if registered is not None else {}
    values.update({key: written[key] for key in keys if key in written})
    values["name"] = task or values.get("name") or "custom"
    if raw.get("labels"):
        values["labels"] = raw["labels"]
    elif "labels" not in values:
        raise MedunetError(f"{source} has no 'labels'. Fix: add e.g. {{\"0\": \"background\", \"1\": \"spleen\"}}.")
    return TaskPreset.from_dict(values, source)


# -- reading and writing ----------------------------------------------------------------------------------
def is_run_folder(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run record."""
    return (Path(run_dir) / CONFIG_FILE).is_file()


def read_run_record(run_dir: str | Path) -> RunRecord:
    """The validated record of the run in ``run_dir`` (see the module docstring for what is refused).

    Args:
        run_dir: a folder written by ``medunet train``.

    Raises:
        MedunetError: no record, unreadable JSON, a newer format, or a value that is not what a run records.
    """
    source = Path(run_dir) / CONFIG_FILE
    if not source.is_file():
        raise MedunetError(
            f"{source} does not exist: {run_dir} is not a medunet run folder. Fix: pass the --run-dir of "
            "'medunet train' (it holds config.json and models/model.pt)."
        )
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MedunetError(f"{source} is not valid JSON ({error}). Fix: repair it or re-run training.") from None
    return RunRecord.from_dict(raw, str(source))


#: The folders of a run that medunet writes into by itself: ``models/`` and ``checkpoints/`` (training), ``predictions/``
#: (``medunet infer`` without ``--out``).
OWN_FOLDERS = (Path(MODEL_FILE).parent.name, Path(RESUME_FILE).parent.name, PREDICTIONS_DIR)


def check_own_folders(run_dir: str | Path, folders: Sequence[str] = OWN_FOLDERS) -> None:
    """Refuse a run folder where one of ``folders`` is a symbolic link.

    medunet writes fixed names there (``model.pt``, ``checkpoint_last.pt``, ``<case>.nii.gz``): through a link, a run
    folder from elsewhere would have it overwrite those files wherever the link points (another run's models).

    Args:
        run_dir: the run folder.
        folders: the names inside it to check.

    Raises:
        MedunetError: naming the link, its target and the fix.
    """
    for name in folders:
        path = Path(run_dir) / name
        if path.is_symlink():
            raise MedunetError(
                f"{path} is a symbolic link (to {os.readlink(path)!r}): medunet writes {name}/ itself and would "
                "overwrite the files wherever it points. Fix: delete the link (if its files are this run's, copy them "
                "into a real folder of that name) and rerun."
            )


def write_run_record(record: RunRecord, run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/config.json`` atomically (a kill leaves the previous record or the new one)."""
    from medunet.atomic import atomic_write_text

    path = Path(run_dir) / CONFIG_FILE
    atomic_write_text(json.dumps(record.to_dict(), indent=2, default=str) + "\n", path)
    return path


def read_json_file(path: str | Path, what: str, expect: type | None = None) -> Any:
    """A JSON file of a run folder (metrics, tracking), or None when absent; broken files raise clearly.

    Args:
        path: the file.
        what: what it holds, for the error message.
        expect: the type the top level must have (``dict``, ``list``); None accepts any.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MedunetError(f"{path} ({what}) is not valid JSON ({error}). Fix: repair it or delete it.") from None
    if expect is not None and not isinstance(value, expect):
        kind = {dict: "an object", list: "a list"}.get(expect, expect.__name__)
        raise MedunetError(f"{path} ({what}) is a JSON {type(value).__name__}, not {kind}. Fix: restore the file "
                           "medunet wrote, or delete it.")
    return value


def read_metrics_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``metrics.json``, checked (None when absent): what the bench scores, the bundle card states and
    tracking logs comes from here, so a NaN, a string or a truncated record is refused, not scored.

    Every epoch row is an object with an integer ``epoch`` (increasing) and otherwise finite numbers or null;
    ``val_*`` values (Dice) lie in [0, 1], ``epoch_seconds`` is not negative. ``best_metric`` is null or in [0, 1],
    ``best_epoch`` null or a recorded epoch, ``finished`` true or false, ``lost_classes`` a list of names.

    Args:
        run_dir: a run folder.

    Raises:
        MedunetError: naming the file, the field and the value, and the fix.
    """
    path = Path(run_dir) / METRICS_JSON
    record = read_json_file(path, "the run's per-epoch metrics")
    if record is None:
        return None
    where = str(path)
    if not isinstance(record, dict) or not isinstance(record.get("epochs"), list):
        raise MedunetError(f"{where} is not a metrics record (an object with an 'epochs' list). Fix: restore the file "
                           "the training wrote, or delete the run folder and train again.")
    previous = 0
    for index, row in enumerate(record["epochs"]):
        at = f"{where}: epochs[{index}]"
        if not isinstance(row, dict):
            raise MedunetError(f"{at} is a {type(row).__name__}, not an epoch row (an object). Fix: restore the file "
                               "the training wrote.")
        epoch = _integer(row.get("epoch"), f"{at}.epoch", minimum=previous + 1)
        for key, value in row.items():
            if key != "epoch":
                _metric_value(value, f"{at}.{key}", key)
        previous = epoch
    _metric_value(record.get("best_metric"), f"{where}: best_metric", "val_best")
    best_epoch = _integer(record.get("best_epoch"), f"{where}: best_epoch", minimum=1, required=False)
    if best_epoch is not None and best_epoch not in {row["epoch"] for row in record["epochs"]}:
        raise MedunetError(f"{where}: best_epoch {best_epoch} is not a recorded epoch. Fix: restore the file the "
                           "training wrote, or delete the run folder and train again.")
    if not isinstance(record.get("finished", False), bool):
        raise MedunetError(f"{where}: finished must be true or false, got {str(record['finished'])[:80]!r}. Fix: "
                           "restore the file the training wrote.")
    lost = record.get("lost_classes", [])
    if not isinstance(lost, list) or not all(isinstance(name, str) and name.isprintable() for name in lost):
        raise MedunetError(f"{where}: lost_classes must be a list of class names, got {str(lost)[:80]!r}. Fix: "
                           "restore the file the training wrote.")
    return record


def _metric_value(value: Any, where: str, key: str) -> None:
    """A per-epoch value: null, or a finite number; a Dice (``val_*``) in [0, 1]; seconds not negative."""
    number = _number(value, where, required=False)
    if number is None:
        return
    if key.startswith("val_") and not 0.0 <= number <= 1.0:
        raise MedunetError(f"{where} is {number!r}: a Dice lies in [0, 1]. Fix: restore the file the training wrote.")
    if key == "epoch_seconds" and number < 0:
        raise MedunetError(f"{where} is {number!r}: a duration is not negative. Fix: restore the file the training "
                           "wrote.")


def weights_file(run_dir: str | Path, checkpoint: str = "best") -> Path:
    """``models/model.pt`` for ``"best"``, ``models/model_last.pt`` for ``"last"``, else ``checkpoint`` as a path."""
    run_dir = Path(run_dir)
    path = {"best": run_dir / MODEL_FILE, "last": run_dir / LAST_MODEL_FILE}.get(checkpoint, Path(checkpoint))
    if not path.is_file():
        raise MedunetError(f"checkpoint {path} does not exist. Fix: train first (the best model is written at the "
                           "first validation), or pass --checkpoint last.")
    return path


def load_trained_network(run_dir: str | Path, record: RunRecord | None = None, checkpoint: str = "best") -> Any:
    """The run's network with its trained weights, in eval mode.

    The weights are read with ``torch.load(weights_only=True)`` (tensors only: a checkpoint cannot run code) and
    must fit the recorded network exactly.

    Args:
        run_dir: the run folder.
        record: its record (read when None).
        checkpoint: ``"best"``, ``"last"`` or a ``.pt`` file.
    """
    from medunet.engines.checkpoint import load_model_weights

    record = record or read_run_record(run_dir)
    source = Path(run_dir) / CONFIG_FILE
    network = record.network.build(where=str(source))
    path = weights_file(run_dir, checkpoint)
    try:
        weights = load_model_weights(path)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the same: not a weights file
        raise MedunetError(f"{path} is not a readable weights file ({type(error).__name__}: {str(error)[:200]}). "
                           "Fix: use the models/model.pt that training wrote.") from None
    try:
        network.load_state_dict(weights)
    except (RuntimeError, TypeError) as error:
        raise MedunetError(
            f"{path} does not fit the network in {source} ({record.network.name} {record.network.args}): "
            f"{str(error)[:300]}. Fix: make config.json's network match the run that wrote the weights."
        ) from None
    return network.eval()
