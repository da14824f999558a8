"""
The device a script runs on, and its peak FLOP/s for model FLOPs utilization (MFU):

    device, dtype = resolve(device, dtype, local_rank)  # 'auto' made concrete, bad values refused
    ctx = autocast(device, dtype)                       # what the forward passes run under
    mfu = model.flops_per_token() * tokens_per_sec / (peak_flops(device, dtype) * world_size)
    memory_bytes()                                      # physical memory, to refuse what cannot fit
    check_fp8(device) / convert_to_fp8(model)           # fp8=True: float8 matmuls with torchao

GPU peaks are the vendors' dense (no 2:4 sparsity) tensor-core figures per dtype; float32 means
TF32 on Ampere and newer because train.py enables TF32 matmuls. A GPU that is not in the table, a
laptop part or a MIG slice returns None: MFU is then reported as unknown rather than wrong. On a
CPU the peak is measured once (best float32 matmul rate over a few sizes) and cached per CPU model,
thread count and torch version, so every run's log and bench/bench_train.py use the same figure.
"""
import importlib.util
import json
import os
import platform
import re
import time
from contextlib import nullcontext

import torch

from errors import Error
from files import write_atomic

# (regex on torch.cuda.get_device_name(), {dtype: dense TFLOP/s}), most specific first. Whole
# words only, so "RTX A1000" is not an A100 and "T400" is not a T4.
GPU_PEAK_TFLOPS = [
    (r'H100 PCIe', {'bfloat16': 756, 'float16': 756, 'float32': 378}),
    (r'H100 NVL', {'bfloat16': 835, 'float16': 835, 'float32': 418}),
    (r'H100', {'bfloat16': 989, 'float16': 989, 'float32': 495}),  # SXM ("H100 80GB HBM3")
    (r'G?H200 NVL', {'bfloat16': 835, 'float16': 835, 'float32': 418}),
    (r'G?H200', {'bfloat16': 989, 'float16': 989, 'float32': 495}),  # SXM, and GH200
    (r'H800 PCIe', {'bfloat16': 756, 'float16': 756, 'float32': 378}),
    (r'H800', {'bfloat16': 989, 'float16': 989, 'float32': 495}),
    (r'GB200', {'bfloat16': 2500, 'float16': 2500, 'float32': 1250}),
    (r'B200', {'bfloat16': 2250, 'float16': 2250, 'float32': 1100}),
    (r'A100', {'bfloat16': 312, 'float16': 312, 'float32': 156}),
    (r'A800', {'bfloat16': 312, 'float16': 312, 'float32': 156}),
    (r'A40', {'bfloat16': 149.7, 'float16': 149.7, 'float32': 74.8}),
    (r'L40S', {'bfloat16': 362, 'float16': 362, 'float32': 183}),
    (r'L40', {'bfloat16': 181, 'float16': 181, 'float32': 90.5}),
    (r'L4', {'bfloat16': 121, 'float16': 121, 'float32': 60}),
    (r'A10G', {'bfloat16': 70, 'float16': 70, 'float32': 35}),
    (r'A10', {'bfloat16': 125, 'float16': 125, 'float32': 62.5}),
    (r'RTX 6000 Ada Generation', {'bfloat16': 364, 'float16': 364, 'float32': 182}),
    (r'RTX A6000', {'bfloat16': 155, 'float16': 155, 'float32': 77}),
    # GeForce: the figures with float32 accumulation (what autocast uses),
    # half the fp16-accumulate ones
    (r'RTX 5090', {'bfloat16': 209.5, 'float16': 209.5, 'float32': 104.8}),
    (r'RTX 4090', {'bfloat16': 165.2, 'float16': 165.2, 'float32': 82.6}),
    (r'RTX 3090 Ti', {'bfloat16': 80, 'float16': 80, 'float32': 40}),
    (r'RTX 3090', {'bfloat16': 71, 'float16': 71, 'float32': 35.6}),
    (r'V100S', {'float16': 130, 'float32': 16.4}),
    (r'V100-PCIE', {'float16': 112, 'float32': 14}),
    (r'V100', {'float16': 125, 'float32': 15.7}),  # SXM2
    (r'T4', {'float16': 65, 'float32': 8.1}),
]
# slower than the datasheet part
NOT_FULL_CHIP = re.compile(r'\bMIG\b|Laptop|Max-Q|Mobile', re.IGNORECASE)


def resolve(device, dtype, local_rank=None):
    """'auto' made concrete (CUDA, else MPS, else CPU), checked against what this machine has; under
    torchrun a CUDA device is cuda:LOCAL_RANK, made current before anything else touches a GPU.
    dtype 'auto' is bfloat16 on GPUs with native bfloat16 (Ampere and newer), float16 on older ones
    (V100, T4: torch can emulate bfloat16 there, slowly), float32 on CPUs. A bad one is an Error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    available = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
                          + ["mps"] * mps)
    if device == 'auto':
        device = 'cuda' if cuda else 'mps' if mps else 'cpu'
    kind, _, index = device.partition(':')
    if kind == 'cuda' and cuda:
        if local_rank is not None:
            index = str(local_rank)  # torchrun: one GPU per local process
        if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
            raise Error(f"device {device!r} does not exist on this machine "
                        f"(available: {available})")
        device = f"cuda:{index or torch.cuda.current_device()}"
        torch.cuda.set_device(device)
    elif not ((kind == 'cpu' and not index) or (kind == 'mps' and mps and not index)):
        raise Error(f"device {device!r} is not available on this machine (available: {available})")
    if dtype == 'auto':
        if kind == 'cuda':
            dtype = ('bfloat16' if torch.cuda.is_bf16_supported(including_emulation=False)
                     else 'float16')
        else:
            dtype = 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise Error(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return device, dtype


def autocast(device, dtype):
    """The context forward passes run under: autocast to dtype, or nothing in float32."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, dtype))


def gpu_peak_tflops(name, dtype):
    """Datasheet dense TFLOP/s of the GPU called `name` for dtype, or None if unknown."""
    if NOT_FULL_CHIP.search(name):
        return None
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(rf'(?<![\w-]){pattern}(?![\w])', name):
            return peaks.get(dtype)
    return None


def measure_cpu_flops(seconds=3.0, sizes=(512, 1024, 2048)):
    """The best float32 matmul FLOP/s of single products, over a few sizes after a warm-up: what
    this CPU does at its best with torch's threads. A single short loop read far too low when the
    machine was busy for a moment (75 against 190 GFLOP/s), which inflated MFU."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up: thread pool, page faults
        end = time.perf_counter() + seconds / len(sizes)
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def _cpu_cache():
    """(cache file, key of this CPU + thread count + torch version)."""
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    model = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f
                          if line.startswith('model name')), model)
    except OSError:
        pass
    return (os.path.join(base, 'sturdygpt', 'cpu_peak.json'),
            f"{model} | {torch.get_num_threads()} threads | torch {torch.__version__}")


def cpu_peak_flops(measure=False):
    """This CPU's float32 peak: the cached figure, or a new measurement (always with measure=True).
    The cache keeps the best figure ever measured: any measurement can only read low."""
    path, key = _cpu_cache()
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    cached = cache.get(key, {}).get('flops') if isinstance(cache.get(key), dict) else None
    if cached and not measure:
        return cached
    flops = max(measure_cpu_flops(), cached or 0.0)
    cache[key] = {'flops': flops, 'time': time.time()}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, json.dumps(cache, indent=1))
    except (OSError, Error):
        pass  # an unwritable home: measure again next time
    return flops


def peak_flops(device, dtype):
    """Peak FLOP/s of one device for this dtype, or None if unknown."""
    if device == 'cpu':
        return cpu_peak_flops()
    if not device.startswith('cuda'):
        return None
    tflops = gpu_peak_tflops(torch.cuda.get_device_name(device), dtype)
    return tflops * 1e12 if tflops else None


def memory_bytes():
    """This machine's physical memory in bytes, or None where the OS does not say (Windows)."""
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (AttributeError, ValueError, OSError):
        return None


def check_fp8(device):
    """Error unless float8 training can run on device: a CUDA GPU of compute capability 8.9+ and
    torchao installed."""
    device = torch.device(device)
    if device.type != 'cuda' or torch.cuda.get_device_capability(device) < (8, 9):
        where = torch.cuda.get_device_name(device) if device.type == 'cuda' else device
        raise Error(f"fp8=True needs a CUDA GPU of compute capability 8.9 or newer (H100, H200, "
                    f"L4, L40S, RTX 4090), not {where}")
    if importlib.util.find_spec('torchao') is None:
        raise Error("fp8=True needs torchao: pip install torchao")


def convert_to_fp8(model):
    """Train the transformer blocks' linear layers in float8 with torchao
    (convert_to_float8_training, tensorwise scaling). Their weights stay nn.Linear's, in their own
    dtype, under the same names: checkpoints, resume, export and sampling are as without it. Left as
    they are: LoRA adapters, lm_head (tied to wte), and a layer whose sizes are not multiples of 16,
    which float8 matmuls need. Published figures: ~1.4x on large matmuls, slower below ~1.5-2K
    width, so it is for wide models. Check check_fp8(device) first."""
    from torchao.float8 import convert_to_float8_training  # optional: pip install torchao
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: (
        type(mod) is torch.nn.Linear and fqn.startswith('transformer.h.')
        and mod.in_features % 16 == 0 and mod.out_features % 16 == 0))
