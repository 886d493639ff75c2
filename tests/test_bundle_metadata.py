"""metadata.json against the MONAI Bundle specification's required fields, offline."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from medunet.bundle import (
    REQUIRED_METADATA_KEYS,
    REQUIRED_TENSOR_KEYS,
    check_metadata,
    metadata_schema,
    validate_metadata,
    write_metadata_schema,
)
from medunet.errors import MedunetError

TEST_BUNDLE_METADATA = Path(__file__).parent / "bundles" / "phantom_seg" / "configs" / "metadata.json"


@pytest.fixture
def metadata() -> dict:
    return json.loads(TEST_BUNDLE_METADATA.read_text(encoding="utf-8"))


def test_the_test_bundle_metadata_meets_the_specification(metadata: dict) -> None:
    assert check_metadata(metadata) == []


@pytest.mark.parametrize("key", [k for k in REQUIRED_METADATA_KEYS if k != "optional_packages_version"])
def test_each_missing_required_key_is_reported(metadata: dict, key: str) -> None:
    del metadata[key]
    assert any(f"'{key}'" in problem for problem in check_metadata(metadata))


def test_packages_version_is_accepted_under_either_name(metadata: dict) -> None:
    metadata["optional_packages_version"] = metadata.pop("required_packages_version")
    assert check_metadata(metadata) == []
    del metadata["optional_packages_version"]
    assert any("optional_packages_version" in problem for problem in check_metadata(metadata))


@pytest.mark.parametrize("key", REQUIRED_TENSOR_KEYS)
def test_each_missing_tensor_key_is_reported(metadata: dict, key: str) -> None:
    broken = copy.deepcopy(metadata)
    del broken["network_data_format"]["outputs"]["pred"][key]
    assert any(f"outputs.pred lacks '{key}'" in problem for problem in check_metadata(broken))


def test_malformed_tensor_values_are_reported(metadata: dict) -> None:
    image = metadata["network_data_format"]["inputs"]["image"]
    image.update(num_channels=0, spatial_shape=[32, -1, 32], value_range=[1], is_patch_data="true")
    problems = " ".join(check_metadata(metadata))
    for field in ("num_channels", "spatial_shape", "value_range", "is_patch_data"):
        assert f"inputs.image.{field}" in problems


def test_tensors_monai_tools_read_must_exist(metadata: dict) -> None:
    fmt = metadata["network_data_format"]
    fmt["outputs"]["seg"] = fmt["outputs"].pop("pred")
    assert any("verify_net_in_out" in problem for problem in check_metadata(metadata))


def test_validate_metadata_names_the_file_and_every_problem(tmp_path: Path, metadata: dict) -> None:
    del metadata["authors"], metadata["network_data_format"]["inputs"]["image"]["dtype"]
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(metadata), encoding="utf-8")
    with pytest.raises(MedunetError) as error:
        validate_metadata(path)
    message = str(error.value)
    assert str(path) in message and "'authors'" in message and "inputs.image lacks 'dtype'" in message


def test_schema_from_the_field_list_requires_every_field() -> None:
    schema = metadata_schema()
    assert set(schema["required"]) | {"optional_packages_version"} == set(REQUIRED_METADATA_KEYS)
    tensor = schema["properties"]["network_data_format"]["properties"]["inputs"]["additionalProperties"]
    assert tensor["required"] == list(REQUIRED_TENSOR_KEYS)


def test_monai_verify_metadata_runs_offline_with_a_schema_at_hand(tmp_path: Path, metadata: dict) -> None:
    pytest.importorskip("jsonschema")
    schema = write_metadata_schema(tmp_path / "schema.json")
    validate_metadata(TEST_BUNDLE_METADATA, schema_file=schema)  # MONAI's verify_metadata: file exists, no download
    del metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata), encoding="utf-8")
    from monai.bundle import verify_metadata

    with pytest.raises(ValueError, match="channel_def"):
        verify_metadata(meta_file=str(broken), filepath=str(schema))
