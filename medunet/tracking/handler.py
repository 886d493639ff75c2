"""An ignite handler that logs a MONAI trainer and its evaluator into a :class:`Tracker`'s run.

Why not ``monai.handlers.MLFlowHandler`` (MONAI 1.6.1)? It does not fit three requirements of medunet:

- it owns the run: it builds its own client and, without a run name, *reuses the latest unfinished run
  of the experiment*, which is another process's run when two trainings share a store; medunet's run
  also holds the config, profile, evaluation and checkpoint logged outside the engines;
- it writes straight to the client, so an unreachable server raises inside the engine and stops the
  training; the :class:`Tracker` instead falls back to a local store without losing anything;
- it logs the loss per iteration only and the evaluator's metrics at the evaluator's own epoch, while
  medunet's runs compare an epoch-mean ``train_loss`` and validation metrics at the trainer's epoch, and
  per-label Dice vectors (``MeanDice(reduction="mean_batch")``) as one named metric per label.

What is logged (``step`` is the trainer's epoch unless said otherwise):

- at the start: parameters ``max_epochs``, ``epoch_length``, ``batch_size``, ``optimizer``,
  ``loss_function`` (those the trainer has);
- ``train_loss_iter`` every ``iteration_log`` iterations (step: the global iteration), sent in one
  request per epoch (and when the run ends, so a crashed epoch's losses are kept too);
- each epoch: ``train_loss`` (mean over the epoch's iterations), ``lr`` (``lr_group_<i>`` for further
  parameter groups), and the trainer's own ``engine.state.metrics`` prefixed ``train_``;
- each validation: the evaluator's ``engine.state.metrics`` prefixed ``val_`` (``val_mean_dice`` stays as
  it is), vectors expanded per label (``val_dice_spleen``) with ``label_names``;
- at the end: ``val_best_metric`` and ``val_best_metric_epoch`` when the evaluator tracked a key metric.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ignite.engine import Engine, Events

from medunet.tracking.tracker import Tracker
from medunet.tracking.values import as_float

logger = logging.getLogger("medunet.tracking")


class MLflowTrackingHandler:
    """Log a trainer (losses, learning rate, metrics) and its evaluator (validation metrics) into ``tracker``.

    Args:
        tracker: the run to log into (a disabled tracker makes this handler a no-op).
        output_transform: maps ``engine.state.output`` to the loss; default finds ``"loss"`` in MONAI's
            output (a dict, or the list of per-sample dicts of a decollating trainer) or takes a number.
        iteration_log: log ``train_loss_iter`` every this many iterations; ``False``/0 never.
        label_names: names of the entries of vector metrics, index 0 first (``["background", "spleen"]``
            or ``{1: "spleen"}``); default the index.
        train_prefix: prefix of the trainer's metrics (default ``train``).
        val_prefix: prefix of the evaluator's metrics (default ``val``).

    Example:
        >>> handler = MLflowTrackingHandler(tracker, label_names=["background", "spleen"])  # doctest: +SKIP
        >>> handler.attach(trainer, evaluator)  # doctest: +SKIP
    """

    def __init__(
        self,
        tracker: Tracker,
        output_transform: Callable[[Any], Any] | None = None,
        iteration_log: bool | int = True,
        label_names: Sequence[str] | Mapping[int, str] | None = None,
        train_prefix: str = "train",
        val_prefix: str = "val",
    ) -> None:
        self.tracker = tracker
        self.output_transform = output_transform or loss_from_output
        self.iteration_every = int(iteration_log)
        self.label_names = label_names
        self.train_prefix = train_prefix
        self.val_prefix = val_prefix
        self.trainer: Engine | None = None
        self.evaluator: Engine | None = None
        self._loss_sum = 0.0
        self._loss_count = 0
        self._iteration_losses: list[tuple[int, float, int]] = []  # (iteration, loss, time in ms) not sent yet
        tracker.before_end(self.flush_iterations)

    def attach(self, trainer: Engine | None = None, evaluator: Engine | None = None) -> MLflowTrackingHandler:
        """Register on ``trainer`` and/or ``evaluator`` (an evaluator alone: metrics at step 0)."""
        self.trainer, self.evaluator = trainer, evaluator
        if trainer is not None:
            trainer.add_event_handler(Events.STARTED, self._guard(self.log_trainer_params))
            trainer.add_event_handler(Events.EPOCH_STARTED, self._guard(self._reset_loss))
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self._guard(self.log_iteration))
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self._guard(self.log_epoch))
            trainer.add_event_handler(Events.COMPLETED, self._guard(self.log_best))
        if evaluator is not None:
            evaluator.add_event_handler(Events.COMPLETED, self._guard(self.log_validation))
        return self

    def log_trainer_params(self, engine: Engine) -> None:
        params = {"max_epochs": engine.state.max_epochs, "epoch_length": engine.state.epoch_length}
        data_loader = getattr(engine, "data_loader", None)
        if getattr(data_loader, "batch_size", None) is not None:
            params["batch_size"] = data_loader.batch_size
        for attribute in ("optimizer", "loss_function"):
            if getattr(engine, attribute, None) is not None:
                params[attribute] = type(getattr(engine, attribute)).__name__
        self.tracker.log_params(params)

    def log_iteration(self, engine: Engine) -> None:
        loss = as_float(self.output_transform(engine.state.output))
        if loss is None:
            return
        self._loss_sum += loss
        self._loss_count += 1
        if self.iteration_every and engine.state.iteration % self.iteration_every == 0:
            self._iteration_losses.append((engine.state.iteration, loss, int(time.time() * 1000)))

    def flush_iterations(self) -> None:
        """Send the per-iteration losses gathered since the last flush."""
        points, self._iteration_losses = self._iteration_losses, []
        self.tracker.log_series(f"{self.train_prefix}_loss_iter", points)

    def log_epoch(self, engine: Engine) -> None:
        self.flush_iterations()
        values: dict[str, Any] = dict(engine.state.metrics)
        if self._loss_count:
            values["loss"] = self._loss_sum / self._loss_count
        self.tracker.log_metrics(values, step=engine.state.epoch, prefix=self.train_prefix, names=self.label_names)
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            rates = {"lr" if i == 0 else f"lr_group_{i}": group["lr"] for i, group in enumerate(optimizer.param_groups)}
            self.tracker.log_metrics(rates, step=engine.state.epoch)

    def log_validation(self, engine: Engine) -> None:
        step = self.trainer.state.epoch if self.trainer is not None else 0
        self.tracker.log_metrics(engine.state.metrics, step=step, prefix=self.val_prefix, names=self.label_names)

    def log_best(self, engine: Engine) -> None:
        state = getattr(self.evaluator, "state", None)
        best, epoch = getattr(state, "best_metric", None), getattr(state, "best_metric_epoch", -1)
        if best is not None and epoch is not None and epoch >= 0:
            self.tracker.log_metrics({f"{self.val_prefix}_best_metric": best,
                                      f"{self.val_prefix}_best_metric_epoch": epoch}, step=engine.state.epoch)

    def _reset_loss(self, engine: Engine) -> None:
        self._loss_sum, self._loss_count = 0.0, 0

    def _guard(self, callback: Callable[[Engine], None]) -> Callable[[Engine], None]:
        """Run ``callback``; on any error warn once and let the training go on."""
        warned = False

        @functools.wraps(callback)
        def guarded(engine: Engine) -> None:
            nonlocal warned
            try:
                callback(engine)
            except Exception as error:  # noqa: BLE001 - tracking must never stop a training
                if not warned:
                    warned = True
                    logger.warning("MLflow tracking skipped %s: %r", callback.__name__, error)

        return guarded


def loss_from_output(output: Any) -> Any:
    """The loss in an engine's output: ``output["loss"]``, the first sample's, or the output itself."""
    if isinstance(output, Mapping):
        return output.get("loss")
    if isinstance(output, (list, tuple)) and output:
        return loss_from_output(output[0])
    return output
