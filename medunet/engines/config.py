"""Workflow configs: MONAI bundle-style JSON files in ``medunet/workflows/``, loaded with
``monai.bundle.ConfigParser``. ``base.json`` holds what every workflow shares (training, validation, tracking);
each task's file names it with ``"_base_": "base.json"`` and overrides a few top-level keys.

A workflow runs unchanged with ``python -m monai.bundle run --config_file "['medunet/workflows/base.json',
'medunet/workflows/<x>.json']"`` (add
``--dataset_dir``, ``--fold``, ``--network_name``... to override). ``medunet train`` loads the same file and
applies its options as overrides of the same top-level keys:

==================  =====================  ==============================================================
option              key                    note
==================  =====================  ==============================================================
``--network NAME``  ``network_name``       any ``medunet networks`` name; resets ``network_def`` to
                                           ``$create_network(@network_name, seed=@seed, **@network_args)``
``--fold K``        ``fold``
``--data-root DIR`` ``dataset_dir``        the MSD task folder
``--datalist F``    ``datalist``
``--run-dir DIR``   ``run_dir``
``--epochs N``      ``max_epochs``
``--set KEY=JSON``  any key                e.g. ``--set learning_rate=3e-4``, or a whole ``network_def`` with
                                           any ``_target_``
==================  =====================  ==============================================================
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from medunet.data import load_task, preset_for_task
from medunet.errors import MedunetError, user_error_inside

#: The shipped workflows (package data): ``base.json`` and one short override file per task.
WORKFLOWS_DIR = Path(__file__).resolve().parents[1] / "workflows"
BASE_KEY = "_base_"
#: The network of ``--network NAME``, its initial weights drawn from the workflow's ``seed`` (``create_network``).
NETWORK_DEF = "$create_network(@network_name, seed=@seed, **@network_args)"


def list_workflows() -> list[Path]:
    """The runnable workflow files shipped in ``medunet/workflows/`` (not the base they extend)."""
    return sorted(path for path in WORKFLOWS_DIR.glob("*.json") if path.name != "base.json")


def workflow_files(config_file: str | Path) -> list[Path]:
    """The files a workflow is made of, base first: a file naming ``"_base_": "base.json"`` extends that file
    (resolved beside it), as ``python -m monai.bundle run --config_file "['base.json', 'task.json']"`` merges them.
    """
    path = Path(config_file)
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get(BASE_KEY) if path.suffix == ".json" else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        base = None  # read_config reports a broken file with its own message
    if not isinstance(base, str):
        return [path]
    base_path = path.parent / base
    if not base_path.is_file() or base_path.resolve() == path.resolve():
        raise MedunetError(f"workflow {path} extends {base!r}, which is not a file beside it. Fix: put {base} next "
                           f"to it (a copy of {WORKFLOWS_DIR / 'base.json'}) or remove the \"{BASE_KEY}\" key.")
    return [*workflow_files(base_path), path]


def workflow_for_task(task_dir: str | Path) -> Path:
    """The shipped workflow of a task folder: ``medunet/workflows/task04_hippocampus.json`` for Task04,
    ``phantom_demo.json`` for phantoms, ``generic.json`` (preprocessing from the task's plan) for any other task.

    Args:
        task_dir: an MSD task folder (its preset names the workflow).
    """
    try:
        preset = preset_for_task(load_task(task_dir))
    except MedunetError:  # no shipped preset fits: the generic workflow trains it from its plan
        return WORKFLOWS_DIR / "generic.json"
    name = "phantom_demo" if preset.name.startswith("Phantom") else preset.name.lower()
    path = WORKFLOWS_DIR / f"{name}.json"
    if not path.is_file():
        raise MedunetError(
            f"no workflow for task {preset.name} ({path} is missing). Fix: pass --workflow with one of "
            f"{[p.name for p in list_workflows()]}, or copy the closest one to {path.name} and edit its task keys."
        )
    return path


def build_overrides(
    network: str | None = None,
    fold: int | None = None,
    data_root: str | Path | None = None,
    datalist: str | Path | None = None,
    run_dir: str | Path | None = None,
    epochs: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config overrides for ``medunet train``'s options (None: keep the workflow's value).

    Args:
        network: a registry name (``medunet networks``); also resets ``network_def`` to the registry builder.
        fold: the validation fold.
        data_root: the MSD task folder.
        datalist: the k-fold datalist JSON.
        run_dir: the run folder.
        epochs: ``max_epochs``.
        settings: any other top-level keys, e.g. ``{"learning_rate": 3e-4}``.
    """
    overrides: dict[str, Any] = {}
    if network is not None:
        from medunet.networks import list_networks

        if network not in list_networks():
            raise MedunetError(f"unknown network {network!r}. Fix: pick one from 'medunet networks'.")
        overrides.update(network_name=network, network_def=NETWORK_DEF)
    for key, value in (("fold", fold), ("dataset_dir", data_root), ("datalist", datalist), ("run_dir", run_dir),
                       ("max_epochs", epochs)):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    overrides.update(settings or {})
    return overrides


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """``["learning_rate=3e-4", "cache=none"]`` -> ``{"learning_rate": 0.0003, "cache": "none"}`` (JSON values,
    else strings).

    Values are data only. Workflow files are MONAI bundle configs whose ``$`` strings are Python expressions
    (``@`` references, ``%`` macros): that is code you choose to run by choosing the file, so it belongs in a
    workflow file, not in a command-line value. A string starting with ``$``, ``@`` or ``%``, anywhere in
    the value (lists and objects included), is refused.

    Args:
        pairs: ``KEY=VALUE`` strings; VALUE is parsed as JSON when it can be.
    """

    def code_in(value: Any) -> str | None:  # the first string MONAI's ConfigParser would evaluate or resolve
        if isinstance(value, str):
            return value if value[:1] in ("$", "@", "%") else None
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value if isinstance(value, list) else []
        return next((found for found in map(code_in, items) if found is not None), None)

    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MedunetError(f"--set {pair!r} is not KEY=VALUE. Fix: e.g. --set learning_rate=3e-4.")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        code = code_in(parsed)
        if code is not None:
            raise MedunetError(
                f"--set {key}: {code!r} is a MONAI config expression or reference ('$', '@', '%'); --set takes "
                "plain JSON values only (numbers, strings, lists, objects, true/false/null). Fix: copy the "
                "workflow file, write the expression there, and pass --workflow YOUR_COPY.json."
            )
        settings[key] = parsed
    return settings


def load_workflow(config_file: str | Path, overrides: Mapping[str, Any] | None = None) -> ConfigParser:
    """Read a workflow file and apply overrides of its top-level keys.

    Args:
        config_file: a ``medunet/workflows/*.json`` file or one of yours (``"_base_"`` files extend their base),
            or a run's ``workflow.json`` (the merged config, standalone).
        overrides: ``{key: value}``; keys must exist in the file (a typo fails here, not hours later).
    """
    path = Path(config_file)
    if not path.is_file():
        raise MedunetError(f"workflow {path} does not exist. Fix: use one of {[str(p) for p in list_workflows()]}.")
    parser = ConfigParser()
    try:
        parser.read_config([str(file) for file in workflow_files(path)])
    except (json.JSONDecodeError, ValueError) as error:
        raise MedunetError(f"workflow {path} is not valid JSON/YAML ({error}). Fix: repair the file.") from error
    unknown = sorted(set(overrides or {}) - set(parser.get()))
    if unknown:
        raise MedunetError(
            f"workflow {path} has no key(s) {unknown}. Fix: use one of its keys: {sorted(parser.get())}."
        )
    parser.update(dict(overrides or {}))
    if parser.get("network_def") == NETWORK_DEF and "seed" not in parser.get():  # a workflow of yours without one
        parser["network_def"] = NETWORK_DEF.replace("seed=@seed, ", "")
    return parser


def run_workflow(
    config_file: str | Path, overrides: Mapping[str, Any] | None = None, run_id: str = "run"
) -> list[Any]:
    """Run a workflow as ``python -m monai.bundle run`` does (``initialize``, ``run``, ``finalize``); a training
    that proceeds saves the merged config as ``RUN_DIR/workflow.json`` (rank 0) so the run can be repeated with
    ``python -m monai.bundle run --config_file RUN_DIR/workflow.json``.

    Args:
        config_file: the workflow file.
        overrides: top-level keys to override (see :func:`build_overrides`).
        run_id: the expression list to run.

    Returns:
        The values of the ``run`` expressions (for a training workflow: the run summary dict).
    """
    parser = load_workflow(config_file, overrides)
    results: list[Any] = []
    for section in ("initialize", run_id, "finalize"):
        if section in parser.get():
            try:
                if section == run_id:
                    _record_workflow(parser)
                value = parser.get_parsed_content(section)
            except RuntimeError as error:
                user_error = user_error_inside(error)
                if user_error is None:
                    raise
                raise user_error from None
            if section == run_id:
                results = list(value) if isinstance(value, (list, tuple)) else [value]
    return results


def _record_workflow(parser: ConfigParser) -> None:
    """Hand the merged config to the workflow's training, which saves it as ``RUN_DIR/workflow.json`` once it
    actually trains (a refused or finished run keeps its records untouched)."""
    if "training" not in parser.get():
        return
    training = parser.get_parsed_content("training", lazy=True)
    if hasattr(training, "record_workflow"):
        training.record_workflow(parser.get())
