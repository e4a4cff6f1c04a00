"""A-FAN on your own model, end to end: a small CNN on the built-in Shapes data.

``python -m afan.demo mode=afan`` trains with adversarial feature augmentation after
``block1`` (with auxiliary BN), ``mode=base`` trains plainly; both log to a run folder
(config, metrics CSV, curves PNG, checkpoints). It uses only the public ``afan`` API and is
the pattern the task folders follow: split the model into head and tail, attack the
feature inside ``frozen_bn_stats``, build the strengths, and route the adversarial passes
through the auxiliary BN.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import afan
from afan.checkpoint import save_checkpoint
from afan.config import add_config_arguments, load_config
from afan.rundir import RunDir, progress
from afan.runtime import select_device, seed_everything
from afan.shapes import NUM_CLASSES, ShapesDataset


@dataclass
class DemoConfig:
    mode: Literal["base", "afan"] = "afan"
    epochs: int = 12
    batch_size: int = 128
    lr: float = 0.1
    train_size: int = 5000
    val_size: int = 1000
    image_size: int = 32
    seed: int = 0
    device: str = "auto"
    out: str = "runs/demo"
    # A-FAN settings (classification release: 5 steps, gamma 0.5, one strength, no mixing).
    split_after: Literal["block1", "block2"] = "block1"
    steps: int = 5
    gamma: float = 0.5
    n: int = 1
    mask: str = "0"
    aux_bn: bool = True

    def __post_init__(self):
        for name in ("epochs", "batch_size", "train_size", "val_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0 or self.gamma < 0:
            raise ValueError(f"steps and gamma must be non-negative, got {self.steps} and {self.gamma}")
        if len(self.mask) != self.n:
            raise ValueError(f"mask {self.mask!r} must have one character per strength (n = {self.n})")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class ShapesCNN(nn.Module):
    """Three conv blocks and a linear classifier; takes images in [0, 1]."""

    split_points = ("block1", "block2")

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.normalize = afan.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        self.block1, self.block2, self.block3 = _block(3, 32), _block(32, 64), _block(64, 128)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))

    def _stages(self):
        return [("block1", nn.Sequential(self.normalize, self.block1)), ("block2", self.block2),
                ("block3", nn.Sequential(self.block3, self.classifier))]

    def head(self, x: torch.Tensor, at: str) -> torch.Tensor:
        for name, stage in self._stages():
            x = stage(x)
            if name == at:
                return x
        raise ValueError(f"unknown split point {at!r}; valid: {self.split_points}")

    def tail(self, h: torch.Tensor, at: str) -> torch.Tensor:
        names = [name for name, _ in self._stages()]
        if at not in self.split_points:
            raise ValueError(f"unknown split point {at!r}; valid: {self.split_points}")
        for _, stage in self._stages()[names.index(at) + 1:]:
            h = stage(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x, "block1"), "block1")


def afan_loss(model: ShapesCNN, x, y, cfg: DemoConfig):
    """The A-FAN classification loss ``(L_clean + L_adv) / 2`` and the perturbation sizes."""
    at = cfg.split_after
    h = model.head(x, at)
    logits = model.tail(h, at)
    loss_clean = F.cross_entropy(logits, y)

    def attacked_loss(feature):
        return F.cross_entropy(model.tail(feature, at), y)

    with afan.frozen_bn_stats(model), afan.use_aux_bn(model, enabled=cfg.aux_bn):
        h_adv = afan.feature_pgd(h, attacked_loss, steps=cfg.steps, step_size=cfg.gamma / 255)
    features = afan.mix_by_mask(h, afan.interpolate(h, h_adv, cfg.n), cfg.mask)
    with afan.use_aux_bn(model, enabled=cfg.aux_bn):
        loss_adv = sum(attacked_loss(f) for f in features) / len(features)
    delta = (h_adv - h.detach()).flatten(1)
    sizes = {"pert_l2": delta.norm(dim=1).mean().item(), "pert_linf": delta.abs().amax(dim=1).mean().item()}
    return (loss_clean + loss_adv) / 2, logits, sizes


def _in_memory(dataset) -> TensorDataset:
    """Render every image once, so epochs read them from memory instead of drawing them again."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(images), torch.tensor(labels))


@torch.no_grad()
def evaluate(model: nn.Module, loader, device) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
    return correct / total


def train(cfg: DemoConfig, overwrite: bool = False) -> dict:
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    run = RunDir(cfg.out, overwrite=overwrite)
    run.save_config(cfg)
    metrics = run.metrics

    common = dict(image_size=cfg.image_size, seed=cfg.seed)
    train_set = ShapesDataset("classification", "train", size=cfg.train_size, **common)
    val_set = ShapesDataset("classification", "val", size=cfg.val_size, **common)
    train_set, val_set = _in_memory(train_set), _in_memory(val_set)
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(val_set, batch_size=256)

    model = ShapesCNN().to(device)
    if cfg.mode == "afan" and cfg.aux_bn:
        afan.convert_aux_bn(model, after=cfg.split_after)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    steps_total = cfg.epochs * len(train_loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=steps_total)

    best, start = 0.0, time.perf_counter()
    for epoch in range(cfg.epochs):
        model.train()
        seen = correct = loss_sum = 0
        sizes = {"pert_l2": 0.0, "pert_linf": 0.0}
        for x, y in progress(train_loader, desc=f"{cfg.mode} epoch {epoch}", leave=False):
            x, y = x.to(device), y.to(device)
            if cfg.mode == "afan":
                loss, logits, step_sizes = afan_loss(model, x, y, cfg)
                sizes = {k: sizes[k] + v * y.numel() for k, v in step_sizes.items()}
            else:
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += y.numel()
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += loss.item() * y.numel()
        val_acc = evaluate(model, val_loader, device)
        row = dict(epoch=epoch, train_loss=loss_sum / seen, train_acc=correct / seen, val_acc=val_acc,
                   lr=scheduler.get_last_lr()[0], time=time.perf_counter() - start)
        if cfg.mode == "afan":
            row.update({k: v / seen for k, v in sizes.items()})
        metrics.log(**row)
        state = {"model": afan.strip_aux_bn(model).state_dict(), "epoch": epoch, "val_acc": val_acc}
        save_checkpoint(state, run.last_checkpoint)
        if val_acc >= best:
            best = val_acc
            save_checkpoint(state, run.best_checkpoint)
        print(f"epoch {epoch}: loss {row['train_loss']:.3f} train {row['train_acc']:.3f} "
              f"val {val_acc:.3f} ({row['time']:.0f}s)", flush=True)
    metrics.plot(run.path / "curves.png", x="epoch")
    summary = {"mode": cfg.mode, "final_val_acc": val_acc, "best_val_acc": best,
               "seconds": time.perf_counter() - start, "chance": 1 / NUM_CLASSES}
    print("SUMMARY " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in summary.items()), flush=True)
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE overrides may follow flags
    train(load_config(DemoConfig, args.config, args.overrides), overwrite=args.overwrite)


if __name__ == "__main__":
    main()
