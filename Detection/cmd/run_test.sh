#!/usr/bin/env bash
# Evaluate a detection checkpoint (this project's or a plain torchvision FasterRCNN state
# dict) on VOC2007 test. Extra arguments pass through, e.g.
#   bash cmd/run_test.sh --checkpoint runs/voc07_resnet50_afan/final.pth
#   bash cmd/run_test.sh --checkpoint runs/shapes_det_afan/final.pth data.name=shapes
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
run_module Detection.test data.name=voc07 "$@"
