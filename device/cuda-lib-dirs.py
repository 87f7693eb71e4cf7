"""Prints the folders of the CUDA libraries diffalign's CUDA build links (cuBLAS, cuRAND, NVRTC,
the CUDA runtime, NCCL) that python3's PyTorch wheels bring, one a line; nothing without them."""
import os

try:
    import nvidia
except ImportError:
    nvidia = None
for p in nvidia.__path__ if nvidia else []:
    for sub in ("cu13/lib", "cublas/lib", "curand/lib", "cuda_nvrtc/lib", "cuda_runtime/lib", "nccl/lib"):
        d = os.path.join(p, sub)
        if os.path.isdir(d):
            print(d)
