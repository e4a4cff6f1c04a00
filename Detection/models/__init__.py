"""Faster R-CNN (the release's R-C4 and torchvision's FPN) for A-FAN: model building, ImageNet
backbone weights and checkpoint loading, and one training pass cut into ``prepare`` /
``head`` / ``tail`` with the RoI part exposed (``parts``)."""
from .backbone_weights import WEIGHT_URLS, load_backbone_weights
from .faster_rcnn import DEFAULTS, MODEL_NAMES, DetectionModel, create_model, family
from .loading import checkpoint_payload, load_model
from .parts import (RoiSample, forward_losses, head, predictor_losses, prepare, roi_training_losses,
                    tail)

__all__ = ["DEFAULTS", "MODEL_NAMES", "WEIGHT_URLS", "DetectionModel", "RoiSample", "checkpoint_payload",
           "create_model", "family", "forward_losses", "head", "load_backbone_weights", "load_model",
           "predictor_losses", "prepare", "roi_training_losses", "tail"]
