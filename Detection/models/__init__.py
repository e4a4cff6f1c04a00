"""Faster R-CNN (torchvision) for A-FAN: model building and loading, and one training pass
cut into ``prepare`` / ``head`` / ``tail`` with the RoI part exposed (``parts``)."""
from .faster_rcnn import MODEL_NAMES, DetectionModel, create_model
from .loading import checkpoint_payload, load_model
from .parts import RoiSample, TailState, box_losses, forward_losses, head, prepare, roi_losses, tail

__all__ = ["MODEL_NAMES", "DetectionModel", "RoiSample", "TailState", "box_losses", "checkpoint_payload",
           "create_model", "forward_losses", "head", "load_model", "prepare", "roi_losses", "tail"]
