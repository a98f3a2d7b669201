"""Tensor-parallel context: rank, size and the collectives the model calls (no-ops at size 1).

Megatron-style sharding: column-parallel weights (query_key_value, dense_h_to_4h, embed_in, embed_out)
are split on dim 0, row-parallel weights (attention.dense, dense_4h_to_h) on dim 1; LayerNorms and the
row-parallel biases are replicated and the biases are added once, after the all-reduce.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

# The one-shot peer-to-peer all-reduce (csrc/kernels/allreduce.cuh): each rank's slot in each buffer, carrying half
# as much data (its lines hold flags beside the data): tensors of up to 64 KB (decode's hidden state: 12 KB a row for
# 20B); larger ones (prefill) go to NCCL.
P2P_SLOT_BYTES = 128 << 10
P2P_HEADER_BYTES = 256  # kP2PHeaderBytes: this rank's state, before the slots
P2P_MAX_RANKS = 8


@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object | None = None
    all_reduce_calls: int = field(default=0, repr=False)
    """Count of all-reduces issued (tests check one per layer with the parallel residual)."""
    p2p: "P2PAllReduce | None" = field(default=None, repr=False)
    """The peer-to-peer all-reduce where every rank's GPU maps the others' memory (see :func:`setup_p2p`)."""
    p2p_off_reason: str = field(default="", repr=False)
    """Why ``p2p`` is None on a multi-GPU run (reported by the benchmarks)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks (may be x itself, summed in place)."""
        if self.size == 1:
            return x
        self.all_reduce_calls += 1
        if self.p2p is not None and self.p2p.wants(x):
            return self.p2p(x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's x along the last dim (the vocab shards of the LM head)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = TensorParallel()


def p2p_mode() -> int:
    """NEOX_RT_P2P_ALLREDUCE: 0 off (NCCL only), 1 inside CUDA graphs (the default: the decode graph, where ranks
    run in lock-step), 2 in eager calls too."""
    text = os.environ.get("NEOX_RT_P2P_ALLREDUCE", "1").strip() or "1"
    if text not in ("0", "1", "2"):
        from neox_rt.errors import NeoxRtError
        raise NeoxRtError(f"NEOX_RT_P2P_ALLREDUCE={text!r}: expected 0 (off), 1 (in CUDA graphs) or 2 (always)")
    return int(text)


class P2PAllReduce:
    """The one-shot all-reduce over peer memory (``torch.ops.neox_rt.p2p_all_reduce``) for small CUDA tensors.

    Each rank's buffer comes from PyTorch's symmetric memory and is mapped into every rank's process
    (``buffer_ptrs``); the kernel pushes this rank's input into each peer's slot as lines that carry their own
    flags, waits for the peers' lines in its own buffer and sums in rank order, so every rank gets the same bits. It replaces NCCL for tensors of at most
    ``slot_bytes / 2`` inside CUDA graphs (mode 1) or everywhere (mode 2); NCCL takes the rest. Where it is on, a
    parallel-residual layer at batch 1 skips the separate kernel: its sum kernel pushes the partial output and the
    next layer's LayerNorm kernel reduces it (model.PendingSum; NEOX_RT_P2P_FUSE=0 keeps the separate kernel).
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
        from neox_rt.cuda_ops import PDL
        return torch.ops.neox_rt.p2p_all_reduce(x, self.ptrs, self.rank, self.slot_bytes, PDL)


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
        from neox_rt import cuda_ops
        cuda_ops.load_extension()
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


def setup_p2p(tp: "TensorParallel", device: torch.device) -> None:
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


def init_from_env(tp_size: int | None = None, device_type: str = "cpu") -> TensorParallel:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU) or return the single-process context.

    torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; every rank of the world is
    one tensor-parallel rank (no pipeline or data parallelism). On CUDA each rank takes GPU LOCAL_RANK
    and the NCCL communicator is created here, eagerly, so that the first all-reduce may be captured in a
    CUDA graph.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp_size is None:
        tp_size = world
    if tp_size == 1 and world == 1:
        return TensorParallel()
    from neox_rt.errors import NeoxRtError
    if world != tp_size:
        raise NeoxRtError(f"--tp {tp_size} needs {tp_size} processes, but WORLD_SIZE is {world}: "
                          f"launch with torchrun --nproc-per-node {tp_size}")
    if not dist.is_initialized():
        if device_type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
            if local_rank >= torch.cuda.device_count():
                raise NeoxRtError(f"rank with LOCAL_RANK {local_rank} has no GPU: this node has "
                                  f"{torch.cuda.device_count()}; use --nproc-per-node <= the GPUs per node")
            torch.cuda.set_device(local_rank)
            dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group(backend="gloo")
    elif device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    rank = dist.get_rank()
    tp = TensorParallel(rank=rank, size=tp_size, group=None)
    if device_type == "cuda":
        setup_p2p(tp, torch.device("cuda", torch.cuda.current_device()))
    return tp


def check_tp_size(config, tp_size: int) -> None:
    """Raise NeoxRtError unless every split dimension of ``config`` divides by ``tp_size``.

    Heads are split whole (head h goes to rank h // (heads / tp)), and so are the MLP columns; the
    vocabulary is padded instead (:func:`padded_vocab_size`).
    """
    from neox_rt.errors import NeoxRtError
    if tp_size < 1:
        raise NeoxRtError(f"tensor-parallel size must be positive, got {tp_size}")
    heads = config.num_attention_heads
    if heads % tp_size:
        raise NeoxRtError(f"num_attention_heads ({heads}) is not divisible by the tensor-parallel size "
                          f"({tp_size}); choose --tp among {_divisors(heads)}")
    if config.intermediate_size % tp_size:
        raise NeoxRtError(f"intermediate_size ({config.intermediate_size}) is not divisible by the "
                          f"tensor-parallel size ({tp_size})")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Rows of the embedding after padding so each of tp_size shards is equal."""
    return -(-vocab_size // tp_size) * tp_size


def tp_split_dim(name: str) -> int | None:
    """The dim on which parameter ``name`` (HF naming) is split across ranks; None if replicated.

    Column-parallel (dim 0): query_key_value (weight and bias; the per-head layout gives each rank whole
    heads), dense_h_to_4h, embed_in, embed_out. Row-parallel (dim 1): attention.dense and dense_4h_to_h
    weights; their biases, like the LayerNorms, are replicated.
    """
    if name.endswith(("query_key_value.weight", "query_key_value.bias", "dense_h_to_4h.weight",
                      "dense_h_to_4h.bias", "embed_in.weight", "embed_out.weight")):
        return 0
    if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
        return 1
    return None
