"""Device and precision choices.

"auto" picks CUDA, then Apple's MPS, then the CPU.  Mixed precision is used
where it is fast: bfloat16 (or float16 with loss scaling) on CUDA, and
bfloat16 on CPUs with native bf16 support (AVX512-BF16 / AMX), where
together with the channels-last-3d memory format it trains a 3D U-Net
several times faster than float32 (see benchmarks/bench_precision.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

__all__ = ["as_float16", "autocast", "cpu_supports_bf16", "release_cached_memory", "resolve_device", "resolve_precision"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available here; use device='auto' or 'cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} was requested but MPS is not available here; use device='auto' or 'cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    return dev


def cpu_supports_bf16() -> bool:
    """True where the CPU computes bfloat16 natively (AVX512-BF16 or AMX).

    oneDNN also *accepts* bfloat16 on plain AVX-512 CPUs, but emulates it
    there: on a 2-core Cascade Lake a training step took 0.51 s in bf16
    against 0.31 s in float32 (channels-last-3d both), so only native support
    counts.  Without torch's CPU feature queries, oneDNN's own answer is used.
    """
    cpu = getattr(torch, "cpu", None)
    queries = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(callable(q) for q in queries):
        try:
            return any(bool(q()) for q in queries)  # type: ignore[misc]
        except RuntimeError:
            pass
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(device: torch.device, precision: str) -> torch.dtype:
    """The autocast dtype for a device; ``torch.float32`` means no autocast."""
    if precision == "fp32":
        return torch.float32
    if device.type == "cuda":
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if device.type == "cpu":
        if precision == "auto":
            return torch.bfloat16 if cpu_supports_bf16() else torch.float32
        if precision == "fp16":
            raise ValueError("config.train.precision 'fp16' is for CUDA; on the CPU use 'bf16' or 'fp32'")
        return torch.bfloat16
    # MPS: autocast support varies between releases; float32 is the safe default
    if precision == "auto":
        return torch.float32
    return torch.float16 if precision == "fp16" else torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def release_cached_memory(device: torch.device) -> None:
    """Give the memory the allocator keeps cached on ``device`` back to the driver (CUDA; elsewhere nothing)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def as_float16(values: Any, out: np.ndarray | None = None) -> np.ndarray:
    """``values`` as float16 (into ``out``, same shape, when given), cast by torch.

    numpy takes a slow path for the values below float16's normal range that
    probabilities near 0 are full of: 0.3 s for 6 M of them, against 0.5 ms in
    torch, for the same bits.
    """
    source = torch.from_numpy(np.ascontiguousarray(np.asarray(values), dtype=np.float32))
    if out is None:
        return source.half().numpy()
    torch.from_numpy(out).copy_(source)
    return out
