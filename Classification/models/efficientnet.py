"""timm's TF-ported EfficientNets (B0-B7) with input normalisation and a head/tail split.

The wrapper adopts the timm model's children under their own names (``conv_stem``,
``bn1``, ``blocks``, ``conv_head``, ``bn2``, ``global_pool``, ``classifier``), so timm and
AdvProp state dicts load with ``strict=True``. Inputs are normalised with mean = std = 0.5
by default, the convention of the AdvProp (``_ap``) weights.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import nn

from afan import Normalize

from .split import SplitModel, Stage

ARCHS = tuple(f"tf_efficientnet_b{i}" for i in range(8))
_TIMM_CHILDREN = ["conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool", "classifier"]


class TimmEfficientNet(SplitModel, nn.Module):
    classifier_key = "classifier.weight"

    def __init__(self, arch: str, num_classes: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), **kw):
        try:
            import timm  # optional dependency: only these models need it
        except ImportError:
            raise ImportError(f"{arch} needs timm: pip install 'timm>=0.9.16'") from None
        super().__init__()
        net = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kw)
        children = [name for name, _ in net.named_children()]
        if children != _TIMM_CHILDREN:
            raise RuntimeError(
                f"timm {timm.__version__} builds {arch} from {children}, not the expected "
                f"{_TIMM_CHILDREN}; this wrapper needs updating for that timm version"
            )
        self.arch = arch
        self.num_classes = num_classes
        self.normalize = Normalize(mean, std)
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
