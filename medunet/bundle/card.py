"""``docs/README.md`` of an exported bundle: a model card (data, metrics, efficiency, intended use, commands)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from medunet.bundle.run import TrainedRun

DEFAULT_LICENSE = """{copyright}

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of this bundle except in
compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is distributed on an
"AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the specific
language governing permissions and limitations under the License.

The weights were learned from the training data named in docs/README.md; that data's own licence (for the Medical
Segmentation Decathlon: CC-BY-SA 4.0) may bind uses of the model.
"""


def _rows(pairs: Mapping[str, Any]) -> str:
    return "\n".join(f"| {key} | {value} |" for key, value in pairs.items())


def _bytes(value: int | None) -> str:
    return "not measured" if value is None else f"{value / 2**20:.1f} MiB"


def model_card(run: TrainedRun, metadata: Mapping[str, Any]) -> str:
    """The bundle's ``docs/README.md`` in Markdown.

    Args:
        run: the trained run.
        metadata: the bundle's ``metadata.json`` content.
    """
    config, preset, efficiency = run.config, run.preset, metadata["efficiency"]
    metrics = {key: value for key, value in metadata.get("eval_metrics", {}).items() if key != "source"}
    source = metadata.get("eval_metrics", {}).get("source", "")
    roi = "x".join(map(str, run.roi_size))
    spacing = "native" if preset.target_spacing is None else " x ".join(f"{s:g}" for s in preset.target_spacing) + " mm"
    intensity = (f"CT window [{preset.ct_window[0]:g}, {preset.ct_window[1]:g}] HU scaled to [0, 1], crop to the body"
                 if preset.is_ct else "z-score over non-zero voxels per channel")
    quality = (_rows(metrics) if metrics else "| (none) | the run has no metrics.json or evaluation/summary.json |")
    network = run.network_name or run.network_class
    return f"""# {metadata["name"]}

{metadata["description"]}

## Intended use

{metadata["intended_use"]}

Outputs are label maps ({", ".join(f"{v} = {n}" for v, n in sorted(run.labels.items()))}) in the space of each
input image. They have not been validated for any clinical purpose.

## Model

| | |
|---|---|
{_rows({"network": f"`{network}`", "class": f"`{run.network_class}`", "arguments": f"`{run.network_args}`",
        "bundle version": metadata["version"], "MONAI / PyTorch": f"{metadata['monai_version']} / "
        f"{metadata['pytorch_version']}"})}

## Data

| | |
|---|---|
{_rows({"task": preset.name, "modality": preset.modality, "data": metadata["data_source"],
        "fold": config.get("fold", "?"), "training cases": config.get("num_train_cases", "?"),
        "validation cases": config.get("num_val_cases", "?"), "target spacing": spacing,
        "intensity": intensity, "training epochs": config.get("max_epochs", "?")})}

## Metrics

Source: {source or "none"}.

| metric | value |
|---|---|
{quality}

## Efficiency

Measured by `medunet.profiling.profile` on one {roi} patch (batch 1, {efficiency["device"]}):

| | |
|---|---|
{_rows({"parameters": f"{efficiency['parameters']:,}", "weights": f"{efficiency['size_mb']:.2f} MB",
        "multiply-adds per patch": f"{efficiency['multiply_adds'] / 1e9:.3f} G",
        "peak inference memory": f"{_bytes(efficiency['peak_inference_memory_bytes'])} "
        f"({efficiency['memory_method'] or 'n/a'})",
        "skip-connection memory": _bytes(efficiency["skip_memory_bytes"]),
        "latency per patch": f"{efficiency['latency_ms']} ms ({efficiency['torch_threads']} threads)"})}

## Use

Needs `pip install medunet` (for `network_def`) or only MONAI with `models/model.ts` (TorchScript).

```bash
# segment every *.nii.gz in a folder; label maps go to eval/<case>_seg.nii.gz
python -m monai.bundle run --config_file configs/inference.json --bundle_root . --dataset_dir /path/to/images
# train on an MSD task folder (dataset.json, imagesTr, labelsTr), then evaluate models/model.pt
python -m monai.bundle run --config_file configs/train.json --bundle_root . --dataset_dir /path/to/TaskXX
python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" --bundle_root . \\
    --dataset_dir /path/to/TaskXX
# check the network against metadata.json and re-export TorchScript
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json \\
    --config_file configs/inference.json
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.json --key_in_ckpt model
```

## References

{chr(10).join(f"- {reference}" for reference in metadata.get("references", []))}

## License

See `LICENSE`. {metadata["copyright"]}.
"""
