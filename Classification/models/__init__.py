"""Classification models with a named head/tail split for A-FAN.

``create_model(name, num_classes)`` builds CIFAR ResNet-s, torchvision ResNets and timm
TF-EfficientNets that take images in [0, 1] and expose ``split_points``,
``head(x, at)`` and ``tail(h, at)``; ``load_model(path)`` reads checkpoints back.
"""
from .loading import checkpoint_payload, load_model
from .registry import MODEL_NAMES, create_model

__all__ = ["MODEL_NAMES", "checkpoint_payload", "create_model", "load_model"]
