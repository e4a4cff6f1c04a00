"""Accuracy of a classifier on a data loader, clean or under pixel PGD."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from afan import distributed
from afan.rundir import progress
from Classification.config import AdvPropConfig
from Classification.steps import pixel_pgd


def evaluate(model, loader, device, memory_format=torch.contiguous_format, *,
             attack: Optional[AdvPropConfig] = None, desc: str = "eval",
             process: Optional[distributed.Process] = None) -> dict:
    """Top-1/top-5 accuracy (fractions) and mean loss; with ``attack``, on PGD images made
    against the model in eval mode.

    Under torchrun (``process`` in a process group) ``loader`` holds this process's part of the
    data, ``distributed.shard(dataset, process)``: the counts are summed over the processes,
    and every process returns the scores of the whole data set. Every process must call it."""
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for x, y in progress(loader, desc=desc, leave=False):
        x = x.to(device, memory_format=memory_format, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if attack is not None:
            x = pixel_pgd(model, x, y, attack)
        with torch.no_grad():
            logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == y[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        total += y.numel()
    if process is not None and process.distributed:
        correct1, correct5, total, loss_sum = distributed.sum_over_processes([correct1, correct5, total, loss_sum],
                                                                             device)
    if total == 0:
        raise ValueError("evaluation data set is empty")
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total}
