#!/usr/bin/env bash
# Evaluate a detection checkpoint (this project's or a plain torchvision FasterRCNN state
# dict) on the data its run was tested on (its config.yaml), or VOC2007 test for a checkpoint
# without one. Extra arguments pass through, e.g.
#   bash cmd/run_test.sh --checkpoint runs/voc07_resnet50_afan/final.pth
#   bash cmd/run_test.sh --checkpoint runs/shapes_det_afan/final.pth
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
run_module Detection.test --fallback data.name=voc07 "$@"
