"""The reference model against transformers.GPTNeoXForCausalLM (the test oracle)."""
import pytest
import torch

import neox_rt
from neox_rt.engine.generation import Generator
from neox_rt.engine.kv_cache import KVCache
from neox_rt.model.config import NeoXConfig
from tests.conftest import SMALL_CONFIGS, make_hf_model, save_hf


class IdsTokenizer:
    """Token ids only; an EOS id the model never emits, so runs go to the token cap like HF's."""
    eos_id = -1
    vocab_size = 1 << 30

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(params=sorted(SMALL_CONFIGS), scope="module")
def pair(request, tmp_path_factory):
    hf = make_hf_model(**SMALL_CONFIGS[request.param])
    d = save_hf(hf, tmp_path_factory.mktemp(request.param))
    ours = neox_rt.load(d, dtype="float32", device="cpu", progress=False)
    return hf, ours


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_logits_match_hf(pair):
    hf, ours = pair
    ids = torch.randint(0, 160, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert rel_err(ours.logits(ids), ref) < 1e-4


def test_greedy_matches_hf_generate(pair):
    hf, ours = pair
    prompt = torch.randint(2, 160, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    gen = Generator(ours.model, IdsTokenizer())
    res = gen.generate([prompt[0].tolist()], max_new_tokens=32)[0]
    assert res.token_ids == ref[0, 11:].tolist()
    assert res.finish_reason == "length"


def test_kv_cache_decode_equals_recompute(pair):
    _, ours = pair
    gen = Generator(ours.model, IdsTokenizer())
    prompt = list(range(5, 25))
    cached = gen.generate([prompt], max_new_tokens=20, return_logprobs=True)[0]
    full = gen.generate([prompt], max_new_tokens=20, recompute=True, return_logprobs=True)[0]
    assert cached.token_ids == full.token_ids
    assert max(abs(a - b) for a, b in zip(cached.logprobs, full.logprobs)) < 1e-4


def test_batched_equals_one_at_a_time(pair):
    _, ours = pair
    gen = Generator(ours.model, IdsTokenizer())
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 160, (n,), generator=g).tolist() for n in (3, 17, 1, 9)]
    batched = gen.generate(prompts, max_new_tokens=16, return_logprobs=True)
    for p, b in zip(prompts, batched):
        single = gen.generate([p], max_new_tokens=16, return_logprobs=True)[0]
        assert b.token_ids == single.token_ids
        assert max(abs(x - y) for x, y in zip(b.logprobs, single.logprobs)) < 1e-4


def test_cache_reset_between_prompts(pair):
    """gpt-neox leaks KV state from one prompt into the next; here a prompt's output never depends on the last."""
    _, ours = pair
    gen = Generator(ours.model, IdsTokenizer())
    alone = gen.generate([[7, 8, 9]], max_new_tokens=8, return_logprobs=True)[0]
    gen.generate([list(range(2, 60))], max_new_tokens=8)
    after = gen.generate([[7, 8, 9]], max_new_tokens=8, return_logprobs=True)[0]
    assert alone.token_ids == after.token_ids
    # the reused cache is larger, so reductions run over more (masked) slots: rounding-level differences only
    assert max(abs(a - b) for a, b in zip(alone.logprobs, after.logprobs)) < 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_close_to_fp32(tmp_path, dtype):
    hf = make_hf_model(**SMALL_CONFIGS["parallel_rot25_hd32_gelu"])
    d = save_hf(hf, tmp_path)
    ids = torch.randint(0, 160, (2, 13), generator=torch.Generator().manual_seed(4))
    ref = neox_rt.load(d, dtype="float32", device="cpu", progress=False).logits(ids)
    out = neox_rt.load(d, dtype=dtype, device="cpu", progress=False).logits(ids).float()
    assert out.dtype == torch.float32 and rel_err(out, ref) < (2e-2 if dtype == "bfloat16" else 5e-3)


def test_first_supported_chain_dispatch():
    """The default selection's CUDA-then-Triton chain (ops.CUDA_THEN_TRITON): the first backend whose predicate
    accepts the call runs it, the second gets the rest, and the op falls back to the reference past both."""
    from neox_rt import ops
    calls = []

    def impl(tag):
        def run(x, *a, **k):
            calls.append(tag)
            return ops.linear_ref(x, *a, **k)
        return run

    op = ops.Op("linear", ops.linear_ref, ((impl("first"), lambda x, *a, **k: x.shape[0] == 1),
                                           (impl("second"), lambda x, *a, **k: x.shape[0] <= 4)), "cuda+triton")
    w = torch.randn(5, 3)
    for rows in (1, 3, 9):
        x = torch.randn(rows, 3)
        res = torch.randn(rows, 5)
        torch.testing.assert_close(op(x, w, None, None, residual=res), x @ w.T + res)
    assert calls == ["first", "second"]  # 9 rows: neither predicate, the reference ran


def test_default_selection_and_op_overrides(monkeypatch):
    """The default ("fastest") selection with fake backends: CUDA-then-Triton chains, Triton-preferred and
    CUDA-preferred ops, NEOX_RT_OP_BACKENDS exceptions, and a clear error for a bad entry."""
    from neox_rt import ops
    from neox_rt.errors import NeoxRtError
    from neox_rt.ops import backends

    def fake(tag):
        return lambda *a, **k: tag

    def load(name):
        for k in ops.OPS:
            if name == "cuda" and k == "attention":
                continue  # this fake CUDA backend lacks one op: Triton serves it whatever the preference
            ops.register(k, fake(f"{name}:{k}"), None, name)
        return True

    monkeypatch.setattr(backends, "_load_backend", load)
    try:
        monkeypatch.delenv("NEOX_RT_OP_BACKENDS", raising=False)
        ops.select_backend(None, "cuda")
        got = ops.active_backends()
        assert got["linear"] == got["decode_attention"] == "cuda+triton"
        assert got["rotary_kv_write"] == "cuda" and got["layernorm"] == "triton" and got["attention"] == "triton"
        assert [i[0]() for i in ops.OPS["decode_attention"].impls] == ["cuda:decode_attention",
                                                                        "triton:decode_attention"]
        monkeypatch.setenv("NEOX_RT_OP_BACKENDS", "decode_attention=triton, layernorm=torch,attention=cuda")
        ops.select_backend(None, "cuda")
        got = ops.active_backends()
        assert got["decode_attention"] == "triton" and ops.OPS["decode_attention"]() == "triton:decode_attention"
        assert got["layernorm"] == "torch" and ops.OPS["layernorm"].impls == ()
        assert got["attention"] == "triton"  # asked for cuda, which lacks it
        assert got["linear"] == "cuda+triton"
        for bad in ("decode_attention=fast", "nosuchop=cuda", "decode_attention"):
            monkeypatch.setenv("NEOX_RT_OP_BACKENDS", bad)
            for device in ("cuda", "cpu"):  # validated on every device
                with pytest.raises(NeoxRtError, match="NEOX_RT_OP_BACKENDS"):
                    ops.select_backend(None, device)
    finally:
        ops.reset()


@pytest.mark.parametrize("name,value", [("NEOX_RT_DECODE_VARIANT", "7"), ("NEOX_RT_GEMV_VARIANT", "fast"),
                                        ("NEOX_RT_DECODE_BLOCKS_PER_SM", "-1"), ("NEOX_RT_GEMV_MAX_ROWS", "17")])
def test_bad_kernel_setting_is_a_clear_error(monkeypatch, name, value):
    """The CUDA backend's experiment settings are read when it loads: a bad value is a NeoxRtError naming the
    variable, and backend loading passes it on instead of falling back with a warning."""
    from neox_rt.errors import NeoxRtError
    from neox_rt.ops import backends
    from neox_rt.ops import cuda as cuda_ops
    bounds = {"NEOX_RT_DECODE_VARIANT": (0, 2), "NEOX_RT_GEMV_VARIANT": (0, 10),
              "NEOX_RT_DECODE_BLOCKS_PER_SM": (0, None), "NEOX_RT_GEMV_MAX_ROWS": (1, 16)}
    monkeypatch.setenv(name, value)
    with pytest.raises(NeoxRtError, match=name):
        cuda_ops._env_int(name, 0, *bounds[name])
    monkeypatch.setenv(name, "1")
    assert cuda_ops._env_int(name, 0, *bounds[name]) == 1

    def bad_settings():
        raise NeoxRtError(f"{name}={value!r}: expected an integer")
    monkeypatch.setattr(cuda_ops, "implementations", bad_settings)
    with pytest.raises(NeoxRtError, match=name):
        backends._load_backend("cuda")


def test_linear_pair_and_sum_references():
    """The fused-pair ops' fallbacks equal their formulas: (act1(x1 W1^T + b1), act2(x2 W2^T + b2)) and
    x1 W1^T + x2 W2^T + b1 + b2 + residual (None biases and residual allowed)."""
    from neox_rt import ops
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 12, generator=g)
    w1, w2, w3 = torch.randn(5, 8, generator=g), torch.randn(7, 12, generator=g), torch.randn(5, 12, generator=g)
    b1, b2, b3, res = (torch.randn(5, generator=g), torch.randn(7, generator=g), torch.randn(5, generator=g),
                       torch.randn(2, 3, 5, generator=g))
    y1, y2 = ops.OPS["linear_pair"](x1, w1, b1, None, x2, w2, b2, "gelu")
    torch.testing.assert_close(y1, x1 @ w1.T + b1)
    torch.testing.assert_close(y2, torch.nn.functional.gelu(x2 @ w2.T + b2))
    y1, y2 = ops.OPS["linear_pair"](x1, w1, None, "relu", x2, w2, None, None)
    torch.testing.assert_close(y1, torch.relu(x1 @ w1.T))
    torch.testing.assert_close(y2, x2 @ w2.T)
    torch.testing.assert_close(ops.OPS["linear_sum"](x1, w1, x2, w3, b1, b3, res),
                               x1 @ w1.T + x2 @ w3.T + b1 + b3 + res)
    torch.testing.assert_close(ops.OPS["linear_sum"](x1, w1, x2, w3), x1 @ w1.T + x2 @ w3.T)


@pytest.mark.parametrize("name,value", [("NEOX_RT_GEMV2_KSPLIT", "3"), ("NEOX_RT_GEMV2_MIN_BLOCKS", "1"),
                                        ("NEOX_RT_GEMV2_MIN_BLOCKS", "5"),
                                        ("NEOX_RT_GEMV2_KSPLIT", "two")])
def test_bad_choice_setting_is_a_clear_error(monkeypatch, name, value):
    """Settings with a fixed set of values (the fused GEMV pairs' split and occupancy) reject anything else."""
    from neox_rt.ops import cuda as cuda_ops
    from neox_rt.errors import NeoxRtError
    monkeypatch.setenv(name, value)
    with pytest.raises(NeoxRtError, match=name):
        cuda_ops._env_choice(name, (0, 2, 4, 8) if "KSPLIT" in name else (0, 2, 3, 4))
    monkeypatch.setenv(name, "2")
    assert cuda_ops._env_choice(name, (0, 2, 4, 8) if "KSPLIT" in name else (0, 2, 3, 4)) == 2


class _ToyInt8Weight(torch.nn.Module):
    """A stand-in weight format (int8 per output channel): only what the op table's references need."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127  # [out, 1]
        self.register_buffer("qweight", torch.round(weight / scale).to(torch.int8))  # [out, in]
        self.register_buffer("scale", scale)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.float() * self.scale).to(dtype)


def test_a_weight_format_needs_no_branch_in_the_model():
    """A linear whose weight comes in another format runs through the same model code: the op table's reference
    dequantizes it, and the logits equal the model holding the dequantized weights as plain tensors."""
    from neox_rt.model.layers import Linear
    config = NeoXConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=32)
    quantized, plain = neox_rt.build_model(config), neox_rt.build_model(config)
    neox_rt.init_random(quantized, seed=3)
    plain.load_state_dict(quantized.state_dict())
    swapped = 0
    for mod, plain_mod in list(zip(quantized.modules(), plain.modules())):
        if isinstance(mod, Linear):
            fmt = _ToyInt8Weight(mod.weight.data)
            del mod.weight  # the parameter goes; the format takes its place
            mod.weight = fmt
            plain_mod.weight.data.copy_(fmt.dequantize(torch.float32))
            swapped += 1
    assert swapped == 2 * 4 + 1  # four linears a layer, and the LM head
    ids = torch.tensor([[5, 17, 3, 42, 8]])
    positions = torch.arange(5)[None]
    got = quantized(ids, positions, KVCache.for_model(quantized, 1, 8))
    want = plain(ids, positions, KVCache.for_model(plain, 1, 8))
    assert torch.equal(got, want)


@pytest.mark.parametrize("parallel", [True, False])
def test_sum_with_next_layernorms_equals_separate_ops(parallel):
    """Where a backend serves ``linear_sum_norm`` (the sum with the next layer's dual LayerNorm in its launch), each
    parallel-residual layer but the last hands the next one a NormedSum, and the logits equal the separate
    linear_sum, dual LayerNorm and pair ops bit for bit; a sequential-residual model never calls it."""
    from neox_rt import ops
    from neox_rt.ops.table import linear_sum_norm_ref
    config = NeoXConfig(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        max_position_embeddings=32, use_parallel_residual=parallel)
    model = neox_rt.build_model(config)
    neox_rt.init_random(model, seed=4)
    ids = torch.tensor([[5, 17, 3, 42, 8]])
    positions = torch.arange(5)[None]
    want = model(ids, positions, KVCache.for_model(model, 1, 8))
    calls = []

    def stand_in(*args):
        calls.append(args[0].shape)
        return linear_sum_norm_ref(*args)

    op = ops.OPS["linear_sum_norm"]
    saved = (op.impls, op.backend, op.impl_backends, op.prepares)
    try:
        ops.register("linear_sum_norm", stand_in, None, "test")
        got = model(ids, positions, KVCache.for_model(model, 1, 8))
    finally:
        op.impls, op.backend, op.impl_backends, op.prepares = saved
    assert torch.equal(got, want)
    assert len(calls) == (config.num_hidden_layers - 1 if parallel else 0)
