"""``configs/metadata.json`` of a MONAI bundle: build it from a run, check it against the MONAI Bundle specification.

The required fields are written out below from the specification's "metadata.json File" section
(https://docs.monai.io/en/latest/mb_specification.html, source ``docs/source/mb_specification.rst`` in
Project-MONAI/MONAI). MONAI's own ``verify_metadata`` downloads a JSON schema from GitHub, which cannot work
offline; :func:`check_metadata` checks the specification's field list with no network, and
:func:`validate_metadata` also runs ``verify_metadata`` when a schema file is at hand (for example
:func:`write_metadata_schema`'s, or MONAI's downloaded once by the user).

Beyond the specification, medunet writes an ``efficiency`` section that model-zoo bundles lack (parameters,
multiply-adds, measured peak inference memory at the bundle's ROI), which any JSON reader can use to pick a
network for a small device.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medunet.errors import MedunetError

if TYPE_CHECKING:
    from medunet.bundle.run import TrainedRun

SPECIFICATION_URL = "https://docs.monai.io/en/latest/mb_specification.html"
# The schema the current model-zoo bundles name; written into "schema" for tools that download it.
SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)

# MONAI Bundle specification, section "metadata.json File": "The mandatory keys are as follows".
REQUIRED_METADATA_KEYS: tuple[str, ...] = (
    "version",  # version of the stored model
    "monai_version",  # MONAI the bundle was generated on
    "pytorch_version",  # PyTorch the bundle was generated on
    "numpy_version",  # NumPy the bundle was generated on
    "optional_packages_version",  # package name -> minimum version (renamed, see RENAMED_METADATA_KEYS)
    "task",  # plain-language description of what the model is meant to do
    "description",  # longer plain-language description
    "authors",  # author(s) of the model
    "copyright",  # model copyright
    "network_data_format",  # {"inputs": {...}, "outputs": {...}} of tensor format specifiers
)

# MONAI >= 1.2 reads ``optional_packages_version`` as ``required_packages_version`` and warns about the old name
# (``monai.bundle.utils.DEPRECATED_ID_MAPPING``); model-zoo bundles now write the new name. Either satisfies the key.
RENAMED_METADATA_KEYS: dict[str, str] = {"optional_packages_version": "required_packages_version"}

# Same section: "Tensor format specifiers ... must be a dictionary containing at least these keys".
REQUIRED_TENSOR_KEYS: tuple[str, ...] = (
    "type",  # "image", "series", "tuples", "probabilities"
    "format",  # "magnitude", "hounsfield", "labels", "segmentation", ...
    "modality",  # "MR", "CT", ... ("n/a" by default)
    "num_channels",  # channels, channel dimension first
    "spatial_shape",  # [H, W, D] of ints or expressions such as "*" or "16*n"
    "dtype",  # e.g. "float32"
    "value_range",  # [MIN, MAX] or [] if unknown
    "is_patch_data",  # whether the tensor is a patch of the image
    "channel_def",  # channel index -> plain-language meaning
)

# ``python -m monai.bundle verify_net_in_out`` and ``ckpt_export`` read these two names
# (``monai.bundle.scripts._get_net_io_info``): a bundle without them cannot be checked by MONAI's tools.
MONAI_TOOL_INPUT = "image"
MONAI_TOOL_OUTPUT = "pred"


def _tensor_problems(where: str, spec: Any) -> list[str]:
    if not isinstance(spec, Mapping):
        return [f"{where} must be an object of tensor format keys {list(REQUIRED_TENSOR_KEYS)}"]
    problems = [f"{where} lacks '{key}'" for key in REQUIRED_TENSOR_KEYS if key not in spec]
    channels = spec.get("num_channels")
    if "num_channels" in spec and (not isinstance(channels, int) or isinstance(channels, bool) or channels < 1):
        problems.append(f"{where}.num_channels must be a positive integer, got {channels!r}")
    shape = spec.get("spatial_shape")
    if "spatial_shape" in spec and (
        not isinstance(shape, list) or not 1 <= len(shape) <= 3
        or not all(isinstance(s, str) or (isinstance(s, int) and s > 0) for s in shape)
    ):
        problems.append(f"{where}.spatial_shape must be a list of 1 to 3 positive ints or expressions, got {shape!r}")
    value_range = spec.get("value_range")
    if "value_range" in spec and (not isinstance(value_range, list) or len(value_range) not in (0, 2)):
        problems.append(f"{where}.value_range must be [MIN, MAX] or [], got {value_range!r}")
    if "is_patch_data" in spec and not isinstance(spec["is_patch_data"], bool):
        problems.append(f"{where}.is_patch_data must be true or false, got {spec['is_patch_data']!r}")
    if "dtype" in spec and not isinstance(spec["dtype"], str):
        problems.append(f"{where}.dtype must be a string such as 'float32', got {spec['dtype']!r}")
    channel_def = spec.get("channel_def")
    if "channel_def" in spec and not isinstance(channel_def, Mapping):
        problems.append(f"{where}.channel_def must map channel index to meaning, got {channel_def!r}")
    elif isinstance(channel_def, Mapping) and isinstance(channels, int) and spec.get("format") == "labels" \
            and len(channel_def) != channels:
        problems.append(f"{where}.channel_def names {len(channel_def)} channels but num_channels is {channels}")
    return problems


def check_metadata(metadata: Mapping[str, Any]) -> list[str]:
    """Problems of a ``metadata.json`` content against the MONAI Bundle specification's required fields.

    Checks every mandatory key (:data:`REQUIRED_METADATA_KEYS`, accepting MONAI's newer name for
    ``optional_packages_version``), the tensor format keys (:data:`REQUIRED_TENSOR_KEYS`) of every input and
    output, and that the input ``image`` and output ``pred`` that MONAI's ``verify_net_in_out`` reads exist.

    Args:
        metadata: the parsed JSON.

    Returns:
        one sentence per problem; empty when the metadata is valid.
    """
    problems = []
    for key in REQUIRED_METADATA_KEYS:
        if key not in metadata and RENAMED_METADATA_KEYS.get(key) not in metadata:
            newer = f" (or '{RENAMED_METADATA_KEYS[key]}')" if key in RENAMED_METADATA_KEYS else ""
            problems.append(f"missing required key '{key}'{newer}")
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors",
                "copyright"):
        if key in metadata and not (isinstance(metadata[key], str) and metadata[key].strip()):
            problems.append(f"'{key}' must be a non-empty string, got {metadata[key]!r}")
    for key in ("optional_packages_version", "required_packages_version"):
        if key in metadata and not isinstance(metadata[key], Mapping):
            problems.append(f"'{key}' must map package names to versions, got {metadata[key]!r}")
    data_format = metadata.get("network_data_format")
    if data_format is None:
        return problems
    if not isinstance(data_format, Mapping):
        return problems + ["'network_data_format' must be an object with 'inputs' and 'outputs'"]
    for side, tool_name in (("inputs", MONAI_TOOL_INPUT), ("outputs", MONAI_TOOL_OUTPUT)):
        tensors = data_format.get(side)
        if not isinstance(tensors, Mapping) or not tensors:
            problems.append(f"'network_data_format.{side}' must name at least one tensor")
            continue
        for name, spec in tensors.items():
            problems += _tensor_problems(f"network_data_format.{side}.{name}", spec)
        if tool_name not in tensors:
            problems.append(f"'network_data_format.{side}' has no '{tool_name}', which MONAI's verify_net_in_out reads")
    return problems


def load_metadata(path: str | Path) -> dict[str, Any]:
    """Read a ``metadata.json``; a missing or broken file raises :class:`MedunetError` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedunetError(f"{path} does not exist. Fix: point at a bundle's configs/metadata.json.") from None
    except json.JSONDecodeError as error:
        raise MedunetError(f"{path} is not valid JSON ({error}). Fix: repair the file.") from None


def metadata_schema() -> dict[str, Any]:
    """A JSON schema (draft 7) of the specification's required fields, for MONAI's ``verify_metadata`` offline.

    It encodes :data:`REQUIRED_METADATA_KEYS` and :data:`REQUIRED_TENSOR_KEYS`, nothing more: use MONAI's published
    schema (``SCHEMA_URL``) where it can be downloaded.
    """
    tensor = {
        "type": "object",
        "required": list(REQUIRED_TENSOR_KEYS),
        "properties": {
            "num_channels": {"type": "integer", "minimum": 1},
            "spatial_shape": {"type": "array", "minItems": 1, "maxItems": 3,
                              "items": {"type": ["integer", "string"]}},
            "dtype": {"type": "string"},
            "value_range": {"type": "array"},
            "is_patch_data": {"type": "boolean"},
            "channel_def": {"type": "object"},
        },
    }
    tensors = {"type": "object", "minProperties": 1, "additionalProperties": tensor}
    required = [key for key in REQUIRED_METADATA_KEYS if key not in RENAMED_METADATA_KEYS]
    strings = ("version", "monai_version", "pytorch_version", "numpy_version", "task", "description", "authors",
               "copyright")
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "MONAI bundle metadata: the required fields of the MONAI Bundle specification",
        "type": "object",
        "required": required,
        "anyOf": [{"required": [old]} for old in RENAMED_METADATA_KEYS]
        + [{"required": [new]} for new in RENAMED_METADATA_KEYS.values()],
        "properties": {
            **{key: {"type": "string", "minLength": 1} for key in strings},
            "optional_packages_version": {"type": "object"},
            "required_packages_version": {"type": "object"},
            "network_data_format": {
                "type": "object",
                "required": ["inputs", "outputs"],
                "properties": {"inputs": tensors, "outputs": tensors},
            },
        },
    }


def write_metadata_schema(path: str | Path) -> Path:
    """Write :func:`metadata_schema` to ``path`` (to pass as ``verify_metadata``'s ``filepath``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metadata_schema(), indent=2) + "\n", encoding="utf-8")
    return path


def validate_metadata(path: str | Path, schema_file: str | Path | None = None) -> dict[str, Any]:
    """Check a bundle's ``metadata.json`` against the specification's fields; return its content.

    Args:
        path: the ``metadata.json`` file.
        schema_file: a JSON schema file already on disk; when given, MONAI's ``verify_metadata`` also validates
            against it (it needs ``jsonschema``; it downloads nothing because the file exists).

    Raises:
        MedunetError: naming the file and every problem.
    """
    metadata = load_metadata(path)
    problems = check_metadata(metadata)
    if problems:
        listed = "\n  - ".join(problems)
        raise MedunetError(
            f"{path} does not meet the MONAI Bundle specification ({SPECIFICATION_URL}):\n  - {listed}\n"
            "Fix: add or correct these keys (medunet export-bundle writes them all)."
        )
    if schema_file is not None:
        schema_file = Path(schema_file)
        if not schema_file.is_file():
            raise MedunetError(f"schema file {schema_file} does not exist. Fix: pass an existing JSON schema file.")
        from monai.bundle import verify_metadata

        try:
            verify_metadata(meta_file=str(path), filepath=str(schema_file))
        except ValueError as error:
            raise MedunetError(f"{path} fails the schema {schema_file}: {error}") from None
    return metadata


def tensor_format(
    kind: str,
    num_channels: int,
    spatial_shape: Sequence[int | str],
    channel_def: Mapping[int | str, str],
    modality: str = "n/a",
    value_range: Sequence[float] = (),
    dtype: str = "float32",
    is_patch_data: bool = True,
    type_: str = "image",
) -> dict[str, Any]:
    """One tensor format specifier with every key the specification requires.

    Args:
        kind: the ``format`` (``"hounsfield"``, ``"magnitude"``, ``"labels"``...).
        num_channels: channels.
        spatial_shape: spatial sizes or expressions.
        channel_def: channel index -> meaning.
        modality: ``"CT"``, ``"MR"``... or ``"n/a"``.
        value_range: ``(min, max)`` or empty if unknown.
        dtype: tensor dtype name.
        is_patch_data: whether the network sees patches (sliding window) rather than whole images.
        type_: the ``type`` (``"image"`` for spatial data).
    """
    return {
        "type": type_,
        "format": kind,
        "modality": modality,
        "num_channels": int(num_channels),
        "spatial_shape": list(spatial_shape),
        "dtype": dtype,
        "value_range": list(value_range),
        "is_patch_data": bool(is_patch_data),
        "channel_def": {str(index): name for index, name in channel_def.items()},
    }


def _versions() -> dict[str, str]:
    import monai
    import numpy
    import torch

    return {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__,
    }


def _package_versions(names: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def build_metadata(
    run: TrainedRun,
    efficiency: Mapping[str, Any],
    eval_metrics: Mapping[str, Any],
    name: str,
    version: str = "0.1.0",
    authors: str = "medunet user",
    copyright: str | None = None,
    intended_use: str | None = None,
) -> dict[str, Any]:
    """``metadata.json`` for a bundle exported from ``run``, with every field the specification requires.

    Args:
        run: the trained run (network, labels, preset, ROI).
        efficiency: the ``efficiency`` section (see :func:`medunet.bundle.export.measure_efficiency`).
        eval_metrics: quality figures (``mean_dice``, ``dice_<label>``..., ``source``).
        name: the bundle's display name.
        version: the bundle version.
        authors: who trained the model.
        copyright: copyright line; default ``"Copyright (c) <authors>"``.
        intended_use: intended-use statement; default: research, not for clinical use.
    """
    import medunet

    preset = run.preset
    labels = run.labels
    roi = list(run.roi_size)
    foreground = ", ".join(label for value, label in sorted(labels.items()) if value != 0)
    if preset.is_ct:
        low, high = preset.ct_window
        image_classes = f"{preset.in_channels} channel(s) of CT in HU, clipped to [{low:g}, {high:g}] and scaled to [0, 1]"
        image_format = tensor_format("hounsfield", preset.in_channels, roi, _channel_names(preset), "CT", (0, 1))
    else:
        image_classes = f"{preset.in_channels} channel(s) of MRI, z-scored over non-zero voxels per channel"
        image_format = tensor_format("magnitude", preset.in_channels, roi, _channel_names(preset), "MR")
    pred_format = tensor_format("labels", preset.out_channels, roi, labels)
    network = run.network_name or run.network_class
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: f"exported by medunet {medunet.__version__} from {run.run_dir.name}"},
        **_versions(),
        "required_packages_version": {
            "medunet": medunet.__version__,
            **_package_versions(("nibabel", "pytorch-ignite", "SimpleITK")),
        },
        "name": name,
        "task": f"{preset.name} segmentation ({foreground})",
        "description": (
            f"{network} ({efficiency.get('parameters', 0):,} parameters) for volumetric (3D) segmentation of "
            f"{foreground} in {preset.modality} ({preset.name}), trained with medunet on fold "
            f"{run.config.get('fold', '?')}; sliding-window inference on {'x'.join(map(str, roi))} patches."
        ),
        "authors": authors,
        "copyright": copyright or f"Copyright (c) {authors}",
        # The task and split, not the local path (model-zoo guidance: no personal paths in bundles).
        "data_source": f"{preset.name} (MSD layout): {run.config.get('num_train_cases', '?')} training and "
        f"{run.config.get('num_val_cases', '?')} validation cases, fold {run.config.get('fold', '?')}",
        "data_type": "nibabel",
        "image_classes": image_classes,
        "label_classes": "single channel labels: " + ", ".join(f"{v} {n}" for v, n in sorted(labels.items())),
        "pred_classes": f"{preset.out_channels} channels (logits), argmax gives the label: "
        + ", ".join(f"channel {v} {n}" for v, n in sorted(labels.items())),
        "eval_metrics": dict(eval_metrics),
        "intended_use": intended_use or "Research and benchmarking of efficient U-Nets; not for clinical use.",
        "references": list(REFERENCES),
        "network": {"name": run.network_name, "class": run.network_class, "args": run.network_args},
        "efficiency": dict(efficiency),
        "network_data_format": {"inputs": {"image": image_format}, "outputs": {"pred": pred_format}},
    }


REFERENCES = (
    "Simpson AL et al. A large annotated medical image dataset for the development and evaluation of "
    "segmentation algorithms. arXiv:1902.09063 (2019).",
    "Antonelli M et al. The Medical Segmentation Decathlon. Nat Commun 13, 4128 (2022).",
    "Cardoso MJ et al. MONAI: An open-source framework for deep learning in healthcare. arXiv:2211.02701 (2022).",
)


def _channel_names(preset: Any) -> dict[int, str]:
    if preset.in_channels == 1:
        return {0: "image"}
    return {index: f"channel {index}" for index in range(preset.in_channels)}
