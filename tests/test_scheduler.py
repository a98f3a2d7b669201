"""The engine's policy layer (#23): sequence life cycle, KV block bookkeeping and the continuous-batching scheduler.

Pure Python and fast. The last tests run a randomized simulation: requests arrive at random steps, some are
aborted in every state, the pool is small enough that preemption happens often, and the "model" is a
deterministic function of the tokens it reads back through the block tables from a simulated KV cache whose free
blocks are poisoned every step, so a wrong block table, a shared block or a bad recompute changes the output.
"""
from __future__ import annotations

import itertools
import random

import pytest

from neox_rt.engine.block_manager import BlockManager, NoFreeBlocks
from neox_rt.engine.scheduler import (QueueFull, RequestRejected, Scheduler, SchedulerConfig, StepPlan)
from neox_rt.engine.sequence import PLACEHOLDER, IllegalTransition, RequestParams, Sequence, SequenceStatus as S
from neox_rt.errors import NeoxRtError

EOS = 0


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, **kw) -> Scheduler:
    clock = itertools.count()
    return Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                                     max_num_batched_tokens=max_num_batched_tokens, eos_token_id=EOS, **kw),
                     clock=lambda: float(next(clock)))


def step(sched: Scheduler, token=7) -> tuple[StepPlan, list[Sequence]]:
    """One step where the model samples ``token`` (an int, or a function of the sequence) for every sampler."""
    plan = sched.schedule()
    sched.blocks.check_invariants()
    sampled = {c.request_id: (token(c.seq) if callable(token) else token) for c in plan.chunks if c.samples}
    out = sched.update(plan, sampled)
    sched.blocks.check_invariants()
    return plan, out


def shape(plan: StepPlan):
    """The plan as data: ([decode ids], [(id, start, n, samples) of each prefill chunk], [preempted ids])."""
    return ([c.request_id for c in plan.decodes], [(c.request_id, c.start, c.num_tokens, c.samples)
                                                   for c in plan.prefills],
            [s.request_id for s in plan.preempted])


# --- sequence ---------------------------------------------------------------------------------------------------
def test_sequence_life_cycle_and_illegal_transitions():
    seq = Sequence("a", [5, 6, 7], RequestParams(max_tokens=4))
    assert seq.status is S.WAITING and seq.num_tokens == 3 and seq.num_uncomputed_tokens == 3
    with pytest.raises(IllegalTransition):
        seq.preempt()                       # a waiting sequence has nothing to give back
    with pytest.raises(IllegalTransition):
        seq.finish(S.FINISHED_LENGTH)       # nor can it reach its length
    with pytest.raises(IllegalTransition):
        seq.append_token(1)                 # nor sample
    seq.admit()
    seq.block_table = (3,)
    with pytest.raises(IllegalTransition):
        seq.append_token(1)                 # its prompt has no KV yet
    seq.num_computed_tokens = 3
    seq.append_token(9)
    assert seq.output_token_ids == [9] and seq.token_ids == [5, 6, 7, 9] and seq.num_uncomputed_tokens == 1
    seq.preempt()
    assert (seq.status, seq.num_computed_tokens, seq.block_table, seq.output_token_ids, seq.num_preemptions) == \
        (S.PREEMPTED, 0, (), [9], 1)
    with pytest.raises(IllegalTransition):
        seq.finish(S.FINISHED_LENGTH)
    seq.admit()
    with pytest.raises(IllegalTransition):
        seq.admit()                         # already running
    with pytest.raises(IllegalTransition):
        seq.finish(S.RUNNING)               # not a finished state
    seq.finish(S.FINISHED_STOPPED, stop_reason="\n\n", now=5.0)
    assert seq.is_finished and seq.finish_reason == "stop" and seq.stop_reason == "\n\n" and seq.finished_time == 5
    for bad in (seq.admit, seq.preempt, lambda: seq.finish(S.FINISHED_ABORTED)):
        with pytest.raises(IllegalTransition):
            bad()                           # finished is final, abort included


@pytest.mark.parametrize("start", ["waiting", "running", "preempted"])
def test_abort_is_legal_from_every_live_state(start):
    seq = Sequence("a", [1])
    if start != "waiting":
        seq.admit()
    if start == "preempted":
        seq.preempt()
    seq.finish(S.FINISHED_ABORTED)
    assert seq.finish_reason == "abort"


def test_request_params():
    assert RequestParams().max_tokens == 16                   # OpenAI's default
    assert RequestParams(stop=["x"], stop_token_ids=[3]).stop_token_ids == (3,)
    for bad in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="max_tokens"):
            RequestParams(max_tokens=bad)


# --- block manager ----------------------------------------------------------------------------------------------
def test_block_manager_grows_one_block_only_when_the_last_is_full():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert (bm.num_total, bm.num_used, bm.num_free, bm.capacity_tokens) == (6, 0, 6, 24)
    assert bm.can_allocate(24) and not bm.can_allocate(25)
    assert bm.allocate("a", 5) == (0, 1)                      # ceil(5 / 4)
    bm.check_invariants()
    assert bm.append("a", 3) == ()                            # slots 5..7 fit block 1
    assert bm.num_slots("a") == 8 and bm.append("a") == (2,)  # slot 8 opens a block
    bm.check_invariants()
    assert bm.ensure("a", 6) == ()                            # already has room: no change
    assert bm.ensure("b", 1) == (3,)                          # allocates a sequence it does not know
    assert bm.block_table("a") == (0, 1, 2) and (bm.num_used, bm.num_free) == (4, 2)
    assert bm.can_append("a", 11) and not bm.can_append("a", 12)  # 3 slots left in block 2 + 2 free blocks
    with pytest.raises(NoFreeBlocks):
        bm.append("a", 12)
    assert bm.block_table("a") == (0, 1, 2)                   # a failed append changes nothing
    with pytest.raises(ValueError):
        bm.allocate("a", 1)                                   # owns blocks already
    with pytest.raises(ValueError):
        bm.append("nobody")
    bm.check_invariants()


def test_block_manager_free_is_idempotent_and_fifo():
    bm = BlockManager(num_blocks=4, block_size=16)
    bm.allocate("a", 17)
    bm.allocate("b", 16)
    assert bm.free("a") == 2 and bm.free("a") == 0 and bm.free("never") == 0
    bm.check_invariants()
    assert (bm.num_used, bm.num_free) == (1, 3) and bm.block_table("a") == () and not bm.has("a")
    assert bm.allocate("c", 40) == (3, 0, 1)                  # the never-used block first, then the freed ones
    bm.check_invariants()
    with pytest.raises(NoFreeBlocks):
        bm.allocate("d", 1)


def test_block_manager_invariant_check_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    bm.allocate("b", 2)
    bm._tables["b"][0] = bm._tables["a"][0]                   # a block owned twice
    with pytest.raises(AssertionError, match="owned by both"):
        bm.check_invariants()
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    bm._free.append(bm._tables["a"][0])                       # owned and free
    with pytest.raises(AssertionError):
        bm.check_invariants()
    bm = BlockManager(num_blocks=4, block_size=2)
    bm.allocate("a", 2)
    bm._free.popleft()                                        # a block lost
    with pytest.raises(AssertionError, match="used 1 \\+ free 2 != total 4"):
        bm.check_invariants()


# --- scheduler: configuration and admission ---------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(num_blocks=4, max_num_seqs=8, max_num_batched_tokens=4)
    for bad in ({"num_blocks": 0}, {"num_blocks": 4, "block_size": 0}, {"num_blocks": 4, "max_queue": 0},
                {"num_blocks": 4, "max_model_len": 1}):
        with pytest.raises(ValueError):
            SchedulerConfig(**bad)


def test_rejects_requests_that_can_never_run():
    sched = make(num_blocks=4, block_size=4, max_model_len=12)  # a pool of 16 tokens
    with pytest.raises(RequestRejected, match="empty"):
        sched.add_request("e", [])
    with pytest.raises(RequestRejected, match="maximum context length is 12 tokens, but 13"):
        sched.add_request("m", [1] * 9, RequestParams(max_tokens=4))
    sched = make(num_blocks=4, block_size=4)
    with pytest.raises(RequestRejected, match="can never fit the KV cache of 16 tokens"):
        sched.add_request("p", [1] * 17, RequestParams(max_tokens=1))
    with pytest.raises(RequestRejected, match="10 prompt tokens \\+ 8 max_tokens"):
        sched.add_request("o", [1] * 10, RequestParams(max_tokens=8))
    assert isinstance(RequestRejected("x"), NeoxRtError)     # a client's mistake: 400 at the HTTP layer
    sched.add_request("fits", [1] * 10, RequestParams(max_tokens=7))  # 16 slots: the last token needs none
    with pytest.raises(ValueError, match="already"):
        sched.add_request("fits", [1])
    assert sched.has_unfinished() and sched.num_waiting == 1
    sched.blocks.check_invariants()


def test_queue_full_counts_waiting_requests_only():
    sched = make(max_num_seqs=2, max_queue=2)
    sched.add_request("a", [1, 2])
    sched.add_request("b", [1, 2])
    with pytest.raises(QueueFull, match="max_queue 2"):
        sched.add_request("c", [1, 2])
    assert sched.get("c") is None
    step(sched)                                               # a and b start running: the queue empties
    sched.add_request("c", [1, 2])
    sched.add_request("d", [1, 2])
    with pytest.raises(QueueFull):
        sched.add_request("e", [1])
    assert sched.abort("c")                                   # cancelling a waiting request makes room
    sched.add_request("e", [1])


# --- scheduler: steps -------------------------------------------------------------------------------------------
def test_prefill_then_decode_then_length():
    sched = make()
    seq = sched.add_request("a", [1, 2, 3, 4, 5], RequestParams(max_tokens=3))
    plan, out = step(sched, token=9)
    assert shape(plan) == ([], [("a", 0, 5, True)], []) and out == [seq]
    assert seq.status is S.RUNNING and seq.num_computed_tokens == 5 and seq.output_token_ids == [9]
    assert seq.block_table == sched.blocks.block_table("a") and len(seq.block_table) == 2
    plan, _ = step(sched, token=10)
    assert shape(plan) == (["a"], [], []) and plan.decodes[0].token_ids == [9] and plan.decodes[0].start == 5
    plan, out = step(sched, token=11)
    assert seq.output_token_ids == [9, 10, 11] and seq.finish_reason == "length" and out == [seq]
    assert sched.blocks.num_used == 0 and not sched.has_unfinished() and sched.get("a") is None
    assert sched.schedule().is_empty


def test_eos_stop_tokens_and_ignore_eos():
    sched = make()
    sched.add_request("eos", [1], RequestParams(max_tokens=5))
    sched.add_request("ign", [1], RequestParams(max_tokens=2, ignore_eos=True))
    sched.add_request("tok", [1], RequestParams(max_tokens=5, stop_token_ids=(42,)))
    seqs = {s.request_id: s for s in (sched.get("eos"), sched.get("ign"), sched.get("tok"))}
    step(sched, token=lambda s: {"eos": EOS, "ign": EOS, "tok": 42}[s.request_id])
    assert (seqs["eos"].finish_reason, seqs["eos"].stop_reason, seqs["eos"].output_token_ids) == ("stop", None, [EOS])
    assert (seqs["tok"].finish_reason, seqs["tok"].stop_reason) == ("stop", 42)
    assert seqs["ign"].status is S.RUNNING
    step(sched, token=EOS)
    assert seqs["ign"].finish_reason == "length" and seqs["ign"].output_token_ids == [EOS, EOS]
    assert sched.blocks.num_used == 0


def test_finish_from_outside_for_stop_strings():
    sched = make()
    seq = sched.add_request("a", [1, 2, 3], RequestParams(max_tokens=10, stop=("\n",)))
    step(sched)
    assert sched.blocks.num_used == 1
    assert sched.finish("a", stop_reason="\n")
    assert seq.finish_reason == "stop" and seq.stop_reason == "\n" and sched.blocks.num_used == 0
    assert not sched.finish("a") and not sched.abort("a")      # already gone: a no-op
    sched.add_request("w", [1])
    with pytest.raises(IllegalTransition):
        sched.finish("w")                                      # no text yet, so no stop string either
    assert sched.get("w").status is S.WAITING and sched.num_waiting == 1


def test_chunked_prefill_keeps_decodes_flowing():
    """A long prompt arrives while two requests decode: they decode every step, the prompt fills the rest."""
    sched = make(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=8)
    sched.add_request("a", [1, 2], RequestParams(max_tokens=20))
    sched.add_request("b", [3], RequestParams(max_tokens=20))
    plan, _ = step(sched)
    assert shape(plan) == ([], [("a", 0, 2, True), ("b", 0, 1, True)], [])
    long = sched.add_request("long", list(range(1, 21)), RequestParams(max_tokens=3))
    assert len(long.block_table) == 0
    plans = [step(sched)[0] for _ in range(4)]
    assert [shape(p) for p in plans] == [
        (["a", "b"], [("long", 0, 6, False)], []),
        (["a", "b"], [("long", 6, 6, False)], []),
        (["a", "b"], [("long", 12, 6, False)], []),
        (["a", "b"], [("long", 18, 2, True)], []),   # the prompt's last chunk samples
    ]
    assert long.num_output_tokens == 1 and all(p.num_batched_tokens <= 8 for p in plans)
    assert len(long.block_table) == 5                           # 20 slots, allocated at admission
    plan, _ = step(sched)
    assert shape(plan) == (["a", "b", "long"], [], []) and len(long.block_table) == 6


def test_budget_is_shared_fcfs_among_new_prompts_and_max_num_seqs_caps_the_batch():
    sched = make(num_blocks=64, max_num_seqs=3, max_num_batched_tokens=10)
    for i, n in enumerate([4, 8, 3, 2]):
        sched.add_request(f"r{i}", [1] * n, RequestParams(max_tokens=5))
    plan, _ = step(sched)
    # r0 whole, r1 chunked to the 6 tokens left; the spent budget stops admission.
    assert shape(plan) == ([], [("r0", 0, 4, True), ("r1", 0, 6, False)], [])
    plan, _ = step(sched)
    assert shape(plan) == (["r0"], [("r1", 6, 2, True), ("r2", 0, 3, True)], [])
    assert sched.num_running == 3 and sched.get("r3").status is S.WAITING   # max_num_seqs
    plan, _ = step(sched)
    assert shape(plan) == (["r0", "r1", "r2"], [], [])


def test_head_of_line_blocks_later_requests_when_blocks_are_short():
    """Strict FCFS: a big request at the head is not overtaken by small ones behind it (no starvation)."""
    sched = make(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    sched.add_request("a", [1] * 12, RequestParams(max_tokens=4))   # 3 blocks (4 by its end)
    step(sched)
    sched.add_request("big", [1] * 16, RequestParams(max_tokens=4))  # needs 4 blocks: 3 are free
    sched.add_request("small", [1], RequestParams(max_tokens=2))     # would fit
    plan, _ = step(sched)
    assert shape(plan) == (["a"], [], []) and sched.num_waiting == 2


def test_preemption_recomputes_the_latest_arrival_and_keeps_its_tokens():
    sched = make(num_blocks=3, block_size=4, max_num_batched_tokens=32)   # 12 slots
    a = sched.add_request("a", [1, 2, 3], RequestParams(max_tokens=8))
    b = sched.add_request("b", [4, 5, 6], RequestParams(max_tokens=8))
    step(sched, token=20)                       # both prefilled, one block each
    plan, _ = step(sched, token=21)             # slot 3 of each first block
    assert shape(plan) == (["a", "b"], [], []) and sched.blocks.num_free == 1
    plan, _ = step(sched, token=22)             # both need a 2nd block, one is free: b, the latest, gives way
    assert shape(plan) == (["a"], [], ["b"])
    assert (b.status, b.num_computed_tokens, b.block_table, b.output_token_ids, b.num_preemptions) == \
        (S.PREEMPTED, 0, (), [20, 21], 1)
    assert sched.waiting == [b] and sched.stats().num_preemptions == 1 and not sched.blocks.has("b")
    while a.status is S.RUNNING:
        plan, _ = step(sched, token=30)
        assert b.status is S.PREEMPTED          # 2 blocks for its 5 tokens are not free before a ends
    assert a.finish_reason == "length" and sched.blocks.num_free == 3
    plan, _ = step(sched, token=25)             # b back: prompt + its 2 tokens prefilled, then it samples
    assert shape(plan) == ([], [("b", 0, 5, True)], [])
    assert plan.prefills[0].token_ids == [4, 5, 6, 20, 21]
    assert b.output_token_ids == [20, 21, 25] and b.status is S.RUNNING
    stats = sched.stats()
    assert (stats.num_prompt_tokens, stats.num_running, stats.num_blocks_used) == (6, 1, 2)  # recompute not counted


def test_a_sequence_that_is_the_latest_preempts_itself():
    sched = make(num_blocks=2, block_size=2, max_num_batched_tokens=32)
    a = sched.add_request("a", [1, 2], RequestParams(max_tokens=3))
    b = sched.add_request("b", [3, 4], RequestParams(max_tokens=3))
    step(sched)                                 # each owns one full block; both need a 2nd to decode
    plan, _ = step(sched)                       # a takes b's: b, latest, goes (it could not pick anyone else)
    assert shape(plan) == (["a"], [], ["b"]) and b.status is S.PREEMPTED
    sched.add_request("c", [5], RequestParams(max_tokens=1))
    plan, _ = step(sched)
    assert shape(plan) == (["a"], [], []) and a.is_finished and sched.num_waiting == 2
    plan, _ = step(sched)
    assert shape(plan) == ([], [("b", 0, 3, True)], [])        # FCFS: b (earlier) before c


@pytest.mark.parametrize("state", ["waiting", "prefilling", "decoding", "preempted", "mid-step"])
def test_abort_in_any_state_frees_blocks(state):
    sched = make(num_blocks=4 if state == "prefilling" else 3, block_size=4, max_num_batched_tokens=8)
    sched.add_request("first", [1] * 3, RequestParams(max_tokens=8))
    target = sched.add_request("t", [1] * (10 if state == "prefilling" else 3), RequestParams(max_tokens=2 if
                               state == "prefilling" else 8))
    if state != "waiting":
        step(sched)
    if state == "decoding":
        step(sched)
    if state == "preempted":
        for _ in range(5):
            step(sched)
        assert target.status is S.PREEMPTED
    if state == "mid-step":
        plan = sched.schedule()
        assert target.request_id in [c.request_id for c in plan.chunks]
        assert sched.abort("t")
        out = sched.update(plan, {c.request_id: 7 for c in plan.chunks if c.samples and c.request_id != "t"})
        assert target not in out and target.output_token_ids == [7]      # the step's token for it was dropped
    else:
        assert target.status is {"waiting": S.WAITING, "prefilling": S.RUNNING, "decoding": S.RUNNING,
                                 "preempted": S.PREEMPTED}[state]
        if state == "prefilling":
            assert 0 < target.num_computed_tokens < target.num_prompt_tokens
        assert sched.abort("t")
    assert target.finish_reason == "abort" and target.block_table == ()
    assert not sched.blocks.has("t") and target not in sched.running + sched.waiting
    assert not sched.abort("t")                                        # twice: nothing more happens
    sched.blocks.check_invariants()
    while sched.has_unfinished():
        step(sched)
    assert sched.blocks.num_free == sched.blocks.num_total


def test_update_must_match_the_plan():
    sched = make()
    sched.add_request("a", [1, 2])
    plan = sched.schedule()
    with pytest.raises(RuntimeError, match="not updated"):
        sched.schedule()
    with pytest.raises(ValueError, match="no sampled token for \\['a'\\]"):
        sched.update(plan, {})
    sched.update(plan, {"a": 3})
    with pytest.raises(RuntimeError, match="pending step is None"):
        sched.update(plan, {"a": 3})
    assert sched.get("a").output_token_ids == [3]


def test_time_to_first_token_fields():
    sched = make()
    seq = sched.add_request("a", [1], RequestParams(max_tokens=2), arrival_time=-1.0)
    step(sched)
    step(sched)
    assert seq.arrival_time == -1.0 and seq.first_token_time is not None
    assert seq.finished_time > seq.first_token_time


# --- randomized simulation --------------------------------------------------------------------------------------
VOCAB = 50


def model_next_token(tokens: list[int]) -> int:
    """The simulated model: a fixed function of every token in the context (int tuples hash deterministically)."""
    return hash(tuple(tokens)) % VOCAB


class SimulatedKV:
    """A KV cache of token ids: the runner writes each chunk's tokens through the block table and samples from
    what it reads back, so a wrong table, a shared block or a stale block changes the sampled token."""

    POISON = -1

    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.data = [[self.POISON] * block_size for _ in range(num_blocks)]

    def poison_free(self, owned: set[int]) -> None:
        for b, block in enumerate(self.data):
            if b not in owned:
                block[:] = [self.POISON] * self.block_size

    def read(self, table, end: int) -> list[int]:
        return [self.data[table[p // self.block_size]][p % self.block_size] for p in range(end)]

    def run(self, plan: StepPlan, prev: dict[str, int] | None = None) -> dict[str, int]:
        """Run ``plan``: write its chunks' tokens, sample. A placeholder input (a decode planned ahead) is the token
        that ``prev`` (the step before, in flight) sampled for that request, as the runner takes it on the device."""
        sampled = {}
        for c in plan.chunks:
            if c.seq.status is not S.RUNNING:
                continue  # aborted after the plan was made
            table = c.seq.block_table
            assert len(table) * self.block_size >= c.end, (c.seq, c.end)
            tokens = c.token_ids
            if tokens == [PLACEHOLDER]:
                tokens = [prev[c.request_id]]
            assert PLACEHOLDER not in tokens, c
            for p, t in zip(range(c.start, c.end), tokens):
                self.data[table[p // self.block_size]][p % self.block_size] = t
            if c.samples:
                context = self.read(table, c.end)
                want = c.seq.tokens(0, c.end)
                if want[-1] == PLACEHOLDER:
                    want[-1] = tokens[-1]
                assert context == want, f"{c.request_id}: KV cache holds wrong tokens"
                sampled[c.request_id] = model_next_token(context)
        return sampled


def expected_output(prompt, params: RequestParams, stop_string_token):
    """What the request must generate, run alone: same stop rules as the scheduler, then the detokenizer's."""
    tokens, out = list(prompt), []
    while True:
        t = model_next_token(tokens)
        tokens.append(t)
        out.append(t)
        if t == EOS and not params.ignore_eos or t in params.stop_token_ids:
            return out, "stop"
        if len(out) >= params.max_tokens:
            return out, "length"
        if t == stop_string_token:
            return out, "stop"


@pytest.mark.parametrize("ahead", [False, True], ids=["in-step", "ahead"])
@pytest.mark.parametrize("block_size,num_blocks,max_num_seqs,budget,max_queue,seed", [
    (4, 40, 8, 32, 12, 0),    # 160 slots for requests of up to ~150 tokens: constant pressure
    (16, 14, 16, 64, 4, 1),   # the default block size, 224 slots, more sequences than the pool holds
    (1, 120, 6, 6, 12, 2),    # one-token blocks, a budget of exactly max_num_seqs: saturated
])
def test_randomized_simulation(block_size, num_blocks, max_num_seqs, budget, max_queue, seed, ahead):
    """``ahead``: the engine's way of running a step before the previous one's tokens are known: step N + 1 is
    planned (``schedule(ahead=True)``) and run while step N is in flight, then N is updated."""
    rng = random.Random(seed)
    sched = make(num_blocks=num_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                 max_num_batched_tokens=budget, max_queue=max_queue)
    kv = SimulatedKV(num_blocks, block_size)
    capacity = num_blocks * block_size
    n_requests, arrival_window = 600, 1800
    pending = []   # (arrival step, id, prompt, params, stop-string token, abort step or None, abort mid-step)
    for i in range(n_requests):
        long_tail = rng.random() < 0.15
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randint(1, 90 if long_tail else 24))]
        params = RequestParams(max_tokens=rng.randint(1, 60 if long_tail else 20), ignore_eos=rng.random() < 0.3,
                               stop_token_ids=(rng.randrange(1, VOCAB),) if rng.random() < 0.3 else ())
        if rng.random() < 0.03:
            prompt = [1] * (capacity + 1)                      # can never fit: rejected at add
        arrive = rng.randrange(arrival_window)
        abort_at = arrive + rng.randint(0, 80) if rng.random() < 0.25 else None
        stop_tok = rng.randrange(1, VOCAB) if rng.random() < 0.2 else None
        pending.append((arrive, f"r{i}", prompt, params, stop_tok, abort_at, rng.random() < 0.5))
    pending.sort(key=lambda r: r[0])
    requests = {r[1]: r for r in pending}
    seqs: dict[str, Sequence] = {}
    rejected, queue_full, aborted_in = set(), 0, {}
    step_no = 0
    max_steps = 20000

    def abort(rid):
        seq = seqs[rid]
        state = seq.status.value
        if seq.status is S.RUNNING:
            state = "prefilling" if seq.num_computed_tokens < seq.num_tokens - 1 else "decoding"
        if sched.abort(rid):
            aborted_in[rid] = state

    inflight = None  # (plan, sampled) of the step run but not updated yet (ahead)
    while (pending or sched.has_unfinished() or inflight) and step_no < max_steps:
        # Arrivals (a client answered 429 retries a few steps later).
        retry = []
        while pending and pending[0][0] <= step_no:
            arrive, rid, prompt, params, *_ = pending.pop(0)
            try:
                seqs[rid] = sched.add_request(rid, prompt, params)
            except RequestRejected:
                assert len(prompt) + params.max_tokens - 1 > capacity
                rejected.add(rid)
            except QueueFull:
                assert sched.num_waiting >= max_queue   # preempted requests may push it past the limit
                queue_full += 1
                retry.append((step_no + rng.randint(1, 10),) + requests[rid][1:])
        pending = sorted(pending + retry, key=lambda r: r[0])
        # Aborts between steps.
        for rid, seq in list(seqs.items()):
            r = requests[rid]
            if r[5] is not None and r[5] <= step_no and not r[6] and not seq.is_finished:
                abort(rid)

        plan = sched.schedule(ahead=inflight is not None)
        bm = sched.blocks
        bm.check_invariants()
        ids = [c.request_id for c in plan.chunks]
        assert len(ids) == len(set(ids)) and len(ids) <= max_num_seqs
        assert plan.num_batched_tokens <= budget and sched.num_running <= max_num_seqs
        assert all(c.num_tokens == 1 and c.samples for c in plan.decodes)
        # Decodes first: no running sequence with one token left waits while prefill chunks run (but one whose
        # token in flight is its last).
        admitted = {c.request_id for c in plan.prefills if c.start == 0}
        ready = {s.request_id for s in sched.running if s.num_uncomputed_tokens == 1
                 and s.num_output_tokens < s.params.max_tokens} - admitted
        assert ready == {c.request_id for c in plan.decodes}
        for s in sched.running:
            assert s.status is S.RUNNING and s.block_table == bm.block_table(s.request_id)
            last = s.num_output_tokens >= s.params.max_tokens  # its last token, in flight, is never fed back
            assert len(s.block_table) * block_size >= s.num_tokens - last >= s.num_computed_tokens
            assert kv.read(s.block_table, s.num_computed_tokens) == s.tokens(0, s.num_computed_tokens)
        for s in sched.waiting:
            assert s.status in (S.WAITING, S.PREEMPTED) and not bm.has(s.request_id)
            assert s.num_computed_tokens == 0 and s.block_table == ()
        assert [s.order for s in sched.waiting] == sorted(s.order for s in sched.waiting)
        assert bm.num_used == sum(len(s.block_table) for s in sched.running)
        kv.poison_free({b for s in sched.running for b in s.block_table})

        # Aborts while the model runs.
        for rid in [c.request_id for c in plan.chunks]:
            r = requests[rid]
            if r[5] is not None and r[5] <= step_no and r[6]:
                abort(rid)
        if ahead:  # run this step now (after the one in flight, as on the device), then update that one
            sampled = kv.run(plan, inflight[1] if inflight else None)
            done, inflight = inflight, (plan, sampled)
        else:
            done = (plan, kv.run(plan))
        for seq in sched.update(*done) if done else ():
            stop_tok = requests[seq.request_id][4]
            token = done[1][seq.request_id]
            if not seq.is_finished and token == stop_tok:
                assert sched.finish(seq.request_id, stop_reason=f"<{stop_tok}>")   # the detokenizer's stop
        bm.check_invariants()
        if inflight and not inflight[0].chunks and not sched.has_unfinished():
            sched.update(*inflight)  # an empty step in flight when everything is done
            inflight = None
        assert all(s.is_finished is False for s in sched.running + sched.waiting)
        step_no += 1

    assert step_no < max_steps, f"not drained after {max_steps} steps: {sched.stats()}"
    assert step_no > 1500 and not sched.has_unfinished() and sched.num_running == sched.num_waiting == 0
    assert sched.blocks.num_free == sched.blocks.num_total
    sched.blocks.check_invariants()
    # Every request ended: rejected at add, aborted, or with exactly the tokens it generates alone.
    assert len(seqs) + len(rejected) == n_requests
    for rid, seq in seqs.items():
        want, reason = expected_output(requests[rid][2], requests[rid][3], requests[rid][4])
        assert seq.is_finished
        if seq.finish_reason == "abort":
            assert rid in aborted_in and seq.output_token_ids == want[:seq.num_output_tokens]
        else:
            assert (seq.output_token_ids, seq.finish_reason) == (want, reason), rid
    stats = sched.stats()
    # The simulation exercised what it is meant to.
    assert stats.num_preemptions >= 20 and queue_full > 0 and rejected
    assert stats.num_generated_tokens >= sum(s.num_output_tokens for s in seqs.values())
    assert len(set(aborted_in.values())) >= 3, aborted_in
    assert any(s.num_preemptions >= 2 for s in seqs.values())
