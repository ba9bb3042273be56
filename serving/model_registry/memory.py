"""How much GPU memory the weights take, and whether they fit the GPU they are meant for."""

from __future__ import annotations

import math

from serving.model_registry.manifest import GIB, MemoryEstimate, RegistrationError
from serving.model_registry.validate import ModelFacts

# vLLM's default share of GPU memory for weights, activations and KV cache (--gpu-memory-utilization).
VLLM_DEFAULT_GPU_MEMORY_UTILIZATION = 0.9


def estimate_memory(
    facts: ModelFacts,
    *,
    gpu_memory_gib: float | None = None,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = VLLM_DEFAULT_GPU_MEMORY_UTILIZATION,
) -> MemoryEstimate:
    """The weights' bytes on the GPUs at vLLM's `dtype: auto`; refused if they do not fit a
    GPU of gpu_memory_gib (when given) with the rest of the budget left for the KV cache."""
    check_gpu_args(gpu_memory_gib, tensor_parallel_size, gpu_memory_utilization)
    weights = facts.parameter_bytes
    served = "as stored"
    if (facts.config_dtype or "").lower() == "float32" and facts.dtypes.get("F32"):
        # dtype auto serves a float32 checkpoint in 16 bits (vllm/config/model.py _resolve_auto_dtype)
        weights -= 2 * facts.dtypes["F32"]
        served = "16-bit"
    per_gpu = math.ceil(weights / tensor_parallel_size)
    estimate = MemoryEstimate(
        weights_bytes=weights,
        served_dtype=served,
        tensor_parallel_size=tensor_parallel_size,
        weights_bytes_per_gpu=per_gpu,
    )
    if gpu_memory_gib is None:
        return estimate
    budget = int(gpu_memory_gib * GIB * gpu_memory_utilization)
    if per_gpu >= budget:
        raise RegistrationError(
            f"{facts.path}: the weights need {format_bytes(per_gpu)} per GPU (tensor_parallel_size "
            f"{tensor_parallel_size}, {served}), more than vLLM's budget of {format_bytes(budget)} on a "
            f"{gpu_memory_gib:g} GiB GPU at gpu_memory_utilization {gpu_memory_utilization:g}, with "
            "nothing left for the KV cache; use more GPUs (--tensor-parallel-size) or larger ones"
        )
    return estimate.model_copy(
        update={
            "gpu_memory_gib": gpu_memory_gib,
            "gpu_memory_utilization": gpu_memory_utilization,
            "headroom_bytes_per_gpu": budget - per_gpu,
        }
    )


def check_gpu_args(gpu_memory_gib: float | None, tensor_parallel_size: int, gpu_memory_utilization: float) -> None:
    """Refuse nonsense before the slow checks run."""
    if tensor_parallel_size < 1:
        raise RegistrationError(f"tensor parallel size must be at least 1, got {tensor_parallel_size}")
    if gpu_memory_gib is not None and not gpu_memory_gib > 0:
        raise RegistrationError(f"GPU memory must be more than 0 GiB, got {gpu_memory_gib:g}")
    if not 0 < gpu_memory_utilization <= 1:
        raise RegistrationError(f"GPU memory utilization must be in (0, 1], got {gpu_memory_utilization:g}")


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"
