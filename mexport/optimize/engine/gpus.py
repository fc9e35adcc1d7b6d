"""Which GPU an engine is planned for or built on: named targets, and lazy detection of the local one.

A TensorRT engine is specific to the GPU's compute capability and must fit in its memory, so a plan is checked
against either a named target (memory as ``nvidia-smi`` reports it, compute capability) or a plain memory size,
and a build against the GPU it runs on (detected by :mod:`mexport.hardware`).
"""

from __future__ import annotations

import math

from mexport.errors import MexportError
from mexport.hardware import MIB, GpuInfo
from mexport.trt_common import GB

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
