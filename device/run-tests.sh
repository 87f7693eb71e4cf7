#!/usr/bin/env bash
# Runs diffalign's CUDA build (made by device/build.sh, see device/README.md) on a GPU machine
# that has no Rust toolchain and no network. Run it from the repository root:
#
#   bash device/run-tests.sh
#
# What it does, in about 6 minutes at most:
#   1. nvidia-smi;
#   2. unpacks device-bin-*.tar.xz into device-bin/ (diffalign, test-NAME), finds the CUDA 13
#      libraries the binaries link (libcublas.so.13 + libcublasLt.so.13, libcurand.so.10,
#      libcudart.so.13, libnccl.so.2) and puts their folders on LD_LIBRARY_PATH: device-bin/lib
#      first, then the pip wheels of python3's PyTorch (nvidia/cu13/lib, nvidia/nccl/lib), then
#      /usr/local/cuda; libcuda.so.1
#      comes from the driver;
#   3. makes the paths compiled into the test binaries exist: /work/main (the repository, for
#      tests/fixtures), /work/shared/fixtures (../shared/fixtures beside it) and
#      /work/target-cuda/release/diffalign (the CLI the tests spawn);
#   4. runs each test binary with DIFFALIGN_TEST_DEVICE=cuda --test-threads=1: first ops_cuda
#      (our CUDA kernels of kernels/cuda against candle's composed ops), then the model stack
#      (TESTS="a b" picks others, e.g. TESTS="models_unet reno"), each under `timeout`; with
#      DIFFALIGN_CUDA_KERNELS=1 in the environment the model stack runs on our kernels too;
#   5. `diffalign generate --device cuda` (and the same on the CPU, to compare) on the embedded
#      shapes-world model. The benchmarks are device/run-bench.sh's.
#
# Output goes to $OUT (the device tool's folder; /tmp/diffalign-device-out when unset): tests-NAME.log
# per binary, generate-*.png, summary.txt. The device tool brings back at most 8 files from $OUT,
# so at the end every log is also packed into $OUT/logs.tar.gz and the loose logs are removed
# (KEEP_LOOSE=1 keeps them). The summary is printed to stdout as well.
#
# The shared fixtures (../shared/fixtures, 66 MB) do not travel with the working tree. Tests that
# need them fail with "No such file" unless a copy is found at SHARED_FIXTURES, ./shared/fixtures
# or device-bin/fixtures (carry one of those as an ignored path).

set -u
ROOT=$(pwd)
BIN=${BIN:-$ROOT/device-bin}
OUT=${OUT:-/tmp/diffalign-device-out}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
START=$(date +%s)
BUDGET=${BUDGET:-330} # seconds for the tests and generate together, leaving margin under 6 min
PER_TEST=${PER_TEST:-120}

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }

# The binaries travel packed (device-bin-core.tar.xz: diffalign and the model-stack tests;
# device-bin-extra.tar.xz: the other tests); unpacked here into device-bin/ (about 1.2 GB).
for a in "$BIN"/device-bin-*.tar.xz; do
    [ -f "$a" ] || continue
    [ -f "$a.unpacked" ] && continue
    if command -v xz >/dev/null; then
        tar -C "$BIN" -xJf "$a"
    else
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$a" "$BIN"
    fi && touch "$a.unpacked" || say "unpacking $a failed"
done
[ -x "$BIN/diffalign" ] || say "no device-bin/diffalign: carry device-bin (or at least device-bin/device-bin-core.tar.xz)"

echo "== nvidia-smi"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.log" | head -20

# --- 2. libraries -----------------------------------------------------------------------------
libdirs=("$BIN/lib")
while IFS= read -r d; do libdirs+=("$d"); done < <(python3 device/cuda-lib-dirs.py 2>/dev/null)
libdirs+=(/usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu)
ld=""
for d in "${libdirs[@]}"; do [ -d "$d" ] && ld="$ld${ld:+:}$d"; done
export LD_LIBRARY_PATH="$ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
missing=$(ldd "$BIN/diffalign" 2>&1 | grep "not found")
if [ -n "$missing" ]; then
    say "MISSING LIBRARIES for device-bin/diffalign:"
    say "$missing"
fi
ldd "$BIN/diffalign" | grep -E "cublas|curand|nvrtc|cudart|libcuda|nccl" | tee -a "$SUMMARY"

# --- 3. compiled-in paths ----------------------------------------------------------------------
link() { # link TARGET NAME: makes NAME point at TARGET unless NAME already exists
    if [ -e "$2" ] || [ -L "$2" ]; then return 0; fi
    mkdir -p "$(dirname "$2")" && ln -s "$1" "$2" && say "linked $2 -> $1"
}
if [ "$(cd /work/main 2>/dev/null && pwd -P)" != "$(pwd -P)" ]; then
    link "$ROOT" /work/main
fi
[ "$(cd /work/main 2>/dev/null && pwd -P)" = "$(pwd -P)" ] || say "WARNING: /work/main is not this checkout: tests read tests/fixtures from /work/main"
fixtures=""
for f in "${SHARED_FIXTURES:-}" "$ROOT/shared/fixtures" "$BIN/fixtures" /work/shared/fixtures; do
    if [ -n "$f" ] && [ -d "$f" ]; then fixtures=$f; break; fi
done
if [ -n "$fixtures" ]; then
    link "$fixtures" /work/shared/fixtures
    say "shared fixtures: $fixtures"
else
    say "shared fixtures: NOT FOUND (tests on ../shared/fixtures will fail)"
fi
link "$BIN/diffalign" /work/target-cuda/release/diffalign

# --- 4. tests ---------------------------------------------------------------------------------
TESTS=${TESTS:-"ops_cuda ops_grad schedulers models_clip models_unet models_vae reward pipeline reno preference"}
export DIFFALIGN_TEST_DEVICE=${DIFFALIGN_TEST_DEVICE:-cuda}
export RUST_BACKTRACE=1
for name in $TESTS; do
    exe="$BIN/test-$name"
    left=$((BUDGET - $(elapsed) - 30)) # keep 30 s for generate
    if [ ! -x "$exe" ]; then
        say "$(printf '%-14s' "$name") SKIP (no $exe)"
        continue
    fi
    if [ "$left" -lt 10 ]; then
        say "$(printf '%-14s' "$name") SKIP (time budget spent)"
        continue
    fi
    t=$((left < PER_TEST ? left : PER_TEST))
    log="$OUT/tests-$name.log"
    t0=$(date +%s)
    timeout "$t" "$exe" --test-threads=1 >"$log" 2>&1
    rc=$?
    dt=$(($(date +%s) - t0))
    result=$(grep -E "^test result:" "$log" | tail -1)
    failed=$(grep -E "^test .* FAILED$" "$log" | sed -E 's/^test (.*) \.\.\. FAILED$/\1/' | tr '\n' ' ')
    if [ "$rc" = 124 ]; then result="TIMEOUT after ${t}s ($(grep -cE '^test .* ok$' "$log") ok so far)"; fi
    say "$(printf '%-14s' "$name") rc=$rc ${dt}s ${result:-no result line}${failed:+ | failed: $failed}"
done

# --- 5. generate ------------------------------------------------------------------------------
gen() { # gen DEVICE
    local t0 rc
    t0=$(date +%s)
    timeout 60 "$BIN/diffalign" generate --device "$1" --prompt "a red circle on a blue background" \
        --steps 20 --seed 3 --out "$OUT/generate-$1.png" >"$OUT/generate-$1.log" 2>&1
    rc=$?
    say "generate --device $1: rc=$rc $(($(date +%s) - t0))s"
    [ "$rc" = 0 ] || tail -5 "$OUT/generate-$1.log" | tee -a "$SUMMARY"
}
gen cuda
gen cpu
if [ -f "$OUT/generate-cuda.png" ] && [ -f "$OUT/generate-cpu.png" ]; then
    python3 - "$OUT/generate-cuda.png" "$OUT/generate-cpu.png" 2>&1 <<'EOF' | tee -a "$SUMMARY"
import sys
try:
    import numpy as np
    from PIL import Image
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in sys.argv[1:3])
    print(f"generate cuda vs cpu: max abs diff {np.abs(a - b).max()} / 255 over {a.shape}")
except Exception as e:
    print(f"generate cuda vs cpu: not compared ({e})")
EOF
fi

say "total $(elapsed)s"
echo "== summary"
cat "$SUMMARY"
if [ "${KEEP_LOOSE:-0}" != 1 ]; then
    (cd "$OUT" && tar -czf logs.tar.gz ./*.log && rm -f ./*.log)
fi
