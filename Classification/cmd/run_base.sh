#!/usr/bin/env bash
# Train the released CIFAR-10 ResNet-56s baseline. Extra arguments pass through, e.g.
#   bash cmd/run_base.sh data.download=true
#   bash cmd/run_base.sh --config configs/shapes_base.yaml     (built-in data, no download)
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
CONFIGS="$ROOT/Classification/configs"
run_module Classification.train --config "$CONFIGS/cifar10_resnet56_base.yaml" "$@"
