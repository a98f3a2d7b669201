"""Tokenizer facts, sampling semantics, stop conditions and scoring on the reference path."""
import os

import pytest
import torch

import neox_rt
from neox_rt import NeoxRtError
from neox_rt.engine.sampling import SamplingParams, filter_logits, sample
from neox_rt.engine.tokenizer import Tokenizer
from tests.conftest import TOKENIZER_20B

needs_20b = pytest.mark.skipif(not os.path.isfile(TOKENIZER_20B),
                               reason="../shared/tokenizers/20B_tokenizer.json is absent")


@needs_20b
def test_20b_tokenizer_facts():
    tok = Tokenizer(TOKENIZER_20B)
    assert tok.encode("Hello world") == [12092, 1533]
    assert tok.eos_id == 0
    text = "GPT-NeoX 20B: ünïcödé, 数字 and\n  spaces."
    assert tok.decode(tok.encode(text)) == text
    # 50277 entries in the release (this copy may carry a few added tokens): all below the padded 50304
    assert 50277 <= tok.vocab_size <= 50304


def test_top_k_then_top_p_keeps_top_token():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = filter_logits(logits.clone(), top_k=3, top_p=0.0)
    assert torch.isinf(kept[0, 3:]).all() and torch.isfinite(kept[0, :3]).all()
    only_top = filter_logits(logits.clone(), top_k=0, top_p=0.01)
    assert torch.isfinite(only_top[0, 0]) and torch.isinf(only_top[0, 1:]).all()
    nucleus = filter_logits(logits.clone(), top_k=0, top_p=0.9)  # p = .64 .24 .09 ...: keeps 3
    assert torch.isfinite(nucleus[0, :3]).all() and torch.isinf(nucleus[0, 3:]).all()


def test_padded_vocab_never_sampled_and_seeded():
    logits = torch.zeros(4, 10)
    logits[:, 8:] = 100.0  # the padded rows are the most likely
    assert (sample(logits, SamplingParams(), valid_vocab=8) < 8).all()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    p = SamplingParams(temperature=1.0, top_k=5)
    assert torch.equal(sample(logits, p, 8, g1), sample(logits, p, 8, g2))
    assert (sample(logits, p, 8, g1) < 8).all()


@pytest.mark.parametrize("bad", [dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2)])
def test_invalid_sampling(bad):
    with pytest.raises(NeoxRtError):
        SamplingParams(**bad)


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return neox_rt.load(tiny_checkpoint, device="cpu", progress=False)


def test_generate_text_and_seed(model):
    a = model.generate("def fibonacci(n):", max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    b = model.generate("def fibonacci(n):", max_new_tokens=12, temperature=0.8, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids and a.text == b.text
    assert len(a.token_ids) <= 12 and a.finish_reason in ("eos", "length")
    assert model.tokenizer.decode(a.token_ids) == a.text


def test_stop_at_eos_and_stop_string(model):
    greedy = model.generate("Hello", max_new_tokens=20)
    assert greedy.finish_reason in ("eos", "length")
    # a stop string taken from the greedy output ends generation there, text cut before it
    if len(greedy.text) > 3:
        stop = greedy.text[2:4]
        cut = model.generate("Hello", max_new_tokens=20, stop=[stop])
        assert cut.finish_reason == "stop" and cut.finished
        assert cut.text == greedy.text[: greedy.text.find(stop)]
        assert len(cut.token_ids) <= len(greedy.token_ids)


def test_streaming_equals_final_text(model):
    pieces = {}
    res = model.generate(["Hello", "The quick"], max_new_tokens=10, temperature=1.0, seed=1,
                         on_text=lambda i, t: pieces.setdefault(i, []).append(t))
    for i, r in enumerate(res):
        assert "".join(pieces.get(i, [])) == r.text


def test_context_overflow_error_and_left_truncation(model):
    long_prompt = list(range(2, 120))  # 118 tokens; the model has 128 positions
    with pytest.raises(NeoxRtError, match="exceeds the model's 128 positions"):
        model.generate([long_prompt], max_new_tokens=20)
    res = model.generate([long_prompt], max_new_tokens=20, truncate="left")[0]
    assert "truncated" in res.message and len(res.prompt_ids) == 108


def test_score_matches_logits(model):
    ids, lp = model.score("Hello world. The quick brown fox")
    logits = model.logits(torch.tensor([ids]))[0].float()
    expect = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert len(lp) == len(ids) - 1 and torch.allclose(torch.tensor(lp), expect, atol=1e-5)


def test_prefill_in_chunks_equals_one_pass(model, monkeypatch):
    """Generator._prefill runs a long prompt PREFILL_CHUNK positions at a time (bounded attention scores); a ragged
    batch whose last prompt tokens fall in different chunks gives the logits of one pass (fp32 CPU: to rounding) and
    the same greedy continuation."""
    from neox_rt.engine import generation
    prompts = [list(range(5, 5 + n)) for n in (23, 9, 16)]
    gen = generation.Generator(model.model, model.tokenizer)

    def prefill_logits():
        gen._get_cache(len(prompts), 40)
        return gen._prefill(prompts)
    monkeypatch.setattr(generation, "PREFILL_CHUNK", 1 << 20)
    whole = prefill_logits()
    greedy = SamplingParams(temperature=0)
    texts = [r.token_ids for r in gen.generate(prompts, max_new_tokens=8, sampling=greedy)]
    for chunk in (4, 8, 16):
        monkeypatch.setattr(generation, "PREFILL_CHUNK", chunk)
        got = prefill_logits()
        assert got.shape == whole.shape and torch.allclose(got, whole, atol=1e-4, rtol=1e-4), chunk
        assert [r.token_ids for r in gen.generate(prompts, max_new_tokens=8, sampling=greedy)] == texts, chunk
