#!/usr/bin/env bash
# Score a checkpoint (this project's, a plain state dict, or the original release's) on the
# data its run was tested on (its config.yaml), or the CIFAR-10 test set for a checkpoint
# without one. Extra arguments pass through, e.g.
#   bash cmd/run_test.sh --checkpoint AFAN_resnet56.pth.tar
#   bash cmd/run_test.sh --checkpoint runs/shapes_afan/best.pth --pgd-eps 2
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
run_module Classification.test --fallback data.name=cifar10 "$@"
