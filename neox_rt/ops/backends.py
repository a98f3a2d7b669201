"""Backend selection: which kernels serve each op of :data:`neox_rt.ops.table.OPS`, chosen once.

Backends: ``cuda`` (the ``neox_rt._C`` extension, :mod:`neox_rt.ops.cuda`), ``triton`` (:mod:`neox_rt.ops.triton`)
and ``torch`` (the references). ``NEOX_RT_BACKEND`` forces one; by default a GPU gets the fastest available per op
and ``NEOX_RT_OP_BACKENDS="op=backend,..."`` overrides single ops of that default. A missing backend logs one
warning and the references serve; a bad setting is a :class:`~neox_rt.errors.NeoxRtError`.
"""
from __future__ import annotations

import logging
import os

import torch

from neox_rt.errors import NeoxRtError
from neox_rt.ops.table import OPS, clear, register

log = logging.getLogger("neox_rt")

BACKENDS = ("cuda", "triton", "torch")
_active_backend: str | None = None


def reset() -> None:
    """Every op back to its reference, and no backend selected."""
    global _active_backend
    clear()
    _active_backend = None


def _load_backend(name: str) -> bool:
    """Register a backend's implementations. False (and one warning) if unavailable; a bad setting of the backend
    (an environment variable) is a NeoxRtError, not a silent fallback."""
    try:
        if name == "cuda":
            from neox_rt.ops import cuda as module  # imported on demand: it loads the compiled extension
        else:
            from neox_rt.ops import triton as module  # imported on demand: triton is optional and slow to import
        prepares = getattr(module, "PREPARES", {})  # op name -> the backend's weight-layout converter
        for op_name, entry in module.implementations().items():
            if op_name in OPS:  # entry: (impl, supports), or a list of them tried in order
                register(op_name, *((entry, None) if isinstance(entry, list) else entry), name,
                         prepare=prepares.get(op_name))
        return True
    except NeoxRtError:
        raise
    except Exception as e:  # noqa: BLE001 - a missing extension must never crash the runtime
        log.warning("neox_rt: %s backend unavailable (%s); using the PyTorch reference", name, e)
        return False


def select_backend(name: str | None = None, device: torch.device | str | None = None) -> str:
    """Choose the backend once. ``name`` or ``NEOX_RT_BACKEND``; default the fastest available.

    On a CPU device the reference runs (the ``triton`` backend may still be forced for CPU testing
    under ``TRITON_INTERPRET=1``). Returns the name of the backend in force.
    """
    global _active_backend
    name = name or os.environ.get("NEOX_RT_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise NeoxRtError(f"unknown backend {name!r} (NEOX_RT_BACKEND); choose one of {', '.join(BACKENDS)}")
    overrides = op_backend_overrides()  # validated on every device, applied to the GPU default
    on_gpu = device is not None and torch.device(device).type == "cuda"
    wanted = name or ("fastest" if on_gpu else "torch")
    if _active_backend == wanted and wanted != "fastest":
        return _active_backend
    reset()
    if wanted == "fastest":
        # Per op, the backend that measured fastest on an H100 (bench/results/kernels_h100.json, the decode
        # A/B runs in bench/NOTES.md): Triton for layernorm and prefill attention; the CUDA extension for
        # rotary + KV-cache write (91% vs 66% of copy bandwidth at the 20B prefill shape); CUDA first, then
        # Triton, then the reference for the linear (the CUDA GEMV takes single-row decode with bias, GeLU and
        # residual fused, and 2-16 rows where its tensor-core tiles win; the Triton GEMV the other 2-16-row
        # linears, cuBLAS the rest) and for decode attention, dense and paged (the single-launch CUDA kernels;
        # Triton where they decline: alignment, int64 tables). Either backend alone serves every op it has when
        # the other is unavailable. NEOX_RT_OP_BACKENDS overrides single ops.
        have_triton = _load_backend("triton")
        by_triton = {k: (op.impls, op.prepares) for k, op in OPS.items() if op.impls}
        clear()
        by_cuda = {k: (op.impls, op.prepares) for k, op in OPS.items() if op.impls} if _load_backend("cuda") else {}
        have = {"cuda": by_cuda, "triton": by_triton}
        for k, op in OPS.items():
            choice = overrides.get(k) or ("cuda+triton" if k in CUDA_THEN_TRITON
                                          else "cuda" if k in PREFER_CUDA else "triton")
            wanted_parts = () if choice == "torch" else choice.split("+")
            parts = [b for b in wanted_parts if k in have[b]]
            if wanted_parts and not parts:  # the preferred backend lacks this op: the other one serves it
                parts = [b for b in ("triton", "cuda") if k in have[b]][:1]
            op.impls = tuple(impl for b in parts for impl in have[b][k][0])
            op.impl_backends = tuple(b for b in parts for _ in have[b][k][0])
            op.prepares = tuple(fn for b in parts for fn in have[b][k][1])
            op.backend = "+".join(parts) or "torch"
        _active_backend = wanted
        # report the backend that serves most ops
        return "triton" if have_triton else OPS["rotary_kv_write"].backend
    if wanted != "torch" and not _load_backend(wanted):
        wanted = "torch"
    _active_backend = wanted
    return wanted


def op_backend_overrides() -> dict[str, str]:
    """``NEOX_RT_OP_BACKENDS="op=backend,..."`` (backend: cuda, triton, torch or cuda+triton): per-op exceptions to
    the default ("fastest") selection, for A/B runs and for working around a kernel. Bad entries raise."""
    text = os.environ.get("NEOX_RT_OP_BACKENDS", "").strip()
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        op, _, backend = item.partition("=")
        op, backend = op.strip(), backend.strip()
        if op not in OPS or backend not in ("cuda", "triton", "torch", "cuda+triton"):
            raise NeoxRtError(f"NEOX_RT_OP_BACKENDS entry {item!r}: expected op=backend with op one of "
                              f"{', '.join(OPS)} and backend one of cuda, triton, torch, cuda+triton")
        out[op] = backend
    return out


PREFER_CUDA = frozenset({"rotary_kv_write", "scaled_causal_softmax", "linear_pair", "linear_sum", "norm_linear_pair",
                         "linear_sum_norm", "rotary_decode_attention"})
"""Ops for which the default ("fastest") selection takes the CUDA extension over Triton."""
CUDA_THEN_TRITON = frozenset({"linear", "decode_attention", "paged_decode_attention"})
"""Ops for which the default selection asks the CUDA extension first, then Triton, then the reference: the
linear's CUDA GEMV takes single-row decode (every decode linear, bias, GeLU and residual fused) and the batched
decode (2-16 rows) of the layers its tensor-core tiles win, the Triton GEMV the other 2-16-row linears, cuBLAS the
rest (prefill); decode attention's single-launch CUDA kernels, over the dense cache and through block tables over
the paged one (the same kernel body), take aligned inputs and int32 tables, the Triton kernels the rest."""
