"""Tensor-parallel context: rank, size and the collectives the model calls (no-ops at size 1).

Megatron-style sharding: column-parallel weights (query_key_value, dense_h_to_4h, embed_in, embed_out)
are split on dim 0, row-parallel weights (attention.dense, dense_4h_to_h) on dim 1; LayerNorms and the
row-parallel biases are replicated and the biases are added once, after the all-reduce.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from neox_rt.errors import NeoxRtError
from neox_rt.parallel.p2p import P2PAllReduce, setup_p2p

@dataclass
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object | None = None
    all_reduce_calls: int = field(default=0, repr=False)
    """Count of all-reduces issued (tests check one per layer with the parallel residual)."""
    p2p: P2PAllReduce | None = field(default=None, repr=False)
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
