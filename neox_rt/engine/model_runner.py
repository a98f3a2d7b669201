"""Runs one scheduler step on the model: a :class:`~neox_rt.engine.scheduler.StepPlan` becomes ONE varlen forward
over the paged KV cache, then each sampling chunk's next token is chosen.

The layout of a step: the plan's chunks (decodes first, then prompt chunks) flattened as input_ids [1, num_tokens]
with their positions; each token's KV slot from its sequence's block table (``slot_mapping``); the decodes attend
through ``paged_decode_attention``, the prompt chunks through ``paged_prefill_attention``
(:class:`~neox_rt.model.model.PagedAttentionMetadata`); logits only at the last token of each chunk that samples.
Sampling is per request (temperature, top-k, top-p as :mod:`neox_rt.engine.sampling`; greedy is the argmax), with
a generator per token of a seeded request derived from (seed, token index), so that a request samples the same
tokens alone, under load and after a preemption's recompute. Logprobs are the fp32 log_softmax of the raw logits.

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
from neox_rt.engine.sampling import request_generator, sample_rows
from neox_rt.engine.scheduler import StepPlan
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


@dataclass
class _Launched:
    """A step between :meth:`ModelRunner.launch` and :meth:`ModelRunner.collect`: its logits (on a GPU, possibly
    still being computed) and every sampling row's argmax queued after them (``greedy`` names the rows that take
    it)."""
    plan: StepPlan
    params: Mapping[str, object]
    logits: torch.Tensor | None
    sample_ids: list
    plp: list
    top: torch.Tensor | None
    greedy: list


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
        prompt token follow the sampling rows; the last item lists them as (request id, position of the predicted
        token)."""
        bs = self.block_size
        ids, pos, slots, tables, seqlens, qsl = [], [], [], [], [], [0]
        sample_rows, sample_ids, plp_rows, plp = [], [], [], []
        for chunk in plan.chunks:
            table = chunk.seq.block_table
            start, end = chunk.start, chunk.end
            ids += chunk.token_ids
            pos += range(start, end)
            if end - start == 1:
                slots.append(table[start // bs] * bs + start % bs)
            else:
                slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
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
                _host(seqlens, np.int32), _host(qsl, np.int32), _host(sample_rows, np.int64), sample_ids, plp)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, prompt_logprobs: frozenset = frozenset()) -> tuple[torch.Tensor, list, list]:
        """The forward of one step: (logits [m, V] of the sampling chunks' last tokens, then of the prompt-logprob
        rows, :meth:`prepare`; the request ids of the sampling rows; the (request, position) of each prompt-logprob
        row). A step of decodes only replays a CUDA graph when
        the runner has them; any other step runs eagerly."""
        ids, pos, slots, tables, seqlens, qsl, rows, sample_ids, plp = self.prepare(plan, prompt_logprobs)
        if self.graphs is not None and not plan.prefills:
            logits = self.graphs.step(ids, pos, slots, tables, seqlens)
            if logits is not None:
                return logits, sample_ids, plp
        if self.broadcaster is not None:  # the other ranks run the same forward on their shards
            ids, pos, slots, tables, seqlens, qsl, rows = self.broadcaster.send(ids, pos, slots, tables, seqlens, qsl,
                                                                                rows, len(plan.decodes))
        else:
            dev = self.device
            ids, pos, slots, tables, seqlens, qsl, rows = (t.to(dev) for t in (ids, pos, slots, tables, seqlens, qsl,
                                                                               rows))
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
    def launch(self, plan: StepPlan, params: Mapping[str, object]) -> "_Launched":
        """Run ``plan``, first half: the forward and the greedy rows' argmax queued on the device, nothing waited for
        (on a GPU the host is free until :meth:`collect`). ``params[request_id]`` (every chunk's) carries
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``logprobs`` and ``prompt_logprobs`` (a
        :class:`~neox_rt.engine.llm_engine.SamplingRequest`)."""
        if plan.is_empty:
            return _Launched(plan, params, None, [], [], None, [])
        want_plp = frozenset(c.request_id for c in plan.prefills
                             if getattr(params[c.request_id], "prompt_logprobs", None) is not None)
        logits, sample_ids, plp = self.execute(plan, want_plp)
        greedy = [i for i, r in enumerate(sample_ids) if params[r].temperature == 0 or params[r].top_k == 1]
        # every sampling row's argmax, picked on the host in collect: indexing the rows with a list here would copy
        # the index from pageable host memory, which waits for the forward (the host then idles until the device is
        # done, and nothing between launch and collect overlaps it)
        top = logits[:len(sample_ids), :self.valid_vocab].argmax(dim=-1) if greedy else None
        return _Launched(plan, params, logits, sample_ids, plp, top, greedy)

    @torch.inference_mode()
    def collect(self, launched: "_Launched") -> StepResult:
        """Second half: the greedy tokens brought to the host (the wait for the device), the other rows sampled,
        logprobs. Returns a token for every sampling chunk (``{id: t.token_id for id, t in result.sampled.items()}``
        is what ``Scheduler.update`` takes) and the prompt logprobs the step computed."""
        result = StepResult({}, {})
        plan, params, logits, sample_ids, plp = (launched.plan, launched.params, launched.logits,
                                                 launched.sample_ids, launched.plp)
        if logits is None:
            return result
        chosen: dict[int, int] = {}
        if launched.greedy:
            top = launched.top.tolist()
            chosen.update((i, top[i]) for i in launched.greedy)
        if plp:
            self._prompt_logprobs(logits[len(sample_ids):], plp, plan, params, result)
        if not sample_ids:
            return result
        logits = logits[:len(sample_ids)]
        drawn = [i for i in range(len(sample_ids)) if i not in chosen]
        if drawn:  # every other row sampled in one batch: its own temperature, top-k, top-p and uniform draw
            index = {c.request_id: c.seq for c in plan.chunks}
            ps = [params[sample_ids[i]] for i in drawn]
            u = [float(torch.rand((), generator=self._generator if p.seed is None else
                                  request_generator(p.seed, index[sample_ids[i]].num_output_tokens)))
                 for i, p in zip(drawn, ps)]
            rows = logits[drawn] if len(drawn) < len(sample_ids) else logits
            chosen.update(zip(drawn, sample_rows(rows, [p.temperature for p in ps], [p.top_k for p in ps],
                                                 [p.top_p for p in ps], self.valid_vocab, u)))
        out = result.sampled
        out.update({rid: SampledToken(chosen[i]) for i, rid in enumerate(sample_ids)})
        want_lp = [i for i, r in enumerate(sample_ids) if params[r].logprobs is not None]
        if want_lp:  # the chosen tokens' logprobs and every row's top ones, each in one batched op
            logp = torch.log_softmax(logits[want_lp].float(), dim=-1)
            picked = torch.tensor([chosen[i] for i in want_lp], device=logp.device)
            lps = logp.gather(1, picked[:, None])[:, 0].tolist()
            ks = [params[sample_ids[i]].logprobs for i in want_lp]
            vals = idx = None
            if max(ks):
                vals, idx = logp[:, :self.valid_vocab].topk(min(max(ks), self.valid_vocab))
                vals, idx = vals.tolist(), idx.tolist()
            for j, i in enumerate(want_lp):
                t = out[sample_ids[i]]
                t.logprob = lps[j]
                t.top_logprobs = dict(zip(idx[j][:ks[j]], vals[j][:ks[j]])) if ks[j] else None
        return result

    def _top(self, logp_row: torch.Tensor, k: int) -> dict[int, float] | None:
        if not k:
            return None
        vals, idx = logp_row[:self.valid_vocab].topk(min(k, self.valid_vocab))
        return dict(zip(idx.tolist(), vals.tolist()))

    def _prompt_logprobs(self, logits: torch.Tensor, plp: list, plan: StepPlan, params,
                         result: StepResult) -> None:
        """log p(prompt token at position q | the tokens before it) for each (request, q) of ``plp``, from
        the logits of position q - 1 (fp32 log_softmax, as the sampled tokens' logprobs)."""
        seqs = {c.request_id: c.seq for c in plan.prefills}
        targets = torch.tensor([seqs[rid].tokens(q, q + 1)[0] for rid, q in plp], device=logits.device)
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
        for j, (rid, q) in enumerate(plp):
            top = self._top(logp[j], params[rid].prompt_logprobs)
            result.prompt_logprobs.setdefault(rid, []).append(PromptLogprob(q, chosen[j], top))
