"""The W8A16 and W4A16 Triton kernels (kernels/quant_linear.py) against "dequantize, then matmul".

On CPU they run in the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported when no GPU is present)
on the decode shapes of the family scaled down in the output features (the real input features of 1.4b, 2.8b, 12b
and 20B, a slice of the outputs) and on ragged shapes (k not a multiple of the group or of 8, odd n), 1-64 rows.

Tolerance rule (house style, as tests/test_kernels_triton.py): the kernel's max error against the fp64 product of
x and the dequantized weight (``Int*Weight.dequantize(dtype)``, the reference's weight) is at most twice PyTorch's
own error at the same dtype (F.linear of the same x and dequantized weight) plus one unit of output rounding.
Outputs are poisoned with NaN on the GPU; inputs are random, never zero.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

from neox_rt import ops  # noqa: E402
from neox_rt.quant.formats import Int4Weight, Int8Weight  # noqa: E402

triton = pytest.importorskip("triton")
from neox_rt.kernels import quant_linear as k_quant  # noqa: E402
from neox_rt.ops import triton as triton_ops  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if GPU else [])  # no bf16 tl.dot in the interpreter

# (rows, out, in, group): the real in-features of each model's decode linears, a slice of the outputs on CPU.
DECODE_SHAPES_CPU = [
    (1, 48, 2048, 128),    # 1.4b qkv / h->4h input (hidden 2048)
    (2, 240, 2560, 128),   # 2.8b: one head's q, k, v (head dim 80) of hidden 2560
    (1, 32, 5120, 128),    # 12b hidden
    (4, 96, 6144, 128),    # 20B qkv input, one head (head dim 96)
    (1, 16, 24576, 128),   # 20B 4h->h input
]
DECODE_SHAPES_GPU = [(1, 6144, 2048, 128), (8, 2048, 8192, 128), (1, 7680, 2560, 128), (4, 2560, 10240, 128),
                     (1, 15360, 5120, 128), (1, 18432, 6144, 128), (16, 6144, 24576, 128), (64, 6144, 6144, 128)]
RAGGED_SHAPES = [
    (3, 33, 300, 128),     # k not a multiple of the group (last group 44), odd n
    (1, 17, 100, 32),      # k not a multiple of 8 (padded word), 4 groups with a short last one
    (5, 7, 200, 64),       # odd rows, a few outputs
    (64, 19, 72, 64),      # the most rows the kernels take
]


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    return torch.where(x == 0, torch.full_like(x, 1e-3), x)


def assert_by_rule(out, x, w_dense, bias, dtype, what):
    """kernel error vs fp64 <= 2 x torch's own error at this dtype + one output ulp at the largest value."""
    ref64 = torch.nn.functional.linear(x.double(), w_dense.double(), bias.double() if bias is not None else None)
    torch_low = torch.nn.functional.linear(x, w_dense, bias)
    assert out.dtype == dtype and out.shape == ref64.shape, (out.dtype, out.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    kernel_err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_low.double() - ref64).abs().max().item()
    bound = 2 * torch_err + torch.finfo(dtype).eps * ref64.abs().max().item()
    assert kernel_err <= bound, f"{what}: kernel err {kernel_err:.3g} > 2 x torch err {torch_err:.3g} + eps"


def check(fmt, m, n, k, group, dtype, bias=True, seed=0):
    w = randn(n, k, seed=seed + 1, scale=k ** -0.5).to(DEV, dtype)
    weight = Int8Weight.quantize(w) if fmt == "int8" else Int4Weight.quantize(w, group)
    x = randn(m, k, seed=seed).to(DEV, dtype)
    b = randn(n, seed=seed + 2).to(DEV, dtype) if bias else None
    supports = triton_ops.supports_int8_linear if fmt == "int8" else triton_ops.supports_int4_linear
    assert supports(x, weight, b)
    impl = triton_ops.int8_linear if fmt == "int8" else triton_ops.int4_linear
    out = impl(x, weight, b)
    assert_by_rule(out, x, weight.dequantize(dtype), b, dtype, f"{fmt} {m}x{n}x{k} g{group} {dtype}")


cpu_only = pytest.mark.skipif(GPU, reason="interpreter shapes; the GPU tests below run the full shapes")


@cpu_only
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DECODE_SHAPES_CPU, ids=lambda s: "x".join(map(str, s)))
def test_decode_shapes_interpreter(shape, dtype, fmt):
    m, n, k, group = shape
    check(fmt, m, n, k, group, dtype)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", RAGGED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ragged_shapes(shape, dtype, fmt):
    m, n, k, group = shape
    check(fmt, m, n, k, group, dtype, bias=m % 2 == 1, seed=m)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("activation", ["gelu", "gelu_fast", "relu"])
def test_epilogue(fmt, activation):
    """Bias, activation and residual in the epilogue, as the fp16 GEMV: against the reference op."""
    dtype = torch.float32
    w = randn(24, 160, seed=3, scale=0.1).to(DEV, dtype)
    weight = Int8Weight.quantize(w) if fmt == "int8" else Int4Weight.quantize(w, 32)
    x, b, res = randn(2, 160, seed=4).to(DEV, dtype), randn(24, seed=5).to(DEV, dtype), randn(2, 24, seed=6).to(DEV)
    impl = triton_ops.int8_linear if fmt == "int8" else triton_ops.int4_linear
    out = impl(x, weight, b, activation, residual=res)
    ref = ops.linear_ref(x, weight, b, activation, residual=res)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_supports_rejects():
    w = Int4Weight.quantize(torch.randn(8, 64), 32)
    w8 = Int8Weight.quantize(torch.randn(8, 64))
    x = torch.randn(1, 64).to(DEV)
    w, w8 = w.to(DEV), w8.to(DEV)
    assert not triton_ops.supports_int4_linear(x, w8) and not triton_ops.supports_int8_linear(x, w)
    assert not triton_ops.supports_int4_linear(torch.randn(65, 64).to(DEV), w)  # more than 64 rows: reference
    assert not triton_ops.supports_int8_linear(torch.randn(1, 32).to(DEV), w8)  # k mismatch
    assert not triton_ops.supports_int4_linear(x, w, activation="swish")
    assert not triton_ops.supports_int4_linear(x[:, ::2].contiguous().t(), w)
    assert not k_quant.supports_w4a16(x, w.qweight, w.scales, w.zeros.to(torch.int32), 32)
    from neox_rt.kernels import linear as k_linear
    assert not k_linear.supports_registered_linear(x.half(), w8)  # the fp16 GEMV never takes a format


def test_op_table_runs_the_format_kernels():
    """With the triton backend the linear op holds the fp16 GEMV, then the W8A16 and W4A16 kernels: a format weight
    goes to its kernel, a tensor weight where it went before."""
    try:
        ops.select_backend("triton")
        impls = [impl for impl, _ in ops.OPS["linear"].impls]
        assert impls[1:] == [triton_ops.int8_linear, triton_ops.int4_linear]
        x = torch.randn(2, 64).to(DEV)
        for weight in (Int8Weight.quantize(torch.randn(8, 64)), Int4Weight.quantize(torch.randn(8, 64), 32)):
            weight = weight.to(DEV)
            assert ops.OPS["linear"].served_by(x, weight) == "triton"
            torch.testing.assert_close(ops.OPS["linear"](x, weight), ops.linear_ref(x, weight), rtol=1e-5, atol=1e-5)
        # fp32 tensor weights stay on the reference (cuBLAS), as before
        assert ops.OPS["linear"].served_by(torch.randn(2, 64).to(DEV), torch.randn(8, 64).to(DEV)) == "torch"
    finally:
        ops.select_backend("torch")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", DECODE_SHAPES_GPU, ids=lambda s: "x".join(map(str, s)))
def test_decode_shapes_gpu(shape, dtype, fmt):
    m, n, k, group = shape
    check(fmt, m, n, k, group, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fp32_on_the_gpu_runs_the_reference(fmt):
    """fp32 activations on a GPU are not taken by the format kernels (they failed the error rule on an H100): the
    op table's reference serves them."""
    w = randn(64, 256, seed=1, scale=256 ** -0.5).to(DEV, torch.float32)
    weight = Int8Weight.quantize(w) if fmt == "int8" else Int4Weight.quantize(w, 128)
    x = randn(2, 256).to(DEV, torch.float32)
    supports = triton_ops.supports_int8_linear if fmt == "int8" else triton_ops.supports_int4_linear
    assert not supports(x, weight)


@cpu_only
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_model_triton_backend_interpreter(fmt):
    """A tiny quantized model through the Triton backend (every linear on the format kernels, interpreter, fp32):
    the same logits as the reference runtime on the same formats."""
    import neox_rt
    from neox_rt.engine.kv_cache import KVCache
    from neox_rt.model.config import NeoXConfig
    from neox_rt.quant.apply import quantize_model
    config = NeoXConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, rotary_pct=0.25, max_position_embeddings=64)
    model = neox_rt.build_model(config)
    neox_rt.init_random(model, seed=1, std=0.2)
    quantize_model(model, fmt, group_size=32, include_lm_head=True)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    positions = torch.arange(5)[None]
    want = model(ids, positions, KVCache.for_model(model, 1, 8))
    try:
        ops.select_backend("triton")
        x = torch.randn(5, 64)
        assert ops.OPS["linear"].served_by(x, model.embed_out.weight) == "triton"
        got = model(ids, positions, KVCache.for_model(model, 1, 8))
    finally:
        ops.select_backend("torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
