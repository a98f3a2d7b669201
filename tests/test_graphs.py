"""CUDA-graph decode (neox_rt/engine/graphs.py): buckets, padding, wiring into Generator, and on a GPU the graph
path against the eager fused path and the PyTorch reference."""
import pytest
import torch

from neox_rt.engine.kv_cache import KVCache
import neox_rt
from neox_rt import ops
from neox_rt.model.config import NeoXConfig
from neox_rt.errors import NeoxRtError
from neox_rt.engine.generation import Generator
from neox_rt.engine.graphs import BUCKETS, DecodeGraphRunner, bucket_for, graphs_enabled
from neox_rt.engine.sampling import SamplingParams, sample
from tests.conftest import teacher_forced_logits


class IdsTokenizer:
    """Token ids only; an EOS id the model never emits (and that is no embedding row: padding maps it to 0)."""
    eos_id = -1
    vocab_size = 1 << 30

    def decode(self, ids):
        return " ".join(map(str, ids))


BUCKET_CASES = [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (7, 8), (8, 8), (9, 16), (16, 16), (17, 32), (31, 32),
                (32, 32), (33, None), (100, None)]
PROMPT_LENGTHS = [(5, 17, 1, 9), (5, 17, 1), (3, 1, 12, 7, 2, 30)]  # exact bucket, padded to 4, padded to 8


@pytest.mark.parametrize("batch,bucket", BUCKET_CASES)
def test_bucket_for(batch, bucket):
    assert BUCKETS == (1, 2, 4, 8, 16, 32)
    assert bucket_for(batch) == bucket


def test_bucket_for_rejects_empty_batch_and_honours_custom_buckets():
    with pytest.raises(NeoxRtError):
        bucket_for(0)
    assert bucket_for(3, (6, 2)) == 6
    assert bucket_for(7, (6, 2)) is None


def test_graphs_enabled(monkeypatch):
    monkeypatch.delenv("NEOX_RT_CUDA_GRAPHS", raising=False)
    assert not graphs_enabled("cpu")
    assert graphs_enabled("cuda")  # a device object is enough; nothing is allocated
    monkeypatch.setenv("NEOX_RT_CUDA_GRAPHS", "0")
    assert not graphs_enabled("cuda")
    assert not graphs_enabled("cuda", tp_size=2)
    monkeypatch.setenv("NEOX_RT_CUDA_GRAPHS", "1")
    assert graphs_enabled(torch.device("cuda", 0))
    assert graphs_enabled("cuda", tp_size=2)  # tensor parallel: only when asked for
    monkeypatch.delenv("NEOX_RT_CUDA_GRAPHS")
    assert not graphs_enabled("cuda", tp_size=2)


def small_model(device="cpu", dtype="float32", seed=0, std=0.2, **kw):
    cfg = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
               max_position_embeddings=96, hidden_act="gelu_fast")
    cfg.update(kw)
    model = neox_rt.build_model(NeoXConfig(**cfg), dtype, device)
    neox_rt.init_random(model, seed=seed, std=std)
    return model


@pytest.fixture(scope="module")
def cpu_model():
    return small_model()


def test_no_graph_runner_on_cpu(cpu_model, monkeypatch):
    monkeypatch.delenv("NEOX_RT_CUDA_GRAPHS", raising=False)
    gen = Generator(cpu_model, IdsTokenizer())
    assert gen.graphs is None
    assert len(gen.generate([[3, 4, 5]], max_new_tokens=4)[0].token_ids) == 4
    assert gen.cache.batch == 1  # no bucket padding without graphs


def _prefill(model, prompts, cache):
    b, width = len(prompts), max(map(len, prompts))
    ids = torch.zeros(b, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in prompts])
    return model(ids, torch.arange(width).expand(b, width), cache, last_index=lens - 1)


def test_padded_step_writes_only_own_slots_and_matches_eager(cpu_model):
    """The padded static-buffer step (run eagerly on CPU): real rows equal the unpadded eager step, and
    the step changes exactly slot positions[i] of real rows and slot 0 of padding rows."""
    model = cpu_model
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # b = 3 -> bucket 4
    runner = DecodeGraphRunner(model, pad_id=0, capture=False)
    assert runner.cache_rows(3) == 4
    padded, plain = KVCache.for_model(model, 4, 16), KVCache.for_model(model, 3, 16)
    _prefill(model, prompts, padded)
    logits = _prefill(model, prompts, plain)
    positions = torch.tensor([len(p) for p in prompts])
    for _ in range(5):
        tok = sample(logits, SamplingParams(), model.config.vocab_size)
        before_k, before_v = padded.k.clone(), padded.v.clone()
        got, greedy = runner.step(tok, positions, padded, greedy_vocab=model.config.vocab_size)
        logits = model(tok[:, None], positions[:, None], plain, decode=True)[:, 0]
        assert got.shape == logits.shape
        torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)  # fp32, only the GEMM row count differs
        assert torch.equal(greedy, sample(got, SamplingParams(), model.config.vocab_size))
        changed = ((padded.k != before_k) | (padded.v != before_v)).any(dim=(0, 2, 4))  # [rows, T]
        expect = torch.zeros_like(changed)
        expect[torch.arange(3), positions] = True
        assert torch.equal(changed[:3], expect[:3])
        assert not changed[3, 1:].any()  # the padding row rewrites only its slot 0 (same value after step 1)
        assert torch.isfinite(padded.k[:, 3, :, 0]).all() and padded.k[:, 3, :, 0].abs().sum() > 0
        positions += 1


def test_runner_declines_batches_it_cannot_hold(cpu_model):
    runner = DecodeGraphRunner(cpu_model, capture=False, buckets=(1, 2))
    cache = KVCache.for_model(cpu_model, 2, 8)
    assert runner.step(torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), cache) is None
    small = KVCache.for_model(cpu_model, 1, 8)  # a batch of 2 needs 2 cache rows
    assert runner.step(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), small) is None
    assert runner.supports(2) and not runner.supports(3)


@pytest.mark.parametrize("lengths", PROMPT_LENGTHS)
def test_generator_with_padded_runner_equals_eager_on_cpu(cpu_model, lengths):
    """The Generator's graph wiring (bucketed cache, padding, in-graph argmax, sampling outside) on CPU."""
    g = torch.Generator().manual_seed(len(lengths))
    prompts = [torch.randint(2, 96, (n,), generator=g).tolist() for n in lengths]
    eager = Generator(cpu_model, IdsTokenizer())
    graphed = Generator(cpu_model, IdsTokenizer())
    graphed.graphs = DecodeGraphRunner(cpu_model, IdsTokenizer.eos_id, capture=False)
    for sampling in (SamplingParams(), SamplingParams(temperature=0.8, top_k=20)):
        want = eager.generate(prompts, max_new_tokens=12, sampling=sampling, seed=7, return_logprobs=True)
        got = graphed.generate(prompts, max_new_tokens=12, sampling=sampling, seed=7, return_logprobs=True)
        assert graphed.cache.batch == bucket_for(len(prompts))
        for w, r in zip(want, got):
            assert r.token_ids == w.token_ids
            assert max(abs(x - y) for x, y in zip(r.logprobs, w.logprobs)) < 1e-4  # fp32, GEMM row count only
    # recompute mode never uses the runner
    calls = []
    graphed.graphs.step = lambda *a, **k: calls.append(1)
    graphed.generate([prompts[0]], max_new_tokens=3, recompute=True)
    assert calls == []


# ----------------------------------------------------------------------------------------------------
# GPU: graphs against the eager fused path and the reference (fp16, random weights on the device)
# ----------------------------------------------------------------------------------------------------

GPU_CONFIG = dict(vocab_size=512, hidden_size=384, num_hidden_layers=4, num_attention_heads=4,  # hd 96 as 20B
                  rotary_pct=0.25, max_position_embeddings=256, hidden_act="gelu_fast")
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def gpu_models():
    """(fp16 model, fp32 copy of the same weights) on the GPU; the op backend is restored afterwards."""
    m16 = small_model("cuda", "float16", seed=1, std=0.05, **GPU_CONFIG)
    m32 = neox_rt.build_model(m16.config, "float32", "cuda")
    with torch.no_grad():
        for (_, p32), (_, p16) in zip(m32.named_parameters(), m16.named_parameters()):
            p32.copy_(p16.float())
    yield m16, m32
    ops.reset()


def _logits_fp32(m32, ids):
    ops.select_backend("torch")
    try:
        return Generator(m32, IdsTokenizer()).logits(torch.tensor([ids]))[0, -1].float()
    finally:
        ops.reset()


def assert_same_greedy(a, b, prompt, m32, what):
    """a == b; they may part only at a near tie of the fp32 logits (fp16 rounding can flip an argmax)."""
    assert len(a) == len(b), what
    for d, (x, y) in enumerate(zip(a, b)):
        if x != y:
            logits = _logits_fp32(m32, prompt + a[:d])
            gap = (logits[x] - logits[y]).abs().item()
            tol = 1e-2 * logits.abs().max().item()  # a few fp16 ulps of the largest logit
            assert gap <= tol, f"{what}: tokens part at step {d} ({x} vs {y}), logit gap {gap:.3g} > {tol:.3g}"
            return d
    return len(a)


def _generate(model, prompts, graphs: bool, backend: str | None, **kw):
    ops.reset()
    ops.select_backend(backend, "cuda")
    gen = Generator(model, IdsTokenizer())
    if not graphs:
        gen.graphs = None
    res = gen.generate(prompts, max_new_tokens=NEW_TOKENS, **kw)
    if graphs:
        assert gen.graphs is not None and gen.graphs.disabled_reason is None, gen.graphs.disabled_reason
        assert gen.graphs.captures >= 1
        assert gen.cache.batch == bucket_for(len(prompts))
    return [r.token_ids for r in res], gen


@pytest.mark.gpu
def test_graph_greedy_equals_eager_fused_and_reference(gpu_models, monkeypatch):
    monkeypatch.delenv("NEOX_RT_CUDA_GRAPHS", raising=False)
    m16, m32 = gpu_models
    prompt = torch.randint(2, 512, (11,), generator=torch.Generator().manual_seed(4)).tolist()
    graph, _ = _generate(m16, [prompt], graphs=True, backend=None)
    fused, _ = _generate(m16, [prompt], graphs=False, backend=None)
    reference, _ = _generate(m16, [prompt], graphs=False, backend="torch")
    graph_ref, _ = _generate(m16, [prompt], graphs=True, backend="torch")  # graphs over the reference ops
    assert len(graph[0]) == NEW_TOKENS
    assert_same_greedy(graph[0], fused[0], prompt, m32, "graph vs eager fused")
    assert_same_greedy(graph[0], reference[0], prompt, m32, "graph vs reference")
    assert_same_greedy(graph_ref[0], reference[0], prompt, m32, "graph (reference ops) vs reference")


@pytest.mark.gpu
@pytest.mark.parametrize("sum_norm", [0, 1])
def test_graph_logits_within_rule(gpu_models, monkeypatch, sum_norm):
    """Graph decode logits vs an fp32 reference: error at most twice the fp16 reference's own error; with
    ``sum_norm`` each layer's sum also applies the next layer's LayerNorms (linear_sum_norm served by the GEMV)."""
    from neox_rt.ops import cuda as cuda_ops
    monkeypatch.setattr(cuda_ops, "SUM_NORM", sum_norm)
    m16, m32 = gpu_models
    prompt = torch.randint(2, 512, (13,), generator=torch.Generator().manual_seed(5)).tolist()
    cont = torch.randint(2, 512, (NEW_TOKENS,), generator=torch.Generator().manual_seed(6)).tolist()
    ops.reset()
    ops.select_backend("torch")
    ref32 = teacher_forced_logits(m32, prompt, cont)
    ref16 = teacher_forced_logits(m16, prompt, cont)
    ops.select_backend(None, "cuda")
    layer0, layer1 = m16.gpt_neox.layers[:2]
    down = layer0.mlp.dense_4h_to_h.weight
    x = torch.ones(1, 1, down.shape[0], device="cuda", dtype=torch.float16)
    up = torch.ones(1, 1, down.shape[1], device="cuda", dtype=torch.float16)
    ln1, ln2 = layer1.input_layernorm, layer1.post_attention_layernorm
    served = ops.OPS["linear_sum_norm"].served_by(x, layer0.attention.dense.weight, up, down, None, None, x,
                                                  ln1.weight, ln1.bias, ln2.weight, ln2.bias, ln1.eps)
    assert served == ("cuda" if sum_norm else "torch"), served
    runner = DecodeGraphRunner(m16)
    graph16 = teacher_forced_logits(m16, prompt, cont, runner)
    assert runner.captures == 1 and runner.disabled_reason is None
    err_ref = (ref16 - ref32).abs().max().item()
    err_graph = (graph16 - ref32).abs().max().item()
    assert torch.isfinite(graph16).all()
    assert err_graph <= 2 * err_ref, f"graph error {err_graph:.3g} > 2 x fp16 reference error {err_ref:.3g}"
    ops.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", PROMPT_LENGTHS)
def test_batched_graph_decode_equals_eager(gpu_models, lengths, monkeypatch):
    monkeypatch.delenv("NEOX_RT_CUDA_GRAPHS", raising=False)
    m16, m32 = gpu_models
    g = torch.Generator().manual_seed(sum(lengths))
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in lengths]
    graph, _ = _generate(m16, prompts, graphs=True, backend=None)
    eager, _ = _generate(m16, prompts, graphs=False, backend=None)
    for i, p in enumerate(prompts):
        assert len(graph[i]) == NEW_TOKENS
        assert_same_greedy(graph[i], eager[i], p, m32, f"row {i} (prompt length {len(p)})")
    ops.reset()


@pytest.mark.gpu
def test_graphs_recaptured_for_a_new_cache(gpu_models, monkeypatch):
    """A larger request reallocates the cache: the graphs are captured again and stay correct."""
    monkeypatch.delenv("NEOX_RT_CUDA_GRAPHS", raising=False)
    m16, m32 = gpu_models
    ops.reset()
    ops.select_backend(None, "cuda")
    gen = Generator(m16, IdsTokenizer())
    eager = Generator(m16, IdsTokenizer())
    eager.graphs = None
    short = [7, 8, 9]
    first = gen.generate([short], max_new_tokens=8)[0].token_ids
    captures = gen.graphs.captures
    long_prompt = list(range(2, 150))
    got = gen.generate([long_prompt], max_new_tokens=40)[0].token_ids  # capacity 188 > 11: new cache
    assert gen.graphs.captures == captures + 1
    assert_same_greedy(got, eager.generate([long_prompt], max_new_tokens=40)[0].token_ids, long_prompt, m32,
                       "after re-capture")
    again = gen.generate([short], max_new_tokens=8)[0].token_ids  # fits the big cache: no new capture
    assert gen.graphs.captures == captures + 1
    assert_same_greedy(again, first, short, m32, "short prompt in the reused cache")
    ops.reset()
