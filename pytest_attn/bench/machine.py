"""The machine a benchmark run timed on, and whether two runs' timings may be compared.

Timings from different GPUs, drivers, CUDA/cuDNN/torch/kernel-library versions or CPUs say nothing
about a regression: ``differences`` names what differs, so that a gate reports the runs apart
instead of calling a new driver a slowdown. torch is imported inside functions only.
"""
from __future__ import annotations

from typing import Optional

from pytest_attn.env.packages import dist_version, flashinfer_version

#: machine_info["attn"] keys that must match for two runs' timings to be compared, with their names.
COMPARED_FIELDS = (("gpu", "GPU"), ("gpu_capability", "compute capability"), ("driver", "driver"),
                   ("cuda", "CUDA"), ("cudnn", "cuDNN"), ("torch", "torch"), ("flashinfer", "FlashInfer"),
                   ("triton", "triton"))


def nvidia_driver() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            found = pynvml.nvmlSystemGetDriverVersion()
            return found.decode() if isinstance(found, bytes) else str(found)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        try:
            done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=20)
            if done.returncode == 0 and done.stdout.strip():
                return done.stdout.strip().splitlines()[0]
        except Exception:
            pass
    return None


def cpu_brand() -> str:
    """The processor's name, read cheaply (/proc/cpuinfo on Linux; platform elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def attn_machine_info(device: str) -> dict:
    """GPU, driver and library versions, and the CPU: what makes two benchmark runs comparable."""
    import torch

    info = {"device": device, "gpu": None, "gpu_capability": None, "driver": None,
            "cuda": torch.version.cuda, "cudnn": None, "torch": torch.__version__,
            "flashinfer": flashinfer_version(), "triton": dist_version("triton"), "cpu": cpu_brand()}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["driver"] = nvidia_driver()
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def machine_key(machine_info: dict) -> str:
    """What must match for two runs to be shown together: the GPU (or, on CPU, the processor)."""
    attn = machine_info.get("attn") or {}
    if attn.get("gpu"):
        return f"{attn['gpu']} (sm {attn.get('gpu_capability') or '?'})"
    cpu = machine_info.get("cpu") or {}
    brand = attn.get("cpu") or (cpu.get("brand_raw") if isinstance(cpu, dict) else None)  # ours first: one reader
    return f"cpu: {brand or machine_info.get('processor') or machine_info.get('machine') or 'unknown'}"


def is_cpu_run(machine_info: dict) -> bool:
    attn = machine_info.get("attn") or {}
    return not attn.get("gpu") and not str(attn.get("device") or "").startswith("cuda")


def differences(base: dict, head: dict) -> list[str]:
    """What differs between two runs' machine_info that makes their timings incomparable, each as
    ``"torch 2.5.1 -> 2.6.0"``; empty when they may be compared. A field one run did not record is
    not a difference (older saves), except the machine itself."""
    found = []
    if machine_key(base) != machine_key(head):
        found.append(f"machine {machine_key(base)} -> {machine_key(head)}")
    a, b = base.get("attn") or {}, head.get("attn") or {}
    for key, name in COMPARED_FIELDS:
        if key in ("gpu", "gpu_capability"):
            continue  # in machine_key
        if key in a and key in b and a[key] != b[key]:
            found.append(f"{name} {a[key]} -> {b[key]}")
    return found
