#!/usr/bin/env bash
# Train the released VOC2012 DeepLabv3+ R-50 A-FAN run (SE after layer3, gamma_se 0.01,
# mask 11; SD on the ASPP output, gamma_sd 0.4; loss 0.7/0.1/0.1/0.1). Extra arguments pass
# through, e.g.
#   bash cmd/run_perturb.sh --config configs/cityscapes_resnet50_afan.yaml
#   bash cmd/run_perturb.sh --config configs/shapes_afan.yaml   (built-in data, no download)
# The released configs read the ImageNet backbone from weights/resnet50-0676ba61.pth under the
# current folder (how to get it: Segmentation/README.md), or pass model.backbone_weights=.
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
run_module Segmentation.train --config "$ROOT/Segmentation/configs/voc12_resnet50_afan.yaml" "$@"
