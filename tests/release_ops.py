"""Independent re-statements of the release's two feature operations, shared by the tests that
compare a step with the release's (``test_*_release.py``, ``test_*_variants.py``)."""
import torch


def mix_feature(clean, adv):
    """The release's ``mix_feature``: the clean feature re-normalised with the adversarial
    one's channel mean and unbiased variance + 1e-5, at every position."""
    def moments(t):
        mean = t.mean(dim=1, keepdim=True)
        var = ((t - mean) ** 2).sum(dim=1, keepdim=True) / (t.shape[1] - 1)
        return mean, (var + 1e-5).sqrt()

    clean_mean, clean_std = moments(clean)
    adv_mean, adv_std = moments(adv)
    return (clean - clean_mean) / clean_std * adv_std + adv_mean


def sign_step(feature, loss_fn, step):
    """One step of the release's PGD: ``feature + step * sign(d loss / d feature)``."""
    adv = feature.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(adv), adv)
    return adv.detach() + step * grad.sign()
