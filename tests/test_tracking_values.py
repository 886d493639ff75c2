"""Tracking without a store: URI resolution, MLflow-safe keys and values, profile names, CLI options."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from medunet.cli.common import add_tracking_arguments, tracker_from_args
from medunet.profiling import ProfileResult
from medunet.tracking import Tracker, resolve_tracking_uri
from medunet.tracking.stores import is_rejected_value, short_error
from medunet.tracking.values import clean_key, flatten_metrics, flatten_params


def test_tracking_uri_argument_beats_environment_beats_local_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path}/mlruns/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("http://127.0.0.1:6000") == "http://127.0.0.1:6000"


def test_paths_and_relative_sqlite_uris_become_absolute_sqlite_stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri("stores/team") == f"sqlite:///{tmp_path}/stores/team/mlruns.db"
    assert resolve_tracking_uri("runs.db") == f"sqlite:///{tmp_path}/runs.db"
    assert resolve_tracking_uri(f"file://{tmp_path}/old") == f"sqlite:///{tmp_path}/old/mlruns.db"
    assert resolve_tracking_uri("sqlite:///rel/x.db") == f"sqlite:///{tmp_path}/rel/x.db"


def test_nested_params_flatten_and_long_values_are_clipped_to_mlflow_limits():
    flat = flatten_params({"network": {"name": "lunet", "args": {"features": 8, "act": ("relu", {})}},
                           "data root": Path("/d"), "long": "y" * 7000, "empty": {}})
    assert flat["network.name"] == "lunet" and flat["network.args.features"] == "8"
    assert flat["network.args.act"] == '["relu",{}]' and flat["data root"] == "/d" and flat["empty"] == "{}"
    assert len(flat["long"]) == 6000 and flat["long"].endswith("...")
    assert clean_key("dice(left)#1") == "dice_left__1" and clean_key("/abs/../x") == "_abs_.._x"
    assert len(clean_key("k" * 300)) == 250


def test_metrics_flatten_nan_is_left_out_and_prefix_is_added_once():
    values, skipped = flatten_metrics(
        {"dice": 0.5, "val_mean_dice": np.float32(0.4), "hd95": float("nan"), "nested": {"a": 1}, "note": "text"},
        prefix="val")
    assert values == {"val_dice": 0.5, "val_mean_dice": pytest.approx(0.4), "val_nested_a": 1.0}
    assert skipped == ["val_note"]


def test_profile_facts_get_documented_names_in_mib():
    mib = 2**20
    result = ProfileResult("lunet_small_8f", (1, 1, 64, 64, 64), "cpu", params=1000, size_mb=0.5, macs=10**9,
                           skip_bytes=3 * mib, latency_ms=12.0, peak_infer_bytes=100 * mib,
                           peak_train_bytes=300 * mib, train_latency_ms=40.0)
    assert result.metrics() == {"model_params": 1000, "model_size_mb": 0.5, "model_macs": 1e9, "skip_memory_mb": 3.0,
                      "latency_ms": 12.0, "peak_infer_mb": 100.0, "peak_train_mb": 300.0, "train_latency_ms": 40.0}


def test_disabled_tracker_touches_no_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Tracker(enabled=False) as tracker:
        tracker.log_params({"a": 1})
        tracker.log_metrics({"b": 2.0}, step=1)
        tracker.log_artifact(__file__)
    assert tracker.run_id is None and tracker.describe() == "tracking disabled"
    assert not (tmp_path / "mlruns").exists()


def test_cli_options_build_the_tracker_they_describe(tmp_path):
    parser = argparse.ArgumentParser()
    add_tracking_arguments(parser)
    args = parser.parse_args(["--tracking-uri", "http://127.0.0.1:5001", "--experiment", "spleen"])
    tracker = tracker_from_args(args, tmp_path / "run_7")
    assert (tracker.tracking_uri, tracker.experiment, tracker.run_name, tracker.enabled) == (
        "http://127.0.0.1:5001", "spleen", "run_7", True)
    assert not tracker_from_args(parser.parse_args(["--no-tracking"]), tmp_path).enabled


def test_store_failures_are_told_apart_from_refused_values():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    assert is_rejected_value(MlflowException("changed param", error_code=INVALID_PARAMETER_VALUE))
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as cause:
            raise MlflowException("API request failed") from cause
    except MlflowException as error:
        assert not is_rejected_value(error)
        assert short_error(error) == "[Errno 111] Connection refused"
