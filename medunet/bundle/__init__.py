"""MONAI bundle integration: export a trained run as a bundle, check bundle metadata, export ONNX.

- :func:`export_bundle` (``medunet export-bundle RUN_DIR OUT_DIR``): configs, weights, TorchScript, model card;
- :func:`check_metadata` / :func:`validate_metadata`: the MONAI Bundle specification's required fields, offline;
- :func:`export_onnx` (``medunet export-onnx``): any network to ONNX, checked with onnxruntime (optional extra).

Any medunet network also plugs into an existing bundle with no code here: override its ``network_def`` with
``{"_target_": "medunet.networks.create_network", "name": ...}`` (see the README).
"""

from medunet.bundle.configs import bundle_configs, preprocessing_config
from medunet.bundle.export import export_bundle, measure_efficiency
from medunet.bundle.metadata import (
    REQUIRED_METADATA_KEYS,
    REQUIRED_TENSOR_KEYS,
    build_metadata,
    check_metadata,
    metadata_schema,
    validate_metadata,
    write_metadata_schema,
)
from medunet.bundle.run import TrainedRun, read_run

__all__ = [
    "REQUIRED_METADATA_KEYS",
    "REQUIRED_TENSOR_KEYS",
    "TrainedRun",
    "build_metadata",
    "bundle_configs",
    "check_metadata",
    "export_bundle",
    "measure_efficiency",
    "metadata_schema",
    "preprocessing_config",
    "read_run",
    "validate_metadata",
    "write_metadata_schema",
]
