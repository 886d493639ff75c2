"""The accuracy half of ``medunet bench``: every network trained with one recipe and budget, on one fold or several.

Each network is trained by the ordinary training workflow (:func:`medunet.engines.run_workflow`, the same
engines as ``medunet train``) with the overrides of :data:`RECIPE`, into ``OUT_DIR/runs/<network>``, and is
scored on that fold's validation cases: mean Dice and Dice per foreground label, from the run's
``metrics.json``. Every training is its own MLflow run (``kind=train``, named after the network).

The reported Dice is that of the **last epoch** (the model the fixed budget produces; the workflow always
validates after the last epoch). The best validated epoch is reported beside it, but not used for ranking:
picking the epoch on the cases it is scored on would flatter the networks that fluctuate most.

Resumable: a finished run with the same recipe is read back, not retrained; an unfinished one resumes from
its checkpoint (the training engine's resume). So rerunning the bench after a crash trains only what is
left. A run folder trained with another recipe is refused, never mixed.

Cross-validation (``folds=[0, 1, 2]``, ``medunet bench --accuracy --folds 0 1 2``) trains every network on each
fold into ``OUT_DIR/runs/fold<k>/<network>``; :func:`fold_summary` gives mean +- SD over folds per network and
:func:`compare_networks` says which paired differences exceed the fold-to-fold spread.

Two budgets (``--protocol``): :data:`RECIPE` (``gpu``, the full one) and :data:`CPU_RECIPE` (``cpu``: whole
Hippocampus volumes, a sixth of the budget, about half an hour per network on 2 cores); :func:`rank_agreement`
checks that the cheap one orders the networks as the full one does.

Commands (from the repository root, with ``../shared/data/Task04_Hippocampus`` in place)::

    # quick check, minutes on a laptop CPU: 4 networks, 2 epochs x 4 iterations each
    medunet bench --quick --accuracy --out benchmarks/quick --results benchmarks/quick/RESULTS.md

    # the full benchmark (GPU advised: 13 networks x 4,000 iterations), the table kept in the repository
    medunet bench --accuracy --jobs 8 --out benchmarks/latest --results benchmarks/RESULTS.md
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import signal
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from medunet.atomic import open_own_file
from medunet.deploy.runner import usable_cpus
from medunet.engines.checkpoint import lost_classes
from medunet.engines.config import build_overrides, load_workflow, run_workflow
from medunet.errors import MedunetError
from medunet.networks import create_network
from medunet.paths import REPO_ROOT, portable_path
from medunet.run_folder import (
    METRICS_JSON,
    WORKFLOW_FILE,
    WORKFLOW_PATH_KEYS,
    RunRecord,
    read_json_file,
    read_metrics_record,
    read_run_record,
)
from medunet.workers import exit_with_parent

#: One recipe for every network (workflow overrides): DiceCE loss, AdamW (lr 1e-3, weight decay 1e-5),
#: polynomial learning-rate decay (power 0.9, stepped per epoch), 20 epochs x 200 iterations of 2 images
#: x 2 random patches (the preset's patch size, 48x64x48 for Hippocampus), validation every 5 epochs and
#: after the last, no early stopping, seed 0; nnU-Net's augmentation and foreground oversampling
#: (``augment: nnunet``) and deep supervision with 3 heads wherever the network has a U-Net decoder to put them
#: on (medunet's networks, DynUNet; :func:`deep_supervision_for`: MONAI's UNet and SegResNet have none). The
#: training budget, 4,000 iterations (16,000 patches, about 96 passes over the 166 training cases of a fold), is
#: the same for all: about 5 minutes per network on one H100 with 8 trainings sharing it, most of a day on 2 CPU
#: cores. ``--recipe light`` is the recipe before issue 10 (:data:`LIGHT_RECIPE`, :data:`RECIPES`).
RECIPE: dict[str, Any] = {
    "loss": {"_target_": "monai.losses.DiceCELoss", "to_onehot_y": True, "softmax": True},
    "learning_rate": 1e-3,
    "optimizer": {"_target_": "torch.optim.AdamW", "_mode_": "callable", "lr": "@learning_rate",
                  "weight_decay": 1e-5},
    "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.PolynomialLR", "_mode_": "callable",
                     "total_iters": "@max_epochs", "power": 0.9},
    "max_epochs": 20,
    "epoch_length": 200,
    "val_interval": 5,
    "batch_size": 2,
    "num_samples": 2,
    "patch_size": "$@preset.patch_size",
    "early_stop_patience": 0,
    "seed": 0,
    "augment": "nnunet",
    "deep_supervision": 3,
}
#: The recipe of the committed results before issue 10: light augmentation, no deep supervision.
LIGHT_RECIPE: dict[str, Any] = {**RECIPE, "augment": "light", "deep_supervision": 0}
#: ``--protocol cpu``: the same recipe at a budget 2 CPU cores train in about half an hour per network. Every
#: Hippocampus volume (at most 43x58x47 voxels at 1 mm) fits in one 48x64x48 patch, so validation is one window per
#: case: 20 epochs x 50 iterations x 2 images x 2 samples (4,000 volumes, about 24 passes over a fold's 166 training
#: cases; a quarter of the GPU budget's patches). Two samples per image keep the GPU recipe's batch of 4: with
#: 100 iterations of 2 single samples SegResNet never predicted the Posterior class (0.4269 on fold 0, Posterior 0.0
#: at every validation), with 50 x 2 x 2 it reaches 0.8157. A budget of 20 x 40 was too small: the MONAI UNet
#: reached 0.77 and SegResNet still predicted background only.
CPU_RECIPE: dict[str, Any] = {**RECIPE, "max_epochs": 20, "epoch_length": 50, "num_samples": 2}
#: ``--protocol NAME`` -> recipe.
PROTOCOLS: dict[str, dict[str, Any]] = {"gpu": RECIPE, "cpu": CPU_RECIPE}
#: ``--recipe NAME`` -> the keys it changes in either protocol's budget: nnU-Net's recipe (the default) or the one
#: before issue 10 (:data:`LIGHT_RECIPE`), which at the CPU budget scores every network higher (benchmarks/README.md).
RECIPES: dict[str, dict[str, Any]] = {
    "nnunet": {},
    "light": {key: LIGHT_RECIPE[key] for key in ("augment", "deep_supervision")},
}
#: ``--quick``: the same recipe at a smoke-test budget (2 epochs x 4 iterations), loading only the cases used.
QUICK_RECIPE: dict[str, Any] = {**RECIPE, "max_epochs": 2, "epoch_length": 4, "val_interval": 2, "cache": "none"}
#: The value a workflow key had before it existed (run folders trained then are read back with it).
_KEY_DEFAULTS: dict[str, Any] = {"augment": "light", "deep_supervision": 0}
#: The network whose Dice issue 10 asks to beat by 0.005 (``--bar``).
BAR_NETWORK = "monai_segresnet"

#: The networks ``--accuracy`` trains by default: the MONAI UNet (the reference) and SegResNet, and for each
#: seed idea the presets tuned to beat the MONAI UNet on its own axis (LUNet: parameters; UNet--: peak
#: inference memory; OneNet: multiply-adds) with their twins.
ACCURACY_NETWORKS = (
    "monai_unet_spleen",
    "monai_segresnet",
    "lunet_small_16f",
    "lunet_small_16f_unshuffle",
    "lunet_small_16f_unshuffle_wide",
    "unet_small_8f_unshuffle",
    "unetmm_unet_small_8f_unshuffle_coarsest",
    "unetmm_lunet_small_16f_unshuffle_coarsest",
    "unetmm_lunet_small_16f_unshuffle_intermediate",
    "unetmm_lunet_small_16f_unshuffle_intermediate_wide",
    "unetmm_lunet_small_16f_unshuffle_intermediate_wider",
    "unetmm_lunet_small_16f_unshuffle_finest",
    "onenet_ed4_8f",
)
RUNS_DIR = "runs"
#: Where a training started with ``jobs > 1`` writes its output, inside its run folder.
TRAIN_LOG = "train.log"
# Keys whose value must match for a finished run to count as this benchmark's run.
_IDENTITY_KEYS = ("network_name", "fold", "dataset_dir", "datalist")


def recipe_with(overrides: Mapping[str, Any] | None = None, quick: bool = False,
                epochs: int | None = None, epoch_length: int | None = None, protocol: str = "gpu",
                recipe: str = "nnunet") -> dict[str, Any]:
    """The ``protocol``'s budget (or :data:`QUICK_RECIPE`) of the named ``recipe``, with ``--epochs``,
    ``--epoch-length`` and other keys replaced.

    Args:
        overrides: any workflow keys, e.g. ``{"patch_size": [16, 16, 16]}``.
        quick: start from :data:`QUICK_RECIPE`.
        epochs: ``max_epochs``.
        epoch_length: iterations per epoch.
        protocol: ``"gpu"`` (:data:`RECIPE`, the full budget) or ``"cpu"`` (:data:`CPU_RECIPE`).
        recipe: ``"nnunet"`` (nnU-Net's augmentation, deep supervision) or ``"light"`` (:data:`RECIPES`).
    """
    if protocol not in PROTOCOLS:
        raise MedunetError(f"protocol is {protocol!r}; it must be one of {sorted(PROTOCOLS)}. Fix: --protocol gpu "
                           "(the full budget) or --protocol cpu (about 30 minutes per network on 2 cores).")
    if recipe not in RECIPES:
        raise MedunetError(f"recipe is {recipe!r}; it must be one of {sorted(RECIPES)}. Fix: --recipe nnunet "
                           "(nnU-Net's augmentation and deep supervision) or --recipe light (flips, intensity "
                           "scale/shift, no deep supervision).")
    chosen = {**(QUICK_RECIPE if quick else PROTOCOLS[protocol]), **RECIPES[recipe]}
    if epochs is not None:
        chosen["max_epochs"] = int(epochs)
    if epoch_length is not None:
        chosen["epoch_length"] = int(epoch_length)
    chosen.update(overrides or {})
    return chosen


def deep_supervision_for(network: str, heads: int) -> int:
    """The deep-supervision heads ``network`` trains with under a recipe asking for ``heads``: as many of them as the
    network's U-Net decoder has levels above the finest (``heads`` for five levels, 2 for four), 0 where it has no
    such decoder (MONAI's UNet, SegResNet...). nnU-Net too supervises every decoder level it has, short of the
    coarsest ones."""
    for k in range(heads, 0, -1):
        try:
            create_network(network, deep_supervision=k)
        except MedunetError:
            continue
        return k
    return 0


def run_dir_for(out_dir: str | Path, network: str, fold: int | None = None) -> Path:
    """``OUT_DIR/runs/<network>`` for a one-fold bench (``fold=None``), ``OUT_DIR/runs/fold<k>/<network>`` for a
    cross-validation."""
    runs = Path(out_dir) / RUNS_DIR
    return runs / network if fold is None else runs / f"fold{fold}" / network


def run_accuracy(
    networks: Sequence[str],
    task_dir: str | Path,
    workflow: str | Path,
    fold: int = 0,
    out_dir: str | Path = "benchmarks/latest",
    recipe: Mapping[str, Any] | None = None,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment: str = "medunet",
    progress: bool = True,
    jobs: int = 1,
    folds: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Train each network with one recipe on ``fold`` (or each of ``folds``) of ``task_dir`` and score it on that
    fold's validation cases.

    Args:
        networks: registry names (``medunet networks``), trained in this order.
        task_dir: the MSD task folder (e.g. ``../shared/data/Task04_Hippocampus``).
        workflow: the training workflow file (e.g. ``medunet/workflows/task04_hippocampus.json``).
        fold: the validation fold of the workflow's datalist (when ``folds`` is None).
        out_dir: the benchmark folder; each training goes to ``OUT_DIR/runs/<network>``
            (``OUT_DIR/runs/fold<k>/<network>`` with ``folds``).
        recipe: workflow overrides applied to every training; default :data:`RECIPE` (see :func:`recipe_with`).
        tracking: track each training as its own MLflow run.
        tracking_uri: the MLflow store or server (default as ``medunet train``).
        experiment: the MLflow experiment.
        progress: show progress bars (sequential runs only).
        jobs: trainings run at once, each in its own process (several small networks share one GPU well) with
            its share of the CPU cores, re-sized as trainings finish (:class:`CoreShare`); each parallel training
            writes its output to ``RUN_DIR/train.log``.
        folds: cross-validation: train every network on each of these folds (all trainings share the ``jobs``).

    Returns:
        One row per network and fold (``fold``): ``network``, ``params``, ``mean_dice`` and ``dice_<label>`` (validation fold,
        last validated epoch: ``scored_epoch``), ``lost_classes`` (the classes scored below
        :data:`~medunet.engines.checkpoint.LOST_CLASS_DICE` there: a failed training), ``best_mean_dice``, ``best_epoch``, ``epochs``, ``train_seconds`` (the sum of the
        epochs' times, validation included, over every session that trained the run), ``trained_on`` (device,
        mixed precision, torch version), ``reused`` (True when
        a finished run was read back), ``run_dir``.

    Example:
        >>> rows = run_accuracy(["lunet_small_8f"], "../shared/data/Task04_Hippocampus",  # doctest: +SKIP
        ...                     "medunet/workflows/task04_hippocampus.json", out_dir="benchmarks/latest")
        >>> rows[0]["dice_Anterior"]  # doctest: +SKIP
    """
    task_dir, workflow, out_dir = Path(task_dir).resolve(), Path(workflow), Path(out_dir)
    if not (task_dir / "dataset.json").is_file():
        raise MedunetError(f"{task_dir} is not an MSD task folder (no dataset.json). Fix: pass --task-dir with "
                           "the task, e.g. ../shared/data/Task04_Hippocampus.")
    recipe = dict(RECIPE if recipe is None else recipe)
    datalist = _datalist_override(workflow)
    heads = int(recipe.get("deep_supervision") or 0)
    heads_of = {network: deep_supervision_for(network, heads) for network in networks}
    plan = [(network, k) for k in (folds if folds is not None else [None]) for network in networks]
    pending: dict[str, tuple[Path, dict[str, Any]]] = {}
    for network, k in plan:
        run_dir = run_dir_for(out_dir, network, k)
        settings = {**recipe, "tracking": tracking, "tracking_uri": tracking_uri, "experiment": experiment,
                    "progress": progress and jobs == 1}
        if "deep_supervision" in recipe:
            settings["deep_supervision"] = heads_of[network]
        overrides = build_overrides(network=network, fold=fold if k is None else k, data_root=task_dir,
                                    datalist=datalist, run_dir=run_dir, settings=settings)
        _check_same_recipe(run_dir, overrides)
        if not _finished(run_dir):
            pending[_job_name(network, k)] = (run_dir, overrides)
    if jobs == 1:
        for name, (run_dir, overrides) in pending.items():
            print(f"bench accuracy: training {name} into {run_dir}", flush=True)
            seconds = _train(workflow, overrides)
            print(f"bench accuracy: {name} trained in {seconds:.0f} s", flush=True)
    else:
        _train_in_parallel(workflow, pending, jobs)
    rows = []
    for network, k in plan:
        run_dir = run_dir_for(out_dir, network, k)
        if not _finished(run_dir):
            raise MedunetError(f"training {_job_name(network, k)} in {run_dir} did not finish (see its metrics.json"
                               f"{' and ' + TRAIN_LOG if jobs > 1 else ''}). Fix: rerun the bench; it resumes "
                               "from the checkpoint.")
        rows.append({**accuracy_row(run_dir), "reused": _job_name(network, k) not in pending})
    return rows


def _job_name(network: str, fold: int | None) -> str:
    return network if fold is None else f"{network}/fold{fold}"


def accuracy_row(run_dir: str | Path) -> dict[str, Any]:
    """The benchmark row of a finished training run folder (from its ``config.json`` and ``metrics.json``).

    Args:
        run_dir: a run folder written by the training workflow.
    """
    run_dir = Path(run_dir)
    record = read_run_record(run_dir)
    metrics = read_metrics_record(run_dir) or {"epochs": []}
    validated = [row for row in metrics["epochs"] if row.get("val_mean_dice") is not None]
    if not validated:
        raise MedunetError(f"{run_dir}/{METRICS_JSON} has no validated epoch; the run cannot be scored. "
                           "Fix: delete the folder and rerun the bench.")
    last = validated[-1]
    row: dict[str, Any] = {
        "network": record.network.name,
        "fold": record.fold,
        "params": record.network.parameters,
        "mean_dice": float(last["val_mean_dice"]),
    }
    for key, value in last.items():
        if key.startswith("val_dice_"):
            row[key.removeprefix("val_")] = float(value) if value is not None else float("nan")
    row.update(
        lost_classes=lost_classes(last),
        scored_epoch=int(last["epoch"]),
        best_mean_dice=metrics.get("best_metric"),
        best_epoch=metrics.get("best_epoch"),
        epochs=len(metrics["epochs"]),
        deep_supervision=int(record.network.args.get("deep_supervision") or 0),
        augment=record.recipe.get("augment", _KEY_DEFAULTS["augment"]),
        train_seconds=round(sum(r.get("epoch_seconds") or 0.0 for r in metrics["epochs"]), 1),
        trained_on=_trained_on(record),
        run_dir=str(run_dir),
    )
    return row


def _train(workflow: Path, overrides: Mapping[str, Any]) -> float:
    """Run one training workflow; its wall time in seconds."""
    start = time.perf_counter()
    run_workflow(workflow, overrides)
    return time.perf_counter() - start


#: How often (seconds) a parallel training re-sizes its thread pool to the trainings still running.
RESIZE_SECONDS = 30.0

#: Trainings in progress across the pool's processes (set in each worker by :func:`_init_worker`).
_running: Any = None


def _init_worker(running: Any, bench_pid: int) -> None:
    """Pool initializer: hand each worker the shared count of trainings in progress, and end it with the bench
    (an orphaned training would compete for the cores and, on a rerun, train its run folder twice at once)."""
    global _running
    _running = running
    exit_with_parent(bench_pid)


class CoreShare:
    """The machine's cores shared among the bench's trainings in progress, re-sized as they come and go.

    Inside ``with CoreShare(running, cores):`` this process counts as one training in ``running`` (a shared
    ``multiprocessing.Value``) and sizes torch's thread pool to ``cores // running`` now and every ``interval``
    seconds, so the last training of an odd-sized batch, once alone, uses every core instead of its share.
    The re-sizing runs from a ``SIGALRM`` timer in the main thread, between Python statements (a thread pool's
    size is the calling thread's setting); where there is no ``setitimer`` (Windows) the size set on entry holds.
    """

    def __init__(self, running: Any, cores: int, interval: float = RESIZE_SECONDS) -> None:
        self.running, self.cores, self.interval = running, max(1, cores), interval
        self._previous_handler: Any = None

    def threads(self) -> int:
        """Threads for this training now: its share of the cores."""
        return max(1, self.cores // max(1, self.running.value))

    def resize(self, *_: Any) -> None:
        """Set torch's thread pool to :meth:`threads`, saying so in the training's log when it changes."""
        threads = self.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            print(f"bench accuracy: {self.running.value} training(s) running, now {threads} CPU thread(s)",
                  flush=True)

    def __enter__(self) -> CoreShare:
        with self.running.get_lock():
            self.running.value += 1
        self.resize()
        if hasattr(signal, "setitimer"):
            self._previous_handler = signal.signal(signal.SIGALRM, self.resize)
            signal.setitimer(signal.ITIMER_REAL, self.interval, self.interval)
        return self

    def __exit__(self, *_: Any) -> None:
        if hasattr(signal, "setitimer"):
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous_handler)
        with self.running.get_lock():
            self.running.value -= 1


def _train_logged(workflow: Path, overrides: Mapping[str, Any], log: Path) -> float:
    """:func:`_train` in a worker process, its output sent to ``log`` and its CPU threads its share of the cores
    (:class:`CoreShare`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open_own_file(log) as stream, redirect_stdout(stream), redirect_stderr(stream), \
            CoreShare(_running, usable_cpus()):
        return _train(workflow, overrides)


def _train_in_parallel(workflow: Path, pending: Mapping[str, tuple[Path, dict[str, Any]]], jobs: int) -> None:
    """Train the ``pending`` runs ``jobs`` at a time, each in a fresh (spawned) process; a failed training
    is reported with its log and the others go on."""
    context = multiprocessing.get_context("spawn")  # no forked CUDA or thread-pool state
    running = context.Value("i", 0)  # trainings in progress: each sizes its threads to its share of the cores
    # One process per training: a worker reused for a second training kept the logging handlers of its first,
    # bound to that training's closed log file, and lost every log line (Python 3.11+; on 3.10 workers are reused).
    fresh = {"max_tasks_per_child": 1} if sys.version_info >= (3, 11) else {}
    failed = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                             initargs=(running, os.getpid()), **fresh) as pool:
        futures = {pool.submit(_train_logged, workflow, overrides, run_dir / TRAIN_LOG): name
                   for name, (run_dir, overrides) in pending.items()}
        for name in pending:
            print(f"bench accuracy: training {name} (log: {pending[name][0] / TRAIN_LOG})", flush=True)
        with tqdm(total=len(futures), desc=f"training, {jobs} at a time", unit="net") as bar:
            for future in as_completed(futures):
                name = futures[future]
                try:
                    bar.write(f"bench accuracy: {name} trained in {future.result():.0f} s")
                except Exception as error:  # reported below; the other trainings go on
                    failed.append(name)
                    bar.write(f"bench accuracy: {name} failed: {error}")
                bar.update()
    if failed:
        logs = ", ".join(str(pending[name][0] / TRAIN_LOG) for name in failed)
        raise MedunetError(f"training failed for {', '.join(failed)}; see {logs}. Fix the cause and rerun "
                           "the bench: finished runs are reused and unfinished ones resume.")


def _trained_on(record: RunRecord) -> str:
    """Where a run trained, e.g. ``NVIDIA H100 80GB HBM3, amp, torch 2.11.0``: training time depends on it.
    A run resumed on another machine names each session with its first epoch."""
    sessions = record.sessions
    described = [", ".join([s.device_name or "unknown device", *(["amp"] if s.amp else []),
                            f"torch {s.torch or '?'}"]) for s in sessions]
    if len(set(described)) == 1:
        return described[0]
    return "; ".join(f"epochs {s.from_epoch}+: {text}" for s, text in zip(sessions, described))


def _finished(run_dir: Path) -> bool:
    metrics = read_metrics_record(run_dir)
    return bool(metrics and metrics.get("finished"))


def _check_same_recipe(run_dir: Path, overrides: Mapping[str, Any]) -> None:
    """Refuse a run folder trained (or begun) with another recipe, network, fold or data."""
    before = read_json_file(run_dir / WORKFLOW_FILE, "the workflow the run was trained with", expect=dict)
    if before is None:
        return
    before, overrides = _portable(before), _portable(overrides)  # paths compare the same on every machine
    def was(key: str) -> Any:
        return before.get(key, _KEY_DEFAULTS.get(key))

    changed = sorted(key for key in overrides
                     if (key in RECIPE or key in _IDENTITY_KEYS) and was(key) != overrides[key])
    if changed:
        detail = ", ".join(f"{key}: {was(key)!r} -> {overrides[key]!r}" for key in changed)
        raise MedunetError(f"{run_dir} was trained with another recipe ({detail}); reusing it would mix budgets. "
                           "Fix: pass another --out, or delete that folder to retrain.")


def _portable(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {key: portable_path(value) if key in WORKFLOW_PATH_KEYS and isinstance(value, str) and not value.startswith("$")
            else value for key, value in settings.items()}


def _datalist_override(workflow: Path) -> str | None:
    """The workflow's datalist made absolute when it is a plain path relative to the repository (so the bench
    runs from any folder); None keeps the workflow's own expression."""
    value = load_workflow(workflow).get().get("datalist")
    if not isinstance(value, str) or value.startswith(("$", "@", "%")) or Path(value).is_absolute():
        return None
    if Path(value).is_file():
        return str(Path(value).resolve())
    return str(REPO_ROOT / value) if (REPO_ROOT / value).is_file() else None


# -- cross-validation and protocol agreement -----------------------------------------------------------------
def _sd(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1); 0 for a single value."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def fold_summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and SD over folds of each network's Dice (mean and per label), in the order the networks first appear.

    Args:
        rows: :func:`run_accuracy` rows (one per network and fold).

    Returns:
        One dict per network: ``network``, ``folds`` (the fold numbers), ``mean_dice`` and ``mean_dice_sd``, each
        ``dice_<label>`` and ``dice_<label>_sd``, ``per_fold`` (fold -> mean Dice), ``lost`` (fold -> the classes
        that fold's run lost, :func:`medunet.engines.checkpoint.lost_classes`; failed trainings, still counted in
        the means), ``params``, ``deep_supervision``, ``train_seconds`` (summed over folds).
    """
    summary = []
    for network in dict.fromkeys(row["network"] for row in rows):
        mine = sorted((row for row in rows if row["network"] == network), key=lambda row: row.get("fold") or 0)
        entry: dict[str, Any] = {"network": network, "folds": [row.get("fold") for row in mine],
                                 "params": mine[0].get("params")}
        for key in ["mean_dice", *(k for k in mine[0] if k.startswith("dice_"))]:
            values = [float(row[key]) for row in mine if row.get(key) is not None and not math.isnan(float(row[key]))]
            entry[key] = statistics.fmean(values) if values else float("nan")
            entry[f"{key}_sd"] = _sd(values)
        entry["per_fold"] = {row.get("fold"): float(row["mean_dice"]) for row in mine}
        entry["lost"] = {row.get("fold"): list(row["lost_classes"]) for row in mine if row.get("lost_classes")}
        entry["deep_supervision"] = mine[0].get("deep_supervision", 0)
        entry["train_seconds"] = round(sum(float(row.get("train_seconds") or 0.0) for row in mine), 1)
        summary.append(entry)
    return summary


def compare_networks(summary: Sequence[Mapping[str, Any]], references: Sequence[str]) -> list[dict[str, Any]]:
    """Each network against each reference, on the folds both were trained on: the mean of the paired per-fold
    differences in mean Dice, their SD, the folds the network wins, and whether the difference exceeds the
    fold-to-fold spread (``|difference| > max(SD of either network over folds)``).

    ``failed_folds`` lists the folds where either run lost a class (see :func:`fold_summary`); with some left,
    ``healthy`` holds the same comparison without them (a collapsed reference is no win for the network).

    Args:
        summary: :func:`fold_summary` output.
        references: the networks to compare against (e.g. the MONAI UNet and SegResNet); absent ones are skipped.
    """
    by_name = {entry["network"]: entry for entry in summary}
    comparisons = []
    for reference in references:
        if reference not in by_name:
            continue
        ref = by_name[reference]
        for entry in summary:
            if entry["network"] == reference:
                continue
            common = [k for k in entry["per_fold"] if k in ref["per_fold"]]
            if not common:
                continue
            comparison = {"network": entry["network"], "reference": reference, **_paired(entry, ref, common)}
            failed = [k for k in common if k in entry.get("lost", {}) or k in ref.get("lost", {})]
            comparison["failed_folds"] = failed
            healthy = [k for k in common if k not in failed]
            if failed and healthy:
                comparison["healthy"] = _paired(entry, ref, healthy)
            comparisons.append(comparison)
    return comparisons


def _paired(entry: Mapping[str, Any], ref: Mapping[str, Any], folds: Sequence[Any]) -> dict[str, Any]:
    """The paired comparison of two :func:`fold_summary` entries on ``folds``."""
    differences = [entry["per_fold"][k] - ref["per_fold"][k] for k in folds]
    spread = max(_sd([entry["per_fold"][k] for k in folds]), _sd([ref["per_fold"][k] for k in folds]))
    difference = statistics.fmean(differences)
    return {"folds": len(folds), "difference": difference, "difference_sd": _sd(differences), "fold_sd": spread,
            "wins": sum(d > 0 for d in differences), "exceeds_spread": len(folds) > 1 and abs(difference) > spread}


def rank_agreement(first: Mapping[str, float], second: Mapping[str, float]) -> dict[str, Any]:
    """How alike two protocols order the networks they both trained: Kendall's tau and Spearman's rho of the mean
    Dice (ties count as half-agreeing), and the pairs they order differently.

    Args:
        first, second: network -> mean Dice under each protocol (e.g. CPU protocol and full recipe).

    Example::

        rank_agreement({"a": 0.8, "b": 0.7, "c": 0.6}, {"a": 0.9, "b": 0.85, "c": 0.86})
        # {"networks": 3, "kendall_tau": 0.333..., "spearman_rho": 0.5, "discordant": [("b", "c")], ...}
    """
    names = [name for name in first if name in second]
    concordant = discordant = 0
    flipped = []
    for a, b in itertools.combinations(names, 2):
        sign = (first[a] - first[b]) * (second[a] - second[b])
        if sign > 0:
            concordant += 1
        elif sign < 0:
            discordant += 1
            flipped.append((a, b))
    pairs = len(names) * (len(names) - 1) // 2
    order_first = sorted(names, key=lambda n: -first[n])
    order_second = sorted(names, key=lambda n: -second[n])
    rho = float("nan")
    if len(names) > 1:
        rank_first = {n: i for i, n in enumerate(order_first)}
        rank_second = {n: i for i, n in enumerate(order_second)}
        squares = sum((rank_first[n] - rank_second[n]) ** 2 for n in names)
        rho = 1 - 6 * squares / (len(names) * (len(names) ** 2 - 1))
    return {"networks": len(names), "kendall_tau": (concordant - discordant) / pairs if pairs else float("nan"),
            "spearman_rho": rho, "discordant": flipped, "order_first": order_first, "order_second": order_second}
