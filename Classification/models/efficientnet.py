"""timm's TF-ported EfficientNets (B0-B7) with input normalisation and a head/tail split.

The wrapper adopts the timm model's children under their own names (``conv_stem``,
``bn1``, ``blocks``, ``conv_head``, ``bn2``, ``global_pool``, ``classifier``), so timm and
AdvProp state dicts load with ``strict=True``.

A name may carry timm's weights tag after a dot, e.g. ``tf_efficientnet_b0.ap_in1k``
(AdvProp), ``.ns_jft_in1k`` (Noisy Student, timm's default for the bare name), ``.aa_in1k``,
``.in1k``. The input normalisation follows the tag: timm records in each tag's pretrained
config the mean and std its weights were trained with (0.5/0.5 for the AdvProp weights,
which take images in [-1, 1]; ImageNet's mean/std for the others), and that is read
offline, with no download.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import nn

from afan import Normalize

from .split import SplitModel, Stage

ARCHS = tuple(f"tf_efficientnet_b{i}" for i in range(8))
_TIMM_CHILDREN = ["conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier"]


def is_efficientnet(name: str) -> bool:
    """``name`` is one of ``ARCHS``, bare or with a weights tag (checked when building)."""
    return name.partition(".")[0] in ARCHS


def _check_tag(timm, name: str) -> None:
    arch, dot, tag = name.partition(".")
    known = timm.list_pretrained(f"{arch}.*")
    if dot and name not in known:
        tags = ", ".join(sorted(k.partition(".")[2] for k in known))
        raise ValueError(f"unknown weights tag {tag!r} for {arch}; timm {timm.__version__} knows: {tags} "
                         f"(e.g. {arch}.ap_in1k for the AdvProp weights)")


class TimmEfficientNet(SplitModel, nn.Module):
    classifier_key = "classifier.weight"

    def __init__(self, arch: str, num_classes: int, mean: Optional[Sequence[float]] = None,
                 std: Optional[Sequence[float]] = None, **kw):
        """``mean``/``std`` default to those of the weights tag in ``arch``."""
        try:
            import timm  # optional dependency: only these models need it
        except ImportError:
            raise ImportError(f"{arch} needs timm: pip install 'timm>=0.9.16'") from None
        super().__init__()
        _check_tag(timm, arch)
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw)
        children = [name for name, _ in net.named_children()]
        if children != _TIMM_CHILDREN:
            raise RuntimeError(
                f"timm {timm.__version__} builds {arch} from {children}, not the expected "
                f"{_TIMM_CHILDREN}; this wrapper needs updating for that timm version"
            )
        self.arch = arch
        self.num_classes = num_classes
        # create_model attaches the pretrained config of the tag (timm's default tag for a
        # bare name) without downloading anything.
        self.normalize = Normalize(net.pretrained_cfg["mean"] if mean is None else mean,
                                   net.pretrained_cfg["std"] if std is None else std)
        for name, child in net.named_children():
            self.add_module(name, child)
        self.drop_rate = net.drop_rate
        self.split_points = tuple(f"blocks.{i}" for i in range(len(self.blocks)))

    def _dropout(self, h):
        return F.dropout(h, self.drop_rate, self.training)

    def stages(self) -> list[Stage]:
        # The order of timm's EfficientNet.forward_features and forward_head.
        stages = [("normalize", self.normalize), ("conv_stem", self.conv_stem), ("bn1", self.bn1)]
        stages += [(f"blocks.{i}", block) for i, block in enumerate(self.blocks)]
        stages += [("conv_head", self.conv_head), ("bn2", self.bn2), ("global_pool", self.global_pool)]
        if self.drop_rate > 0:  # timm skips the dropout call entirely at rate 0
            stages.append(("dropout", self._dropout))
        stages.append(("classifier", self.classifier))
        return stages
