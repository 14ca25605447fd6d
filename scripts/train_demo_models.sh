#!/usr/bin/env bash
# Reproduce the bundled demo models: trained from scratch on the bundled Fashion-MNIST subset
# (12k train images), evaluated on its 3k test images. Two trainings run side by side, one core
# each. Writes checkpoints + JSON records to t2tedge/models/demo_weights/ (or $1); the wall-clock
# time of the whole script goes to <dir>/train_demo_models.json.
set -euo pipefail
out="${1:-t2tedge/models/demo_weights}"
mkdir -p "$out"
start=$(date +%s)
t2tedge train t2t_vit_7 --image-size 48 --crop-pct 1.0 --epochs 6 --lr 1e-3 --no-augment --threads 1 --seed 0 \
  -o "$out/t2t_vit_7-fashion_mnist.pt" > "$out/t2t_vit_7-train.log" 2>&1 &
t2t=$!
t2tedge train mobilenet_v2 --image-size 48 --crop-pct 1.0 --epochs 4 --lr 2e-3 --no-augment --threads 1 --seed 0 \
  -o "$out/mobilenet_v2-fashion_mnist.pt" > "$out/mobilenet_v2-train.log" 2>&1 &
mbv2=$!
wait "$mbv2"  # two at a time on 2 cores; MobileNetV3-Small takes the core MobileNetV2 frees
t2tedge train mobilenet_v3_small --image-size 48 --crop-pct 1.0 --epochs 4 --lr 2e-3 --no-augment --threads 1 --seed 0 \
  -o "$out/mobilenet_v3_small-fashion_mnist.pt" > "$out/mobilenet_v3_small-train.log" 2>&1
wait "$t2t"
end=$(date +%s)
printf '{"wall_seconds": %d, "cores": %d, "parallel": true}\n' $((end - start)) "$(nproc)" > "$out/train_demo_models.json"
tail -n 2 "$out"/*-train.log
cat "$out/train_demo_models.json"
