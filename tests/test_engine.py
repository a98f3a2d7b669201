"""LLMEngine (#23): continuous batching over the paged KV cache on the embedded default model, CPU float32.

The issue's correctness requirement: a greedy request's tokens are the same alone, among many requests arriving at
random steps (chunked prefill, preemption) and through ``neox.generate``; a seeded sampled request is reproducible
under any load. Then the request options: stop strings, stop tokens, ignore_eos, max_tokens, abort, logprobs and
streaming deltas.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from neox_rt.default_model import load_default
from neox_rt.engine.llm_engine import LLMEngine, QueueFull, RequestRejected, SamplingRequest
from neox_rt.errors import NeoxRtError
from neox_rt.engine.sampling import request_generator, sample_row, sample_rows
from neox_rt.engine.sequence import PLACEHOLDER

PROMPTS = ["def fibonacci(n):", "import os\n", "class Foo:\n    def", "for i in range(", "# Licensed under",
           "x = 1\n", "\n", "pass\n\n\n", "    return x\n\n\n", "__all__ = []\n",
           "from typing import", "def main():\n    args = parse_args()\n    if args.verbose:\n",
           "with open(path) as f:\n", "try:\n    import numpy as np\nexcept ImportError:\n",
           "\"\"\"Utilities for", "    def __repr__(self):\n        return",
           "if __name__ == '__main__':\n    main()\n",
           "import sys\nimport os\n\n\ndef read_config(path):\n    \"\"\"Read the configuration file at path and "
           "return a dict of its sections.\"\"\"\n    result = {}\n    with open(path) as f:\n        for line in f:\n"
           "            line = line.strip()\n            if not line or line.startswith('#'):\n                continue\n"]
ENDS_AT_EOS = "if __name__ == '__main__':\n    main()\n"  # greedy emits EOS at once


@pytest.fixture(autouse=True, params=["ahead", "in-step"])
def engine_mode(request, monkeypatch):
    """Every test twice: the engine planning each step ahead of the previous one's tokens (the default), and
    waiting for them first (``NEOX_RT_ENGINE_AHEAD=0``)."""
    monkeypatch.setenv("NEOX_RT_ENGINE_AHEAD", "1" if request.param == "ahead" else "0")
    return request.param


@pytest.fixture(scope="module")
def neox():
    return load_default(dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def cases(neox):
    """(prompt ids, max_tokens, generate's greedy token ids) for a spread of prompt and output lengths."""
    rng = random.Random(0)
    out = []
    for p in PROMPTS:
        ids = neox.tokenizer.encode(p)
        n = rng.choice([3, 8, 16, 24])
        out.append((ids, n, neox.generate(ids, max_new_tokens=n, temperature=0).token_ids))
    return out


def drain(engine, outputs=None):
    """Step until idle; the final RequestOutput of each request (and every output in ``outputs``)."""
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            if outputs is not None:
                outputs.setdefault(o.request_id, []).append(o)
            if o.finished:
                final[o.request_id] = o
    return final


def run_alone(neox, ids, params, **kw):
    engine = LLMEngine(neox, max_num_seqs=4, num_blocks=64, **kw)
    engine.add_request("alone", ids, params)
    return drain(engine)["alone"]


def run_under_load(neox, cases, extra, num_blocks, seed, max_num_seqs=16, max_num_batched_tokens=48):
    """Every case (greedy) plus ``extra`` [(id, ids, params)] added at random steps; (final outputs, engine)."""
    rng = random.Random(seed)
    engine = LLMEngine(neox, max_num_seqs=max_num_seqs, num_blocks=num_blocks,
                       max_num_batched_tokens=max_num_batched_tokens)
    todo = [(f"g{i}", ids, SamplingRequest(max_tokens=n, temperature=0)) for i, (ids, n, _) in enumerate(cases)]
    todo += extra
    todo += [(f"r{i}", ids, SamplingRequest(max_tokens=n, temperature=0)) for i, (ids, n, _) in enumerate(cases)]
    rng.shuffle(todo)
    final = {}
    engine.first_outputs = {}  # the first output of each request (the test reads prompt logprobs there)
    plans, placeholders = [], []
    schedule = engine.scheduler.schedule

    def schedule_and_count(**k):  # the decodes planned before their input token was known
        plans.append(schedule(**k))
        placeholders.append(sum(c.token_ids == [PLACEHOLDER] for c in plans[-1].decodes))
        return plans[-1]
    engine.scheduler.schedule = schedule_and_count
    while todo or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 3])):
            if todo:
                engine.add_request(*todo.pop())
        for o in engine.step():
            engine.first_outputs.setdefault(o.request_id, o)
            if o.finished:
                final[o.request_id] = o
        engine.scheduler.blocks.check_invariants()
    # the steps mixed decodes with prompt chunks, and a prompt was split over steps
    assert any(p.decodes and p.prefills for p in plans)
    assert any(not c.samples for p in plans for c in p.prefills)
    assert engine.ahead == (os.environ["NEOX_RT_ENGINE_AHEAD"] == "1")
    assert (sum(placeholders) > len(plans) // 2) if engine.ahead else not any(placeholders)
    return final, engine


def test_greedy_alone_equals_generate(neox, cases):
    for ids, n, ref in cases[:6]:
        out = run_alone(neox, ids, SamplingRequest(max_tokens=n, temperature=0))
        assert out.token_ids == ref
        assert out.finish_reason == ("length" if len(ref) == n else "stop")
        assert out.text == neox.tokenizer.decode(ref)


def test_greedy_under_load_and_seeded_sampling(neox, cases):
    seeded = SamplingRequest(max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    ids = neox.tokenizer.encode("def parse(")
    alone = run_alone(neox, ids, seeded)
    assert len(alone.token_ids) == 20
    final, engine = run_under_load(neox, cases, [("s0", ids, seeded), ("s1", ids, seeded)], num_blocks=256, seed=1)
    assert len(final) == 2 * len(cases) + 2
    for i, (_, n, ref) in enumerate(cases):
        assert final[f"g{i}"].token_ids == ref, i
        assert final[f"r{i}"].token_ids == ref, i
    assert final["s0"].token_ids == alone.token_ids and final["s1"].token_ids == alone.token_ids
    s = engine.stats()
    assert s["num_blocks_used"] == 0 and s["num_blocks_free"] == 256 and s["num_running"] == s["num_waiting"] == 0
    assert s["generation_tokens_total"] == sum(len(o.token_ids) + (o.finish_reason == "stop")
                                               for o in final.values())


def test_preemption_keeps_outputs(neox, cases):
    seeded = SamplingRequest(max_tokens=24, temperature=1.0, seed=123)
    ids = neox.tokenizer.encode("class Parser:\n")
    alone = run_alone(neox, ids, seeded)
    final, engine = run_under_load(neox, cases, [("s0", ids, seeded)], num_blocks=8, seed=2, max_num_seqs=8)
    assert engine.stats()["num_preemptions"] > 0
    for i, (_, n, ref) in enumerate(cases):
        assert final[f"g{i}"].token_ids == ref, i
        assert final[f"r{i}"].token_ids == ref, i
    assert final["s0"].token_ids == alone.token_ids
    assert engine.stats()["num_blocks_free"] == 8


def test_stop_strings_and_streaming(neox, cases):
    ids, _, _ = cases[0]
    full = neox.generate(ids, max_new_tokens=24, temperature=0)
    stop = full.text[10:13]  # a string the greedy text reaches after a few tokens
    outs = {}
    engine = LLMEngine(neox, num_blocks=32)
    engine.add_request("a", ids, SamplingRequest(max_tokens=24, temperature=0, stop=(stop, "never seen")))
    final = drain(engine, outs)["a"]
    assert final.finish_reason == "stop"
    assert final.text == full.text[:full.text.find(stop)]
    assert "".join(o.new_text for o in outs["a"]) == final.text
    assert sum((o.new_token_ids for o in outs["a"]), []) == final.token_ids
    assert final.token_ids == full.token_ids[:len(final.token_ids)]
    assert stop in neox.tokenizer.decode(final.token_ids)  # the token that completed the stop string is kept
    assert engine.stats()["num_blocks_free"] == 32
    # generate's own stop-string cut agrees
    assert neox.generate(ids, max_new_tokens=24, temperature=0, stop=[stop]).text == final.text
    # without stop strings the streamed deltas concatenate to the text too
    outs = {}
    engine.add_request("b", ids, SamplingRequest(max_tokens=24, temperature=0))
    final = drain(engine, outs)["b"]
    assert "".join(o.new_text for o in outs["b"]) == final.text == full.text
    assert final.finish_reason == "length" and len(final.token_ids) == 24


def test_stop_tokens_eos_and_ignore_eos(neox, cases):
    ids, _, ref = cases[0]
    t = ref[5]
    out = run_alone(neox, ids, SamplingRequest(max_tokens=24, temperature=0, stop_token_ids=(t,)))
    cut = ref.index(t)
    assert out.finish_reason == "stop" and out.token_ids == ref[:cut]
    assert out.text == neox.tokenizer.decode(ref[:cut])
    eos_ids = neox.tokenizer.encode(ENDS_AT_EOS)
    out = run_alone(neox, eos_ids, SamplingRequest(max_tokens=5, temperature=0))
    assert out.finish_reason == "stop" and out.token_ids == [] and out.text == ""
    out = run_alone(neox, eos_ids, SamplingRequest(max_tokens=5, temperature=0, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    assert out.token_ids[0] == neox.tokenizer.eos_id


def test_logprobs_match_score(neox, cases):
    ids, _, _ = cases[3]
    out = run_alone(neox, ids, SamplingRequest(max_tokens=10, temperature=0, logprobs=3))
    _, scored = neox.score(ids + out.token_ids)
    assert len(out.token_ids) == 10 and len(out.logprobs) == 1  # an output carries its step's logprobs
    assert out.logprobs[0] == pytest.approx(scored[-1], abs=1e-4)
    assert max(out.top_logprobs[0].values()) == pytest.approx(out.logprobs[0], abs=1e-6)  # greedy: the top one
    engine = LLMEngine(neox, num_blocks=32)
    engine.add_request("a", ids, SamplingRequest(max_tokens=10, temperature=0.8, seed=3, logprobs=3))
    outs = {}
    final = drain(engine, outs)["a"]
    lps = sum((o.logprobs for o in outs["a"]), [])
    tops = sum((o.top_logprobs for o in outs["a"]), [])
    assert len(lps) == len(tops) == len(final.token_ids) == 10
    _, scored = neox.score(ids + final.token_ids)
    assert lps == pytest.approx(scored[-10:], abs=1e-4)
    for tok, lp, top in zip(final.token_ids, lps, tops):
        assert len(top) == 3 and max(top.values()) >= lp - 1e-6
        if tok in top:
            assert top[tok] == pytest.approx(lp, abs=1e-6)
    # logprobs=0: the chosen token's logprob, no top list
    engine.add_request("b", ids, SamplingRequest(max_tokens=2, temperature=0, logprobs=0))
    outs = {}
    drain(engine, outs)
    assert all(o.top_logprobs is None and len(o.logprobs) == len(o.new_token_ids) for o in outs["b"])


def test_prompt_logprobs_match_score(neox, cases):
    """prompt_logprobs (echo with logprobs): every prompt token's logprob given the ones before it, in the first
    output, equal to score(); a prompt split over several chunks, and recomputed after a preemption, gives each
    position once."""
    ids = cases[-1][0]  # the longest prompt
    _, scored = neox.score(ids)
    engine = LLMEngine(neox, max_num_seqs=4, num_blocks=64, max_num_batched_tokens=8)
    engine.add_request("p", ids, SamplingRequest(max_tokens=3, temperature=0, prompt_logprobs=2))
    outs = {}
    drain(engine, outs)
    first = outs["p"][0]
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(ids)
    assert first.prompt_logprobs[1:] == pytest.approx(scored, abs=1e-4)
    assert first.prompt_top_logprobs[0] is None
    for tok, lp, top in zip(ids[1:], first.prompt_logprobs[1:], first.prompt_top_logprobs[1:]):
        assert len(top) == 2 and max(top.values()) >= lp - 1e-6
        if tok in top:
            assert top[tok] == pytest.approx(lp, abs=1e-6)
    assert all(o.prompt_logprobs is None for o in outs["p"][1:])
    # under load with preemption (recomputed prompts): the same numbers; k = 0 gives no top lists
    final, engine = run_under_load(neox, cases, [("q", ids, SamplingRequest(max_tokens=4, temperature=0,
                                                                             prompt_logprobs=0))],
                                   num_blocks=8, seed=4, max_num_seqs=8)
    assert engine.stats()["num_preemptions"] > 0
    q = engine.first_outputs["q"]
    assert q.prompt_logprobs[0] is None and q.prompt_logprobs[1:] == pytest.approx(scored, abs=1e-4)
    assert q.prompt_top_logprobs is None


def test_abort_frees_blocks(neox, cases):
    engine = LLMEngine(neox, max_num_seqs=4, num_blocks=40)
    for i, (ids, _, _) in enumerate(cases[:8]):
        engine.add_request(str(i), ids, SamplingRequest(max_tokens=30, temperature=0))
    for _ in range(3):
        engine.step()
    s = engine.stats()
    assert s["num_running"] == 4 and s["num_waiting"] == 4 and s["num_blocks_used"] > 0
    assert engine.abort("0") and engine.abort("7")  # one running, one waiting
    assert not engine.abort("0") and not engine.abort("nope")
    for _ in range(2):
        assert all(o.request_id not in ("0", "7") for o in engine.step())
    for i in range(1, 7):
        engine.abort(str(i))
    s = engine.stats()
    assert s["num_blocks_used"] == 0 and s["num_blocks_free"] == 40 and s["num_running"] == s["num_waiting"] == 0
    assert not engine.has_unfinished() and engine.step() == []
    engine.scheduler.blocks.check_invariants()


def test_rejections(neox):
    engine = LLMEngine(neox, max_num_seqs=2, num_blocks=4, max_queue=1)
    with pytest.raises(RequestRejected):
        engine.add_request("long", [1] * 60, SamplingRequest(max_tokens=10))
    with pytest.raises(RequestRejected):
        engine.add_request("empty", [], SamplingRequest())
    engine.add_request("a", [5, 6], SamplingRequest(max_tokens=2, temperature=0))
    with pytest.raises(QueueFull):
        engine.add_request("b", [5, 6], SamplingRequest(max_tokens=2, temperature=0))
    assert engine.max_model_len == neox.config.max_position_embeddings and engine.block_size == 16
    assert engine.tokenizer is neox.tokenizer
    drain(engine)
    assert engine.stats()["num_blocks_free"] == 4


def test_sample_row():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0, 5.0, 4.0])
    draws = [sample_row(logits, 1.0, 2, 0.0, 4, request_generator(11, t)) for t in range(200)]
    assert set(draws) == {1, 2}  # top-2 of the first 4 ids (ids 4, 5 lie past the valid vocabulary)
    assert draws == [sample_row(logits, 1.0, 2, 0.0, 4, request_generator(11, t)) for t in range(200)]
    assert sample_row(logits, 0.0, 0, 0.0, 6, request_generator(0, 0)) == 4
    assert {sample_row(logits, 0.7, 0, 0.5, 6, request_generator(3, t)) for t in range(50)} == {4}  # nucleus



def test_sample_rows_is_sample_row_per_row(monkeypatch):
    """The batched sampler chooses, row by row, what sample_row chooses with the same draw: any mix of
    temperatures, top-k, top-p (on and off) and the padded vocabulary, including draws at the edges of [0, 1)."""
    g = torch.Generator().manual_seed(0)
    m, v, valid = 48, 40, 37
    logits = torch.randn(m, v, generator=g) * 3
    logits[5, :] = 0.0  # a flat row
    logits[6, 30:] = 50.0  # all the mass past the valid vocabulary
    temps = [0.3 + (i % 5) * 0.4 for i in range(m)]
    top_k = [(0, 2, 5, 36, 37, 100)[i % 6] for i in range(m)]
    top_p = [(1.0, 0.9, 0.5, 0.0, 0.999, 0.05, 1.0)[i % 7] for i in range(m)]
    rand = torch.rand
    for u in ([float(rand((), generator=g)) for _ in range(m)], [0.0] * m, [1.0 - 2 ** -24] * m):
        want = []
        for i in range(m):  # sample_row draws once from its generator: that draw is u[i]
            monkeypatch.setattr(torch, "rand", lambda *a, _u=u[i], **k: torch.tensor(_u))
            want.append(sample_row(logits[i], temps[i], top_k[i], top_p[i] if 0 < top_p[i] < 1 else 0.0, valid,
                                   None))
        monkeypatch.setattr(torch, "rand", rand)
        got = sample_rows(logits, temps, top_k, top_p, valid, u)
        assert got == want
        assert all(t < valid for t in got) and len(set(got)) > 3
    wide = torch.randn(13, 30000, generator=g)  # on the CPU the rows go a few at a time
    u = [float(rand((), generator=g)) for _ in range(13)]
    assert sample_rows(wide, [0.7] * 13, [0, 50] * 6 + [0], [0.8] * 13, 29990, u) == \
        [sample_rows(wide[i:i + 1], [0.7], [(0, 50)[i % 2]], [0.8], 29990, u[i:i + 1])[0] for i in range(13)]

def test_kv_cache_sizing(neox):
    engine = LLMEngine(neox, max_num_seqs=2, max_model_len=64)
    assert engine.stats()["num_blocks_total"] == 8  # 2 sequences x 64 tokens / 16
    per_block = 2 * 6 * 6 * 16 * 64 * 4
    engine = LLMEngine(neox, kv_cache_memory=10 * per_block + 5)
    assert engine.stats()["num_blocks_total"] == 10
    assert engine.runner.cache.k.shape == (6, 10, 6, 16, 64) and engine.runner.cache.k.dtype == torch.float32
    # a fraction of the free memory (on CPU the host's available memory)
    free = engine._free_memory()
    engine = LLMEngine(neox, kv_cache_memory=min(0.5, 64 * per_block / free))
    assert abs(engine.stats()["num_blocks_total"] - min(0.5 * free, 64 * per_block) // per_block) <= 1
    with pytest.raises(NeoxRtError, match="fraction"):
        LLMEngine(neox, kv_cache_memory=1.5)


def test_incremental_detokenization_equals_full_decode(neox):
    """The engine decodes a window of the newest tokens per step; the streamed pieces put together, and the final
    text, equal one decode of all the tokens, for byte-level tokens that split characters (random ids hit lone
    UTF-8 lead and continuation bytes) and for ordinary text."""
    from neox_rt.engine.llm_engine import _Detok
    tok = neox.tokenizer
    rng = random.Random(0)
    streams = [tok.encode("naïve café — 東京 🙂 done"), [rng.randrange(tok.vocab_size) for _ in range(300)]]
    for ids in streams:
        d = _Detok(SamplingRequest(), 0)
        pieces, lens = [], []
        for i, t in enumerate(ids):
            d.token_ids.append(t)
            before = len(d.text)
            d.advance(tok, final=i == len(ids) - 1)
            pieces.append(d.text[before:])
            assert not d.text.endswith("\ufffd") or i == len(ids) - 1, "a partial character was emitted"
            lens.append(len(d.token_ids) - d.prefix_offset)
        assert "".join(pieces) == d.text == tok.decode(ids)
        assert max(lens) <= 8, "the decode window grew with the output"


def test_paged_graph_buckets_stay_close(neox):
    """The decode-graph buckets end at max_num_seqs' bucket and, above 16, each is at most 1.5x the one below: a step pads
    its batch to the next bucket, and every padding row costs the linears and the LM head."""
    from neox_rt.engine.graphs import PagedDecodeGraphRunner
    cache = LLMEngine(neox, max_num_seqs=2, num_blocks=4).runner.cache
    buckets = PagedDecodeGraphRunner(neox.model, cache, 150, 8, capture=False).buckets
    assert buckets[0] == 1 and buckets[-1] == 160
    assert all(b <= 1.5 * a for a, b in zip(buckets, buckets[1:]) if a >= 16)
    assert PagedDecodeGraphRunner(neox.model, cache, 512, 8, capture=False).buckets[-1] == 512


def test_padded_decode_graph_step_equals_eager(neox, cases):
    """The engine's decode-graph step (static buffers padded to a bucket: KV slot -1 and length 0 for padding rows),
    run eagerly on CPU: under load with preemption, every greedy output still equals generate's, and some steps
    really went through it with padding."""
    from neox_rt.engine.graphs import PagedDecodeGraphRunner
    engine = LLMEngine(neox, max_num_seqs=8, num_blocks=8, max_num_batched_tokens=48)
    runner = engine.runner
    runner.graphs = PagedDecodeGraphRunner(neox.model, runner.cache, 8, 64, capture=False)
    assert runner.graphs.buckets == (1, 2, 4, 8)
    assert runner.graphs.capture_all() == 0  # capturing off (CPU): nothing to capture
    used = []
    step = runner.graphs.step
    runner.graphs.step = lambda *a, **k: used.append(a[3].shape[0]) or step(*a, **k)
    rng = random.Random(3)
    todo = [(f"g{i}", ids, SamplingRequest(max_tokens=n, temperature=0)) for i, (ids, n, _) in enumerate(cases)]
    final = {}
    while todo or engine.has_unfinished():
        for _ in range(rng.choice([0, 0, 1, 2])):
            if todo:
                engine.add_request(*todo.pop())
        final.update({o.request_id: o for o in engine.step() if o.finished})
    for i, (_, n, ref) in enumerate(cases):
        assert final[f"g{i}"].token_ids == ref, i
    assert any(b not in (1, 2, 4, 8) for b in used), "no step ran padded"
    assert engine.stats()["num_preemptions"] > 0


@pytest.mark.gpu
def test_engine_on_gpu_graphs_equal_padded_eager():
    """fp16 on the GPU: 24 greedy requests arriving over time through the engine with decode CUDA graphs give the
    tokens of the same padded steps run eagerly (same kernels and shapes, so the same numbers: the block tables and
    lengths really are graph inputs), and the graphs were captured and used."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    from neox_rt.engine.graphs import PagedDecodeGraphRunner
    neox = load_default(dtype="float16", device="cuda")
    prompts = [neox.tokenizer.encode(p) for p in PROMPTS] * 2

    def run(capture: bool):
        engine = LLMEngine(neox, max_num_seqs=16, num_blocks=256, max_num_batched_tokens=64)
        r = engine.runner
        r.graphs = PagedDecodeGraphRunner(neox.model, r.cache, 16, r.graphs.block_tables.shape[1], capture=capture)
        todo = [(f"r{i}", ids, SamplingRequest(max_tokens=40, temperature=0, ignore_eos=True))
                for i, ids in enumerate(prompts)]
        final = {}
        while todo or engine.has_unfinished():
            if todo:
                engine.add_request(*todo.pop())
            final.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        return final, r.graphs

    eager, _ = run(False)
    graphed, graphs = run(True)
    assert graphs.captures > 0 and graphs.disabled_reason is None
    assert graphed == eager
    # the engine captures every bucket at start, on padding rows only: the cache is untouched
    engine = LLMEngine(neox, max_num_seqs=16, num_blocks=64)
    assert engine.runner.graphs.captures == len(engine.runner.graphs.buckets) == 5
    k = engine.runner.cache.k
    k.fill_(0.5)
    before = k.clone()
    engine.runner.graphs._graphs.clear()
    assert engine.runner.graphs.capture_all() == 5
    torch.cuda.synchronize()
    assert torch.equal(k, before)


@pytest.mark.gpu
def test_engine_on_gpu_ahead_equals_in_step(engine_mode, monkeypatch):
    """fp16 on the GPU with decode graphs: planning each step ahead (inputs taken from the step in flight on the
    device, results copied to pinned memory behind an event) gives the greedy and seeded sampled tokens and the
    logprobs of waiting for each step."""
    if not torch.cuda.is_available():
        pytest.skip("no GPU")
    if engine_mode != "ahead":
        pytest.skip("compares both modes itself")
    neox = load_default(dtype="float16", device="cuda")
    prompts = [neox.tokenizer.encode(p) for p in PROMPTS] * 2

    def run(ahead: str):
        monkeypatch.setenv("NEOX_RT_ENGINE_AHEAD", ahead)
        engine = LLMEngine(neox, max_num_seqs=16, num_blocks=40, max_num_batched_tokens=64)
        assert engine.ahead == (ahead == "1") and engine.runner.graphs is not None
        todo = [(f"r{i}", ids, SamplingRequest(max_tokens=30, temperature=0.0 if i % 3 else 0.8, top_p=0.9, seed=i,
                                               logprobs=2 if i % 4 == 0 else None, ignore_eos=True))
                for i, ids in enumerate(prompts)]
        final = {}
        while todo or engine.has_unfinished():
            if todo:
                engine.add_request(*todo.pop())
            final.update({o.request_id: (o.token_ids, o.logprobs) for o in engine.step() if o.finished})
        return final, engine.stats()["num_preemptions"]

    (ahead, p1), (in_step, p2) = run("1"), run("0")
    assert p1 > 0 or p2 > 0  # the pool is small enough to preempt
    assert ahead.keys() == in_step.keys() and len(ahead) == len(prompts)
    # The two modes batch differently (a step is planned before the one in flight has finished anything), and fp16
    # kernels may round a row differently in another batch: a near-tie can flip a token late in a request. A wrong
    # input taken from the device would break every request from its second token on.
    same = 0
    for rid in ahead:
        a, b = ahead[rid][0], in_step[rid][0]
        assert a[:3] == b[:3], rid
        same += a == b
        if a == b and ahead[rid][1] is not None:
            assert ahead[rid][1] == pytest.approx(in_step[rid][1], abs=2e-2), rid
    assert same >= 0.75 * len(ahead), f"{same} of {len(ahead)} requests equal"


class _BasicIndexOnly(torch.Tensor):
    """Logits that refuse a Python list as an index while ``in_launch``: torch copies such an index to the device
    from pageable memory and waits for the copy, which on a GPU waits for the forward (launch moves its indexes up
    as tensors from pinned memory, queued)."""
    in_launch = False

    def __getitem__(self, idx):
        items = idx if isinstance(idx, tuple) else (idx,)
        assert not _BasicIndexOnly.in_launch or not any(isinstance(i, list) for i in items), \
            f"list index {idx!r} on the step's logits in launch"
        return super().__getitem__(idx)


def test_launch_queues_no_wait_for_the_forward(neox, cases):
    """``ModelRunner.launch`` touches the step's logits with basic indexing only, so that on a GPU nothing in it waits
    for the forward (the host detokenizes the previous step while the device runs); greedy and sampled rows mixed
    still give the tokens they give otherwise."""
    def run(guard):
        engine = LLMEngine(neox, max_num_seqs=8, num_blocks=64)
        if guard:
            execute = engine.runner.execute

            def guarded(*a, **k):
                logits, sample_ids, plp = execute(*a, **k)
                return logits.as_subclass(_BasicIndexOnly), sample_ids, plp
            engine.runner.execute = guarded
            launch = engine.runner.launch

            def guarded_launch(*a, **k):
                _BasicIndexOnly.in_launch = True
                try:
                    return launch(*a, **k)
                finally:
                    _BasicIndexOnly.in_launch = False
            engine.runner.launch = guarded_launch
        for i, (ids, n, _) in enumerate(cases[:6]):
            engine.add_request(f"r{i}", ids, SamplingRequest(max_tokens=n, temperature=0.0 if i % 2 else 0.8,
                                                             seed=i))
        return {rid: o.token_ids for rid, o in drain(engine).items()}

    got = run(guard=True)
    assert got == run(guard=False)
    for i, (_, n, want) in enumerate(cases[:6]):
        if i % 2:  # the greedy ones equal generate
            assert got[f"r{i}"] == want[:len(got[f"r{i}"])] and len(got[f"r{i}"]) > 0
