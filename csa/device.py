"""Where and in which precision to compute: ``resolve_device`` and ``resolve_precision``."""
from __future__ import annotations

import torch

from csa.validation import CSAInputError

__all__ = ["resolve_device", "resolve_precision", "cpu_has_native_bf16"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``'auto'`` -> CUDA when available, else the CPU; ``'cpu'``, ``'cuda'``, ``'cuda:N'`` as given."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise CSAInputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CSAInputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise CSAInputError(f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CSAInputError(f"device={device!r} but CUDA is not available; use device='cpu' or 'auto'")
    return dev


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = plain float32).

    ``'auto'`` picks bf16 only where it was measured to be both faster and as accurate
    (``benchmarks/precision.py``): CUDA devices that support bf16 and CPUs with native bf16
    instructions; fp32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    raise CSAInputError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}")
