"""
Peak FLOP/s of the hardware, for model FLOPs utilization (MFU) in train.py's log:

    mfu = model.flops_per_token() * tokens_per_sec / (peak_flops(device, dtype) * world_size)

GPU peaks are the vendors' dense (no 2:4 sparsity) tensor-core figures per dtype; float32 means
TF32 on Ampere and newer because train.py enables TF32 matmuls. On CPU the peak is measured with a
short float32 matmul loop. An unknown GPU returns None: MFU is then reported as unknown rather
than as a wrong number.
"""
import time

import torch

# name fragment (as in torch.cuda.get_device_name, most specific first) -> TFLOP/s per dtype
GPU_PEAK_TFLOPS = [
    ('H100 PCIe', {'bfloat16': 756, 'float16': 756, 'float32': 378}),
    ('H100 NVL', {'bfloat16': 835, 'float16': 835, 'float32': 418}),
    ('H100', {'bfloat16': 989, 'float16': 989, 'float32': 495}),  # SXM, and GH200
    ('H200', {'bfloat16': 989, 'float16': 989, 'float32': 495}),
    ('H800', {'bfloat16': 989, 'float16': 989, 'float32': 495}),
    ('B200', {'bfloat16': 2250, 'float16': 2250, 'float32': 1100}),
    ('A100', {'bfloat16': 312, 'float16': 312, 'float32': 156}),
    ('A800', {'bfloat16': 312, 'float16': 312, 'float32': 156}),
    ('L40S', {'bfloat16': 362, 'float16': 362, 'float32': 183}),
    ('L40', {'bfloat16': 181, 'float16': 181, 'float32': 90.5}),
    ('L4', {'bfloat16': 121, 'float16': 121, 'float32': 60}),
    ('A10G', {'bfloat16': 70, 'float16': 70, 'float32': 35}),
    ('A10', {'bfloat16': 125, 'float16': 125, 'float32': 62.5}),
    ('RTX 6000 Ada', {'bfloat16': 364, 'float16': 364, 'float32': 182}),
    ('RTX A6000', {'bfloat16': 155, 'float16': 155, 'float32': 77}),
    ('RTX 5090', {'bfloat16': 209.5, 'float16': 209.5, 'float32': 104.8}),
    ('RTX 4090', {'bfloat16': 165.2, 'float16': 165.2, 'float32': 82.6}),
    ('RTX 3090', {'bfloat16': 71, 'float16': 71, 'float32': 35.6}),  # GeForce: halved with fp32 accumulate
    ('V100', {'float16': 125, 'float32': 15.7}),
    ('T4', {'float16': 65, 'float32': 8.1}),
]


def resolve(device, dtype):
    """'auto' made concrete: CUDA, else MPS, else CPU; bfloat16 on GPUs that have it, float16 on
    older ones, float32 on CPUs (which emulate bfloat16 slowly). One-line error for a bad dtype."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'
    if dtype == 'auto':
        dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if device.startswith('cuda') else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise SystemExit(f"error: dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return device, dtype


def measure_cpu_flops(seconds=1.0, n=1024):
    """Best float32 matmul FLOP/s over a short loop (what this CPU really does with torch's threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def peak_flops(device_type, dtype):
    """Peak FLOP/s of one device for this dtype, or None if unknown."""
    if device_type == 'cpu':
        return measure_cpu_flops()
    if device_type != 'cuda':
        return None
    name = torch.cuda.get_device_name()
    for fragment, peaks in GPU_PEAK_TFLOPS:
        if fragment in name:
            return peaks[dtype] * 1e12 if dtype in peaks else None
    return None
