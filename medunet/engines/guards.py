"""Guards that stop a training whose numbers went wrong, before anything of the bad step is saved.

:class:`NonFiniteLossGuard` raises ``MedunetError`` as soon as a training loss is NaN or infinite (a NaN
voxel in an image, a diverging learning rate). It listens to MONAI's ``IterationEvents.LOSS_COMPLETED``, which
``SupervisedTrainer`` fires after the loss and *before* the backward pass and the optimizer step, so the
weights in memory are never updated from the bad loss (BatchNorm running statistics are, by the forward pass,
but nothing is saved). The epoch in progress never completes, so
:class:`~medunet.engines.checkpoint.RunRecorder` (which saves at ``EPOCH_COMPLETED``) records and saves nothing
of it: ``models/``, ``checkpoints/checkpoint_last.pt`` and ``metrics.*`` keep the last completed epoch, and
resuming continues from there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from medunet.errors import MedunetError


def _loss_of(output: Any) -> float | None:
    """The loss in a trainer's output: a dict (before decollation) or a list of per-sample dicts (after)."""
    item = output[0] if isinstance(output, Sequence) and not isinstance(output, Mapping) and output else output
    if isinstance(item, Mapping) and CommonKeys.LOSS in item:
        loss = item[CommonKeys.LOSS]  # at LOSS_COMPLETED still the graph's tensor: float() of it warns
        return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    return None


class NonFiniteLossGuard:
    """Ignite handler: raise ``MedunetError`` naming the epoch and iteration when the training loss is not finite.

    Attach it to the trainer before the recorder. On a MONAI ``SupervisedTrainer`` it checks at
    ``IterationEvents.LOSS_COMPLETED`` (before the optimizer step); on another engine at ``ITERATION_COMPLETED``.

    Example::

        NonFiniteLossGuard().attach(trainer)
    """

    def attach(self, engine: Engine) -> None:
        """Check every iteration's loss of ``engine``.

        Args:
            engine: the trainer.
        """
        try:
            engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        except ValueError:  # not a MONAI engine: its loss is only known when the iteration is done
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Raise if the current loss is NaN or infinite.

        Args:
            engine: the trainer whose ``state.output`` holds the loss.
        """
        loss = _loss_of(engine.state.output)
        if loss is None or math.isfinite(loss):
            return
        state = engine.state
        within = (state.iteration - 1) % state.epoch_length + 1 if state.epoch_length else state.iteration
        raise MedunetError(
            f"training loss is {loss} (not finite) at epoch {state.epoch}, iteration {within} of the epoch "
            f"({state.iteration} in all); training stopped before this step changed the network, and nothing of "
            f"epoch {state.epoch} was recorded or saved (the run folder keeps the last completed epoch). Fix: run "
            "'medunet check-data TASK_DIR' to find images with NaN/Inf voxels and repair them; if the data are "
            "clean, lower the learning rate (or turn off AMP), then rerun to resume from the last checkpoint."
        )
