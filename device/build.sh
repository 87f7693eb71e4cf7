#!/usr/bin/env bash
# Rebuilds device-bin/ (the CUDA build of diffalign and its test binaries, for an H100/H200 machine
# without Rust or network) on a developer machine. Run from the repository root:
#
#   bash device/build.sh          # build, collect, strip, pack
#   SKIP_BUILD=1 bash device-bin/build.sh   # collect from an earlier build only
#
# Needs /work/cuda-venv with CUDA 13.0 from pip (see device/README.md) and the `cuda` and `nccl`
# features in Cargo.toml (`nccl` implies `cuda`: torchrun runs over NCCL, device/run-nccl.sh).
set -euo pipefail
ROOT=$(pwd)
BIN="$ROOT/device-bin"

CUDA_ROOT=$(echo /work/cuda-venv/lib/python3.*/site-packages/nvidia/cu13)
export CUDA_ROOT CUDA_HOME=$CUDA_ROOT CUDA_PATH=$CUDA_ROOT NVCC=$CUDA_ROOT/bin/nvcc
export PATH=$CUDA_ROOT/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-cuda}

# Link-time stand-ins the wheels lack: unversioned .so names, a stub libcuda (the driver's
# libcuda.so.1 is used at run time) and a stub libnccl (the GPU machine's PyTorch wheel brings
# libnccl.so.2, nvidia/nccl/lib).
(cd "$CUDA_ROOT/lib" && for l in cublas cublasLt curand nvrtc cudart; do
    f=$(ls lib$l.so.* | grep -v alt | head -1)
    ln -sf "$f" "lib$l.so"
done)
stub() { # stub NAME SONAME SYS PREFIX: lib/stubs/libNAME.so, every function cudarc's SYS declares
    [ -f "$CUDA_ROOT/lib/stubs/lib$1.so" ] && return
    mkdir -p "$CUDA_ROOT/lib/stubs"
    cudarc=$(ls -d ~/.cargo/registry/src/*/cudarc-0.19.* | tail -1)
    grep -oE "^pub unsafe fn $4[A-Za-z0-9_]+" "$cudarc/src/$3/sys/mod.rs" | awk '{print "void "$4"(void){}"}' \
        | sort -u >"$CUDA_ROOT/lib/stubs/lib$1_stub.c"
    gcc -shared -fPIC -o "$CUDA_ROOT/lib/stubs/$2" -Wl,-soname,"$2" "$CUDA_ROOT/lib/stubs/lib$1_stub.c"
    ln -sf "$2" "$CUDA_ROOT/lib/stubs/lib$1.so"
}
stub cuda libcuda.so.1 driver cu
stub nccl libnccl.so.2 nccl nccl

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    nice -n 19 cargo build --release --features nccl
    nice -n 19 cargo test --release --features nccl --no-run --message-format=json >"$CARGO_TARGET_DIR/tests.json"
fi

stage=$(mktemp -d)
cp "$CARGO_TARGET_DIR/release/diffalign" "$stage/diffalign"
python3 - "$CARGO_TARGET_DIR/tests.json" "$stage" <<'EOF'
import json, os, shutil, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        if m["target"]["src_path"].endswith(f"tests/{m['target']['name']}.rs"):
            shutil.copy(m["executable"], os.path.join(sys.argv[2], "test-" + m["target"]["name"]))
EOF
strip "$stage"/*
rm -f "$BIN"/diffalign "$BIN"/test-* "$BIN"/device-bin*.tar.xz "$BIN"/*.unpacked
mkdir -p "$BIN/lib"
cp -L "$CUDA_ROOT/lib/libcudart.so.13" "$BIN/lib/"
# Solid xz archives with a 1 GiB window: the binaries share most of their bytes (the same CUDA
# kernels, PTX and embedded model in each), so 1.2 GB of binaries pack into about 41 MB.
# run-device.sh unpacks them.
core="diffalign test-ops_cuda test-ops_grad test-schedulers test-models_clip test-models_unet test-models_vae test-reward test-pipeline test-reno test-preference"
extra=$(cd "$stage" && ls test-* | grep -v -x -F "$(echo $core | tr ' ' '\n')" | tr '\n' ' ')
(cd "$stage" && tar -cf - $core | xz -T1 --lzma2=preset=9,dict=1024MiB >"$BIN/device-bin-core.tar.xz")
(cd "$stage" && tar -cf - $extra | xz -T1 --lzma2=preset=9,dict=1024MiB >"$BIN/device-bin-extra.tar.xz")
rm -rf "$stage"
du -sh "$BIN"
