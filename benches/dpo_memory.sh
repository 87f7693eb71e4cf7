#!/usr/bin/env bash
# Peak memory and time of one LoRA Diffusion-DPO step, ours beside PyTorch's, one after the other
# on the same machine, for BENCHMARKS.md's memory table:
#   PY=/path/to/venv/bin/python benches/dpo_memory.sh CONFIG LATENT_SIZE [RANK] > results.jsonl
# CONFIG is a diffusers UNet config.json (random weights); each configuration runs in a fresh
# process (one warm-up, one timed step), so the peak RSS is that configuration's.
set -euo pipefail
config=$(realpath "$1"); size=$2; rank=${3:-8}
bin=${BIN:-target/release/diffalign}
py=${PY:-python3}
here=$(cd "$(dirname "$0")" && pwd)
for dtype in f32 bf16; do
  for ckpt in "" "--gradient-checkpointing"; do
    echo "# lora $rank, $dtype, ${ckpt:-no checkpointing}, latents $size" >&2
    "$bin" bench --suite dpo-step --config "$config" --latent-size "$size" --lora "$rank" --dtype "$dtype" $ckpt --repeats 1
    (cd "$here" && "$py" pytorch_dpo_step.py "$config" --latent-size "$size" --lora "$rank" --dtype "$dtype" $ckpt --repeats 1 2>/dev/null)
  done
done
