"""One precision policy for training and evaluation: bf16 autocast where the hardware computes it natively.

On a CPU without native bf16 (AVX2-only x86 machines, most laptops), PyTorch emulates bf16 matrix products
and an autocast training step is about 20x slower than fp32 (`benchmarks/bench_demo.py --emulated-bf16` times it), so
`"auto"` means bf16 only on a CUDA device that supports it and on a CPU with AVX512-BF16 or AMX, fp32 elsewhere.
"""

from __future__ import annotations

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "EMULATED_BF16_SLOWDOWN",
    "cpu_has_native_bf16",
    "native_bf16_available",
    "parse_bf16",
    "resolve_bf16",
]

# benchmarks/bench_training.py on a 2-core AMD EPYC (Zen 3, AVX2, no native bf16): 28 s per bf16-autocast step
# against 1.2 s in fp32 (23x); the figure the warning names.
EMULATED_BF16_SLOWDOWN = "about 20x"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX tiles), where bf16 autocast pays."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def native_bf16_available(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 runs natively on `device`: a CUDA device with bf16 support, or a CPU with native bf16."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return cpu_has_native_bf16()
    return False


def parse_bf16(value: bool | str) -> bool | str:
    """`True`, `False` or `"auto"` from a bool or a string (command lines, json files)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered == "auto":
        return "auto"
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ValueError(f"bf16 must be 'auto', True or False, got {value!r}")


def resolve_bf16(value: bool | str, device: str | torch.device = "cpu") -> bool:
    """The bf16 decision for `device`: `"auto"` follows `native_bf16_available`; an explicit True is kept,
    with a warning naming the slowdown when `device` is a CPU without native bf16.

    `value` may be a bool or one of the strings `"auto"`, `"true"`, `"false"` (command lines, json files).
    """
    policy = parse_bf16(value)
    if policy == "auto":
        return native_bf16_available(device)
    if policy and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "bf16 was requested, but this CPU has no native bf16 (no AVX512-BF16 or AMX): PyTorch emulates it, "
            f"and training runs {EMULATED_BF16_SLOWDOWN} slower than in fp32. Leave bf16 at 'auto' (the default) "
            "to train in fp32 here."
        )
    return policy
