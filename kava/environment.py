"""What this job runs on: device, precision, scheduler, CPUs, paths, packages, and a
recommended micro-batch for the configured effective batch; and the one place that decides which
device a stage computes on and in which dtype."""

import importlib.metadata
import math
import os
import platform

import psutil
import torch

from kava.paths import detect_scheduler, run_paths

# The torch dtype of each precision name (train.precision, precompute.compute_dtype, eval.dtype).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PACKAGES = ("torch", "transformers", "bitsandbytes", "datasets", "safetensors", "snakemake",
            "pyarrow", "psutil")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _memory_gb():
    """(total, available) system memory in GiB. psutil's `available`, not total or free: what
    this job can take without swapping, on Linux (MemAvailable) and macOS alike."""
    memory = psutil.virtual_memory()
    return memory.total / 2**30, memory.available / 2**30


def detect_device():
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        return {
            "type": "rocm" if torch.version.hip else "cuda",
            "name": torch.cuda.get_device_name(0),
            "count": torch.cuda.device_count(),
            "memory_gb": round(total / 2**30, 2),
            "free_memory_gb": round(free / 2**30, 2),
        }
    # MPS shares the system memory with the CPU.
    total, available = _memory_gb()
    kind, name = ("mps", "Apple MPS") if torch.backends.mps.is_available() else ("cpu", _cpu_name())
    return {"type": kind, "name": name, "count": 1, "memory_gb": round(total, 2),
            "free_memory_gb": round(available, 2)}


def detect_precision(device):
    """bf16 > fp16 > fp32, by what the device runs natively. On CPU, bf16 only pays off with
    AVX512-BF16 or AMX; without them autocast emulates it and is slower than fp32."""
    if device["type"] in ("cuda", "rocm"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device["type"] == "mps":
        return "fp16"
    return "bf16" if _cpu_flags() & {"avx512_bf16", "amx_bf16"} else "fp32"


def job_device(index=0):
    """The device a stage computes on: GPU `index` where torch sees one (CUDA, or ROCm, which
    torch serves through the same torch.cuda API), else the CPU. detect_device reports Apple's
    MPS, but no stage uses it: on a Mac the stages run on the CPU."""
    return torch.device("cuda", index) if torch.cuda.is_available() else torch.device("cpu")


def job_precision():
    """detect_precision of the device the stages compute on (job_device), which on a Mac is the
    CPU, not MPS."""
    return detect_precision({"type": job_device().type})


def compute_dtype(name):
    """(name, torch dtype) of a precision setting, `auto` resolved by job_precision."""
    if name == "auto":
        name = job_precision()
    return name, DTYPES[name]


def usable_cpus(environ=os.environ):
    """CPUs this job may use: the affinity mask, narrowed by SLURM_CPUS_PER_TASK."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if environ.get("SLURM_CPUS_PER_TASK"):
        cpus = min(cpus, int(environ["SLURM_CPUS_PER_TASK"]))
    return cpus


def package_versions():
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "missing"
    return versions


def recommend_batch(free_memory_gb, student_params, student_dims, teacher_dims, seq_len,
                    effective_batch):
    """Largest power-of-two micro-batch that fits in 80 % of free memory, and the accumulation
    that reaches the effective batch.

    Fixed cost: fp32 master weights + grads + two AdamW moments = 16 bytes a parameter.
    Per token: the student's activations kept for backward (~34 bytes per hidden unit per
    layer in 16-bit, Korthikanti et al. 2022) and its fp32 logits with their gradient, plus the
    teachers' bf16 K and V.
    """
    declared = student_dims["config_declared"]
    activations = 34 * declared["hidden_size"] * student_dims["num_layers"]
    logits = 2 * 4 * student_dims["vocab_size"]
    teacher_kv = sum(2 * 2 * dims["kv_dim_total"] for dims in teacher_dims)
    per_example = seq_len * (activations + logits + teacher_kv)
    fixed = 16 * student_params
    budget = 0.8 * free_memory_gb * 2**30 - fixed
    fits = max(1, int(budget // per_example)) if budget > 0 else 1
    micro_batch = min(2 ** int(math.log2(fits)), effective_batch)
    return {"micro_batch": micro_batch, "grad_accum": math.ceil(effective_batch / micro_batch),
            "effective_batch": effective_batch, "bytes_per_example": int(per_example),
            "fixed_bytes": int(fixed)}


def probe_environment(run, sizing=None):
    """`sizing`: recommend_batch's arguments other than free memory; without it (a person
    probing a machine before configuring a run) there is no recommendation."""
    device = detect_device()
    scheduler, job_id = detect_scheduler()
    return {
        "device": device,
        "precision": job_precision(),
        "scheduler": {"type": scheduler, "job_id": job_id},
        "cpus": usable_cpus(),
        "paths": run_paths(run),
        "packages": package_versions(),
        "python": platform.python_version(),
        "recommended": recommend_batch(device["free_memory_gb"], **sizing) if sizing else None,
    }
