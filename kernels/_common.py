"""Helpers shared by the Triton kernels: where they can run, block sizes, device facts."""
from __future__ import annotations

import functools
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: the kernels then run on CPU tensors (tests on CPU-only CI)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_triton_device(*ts: torch.Tensor) -> bool:
    """All tensors on CUDA, or all on CPU while the Triton interpreter is on."""
    if all(t.is_cuda for t in ts):
        return True
    return interpreting() and all(t.device.type == "cpu" for t in ts)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (host-side property: no sync, safe under graph capture)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(t: torch.Tensor) -> int:
    return sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device()) if t.is_cuda else 4
