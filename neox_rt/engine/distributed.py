"""Tensor-parallel serving: rank 0 schedules and samples, every rank runs the same forward on its shard.

Under torchrun (``python -m neox_rt.serve --tp N``) rank 0 owns the HTTP server, the scheduler, the block manager
and sampling; ranks 1..N-1 own only their shard of the model and of the paged KV cache (the same number of blocks
on every rank, so one block table serves all). Each step rank 0 broadcasts the step's inputs
(:class:`StepBroadcaster`: a header of sizes, then token ids, positions, KV slots, block tables, lengths, query
starts and logits rows) and every rank calls the model's forward with them, so the all-reduces and the LM head's
all-gather inside it pair up across ranks; the other ranks drop their logits (:func:`worker_loop`). The pool size
is rank 0's (free memory differs by rank) and reaches the workers first (:func:`share_pool_size`). A header with
command 0 ends the workers' loop (the server's shutdown); a rank that dies takes torchrun's launch down with it.
Decode CUDA graphs stay off under tensor parallelism (as for ``generate``: ``NEOX_RT_CUDA_GRAPHS=1`` opts in).
"""
from __future__ import annotations

import logging

import torch

from neox_rt.engine.kv_cache import PagedKVCache
from neox_rt.model.model import PagedAttentionMetadata

log = logging.getLogger("neox_rt.engine")

_STEP, _EXIT = 1, 0
_HEADER = 7  # command, tokens, sequences, table width, logits rows, decodes, spare


def _device_of(model) -> torch.device:
    return model.device


def share_pool_size(tp, model, num_blocks: int | None) -> int:
    """Rank 0's ``num_blocks`` on every rank (the workers pass None)."""
    box = torch.tensor([num_blocks or 0], dtype=torch.long, device=_device_of(model))
    tp.broadcast(box, src=0)
    return int(box.item())


class StepBroadcaster:
    """Rank 0's side: sends each step's inputs (host tensors, as :meth:`ModelRunner.prepare` builds them)."""

    def __init__(self, tp, model):
        self.tp = tp
        self.device = _device_of(model)

    def send(self, ids, pos, slots, tables, seqlens, qsl, rows, num_decodes: int):
        """Broadcast one step; returns the same inputs on the device (rank 0's forward uses them)."""
        b, w = tables.shape
        header = torch.tensor([_STEP, ids.numel(), b, w, rows.numel(), num_decodes, 0], dtype=torch.long,
                              device=self.device)
        self.tp.broadcast(header, src=0)
        out = [t.to(self.device) for t in (ids, pos, slots, tables, seqlens, qsl, rows)]
        for t in out:
            self.tp.broadcast(t, src=0)
        return out

    def stop(self) -> None:
        """End the workers' loop."""
        header = torch.zeros(_HEADER, dtype=torch.long, device=self.device)
        header[0] = _EXIT
        self.tp.broadcast(header, src=0)


def worker_loop(tp, model, num_blocks: int, block_size: int) -> int:
    """Ranks 1..N-1: run the forward of every step rank 0 broadcasts, until it says stop. Returns the step count."""
    device = _device_of(model)
    cache = PagedKVCache.for_model(model, num_blocks, block_size)
    steps = 0
    with torch.inference_mode():
        while True:
            header = torch.empty(_HEADER, dtype=torch.long, device=device)
            tp.broadcast(header, src=0)
            command, n, b, w, m, nd, _ = header.tolist()
            if command == _EXIT:
                return steps
            shapes = [((n,), torch.long), ((n,), torch.long), ((n,), torch.long), ((b, w), torch.int32),
                      ((b,), torch.int32), ((b + 1,), torch.int32), ((m,), torch.long)]
            ids, pos, slots, tables, seqlens, qsl, rows = [torch.empty(s, dtype=d, device=device) for s, d in shapes]
            for t in (ids, pos, slots, tables, seqlens, qsl, rows):
                tp.broadcast(t, src=0)
            meta = PagedAttentionMetadata(slot_mapping=slots, block_tables=tables, seqlens=seqlens,
                                          query_start_loc=qsl, num_decodes=nd)
            model(ids[None], pos[None], cache, last_index=rows, paged=meta)
            steps += 1
