#!/usr/bin/env bash
# Train the released VOC2012 DeepLabv3+ R-50 (output stride 16) baseline. Extra arguments
# pass through, e.g.
#   bash cmd/run_base.sh --config configs/cityscapes_resnet50_base.yaml
#   bash cmd/run_base.sh --config configs/shapes_base.yaml     (built-in data, no download)
# The released configs read the ImageNet backbone from weights/resnet50-0676ba61.pth under the
# current folder (how to get it: Segmentation/README.md), or pass model.backbone_weights=.
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
run_module Segmentation.train --config "$ROOT/Segmentation/configs/voc12_resnet50_base.yaml" "$@"
