"""Multi-process training under ``torchrun``: process group from the environment, samplers, DDP, rank 0 writes.

``torchrun --nproc_per_node N`` (or ``python -m torch.distributed.run``) sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; :func:`init_distributed` reads them and starts the process group with ``nccl`` on GPUs and
``gloo`` on CPUs. Without them it returns a single-process context and starts nothing, so the same code path
runs alone and distributed. Multi-node works the same way (``torchrun --nnodes 2 --node_rank 0
--rdzv_endpoint HOST:PORT ...``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among ``world_size`` processes and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        """Whether more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (checkpoints, metrics, config): rank 0 only."""
        return self.rank == 0


def init_distributed(device: str | torch.device | None = None) -> DistContext:
    """Start (or join) the process group that ``torchrun`` describes in the environment.

    Args:
        device: the device to compute on; default ``cuda:LOCAL_RANK`` when CUDA is present, else ``cpu``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wrap_ddp(network: torch.nn.Module, context: DistContext) -> torch.nn.Module:
    """Wrap ``network`` in ``DistributedDataParallel`` when several processes train, else return it unchanged.

    Args:
        network: the network, already on ``context.device``.
        context: what :func:`init_distributed` returned.
    """
    if not context.is_distributed:
        return network
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(network, device_ids=device_ids)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside a DDP wrapper (its ``state_dict`` keys carry no ``module.`` prefix)."""
    return network.module if isinstance(network, DistributedDataParallel) else network


def barrier(context: DistContext) -> None:
    """Wait for all processes (no-op when alone)."""
    if context.is_distributed and dist.is_initialized():
        dist.barrier()


def shutdown(context: DistContext) -> None:
    """Leave the process group started by :func:`init_distributed`."""
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
