"""A request's state inside the serving engine: its tokens, how many of them have KV in the cache, its block table
and where it is in its life.

Pure Python, no tensors: the scheduler (``scheduler.py``) decides, the block manager (``block_manager.py``) owns
blocks, the model runner reads a sequence's tokens and block table. The life of a request is one small state
machine (``TRANSITIONS``)::

    WAITING --admit--> RUNNING --eos / stop token / stop string--> FINISHED_STOPPED
       |                 |  ^   --max_tokens-->                     FINISHED_LENGTH
       |                 |  |   --abort (any live state)-->         FINISHED_ABORTED
       |          preempt|  |readmit
       |                 v  |
       +--abort-------- PREEMPTED (back in the waiting queue, no blocks, KV recomputed from scratch)

A preempted sequence keeps its generated tokens; when readmitted, its prompt and those tokens are prefilled
together (recompute), so its output is the same as if it had never been preempted.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class IllegalTransition(RuntimeError):
    """A state change the life cycle does not allow (a bug in the caller, never a user's mistake)."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """Queued, never run yet; owns no blocks."""
    RUNNING = "running"
    """Admitted: owns blocks for its tokens; prefilling (in chunks) or decoding one token per step."""
    PREEMPTED = "preempted"
    """Was running, lost its blocks when the pool ran out; waits to be readmitted and recomputed."""
    FINISHED_STOPPED = "finished_stopped"
    """Ended by EOS, a stop token or a stop string (OpenAI ``finish_reason`` "stop")."""
    FINISHED_LENGTH = "finished_length"
    """Ended by reaching ``max_tokens`` (OpenAI ``finish_reason`` "length")."""
    FINISHED_ABORTED = "finished_aborted"
    """Cancelled: the client went away or the engine gave up on it (``finish_reason`` "abort")."""

    @property
    def is_finished(self) -> bool:
        return self._finish_reason is not None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's ``finish_reason`` for a finished status ("stop", "length", "abort"), None while live."""
        return self._finish_reason


FINISHED = frozenset({SequenceStatus.FINISHED_STOPPED, SequenceStatus.FINISHED_LENGTH,
                      SequenceStatus.FINISHED_ABORTED})
_FINISH_REASON = {SequenceStatus.FINISHED_STOPPED: "stop", SequenceStatus.FINISHED_LENGTH: "length",
                  SequenceStatus.FINISHED_ABORTED: "abort"}
for _status in SequenceStatus:  # an attribute of each member: read per token and request, an enum hash is slow
    _status._finish_reason = _FINISH_REASON.get(_status)

PLACEHOLDER = -1
"""A token id standing for one that a step in flight is sampling (never a real id: those are >= 0)."""

TRANSITIONS: dict[SequenceStatus, frozenset[SequenceStatus]] = {
    SequenceStatus.WAITING: frozenset({SequenceStatus.RUNNING, SequenceStatus.FINISHED_ABORTED}),
    SequenceStatus.RUNNING: frozenset({SequenceStatus.PREEMPTED} | FINISHED),
    # A stop string the detokenizer finds in tokens generated before the preemption may still end it.
    SequenceStatus.PREEMPTED: frozenset({SequenceStatus.RUNNING, SequenceStatus.FINISHED_STOPPED,
                                         SequenceStatus.FINISHED_ABORTED}),
    SequenceStatus.FINISHED_STOPPED: frozenset(),
    SequenceStatus.FINISHED_LENGTH: frozenset(),
    SequenceStatus.FINISHED_ABORTED: frozenset(),
}
"""Every allowed status change; anything else raises ``IllegalTransition``."""


@dataclass(frozen=True)
class RequestParams:
    """What a request asks for. The scheduler reads only ``max_tokens``, ``stop_token_ids`` and ``ignore_eos``;
    the sampling fields travel to the model runner untouched and ``stop`` strings to the detokenizer.

    The HTTP layer validates a request once, at the edge; the checks here only guard the engine's own
    invariants (a sequence must be allowed at least one token)."""
    max_tokens: int = 16
    """Most tokens to generate (OpenAI's default 16); reaching it finishes with "length"."""
    temperature: float = 1.0
    """Sampling temperature (0 is greedy); opaque to the scheduler."""
    top_p: float = 1.0
    """Nucleus sampling mass; opaque to the scheduler."""
    top_k: int = 0
    """Top-k filter (0: off); opaque to the scheduler."""
    seed: int | None = None
    """Per-request seed; the runner must derive each token's randomness from (seed, position) so that a
    preempted and recomputed request samples the same tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings: matched on text by the detokenizer, which then calls ``Scheduler.finish``."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that finish the request with "stop" (checked by the scheduler, like EOS)."""
    ignore_eos: bool = False
    """Keep generating past EOS (vLLM's extension, used by its serving benchmark)."""

    def __post_init__(self):
        if type(self.max_tokens) is not int or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))


class Sequence:
    """One request's state. Tokens are ``prompt + outputs``; ``num_computed_tokens`` of them (a prefix) have
    their KV in the cache. A step computes the next chunk ``[num_computed_tokens, num_computed_tokens + n)``;
    a chunk that reaches the last token also samples the next one (a decode is such a chunk of one token)."""

    def __init__(self, request_id: str, prompt_token_ids, params: RequestParams | None = None,
                 arrival_time: float = 0.0, order: int = 0):
        self.request_id = request_id
        self.params = params if params is not None else RequestParams()
        self.arrival_time = arrival_time
        """When the request arrived (the scheduler's clock), for time-to-first-token metrics."""
        self.order = order
        """Arrival rank given by the scheduler: FCFS admission and preemption victims follow it."""
        self._tokens: list[int] = [int(t) for t in prompt_token_ids]
        self.num_prompt_tokens = len(self._tokens)
        self.num_computed_tokens = 0
        self.block_table: tuple[int, ...] = ()
        """The KV blocks holding this sequence's tokens, in position order (a copy of the block manager's)."""
        self.status = SequenceStatus.WAITING
        self.stop_reason: int | str | None = None
        """The stop token id or stop string that finished it (vLLM's ``stop_reason``); None for EOS or length."""
        self.num_preemptions = 0
        self.first_token_time: float | None = None
        self.finished_time: float | None = None

    # --- tokens -------------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self._tokens) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._tokens[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self.num_prompt_tokens:]

    @property
    def token_ids(self) -> list[int]:
        """Prompt then generated tokens (a copy)."""
        return list(self._tokens)

    def tokens(self, start: int, end: int) -> list[int]:
        """The token ids at positions ``[start, end)`` (a chunk's input)."""
        return self._tokens[start:end]

    @property
    def last_token_id(self) -> int:
        return self._tokens[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet: 1 for a decode, more while (re)prefilling."""
        return len(self._tokens) - self.num_computed_tokens

    @property
    def num_placeholders(self) -> int:
        """Trailing tokens not known yet: sampled by a step still running on the device (the engine schedules the
        next step before the previous one's tokens reach the host; :meth:`Scheduler.schedule`)."""
        n, t = 0, self._tokens
        while n < len(t) and t[-1 - n] == PLACEHOLDER:
            n += 1
        return n

    def append_placeholder(self) -> None:
        """The token a scheduled step will sample, before it is known (:meth:`set_token` fills it in)."""
        self.append_token(PLACEHOLDER)

    def set_token(self, position: int, token_id: int) -> None:
        """Fill in the placeholder at ``position`` with the sampled token."""
        if self._tokens[position] != PLACEHOLDER:
            raise IllegalTransition(f"{self.request_id}: position {position} holds no placeholder")
        self._tokens[position] = int(token_id)

    def append_token(self, token_id: int) -> None:
        """A sampled token; only a running sequence whose every token has been computed samples."""
        if self.status is not SequenceStatus.RUNNING:
            raise IllegalTransition(f"{self.request_id}: cannot append a token while {self.status.value}")
        if self.num_computed_tokens != len(self._tokens):
            raise IllegalTransition(f"{self.request_id}: sampled with {self.num_uncomputed_tokens} token(s) "
                                    "not yet computed")
        self._tokens.append(int(token_id))

    # --- life cycle ---------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def _move(self, new: SequenceStatus) -> None:
        if new not in TRANSITIONS[self.status]:
            raise IllegalTransition(f"{self.request_id}: {self.status.value} -> {new.value} is not allowed")
        self.status = new

    def admit(self) -> None:
        """WAITING or PREEMPTED -> RUNNING (the scheduler has just given it blocks for all its tokens)."""
        self._move(SequenceStatus.RUNNING)

    def preempt(self) -> None:
        """RUNNING -> PREEMPTED: its blocks are gone, so its KV must be recomputed from position 0. A token still being
        sampled is dropped (its step's result is ignored; the recompute samples it again)."""
        self._move(SequenceStatus.PREEMPTED)
        del self._tokens[len(self._tokens) - self.num_placeholders:]
        self.num_computed_tokens = 0
        self.block_table = ()
        self.num_preemptions += 1

    def finish(self, status: SequenceStatus, stop_reason: int | str | None = None, now: float | None = None
               ) -> None:
        """A live state -> one of the FINISHED states; its blocks are the scheduler's to free. A token still being
        sampled is dropped (its step's result is ignored)."""
        if status not in FINISHED:
            raise IllegalTransition(f"{self.request_id}: {status.value} is not a finished state")
        self._move(status)
        del self._tokens[len(self._tokens) - self.num_placeholders:]
        self.stop_reason = stop_reason
        self.block_table = ()
        self.finished_time = now

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, "
                f"blocks={len(self.block_table)})")
