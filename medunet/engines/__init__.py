"""Workflows built from MONAI's ignite engines: training, sliding-window inference, torchrun, the demo.

Run folder layout (``RUN_DIR``), written by rank 0 only, read by tracking and bundle export::

    RUN_DIR/
      config.json                  resolved settings: task, dataset_dir, datalist, fold, network {name, class,
                                   args, parameters}, preset, optimizer, schedule, epochs, devices, versions
      workflow.json                the merged workflow config (``medunet train``): rerun it with
                                   ``python -m monai.bundle run --config_file RUN_DIR/workflow.json``
      models/model.pt              best validation mean Dice, ``{"model": state_dict}`` (MONAI bundle layout)
      models/model_last.pt         the last epoch, same layout
      checkpoints/checkpoint_last.pt  resume state: network, optimizer, lr_scheduler, trainer, run_state, ...
      metrics.csv, metrics.json    one row per epoch: train_loss, learning_rate, val_mean_dice,
                                   val_dice_<label>, epoch_seconds; metrics.json adds best_metric/best_epoch
                                   and lost_classes (those the best model scores below 0.01 Dice on)
      cache/                       PersistentDataset files when ``cache="disk"``
      predictions/<case>.nii.gz    ``medunet infer`` / the demo: label maps in each input's original space
      evaluation/                  ``evaluate_folders`` output: cases.csv, summary.json, report.html, report.pdf

Every file is written atomically (temporary file + ``os.replace``), so a killed run leaves only complete files.
"""

from medunet.engines.checkpoint import RunRecorder, atomic_torch_save, load_model_weights
from medunet.engines.config import build_overrides, load_workflow, run_workflow, workflow_for_task
from medunet.engines.distributed import DistContext, init_distributed
from medunet.engines.training import SegmentationTraining

__all__ = [
    "DistContext",
    "RunRecorder",
    "SegmentationTraining",
    "atomic_torch_save",
    "build_overrides",
    "init_distributed",
    "load_model_weights",
    "load_workflow",
    "run_workflow",
    "workflow_for_task",
]
