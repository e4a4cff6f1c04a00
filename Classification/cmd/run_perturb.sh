#!/usr/bin/env bash
# Train the released CIFAR-10 ResNet-56s A-FAN model (feature PGD after layer1, 5 steps,
# gamma 0.5). Extra arguments pass through, e.g.
#   bash cmd/run_perturb.sh data.download=true
#   bash cmd/run_perturb.sh --config configs/shapes_afan.yaml   (built-in data, no download)
set -euo pipefail
source "$(dirname "$0")/../../scripts/run_module.sh"
CONFIGS="$ROOT/Classification/configs"
run_module Classification.train --config "$CONFIGS/cifar10_resnet56_afan.yaml" "$@"
