"""Runs one scheduler step on the model: a :class:`~neox_rt.engine.scheduler.StepPlan` becomes ONE varlen forward
over the paged KV cache, then each sampling chunk's next token is chosen.

The layout of a step: the plan's chunks (decodes first, then prompt chunks) flattened as input_ids [1, num_tokens]
with their positions; each token's KV slot from its sequence's block table (``slot_mapping``); the decodes attend
through ``paged_decode_attention``, the prompt chunks through ``paged_prefill_attention``
(:class:`~neox_rt.model.model.PagedAttentionMetadata`); logits only at the last token of each chunk that samples.
Sampling is per request (temperature, top-k, top-p as :mod:`neox_rt.engine.sampling`; greedy is the argmax), all of
a step's rows at once on the device, with a uniform draw per token from a generator that a seeded request derives
from (seed, token index), so that a request samples the same tokens alone, under load and after a preemption's
recompute (on a GPU: up to the batch's effect on the logits themselves). Logprobs are the fp32 log_softmax of the raw
logits. ``launch`` queues all of it and the copies of its results to the host; ``collect`` waits for those copies
only, so the engine may launch the next step first (a decode's input then comes from the step in flight, on the
device: ``PLACEHOLDER`` inputs).

On a GPU a step of decodes only replays a CUDA graph of its batch bucket (:class:`~neox_rt.engine.graphs.
PagedDecodeGraphRunner`: block tables are graph inputs); steps with prompt chunks run eagerly. The runner never
decides policy (that is the scheduler's). Under tensor parallelism it broadcasts each step's inputs to the other
ranks, which run the same forward (:mod:`neox_rt.engine.distributed`); sampling happens on rank 0 only.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from neox_rt.engine.distributed import StepBroadcaster
from neox_rt.engine.graphs import PagedDecodeGraphRunner, graphs_enabled
from neox_rt.engine.kv_cache import PagedKVCache
from neox_rt.engine.sampling import request_generator, sample_rows_queued
from neox_rt.engine.sampling import to_device_queued as _to_device
from neox_rt.engine.scheduler import StepPlan
from neox_rt.engine.sequence import PLACEHOLDER
from neox_rt.model.model import PagedAttentionMetadata


@dataclass
class SampledToken:
    """What a sampling chunk produced: the token, and its logprob / the top ones when the request asked."""
    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass
class PromptLogprob:
    """log p of the prompt token at ``position`` given the tokens before it (a request with prompt_logprobs)."""
    position: int
    logprob: float
    top_logprobs: dict[int, float] | None = None


def _host(values: list, dtype) -> torch.Tensor:
    """A host tensor from a list of ints, through numpy (a few times faster than ``torch.tensor`` on a list: this runs
    for every step's inputs)."""
    return torch.from_numpy(np.array(values, dtype=dtype))


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` in page-locked memory when it goes to a GPU: a copy from there never waits for the device, while one
    from ordinary memory may wait for the work queued before it (the step in flight)."""
    return t.pin_memory() if device.type == "cuda" else t


@dataclass
class _Launched:
    """A step between :meth:`ModelRunner.launch` and :meth:`ModelRunner.collect`: everything it computes (the forward,
    every sampling row's token, the logprobs) queued on the device, and copied to the host into tensors that are
    valid once ``done`` has been reached (on a GPU, an event recorded after the copies)."""
    plan: StepPlan
    sample_ids: list
    """The request ids of the sampling rows, in row order."""
    tokens: torch.Tensor | None
    """The sampled ids [len(sample_ids)] on the device: the next step's inputs, before the host knows them."""
    host: dict
    """What ``collect`` reads: "tokens", and where asked "logprobs", "top" (values, ids, ks), "plp" (see
    :meth:`ModelRunner._queue_prompt_logprobs`)."""
    done: object = None
    """A CUDA event after the copies to the host (None on the CPU: nothing is asynchronous there)."""
    plp: list | None = None


@dataclass
class StepResult:
    """What a step gives back: the sampled token of each sampling chunk, and the prompt logprobs it computed."""
    sampled: dict[str, SampledToken]
    prompt_logprobs: dict[str, list[PromptLogprob]]


class ModelRunner:
    """Owns the paged KV cache of a model and runs step plans on it."""

    def __init__(self, model, num_blocks: int, block_size: int, valid_vocab: int, seed: int | None = None,
                 max_num_seqs: int = 64, max_model_len: int | None = None, cuda_graphs: bool | None = None):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.cache = PagedKVCache.for_model(model, num_blocks, block_size)
        if cuda_graphs is None:
            cuda_graphs = graphs_enabled(self.device, model.tp.size)
        max_model_len = max_model_len or model.config.max_position_embeddings
        self.broadcaster = StepBroadcaster(model.tp, model) if model.tp.size > 1 else None
        """Under tensor parallelism: sends each step's inputs to the other ranks (:mod:`.distributed`)."""
        cuda_graphs = cuda_graphs and self.broadcaster is None  # the workers run their steps eagerly
        self.graphs = PagedDecodeGraphRunner(model, self.cache, max_num_seqs, -(-max_model_len // block_size)) \
            if cuda_graphs else None
        """Decode-only steps as CUDA graphs (on a GPU unless NEOX_RT_CUDA_GRAPHS=0)."""
        self.valid_vocab = min(valid_vocab, model.config.vocab_size)
        """Ids at or above this (padded embedding rows, ids the tokenizer lacks) are never sampled."""
        self._generator = torch.Generator()  # unseeded requests draw from this one
        self._generator.manual_seed(seed if seed is not None else int(torch.seed() % (2**63)))

    def prepare(self, plan: StepPlan, prompt_logprobs: frozenset = frozenset()):
        """The step's inputs, on the host: (input_ids [n], positions [n], slot_mapping [n], block_tables [b, w],
        seqlens [b], query_start_loc [b + 1], logits rows [m], the request ids of the first len(ids) of those rows).

        For the prompt chunks of the requests in ``prompt_logprobs``, the rows of every token whose successor is a
        prompt token follow the sampling rows; the item after the ids lists them as (request id, position of the
        predicted token). The last item lists the decodes whose input is a ``PLACEHOLDER`` (planned ahead of the step
        that samples it) as (row of input_ids, request id)."""
        bs = self.block_size
        ids, pos, slots, tables, seqlens, qsl = [], [], [], [], [], [0]
        sample_rows, sample_ids, plp_rows, plp, fill = [], [], [], [], []
        for chunk in plan.chunks:
            table = chunk.seq.block_table
            start, end = chunk.start, chunk.end
            tokens = chunk.token_ids
            if end - start == 1:
                if tokens[0] == PLACEHOLDER:
                    fill.append((len(ids), chunk.request_id))
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            ids += tokens
            pos += range(start, end)
            tables.append(table)
            seqlens.append(end)
            qsl.append(qsl[-1] + end - start)
            if chunk.samples:
                sample_rows.append(qsl[-1] - 1)
                sample_ids.append(chunk.request_id)
            if chunk.request_id in prompt_logprobs:
                last = min(end, chunk.seq.num_prompt_tokens - 1)  # the last prompt position predicted
                plp_rows += range(qsl[-2], qsl[-2] + last - start)
                plp += [(chunk.request_id, p + 1) for p in range(start, last)]
        sample_rows += plp_rows
        width = max(len(t) for t in tables)
        flat = itertools.chain.from_iterable(t if len(t) == width else tuple(t) + (0,) * (width - len(t))
                                             for t in tables)
        block_tables = _host(list(flat), np.int32).view(len(tables), width)
        return (_host(ids, np.int64), _host(pos, np.int64), _host(slots, np.int64), block_tables,
                _host(seqlens, np.int32), _host(qsl, np.int32), _host(sample_rows, np.int64), sample_ids, plp, fill)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, prompt_logprobs: frozenset = frozenset(), prev: "_Launched | None" = None
                ) -> tuple[torch.Tensor, list, list]:
        """The forward of one step, queued: (logits [m, V] of the sampling chunks' last tokens, then of the
        prompt-logprob rows, :meth:`prepare`; the request ids of the sampling rows; the (request, position) of each
        prompt-logprob row). A decode whose input is a placeholder takes ``prev``'s token for it (the step in flight
        that samples it) on the device. A step of decodes only replays a CUDA graph when the runner has them; any
        other step runs eagerly. On a GPU nothing here waits for the device: the inputs go up from pinned memory."""
        ids, pos, slots, tables, seqlens, qsl, rows, sample_ids, plp, fill = self.prepare(plan, prompt_logprobs)
        dev = self.device
        if fill:
            if prev is None or self.broadcaster is not None:
                raise RuntimeError(f"step {plan.step} has inputs still being sampled, and no step in flight gives them")
            src = dict(zip(prev.sample_ids, range(len(prev.sample_ids))))
            fill = (_to_device(_host([r for r, _ in fill], np.int64), dev),
                    prev.tokens[_to_device(_host([src[rid] for _, rid in fill], np.int64), dev)])
        if self.graphs is not None and not plan.prefills:
            logits = self.graphs.step(*(_pinned(t, dev) for t in (ids, pos, slots, tables, seqlens)), fill=fill or None)
            if logits is not None:
                return logits, sample_ids, plp
        if self.broadcaster is not None:  # the other ranks run the same forward on their shards
            ids, pos, slots, tables, seqlens, qsl, rows = self.broadcaster.send(ids, pos, slots, tables, seqlens, qsl,
                                                                                rows, len(plan.decodes))
        else:
            ids, pos, slots, tables, seqlens, qsl, rows = (_to_device(t, dev) for t in (ids, pos, slots, tables,
                                                                                         seqlens, qsl, rows))
            if fill:
                ids.index_copy_(0, *fill)
        meta = PagedAttentionMetadata(slot_mapping=slots, block_tables=tables, seqlens=seqlens, query_start_loc=qsl,
                                      num_decodes=len(plan.decodes))
        logits = self.model(ids[None], pos[None], self.cache, last_index=rows, paged=meta)
        return logits, sample_ids, plp

    def close(self) -> None:
        """Release the other ranks (tensor parallelism): their step loop ends."""
        if self.broadcaster is not None:
            self.broadcaster.stop()
            self.broadcaster = None

    @torch.inference_mode()
    def launch(self, plan: StepPlan, params: Mapping[str, object], prev: "_Launched | None" = None) -> "_Launched":
        """Run ``plan``, first half: the forward, every sampling row's token and the logprobs asked for, all queued
        on the device, and their copies to the host; nothing waited for (on a GPU the host is free until
        :meth:`collect`). ``prev``: the step in flight whose tokens are this step's placeholder inputs.
        ``params[request_id]`` (every chunk's) carries ``temperature``, ``top_k``, ``top_p``, ``seed``, ``logprobs``
        and ``prompt_logprobs`` (a :class:`~neox_rt.engine.llm_engine.SamplingRequest`)."""
        if plan.is_empty:
            return _Launched(plan, [], None, {})
        want_plp = frozenset(c.request_id for c in plan.prefills
                             if getattr(params[c.request_id], "prompt_logprobs", None) is not None)
        logits, sample_ids, plp = self.execute(plan, want_plp, prev)
        host: dict = {}
        tokens = None
        if sample_ids:
            tokens = self._queue_tokens(logits[:len(sample_ids)], plan, params, sample_ids)
            host["tokens"] = tokens
            want_lp = [i for i, r in enumerate(sample_ids) if params[r].logprobs is not None]
            if want_lp:  # the chosen tokens' logprobs and every row's top ones, each in one batched op
                rows, picked = logits[:len(sample_ids)], tokens
                if len(want_lp) < len(sample_ids):  # only the rows that asked: log_softmax reads a whole row each
                    index = _to_device(_host(want_lp, np.int64), rows.device)
                    rows, picked = rows[index], tokens[index]
                logp = torch.log_softmax(rows.float(), dim=-1)
                host["logprobs"] = (want_lp, logp.gather(1, picked[:, None])[:, 0])
                ks = [params[sample_ids[i]].logprobs for i in want_lp]
                if max(ks):
                    host["top"] = (ks, *logp[:, :self.valid_vocab].topk(min(max(ks), self.valid_vocab)))
        if plp:
            host["plp"] = self._queue_prompt_logprobs(logits[len(sample_ids):], plp, plan, params)
        done = None
        if self.device.type == "cuda":  # the copies to the host, then an event that collect waits for
            host = _map_tensors(host, lambda t: t.to("cpu", non_blocking=True))
            done = torch.cuda.Event()
            done.record()
        return _Launched(plan, sample_ids, tokens, host, done, plp)

    def _queue_tokens(self, logits: torch.Tensor, plan: StepPlan, params, sample_ids: list) -> torch.Tensor:
        """Every sampling row's token [m] on the device: greedy rows the argmax, the others :func:`sample_rows_queued`
        with their own temperature, top-k, top-p and a uniform draw from the request's generator (seeded: by (seed,
        index of the token); else the runner's)."""
        drawn = [i for i, r in enumerate(sample_ids) if not (params[r].temperature == 0 or params[r].top_k == 1)]
        # the argmax only where a row is greedy (a step of sampled rows alone skips a pass over its logits)
        tokens = logits[:, :self.valid_vocab].argmax(dim=-1) if len(drawn) < len(sample_ids) else None
        if drawn:
            chunks = {c.request_id: c for c in plan.chunks}
            ps = [params[sample_ids[i]] for i in drawn]
            u = []
            for i, p in zip(drawn, ps):
                c = chunks[sample_ids[i]]
                gen = self._generator if p.seed is None else request_generator(p.seed, c.end - c.seq.num_prompt_tokens)
                u.append(float(torch.rand((), generator=gen)))
            whole = len(drawn) == len(sample_ids)
            index = None if whole else _to_device(_host(drawn, np.int64), logits.device)
            chosen = sample_rows_queued(logits if whole else logits[index], [p.temperature for p in ps],
                                        [p.top_k for p in ps], [p.top_p for p in ps], self.valid_vocab, u)
            tokens = chosen if whole else tokens.index_copy_(0, index, chosen)
        return tokens

    @torch.inference_mode()
    def collect(self, launched: "_Launched") -> StepResult:
        """Second half: wait for the step's results to reach the host (on a GPU its event: not any step queued
        after it), then hand them out. Returns a token for every sampling chunk (``{id: t.token_id for id, t in
        result.sampled.items()}`` is what ``Scheduler.update`` takes) and the prompt logprobs the step computed."""
        result = StepResult({}, {})
        if launched.done is not None:
            launched.done.synchronize()
        host, sample_ids = launched.host, launched.sample_ids
        if sample_ids:
            out = result.sampled
            out.update((rid, SampledToken(t)) for rid, t in zip(sample_ids, host["tokens"].tolist()))
            if "logprobs" in host:
                want_lp, lps = host["logprobs"]
                lps = lps.tolist()
                ks, vals, idx = host.get("top", (None, None, None))
                if ks is not None:
                    vals, idx = vals.tolist(), idx.tolist()
                for j, i in enumerate(want_lp):
                    t = out[sample_ids[i]]
                    t.logprob = lps[j]
                    if ks is not None and ks[j]:
                        t.top_logprobs = dict(zip(idx[j][:ks[j]], vals[j][:ks[j]]))
        if "plp" in host:
            self._prompt_logprobs(host["plp"], launched.plp, result)
        return result

    def _queue_prompt_logprobs(self, logits: torch.Tensor, plp: list, plan: StepPlan, params) -> tuple:
        """log p(prompt token at position q | the tokens before it) for each (request, q) of ``plp``, from the
        logits of position q - 1 (fp32 log_softmax, as the sampled tokens' logprobs), and the top k of each row
        (k the request's ``prompt_logprobs``), queued: (chosen [n], ks, top values, top ids; None without k)."""
        seqs = {c.request_id: c.seq for c in plan.prefills}
        targets = _to_device(_host([seqs[rid].tokens(q, q + 1)[0] for rid, q in plp], np.int64), logits.device)
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(1, targets[:, None])[:, 0]
        ks = [params[rid].prompt_logprobs for rid, _ in plp]
        if not max(ks):
            return chosen, ks, None, None
        return (chosen, ks, *logp[:, :self.valid_vocab].topk(min(max(ks), self.valid_vocab)))

    @staticmethod
    def _prompt_logprobs(queued: tuple, plp: list, result: StepResult) -> None:
        chosen, ks, vals, idx = queued
        chosen = chosen.tolist()
        if vals is not None:
            vals, idx = vals.tolist(), idx.tolist()
        for j, (rid, q) in enumerate(plp):
            top = dict(zip(idx[j][:ks[j]], vals[j][:ks[j]])) if ks[j] else None
            result.prompt_logprobs.setdefault(rid, []).append(PromptLogprob(q, chosen[j], top))


def _map_tensors(obj, fn):
    """``obj`` (tensors in tuples, lists and dicts) with ``fn`` applied to every tensor."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj
