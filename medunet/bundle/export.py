"""``medunet export-bundle RUN_DIR OUT_DIR``: a trained run as a complete MONAI bundle.

The bundle (model-zoo layout, MONAI Bundle specification)::

    OUT_DIR/
      configs/metadata.json    every required field, label classes, versions, eval metrics and an
                               ``efficiency`` section: parameters, multiply-adds, peak inference memory at the ROI
      configs/inference.json   sliding-window inference on a folder of images -> label maps in each input's space
      configs/train.json       training on an MSD task folder (MONAI SupervisedTrainer)
      configs/evaluate.json    validation of models/model.pt, merged over train.json
      models/model.pt          ``{"model": state_dict}``
      models/model.ts          TorchScript, written by MONAI's own ``ckpt_export`` (metadata and inference.json inside)
      docs/README.md           model card: data, metrics, efficiency, intended use, commands
      LICENSE

After export it is checked: the metadata against the specification's fields, and the TorchScript model
against the PyTorch one on a random ROI-sized input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from medunet.atomic import atomic_folder
from medunet.bundle.card import DEFAULT_LICENSE, model_card
from medunet.bundle.configs import CONFIG_NAMES, bundle_configs
from medunet.bundle.metadata import build_metadata, validate_metadata
from medunet.bundle.run import MODEL_FILE, TrainedRun, read_metrics, read_run
from medunet.errors import MedunetError
from medunet.profiling import profile
from medunet.run_folder import check_literal

MIB = 2**20


def measure_efficiency(run: TrainedRun, network: torch.nn.Module, memory: bool = True) -> dict[str, Any]:
    """Size, multiply-adds, latency and measured peak inference memory of one ROI-sized forward pass.

    Args:
        run: the trained run (channels and ROI).
        network: the network to measure.
        memory: measure peak memory (a fresh process on the CPU, a few seconds); False leaves it null.
    """
    shape = (1, run.preset.in_channels, *run.roi_size)
    result = profile(network, shape, train=False, memory=memory, repeats=1, name=run.network_name)
    peak = result.peak_infer_bytes
    return {
        "parameters": int(result.params),
        "size_mb": round(result.size_mb, 3),
        "multiply_adds": int(result.macs),
        "input_shape": list(shape),
        "peak_inference_memory_bytes": int(peak) if peak is not None else None,
        "peak_inference_memory_mib": round(peak / MIB, 1) if peak is not None else None,
        "memory_method": result.memory_method or None,
        "skip_memory_bytes": int(result.skip_bytes),
        "latency_ms": round(result.latency_ms, 1),
        "device": result.device,
        "torch_threads": torch.get_num_threads(),
        "measured_with": "medunet.profiling.profile",
    }


def _write_json(content: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def _export_torchscript(run: TrainedRun, out_dir: Path) -> Path:
    """``models/model.ts`` through MONAI's ``ckpt_export`` (as ``python -m monai.bundle ckpt_export`` does)."""
    from monai.bundle import ckpt_export

    target = out_dir / "models" / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(target),
        ckpt_file=str(out_dir / MODEL_FILE),
        meta_file=str(out_dir / "configs" / "metadata.json"),
        config_file=str(out_dir / "configs" / "inference.json"),
        key_in_ckpt="model",
        use_trace=not run.scriptable,  # traced networks are fixed to the ROI shape
        input_shape=[1, run.preset.in_channels, *run.roi_size],
        bundle_root=str(out_dir),
    )
    return target


def _check_torchscript(network: torch.nn.Module, script_file: Path, run: TrainedRun) -> float:
    """Largest absolute difference between the TorchScript and PyTorch outputs on a random ROI input."""
    scripted = torch.jit.load(str(script_file), map_location="cpu")
    x = torch.rand(1, run.preset.in_channels, *run.roi_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (scripted(x) - network.eval()(x)).abs().max().item()
    if difference > 1e-3:
        raise MedunetError(
            f"{script_file} differs from the PyTorch network by {difference:.2e} on a random input. "
            "Fix: report this network; export without TorchScript is not offered because the bundle would be wrong."
        )
    return difference


def export_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    name: str | None = None,
    version: str = "0.1.0",
    authors: str = "medunet user",
    copyright: str | None = None,
    license_file: str | Path | None = None,
    intended_use: str | None = None,
    dataset_dir: str = "/workspace/data",
    memory: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write a complete MONAI bundle for the run in ``run_dir`` (layout in the module docstring).

    Args:
        run_dir: a run folder of ``medunet train`` (``config.json``, ``models/model.pt``).
        out_dir: the bundle folder to create; conventionally named after the model.
        name: display name in ``metadata.json``; default from the task and network.
        version: bundle version.
        authors: ``metadata.json`` authors.
        copyright: copyright line; default ``"Copyright (c) <authors>"``.
        license_file: a file copied to ``LICENSE``; default an Apache-2.0 notice.
        intended_use: intended-use statement for the metadata and model card.
        dataset_dir: the default ``dataset_dir`` in the configs.
        memory: measure peak inference memory (a few seconds in a fresh process).
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir``.

    Example::

        export_bundle("runs/spleen_lunet", "bundles/spleen_ct_lunet_small_8f")
    """
    run = read_run(run_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise MedunetError(f"{out_dir} exists and is not empty. Fix: pass another OUT_DIR, or --force to replace it.")
    if license_file is not None and not Path(license_file).is_file():
        raise MedunetError(f"license file {license_file} does not exist. Fix: pass an existing file or leave it out.")

    network = run.load_network()

    efficiency = measure_efficiency(run, network, memory=memory)
    metrics = read_metrics(run)
    name = name or f"{run.preset.name} {run.network_name}"
    metadata = build_metadata(run, efficiency, metrics, name=name, version=version, authors=authors,
                              copyright=copyright, intended_use=intended_use)
    configs = bundle_configs(run, dataset_dir=dataset_dir)
    # Defence in depth: the metadata is built from plain data only, so it must hold no expression or reference
    # (MONAI's ConfigParser reads it beside the configs).
    check_literal(metadata, "the bundle's metadata.json")

    # Built in a temporary folder that replaces out_dir only once complete and checked (--force included): a failed
    # or killed export leaves the previous bundle, never half of a new one.
    with atomic_folder(out_dir) as bundle:
        _write_json(metadata, bundle / "configs" / "metadata.json")
        for config_name, config in configs.items():
            _write_json(config, bundle / "configs" / f"{config_name}.json")
        (bundle / "models").mkdir(parents=True, exist_ok=True)
        torch.save({"model": network.state_dict()}, bundle / MODEL_FILE)
        (bundle / "docs").mkdir(parents=True, exist_ok=True)
        (bundle / "docs" / "README.md").write_text(model_card(run, metadata), encoding="utf-8")
        if license_file is not None:
            shutil.copyfile(license_file, bundle / "LICENSE")
        else:
            (bundle / "LICENSE").write_text(DEFAULT_LICENSE.format(copyright=metadata["copyright"]), encoding="utf-8")

        validate_metadata(bundle / "configs" / "metadata.json")
        _check_torchscript(network, _export_torchscript(run, bundle), run)
    return out_dir


__all__ = ["CONFIG_NAMES", "export_bundle", "measure_efficiency"]
