"""CUDA-graph decode: one captured forward per batch-size bucket, replayed once per generated token.

A decode step of a batch-1 model is a few hundred small kernels; launched one by one from Python their
launch overhead (a few microseconds each) adds up to a sizeable share of a step. Captured once in a CUDA
graph, a step is one ``replay()``.

Contract of a captured step (``model(ids, positions, cache, decode=True)``):
  - inputs are static buffers: token ids ``[bucket, 1]`` and positions ``[bucket, 1]`` (int64); the step
    copies the real rows in and replays. Rows ``b..bucket-1`` are padding: token ``pad_id`` at position 0,
    so they write only slot 0 of cache rows ``b..bucket-1``, which no real sequence uses (the cache must
    have at least ``bucket`` rows: :meth:`DecodeGraphRunner.cache_rows`). Their logits are ignored.
  - the forward writes the KV cache in place and reads the model's precomputed rotary tables; it does no
    host sync (``decode_attention_ref`` masks instead of slicing; ``rotary_kv_write_ref`` indexes on device).
  - a graph is bound to the cache tensors it was captured with; a new cache (new capacity or batch)
    or a new op backend drops every graph and the next step captures again.
  - greedy decoding can take the argmax inside the graph (``fuse_argmax``), so a step is one replay plus
    two small copies; other sampling runs outside the graph on the returned logits.
Capture follows the PyTorch recipe: warm-up on a side stream (which also compiles Triton kernels), then
``torch.cuda.graph``. The warm-up runs on the real inputs of the step being captured: a decode step
writes the same keys and values to the same slots every time it runs on the same inputs, so warming up
on them is harmless, and the first replay gives the step's result.
"""
from __future__ import annotations

import logging
import os

import torch

from neox_rt.errors import NeoxRtError
from neox_rt.ops.table import active_backends

log = logging.getLogger("neox_rt")

BUCKETS = (1, 2, 4, 8, 16, 32)
"""Batch sizes with a captured graph; a batch is padded up to the next bucket; larger batches run eagerly."""


def bucket_for(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int | None:
    """Smallest bucket >= batch, or None when the batch is larger than every bucket."""
    if batch <= 0:
        raise NeoxRtError(f"batch size must be positive, got {batch}")
    return next((b for b in sorted(buckets) if b >= batch), None)


def graphs_enabled(device, tp_size: int = 1) -> bool:
    """Decode runs as CUDA graphs on a CUDA device unless ``NEOX_RT_CUDA_GRAPHS=0``.

    Under tensor parallelism only when asked for (``NEOX_RT_CUDA_GRAPHS=1``): a capture that failed on one
    rank only would leave the ranks in different collectives.
    """
    flag = os.environ.get("NEOX_RT_CUDA_GRAPHS")
    if torch.device(device).type != "cuda" or flag == "0":
        return False
    return tp_size == 1 or flag == "1"


class _Captured:
    """One bucket's graph and its outputs (which live in the runner's memory pool)."""

    def __init__(self, graph, logits: torch.Tensor, tokens: torch.Tensor | None):
        self.graph = graph
        self.logits = logits  # [bucket, V]
        self.tokens = tokens  # [bucket] greedy choice, or None


class DecodeGraphRunner:
    """Decode steps of ``model`` as CUDA graphs, one per (bucket, greedy vocab).

    ``capture=False`` runs the same padded static-buffer step eagerly (for CPU tests of the padding).
    """

    def __init__(self, model, pad_id: int = 0, buckets: tuple[int, ...] = BUCKETS, capture: bool = True,
                 fuse_argmax: bool = True, warmup: int = 2):
        self.model = model
        rows = model.vocab_rows
        self.pad_id = pad_id if 0 <= pad_id < rows else 0  # padding rows need a valid embedding row
        self.buckets = tuple(sorted(buckets))
        self.capture = capture
        self.fuse_argmax = fuse_argmax
        self.warmup = warmup
        device = model.gpt_neox.final_layer_norm.weight.device
        n = self.buckets[-1]
        self.ids = torch.full((n, 1), self.pad_id, dtype=torch.long, device=device)  # [max bucket, 1]
        self.positions = torch.zeros((n, 1), dtype=torch.long, device=device)  # [max bucket, 1]
        self._graphs: dict[tuple[int, int | None], _Captured] = {}
        self._bound: tuple | None = None  # (k, v, backend signature) the graphs were captured against
        self._pool = None
        self.captures = 0  # graphs captured so far (tests and logs)
        self.disabled_reason: str | None = None

    # -- sizes ---------------------------------------------------------------------------------------
    def supports(self, batch: int) -> bool:
        return self.disabled_reason is None and bucket_for(batch, self.buckets) is not None

    def cache_rows(self, batch: int) -> int:
        """Cache rows a batch needs on this path: its bucket (padding rows write their own rows)."""
        return bucket_for(batch, self.buckets) or batch

    # -- graphs --------------------------------------------------------------------------------------
    def invalidate(self) -> None:
        """Drop every graph (and its memory pool); the next step captures again."""
        self._graphs.clear()
        self._pool = None
        self._bound = None

    def _bind(self, cache) -> None:
        # Addresses, not references: holding the old cache would keep its memory alive after the
        # generator frees it. Same addresses and shape mean the graphs still write the right memory.
        sig = (cache.k.data_ptr(), cache.v.data_ptr(), tuple(cache.k.shape), cache.k.dtype,
               tuple(sorted(active_backends().items())))
        if sig != self._bound:
            self.invalidate()
            self._bound = sig

    def _forward(self, bucket: int, cache, greedy_vocab: int | None):
        logits = self.model(self.ids[:bucket], self.positions[:bucket], cache, decode=True)[:, 0]  # [B, V]
        tokens = None
        if greedy_vocab is not None:
            tokens = logits.float()[:, :greedy_vocab].argmax(dim=-1)  # [B], same math as sampling.sample
        return logits, tokens

    def _capture(self, bucket: int, cache, greedy_vocab: int | None) -> _Captured:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self._forward(bucket, cache, greedy_vocab)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            # One pool for all buckets: a step's outputs are consumed before the next replay, and
            # buckets never replay concurrently, so their intermediates may share memory.
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, tokens = self._forward(bucket, cache, greedy_vocab)
        self.captures += 1
        log.info("neox_rt: captured decode graph for batch bucket %d (cache %s)", bucket, tuple(cache.k.shape))
        return _Captured(graph, logits, tokens)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache,
             greedy_vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One decode step: tokens [b] at positions [b] (int64, on device) -> (logits [b, V], greedy ids [b]
        or None). The returned tensors are views into static outputs, valid until the next step.
        Returns None if this batch cannot run as a graph (the caller runs the eager step).
        """
        b = tokens.shape[0]
        bucket = bucket_for(b, self.buckets)
        if bucket is None or self.disabled_reason is not None or cache.batch < bucket:
            return None
        if not self.fuse_argmax:
            greedy_vocab = None
        self._bind(cache)
        self.ids[:b, 0].copy_(tokens)
        self.positions[:b, 0].copy_(positions)
        if b < bucket:  # padding rows: token pad_id at slot 0 of their own (unused) cache rows
            self.ids[b:bucket].fill_(self.pad_id)
            self.positions[b:bucket].zero_()
        if not self.capture:
            logits, toks = self._forward(bucket, cache, greedy_vocab)
            return logits[:b], (toks[:b] if toks is not None else None)
        key = (bucket, greedy_vocab)
        captured = self._graphs.get(key)
        if captured is None:
            try:
                captured = self._capture(bucket, cache, greedy_vocab)
            except Exception as e:  # noqa: BLE001 - an op that cannot be captured must not end generation
                self.disabled_reason = f"{type(e).__name__}: {e}"
                self.invalidate()
                log.warning("neox_rt: CUDA-graph capture failed (%s); decoding eagerly", self.disabled_reason)
                return None
            self._graphs[key] = captured
        captured.graph.replay()
        toks = captured.tokens[:b] if captured.tokens is not None else None
        return captured.logits[:b], toks
