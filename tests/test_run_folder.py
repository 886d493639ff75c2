"""The run record (``RUN_DIR/config.json``): one owner module, versioned, and never a way to run code.

A run folder is data people send each other. These tests put payloads in every field of a real record and
check that reading it refuses them, that nothing outside medunet's network registry is imported, and that the
exports (``export-bundle``, ``export-onnx``) stop with exit code 2 before anything is written or run.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from medunet.cli import main as medunet_main
from medunet.data import PRESETS, TaskPreset, get_preset
from medunet.engines.checkpoint import atomic_torch_save
from medunet.errors import MedunetError
from medunet.networks import create_network
from medunet.run_folder import (
    CONFIG_FILE,
    FORMAT_VERSION,
    MODEL_FILE,
    NetworkRecord,
    RunRecord,
    Session,
    load_trained_network,
    read_run_record,
    write_run_record,
)

NETWORK = "lunet_small_2f"
ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 3}
REPO = Path(__file__).resolve().parents[1]
MARKER = "PWNED"
PAYLOAD = f"$__import__('pathlib').Path('{MARKER}').touch() or 'AND'"


def _record() -> RunRecord:
    network = create_network(NETWORK, **ARGS)
    return RunRecord(
        preset=get_preset("PhantomCT"),
        network=NetworkRecord(NETWORK, f"{type(network).__module__}.{type(network).__qualname__}", dict(ARGS),
                              sum(p.numel() for p in network.parameters())),
        fold=0, dataset_dir="/data/Task90_PhantomCT", datalist="/data/Task90_PhantomCT/folds.json",
        num_train_cases=4, num_val_cases=1,
        recipe={"loss": "DiceCELoss()", "optimizer": {"class": "AdamW", "defaults": {"lr": 0.001}}, "max_epochs": 2,
                "batch_size": 2, "num_samples": 2, "amp": False, "seed": 0,
                "sliding_window": {"roi_size": [32, 32, 32], "sw_batch_size": 4, "overlap": 0.25, "mode": "gaussian"}},
        sessions=(Session(1, "CPU (2 threads)", False, torch.__version__, "2026-12-01T00:00:00+00:00"),),
        provenance={"device": "cpu", "command": ["medunet", "train"], "versions": {"torch": torch.__version__}},
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run folder with a real record and real (untrained) weights that fit it."""
    run = tmp_path / "run"
    write_run_record(_record(), run)
    atomic_torch_save({"model": create_network(NETWORK, **ARGS).state_dict()}, run / MODEL_FILE)
    return run


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    """Every leaf of a JSON document, as a key path."""
    if isinstance(value, dict):
        return [leaf for key, item in value.items() for leaf in _leaves(item, (*path, key))] or [path]
    if isinstance(value, list):
        return [leaf for index, item in enumerate(value) for leaf in _leaves(item, (*path, index))] or [path]
    return [path]


def _set(document: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        document = document[key]
    document[path[-1]] = value


def _config(run: Path) -> dict[str, Any]:
    return json.loads((run / CONFIG_FILE).read_text(encoding="utf-8"))


def _write_config(run: Path, config: dict[str, Any]) -> None:
    (run / CONFIG_FILE).write_text(json.dumps(config), encoding="utf-8")


def test_a_record_reads_back_as_written(run_dir: Path) -> None:
    record = read_run_record(run_dir)
    assert record.to_dict() == _record().to_dict()
    assert record.format_version == FORMAT_VERSION
    assert record.network.name == NETWORK and record.preset == get_preset("PhantomCT")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_task_preset_round_trips_through_plain_data(name: str) -> None:
    preset = PRESETS[name]
    assert TaskPreset.from_dict(json.loads(json.dumps(preset.to_dict()))) == preset


def test_run_folders_written_before_the_record_still_load() -> None:
    """The benchmark's committed run folders are format 1 (no format_version)."""
    configs = sorted((REPO / "benchmarks" / "latest" / "runs").glob(f"*/{CONFIG_FILE}"))
    assert configs, "the committed benchmark run folders are missing"
    for config in configs:
        assert "format_version" not in json.loads(config.read_text(encoding="utf-8"))
        record = read_run_record(config.parent)
        assert record.format_version == 1
        assert record.network.name == config.parent.name
        assert record.sessions and record.sessions[0].from_epoch >= 1


def test_a_record_from_a_newer_medunet_is_refused_with_the_fix(run_dir: Path) -> None:
    config = _config(run_dir)
    config["format_version"] = FORMAT_VERSION + 1
    _write_config(run_dir, config)
    with pytest.raises(MedunetError, match=rf"format {FORMAT_VERSION + 1}.*upgrade medunet"):
        read_run_record(run_dir)


def test_a_payload_in_any_field_is_refused(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    original = _config(run_dir)
    leaves = _leaves(original)
    assert len(leaves) > 40
    for path in leaves:
        config = json.loads(json.dumps(original))
        _set(config, path, PAYLOAD)
        _write_config(run_dir, config)
        with pytest.raises(MedunetError):
            read_run_record(run_dir)
            pytest.fail(f"a payload in {'.'.join(map(str, path))} was accepted")
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("where", [(), ("network",), ("network", "args"), ("preset",), ("optimizer", "defaults"),
                                   ("sliding_window",)])
def test_keys_that_make_monai_build_objects_never_reach_the_record(run_dir: Path, where: tuple) -> None:
    """Refused where the record keeps the dict; unknown keys elsewhere are dropped, never carried along."""
    config = _config(run_dir)
    node = config
    for key in where:
        node = node[key]
    node["_target_"] = "os.system"
    _write_config(run_dir, config)
    try:
        record = read_run_record(run_dir)
    except MedunetError as error:
        assert "_target_" in str(error)
    else:
        assert "_target_" not in json.dumps(record.to_dict())
        assert where in ((), ("network",), ("preset",))  # the dicts that the record rebuilds field by field


def test_arguments_are_checked_against_the_constructor(run_dir: Path) -> None:
    original = _config(run_dir)
    for args, message in (({"features": "8"}, "features is '8'; a int is expected"),
                          ({"no_such_argument": 1}, "takes no argument 'no_such_argument'"),
                          ({"spatial_dims": True}, "a int is expected")):
        config = json.loads(json.dumps(original))
        config["network"]["args"].update(args)
        _write_config(run_dir, config)
        with pytest.raises(MedunetError, match=message):
            read_run_record(run_dir)


def test_a_class_outside_the_registry_is_never_imported(run_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run folder naming its own module: reading and exporting it must not import (and so run) it."""
    module = tmp_path / "hostile_network_module.py"
    module.write_text(f"import pathlib\npathlib.Path({str(tmp_path / MARKER)!r}).touch()\nclass Net: pass\n",
                      encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    for class_path in ("hostile_network_module.Net", "monai.bundle.run", "os.system"):
        config = _config(run_dir)
        config["network"] = {"name": None, "class": class_path, "args": {}}
        _write_config(run_dir, config)
        record = read_run_record(run_dir)  # readable (e.g. for the benchmark table) ...
        assert record.network.name is None
        with pytest.raises(MedunetError, match="not in medunet's registry"):  # ... but never built
            load_trained_network(run_dir, record)
        assert medunet_main(["export-onnx", str(run_dir), str(tmp_path / "model.onnx")]) == 2
        assert medunet_main(["export-bundle", str(run_dir), str(tmp_path / "bundle"), "--no-memory"]) == 2
    assert "hostile_network_module" not in sys.modules
    assert not (tmp_path / MARKER).exists() and not (tmp_path / "bundle").exists()


def test_a_registered_class_given_by_path_is_built(run_dir: Path) -> None:
    config = _config(run_dir)
    config["network"] = {"name": None, "class": "medunet.networks.LUNet", "args": {**ARGS, "features": 2}}
    _write_config(run_dir, config)
    record = read_run_record(run_dir)
    assert record.network.name == "LUNet"
    assert isinstance(record.network.build(), torch.nn.Module)


@pytest.mark.parametrize("field, value", [
    (("network", "args", "order"), "$__import__('pathlib').Path('PWNED').touch() or 'AND'"),
    (("network", "class"), "monai.bundle.run"),
    (("labels", "1"), "@network_def"),
    (("task",), "%configs/other.json#network_def"),
    (("optimizer", "defaults", "lr"), "$1e-3"),
])
def test_exports_stop_before_writing_anything(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              field: tuple, value: str) -> None:
    """The hostile-input pass's payloads, through the real CLI: exit code 2, no bundle, no side effect."""
    monkeypatch.chdir(tmp_path)
    config = _config(run_dir)
    _set(config, field, value)
    if field[-1] == "class":
        config["network"]["name"] = None
    _write_config(run_dir, config)
    assert medunet_main(["export-bundle", str(run_dir), str(tmp_path / "bundle"), "--no-memory"]) == 2
    assert medunet_main(["export-onnx", str(run_dir), str(tmp_path / "model.onnx")]) == 2
    assert not (tmp_path / MARKER).exists()
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "model.onnx").exists()


class _Hostile:
    def __reduce__(self):  # unpickling this would run code
        return (Path(MARKER).touch, ())


def test_a_weights_file_that_would_run_code_is_refused(run_dir: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"model": _Hostile()}, run_dir / MODEL_FILE)
    with pytest.raises(MedunetError, match="not a readable weights file"):
        load_trained_network(run_dir)
    assert not (tmp_path / MARKER).exists()


def test_weights_that_do_not_fit_the_record_are_refused(run_dir: Path) -> None:
    atomic_torch_save({"model": create_network(NETWORK, **{**ARGS, "out_channels": 5}).state_dict()},
                      run_dir / MODEL_FILE)
    with pytest.raises(MedunetError, match="does not fit the network"):
        load_trained_network(run_dir)


def test_paths_are_recorded_as_they_read_on_any_machine_with_the_same_layout(tmp_path: Path) -> None:
    from medunet.paths import REPO_ROOT, portable_path, resolve_portable

    beside = REPO_ROOT.parent / "shared" / "data" / "Task04_Hippocampus"
    assert portable_path(beside) == "../shared/data/Task04_Hippocampus"
    assert portable_path(REPO_ROOT / "data_lists" / "x.json") == "data_lists/x.json"
    assert portable_path(tmp_path / "task") == str((tmp_path / "task").resolve())  # elsewhere: absolute
    for path in (beside, tmp_path / "task"):
        assert resolve_portable(portable_path(path)) == path.resolve()
    record = RunRecord.from_dict({**_record().to_dict(), "dataset_dir": "../shared/data/Task04_Hippocampus"})
    assert record.dataset_path == beside.resolve()


# -- metrics.json: what the bench scores, the bundle card states and tracking logs --------------------------
def _metrics() -> dict[str, Any]:
    """A record as RunRecorder writes it: two epochs, validated at the second."""
    return {"best_metric": 0.62, "best_epoch": 2, "key_metric": "val_mean_dice", "finished": True,
            "stop_reason": "max_epochs reached", "lost_classes": [],
            "epochs": [{"epoch": 1, "train_loss": 1.2, "learning_rate": 0.001, "val_mean_dice": None,
                        "epoch_seconds": 3.5},
                       {"epoch": 2, "train_loss": 0.9, "learning_rate": 0.0005, "val_mean_dice": 0.62,
                        "val_dice_organ": 0.8, "val_dice_lesion": 0.44, "epoch_seconds": 3.4}]}


def _hostile(change: str) -> Any:
    metrics = _metrics()
    last = metrics["epochs"][-1]
    if change == "nan":
        last["val_mean_dice"] = float("nan")  # json.dumps writes NaN, json.loads reads it back
    elif change == "string":
        last["val_dice_lesion"] = "0.99"
    elif change == "out of range":
        last["val_mean_dice"] = 7.5
    elif change == "repeated epoch":
        last["epoch"] = 1
    elif change == "unknown best epoch":
        metrics["best_epoch"] = 9
    elif change == "not a row":
        metrics["epochs"][0] = [1, 2]
    elif change == "no epochs":
        metrics = [metrics]
    elif change == "lost classes text":
        metrics["lost_classes"] = "lesion"
    return metrics


HOSTILE_METRICS = {"nan": r"val_mean_dice must be a finite number, got nan",
                   "string": r"val_dice_lesion must be a finite number, got '0.99'",
                   "out of range": r"val_mean_dice is 7.5: a Dice lies in \[0, 1\]",
                   "repeated epoch": r"epochs\[1\]\.epoch must be an integer >= 2, got 1",
                   "unknown best epoch": "best_epoch 9 is not a recorded epoch",
                   "not a row": r"epochs\[0\] is a list, not an epoch row",
                   "no epochs": "is not a metrics record",
                   "lost classes text": "lost_classes must be a list of class names"}


@pytest.mark.parametrize("change", HOSTILE_METRICS)
def test_a_metrics_record_with_a_nan_a_string_or_a_gap_is_refused_not_scored(run_dir: Path, change: str) -> None:
    from medunet.bench.accuracy import accuracy_row
    from medunet.run_folder import read_metrics_record

    (run_dir / "metrics.json").write_text(json.dumps(_metrics()), encoding="utf-8")
    assert read_metrics_record(run_dir) == _metrics() and accuracy_row(run_dir)["mean_dice"] == 0.62
    (run_dir / "metrics.json").write_text(json.dumps(_hostile(change)), encoding="utf-8")
    for reader in (read_metrics_record, accuracy_row):
        with pytest.raises(MedunetError, match=HOSTILE_METRICS[change]) as error:
            reader(run_dir)
        assert str(run_dir / "metrics.json") in str(error.value) and "Fix:" in str(error.value)


def test_bundle_export_and_tracking_refuse_a_nan_metrics_record_and_write_nothing(run_dir: Path, tmp_path: Path,
                                                                                   capsys) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(_hostile("nan")), encoding="utf-8")
    store = tmp_path / "mlruns.db"
    assert medunet_main(["export-bundle", str(run_dir), str(tmp_path / "bundle"), "--no-memory"]) == 2
    assert medunet_main(["track", str(run_dir), "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert capsys.readouterr().err.count("val_mean_dice must be a finite number, got nan") == 2
    assert not (tmp_path / "bundle").exists()
    if store.exists():  # refused before an MLflow run was started
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{store}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.parametrize("name, content, message", [
    ("profile.json", "[1]", r"profile\.json \(the model facts of the run\) is a JSON list, not an object"),
    ("profile.json", '{"params": [1]}', r"profile\.json: 'params' is not an object"),
])
def test_tracking_refuses_a_malformed_profile_before_starting_a_run(run_dir: Path, tmp_path: Path, capsys,
                                                                    name: str, content: str, message: str) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(_metrics()), encoding="utf-8")
    (run_dir / name).write_text(content, encoding="utf-8")
    store = tmp_path / "mlruns.db"
    assert medunet_main(["track", str(run_dir), "--tracking-uri", f"sqlite:///{store}"]) == 2
    assert re.search(message, capsys.readouterr().err)
    if store.exists():
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{store}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_the_bench_refuses_a_workflow_record_that_is_not_an_object(run_dir: Path) -> None:
    from medunet.bench.accuracy import CPU_RECIPE, _check_same_recipe

    (run_dir / "workflow.json").write_text("[1]", encoding="utf-8")
    with pytest.raises(MedunetError, match=r"workflow\.json \(the workflow the run was trained with\) is a JSON list"):
        _check_same_recipe(run_dir, dict(CPU_RECIPE))
