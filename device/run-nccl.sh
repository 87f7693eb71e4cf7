#!/usr/bin/env bash
# The NCCL backend on one GPU (issue 17): `diffalign train` as torchrun's only worker, on the
# embedded shapes-world pipeline (assets/shapes, in the working tree) and four synthetic pairs.
# A torchrun world of one on a GPU goes through NCCL all the same (ncclCommInitRank, then a
# reduce and a broadcast per gradient bucket, metric sum and barrier), so one GPU exercises the
# collectives that eight use; only the TCP exchange of the id is skipped (no other rank).
#
#   bash device/run-nccl.sh        # about a minute; OUT=... collects the logs
#
# Runs, each 4 LoRA DPO steps on 2 pairs: (1) torchrun's variables set by hand, (2) real torchrun
# (`python3 -m torch.distributed.run --no-python`), (3) no launcher (no NCCL); then compares their
# per-step losses, which must agree (a sum over one rank changes nothing).
# Needs the binary of device/build.sh (built with `--features nccl`): device-bin/gpu/diffalign.xz,
# device-bin/diffalign, or device-bin/device-bin-core.tar.xz.
set -u
OUT=${OUT:-/tmp/nccl-out}
mkdir -p "$OUT"
W=$(mktemp -d)
D=/tmp/diffalign
log() { echo "== $*"; }
nvidia-smi -L

if [ -f device-bin/gpu/diffalign.xz ]; then
    xz -dc device-bin/gpu/diffalign.xz >"$D"
elif [ -x device-bin/diffalign ]; then
    cp device-bin/diffalign "$D"
else
    tar -xJf device-bin/device-bin-core.tar.xz -C /tmp diffalign
fi
chmod +x "$D"
libs=$(python3 device/cuda-lib-dirs.py | paste -sd:)
export LD_LIBRARY_PATH="$PWD/device-bin/lib:$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ldd "$D" | grep -E "not found|nccl|cudart"

# Four pairs of 64x64 discs: red preferred over blue.
python3 - "$W/data" <<'PY'
import json, os, sys
import numpy as np
from PIL import Image
d = sys.argv[1]
os.makedirs(f"{d}/img", exist_ok=True)
rng = np.random.default_rng(0)
yy, xx = np.mgrid[:64, :64]
def disc(colour):
    cx, cy, r = 24 + 16 * rng.random(), 24 + 16 * rng.random(), 10 + 10 * rng.random()
    img = np.full((64, 64, 3), 128, np.uint8)
    img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = colour
    return Image.fromarray(img)
with open(f"{d}/pairs.jsonl", "w") as f:
    for i in range(4):
        disc((220, 30, 30)).save(f"{d}/img/{i}_w.png")
        disc((30, 30, 220)).save(f"{d}/img/{i}_l.png")
        f.write(json.dumps({"prompt": "a disc on a grey background", "chosen": f"img/{i}_w.png", "rejected": f"img/{i}_l.png"}) + "\n")
PY
recipe() { # recipe NAME: a recipe writing to $W/NAME
    cat >"$W/$1.toml" <<EOF
[model]
path = "$PWD/assets/shapes"

[data]
format = "jsonl"
path = "$W/data/pairs.jsonl"

[train]
method = "dpo"
steps = 4
batch_size = 2
lr = 1e-3
resolution = 32
seed = 7

[lora]
rank = 4

[output]
dir = "$W/$1"
EOF
}
for r in by-hand torchrun alone; do recipe $r; done

log "1. torchrun's variables by hand: RANK=0 WORLD_SIZE=1 (NCCL_DEBUG=INFO)"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 NCCL_DEBUG=INFO \
    timeout 120 "$D" train "$W/by-hand.toml" --device cuda >"$OUT/by-hand.log" 2>&1
echo "exit $?"; grep -c "NCCL INFO" "$OUT/by-hand.log" | sed 's/^/NCCL INFO lines: /'; tail -3 "$OUT/by-hand.log"

log "2. torchrun --standalone --nproc_per_node 1 --no-python diffalign train"
NCCL_DEBUG=INFO timeout 180 python3 -m torch.distributed.run --standalone --nproc_per_node 1 --no-python \
    "$D" train "$W/torchrun.toml" --device cuda >"$OUT/torchrun.log" 2>&1
echo "exit $?"; grep -c "NCCL INFO" "$OUT/torchrun.log" | sed 's/^/NCCL INFO lines: /'; tail -3 "$OUT/torchrun.log"

log "3. no launcher (no NCCL)"
timeout 120 "$D" train "$W/alone.toml" --device cuda >"$OUT/alone.log" 2>&1
echo "exit $?"; tail -2 "$OUT/alone.log"

log "per-step losses"
python3 - "$W" <<'PY'
import json, sys
w = sys.argv[1]
def losses(run):
    try:
        rows = [json.loads(l) for l in open(f"{w}/{run}/metrics.jsonl")]
    except OSError as e:
        return str(e)
    return [(r["step"], r["loss"]) for r in rows if "event" not in r]
runs = {r: losses(r) for r in ("by-hand", "torchrun", "alone")}
for r, l in runs.items():
    print(r, l)
same = runs["by-hand"] == runs["torchrun"] == runs["alone"] and isinstance(runs["alone"], list) and runs["alone"]
print("identical losses:", bool(same))
PY
for r in by-hand torchrun alone; do cp "$W/$r/metrics.jsonl" "$OUT/metrics-$r.jsonl" 2>/dev/null; done
log done
