"""Iteration-level (continuous) batching: who runs in the next model step, and what the step's tokens did.

Pure Python, no tensors. The engine loop is::

    plan = scheduler.schedule()                 # decodes + prefill chunks; blocks allocated for them
    sampled = runner.collect(runner.launch(plan, params))  # {request_id: token} for every chunk with .samples
    for seq in scheduler.update(plan, sampled): # tokens appended; EOS / stop tokens / max_tokens applied
        ...detokenize, stream; scheduler.finish(id) on a stop string

or, planning each step ahead of the previous one's tokens (the engine's default): ``schedule(ahead=True)`` while one
step is in flight, then that step's ``update``; the new plan's decodes of its sequences read a ``PLACEHOLDER``.

Policy of ``schedule()`` (vLLM v1's token budget, nano-vllm's admission; our own code):

1. **Decodes first.** Every running sequence with one token left to compute (a decode, or the last token of a
   chunked prompt) gets it, in arrival order. If its next token needs a block and none is free, the most
   recently arrived running sequence is preempted (recompute: blocks freed, back to the waiting queue) until
   one is; a sequence may so preempt itself, when it is the latest.
2. **Prefill chunks fill the remaining budget** of ``max_num_batched_tokens`` tokens: first the running
   sequences still prefilling, in arrival order, then new or preempted requests admitted from the waiting queue
   in strict FCFS order (the head blocks the rest, so no request starves), while there is budget, fewer than
   ``max_num_seqs`` sequences run, and the pool can hold the head's whole prompt (blocks for all its tokens are
   allocated at admission, so a prefill never stalls half way for blocks).

A request is rejected at ``add_request`` if it could never run (empty prompt, prompt + max_tokens beyond the
pool or ``max_model_len``: the HTTP layer answers 400), and refused with ``QueueFull`` when ``max_queue``
requests already wait (429). Finished and aborted requests leave at once and free their blocks.

Liveness: the earliest-arrived live request is never preempted by another, and it fits the pool alone (checked
at add), so it always progresses; when it finishes the next earliest takes its place.
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from neox_rt.engine.block_manager import BlockManager
from neox_rt.engine.sequence import RequestParams, Sequence, SequenceStatus
from neox_rt.errors import NeoxRtError


class RequestRejected(NeoxRtError):
    """A request that can never run here (the HTTP layer answers 400 with this message)."""


class QueueFull(RuntimeError):
    """The waiting queue holds ``max_queue`` requests (the HTTP layer answers 429 with Retry-After)."""


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int
    """KV blocks in the pool (the runner sizes it from the memory it is given)."""
    block_size: int = 16
    """Token slots per KV block."""
    max_num_seqs: int = 256
    """Most sequences running at once (admitted, prefilling or decoding)."""
    max_num_batched_tokens: int = 2048
    """Per-step token budget: decodes (1 each) plus prefill chunks; at least ``max_num_seqs`` so that every
    running decode fits."""
    max_queue: int | None = None
    """Most requests waiting (new and preempted); ``add_request`` raises QueueFull beyond it. None: no limit."""
    max_model_len: int | None = None
    """Most tokens (prompt + max_tokens) a request may span; None: only the pool's capacity limits it."""
    eos_token_id: int | None = None
    """The token that finishes a request (unless ``ignore_eos``); None: no EOS."""

    def __post_init__(self):
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if type(v) is not int or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}) so that every running sequence can decode each step")
        if self.max_queue is not None and (type(self.max_queue) is not int or self.max_queue < 1):
            raise ValueError(f"max_queue must be None or an int >= 1, got {self.max_queue!r}")
        if self.max_model_len is not None and (type(self.max_model_len) is not int or self.max_model_len < 2):
            raise ValueError(f"max_model_len must be None or an int >= 2, got {self.max_model_len!r}")


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute the KV of ``seq``'s tokens at positions ``[start, start + num_tokens)`` this step; if ``samples``,
    the chunk ends at the sequence's last token and the runner samples the next one from its logits."""
    seq: Sequence
    start: int
    num_tokens: int
    samples: bool
    epoch: int = 0
    """``seq.num_preemptions`` when planned: a chunk of a sequence preempted since (and perhaps readmitted) is stale."""

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def request_id(self) -> str:
        return self.seq.request_id

    @property
    def token_ids(self) -> list[int]:
        """The chunk's input tokens (positions are ``range(start, end)``); a decode planned ahead of the step that
        samples its input holds ``PLACEHOLDER`` (the runner takes that token from the device)."""
        return self.seq.tokens(self.start, self.end)


@dataclass(frozen=True)
class StepPlan:
    """One model step: what to compute, in the order the runner should lay the batch out."""
    step: int
    """Index of this step (0, 1, ...), for logs and to pair a plan with its update."""
    decodes: tuple[ScheduledChunk, ...]
    """One token each, each sampling (decodes, and prompts whose last chunk is a single token)."""
    prefills: tuple[ScheduledChunk, ...]
    """Prompt chunks (a new request, the rest of a chunked prompt, or a preempted request's recompute of prompt
    + generated tokens); the last chunk of a prompt samples."""
    preempted: tuple[Sequence, ...]
    """Sequences preempted while planning this step: their blocks are free, the runner drops any state it keeps
    for them."""

    @property
    def chunks(self) -> tuple[ScheduledChunk, ...]:
        return self.decodes + self.prefills

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.decodes) + sum(c.num_tokens for c in self.prefills)

    @property
    def sampling_ids(self) -> list[str]:
        """Request ids that need a sampled token back from this step, in batch order."""
        return [c.request_id for c in self.chunks if c.samples]

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for ``/metrics``."""
    num_running: int
    num_waiting: int
    num_blocks_used: int
    num_blocks_free: int
    num_blocks_total: int
    num_preemptions: int
    """Preemptions since start (a counter)."""
    num_prompt_tokens: int
    """Prompt tokens of requests admitted for the first time (a counter; recompute not counted)."""
    num_generated_tokens: int
    """Tokens sampled (a counter)."""


class Scheduler:
    """Decides each step's batch over a ``BlockManager``; owns the waiting and running queues."""

    def __init__(self, config: SchedulerConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.blocks = BlockManager(config.num_blocks, config.block_size)
        self.clock = clock
        self.waiting: list[Sequence] = []   # WAITING and PREEMPTED, in arrival order (FCFS)
        self.running: list[Sequence] = []   # RUNNING, in arrival order
        self._live: dict[str, Sequence] = {}
        self._next_order = 0
        self._step = 0
        self._pending: list[StepPlan] = []  # scheduled, not updated yet, oldest first (at most 2)
        self._committed: StepPlan | None = None  # the pending plan whose effect the next schedule assumed
        self.num_preemptions = 0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0

    # --- requests in -------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Iterable[int], params: RequestParams | None = None,
                    arrival_time: float | None = None) -> Sequence:
        """Queue a request; it may join the batch at the next ``schedule()``. Raises RequestRejected when it can
        never run, QueueFull when ``max_queue`` requests already wait, ValueError for a live duplicate id."""
        params = params if params is not None else RequestParams()
        prompt = list(prompt_token_ids)
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in the engine")
        if not prompt:
            raise RequestRejected(f"request {request_id}: the prompt is empty")
        span = len(prompt) + params.max_tokens
        limit = self.config.max_model_len
        if limit is not None and span > limit:
            raise RequestRejected(
                f"request {request_id}: this model's maximum context length is {limit} tokens, but "
                f"{span} were asked for ({len(prompt)} in the prompt, {params.max_tokens} to generate)")
        # The last sampled token is never fed back, so its KV never needs a slot.
        if span - 1 > self.blocks.capacity_tokens:
            raise RequestRejected(
                f"request {request_id}: {len(prompt)} prompt tokens + {params.max_tokens} max_tokens can never "
                f"fit the KV cache of {self.blocks.capacity_tokens} tokens ({self.blocks.num_total} blocks of "
                f"{self.blocks.block_size})")
        if self.config.max_queue is not None and len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue {self.config.max_queue})")
        now = self.clock() if arrival_time is None else arrival_time
        seq = Sequence(request_id, prompt, params, arrival_time=now, order=self._next_order)
        self._next_order += 1
        self._live[request_id] = seq
        self.waiting.append(seq)  # the newest order: the end keeps the queue sorted
        return seq

    def get(self, request_id: str) -> Sequence | None:
        """The live (waiting, preempted or running) sequence of that id, else None."""
        return self._live.get(request_id)

    def abort(self, request_id: str) -> bool:
        """Cancel a request in any live state (also between ``schedule`` and ``update``: the step's result for
        it is then dropped); frees its blocks. False if it is unknown or already finished."""
        return self._end(request_id, SequenceStatus.FINISHED_ABORTED, None)

    def finish(self, request_id: str, stop_reason: int | str | None = None) -> bool:
        """End a request with "stop" from outside (the detokenizer found a stop string); frees its blocks.
        False if it is unknown or already finished."""
        return self._end(request_id, SequenceStatus.FINISHED_STOPPED, stop_reason)

    # --- one step ----------------------------------------------------------------------------------------
    def schedule(self, ahead: bool = False) -> StepPlan:
        """Plan the next model step (see the module's docstring for the policy); allocates the blocks the
        step's tokens need. Must be followed by ``update`` with this plan, before the next ``schedule``, or after it
        when scheduling ahead (``ahead=True``): the engine then plans step N + 1 while step N runs on the device, as
        if N had done its work: N's chunks count as computed and each of its sampling sequences holds a
        placeholder for its token (the next decode's input, which the runner takes from the device). A sequence
        that N's token brings to ``max_tokens`` is not planned again; one that N's token finishes otherwise (EOS, a
        stop token or string) runs one wasted decode, dropped at its update."""
        if self._pending and not ahead:
            raise RuntimeError(f"step {self._pending[0].step} was scheduled but not updated yet")
        if ahead:
            if len(self._pending) != 1:
                raise RuntimeError(f"scheduling ahead needs exactly one step in flight, not {len(self._pending)}")
            self._commit(self._pending[0])
        budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledChunk] = []
        prefills: list[ScheduledChunk] = []
        preempted: list[Sequence] = []

        # 1. Decodes, in arrival order; a block shortage preempts the latest arrival (never an earlier one,
        #    so nothing already planned in this loop is taken back).
        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted as a victim earlier in this loop
            if seq.num_output_tokens >= seq.params.max_tokens:
                continue  # its last token is being sampled (scheduling ahead): it finishes at that step's update
            grow = seq.num_tokens - self.blocks.num_slots(seq.request_id)
            while not self.blocks.can_append(seq.request_id, grow):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it was the latest; everything after it is gone too
            self._reserve(seq, seq.num_tokens)
            decodes.append(ScheduledChunk(seq, seq.num_computed_tokens, 1, True, seq.num_preemptions))
            budget -= 1

        # 2. Prompts being prefilled in chunks (their blocks were allocated at admission).
        for seq in self.running:
            if budget <= 0:
                break
            left = seq.num_uncomputed_tokens
            if left > 1:
                n = min(left, budget)
                prefills.append(ScheduledChunk(seq, seq.num_computed_tokens, n, n == left, seq.num_preemptions))
                budget -= n

        # 3. Admit from the waiting queue, strict FCFS.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq.num_tokens):
                break
            self.waiting.pop(0)
            if seq.status is SequenceStatus.WAITING:
                self.num_prompt_tokens += seq.num_prompt_tokens
            seq.admit()
            self._reserve(seq, seq.num_tokens)
            bisect.insort(self.running, seq, key=_arrival)
            n = min(seq.num_tokens, budget)
            prefills.append(ScheduledChunk(seq, 0, n, n == seq.num_tokens, seq.num_preemptions))
            budget -= n

        plan = StepPlan(self._step, tuple(decodes), tuple(prefills), tuple(preempted))
        self._step += 1
        self._pending.append(plan)
        return plan

    def update(self, plan: StepPlan, sampled: Mapping[str, int]) -> list[Sequence]:
        """Record what the model computed for ``plan`` (the oldest step not updated): each chunk's tokens now have
        KV; each sampling chunk's sequence gets ``sampled[request_id]``, then EOS, stop tokens and max_tokens are
        applied and finished sequences leave (blocks freed). Sequences aborted, finished or preempted since
        ``schedule`` are skipped. Returns the sequences that received a token, finished ones included, in batch
        order."""
        if not self._pending or plan is not self._pending[0]:
            raise RuntimeError(f"update got step {plan.step}, but the pending step is "
                               f"{self._pending[0].step if self._pending else None}")
        live = [c for c in plan.chunks if c.seq.status is SequenceStatus.RUNNING and c.seq.num_preemptions == c.epoch]
        missing = [c.request_id for c in live if c.samples and c.request_id not in sampled]
        if missing:
            raise ValueError(f"no sampled token for {missing} in step {plan.step}")
        self._pending.pop(0)
        committed = plan is self._committed
        if committed:
            self._committed = None
        now = self.clock()
        out = []
        for chunk in live:
            seq = chunk.seq
            if not committed:
                assert seq.num_computed_tokens == chunk.start, (seq, chunk)
                seq.num_computed_tokens = chunk.end
            if not chunk.samples:
                continue
            token = int(sampled[seq.request_id])
            if committed:
                seq.set_token(chunk.end, token)
            else:
                seq.append_token(token)
            self.num_generated_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            out.append(seq)
            params = seq.params
            if token == self.config.eos_token_id and not params.ignore_eos:
                self._end(seq.request_id, SequenceStatus.FINISHED_STOPPED, None)
            elif token in params.stop_token_ids:
                self._end(seq.request_id, SequenceStatus.FINISHED_STOPPED, token)
            elif chunk.end + 1 - seq.num_prompt_tokens >= params.max_tokens:
                self._end(seq.request_id, SequenceStatus.FINISHED_LENGTH, None)
        return out

    def _commit(self, plan: StepPlan) -> None:
        """Assume ``plan`` (in flight) done, for planning the next step: its chunks computed, a placeholder for each
        sampled token. Its update then fills the placeholders in."""
        for chunk in plan.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING or seq.num_preemptions != chunk.epoch:
                continue
            seq.num_computed_tokens = chunk.end
            if chunk.samples:
                seq.append_placeholder()
        self._committed = plan

    # --- state -------------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.blocks.num_used, self.blocks.num_free,
                              self.blocks.num_total, self.num_preemptions, self.num_prompt_tokens,
                              self.num_generated_tokens)

    # --- internals ---------------------------------------------------------------------------------------
    def _reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Slots for ``num_tokens`` tokens of ``seq`` (the caller checked that the blocks are there)."""
        if self.blocks.ensure(seq.request_id, num_tokens) or not seq.block_table:
            seq.block_table = self.blocks.block_table(seq.request_id)  # a table changes only when blocks are added

    def _preempt(self, seq: Sequence) -> None:
        """RUNNING -> PREEMPTED: blocks freed, back into the waiting queue at its arrival rank."""
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.preempt()
        bisect.insort(self.waiting, seq, key=_arrival)
        self.num_preemptions += 1

    def _end(self, request_id: str, status: SequenceStatus, stop_reason: int | str | None) -> bool:
        seq = self._live.get(request_id)
        if seq is None:
            return False
        queue = self.running if seq.status is SequenceStatus.RUNNING else self.waiting
        seq.finish(status, stop_reason, now=self.clock())  # raises before any change if not allowed
        queue.remove(seq)
        self.blocks.free(request_id)
        del self._live[request_id]
        return True


def _arrival(seq: Sequence) -> int:
    return seq.order
