"""``medunet demo``: synthetic MRI phantom task -> brief training -> inference on held-out cases -> evaluation and report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from medunet.data import load_fold, make_phantom_task, write_datalist
from medunet.engines.config import WORKFLOWS_DIR, build_overrides, run_workflow
from medunet.engines.inference import predict_run
from medunet.errors import MedunetError
from medunet.evaluation import evaluate_folders
from medunet.evaluation.provenance import file_sha256
from medunet.image_files import case_name
from medunet.run_folder import MODEL_FILE, PREDICTIONS_DIR, read_run_record
from medunet.tracking import Tracker, push_evaluation_folder

PHANTOM_DATALIST = "folds.json"
#: The demo's task folder inside ``--out`` (``runs/demo/Task91_PhantomMRI``), made once and reused.
PHANTOM_TASK = "Task91_PhantomMRI"


def prepare_phantom(
    task_dir: str | Path, num_cases: int = 10, kind: str = "mri", size: tuple[int, int, int] = (48, 48, 32),
    seed: int = 0, generate: bool = True,
) -> Path:
    """Write the 5-fold datalist ``TASK_DIR/folds.json`` unless it exists, and the phantom task itself when
    ``generate`` and the folder has no ``dataset.json``; return the datalist.

    The phantom workflow calls this with its ``generate_phantom`` key (false unless ``medunet demo`` or the
    user sets it), so a mistyped ``--data-root`` is an error rather than a new synthetic task.

    Args:
        task_dir: the task folder (e.g. ``runs/demo/Task91_PhantomMRI``).
        num_cases: labelled cases (5 folds: with 10 cases, 8 train and 2 validate).
        kind: ``"ct"`` or ``"mri"``.
        size: voxels per axis.
        seed: phantom seed.
        generate: write a phantom task when ``task_dir`` has no ``dataset.json`` (else that is an error).
    """
    task_dir = Path(task_dir)
    datalist = task_dir / PHANTOM_DATALIST
    if not (task_dir / "dataset.json").is_file():
        if not generate:
            raise MedunetError(
                f"data root {task_dir} has no dataset.json. Fix: point --data-root (dataset_dir) at an MSD task "
                "folder, or generate a phantom there with 'medunet make-phantom DIR --kind mri' (or set "
                "generate_phantom to true)."
            )
        make_phantom_task(task_dir, kind=kind, num_cases=num_cases, num_test=1, size=size, seed=seed)
    if not datalist.is_file():
        write_datalist(task_dir, out=datalist, num_folds=5, seed=seed)
    return datalist


def run_demo(
    out_dir: str | Path = "runs/demo",
    network: str | None = None,
    epochs: int | None = None,
    progress: bool = True,
    run_dir: str | Path | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Phantom -> train (``medunet/workflows/phantom_demo.json``) -> predict the held-out fold -> evaluate and report.

    Args:
        out_dir: everything goes here: ``Task91_PhantomMRI/`` (the data, generated once and reused) and ``run/``
            (the run folder).
        network: a registry name; default the workflow's.
        epochs: training epochs; default the workflow's.
        progress: show progress bars.
        run_dir: the run folder; default ``OUT_DIR/run``. Another one trains another network on the same data.
        settings: other workflow keys to override (e.g. ``epoch_length=2`` for a smoke test).

    Returns:
        ``{"training": <run summary>, "predictions": [...], "dice": {label name: mean Dice}, "report": path, ...}``.
    """
    out_dir = Path(out_dir)
    task_dir = out_dir / PHANTOM_TASK
    run_dir = Path(run_dir) if run_dir is not None else out_dir / "run"
    start = time.perf_counter()
    overrides = build_overrides(network=network, data_root=task_dir, run_dir=run_dir, epochs=epochs,
                                settings={"progress": progress, "generate_phantom": True, **settings})
    results = run_workflow(WORKFLOWS_DIR / "phantom_demo.json", overrides)
    training = next(r for r in results if isinstance(r, dict) and "run_dir" in r)

    _, held_out = load_fold(task_dir / PHANTOM_DATALIST, 0, task_dir)
    pred_dir = run_dir / PREDICTIONS_DIR
    inference_start = time.perf_counter()
    # overwrite: a rerun may have trained further, so its predictions are redone, not kept.
    predictions = predict_run(run_dir, [item["image"] for item in held_out], pred_dir, progress=progress,
                              overwrite=True)
    inference_seconds = time.perf_counter() - inference_start
    record = read_run_record(run_dir)
    checkpoint = run_dir / MODEL_FILE
    provenance = {
        "network": record.network.name,
        "parameters": record.network.parameters,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "data": f"{task_dir} (synthetic MRI phantom)",
        "fold": f"{record.fold} (held out from training)",
        "inferer": "SlidingWindowInferer, Gaussian, overlap 0.5",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "inference_runtime_s": round(inference_seconds, 2),
    }
    evaluation = evaluate_folders(pred_dir, task_dir / "labelsTr", run_dir / "evaluation",
                                  dataset_json=task_dir / "dataset.json", provenance=provenance,
                                  images_dir=task_dir / "imagesTr", workers=0,
                                  cases=[case_name(Path(item["label"])) for item in held_out],
                                  progress=progress, title="medunet demo: phantom MRI")
    with Tracker(settings.get("tracking_uri"), settings.get("experiment", "medunet"), run_name="demo-evaluation",
                 run_dir=run_dir / "evaluation", enabled=settings.get("tracking", True), tags={"kind": "evaluate"}) as tracker:
        tracker.log_params({"network": {"name": record.network.name}, "fold": record.fold, "data": str(task_dir)})
        push_evaluation_folder(run_dir / "evaluation", tracker)
    dice = {name: evaluation.mean("dice", label=value) for value, name in evaluation.labels.items() if value != 0}
    summary = {
        "training": training,
        "predictions": [str(p) for p in predictions],
        "dice": dice,
        "report": str(evaluation.files.get("report_html", run_dir / "evaluation")),
        "files": {key: str(value) for key, value in evaluation.files.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(f"\nmedunet demo finished in {summary['seconds']:.0f} s")
    print(f"  data:        {task_dir}")
    print(f"  run folder:  {run_dir} (config.json, models/model.pt, metrics.csv)")
    print(f"  predictions: {pred_dir} ({len(predictions)} held-out case(s))")
    print(f"  evaluation:  {run_dir / 'evaluation'} (cases.csv, summary.json, report.html, report.pdf)")
    print("  Dice on held-out cases: " + ", ".join(f"{name} {score:.3f}" for name, score in dice.items()))
    return summary
