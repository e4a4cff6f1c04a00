"""The two training objectives in one call each: A-FAN on a feature, AdvProp on the pixels.

    objective = afan.AFAN(model, "layer2", steps=5, step_size=0.5 / 255, n=2, mask="01")
    loss = objective.loss(x, y, F.cross_entropy)       # ready for loss.backward()

Both are ``nn.Module``s that hold the model, so ``DistributedDataParallel(objective)`` makes
the whole step one DDP forward (``objective(x, y, criterion)`` is ``loss``): its gradients
are averaged once, while the attacks, which differentiate towards features or pixels only,
stay local. They run under ``torch.autocast`` as the model does (the perturbation is kept in
float32, see :func:`afan.feature_pgd`). The model's ``state_dict`` is unchanged by them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from afan.batched import batch_strengths
from afan.norm import AuxBatchNorm2d, AuxNorm, check_mask, convert_aux_norm, frozen_bn_stats, mixed_strength, use_aux_bn
from afan.passes import backward_each
from afan.perturb import feature_pgd
from afan.split import split

Criterion = Callable[[Any, Any], Tensor]
Images = Union[Tensor, Sequence[Tensor]]

ATTACK_NORM_STATS = ("frozen", "update")


@dataclass
class Step:
    """What one call computed: the loss to back-propagate, the clean output (for accuracy),
    the perturbation found (adversarial minus clean, detached) and the loss terms (detached)."""

    loss: Tensor
    output: Any
    perturbation: Any
    losses: dict = field(default_factory=dict)


def _check_stats(attack_norm_stats: str) -> None:
    if attack_norm_stats not in ATTACK_NORM_STATS:
        raise ValueError(f"attack_norm_stats={attack_norm_stats!r} is not valid; choose 'frozen' (the attack leaves "
                         "BatchNorm running statistics alone) or 'update' (as the A-FAN release)")


def _has_aux(model: nn.Module) -> bool:
    return any(isinstance(m, (AuxBatchNorm2d, AuxNorm)) for m in model.modules())


def pixel_pgd(images: Images, loss_fn: Callable[[Images], Tensor], *, steps: int, step_size: float, eps: float,
              random_start: bool = True, project: bool = True, clamp_at_end: bool = False) -> Images:
    """L-infinity PGD images in [0, 1] within ``eps`` of ``images`` (a batch, or a list of
    images of different sizes, as detection models take them), ascending ``loss_fn``.

    Every iterate is kept in [0, 1]; ``clamp_at_end=True`` clamps only the final images, as the
    A-FAN release's input adversarial training (``attack_algo.adv_input``) does, so its
    iterates may leave the range. ``project=False`` drops the ``eps``-ball projection (the
    release's ``clip`` off); ``eps`` then only bounds the random start.

    A list is attacked as the concatenation of its flattened images: the element-wise
    L-infinity step, projection and clipping treat it exactly as each image on its own.
    """
    attack = dict(steps=steps, step_size=step_size, eps=eps, random_start=random_start, project=project,
                  bounds=None if clamp_at_end else (0.0, 1.0))

    def finish(adv):
        return adv.clamp(0.0, 1.0) if clamp_at_end else adv

    if isinstance(images, Tensor):
        return finish(feature_pgd(images, loss_fn, **attack))
    shapes = [image.shape for image in images]
    sizes = [image.numel() for image in images]

    def unflatten(flat):
        return [part.view(shape) for part, shape in zip(flat.split(sizes), shapes)]

    flat = torch.cat([image.detach().flatten() for image in images])
    return unflatten(finish(feature_pgd(flat, lambda f: loss_fn(unflatten(f)), **attack)))


class AdvProp(nn.Module):
    """AdvProp (Xie et al., CVPR 2020): ``(L(model(x)) + L_aux(model(x_adv))) / 2`` with
    ``x_adv`` an L-infinity PGD image, attacked and trained through the auxiliary norms.

    Convert the model first (``afan.convert_aux_bn(model)``). Units are pixel values in
    [0, 1] (``eps=4 / 255``). ``forward(model, x, target)`` gives the model's output for the
    criterion, ``model(x)`` by default (a detection model: ``lambda m, x, t: m(x, t)``).
    """

    def __init__(self, model: nn.Module, *, steps: int = 1, step_size: float = 1 / 255, eps: float = 4 / 255,
                 random_start: bool = True, attack_norm_stats: str = "frozen",
                 forward: Optional[Callable[[nn.Module, Any, Any], Any]] = None):
        super().__init__()
        _check_stats(attack_norm_stats)
        if not _has_aux(model):
            raise ValueError("AdvProp needs auxiliary norms for its adversarial passes: call "
                             "afan.convert_aux_bn(model) (or afan.convert_aux_norm) first")
        self.model = model
        self.steps, self.step_size, self.eps, self.random_start = steps, step_size, eps, random_start
        self.freeze = attack_norm_stats == "frozen"
        self.run = forward or (lambda m, x, target: m(x))

    def attack(self, x: Images, target, criterion: Criterion) -> Images:
        """The PGD images, found through the auxiliary norms."""
        with frozen_bn_stats(self.model, self.freeze), use_aux_bn(self.model):
            return pixel_pgd(x, lambda images: criterion(self.run(self.model, images, target), target),
                             steps=self.steps, step_size=self.step_size, eps=self.eps, random_start=self.random_start)

    def step(self, x: Images, target, criterion: Criterion) -> Step:
        x_adv = self.attack(x, target, criterion)
        output = self.run(self.model, x, target)
        with use_aux_bn(self.model):
            loss_adv = criterion(self.run(self.model, x_adv, target), target)
        loss_clean = criterion(output, target)
        perturbation = x_adv - x if isinstance(x, Tensor) else [a - c for a, c in zip(x_adv, x)]
        return Step((loss_clean + loss_adv) / 2, output, perturbation,
                    {"loss_clean": loss_clean.detach(), "loss_adv": loss_adv.detach()})

    def loss(self, x: Images, target, criterion: Criterion) -> Tensor:
        return self.step(x, target, criterion).loss

    def forward(self, x: Images, target, criterion: Criterion) -> Tensor:
        return self.loss(x, target, criterion)


class AFAN(nn.Module):
    """A-FAN (Chen et al., TMLR 2022) at one feature: ``(L_clean + mean_i L_i) / 2``.

    The model is split at the module named ``at`` (:func:`afan.split`), or by the ``head``
    and ``tail`` callables given (``tail(h)``, or ``tail(h, x)`` where the rest of the model
    needs the input too: pass ``tail_needs_input=True``). One step: a feature PGD of ``steps`` steps of ``step_size``
    (``eps``: project to that L-infinity ball) on ``h = head(x)``; the ``n`` strengths
    ``h + (i/n)(h_adv - h)`` (``norm="2"``: L2 steps; ``random_start``: from a random point
    of the ``eps``-ball; ``project`` defaults to whether ``eps`` is given), those marked
    ``"1"`` in ``mask`` re-normalised to the clean feature with the adversarial one's
    statistics (over ``mix_dim``; by default across the channels of an NCHW feature, and
    token features ``[B, N, C]`` must say ``mix_dim=-1``); each strength's tail pass
    back-propagated at once,
    its graph freed; then the clean tail pass. ``aux_norm=True`` converts the norm layers
    after ``at`` to auxiliary ones (``afan.convert_aux_norm``) that the attack and the
    strengths run through. ``attack_norm_stats="frozen"`` keeps BatchNorm running statistics
    out of the attack ("update": the release's attack passes update them);
    ``strengths_train_head=False`` builds the strengths from the detached clean feature, as
    released, so they train the tail only. ``batched=True`` runs the ``n`` strengths as one
    tail pass over ``n × B`` samples (:func:`afan.batch_strengths`): the same loss and
    gradients from fewer, larger kernels where every layer after the split point treats each
    sample on its own (GroupNorm, LayerNorm, eval-mode or frozen BatchNorm); a tail with a
    BatchNorm that normalises with its batch (training mode, auxiliary norms included) is
    refused with a ValueError naming the layer. It holds the ``n`` graphs together until
    their backward, where one pass per strength holds one.
    """

    def __init__(self, model: nn.Module, at: Optional[str] = None, *, steps: int = 5, step_size: float = 0.5 / 255,
                 eps: Optional[float] = None, norm: str = "inf", random_start: bool = False,
                 project: Optional[bool] = None, n: int = 1, mask: str = "0", mix_dim=None, aux_norm: bool = False,
                 attack_norm_stats: str = "frozen", strengths_train_head: bool = False, batched: bool = False,
                 head: Optional[Callable] = None, tail: Optional[Callable] = None, tail_needs_input: bool = False):
        super().__init__()
        _check_stats(attack_norm_stats)
        if (head is None) != (tail is None) or (at is None and head is None):
            raise ValueError("AFAN: name the split point (at='layer2') or give both head= and tail=")
        check_mask(mask, n, "AFAN: mask")
        if aux_norm:
            if at is None:
                raise ValueError("AFAN: aux_norm=True converts the norms after the split point: name it with at=")
            convert_aux_norm(model, after=at)
        self.model = model
        if head is None:
            head, tail = split(model, at)
            tail_needs_input = True  # split's tails take (h, x) and use x only where the graph needs it
        # A tuple, not attributes: the parts share the model's parameters, and registering
        # them as submodules would add their names to the state dict.
        self._parts = (head, tail)
        self.needs_input = tail_needs_input
        self.attack = dict(steps=steps, step_size=step_size, eps=eps, norm=norm, random_start=random_start,
                           project=eps is not None if project is None else project)
        self.n, self.mask, self.mix_dim = n, mask, mix_dim
        self.aux, self.freeze, self.detach = aux_norm or _has_aux(model), attack_norm_stats == "frozen", \
            not strengths_train_head
        self.batched = batched

    def adversarial(self, x: Tensor, target, criterion: Criterion) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """The adversarial half of :meth:`step`, for a caller that computes the other term
        itself (e.g. on PGD images): ``(h, h_adv, total, values)`` with ``h = head(x)``
        (attached), the attack's ``h_adv``, the sum of the ``n`` strengths' losses (ready for
        backward, see :func:`afan.backward_each`) and each one's detached value."""
        head, tail = self._parts
        h = head(x)

        def loss_at(feature):
            return criterion(tail(feature, x) if self.needs_input else tail(feature), target)

        with frozen_bn_stats(self.model, self.freeze), use_aux_bn(self.model, enabled=self.aux):
            h_adv = feature_pgd(h, loss_at, **self.attack)

        def strength(clean, i):
            return mixed_strength(clean, h_adv, i, self.mask, dim=self.mix_dim)

        joined_values = []

        def joined(clean):
            # One tail pass over the strengths; each one's loss kept for the step's log.
            extra = (x,) if self.needs_input else ()
            losses = batch_strengths(tail, [strength(clean, i) for i in range(1, self.n + 1)], criterion, target,
                                     *extra, model=self.model)
            joined_values[:] = [loss.detach() for loss in losses]
            return torch.stack(losses).sum()

        def strength_loss(i):
            return lambda clean: loss_at(strength(clean, i))

        passes = [joined] if self.batched else [strength_loss(i) for i in range(1, self.n + 1)]
        with use_aux_bn(self.model, enabled=self.aux):
            clean = h.detach() if self.detach else h
            adversarial, values = backward_each([clean], passes, self.model.parameters())
        return h, h_adv, adversarial, joined_values if self.batched else values

    def step(self, x: Tensor, target, criterion: Criterion) -> Step:
        tail = self._parts[1]
        h, h_adv, adversarial, values = self.adversarial(x, target, criterion)
        # The clean tail pass comes last, as released (the tail's BN statistics update last).
        output = tail(h, x) if self.needs_input else tail(h)
        loss_clean = criterion(output, target)
        losses = {"loss_clean": loss_clean.detach(), **{f"loss_{i}": v for i, v in enumerate(values, start=1)}}
        return Step((loss_clean + adversarial / self.n) / 2, output, h_adv - h.detach(), losses)

    def loss(self, x: Tensor, target, criterion: Criterion) -> Tensor:
        return self.step(x, target, criterion).loss

    def forward(self, x: Tensor, target, criterion: Criterion) -> Tensor:
        return self.loss(x, target, criterion)

