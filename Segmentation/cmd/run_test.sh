#!/usr/bin/env bash
# Evaluate a segmentation checkpoint (this project's, DeepLabV3Plus-Pytorch's or a plain state
# dict) on the data its run was evaluated on (its config.yaml), or VOC2012 val for a
# checkpoint without one. Extra arguments pass through, e.g.
#   bash cmd/run_test.sh --checkpoint runs/voc12_resnet50_afan/final.pth
#   bash cmd/run_test.sh --checkpoint runs/shapes_seg_afan/final.pth
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
run_module Segmentation.test --fallback data.name=voc12 "$@"
