"""``LLMEngine``: continuous batching over a paged KV cache, one step at a time (#23).

Each ``step()``: the scheduler plans the batch (:mod:`.scheduler`), the runner runs it and samples
(:mod:`.model_runner`), the scheduler records the tokens (EOS, stop tokens, max_tokens), then the detokenizer here
turns each request's tokens into text: stop strings (the text is cut before the first one, the request finishes
with "stop"), and the streamable delta (held back while it may still become a stop string or ends in an incomplete
UTF-8 sequence). Not thread-safe: one thread drives it (the async server wraps it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from neox_rt.engine.distributed import share_pool_size
from neox_rt.engine.kv_cache import PagedKVCache
from neox_rt.engine.model_runner import ModelRunner
from neox_rt.engine.scheduler import QueueFull, RequestRejected, Scheduler, SchedulerConfig
from neox_rt.engine.sequence import RequestParams, SequenceStatus
from neox_rt.errors import NeoxRtError

__all__ = ["LLMEngine", "RequestOutput", "SamplingRequest", "RequestRejected", "QueueFull"]

CPU_DEFAULT_KV_BYTES = 256 << 20
"""The default pool's cap on CPU (the GPU default is half of the free memory)."""


@dataclass(frozen=True)
class SamplingRequest:
    """What one request asks for; validated by the HTTP layer, trusted here."""
    max_tokens: int = 16
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    """1.0 (or 0) is off."""
    top_k: int = 0
    """0 is off."""
    seed: int | None = None
    """The randomness of token t depends only on (seed, t): reproducible under any load and after preemption."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text is cut before the first one, finish_reason "stop"."""
    stop_token_ids: tuple[int, ...] = ()
    """Tokens that finish with "stop"; like EOS they are left out of the text and of ``token_ids``."""
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob, and the top k (k > 0)."""
    prompt_logprobs: int | None = None
    """None: none; k >= 0: the logprob of every prompt token given the ones before it (None for the first), and the
    top k at each position (k > 0), in the request's first output (``echo`` with ``logprobs`` in the API)."""


@dataclass
class RequestOutput:
    """One per request that progressed in a step."""
    request_id: str
    new_text: str
    """Text to stream now ("" is possible)."""
    new_token_ids: list[int]
    text: str | None
    """All output text so far (cut at a stop string when finished); None on an unfinished output that crossed from
    an engine process (:mod:`.process_engine`)."""
    token_ids: list[int] | None
    """All output token ids so far (EOS and stop tokens excluded); None as ``text``."""
    logprobs: list[float] | None
    """One per new token: log p under the model, before temperature and filters."""
    top_logprobs: list[dict[int, float]] | None
    """One dict per new token when logprobs = k > 0."""
    finished: bool
    finish_reason: str | None
    """"stop" (EOS, stop token or stop string), "length" or "abort"."""
    num_prompt_tokens: int
    prompt_logprobs: list[float | None] | None = None
    """In the first output of a request with prompt_logprobs: one per prompt token (None for the first)."""
    prompt_top_logprobs: list[dict[int, float] | None] | None = None
    """... and the top k at each position (k > 0; None for the first token)."""


class _Detok:
    """A request's output as the client sees it: tokens, text, and how much of it was streamed.

    Detokenization is incremental (as vLLM's): each step decodes only a window of the newest tokens, from
    ``prefix_offset`` (the start of the last decoded piece) on, and appends what the new tokens add, so a step costs
    the same at token 10 as at token 1000. ``text`` holds whole characters only: a trailing incomplete UTF-8 sequence
    (a character split over tokens) waits for the token that completes it, or for the end of the request."""

    def __init__(self, params: SamplingRequest, num_prompt_tokens: int):
        self.params = params
        self.num_prompt_tokens = num_prompt_tokens
        self.stop = tuple(s for s in params.stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""
        self.streamed = 0
        self.prefix_offset = 0  # token_ids[prefix_offset:read_offset] decode to the end of ``text``
        self.read_offset = 0
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.prompt_top: list = [None]
        self.prompt_sent = False

    def add_prompt_logprobs(self, items) -> None:
        """Record the prompt logprobs a step computed, in position order (a preempted request's recompute gives
        the positions it already has again: those are skipped)."""
        for it in items:
            if it.position == len(self.prompt_logprobs):
                self.prompt_logprobs.append(it.logprob)
                self.prompt_top.append(it.top_logprobs)

    def advance(self, tokenizer, final: bool) -> None:
        """Append the text of the tokens past ``read_offset``; unless ``final``, only when it ends in a whole
        character."""
        ids = self.token_ids
        if self.read_offset == len(ids):
            return
        prefix = tokenizer.decode(ids[self.prefix_offset:self.read_offset]) if self.read_offset > self.prefix_offset \
            else ""
        window = tokenizer.decode(ids[self.prefix_offset:])
        if final or (len(window) > len(prefix) and not window.endswith("\ufffd")):
            self.text += window[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)


class LLMEngine:
    """Continuous batching for a loaded :class:`neox_rt.NeoX` (its model, tokenizer and config)."""

    def __init__(self, neox, *, max_num_seqs: int = 64, max_model_len: int | None = None,
                 num_blocks: int | None = None, kv_cache_memory: int | float | None = None, block_size: int = 16,
                 max_num_batched_tokens: int = 2048, max_queue: int | None = None):
        if neox.tokenizer is None:
            raise NeoxRtError("the engine needs a tokenizer: pass tokenizer=PATH to neox_rt.load")
        self.neox = neox
        self.model = neox.model
        self.tokenizer = neox.tokenizer
        self.block_size = block_size
        positions = neox.config.max_position_embeddings
        if max_model_len is None:
            max_model_len = positions
        if max_model_len > positions:
            raise NeoxRtError(f"max_model_len {max_model_len} exceeds the model's {positions} positions")
        self.max_model_len = max_model_len
        per_block = PagedKVCache.block_bytes(self.model, block_size)
        if isinstance(kv_cache_memory, float):  # a fraction of the free memory
            if not 0 < kv_cache_memory <= 1:
                raise NeoxRtError(f"kv_cache_memory fraction must be in (0, 1], got {kv_cache_memory}")
            kv_cache_memory = int(self._free_memory() * kv_cache_memory)
        if num_blocks is None:
            if kv_cache_memory is None:
                need = max_num_seqs * -(-max_model_len // block_size) * per_block
                kv_cache_memory = min(need, self._default_kv_bytes())
            num_blocks = kv_cache_memory // per_block
        tp = self.model.tp
        if tp.size > 1:  # every rank's pool has rank 0's size (free memory differs by rank)
            num_blocks = share_pool_size(tp, self.model, num_blocks)
        if num_blocks < 1:
            raise NeoxRtError(f"the KV cache holds no block of {block_size} tokens ({per_block} bytes each)")
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max(max_num_batched_tokens, max_num_seqs), max_queue=max_queue,
            max_model_len=max_model_len, eos_token_id=self.tokenizer.eos_id))
        self.runner = ModelRunner(self.model, num_blocks, block_size, self.tokenizer.vocab_size,
                                  max_num_seqs=max_num_seqs, max_model_len=max_model_len)
        if self.runner.graphs is not None:  # every decode graph now, not in the middle of serving
            self.runner.graphs.capture_all()
        self._requests: dict[str, _Detok] = {}
        self.overlap = os.environ.get("NEOX_RT_ENGINE_OVERLAP", "1") != "0"
        """Detokenize a step's tokens while the device computes the next step (:meth:`step`)."""
        self._pending: list = []  # (sequence, SampledToken) of the last update, not yet turned into outputs
        self._ready: list[RequestOutput] = []  # outputs made by a step that then failed
        self.ahead = self.overlap and self.runner.broadcaster is None and \
            os.environ.get("NEOX_RT_ENGINE_AHEAD", "1") != "0"
        """Plan and launch each step before the previous one's tokens reach the host (:meth:`step`); not under tensor
        parallelism (the other ranks need every input token on the host); ``NEOX_RT_ENGINE_AHEAD=0`` turns it off."""
        self._inflight = None  # the step launched and not yet collected (``ahead``)

    def _free_memory(self) -> int:
        """Free bytes on the model's device (on CPU: the host's available memory)."""
        device = self.model.device
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return CPU_DEFAULT_KV_BYTES

    def _default_kv_bytes(self) -> int:
        if self.model.device.type == "cuda":
            return self._free_memory() // 2
        return CPU_DEFAULT_KV_BYTES

    # --- requests ----------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingRequest) -> None:
        """Queue a request; raises RequestRejected (400) or QueueFull (429)."""
        rp = RequestParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                           top_k=params.top_k, seed=params.seed, stop=params.stop,
                           stop_token_ids=params.stop_token_ids, ignore_eos=params.ignore_eos)
        seq = self.scheduler.add_request(request_id, prompt_token_ids, rp)
        self._requests[request_id] = _Detok(params, seq.num_prompt_tokens)

    def abort(self, request_id: str) -> bool:
        """Cancel a request and free its blocks, silently (no output follows). False if it is not live."""
        if self._requests.pop(request_id, None) is not None:
            self._pending = [item for item in self._pending if item[0].request_id != request_id]
            self._ready = [o for o in self._ready if o.request_id != request_id]
        return self.scheduler.abort(request_id)

    def close(self) -> None:
        """Release what the engine holds beyond memory: the other ranks of a tensor-parallel engine stop waiting for
        steps. Call it from the thread that steps the engine."""
        self.runner.close()

    def has_unfinished(self) -> bool:
        """Requests still to run, or outputs still to hand out (a step in flight whose requests have all been
        aborted is not: the next step collects it)."""
        return self.scheduler.has_unfinished() or bool(self._pending) or bool(self._ready)

    def stats(self) -> dict:
        s = self.scheduler.stats()
        return {"num_running": s.num_running, "num_waiting": s.num_waiting, "num_blocks_used": s.num_blocks_used,
                "num_blocks_free": s.num_blocks_free, "num_blocks_total": s.num_blocks_total,
                "num_preemptions": s.num_preemptions, "prompt_tokens_total": s.num_prompt_tokens,
                "generation_tokens_total": s.num_generated_tokens}

    # --- one step ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One scheduler step and model run. Returns the outputs of the requests that got a token in the PREVIOUS
        step ([] when idle): their detokenization and stop strings run while the device computes this step, so the
        host's per-token work of one step hides behind the next one's forward (``overlap``, the default; with
        ``NEOX_RT_ENGINE_OVERLAP=0`` a step returns its own outputs). A request that a stop string finishes in that
        window has its token of this step dropped (the scheduler skips finished sequences).

        With ``ahead`` (the default, except under tensor parallelism) the host does not wait for a step before
        planning and launching the next: a call plans step N + 1 and queues it behind step N, which is then waited
        for, recorded and detokenized while N + 1 runs; step N + 1's decodes take their input tokens from step N's
        results on the device. The device never idles for the host's scheduling, input building and launches."""
        if self.ahead:
            return self._step_ahead()
        outputs, self._ready = self._ready, []
        if not self.scheduler.has_unfinished():
            return outputs + self._flush()
        plan = self.scheduler.schedule()
        params = {c.request_id: self._requests[c.request_id].params for c in plan.chunks}
        try:
            launched = self.runner.launch(plan, params)
            if self.overlap:
                outputs += self._flush()  # the previous step's tokens, while the device runs this one
            result = self.runner.collect(launched)
        except BaseException:
            self._ready = self._fail([plan], outputs)
            raise
        self._record(plan, result)
        return outputs if self.overlap else outputs + self._flush()

    def _step_ahead(self) -> list[RequestOutput]:
        outputs, self._ready = self._ready, []
        prev, self._inflight = self._inflight, None
        if prev is None and not self.scheduler.has_unfinished():
            return outputs + self._flush()
        plans = [prev.plan] if prev is not None else []
        try:
            if self.scheduler.has_unfinished():
                plan = self.scheduler.schedule(ahead=prev is not None)
                plans.append(plan)
                params = {c.request_id: self._requests[c.request_id].params for c in plan.chunks}
                self._inflight = self.runner.launch(plan, params, prev)
            if prev is not None:
                result = self.runner.collect(prev)
        except BaseException:
            self._inflight = None
            self._ready = self._fail(plans, outputs + self._flush())
            raise
        if prev is not None:
            self._record(prev.plan, result)
        return outputs + self._flush()  # the step just waited for: detokenized while the next one runs

    def _record(self, plan, result) -> None:
        """A collected step's tokens to the scheduler; their outputs wait in ``_pending`` for ``_flush``."""
        for rid, items in result.prompt_logprobs.items():
            self._requests[rid].add_prompt_logprobs(items)
        sampled = result.sampled
        seqs = self.scheduler.update(plan, {rid: t.token_id for rid, t in sampled.items()})
        self._pending = [(seq, sampled[seq.request_id]) for seq in seqs]

    def _fail(self, plans: list, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Steps that failed computed nothing: their sequences are aborted and the plans updated empty, oldest
        first (the scheduler stays consistent). Returns ``outputs`` less those of the aborted requests."""
        failed = {c.request_id for plan in plans for c in plan.chunks}
        for rid in failed:
            self.abort(rid)
        for plan in plans:
            self.scheduler.update(plan, {})
        return [o for o in outputs if o.request_id not in failed]

    def _flush(self) -> list[RequestOutput]:
        """The outputs of the tokens the last update recorded (requests aborted since are skipped)."""
        pending, self._pending = self._pending, []
        return [self._output(seq, tok) for seq, tok in pending if seq.request_id in self._requests]

    def _output(self, seq, sampled) -> RequestOutput:
        rid = seq.request_id
        d = self._requests[rid]
        token = sampled.token_id
        status = seq.status
        reason = seq.finish_reason
        # EOS and stop tokens end the request and are not part of its output
        dropped = status is SequenceStatus.FINISHED_STOPPED and (
            seq.stop_reason is not None or (token == self.tokenizer.eos_id and not d.params.ignore_eos))
        new_ids = [] if dropped else [token]
        d.token_ids += new_ids
        before = len(d.text)
        d.advance(self.tokenizer, final=seq.is_finished)
        text = d.text
        if d.stop and not dropped:
            lo = max(before - d.hold, 0)  # a stop string ending in the new text starts at or after lo
            hits = [(at, s) for s in d.stop if (at := text.find(s, lo)) >= 0]
            if hits:
                at, stop = min(hits)
                text = text[:at]
                if not seq.is_finished:
                    self.scheduler.finish(rid, stop)
                elif status is SequenceStatus.FINISHED_LENGTH:
                    seq.stop_reason = stop
                reason = "stop"
        finished = reason is not None
        d.text = text
        # stream what can no longer become (part of) a stop string (``text`` never ends in a partial character)
        safe = len(text) if finished else max(len(text) - d.hold, 0)
        new_text = text[d.streamed:safe] if safe > d.streamed else ""
        d.streamed = max(d.streamed, safe)
        lp = top = None
        if d.params.logprobs is not None:
            lp = [sampled.logprob] if new_ids else []
            if d.params.logprobs > 0:
                top = [sampled.top_logprobs] if new_ids else []
        plp = ptop = None
        if d.prompt_logprobs is not None and not d.prompt_sent:
            d.prompt_sent = True
            plp = d.prompt_logprobs
            ptop = d.prompt_top if d.params.prompt_logprobs else None
        if finished:
            del self._requests[rid]
        return RequestOutput(rid, new_text, new_ids, text, list(d.token_ids), lp, top, finished, reason,
                             d.num_prompt_tokens, plp, ptop)
