#!/usr/bin/env bash
# One prepared GPU session: parity of the CUDA build against the CPU on the same machine, then
# our benchmarks beside PyTorch's on the GPU. Run from the repository root; writes to $OUT.
set -u
G=device-bin/gpu # prepared as device/README.md says
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
log() { echo "== $*"; }
nvidia-smi -L
xz -dc $G/diffalign.xz > /tmp/diffalign && chmod +x /tmp/diffalign || python3 -c 'import lzma,sys;open("/tmp/diffalign","wb").write(lzma.open(sys.argv[1]).read())' $G/diffalign.xz
chmod +x /tmp/diffalign
libs=$(python3 device/cuda-lib-dirs.py | paste -sd:)
export LD_LIBRARY_PATH="$PWD/$G:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd /tmp/diffalign | grep -E "not found|cublas|curand|cudart"
D=/tmp/diffalign
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site

log "parity: lm loss, all losses, cuda vs cpu"
for lt in sigmoid ipo simpo orpo; do
  ref=""; [ $lt != simpo ] && [ $lt != orpo ] && ref="--reference $G/lm/reference"
  for dev in cpu cuda; do
    timeout 60 $D lm loss --policy $G/lm/policy $ref --batch $G/lm/batch.safetensors --loss-type $lt --beta 2 --device $dev > "$OUT/lm-$lt-$dev.json" 2>&1 || echo "lm loss $lt $dev failed: $(tail -2 $OUT/lm-$lt-$dev.json)"
  done
  python3 -c "
import json,sys
a=json.load(open('$OUT/lm-$lt-cpu.json'));b=json.load(open('$OUT/lm-$lt-cuda.json'))
d=max(abs(x-y) for k in ('logp_w','logp_l') for x,y in zip(a[k],b[k]))
print('$lt', 'loss cpu', a['loss'], 'cuda', b['loss'], 'max logp diff', d)" 2>&1
done
log "parity: generate on the embedded model, cuda vs cpu"
for dev in cpu cuda; do
  timeout 90 $D generate --device $dev --prompt "a red circle on a blue background" --steps 20 --seed 3 --out "$OUT/gen-$dev.png" > "$OUT/gen-$dev.log" 2>&1 || { echo "generate $dev failed"; tail -3 "$OUT/gen-$dev.log"; }
done
python3 -c "
import numpy as np; from PIL import Image
a,b=(np.asarray(Image.open('$OUT/gen-%s.png'%d).convert('RGB'),dtype=np.int16) for d in ('cpu','cuda'))
print('generate cuda vs cpu: max abs diff', np.abs(a-b).max(), '/255, mean', np.abs(a-b).mean())" 2>&1

log "bench: ours on cuda"
timeout 120 $D bench --device cuda --suite unet --config $G/bench/unet-mid/config.json --repeats 5 2>&1
timeout 90 $D bench --device cuda --suite dpo-step --config $G/bench/unet-mid/config.json --repeats 5 2>&1
timeout 90 $D bench --device cuda --suite lm --config benches/llama-small/config.json --batch 4 --seq 256 --repeats 5 2>&1
timeout 120 $D bench --device cuda --suite reno --config $G/bench/unet-mid/config.json --vae-config $G/bench/vae-mid/config.json --clip-config $G/bench/clip-mid/config.json --repeats 3 2>&1
log "bench: our CUDA kernels against candle's composed ops (kernels/cuda)"
timeout 120 $D bench --device cuda --suite kernels --repeats 5 2>&1
log "bench: dpo-step and reno on our CUDA kernels (DIFFALIGN_CUDA_KERNELS=1)"
DIFFALIGN_CUDA_KERNELS=1 timeout 90 $D bench --device cuda --suite dpo-step --config $G/bench/unet-mid/config.json --repeats 5 2>&1
DIFFALIGN_CUDA_KERNELS=1 timeout 120 $D bench --device cuda --suite reno --config $G/bench/unet-mid/config.json --vae-config $G/bench/vae-mid/config.json --clip-config $G/bench/clip-mid/config.json --repeats 3 2>&1
log "bench: pytorch on cuda"
BENCH_DEVICE=cuda timeout 120 python3 benches/pytorch_unet.py $G/bench/unet-mid/config.json 5 2>&1 | grep -v Warning
BENCH_DEVICE=cuda timeout 90 python3 benches/pytorch_lm.py benches/llama-small/config.json 5 --batch 4 --seq 256 2>&1 | tail -2
log done
