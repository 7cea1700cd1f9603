"""What the numbers were measured on (CPU, GPU, driver, library versions, fastgpt's backends) and
what that device can do: its copy bandwidth and matmul rate, measured in the same run."""

import os
import platform
import subprocess

import torch

import fastgpt
from fastgpt import registry
from fastgpt.bench.records import first_line
from fastgpt.bench.settings import DTYPE_NAMES
from fastgpt.bench.timing import time_calls


def last_level_cache_bytes(device):
    """The L2 of the GPU, or the CPU's L3 (32 MiB where the OS does not say)."""
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]]
    except (OSError, ValueError, KeyError):
        return 32 << 20


def cpu_model():
    """The CPU's model name (/proc/cpuinfo), or what platform knows of it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_driver():
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def backend_report():
    """``fastgpt.backends()``, or — when even asking fails (a half-installed package) — every
    backend but the fallback marked unavailable with the error, so the baselines still run."""
    try:
        return fastgpt.backends()
    except Exception as exc:
        reason = f"fastgpt.backends() raised {type(exc).__name__}: {first_line(exc)}"
        report = {name: {"available": False, "reason": reason} for name in registry.names()}
        report[registry.FALLBACK] = {"available": True, "reason": "plain PyTorch, runs anywhere"}
        return report


def machine_info(device):
    """What the numbers were measured on: CPU, GPU, driver and library versions, fastgpt backends."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = device == "cuda"
    props = torch.cuda.get_device_properties(0) if gpu else None
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_name": torch.cuda.get_device_name(0) if gpu else None,
        "gpu_sm_count": props.multi_processor_count if gpu else None,
        "gpu_memory_bytes": props.total_memory if gpu else None,
        "gpu_driver": _gpu_driver() if gpu else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "fastgpt": fastgpt.__version__,
        "backends": backend_report(),
    }


def measure_ceilings(settings):
    """Copy bandwidth (GB/s, bytes read + written) and matmul rate (TFLOP/s) measured now, each
    from its fastest repetition: a ceiling is what the device can do, not what it does typically."""
    device, sizes = settings.device, settings.sizes
    if device == "cuda":
        copy_bytes, mm_n, mm_dtype = (1 << 30), 8192, torch.bfloat16
    else:  # the full run copies 1 GiB, well past any last-level cache
        copy_bytes = {"tiny": 8 << 20, "quick": 64 << 20}.get(sizes, 1 << 30)
        mm_n = {"tiny": 256, "quick": 1024}.get(sizes, 2048)
        mm_dtype = torch.float32
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_calls(lambda i, dst=dst, src=src: dst.copy_(src), 1, settings)
    copy = {"gbps": 2 * copy_bytes / t.min_ms / 1e6, "bytes": 2 * copy_bytes, **t.__dict__}
    del src, dst
    a = torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype)
    b = torch.randn(mm_n, mm_n, device=device, dtype=mm_dtype)
    t = time_calls(lambda i: torch.mm(a, b), 1, settings)
    matmul = {"tflops": 2 * mm_n**3 / t.min_ms / 1e9, "n": mm_n, "dtype": DTYPE_NAMES[mm_dtype], **t.__dict__}
    return {"copy": copy, "matmul": matmul}


def best_ceilings(*measured):
    """The highest copy bandwidth and matmul rate among several measurements (start and end of a
    run), so that a busy moment does not lower the ceiling and inflate every percentage."""
    return {
        "copy": max((m["copy"] for m in measured), key=lambda c: c["gbps"]),
        "matmul": max((m["matmul"] for m in measured), key=lambda c: c["tflops"]),
    }
