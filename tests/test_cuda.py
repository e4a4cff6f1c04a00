"""The same training steps on the CPU and on CUDA (float32, no TF32) give the same losses,
adversarial features, parameter gradients and BatchNorm statistics: nothing in the method
depends on where it runs. Skipped where there is no GPU."""
import copy

import torch

import afan
from afan_harness.settings import AdvPropConfig
from Classification.config import AfanConfig as ClsAfanConfig
from Classification.models import create_model as create_classifier
from Classification.steps import advprop_step as cls_advprop_step
from Classification.steps import afan_step as cls_afan_step
from Segmentation.config import AfanConfig as SegAfanConfig
from Segmentation.models import create_model as create_segmenter
from Segmentation.steps import afan_step as seg_afan_step


def _on_both(model, step, *batch):
    """``step(model, *batch)`` and its backward on the CPU and on CUDA, each on its own copy."""
    runs = {}
    for device in ("cpu", "cuda"):
        copy_ = copy.deepcopy(model).to(device)
        result = step(copy_, *(t.to(device) for t in batch))
        result.loss.backward()
        runs[device] = (copy_, result)
    return runs


def _relative_error(a, b) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _assert_same_model_state(cpu_model, cuda_model, tolerance):
    """The model's whole gradient (all parameters, flattened) and its BatchNorm statistics
    agree within ``tolerance``, as the norm of the difference relative to the CPU's. (Taken
    whole: a BN bias followed by another training-mode BN has a gradient of zero up to
    rounding, which no relative comparison of that parameter alone can hold to anything.)"""
    def flat(tensors):
        return torch.cat([t.detach().cpu().double().flatten() for t in tensors])

    error = _relative_error(flat(q.grad for q in cuda_model.parameters()), flat(p.grad for p in cpu_model.parameters()))
    assert error < tolerance, f"gradients: relative error {error:.2e}"
    statistics = [(c, b) for c, b in zip(cuda_model.buffers(), cpu_model.buffers()) if b.is_floating_point()]
    error = _relative_error(flat(c for c, _ in statistics), flat(b for _, b in statistics))
    assert error < tolerance, f"BatchNorm statistics: relative error {error:.2e}"


def _assert_same_sign_steps(cuda_step, cpu_step, reach):
    """Sign-gradient PGD steps (``reach``: all steps together): where a gradient is zero up to
    rounding (units a ReLU switched off) the devices may step in opposite directions, so a few
    entries differ, by at most twice the reach."""
    delta = (cuda_step.cpu() - cpu_step).abs()
    same = (delta < 1e-6).float().mean().item()
    assert same > 0.97, f"only {same:.1%} of the entries took the same steps"
    assert delta.max() <= 2 * reach + 1e-6


def test_classification_afan_step_is_the_same_on_cuda(cuda):
    torch.manual_seed(0)
    model = create_classifier("resnet20", 6).train()
    afan.convert_aux_bn(model, after="layer2")
    # L2 steps (the gradient over its norm) are continuous in the gradient, so float32 rounding
    # cannot flip them as it can the signs of L-infinity steps: the devices must agree closely.
    cfg = ClsAfanConfig(layer="layer2", steps=3, gamma=1.0, n=2, mask="01", aux_bn=True, norm="2")
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 6, (16,))
    runs = _on_both(model, lambda m, x, y: cls_afan_step(m, x, y, cfg), x, y)
    (cpu_model, cpu), (cuda_model, gpu) = runs["cpu"], runs["cuda"]
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-4, atol=0)
    # Measured on an H200: 1.4e-3 for the feature (cuDNN's float32 convolutions round otherwise).
    assert _relative_error(gpu.perturbation, cpu.perturbation) < 1e-2
    _assert_same_model_state(cpu_model, cuda_model, 1e-2)


def test_classification_advprop_step_is_the_same_on_cuda(cuda):
    torch.manual_seed(0)
    model = create_classifier("resnet20", 6).train()
    afan.convert_aux_bn(model)
    cfg = AdvPropConfig(steps=2, eps=4.0, step_size=1.0, random_start=False)  # no draws: the devices differ
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 6, (16,))
    runs = _on_both(model, lambda m, x, y: cls_advprop_step(m, x, y, cfg), x, y)
    (cpu_model, cpu), (cuda_model, gpu) = runs["cpu"], runs["cuda"]
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-4, atol=0)
    _assert_same_sign_steps(gpu.perturbation, cpu.perturbation, 2 * 1.0 / 255)
    # A few pixels stepped the other way: the first convolution's gradient, which reads the
    # pixels, differed by 6% on an H200.
    _assert_same_model_state(cpu_model, cuda_model, 0.1)


def test_segmentation_afan_step_is_the_same_on_cuda(cuda):
    torch.manual_seed(0)
    model = create_segmenter("deeplabv3plus_mobilenet", 5).train()
    model.classifier.aspp.project[-1].p = 0.0  # no dropout: the devices draw different masks
    cfg = SegAfanConfig(se_steps=1, gamma_se=2.0, sd_steps=1, gamma_sd=2.0)
    images, masks = torch.rand(4, 3, 48, 48), torch.randint(0, 5, (4, 48, 48))
    runs = _on_both(model, lambda m, images, masks: seg_afan_step(m, images, masks, cfg), images, masks)
    (cpu_model, cpu), (cuda_model, gpu) = runs["cpu"], runs["cuda"]
    for key, value in cpu.losses.items():
        torch.testing.assert_close(gpu.losses[key].cpu(), value, rtol=1e-4, atol=0, msg=key)
    _assert_same_sign_steps(gpu.perturbation, cpu.perturbation, 2.0 / 255)
    _assert_same_sign_steps(gpu.sd_perturbation, cpu.sd_perturbation, 2.0 / 255)
    _assert_same_model_state(cpu_model, cuda_model, 0.1)  # a few entries stepped the other way
