#!/usr/bin/env bash
# The main job: a short DreamBooth run on the built-in tiny model and the bundled example
# images, then one sample image from the trained pipeline. Re-running starts afresh.
set -euo pipefail
BIN=${1:-.venv/bin}
OUT=${2:-outputs/demo}
rm -rf "$OUT"
"$BIN/jaxbooth" train --output_dir="$OUT" --resolution=64 --train_batch_size=1 \
    --learning_rate=1e-4 --max_train_steps=30 --checkpointing_steps=15 --seed=0
"$BIN/jaxbooth" generate "$OUT" "a photo of sks toy" -n 1 --steps 20 --seed 0 --out "$OUT/samples"
echo "trained pipeline: $OUT   sample: $(ls "$OUT"/samples/*.png | head -1)"
