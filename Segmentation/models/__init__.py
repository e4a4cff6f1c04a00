"""DeepLabv3+ (DeepLabV3Plus-Pytorch layout) for A-FAN: building, loading, and the
``head`` / ``encode`` / ``fuse`` / ``classify`` cut of its forward pass, ImageNet backbone
files."""
from .deeplab import MODEL_NAMES, SPLIT_POINTS, DeepLabV3Plus, Features, create_model
from .loading import checkpoint_payload, infer_arch, load_backbone_weights, load_model

__all__ = ["MODEL_NAMES", "SPLIT_POINTS", "DeepLabV3Plus", "Features", "checkpoint_payload", "create_model",
           "infer_arch", "load_backbone_weights", "load_model"]
