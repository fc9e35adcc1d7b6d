"""Which GPU an engine is planned for or built on: named targets, and lazy detection of the local one.

A TensorRT engine is specific to the GPU's compute capability and must fit in its memory, so a plan is checked
against either a named target (memory as ``nvidia-smi`` reports it, compute capability) or a plain memory size,
and a build against the GPU it runs on. Detection imports nothing heavy until it is called.
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import subprocess
from dataclasses import dataclass

from mexport.errors import MexportError
from mexport.trt_common import GB

MIB = 1 << 20


@dataclass(frozen=True)
class GpuInfo:
    """A GPU's name, memory and compute capability (None when only a memory size was given)."""

    name: str
    memory_bytes: int
    compute_capability: tuple[int, int] | None = None

    @property
    def capability_text(self) -> str:
        if self.compute_capability is None:
            return "unknown"
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


# total memory as nvidia-smi reports it on each card (what a process can see, before the CUDA context)
GPU_TARGETS: dict[str, GpuInfo] = {
    "h100-80gb": GpuInfo("NVIDIA H100 80GB", 81559 * MIB, (9, 0)),
    "h200-141gb": GpuInfo("NVIDIA H200 141GB", 143771 * MIB, (9, 0)),
    "a100-80gb": GpuInfo("NVIDIA A100 80GB", 81920 * MIB, (8, 0)),
    "a100-40gb": GpuInfo("NVIDIA A100 40GB", 40960 * MIB, (8, 0)),
    "l40s-48gb": GpuInfo("NVIDIA L40S 48GB", 46068 * MIB, (8, 9)),
    "l4-24gb": GpuInfo("NVIDIA L4 24GB", 23034 * MIB, (8, 9)),
    "a10g-24gb": GpuInfo("NVIDIA A10G 24GB", 23028 * MIB, (8, 6)),
}

def gpu_budget(target: str | None, gpu_memory_gb: float | None) -> GpuInfo | None:
    """The GPU a plan is checked against: a named target, a bare memory size, or None (not checked)."""
    if target is not None and gpu_memory_gb is not None:
        raise MexportError("--target and --gpu-memory both given; pass one")
    if target is not None:
        if target not in GPU_TARGETS:
            raise MexportError(f"unknown GPU target {target!r}; known: {', '.join(GPU_TARGETS)}")
        return GPU_TARGETS[target]
    if gpu_memory_gb is not None:
        if not math.isfinite(gpu_memory_gb) or gpu_memory_gb <= 0:
            raise MexportError(f"--gpu-memory must be a positive number of GB, got {gpu_memory_gb}")
        return GpuInfo(f"{gpu_memory_gb:g} GB GPU", int(gpu_memory_gb * GB))
    return None


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """GPUs from ``nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3:
            raise MexportError(f"unexpected nvidia-smi output line: {line!r}")
        name, memory_mib, capability = fields
        major, minor = capability.split(".")
        gpus.append(GpuInfo(name, int(float(memory_mib)) * MIB, (int(major), int(minor))))
    return gpus


def _torch_gpus() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(props.name, int(props.total_memory), (props.major, props.minor)))
    return gpus


def _nvidia_smi_gpus() -> list[GpuInfo]:
    executable = shutil.which("nvidia-smi")
    if executable is None:
        return []
    query = [executable, "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader,nounits"]
    try:
        result = subprocess.run(query, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if result.returncode != 0:
        return []  # e.g. "No devices were found" or a driver/library mismatch
    return parse_nvidia_smi(result.stdout)


def detect_gpus() -> list[GpuInfo]:
    """Local CUDA GPUs, via torch.cuda when torch is installed, else nvidia-smi; empty when there are none."""
    if importlib.util.find_spec("torch") is not None:
        gpus = _torch_gpus()
        if gpus:
            return gpus
    return _nvidia_smi_gpus()


def require_cuda_gpu() -> GpuInfo:
    """The first CUDA GPU (the one TensorRT builds for), or a clear error when there is none."""
    gpus = detect_gpus()
    if not gpus:
        raise MexportError(
            "no CUDA GPU found: TensorRT is installed, but neither torch.cuda nor nvidia-smi sees an NVIDIA GPU",
            hint="build and run engines on a host with an NVIDIA GPU and its driver (check `nvidia-smi`); "
            "`mexport engine MODEL_DIR -o OUT --plan` works without a GPU",
        )
    return gpus[0]
