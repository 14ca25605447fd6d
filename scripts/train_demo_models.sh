#!/usr/bin/env bash
# Reproduce the bundled demo models: trained from scratch on the bundled Fashion-MNIST subset
# (12k train images), evaluated on its 3k test images. Writes checkpoints + JSON records to
# t2tedge/models/demo_weights/ (or $1). Timing goes to <dir>/train_demo_models.json.
set -euo pipefail
out="${1:-t2tedge/models/demo_weights}"
mkdir -p "$out"
start=$(date +%s)
t2tedge train t2t_vit_7 --image-size 48 --crop-pct 1.0 --epochs 8 --lr 1e-3 --seed 0 \
  -o "$out/t2t_vit_7-fashion_mnist.pt"
mid=$(date +%s)
t2tedge train mobilenet_v2 --image-size 48 --crop-pct 1.0 --epochs 3 --lr 2e-3 --seed 0 \
  -o "$out/mobilenet_v2-fashion_mnist.pt"
end=$(date +%s)
printf '{"t2t_vit_7_seconds": %d, "mobilenet_v2_seconds": %d, "total_seconds": %d, "cores": %d}\n' \
  $((mid - start)) $((end - mid)) $((end - start)) "$(nproc)" > "$out/train_demo_models.json"
cat "$out/train_demo_models.json"
