"""Training on several processes with PyTorch's DistributedDataParallel, as ``torchrun`` starts them.

    torchrun --nproc_per_node 4 -m Classification.train --config ...          # one machine
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m Classification.train --config ...          # two machines

``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them a run is one plain
process. Under ``torchrun`` a process joins the process group even when it is the only one, so
``torchrun --nproc_per_node 1`` runs the multi-GPU code (DDP, NCCL, SyncBatchNorm) on one GPU.
The backend is NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``) and gloo on the CPU.
``batch_size`` stays the global batch: each process takes ``batch_size / world_size`` of it.

A-FAN's step calls the model's parts (head, tail, attacks) rather than its ``forward``, which is
where DDP prepares gradient averaging, so the whole training step is wrapped as the forward of
one module (:class:`StepModule`): DDP then averages the gradients of the step's loss. The
attacks take gradients only towards features (``torch.autograd.grad``), which DDP does not see.
Without SyncBatchNorm each process normalises its own part of the batch, and BatchNorm running
statistics follow process 0 (DDP broadcasts them at every step).

Evaluation is sharded: each process predicts its :func:`shard` of the evaluation set, the
counts (or predictions) are summed (or gathered) over the processes, and every process ends with
the scores one process would have computed on the whole set; files are written by process 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, Subset

from afan_harness.config import ConfigError
from afan.norm import AuxBatchNorm2d
from afan_harness.runtime import select_device

# How long a process waits in a collective for the others. An evaluation's files and figures
# (detections.json, per-class CSVs, pictures) are written by process 0 alone while the others
# wait for its result; on a large test split that can outlast the defaults (10 minutes for NCCL,
# 30 for gloo). The price is that a process that really hangs is noticed this late.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False  # in a process group (started by torchrun)

    @property
    def is_main(self) -> bool:
        """Logging, checkpoints and evaluation files happen here only."""
        return self.rank == 0


def start(device_name: str) -> tuple[Process, torch.device]:
    """This process's place in the run and its device; joins the process group under torchrun."""
    device = select_device(device_name)
    if "RANK" not in os.environ:
        return Process(), device
    process = Process(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")),
                      distributed=True)
    if device.type == "cuda":
        device = torch.device("cuda", process.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return process, device


def launch(train: Callable, cfg, **kwargs):
    """``train(cfg, process, device, **kwargs)`` in this process's place of the run (joining
    and leaving the process group under torchrun)."""
    process, device = start(cfg.device)
    try:
        return train(cfg, process, device, **kwargs)
    finally:
        stop()


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(process: Process):
    """Process 0 runs the block first (e.g. writing a data set to disk), the others after it."""
    if process.distributed and not process.is_main:
        dist.barrier()
    yield
    if process.distributed and process.is_main:
        dist.barrier()


def local_batch_size(batch_size: int, process: Process) -> int:
    if batch_size % process.world_size:
        raise ConfigError(f"batch_size={batch_size} does not split over {process.world_size} processes; "
                         f"use a multiple of {process.world_size}")
    return batch_size // process.world_size


class StepModule(nn.Module):
    """A training step as a module: ``forward(*batch)`` runs ``step(model, *batch)`` and returns
    its result's fields as a tuple (DDP looks for tensors in plain containers)."""

    def __init__(self, model: nn.Module, step: Callable):
        super().__init__()
        self.model = model
        self.step = step

    def forward(self, *batch):
        result = self.step(self.model, *batch)
        return type(result), tuple(getattr(result, f.name) for f in dataclasses.fields(result))


def step_runner(model: nn.Module, step: Callable, process: Process, device: torch.device,
                sync_bn: bool = False) -> Callable:
    """``run(*batch) -> step result`` whose loss, back-propagated, gives gradients averaged over
    the processes (plain ``step(model, *batch)`` in a single process). ``sync_bn`` turns every
    BatchNorm into SyncBatchNorm (CUDA only; not with auxiliary BN)."""
    if sync_bn:
        if not process.distributed:
            raise ConfigError("sync_bn=true shares BatchNorm statistics between the processes of a torchrun run; "
                              "this is one plain process: start it with torchrun, or set sync_bn=false")
        if device.type != "cuda":
            raise ConfigError("sync_bn needs CUDA: PyTorch's SyncBatchNorm does not run on the CPU; set sync_bn=false")
        if any(isinstance(m, AuxBatchNorm2d) for m in model.modules()):
            raise ConfigError("sync_bn does not combine with auxiliary BN (advprop, afan.aux_bn); set sync_bn=false")
    if not process.distributed:
        return lambda *batch: step(model, *batch)
    if sync_bn:
        # Replaces the BatchNorm children in place (keeping their parameters, which the
        # optimizer holds), so the task's own reference to the model sees them too.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapped = DistributedDataParallel(StepModule(model, step), device_ids=[device.index] if device.type == "cuda" else None)

    def run(*batch):
        result_type, values = wrapped(*batch)
        return result_type(*values)
    return run


def gather(value, process: Process) -> list:
    """Every process's ``value`` (any picklable object), in rank order; every process must call it."""
    if not process.distributed:
        return [value]
    values = [None] * process.world_size
    dist.all_gather_object(values, value)
    return values


def sum_over_processes(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all processes (the values themselves in a single process)."""
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def sum_tensor_over_processes(tensor: torch.Tensor, process: Process) -> torch.Tensor:
    """``tensor`` replaced in place by its element-wise sum over all processes (e.g. confusion
    matrices); unchanged in a single process. Every process must call it."""
    if process.distributed:
        dist.all_reduce(tensor)
    return tensor


def broadcast_object(value, process: Process):
    """Process 0's ``value`` (any picklable object) on every process; every process must call
    it, the others with any placeholder (e.g. None)."""
    if not process.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(dataset: Dataset, process: Process) -> Dataset:
    """This process's part of an evaluation set: every ``world_size``-th item from ``rank`` on
    (the dataset itself in a single process). The parts are disjoint and cover the whole set;
    they differ in length by at most one. The evaluation code reads only the items and the
    length of a data set, which ``Subset`` keeps."""
    if not process.distributed:
        return dataset
    return Subset(dataset, range(process.rank, len(dataset), process.world_size))


def gather_shards(items: list, process: Process) -> list:
    """The per-item results of every process's :func:`shard` (``items`` in the shard's order),
    put back in the order of the whole data set, on every process; every process must call it."""
    parts = gather(items, process)
    # Item i of the data set is item i // world_size of the shard of process i % world_size.
    return [part[k] for k in range(len(parts[0])) for part in parts if k < len(part)]
