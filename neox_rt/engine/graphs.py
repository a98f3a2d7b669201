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
from neox_rt.model.model import PagedAttentionMetadata
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


def capture_graph(forward, warmup: int, pool):
    """PyTorch's recipe: ``warmup`` runs of ``forward`` on a side stream (which also compiles Triton kernels), then
    one captured run in ``pool``; returns (graph, the captured run's outputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


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
        if self._pool is None:
            # One pool for all buckets: a step's outputs are consumed before the next replay, and
            # buckets never replay concurrently, so their intermediates may share memory.
            self._pool = torch.cuda.graph_pool_handle()
        graph, (logits, tokens) = capture_graph(lambda: self._forward(bucket, cache, greedy_vocab), self.warmup,
                                                self._pool)
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


PAGED_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
"""Batch sizes of the engine's decode graphs (up to its max_num_seqs): a step pads its batch to the next one, so
above 16 each is at most 1.5x the one below (150 sequences run 160 rows, not 256: every linear and the LM head
compute the padding rows too)."""


class PagedDecodeGraphRunner:
    """The continuous-batching engine's pure-decode steps (every sequence one token) as CUDA graphs over the paged
    KV cache, one per batch bucket.

    The step's inputs live in static buffers: token ids, positions and KV slots [bucket], block tables [bucket,
    max_blocks] (the widest table a sequence of ``max_model_len`` tokens has) and seqlens [bucket]. The runner copies
    a step's rows in and replays; padding rows are token 0 at position 0 with KV slot -1 (nothing written) and length
    0 (attention gives zeros), and their logits are dropped. Block tables change every step (a new block, a sequence
    leaving, a preemption): they are data, so the graphs never need recapturing; only a new op backend drops them.
    Mixed steps (prompt chunks beside decodes) run eagerly. ``capture=False`` runs the same padded step eagerly (CPU
    tests of the padding).
    """

    def __init__(self, model, cache, max_num_seqs: int, max_blocks: int, capture: bool = True, warmup: int = 2):
        self.model = model
        self.cache = cache
        self.capture = capture
        self.warmup = warmup
        top = bucket_for(max_num_seqs, PAGED_BUCKETS) or max_num_seqs
        self.buckets = tuple(b for b in PAGED_BUCKETS if b < top) + (top,)
        n, dev = top, model.device
        self.ids = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(1, n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.seqlens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.rows = torch.arange(n, dtype=torch.long, device=dev)
        self._graphs: dict[int, tuple] = {}
        self._backends = None
        self._pool = None
        self.captures = 0
        self.disabled_reason: str | None = None

    def supports(self, batch: int, width: int) -> bool:
        return (self.disabled_reason is None and batch <= self.buckets[-1]
                and width <= self.block_tables.shape[1])

    def _forward(self, bucket: int):
        meta = PagedAttentionMetadata(slot_mapping=self.slots[:bucket], block_tables=self.block_tables[:bucket],
                                      seqlens=self.seqlens[:bucket], query_start_loc=self.query_start_loc[:bucket + 1],
                                      num_decodes=bucket)
        return self.model(self.ids[:, :bucket], self.positions[:, :bucket], self.cache, last_index=self.rows[:bucket],
                          paged=meta)

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every bucket's graph now (largest first, so the shared pool is sized once), on steps of padding
        rows only (nothing is written, nothing attended), so that serving never pauses for a capture. Returns the
        graphs captured; 0 when capturing is off or failed (``disabled_reason``)."""
        if not self.capture:
            return 0
        empty = torch.empty(0, dtype=torch.long)
        for bucket in reversed(self.buckets):
            if self._graphs.get(bucket) is not None:
                continue
            if self.step(empty, empty, empty, torch.empty(0, 0, dtype=torch.int32), torch.empty(0, dtype=torch.int32),
                         pad_to=bucket) is None:
                return 0
        return len(self._graphs)

    @torch.inference_mode()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor,
             seqlens: torch.Tensor, pad_to: int | None = None, fill: tuple | None = None) -> torch.Tensor | None:
        """One decode step of b sequences (host or device tensors: ids, positions, slots [b], block_tables [b, w],
        seqlens [b]) -> logits [b, V] (a view of a static output, valid until the next step), or None when this
        step cannot run as a graph (the caller runs it eagerly). ``fill`` = (rows, ids), device tensors: those rows'
        input ids taken from the device (tokens a step still in flight samples), over ``ids``' placeholders."""
        b, w = block_tables.shape
        if not self.supports(b, w):
            return None
        bucket = pad_to or bucket_for(b, self.buckets)
        self.ids[0, :b].copy_(ids, non_blocking=True)
        if fill is not None:
            self.ids[0].index_copy_(0, *fill)
        self.positions[0, :b].copy_(positions, non_blocking=True)
        self.slots[:b].copy_(slots, non_blocking=True)
        self.block_tables[:b, :w].copy_(block_tables, non_blocking=True)
        self.seqlens[:b].copy_(seqlens, non_blocking=True)
        if b < bucket:  # padding rows: nothing written, nothing attended
            self.ids[0, b:bucket].zero_()
            self.positions[0, b:bucket].zero_()
            self.slots[b:bucket].fill_(-1)
            self.seqlens[b:bucket].zero_()
        if not self.capture:
            return self._forward(bucket)[:b]
        backends = tuple(sorted(active_backends().items()))
        if backends != self._backends:
            self._graphs.clear()
            self._pool = None
            self._backends = backends
        captured = self._graphs.get(bucket)
        if captured is None:
            try:
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                captured = capture_graph(lambda: self._forward(bucket), self.warmup, self._pool)
            except Exception as e:  # noqa: BLE001 - an op that cannot be captured must not end serving
                self.disabled_reason = f"{type(e).__name__}: {e}"
                self._graphs.clear()
                log.warning("neox_rt: CUDA-graph capture failed (%s); the engine decodes eagerly",
                            self.disabled_reason)
                return None
            self._graphs[bucket] = captured
            self.captures += 1
            log.info("neox_rt: captured paged decode graph for batch bucket %d", bucket)
        graph, logits = captured
        graph.replay()
        return logits[:b]
