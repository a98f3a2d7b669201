"""The one-shot peer-to-peer all-reduce over NVLink (csrc/kernels/allreduce.cuh), set up on PyTorch symmetric memory.

:class:`P2PAllReduce` replaces NCCL for small tensors inside CUDA graphs, and at batch 1 lets a parallel-residual
layer leave its all-reduce to the next layer's LayerNorm kernel (:meth:`P2PAllReduce.defers`,
:meth:`~P2PAllReduce.linear_sum_push`, :meth:`~P2PAllReduce.reduce_dual_layernorm`; the model sees only
:class:`neox_rt.model.layers.PendingSum`). :func:`setup_p2p` decides, on every rank together, whether it can run.
"""
from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist

from neox_rt.errors import NeoxRtError
from neox_rt.ops.table import OPS


def _cuda_ops():
    """The CUDA backend's bindings, imported when first needed: importing them reads (and checks) its settings."""
    from neox_rt.ops import cuda
    return cuda

# The one-shot peer-to-peer all-reduce (csrc/kernels/allreduce.cuh): each rank's slot in each buffer, carrying half
# as much data (its lines hold flags beside the data): tensors of up to 64 KB (decode's hidden state: 12 KB a row for
# 20B); larger ones (prefill) go to NCCL.
P2P_SLOT_BYTES = 128 << 10
P2P_HEADER_BYTES = 256  # kP2PHeaderBytes: this rank's state, before the slots
P2P_MAX_RANKS = 8


def p2p_mode() -> int:
    """NEOX_RT_P2P_ALLREDUCE: 0 off (NCCL only), 1 inside CUDA graphs (the default: the decode graph, where ranks
    run in lock-step), 2 in eager calls too."""
    text = os.environ.get("NEOX_RT_P2P_ALLREDUCE", "1").strip() or "1"
    if text not in ("0", "1", "2"):
        raise NeoxRtError(f"NEOX_RT_P2P_ALLREDUCE={text!r}: expected 0 (off), 1 (in CUDA graphs) or 2 (always)")
    return int(text)


class P2PAllReduce:
    """The one-shot all-reduce over peer memory (``torch.ops.neox_rt.p2p_all_reduce``) for small CUDA tensors.

    Each rank's buffer comes from PyTorch's symmetric memory and is mapped into every rank's process
    (``buffer_ptrs``); the kernel pushes this rank's input into each peer's slot as lines that carry their own
    flags, waits for the peers' lines in its own buffer and sums in rank order, so every rank gets the same bits. It replaces NCCL for tensors of at most
    ``slot_bytes / 2`` inside CUDA graphs (mode 1) or everywhere (mode 2); NCCL takes the rest. Where it is on, a
    parallel-residual layer at batch 1 skips the separate kernel: its sum kernel pushes the partial output and the
    next layer's LayerNorm kernel reduces it (model.layers.PendingSum; NEOX_RT_P2P_FUSE=0 keeps the separate kernel).
    """

    def __init__(self, buffer: torch.Tensor, handle, rank: int, mode: int, slot_bytes: int = P2P_SLOT_BYTES):
        self.buffer, self.handle = buffer, handle  # kept alive: the peers' mappings point into them
        self.ptrs = [int(p) for p in handle.buffer_ptrs]
        self.rank, self.mode, self.slot_bytes = rank, mode, slot_bytes
        self.fuse = os.environ.get("NEOX_RT_P2P_FUSE", "1") != "0"

    def wants(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and x.is_contiguous()
                and 0 < 2 * nbytes <= self.slot_bytes and nbytes % 16 == 0 and x.data_ptr() % 16 == 0
                and self.active())

    def active(self) -> bool:
        """Whether this call may use the kernels: always (mode 2), or while a CUDA graph is being captured."""
        return self.mode == 2 or torch.cuda.is_current_stream_capturing()

    def fuses(self) -> bool:
        """Whether a layer may push its partial sum for the next LayerNorm to reduce (NEOX_RT_P2P_FUSE=0: never)."""
        return self.fuse and self.active()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.neox_rt.p2p_all_reduce(x, self.ptrs, self.rank, self.slot_bytes, _cuda_ops().PDL)

    def defers(self, sum_args: tuple, layernorm_params: tuple) -> bool:
        """Whether a layer's all-reduce can go into the next layer's LayerNorm: this call may use the kernels
        (:meth:`fuses`), the CUDA GEMV pair serves the ``linear_sum`` call (one row, tensor weights: a quantized
        pair's kernel pushes nothing), the dtype is float16 / bfloat16, the hidden size gives 8-byte vectors
        (hidden % 4 == 0) and a row fits a slot, and the LayerNorm parameters are 16-byte aligned."""
        if not self.fuses():
            return False
        x1, h = sum_args[0], layernorm_params[0].shape[0]
        return (OPS["linear_sum"].served_by(*sum_args) == "cuda" and _cuda_ops().supports_linear_sum_push(*sum_args)
                and x1.dtype in (torch.float16, torch.bfloat16)
                and h % 4 == 0 and 4 * h <= self.slot_bytes and all(t.data_ptr() % 16 == 0 for t in layernorm_params))

    def linear_sum_push(self, *sum_args) -> torch.Tensor:
        """The ``linear_sum`` op whose output the kernel also pushes, flagged, into every peer's slot."""
        return _cuda_ops().linear_sum_push(self, *sum_args)

    def reduce_dual_layernorm(self, partial, weight1, bias1, weight2, bias2, eps):
        """(sum over ranks of the pushed partials, LN1(sum), LN2(sum)) in one kernel."""
        return _cuda_ops().p2p_reduce_dual_layernorm(self, partial, weight1, bias1, weight2, bias2, eps)


def _p2p_local_reason(size: int, device: torch.device) -> str:
    """Why this rank cannot take part in the peer-to-peer all-reduce ("" if it can)."""
    if p2p_mode() == 0:
        return "NEOX_RT_P2P_ALLREDUCE=0"
    if size > P2P_MAX_RANKS:
        return f"more than {P2P_MAX_RANKS} ranks"
    if os.environ.get("NCCL_P2P_DISABLE", "0") not in ("", "0"):
        return "NCCL_P2P_DISABLE is set"
    if int(os.environ.get("LOCAL_WORLD_SIZE", size)) != size:
        return "the ranks span several nodes"
    if torch.cuda.device_count() < size:
        return "fewer GPUs than ranks on this node"
    me = device.index if device.index is not None else torch.cuda.current_device()
    if not all(torch.cuda.can_device_access_peer(me, j) for j in range(size) if j != me):
        return "the GPUs cannot access each other's memory (no P2P)"
    try:
        _cuda_ops().load_extension()
        if not hasattr(torch.ops.neox_rt, "p2p_all_reduce"):
            return "the CUDA extension has no p2p_all_reduce (rebuild it)"
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError as e:
        return f"not available: {e}"
    return ""


def _agree(ok: bool, device: torch.device, group) -> bool:
    """True on every rank iff ``ok`` on every rank (a MIN all-reduce over the process group)."""
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def setup_p2p(tp, device: torch.device) -> None:
    """Give ``tp`` the peer-to-peer all-reduce where every rank can (a collective: every rank calls it); else
    record why not in ``tp.p2p_off_reason``. NVLink multicast stays off (never used here)."""
    reason = _p2p_local_reason(tp.size, device)
    if not _agree(not reason, device, tp.group):
        tp.p2p_off_reason = reason or "another rank cannot"
        return
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    buf = handle = None
    try:
        import torch.distributed._symmetric_memory as symm_mem
        try:
            symm_mem.set_backend("CUDA")
        except Exception:  # noqa: BLE001 - older torch or a backend already chosen: keep what is there
            pass
        nbytes = P2P_HEADER_BYTES + 2 * tp.size * P2P_SLOT_BYTES
        buf = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
        buf.zero_()
        group = tp.group if tp.group is not None else dist.group.WORLD
        handle = symm_mem.rendezvous(buf, group.group_name)
        error = "" if len(handle.buffer_ptrs) == tp.size else "symmetric memory mapped a different number of ranks"
    except Exception as e:  # noqa: BLE001 - any failure means NCCL, on every rank (agreed below)
        error = f"symmetric memory: {type(e).__name__}: {e}".splitlines()[0][:200]
    if not _agree(not error, device, tp.group):
        tp.p2p_off_reason = error or "another rank could not map its buffer"
        return
    torch.cuda.synchronize(device)
    dist.barrier(group=tp.group)  # every buffer zeroed before any rank signals into it
    tp.p2p = P2PAllReduce(buf, handle, tp.rank, p2p_mode())
