"""Shared by the PyTorch benchmark twins: the device (BENCH_DEVICE, default cpu; on a GPU, f32
with TF32 off, as candle computes) and the timing protocol (one warm-up, median of N, each run
synchronised with the device)."""

import json
import os
import resource
import statistics
import time

import torch

DEVICE = os.environ.get("BENCH_DEVICE", "cpu")


def setup():
    """Makes DEVICE the default device and turns TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_default_device(DEVICE)


def sync():
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def median_secs(repeats, f):
    """Median wall time of `repeats` runs of `f` after one warm-up."""
    f()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_gpu_gib():
    """Peak GPU memory allocated by PyTorch, GiB (None on the CPU)."""
    if DEVICE.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / (1 << 30)
    return None


def report_peak_memory():
    """Prints the process's peak RSS (and on a GPU PyTorch's peak allocation) as JSON lines."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"bench": "peak_rss", "bytes": rss, "gib": rss / (1 << 30), "impl": "pytorch"}))
    if peak_gpu_gib() is not None:
        print(json.dumps({"bench": "peak_gpu_memory", "gib": peak_gpu_gib(), "impl": "pytorch"}))
