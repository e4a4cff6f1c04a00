#!/usr/bin/env bash
# Train the released VOC2007 Faster R-CNN R-50-C4 A-FAN run, setting 1 (SE after layer2, mask 0011,
# SD on the RoI head's output; ImageNet ResNet-50 from weights/resnet50-0676ba61.pth, see
# Detection/README.md). Extra arguments pass through, e.g.
#   bash cmd/run_perturb.sh --config configs/coco_resnet50_afan.yaml
#   bash cmd/run_perturb.sh --config configs/shapes_afan.yaml   (built-in data, no download)
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
run_module Detection.train --config "$ROOT/Detection/configs/voc07_resnet50_afan.yaml" "$@"
