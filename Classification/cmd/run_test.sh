#!/usr/bin/env bash
# Score a checkpoint (this project's, a plain state dict, or the original release's) on the
# CIFAR-10 test set. Extra arguments pass through, e.g.
#   bash cmd/run_test.sh --checkpoint AFAN_resnet56.pth.tar
#   bash cmd/run_test.sh --checkpoint runs/shapes_afan/best.pth data.name=shapes --pgd-eps 2
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
CONFIGS="$ROOT/Classification/configs"
run_module Classification.test data.name=cifar10 "$@"
