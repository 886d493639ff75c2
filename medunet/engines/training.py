"""The training builder: MONAI ``SupervisedTrainer`` + ``SupervisedEvaluator`` and handlers, from a workflow config.

:class:`SegmentationTraining` is what ``medunet/workflows/*.json`` instantiate (``"training": {"_target_":
"medunet.engines.SegmentationTraining", ...}``) and what ``"run": ["$@training.run()"]`` runs, so
``python -m monai.bundle run`` and ``medunet train`` execute the same code. :meth:`SegmentationTraining.build`
assembles:

- data: ``assert_task_ok`` first (broken data fails now, with the ``medunet check-data`` message), the fold
  from the k-fold datalist, the preset's transform chains, cached datasets, ``DistributedSampler`` under torchrun;
- ``SupervisedTrainer`` (AMP on CUDA) with ``ValidationHandler`` -> ``SupervisedEvaluator`` (sliding-window
  inference, ``MeanDice`` without background and its per-case details for per-label Dice),
  ``LrScheduleHandler``, ``EarlyStopHandler``, :class:`~medunet.engines.checkpoint.RunRecorder` (atomic best/last
  models, resume checkpoint, metrics table), an ignite ``ProgressBar``, ``StatsHandler`` and any
  ``extra_handlers`` (e.g. a tracking handler: anything with ``attach(engine)``);
- resume: when ``RUN_DIR/checkpoints/checkpoint_last.pt`` exists, MONAI's ``CheckpointLoader`` restores the
  network, optimizer, scheduler, AMP scaler, early-stop counter and trainer epoch, and training continues with
  the next epoch. A finished run is not trained again.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import monai
import torch
from ignite.engine import Events
from ignite.handlers import ProgressBar
from monai.data import DataLoader, DistributedSampler
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    CheckpointLoader,
    EarlyStopHandler,
    LrScheduleHandler,
    MeanDice,
    StatsHandler,
    ValidationHandler,
    from_engine,
    stopping_fn_from_metric,
)
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import AsDiscreted, Compose
from monai.utils import set_determinism

import medunet
from medunet.atomic import remove_stale_temporaries
from medunet.checks import check_choice, check_device, check_int, check_number, check_writable_dir
from medunet.data import (
    TaskPreset,
    assert_task_ok,
    build_dataset,
    load_fold,
    load_task,
    preset_for_task,
    train_transforms,
    val_transforms,
)
from medunet.data.transforms import AUGMENTATIONS
from medunet.engines.checkpoint import (
    KEY_METRIC,
    LOST_CLASS_DICE,
    MODEL_FILE,
    RESUME_FILE,
    RandomStreams,
    RunRecorder,
    atomic_write_text,
    checkpoint_epoch,
    lost_classes,
)
from medunet.engines.distributed import DistContext, barrier, init_distributed, wrap_ddp
from medunet.engines.guards import NonFiniteLossGuard
from medunet.engines.inference import TTA_MODES, ProbabilityAverage
from medunet.engines.losses import StackedDeepSupervisionLoss, deep_supervision_heads
from medunet.engines.run_lock import RunFolderLock
from medunet.environment import device_description
from medunet.errors import MedunetError
from medunet.paths import portable_path
from medunet.run_folder import (
    PROFILE_FILE,
    WORKFLOW_FILE,
    WORKFLOW_PATH_KEYS,
    NetworkRecord,
    RunRecord,
    Session,
    check_own_folders,
    is_run_folder,
    read_run_record,
    write_run_record,
)

logger = logging.getLogger("medunet.train")


def _first_loss(output: Any) -> float:
    """The loss of a (decollated) trainer output, for the progress bar."""
    return float(from_engine(["loss"], first=True)(output))


class SegmentationTraining:
    """Train a segmentation network on one fold of an MSD task, validating with sliding-window inference.

    Args:
        run_dir: the run folder (layout in :mod:`medunet.engines`); an existing run there is resumed.
        dataset_dir: the MSD task folder (``dataset.json``, ``imagesTr``, ``labelsTr``).
        datalist: the k-fold datalist JSON (``medunet make-datalist``).
        fold: the validation fold.
        network: the network to train (e.g. ``create_network("lunet_small_8f", ...)``).
        preset: preprocessing preset; default the task's (``preset_for_task``).
        network_name: registry name recorded in ``config.json`` (``None`` for a non-registry network).
        network_args: the keywords the network was built with, recorded in ``config.json``.
        loss: loss on (logits, label); default ``DiceCELoss(to_onehot_y=True, softmax=True)``. A network with
            deep-supervision heads (``deep_supervision=K``) gets it wrapped in
            :class:`~medunet.engines.losses.StackedDeepSupervisionLoss` (weights 1, 1/2, 1/4... per level).
        optimizer: an optimizer, or a callable ``params -> optimizer`` (a config's ``"_mode_": "callable"``);
            default AdamW, lr 1e-3.
        lr_scheduler: a scheduler, or a callable ``optimizer -> scheduler``, stepped once per epoch; None: constant.
        max_epochs: epochs to train.
        val_interval: validate every this many epochs.
        batch_size: images per batch (each gives ``num_samples`` patches).
        num_samples: random patches per image per iteration.
        epoch_length: iterations per epoch; default one pass over the training images.
        patch_size: training patch and sliding-window ROI; default the preset's.
        augment: the training augmentation (:func:`medunet.data.train_transforms`): ``"light"`` (default: flips,
            intensity scale/shift, half the patches on foreground), ``"nnunet"`` (nnU-Net's spatial and intensity
            augmentation, a third of the patches on foreground) or ``"none"``.
        cache: ``"memory"``, ``"disk"`` or ``"none"`` (see ``build_dataset``).
        num_workers: data-loader worker processes.
        sw_batch_size: windows per forward pass in sliding-window validation.
        sw_overlap: sliding-window overlap.
        val_tta: test-time mirroring in validation: None (default) or ``"flip"`` (every mirroring of each window,
            as ``medunet infer --tta flip``; 2**dims times the validation cost).
        early_stop_patience: stop after this many validations without improvement; 0 disables.
        amp: mixed precision (only used on CUDA).
        device: compute device; default ``cuda:LOCAL_RANK`` when available, else CPU.
        seed: random seed of the data sampling and augmentation (each rank adds its rank). The network's initial
            weights are drawn where it is built: ``create_network(..., seed=seed)`` (as the workflows do) makes them
            the same for the same seed too.
        resume: continue from ``RUN_DIR/checkpoints/checkpoint_last.pt`` when present.
        check_data: run ``assert_task_ok`` on the task and datalist before building anything.
        progress: show progress bars (rank 0).
        extra_handlers: more handlers attached to the trainer after the run's recorder (objects with
            ``attach(engine)``), e.g. :class:`medunet.tracking.RunFolderTracking` to mirror the run into MLflow.
        extra_val_handlers: more handlers attached to the evaluator.
        profile_memory: measure the peak memory for ``RUN_DIR/profile.json`` (the model facts at the training
            batch, written once when training starts; a few seconds in a fresh process).

    Example::

        training = SegmentationTraining("runs/demo", "data/Task90_PhantomCT", "data/Task90_PhantomCT/folds.json", 0,
                                        create_network("lunet_small_8f", in_channels=1, out_channels=3))
        summary = training.run()
    """

    def __init__(
        self,
        run_dir: str | Path,
        dataset_dir: str | Path,
        datalist: str | Path,
        fold: int,
        network: torch.nn.Module,
        preset: TaskPreset | None = None,
        network_name: str | None = None,
        network_args: dict[str, Any] | None = None,
        loss: Callable | None = None,
        optimizer: torch.optim.Optimizer | Callable | None = None,
        lr_scheduler: Any = None,
        max_epochs: int = 50,
        val_interval: int = 1,
        batch_size: int = 2,
        num_samples: int = 2,
        epoch_length: int | None = None,
        patch_size: Sequence[int] | None = None,
        augment: str = "light",
        cache: str = "memory",
        num_workers: int = 0,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        val_tta: str | None = None,
        early_stop_patience: int = 0,
        amp: bool = True,
        device: str | torch.device | None = None,
        seed: int = 0,
        resume: bool = True,
        check_data: bool = True,
        progress: bool = True,
        extra_handlers: Sequence[Any] = (),
        extra_val_handlers: Sequence[Any] = (),
        profile_memory: bool = True,
    ) -> None:
        # Every setting is checked here, before data or engines are built: a bad value fails at once with one line
        # naming the workflow key (set with --set KEY=VALUE), not after an epoch (sw_overlap) or inside torch.
        for key, value, minimum in (("max_epochs", max_epochs, 1), ("val_interval", val_interval, 1),
                                    ("batch_size", batch_size, 1), ("num_samples", num_samples, 1),
                                    ("sw_batch_size", sw_batch_size, 1), ("fold", fold, 0),
                                    ("num_workers", num_workers, 0), ("early_stop_patience", early_stop_patience, 0)):
            check_int(value, key, minimum, fix=f"Fix: --set {key}={max(minimum, 1)}, or edit the workflow file.")
        if epoch_length is not None:
            check_int(epoch_length, "epoch_length", 1, fix="Fix: --set epoch_length=50 (null: one pass over the data).")
        check_number(sw_overlap, "sw_overlap", 0.0, 1.0, fix="Fix: --set sw_overlap=0.25.")
        if val_tta is not None:
            check_choice(val_tta, "val_tta", [mode for mode in TTA_MODES if mode], fix="Fix: --set val_tta=flip (or null).")
        check_choice(cache, "cache", ("memory", "disk", "none"), fix="Fix: --set cache=memory (or disk, none).")
        check_choice(augment, "augment", AUGMENTATIONS, fix="Fix: --set augment=nnunet (or light, none).")
        if patch_size is not None:
            sizes = list(patch_size) if isinstance(patch_size, (list, tuple)) else [patch_size]
            if not sizes or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
                raise MedunetError(f"patch_size is {patch_size!r}; it must be a list of positive whole numbers, one "
                                   "per spatial axis. Fix: e.g. --set patch_size=[96,96,96].")
        check_device(device, "device")
        # The workflows pass the optimizer as a partial (``"_mode_": "callable"``) holding lr=@learning_rate.
        lr = optimizer.defaults.get("lr") if isinstance(optimizer, torch.optim.Optimizer) else (
            getattr(optimizer, "keywords", None) or {}).get("lr")
        if lr is not None and not isinstance(lr, torch.Tensor):
            check_number(lr, "learning_rate (the optimizer's lr)", 0.0, None, low_open=True,
                         fix="Fix: --set learning_rate=1e-3.")
        check_writable_dir(run_dir, "run_dir")  # a read-only or full disk fails now, not at the first checkpoint
        self.run_dir = Path(run_dir)
        self.dataset_dir = Path(dataset_dir)
        self.datalist = Path(datalist)
        self.fold = int(fold)
        self.network = network
        self.preset = preset
        self.network_name = network_name
        self.network_args = dict(network_args or {})
        self.loss = loss if loss is not None else DiceCELoss(to_onehot_y=True, softmax=True)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.max_epochs = int(max_epochs)
        self.val_interval = int(val_interval)
        self.batch_size = int(batch_size)
        self.num_samples = int(num_samples)
        self.epoch_length = epoch_length
        self.patch_size = tuple(patch_size) if patch_size is not None else None
        self.augment = augment
        self.cache = cache
        self.num_workers = int(num_workers)
        self.sw_batch_size = int(sw_batch_size)
        self.sw_overlap = float(sw_overlap)
        self.val_tta = val_tta
        self.early_stop_patience = int(early_stop_patience)
        self.amp = bool(amp)
        self.device = device
        self.seed = int(seed)
        self.resume = bool(resume)
        self.check_data = bool(check_data)
        self.progress = bool(progress)
        self.extra_handlers = list(extra_handlers)
        self.extra_val_handlers = list(extra_val_handlers)
        self.profile_memory = bool(profile_memory)
        self.trainer: SupervisedTrainer | None = None
        self.evaluator: SupervisedEvaluator | None = None
        self.recorder: RunRecorder | None = None
        self.context: DistContext | None = None
        self.resumed_from_epoch = 0
        self._lock = RunFolderLock(self.run_dir)  # held by the main process from build() to the end of run()
        self._fold_sizes = (0, 0)
        self._workflow: dict[str, Any] | None = None

    # -- building ---------------------------------------------------------------------------------------
    def _data(self, preset: TaskPreset, context: DistContext) -> tuple[DataLoader, DataLoader, int, int]:
        train, val = load_fold(self.datalist, self.fold, self.dataset_dir)
        if not val:
            raise MedunetError(f"fold {self.fold} of {self.datalist} has no validation cases. Fix: pick another fold.")
        train_ds = build_dataset(train, train_transforms(preset, num_samples=self.num_samples,
                                                                augment=self.augment), cache=self.cache,
                                 cache_dir=self.run_dir / "cache" / "train")
        val_ds = build_dataset(val, val_transforms(preset), cache=self.cache, cache_dir=self.run_dir / "cache" / "val")
        train_sampler = DistributedSampler(train_ds, shuffle=True) if context.is_distributed else None
        val_sampler = None
        if context.is_distributed:
            # Uneven shards keep each case once; fewer cases than ranks must repeat some to give every rank one.
            val_sampler = DistributedSampler(val_ds, shuffle=False, even_divisible=len(val) < context.world_size)
        train_loader = DataLoader(train_ds, batch_size=self.batch_size, shuffle=train_sampler is None,
                                  sampler=train_sampler, num_workers=self.num_workers, drop_last=False)
        val_loader = DataLoader(val_ds, batch_size=1, sampler=val_sampler, num_workers=self.num_workers)
        return train_loader, val_loader, len(train), len(val)

    def build(self) -> SegmentationTraining:
        """Check the data and assemble the engines and handlers (called by :meth:`run` if not done)."""
        context = self.context = init_distributed(self.device)
        if context.is_main:
            self._lock.acquire()  # before anything is read or written: one training at a time in a run folder
        try:
            return self._build(context)
        except BaseException:
            self._lock.release()
            raise

    def _build(self, context: DistContext) -> SegmentationTraining:
        check_own_folders(self.run_dir)  # a received run folder's models/ linked elsewhere is not written through
        self._check_same_run()
        set_determinism(seed=self.seed + context.rank)
        show = self.progress and context.is_main
        if self.check_data:
            assert_task_ok(self.dataset_dir, self.datalist, progress=show)
        preset = self.preset or preset_for_task(load_task(self.dataset_dir))
        if self.patch_size is not None:
            preset = replace(preset, patch_size=self.patch_size)
        self.preset = preset
        train_loader, val_loader, num_train, num_val = self._data(preset, context)

        network = self.network.to(context.device)
        model = wrap_ddp(network, context)
        optimizer = self.optimizer
        if optimizer is None:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-5)
        elif not isinstance(optimizer, torch.optim.Optimizer):
            optimizer = optimizer(model.parameters())
        scheduler = self.lr_scheduler
        if scheduler is not None and callable(scheduler) and not hasattr(scheduler, "step"):
            scheduler = scheduler(optimizer)
        self.optimizer, self.lr_scheduler = optimizer, scheduler
        amp = self.amp and context.device.type == "cuda"
        if deep_supervision_heads(network) and not isinstance(self.loss, StackedDeepSupervisionLoss):
            # In training mode the network returns (B, 1 + K, C, ...): main logits, then one per decoder level.
            self.loss = StackedDeepSupervisionLoss(self.loss, weight_mode="exp")
        labels = {value: name for value, name in preset.labels.items() if value != 0}
        out_channels = preset.out_channels

        evaluator = SupervisedEvaluator(
            device=context.device,
            val_data_loader=val_loader,
            # The unwrapped module (validation needs no gradient sync between ranks), over its mirrored inputs with
            # val_tta="flip" (test-time mirroring: the mean softmax of all flips, whose argmax is the prediction).
            network=ProbabilityAverage([network], tta=self.val_tta, spatial_dims=len(preset.patch_size))
            if self.val_tta else network,
            inferer=SlidingWindowInferer(roi_size=preset.patch_size, sw_batch_size=self.sw_batch_size,
                                         overlap=self.sw_overlap, mode="gaussian"),
            postprocessing=Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=out_channels),
                                    AsDiscreted(keys="label", to_onehot=out_channels)]),
            key_val_metric={KEY_METRIC: MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]),
                                                 save_details=True)},
            amp=amp,
        )
        trainer = SupervisedTrainer(
            device=context.device,
            max_epochs=self.max_epochs,
            train_data_loader=train_loader,
            network=model,
            optimizer=optimizer,
            loss_function=self.loss,
            inferer=SimpleInferer(),
            amp=amp,
            epoch_length=self.epoch_length,
        )
        NonFiniteLossGuard().attach(trainer)  # a NaN/Inf loss stops the run before the step and the recorder
        resume_objects: dict[str, Any] = {"network": network, "optimizer": optimizer, "trainer": trainer,
                                          "random_streams": RandomStreams(train_loader.dataset, rank=context.rank)}
        if scheduler is not None:
            resume_objects["lr_scheduler"] = scheduler
        if amp and getattr(trainer, "scaler_", None) is not None:
            resume_objects["scaler"] = trainer.scaler_
        # Order matters: validate, then step the scheduler, then record (the record holds both).
        # Every val_interval epochs and always after the last one, so every run ends with a validated model.
        validate_now = lambda engine, epoch: epoch % self.val_interval == 0 or epoch == engine.state.max_epochs  # noqa: E731
        trainer.add_event_handler(Events.EPOCH_COMPLETED(event_filter=validate_now),
                                  ValidationHandler(validator=evaluator, interval=1, epoch_level=True))
        if scheduler is not None:
            LrScheduleHandler(scheduler, print_lr=False, epoch_level=True).attach(trainer)
        if self.early_stop_patience > 0:
            early_stop = EarlyStopHandler(patience=self.early_stop_patience,
                                          score_function=stopping_fn_from_metric(KEY_METRIC), trainer=trainer)
            early_stop.attach(evaluator)
            resume_objects["early_stop"] = early_stop._handler
        recorder = RunRecorder(self.run_dir, network, resume_objects, labels, write=context.is_main)
        recorder.attach(trainer, evaluator)
        if show:
            ProgressBar(desc=f"train fold {self.fold}", persist=False).attach(trainer, output_transform=_first_loss)
            ProgressBar(desc="validate", persist=False).attach(evaluator)
        if context.is_main:
            StatsHandler(name="medunet.validate", iteration_log=False, output_transform=lambda x: None).attach(evaluator)
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)
        for handler in self.extra_handlers:
            handler.attach(trainer)
        for handler in self.extra_val_handlers:
            handler.attach(evaluator)

        resume_file = self.run_dir / RESUME_FILE
        if self.resume and resume_file.is_file():
            state = torch.load(resume_file, map_location="cpu", weights_only=True)
            load_dict = dict(resume_objects)
            if "random_streams" not in state:  # saved before medunet kept them: freshly seeded streams, as it did
                del load_dict["random_streams"]
            CheckpointLoader(load_path=str(resume_file), load_dict=load_dict, map_location=context.device).attach(trainer)
            self.resumed_from_epoch = checkpoint_epoch(state)
            recorder.load_state_dict(state["run_state"])
        self.trainer, self.evaluator, self.recorder = trainer, evaluator, recorder
        self._fold_sizes = (num_train, num_val)
        return self

    # -- records ----------------------------------------------------------------------------------------
    def record_workflow(self, workflow: dict[str, Any]) -> None:
        """Keep the merged workflow config; it is written as ``RUN_DIR/workflow.json`` once training proceeds."""
        self._workflow = workflow

    def _check_same_run(self) -> None:
        """Refuse to resume a run of another network or fold (its weights would not fit or would mislead)."""
        if not is_run_folder(self.run_dir):
            return
        previous = read_run_record(self.run_dir)
        now = {"network": self.network_name, "fold": self.fold}
        before = {"network": previous.network.name, "fold": previous.fold}
        if now != before:
            raise MedunetError(
                f"{self.run_dir} holds a run of {before}, not {now}; resuming it would mix the two. "
                "Fix: pass a new --run-dir, or delete that folder to start over."
            )

    def _write_records(self) -> None:
        """``RUN_DIR/config.json`` (the :class:`~medunet.run_folder.RunRecord`) and ``workflow.json``: written when
        training proceeds, never by a run that is refused or has nothing to train."""
        for folder in (self.run_dir, *(self.run_dir / name for name in (MODEL_FILE, RESUME_FILE))):
            remove_stale_temporaries(folder if folder == self.run_dir else folder.parent)  # of a killed session
        network, preset, scheduler = self.network, self.preset, self.lr_scheduler
        num_train, num_val = self._fold_sizes
        device = str(self.context.device)
        amp = self.amp and self.context.device.type == "cuda"
        recipe = {
            "loss": repr(self.loss),
            "deep_supervision": deep_supervision_heads(network),
            "augment": self.augment,
            "optimizer": {"class": type(self.optimizer).__name__,
                          "defaults": {k: list(v) if isinstance(v, tuple) else v
                                       for k, v in self.optimizer.defaults.items()
                                       if isinstance(v, (int, float, str, bool, type(None), tuple))}},
            "lr_scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "max_epochs": self.max_epochs,
            "val_interval": self.val_interval,
            "batch_size": self.batch_size,
            "num_samples": self.num_samples,
            "epoch_length": self.epoch_length,
            "sliding_window": {"roi_size": list(preset.patch_size), "sw_batch_size": self.sw_batch_size,
                               "overlap": self.sw_overlap, "mode": "gaussian", "tta": self.val_tta},
            "early_stop_patience": self.early_stop_patience,
            "amp": amp,
            "seed": self.seed,
        }
        versions = {"medunet": medunet.__version__, "monai": monai.__version__, "torch": torch.__version__,
                    "python": platform.python_version()}
        provenance = {
            "world_size": self.context.world_size,
            "device": device,
            "device_name": device_description(device),
            "resumed_from_epoch": self.resumed_from_epoch,
            "command": list(sys.argv),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": versions,
        }
        session = Session(from_epoch=self.resumed_from_epoch + 1, device_name=provenance["device_name"], amp=amp,
                          torch=torch.__version__, started=provenance["started"])
        record = RunRecord(
            preset=preset,
            network=NetworkRecord(name=self.network_name, args=self.network_args,
                                  class_path=f"{type(network).__module__}.{type(network).__qualname__}",
                                  parameters=sum(p.numel() for p in network.parameters())),
            fold=self.fold,
            dataset_dir=portable_path(self.dataset_dir),
            datalist=portable_path(self.datalist),
            num_train_cases=num_train,
            num_val_cases=num_val,
            recipe=json.loads(json.dumps(recipe, default=str)),
            sessions=(*self._earlier_sessions(), session),
            provenance=json.loads(json.dumps(provenance, default=str)),
        )
        write_run_record(record, self.run_dir)
        if not (self.run_dir / PROFILE_FILE).is_file():
            self._write_profile()
        if self._workflow is not None:  # its paths written as they read on any machine with the same layout
            workflow = {key: portable_path(value) if key in WORKFLOW_PATH_KEYS and _is_plain_path(value) else value
                        for key, value in self._workflow.items()}
            atomic_write_text(json.dumps(workflow, indent=2) + "\n", self.run_dir / WORKFLOW_FILE)

    def _write_profile(self) -> None:
        """``RUN_DIR/profile.json``: parameters, multiply-adds, memory and latency at the training batch."""
        from medunet.profiling import profile

        shape = (self.batch_size * self.num_samples, self.preset.in_channels, *self.preset.patch_size)
        try:
            result = profile(self.network, shape, device=str(self.context.device), train=True,
                             memory=self.profile_memory, repeats=1, name=self.network_name)
        except (RuntimeError, ValueError) as error:  # the model facts are extra: never fail a training for them
            logger.warning("could not profile %s at %s: %s", self.network_name, shape, error)
            return
        self.network.train()
        atomic_write_text(json.dumps({"params": result.as_params(), "metrics": result.metrics()}, indent=2) + "\n",
                          self.run_dir / PROFILE_FILE)

    def _earlier_sessions(self) -> list[Session]:
        """The sessions before this one that trained the epochs this one resumes after."""
        if not self.resumed_from_epoch or not is_run_folder(self.run_dir):
            return []
        return [s for s in read_run_record(self.run_dir).sessions if s.from_epoch <= self.resumed_from_epoch]

    def _log_epoch(self, engine: Any) -> None:
        row = self.recorder.history[-1] if self.recorder and self.recorder.history else {}
        parts = [f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
                 for key, value in row.items() if key != "epoch" and value is not None]
        message = f"epoch {engine.state.epoch}/{engine.state.max_epochs}: " + " ".join(parts)
        lost = lost_classes(row)
        if lost:
            scores = ", ".join(f"{name} {row[f'val_dice_{name}']:.4f}" for name in lost)
            message += (f"\nwarning: epoch {engine.state.epoch}: the network predicts almost none of "
                        f"{_classes(lost)} (validation Dice {scores}, below {LOST_CLASS_DICE}). Early in a run this "
                        "can pass; if it lasts, the run has lost the class.")
        (print if not self.progress else _tqdm_write)(message)

    def _warn_lost_classes(self, lost: list[str]) -> None:
        """Say, at the end, that the best model has lost a class: its Dice measures a failed training."""
        history = self.recorder.history
        epochs = [str(row["epoch"]) for row in history if set(lost) & set(lost_classes(row))]
        print(f"warning: {self.run_dir}: the best model (epoch {self.recorder.best_epoch or history[-1]['epoch']}) has "
              f"lost {_classes(lost)}: validation Dice below {LOST_CLASS_DICE} at epoch(s) {', '.join(epochs)} (the "
              f"run has {len(history)}). Its mean Dice is that of a failed training, not of the network. Fix: train "
              "again into a new --run-dir with another seed (--set seed=N) or a larger batch (--set num_samples=N); "
              "SegResNet lost a class in 1 of 10 short Hippocampus runs (medunet's benchmarks/README.md).")

    # -- running ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Build if needed, train (or resume) to ``max_epochs`` or early stop, and return the run summary.

        Returns:
            ``{"run_dir", "best_metric", "best_epoch", "epochs", "finished", "stop_reason", "lost_classes",
            "seconds", "resumed_from_epoch", "last": <last history row>}``; ``lost_classes`` names the classes the
            finished run's best model scores below ``LOST_CLASS_DICE`` on (a failed training; a warning says so).
        """
        if self.trainer is None:
            self.build()
        recorder, context = self.recorder, self.context
        start = time.perf_counter()
        try:
            if recorder.finished:
                if context.is_main:
                    print(f"{self.run_dir}: already finished ({recorder.stop_reason}); nothing to train. "
                          "Pass a new --run-dir to train again.")
            else:
                if context.is_main:
                    self._write_records()
                if self.resumed_from_epoch and context.is_main:
                    print(f"resuming {self.run_dir} after epoch {self.resumed_from_epoch}/{self.max_epochs}")
                self.trainer.run()
            barrier(context)
        finally:
            self._lock.release()
        lost = recorder.lost_classes() if recorder.finished else []
        if lost and context.is_main:
            self._warn_lost_classes(lost)
        return {
            "run_dir": str(self.run_dir),
            "best_metric": recorder.best_metric if recorder.best_epoch else None,
            "best_epoch": recorder.best_epoch or None,
            "epochs": len(recorder.history),
            "finished": recorder.finished,
            "stop_reason": recorder.stop_reason,
            "lost_classes": lost,
            "seconds": round(time.perf_counter() - start, 1),
            "resumed_from_epoch": self.resumed_from_epoch,
            "last": recorder.history[-1] if recorder.history else {},
        }


def _classes(names: list[str]) -> str:
    return ("class " if len(names) == 1 else "classes ") + ", ".join(names)


def _is_plain_path(value: Any) -> bool:
    return isinstance(value, (str, Path)) and not str(value).startswith(("$", "@", "%"))


def _tqdm_write(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message)
