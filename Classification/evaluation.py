"""Accuracy of a classifier on a data loader: clean, under pixel PGD or under a feature attack."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

import afan

from afan_harness import distributed
from afan_harness.rundir import progress
from afan_harness.robustness import FeatureAttack
from Classification.config import AdvPropConfig
from Classification.steps import pixel_pgd


def pgd_logits(model, attack: AdvPropConfig, bn: str = "main") -> Callable:
    """``predict(x, y)``: the logits of PGD images made against the model in eval mode, the
    attack's passes through its main or, with ``bn="aux"``, its auxiliary BN (AdvProp's
    question: which BN should the attacker see); the logits always use the main BN."""
    def predict(x, y):
        with afan.use_aux_bn(model, enabled=bn == "aux", in_eval=True):
            adversarial = pixel_pgd(model, x, y, attack)
        return model(adversarial)
    return predict


def feature_logits(model, attack: FeatureAttack) -> Callable:
    """``predict(x, y)``: the logits of the model on the feature after ``attack.layer``
    perturbed by ``attack`` (the release's ``eval_sat_layers.py``)."""
    def predict(x, y):
        with torch.no_grad():
            h = model.head(x, attack.layer)
        feature = attack.perturb(h, lambda f: F.cross_entropy(model.tail(f, attack.layer), y))
        return model.tail(feature, attack.layer)
    return predict


def evaluate(model, loader, device, memory_format=torch.contiguous_format, *,
             predict: Optional[Callable] = None, desc: str = "eval",
             process: Optional[distributed.Process] = None) -> dict:
    """Top-1/top-5 accuracy (fractions) and mean loss of the model in eval mode; with
    ``predict(x, y) -> logits`` (e.g. ``pgd_logits``, ``feature_logits``), of its logits.

    Under torchrun (``process`` in a process group) ``loader`` holds this process's part of the
    data, ``distributed.shard(dataset, process)``: the counts are summed over the processes,
    and every process returns the scores of the whole data set. Every process must call it."""
    model.eval()
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for x, y in progress(loader, desc=desc, leave=False):
        x = x.to(device, memory_format=memory_format, non_blocking=True)
        y = y.to(device, non_blocking=True)
        if predict is None:
            with torch.no_grad():
                logits = model(x)
        else:
            logits = predict(x, y).detach()
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
