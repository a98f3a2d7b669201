"""The W8A16 and W4A16 kernels, Triton (kernels/quant_linear.py) and CUDA (csrc/kernels/quant_gemm.cuh through
neox_rt.ops.cuda), against "dequantize, then matmul".

On CPU they run in the Triton interpreter (TRITON_INTERPRET=1, set before triton is imported when no GPU is present)
on the decode shapes of the family scaled down in the output features (the real input features of 1.4b, 2.8b, 12b
and 20B, a slice of the outputs) and on ragged shapes (k not a multiple of the group or of 8, odd n), 1-64 rows.

Tolerance rule (house style, as tests/test_kernels_triton.py): the kernel's max error against the fp64 product of
x and the dequantized weight (``Int*Weight.dequantize(dtype)``, the reference's weight) is at most twice PyTorch's
own error at the same dtype (F.linear of the same x and dequantized weight) plus one unit of output rounding.
Outputs are poisoned with NaN on the GPU; inputs are random, never zero.

The CUDA kernels (second half) run on the GPU only (skipped where the extension neox_rt._C or a GPU is missing): the
same rule on the decode shapes and on 1-64 rows, the fused epilogue, every configuration with and without PDL, the op
table's routing (CUDA first, Triton for what it declines), a CUDA-graph replay, and the launchers' checks. Their
``supports`` predicates are tested on CPU too (fake CUDA tensors), since they decide what reaches the kernels.

Variant 5 (FOLD: the zero point and the scale applied to the fp32 sums, not to each weight) does not compute
"dequantize to fp16, then matmul": its weights are never rounded to fp16. Its tests use the same rule against the
exact product instead (``exact=True``: the weight dequantized in fp32, where (q - zero) * scale and q * scale are
exact, the product in fp64), with PyTorch's own error measured against that same exact product: F.linear at fp16 errs
by the fp16 rounding of each weight and of y, FOLD by the rounding of y and its fp32 sums (the int4 path cancels
16384 x against its correction: ~2^-16 of a chunk's sum), so it must stay within the rule; in a CPU simulation of
the test shapes an exact kernel rounded once sits at 0.14-0.28 of the bound with either reference. Where FOLD does not
run (bf16, groups not a multiple of 128, int4 above 16 rows) variant 5 must equal variant 3 bit for bit.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

from neox_rt import ops  # noqa: E402
from neox_rt.quant.formats import (Int4Weight, Int8Weight, TiledInt4Weight, TiledInt8Weight, tile_rows,  # noqa: E402
                                   untile_rows)

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


def assert_within_rule(out, ref64, torch_low, what):
    """The rule: out (of torch_low's dtype and ref64's shape, finite) off the fp64 result by at most 2 x torch's own
    error at that dtype (torch_low) + one output ulp at the largest value."""
    dtype = torch_low.dtype
    assert out.dtype == dtype and out.shape == ref64.shape, (what, out.dtype, out.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an unwritten poisoned element?)"
    kernel_err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_low.double() - ref64).abs().max().item()
    bound = 2 * torch_err + torch.finfo(dtype).eps * ref64.abs().max().item()
    assert kernel_err <= bound, f"{what}: kernel err {kernel_err:.3g} > 2 x torch err {torch_err:.3g} + eps"


def assert_by_rule(out, x, w_dense, bias, dtype, what):
    """The rule for x W^T + b against fp64."""
    ref64 = torch.nn.functional.linear(x.double(), w_dense.double(), bias.double() if bias is not None else None)
    assert_within_rule(out, ref64, torch.nn.functional.linear(x, w_dense, bias).to(dtype), what)


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


# ----------------------------------------------------------------------------------------------------
# The CUDA kernels (csrc/kernels/quant_gemm.cuh): quant_linear_int8 / quant_linear_int4 of neox_rt._C
# ----------------------------------------------------------------------------------------------------

from neox_rt.ops import cuda as cuda_ops  # noqa: E402  (importable without the extension)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_ROWS = [1, 2, 3, 8, 9, 16, 33, 64]  # every tile count (1-8 tiles of 8 rows of x) and its edges
CUDA_RAGGED = (1000, 2560)  # n not a multiple of 16 or 32 (guarded rows); k: 40 int8 / 20 int4 chunks over 8 warps
FOLD = 5  # QuantVariant kQuantFold (csrc/kernels/quant_gemm.cuh)


@pytest.fixture(scope="module")
def quant_ext():
    """torch.ops.neox_rt with the quantized linears; skipped where the extension is not built."""
    try:
        ext = cuda_ops.load_extension()
    except ImportError as e:
        pytest.skip(f"neox_rt._C not built: {e}")
    assert hasattr(ext, "quant_linear_int8") and hasattr(ext, "quant_linear_int4"), "stale build of neox_rt._C"
    return ext


def bf16_kernels() -> bool:
    """Whether the extension's kernels on this GPU have bf16 tensor cores (built for sm_80 or newer)."""
    return cuda_ops._capability(torch.device("cuda", torch.cuda.current_device()))[0] >= 8


def bf16_or_skip(ext, dtype):
    """bf16 needs the sm_80 kernels: where this build runs as an older architecture (the "7.5+PTX" build on an H100,
    the T4 path) the launcher must refuse bf16 with its one-line error, checked here, and the bf16 case is skipped."""
    if dtype != torch.bfloat16 or bf16_kernels():
        return
    w = make_weight("int8", 32, 256, 0, torch.bfloat16)
    with pytest.raises(RuntimeError, match="bfloat16 needs kernels built for compute capability 8.0"):
        ext.quant_linear_int8(randn(1, 256).to("cuda", torch.bfloat16), w.qweight, w.scales, None, 0, None, 0, False)
    pytest.skip(f"bf16: this build runs as sm_{ext.kernel_arch(torch.cuda.current_device())} (no bf16 tensor cores); "
                "refused as it must be")


def poison_allocator():
    """NaN in the caching allocator's free blocks, large pool (256 MiB) and small pool (1 MiB blocks), so that the
    output the launcher allocates is NaN memory: an element the kernel does not write fails the finiteness check."""
    big = torch.full((64 << 20,), float("nan"), device="cuda")
    small = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(8)]
    del big, small


def make_weight(fmt, n, k, group, dtype, seed=0):
    w = randn(n, k, seed=seed + 1, scale=k ** -0.5).to("cuda", dtype)
    return Int8Weight.quantize(w) if fmt == "int8" else Int4Weight.quantize(w, group)


def run_cuda(ext, x, weight, bias=None, activation=None, residual=None, variant=0, pdl=False, poison=True):
    code = cuda_ops.ACTIVATIONS[activation]
    if poison:
        poison_allocator()
    if isinstance(weight, TiledInt8Weight):
        return ext.quant_linear_tiled(x, weight.qweight, weight.scales, weight.out_features, 8, 0, bias, code,
                                      residual, variant, pdl)
    if isinstance(weight, TiledInt4Weight):
        return ext.quant_linear_tiled(x, weight.qweight, weight.scale_zero, weight.out_features, 4, weight.group_size,
                                      bias, code, residual, variant, pdl)
    if isinstance(weight, Int8Weight):
        return ext.quant_linear_int8(x, weight.qweight, weight.scales, bias, code, residual, variant, pdl)
    return ext.quant_linear_int4(x, weight.qweight, weight.scales, weight.zeros, weight.group_size, bias, code,
                                 residual, variant, pdl)


def assert_epilogue_by_rule(out, x, weight, bias, activation, residual, what, exact=False):
    """As assert_by_rule, for the whole op: act(x W^T + b) + residual in fp64 against the reference op at x's dtype.
    ``exact``: the fp64 product with the exact weight (dequantized in fp32, exact for both formats) rather than the
    reference's fp16-rounded one, for variant 5 (FOLD), which never rounds a weight (the module docstring)."""
    dtype = x.dtype
    d = (lambda t: None if t is None else t.double())
    w64 = weight.dequantize(torch.float32 if exact else dtype).double()
    ref64 = ops.linear_ref(x.double(), w64, d(bias), activation, residual=d(residual))
    assert_within_rule(out, ref64, ops.linear_ref(x, weight, bias, activation, residual=residual).to(dtype), what)


def test_cuda_sources_registered():
    """The kernel is compiled by the framework-free check, its ops registered, wrapped and faked."""
    check = open(os.path.join(REPO, "csrc", "standalone", "compile_check.cu")).read()
    assert '#include "kernels/quant_gemm.cuh"' in check and "launch_quant_linear_int4<" in check
    bindings = open(os.path.join(REPO, "csrc", "bindings.cpp")).read()
    cuda_src = open(os.path.join(REPO, "neox_rt", "ops", "cuda.py")).read()
    for name in ("quant_linear_int8", "quant_linear_int4", "quant_linear_tiled", "quant_linear_tiled_pair",
                 "quant_linear_tiled_norm_pair", "quant_linear_tiled_sum"):
        assert f'm.impl("{name}"' in bindings and f'm.def("{name}(' in bindings
        assert f'register_fake("neox_rt::{name}")' in cuda_src
    impls = [impl for impl, _ in cuda_ops.IMPLS["linear"]]
    assert impls == [cuda_ops.linear, cuda_ops.tiled_linear, cuda_ops.int8_linear, cuda_ops.int4_linear]
    assert cuda_ops.PREPARES == {"linear": cuda_ops.prepare_linear_weight}
    assert [impl for impl, _ in cuda_ops.IMPLS["linear_pair"]] == [cuda_ops.linear_pair, cuda_ops.tiled_linear_pair]
    assert [impl for impl, _ in cuda_ops.IMPLS["linear_sum"]] == [cuda_ops.linear_sum, cuda_ops.tiled_linear_sum]
    assert cuda_ops.IMPLS["norm_linear_pair"][0] is cuda_ops.tiled_norm_linear_pair
    assert "launch_quant_gemm_pair<" in check and "launch_quant_gemm_sum<" in check
    header = open(os.path.join(REPO, "csrc", "kernels", "quant_gemm.cuh")).read()
    assert f"kQuantFold = {FOLD}," in header and f"kQuantVariantLast = {cuda_ops.QUANT_VARIANT_LAST}" in header


@pytest.mark.parametrize("sum_norm", [0, 1, 2, 3])
def test_sum_norm_setting_selects_quantized_sums(monkeypatch, sum_norm):
    """NEOX_RT_SUM_NORM's rule for the quantized sums (no GPU needed: the kernel's own bounds stubbed true): 2 takes
    every one-row sum, 3 (the default) only those whose next pair would not normalise its input itself (one row of
    hidden above QUANT_NORM_AUTO_MAX_ELEMS, as 20B's 6144; every one with the norm pair off, QUANT_FUSED < 2), 0 and 1
    none."""
    monkeypatch.setattr(cuda_ops, "supports_tiled_linear_sum", lambda *a: True)
    monkeypatch.setattr(cuda_ops, "_sum_norm_ok", lambda *a: True)
    monkeypatch.setattr(cuda_ops, "SUM_NORM", sum_norm)
    assert cuda_ops.SUM_NORM_MAX_ROWS == 1

    class W:
        def __init__(self, n):
            self.out_features = n

    limit = cuda_ops.QUANT_NORM_AUTO_MAX_ELEMS
    for fused in (2, 1):
        monkeypatch.setattr(cuda_ops, "QUANT_FUSED", fused)
        for hidden in (384, 2048, limit, limit + 8, 6144):
            x = torch.empty(1, 1, 128)
            got = cuda_ops.supports_tiled_linear_sum_norm(x, W(hidden), x, W(hidden), *[None] * 7, 1e-5)
            want = sum_norm == 2 or (sum_norm == 3 and (fused < 2 or hidden > limit))
            assert got == want, (sum_norm, fused, hidden)


def test_cuda_supports_declines_cpu_and_bad_shapes(monkeypatch):
    """The CUDA predicates (no extension needed): CPU tensors never; on fake CUDA tensors (no GPU needed) the shapes,
    dtypes and formats the kernels take, and nothing else."""
    w8, w4 = Int8Weight.quantize(torch.randn(48, 256)).half(), Int4Weight.quantize(torch.randn(48, 256), 128)
    w4.scales = w4.scales.half()
    x = torch.randn(2, 256).half()
    for supports, w in ((cuda_ops.supports_int8_linear, w8), (cuda_ops.supports_int4_linear, w4)):
        assert not supports(x, w)  # CPU
    from torch._subclasses.fake_tensor import FakeTensorMode
    monkeypatch.setattr(cuda_ops, "_aligned16", lambda *ts: True)  # a fake tensor has no address
    capability = {"value": (9, 0)}
    monkeypatch.setattr(cuda_ops, "_capability", lambda device: capability["value"])
    with FakeTensorMode():
        def x_of(rows, k, dtype=torch.float16):
            return torch.empty(rows, k, device="cuda", dtype=dtype)

        def int8(n, k, dtype=torch.float16):
            return Int8Weight(torch.empty(n, k, dtype=torch.int8, device="cuda"),
                              torch.empty(n, dtype=dtype, device="cuda"))

        def int4(n, k, group, dtype=torch.float16):
            groups = -(-k // group)
            return Int4Weight(torch.empty(n, -(-k // 8), dtype=torch.int32, device="cuda"),
                              torch.empty(n, groups, dtype=dtype, device="cuda"),
                              torch.empty(n, groups, dtype=torch.uint8, device="cuda"), k, group)

        s8, s4 = cuda_ops.supports_int8_linear, cuda_ops.supports_int4_linear
        assert s8(x_of(1, 256), int8(33, 256)) and s8(x_of(64, 256), int8(33, 256))
        assert s4(x_of(1, 256), int4(33, 256, 128)) and s4(x_of(5, 2304), int4(7, 2304, 96))
        assert s8(x_of(3, 256), int8(33, 256), torch.empty(33, device="cuda", dtype=torch.float16), "gelu",
                  torch.empty(3, 33, device="cuda", dtype=torch.float16))
        assert not s8(x_of(65, 256), int8(33, 256))                     # more rows than the kernels take
        assert not s8(x_of(1, 288), int8(33, 288))                      # in_features % 64
        assert not s4(x_of(1, 192), int4(33, 192, 64))                  # in_features % 128
        assert not s4(x_of(1, 256), int4(33, 256, 16))                  # group % 32
        assert not s4(x_of(1, 384), int4(33, 384, 256))                 # a short last group
        assert not s8(x_of(1, 256), int8(33, 512))                      # k mismatch
        assert not s8(x_of(1, 256), int4(33, 256, 128)) and not s4(x_of(1, 256), int8(33, 256))  # the other format
        assert not s8(x_of(1, 256), torch.empty(33, 256, device="cuda", dtype=torch.float16))  # a tensor weight
        assert not s8(x_of(1, 256, torch.float32), int8(33, 256, torch.float32))  # fp32: the reference
        assert not s8(x_of(1, 256), int8(33, 256, torch.float32))       # scales of another dtype
        assert not s8(x_of(1, 256), int8(33, 256), activation="swish")
        assert not s8(x_of(1, 256), int8(33, 256), torch.empty(32, device="cuda", dtype=torch.float16))  # bias
        assert not s8(x_of(2, 256), int8(33, 256), residual=torch.empty(1, 33, device="cuda", dtype=torch.float16))
        assert not s8(x_of(256, 2).t(), int8(33, 256))                  # not contiguous
        assert s8(x_of(1, 256, torch.bfloat16), int8(33, 256, torch.bfloat16))
        # the tiled forms: their own predicate, which the row-major ones decline and vice versa
        st = cuda_ops.supports_tiled_linear
        t8 = TiledInt8Weight(torch.empty(48, 256, dtype=torch.int8, device="cuda"),
                             torch.empty(33, dtype=torch.float16, device="cuda"))
        t4 = TiledInt4Weight(torch.empty(48, 32, dtype=torch.int32, device="cuda"),
                             torch.empty(3, 2, 16, dtype=torch.int32, device="cuda"), 33, 256, 128, torch.float16)
        assert st(x_of(1, 256), t8) and st(x_of(64, 256), t4) and st(x_of(3, 256), t4, None, "gelu")
        assert not st(x_of(1, 256), int8(33, 256)) and not s8(x_of(1, 256), t8) and not s4(x_of(1, 256), t4)
        assert not st(x_of(65, 256), t4) and not st(x_of(1, 128), t8)   # rows, k mismatch
        assert not st(x_of(1, 256, torch.bfloat16), t4)                 # scales of another dtype
        # the fused pairs of tiled linears: one format, 1-8 rows, one leading shape, the auto variant
        sp, ss = cuda_ops.supports_tiled_linear_pair, cuda_ops.supports_tiled_linear_sum
        assert sp(x_of(1, 256), t8, None, None, x_of(1, 256), t8, None, "gelu") and ss(x_of(8, 256), t4,
                                                                                       x_of(8, 256), t4)
        assert ss(x_of(3, 256), t8, x_of(3, 256), t8, torch.empty(33, device="cuda", dtype=torch.float16), None,
                  torch.empty(3, 33, device="cuda", dtype=torch.float16))
        assert not sp(x_of(9, 256), t8, None, None, x_of(9, 256), t8, None, None)         # 9 rows
        assert not sp(x_of(1, 256), t8, None, None, x_of(1, 256), t4, None, None)         # two formats
        assert not ss(x_of(2, 256), t8, x_of(1, 256), t8)                                 # leading shapes differ
        assert not ss(x_of(1, 256), t8, x_of(1, 256), t8, residual=torch.empty(1, 32, device="cuda",
                                                                               dtype=torch.float16))
        assert not sp(x_of(1, 256), int8(33, 256), None, None, x_of(1, 256), int8(33, 256), None, None)  # row-major
        assert not cuda_ops.supports_linear_sum_push(x_of(1, 256), t8, x_of(1, 256), t8)  # the GEMV pair's only
        # ... with the dual LayerNorm in the pair's launch: rows x hidden within the kernel's shared memory
        sn = cuda_ops.supports_tiled_norm_linear_pair
        ln = [torch.empty(256, device="cuda", dtype=torch.float16) for _ in range(4)]
        assert sn(x_of(8, 256), *ln, 1e-5, t8, None, None, t8, None, "gelu")  # 2048 values of x
        assert not sn(x_of(8, 256), *ln[:3], torch.empty(128, device="cuda", dtype=torch.float16), 1e-5, t8, None,
                      None, t8, None, None)                                               # a parameter's shape
        assert not sn(x_of(8, 256), *ln[:3], ln[3].float(), 1e-5, t8, None, None, t8, None, None)  # its dtype
        big = TiledInt8Weight(torch.empty(48, 6144, dtype=torch.int8, device="cuda"),
                              torch.empty(33, dtype=torch.float16, device="cuda"))
        ln6k = [torch.empty(6144, device="cuda", dtype=torch.float16) for _ in range(4)]
        assert not sn(x_of(1, 6144), *ln6k, 1e-5, big, None, None, big, None, None)       # 6144: measured slower
        monkeypatch.setattr(cuda_ops, "QUANT_VARIANT", 3)                                 # A/B runs: single launches
        assert not ss(x_of(1, 256), t8, x_of(1, 256), t8)
        monkeypatch.setattr(cuda_ops, "QUANT_VARIANT", 0)
        monkeypatch.setattr(cuda_ops, "QUANT_FUSED", 1)                                   # the pairs, not the norm
        assert ss(x_of(1, 256), t8, x_of(1, 256), t8)
        assert not sn(x_of(8, 256), *ln, 1e-5, t8, None, None, t8, None, "gelu")
        monkeypatch.setattr(cuda_ops, "QUANT_FUSED", 0)
        assert not ss(x_of(1, 256), t8, x_of(1, 256), t8)
        monkeypatch.setattr(cuda_ops, "QUANT_FUSED", 2)
        capability["value"] = (7, 5)  # T4: no bf16 tensor cores; fp16 still runs
        assert not s8(x_of(1, 256, torch.bfloat16), int8(33, 256, torch.bfloat16))
        assert s8(x_of(1, 256), int8(33, 256))
        assert not st(x_of(1, 256), t8)  # the tiled layout is read by the sm_80+ kernel only


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", DECODE_SHAPES_GPU, ids=lambda s: "x".join(map(str, s)))
def test_cuda_decode_shapes(quant_ext, shape, dtype, fmt):
    bf16_or_skip(quant_ext, dtype)
    m, n, k, group = shape
    weight = make_weight(fmt, n, k, group, dtype)
    x, b = randn(m, k).to("cuda", dtype), randn(n, seed=2).to("cuda", dtype)
    supports = cuda_ops.supports_int8_linear if fmt == "int8" else cuda_ops.supports_int4_linear
    assert supports(x, weight, b)
    impl = cuda_ops.int8_linear if fmt == "int8" else cuda_ops.int4_linear
    poison_allocator()
    out = impl(x, weight, b)
    assert_by_rule(out, x, weight.dequantize(dtype), b, dtype, f"cuda {fmt} {m}x{n}x{k} g{group} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", CUDA_ROWS)
def test_cuda_rows(quant_ext, rows, dtype, fmt):
    """1-64 rows (every tile count) on a ragged n, with leading dims kept: [1, rows, k] -> [1, rows, n]."""
    bf16_or_skip(quant_ext, dtype)
    n, k = CUDA_RAGGED
    weight = make_weight(fmt, n, k, 128, dtype, seed=rows)
    x, b = randn(1, rows, k, seed=rows).to("cuda", dtype), randn(n, seed=3).to("cuda", dtype)
    out = run_cuda(quant_ext, x, weight, b)
    assert out.shape == (1, rows, n)
    assert_by_rule(out[0], x[0], weight.dequantize(dtype), b, dtype, f"cuda {fmt} rows {rows} {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_fast", "relu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_epilogue(quant_ext, dtype, activation, fmt):
    """Bias, activation and residual fused, fp32 until the one rounding: against the reference op by the rule."""
    bf16_or_skip(quant_ext, dtype)
    n, k = 300, 1024
    weight = make_weight(fmt, n, k, 128, dtype, seed=7)
    for rows in (1, 5, 20):
        x = randn(rows, k, seed=rows).to("cuda", dtype)
        b, res = randn(n, seed=8).to("cuda", dtype), randn(rows, n, seed=9, scale=4.0).to("cuda", dtype)
        for bias, residual in ((b, None), (None, res), (b, res), (None, None)):
            out = run_cuda(quant_ext, x, weight, bias, activation, residual)
            assert_epilogue_by_rule(out, x, weight, bias, activation, residual,
                                    f"cuda {fmt} {rows} rows {activation} bias={bias is not None} "
                                    f"residual={residual is not None}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4, FOLD])  # auto, one / two tiles, LEAN, LEAN two tiles, FOLD
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 9, 16, 17, 40])
def test_cuda_variants(quant_ext, rows, pdl, variant, fmt):
    """Every configuration the launcher can pick, with and without programmatic dependent launch."""
    n, k = 97, 2048
    weight = make_weight(fmt, n, k, 128, torch.float16, seed=11)
    x, b = randn(rows, k, seed=12).to("cuda", torch.float16), randn(n, seed=13).to("cuda", torch.float16)
    res = randn(rows, n, seed=14).to("cuda", torch.float16)
    out = run_cuda(quant_ext, x, weight, b, "gelu_fast", res, variant, pdl)
    assert_epilogue_by_rule(out, x, weight, b, "gelu_fast", res, f"cuda {fmt} rows {rows} v{variant} pdl={pdl}",
                            exact=variant == FOLD)


# ----- variant 5 (FOLD): against the exact product (module docstring), fp16; its fallbacks equal LEAN bit for bit

@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", DECODE_SHAPES_GPU, ids=lambda s: "x".join(map(str, s)))
def test_cuda_fold_decode_shapes(quant_ext, shape, fmt):
    """The family's decode shapes (1-64 rows; int4 above 16 rows runs LEAN)."""
    m, n, k, group = shape
    weight = make_weight(fmt, n, k, group, torch.float16)
    x, b = randn(m, k).to("cuda", torch.float16), randn(n, seed=2).to("cuda", torch.float16)
    out = run_cuda(quant_ext, x, weight, b, variant=FOLD)
    assert_epilogue_by_rule(out, x, weight, b, None, None, f"fold {fmt} {m}x{n}x{k} g{group}", exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("rows", CUDA_ROWS + [4, 12, 15])
def test_cuda_fold_rows(quant_ext, rows, pdl, fmt):
    """1-64 rows (every tile count; 9-16 rows: int4's two tiles of rows) on the ragged n, leading dims kept."""
    n, k = CUDA_RAGGED
    weight = make_weight(fmt, n, k, 128, torch.float16, seed=rows)
    x, b = randn(1, rows, k, seed=rows).to("cuda", torch.float16), randn(n, seed=3).to("cuda", torch.float16)
    out = run_cuda(quant_ext, x, weight, b, variant=FOLD, pdl=pdl)
    assert out.shape == (1, rows, n)
    assert_epilogue_by_rule(out[0], x[0], weight, b, None, None, f"fold {fmt} rows {rows} pdl={pdl}", exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_fast", "relu"])
def test_cuda_fold_epilogue(quant_ext, activation, fmt):
    """Bias, activation and residual after the folded scale (int8: the row's scale before the bias)."""
    n, k = 300, 1024
    weight = make_weight(fmt, n, k, 128, torch.float16, seed=7)
    for rows in (1, 5, 12, 20):
        x = randn(rows, k, seed=rows).to("cuda", torch.float16)
        b, res = randn(n, seed=8).to("cuda", torch.float16), randn(rows, n, seed=9, scale=4.0).to("cuda", torch.float16)
        for bias, residual in ((b, None), (None, res), (b, res), (None, None)):
            out = run_cuda(quant_ext, x, weight, bias, activation, residual, variant=FOLD)
            assert_epilogue_by_rule(out, x, weight, bias, activation, residual,
                                    f"fold {fmt} {rows} rows {activation} bias={bias is not None} "
                                    f"residual={residual is not None}", exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("k,group", [(2048, 128), (2048, 256), (2048, 512), (6144, 128), (24576, 128)])
def test_cuda_fold_int4_groups_and_zero_points(quant_ext, k, group):
    """Groups of one chunk or more (128, 256, 512: a warp's chunk is one group), zero points over the 4-bit range,
    GPTQ v1's 16 and an out-of-range 200 (the correction -(16384 + 16 z) is exact for any uint8 z), one to 16 rows."""
    weight = make_weight("int4", 70, k, group, torch.float16, seed=group)
    weight.zeros.copy_(torch.randint(0, 17, weight.zeros.shape, device="cuda", dtype=torch.uint8))
    weight.zeros[:8] = 200
    for rows in (1, 3, 12, 16):
        x = randn(rows, k, seed=rows).to("cuda", torch.float16)
        out = run_cuda(quant_ext, x, weight, variant=FOLD)
        assert_epilogue_by_rule(out, x, weight, None, None, None, f"fold int4 k {k} g{group} {rows} rows", exact=True)


@pytest.mark.gpu
def test_cuda_fold_falls_back_to_lean(quant_ext):
    """Where FOLD does not run, variant 5 is variant 3: bf16 (not exact in 8 bits), int4 groups that are not a
    multiple of 128 (a chunk spans several groups) and int4 above 16 rows. Bit for bit, epilogue included."""
    cases = [("int4", 64, 1, torch.float16), ("int4", 32, 9, torch.float16), ("int4", 128, 17, torch.float16),
             ("int4", 128, 40, torch.float16), ("int4", 256, 64, torch.float16)]
    if bf16_kernels():
        cases += [("int8", 0, 1, torch.bfloat16), ("int8", 0, 12, torch.bfloat16), ("int4", 128, 1, torch.bfloat16),
                  ("int4", 128, 16, torch.bfloat16)]
    n, k = 300, 2048
    for fmt, group, rows, dtype in cases:
        weight = make_weight(fmt, n, k, group, dtype, seed=rows)
        x, b = randn(rows, k, seed=rows).to("cuda", dtype), randn(n, seed=5).to("cuda", dtype)
        res = randn(rows, n, seed=6).to("cuda", dtype)
        want = run_cuda(quant_ext, x, weight, b, "gelu", res, variant=3)
        got = run_cuda(quant_ext, x, weight, b, "gelu", res, variant=FOLD)
        assert torch.equal(got, want), f"{fmt} g{group} {rows} rows {dtype}: variant 5 is not LEAN here"


@pytest.mark.gpu
def test_cuda_fold_differs_from_lean_where_it_runs(quant_ext):
    """The other side of the fallback test: where FOLD runs it is a different computation (weights not rounded),
    so some output differs from LEAN's; if none did, the launcher would be running LEAN for variant 5. Below sm_80
    (the "7.5+PTX" build) neither runs: variant 5 is the plain kernel there, as every variant."""
    if not bf16_kernels():
        pytest.skip("this build runs below sm_80: no LEAN or FOLD kernel")
    for fmt in ("int8", "int4"):
        weight = make_weight(fmt, 512, 2048, 128, torch.float16, seed=21)
        x = randn(4, 2048, seed=22).to("cuda", torch.float16)
        lean, fold = run_cuda(quant_ext, x, weight, variant=3), run_cuda(quant_ext, x, weight, variant=FOLD)
        assert not torch.equal(lean, fold), f"{fmt}: variant 5 gave LEAN's output bit for bit"
        assert_epilogue_by_rule(fold, x, weight, None, None, None, f"fold {fmt} vs exact", exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("k,group", [(2048, 32), (2048, 64), (2560, 160), (2304, 96), (2560, 512), (2560, 2560),
                                     (24576, 128)])
def test_cuda_int4_group_sizes(quant_ext, k, group):
    """Group sizes other than 128 (the group of a lane's run is computed from floats: non-powers of two included),
    one group for the whole row, and 20B's 4h->h k."""
    weight = make_weight("int4", 70, k, group, torch.float16, seed=group)
    for rows, variant in ((1, 1), (12, 1), (1, 3), (12, 3)):  # 1: the plain kernel; 3: lean where G divides 512
        x = randn(rows, k, seed=rows).to("cuda", torch.float16)
        out = run_cuda(quant_ext, x, weight, variant=variant)
        assert_by_rule(out, x, weight.dequantize(torch.float16), None, torch.float16,
                       f"int4 k {k} g{group} {rows} v{variant}")


@pytest.mark.gpu
def test_cuda_int4_zero_points(quant_ext):
    """Zero points over the whole 4-bit range and GPTQ v1's 16 (fp16: any uint8; bf16: below 128)."""
    for dtype in (torch.float16, torch.bfloat16) if bf16_kernels() else (torch.float16,):  # bf16: test_cuda_kernel_arch
        weight = make_weight("int4", 64, 1024, 128, dtype, seed=5)
        weight.zeros.copy_(torch.randint(0, 17, weight.zeros.shape, device="cuda", dtype=torch.uint8))
        if dtype == torch.float16:
            weight.zeros[:8] = 200  # an odd out-of-range zero point is still exact in fp16 (1024 + z)
        x = randn(3, 1024).to("cuda", dtype)
        for variant in (1, 3):
            assert_by_rule(run_cuda(quant_ext, x, weight, variant=variant), x, weight.dequantize(dtype), None, dtype,
                           f"zeros {dtype} v{variant}")


@pytest.mark.gpu
def test_cuda_kernel_arch(quant_ext):
    """The extension says which architecture its kernels run as: the card's own for a build that targets it, 75 for
    the "7.5+PTX" build on a newer card. Below 80, bf16 is refused with the one-line error, by the predicates too."""
    dev = torch.cuda.current_device()
    arch, cap = quant_ext.kernel_arch(dev), torch.cuda.get_device_capability(dev)
    assert 75 <= arch <= 10 * cap[0] + cap[1], (arch, cap)
    assert cuda_ops._capability(torch.device("cuda", dev)) == min(cap, divmod(arch, 10))
    built = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if built.startswith("7.5"):
        assert arch == 75, (arch, built)
    w = make_weight("int8", 32, 256, 0, torch.bfloat16)
    x = randn(1, 256).to("cuda", torch.bfloat16)
    if arch < 80:
        assert not cuda_ops.supports_int8_linear(x, w)
        with pytest.raises(RuntimeError, match=f"this build runs as sm_{arch}"):
            quant_ext.quant_linear_int8(x, w.qweight, w.scales, None, 0, None, 0, False)
    else:
        assert cuda_ops.supports_int8_linear(x, w)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        quant_ext.kernel_arch(torch.cuda.device_count())


@pytest.mark.gpu
def test_cuda_op_table_routing(quant_ext, monkeypatch):
    """The default selection on a GPU: the linear op holds the CUDA GEMV and format kernels first, then Triton's; a
    format weight goes to the CUDA kernel where its predicate accepts it, to Triton where it declines and Triton
    accepts, else to the reference."""
    monkeypatch.delenv("NEOX_RT_BACKEND", raising=False)
    monkeypatch.delenv("NEOX_RT_OP_BACKENDS", raising=False)
    try:
        ops.select_backend(None, "cuda")
        linear = ops.OPS["linear"]
        assert [impl for impl, _ in linear.impls[:4]] == [cuda_ops.linear, cuda_ops.tiled_linear,
                                                          cuda_ops.int8_linear, cuda_ops.int4_linear]
        assert linear.impl_backends[:4] == ("cuda",) * 4 and set(linear.impl_backends[4:]) == {"triton"}
        assert linear.prepares == (cuda_ops.prepare_linear_weight,)
        x = randn(4, 2048).to("cuda", torch.float16)
        cases = [(make_weight("int8", 96, 2048, 0, torch.float16), x, "cuda"),
                 (make_weight("int4", 96, 2048, 128, torch.float16), x, "cuda"),
                 (make_weight("int4", 96, 2048, 16, torch.float16), x, "triton"),    # group % 32
                 (make_weight("int8", 96, 2080, 0, torch.float16), randn(4, 2080).to("cuda", torch.float16),
                  "triton"),                                                           # k % 64
                 (make_weight("int8", 96, 2048, 0, torch.float16), randn(65, 2048).to("cuda", torch.float16),
                  "torch")]                                                            # more than 64 rows
        for weight, xx, want in cases:
            assert linear.served_by(xx, weight) == want, (type(weight).__name__, xx.shape, want)
            out = linear(xx, weight)
            assert_by_rule(out, xx, weight.dequantize(torch.float16), None, torch.float16, f"op table -> {want}")
    finally:
        ops.select_backend("torch")


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["row-major", "tiled"])
@pytest.mark.parametrize("variant", [0, FOLD])
def test_cuda_graph_replay(quant_ext, variant, layout):
    """Quantized linears chained with programmatic dependent launch, captured in a CUDA graph: each replay equals the
    chain run eagerly without PDL, bit for bit (the warps' partial sums meet in a fixed order)."""
    h, f = 1024, 4096
    up8, down4 = make_weight("int8", f, h, 0, torch.float16, 1), make_weight("int4", h, f, 128, torch.float16, 2)
    qkv4, b = make_weight("int4", 3 * h, h, 64, torch.float16, 3), randn(f, seed=4).to("cuda", torch.float16)
    if layout == "tiled":
        up8, down4, qkv4 = tiled(up8), tiled(down4), tiled(qkv4)

    def chain(x, pdl):
        for _ in range(3):
            qkv = run_cuda(quant_ext, x, qkv4, variant=variant, pdl=pdl, poison=False)  # [2, 3h]
            up = run_cuda(quant_ext, qkv[:, :h].contiguous(), up8, b, "gelu", variant=variant, pdl=pdl,
                          poison=False)  # [2, f]
            x = run_cuda(quant_ext, up, down4, residual=x, variant=variant, pdl=pdl, poison=False)  # [2, h]
        return x

    x_static = randn(2, h).to("cuda", torch.float16)
    chain(x_static, True)  # warm up outside the capture
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        y_static = chain(x_static, True)
    torch.cuda.current_stream().wait_stream(stream)
    for trial in range(3):
        x_static.copy_(randn(2, h, seed=100 + trial).to("cuda", torch.float16))
        want = chain(x_static.clone(), False)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_static, want), f"replay {trial} differs from the eager chain"


@pytest.mark.gpu
def test_cuda_bad_input_raises(quant_ext):
    """The launchers' checks: one RuntimeError naming the problem, never a launch on bad input."""
    w8, w4 = make_weight("int8", 32, 256, 0, torch.float16), make_weight("int4", 32, 256, 128, torch.float16)
    x = randn(2, 256).to("cuda", torch.float16)
    q8, s8 = w8.qweight, w8.scales

    def int8(x_=x, q=q8, s=s8, bias=None, act=0, res=None, variant=0):
        return quant_ext.quant_linear_int8(x_, q, s, bias, act, res, variant, False)

    with pytest.raises(RuntimeError, match="in_features % 64"):
        w = make_weight("int8", 32, 96, 0, torch.float16)
        int8(randn(1, 96).to("cuda", torch.float16), w.qweight, w.scales)
    with pytest.raises(RuntimeError, match="at most 64 rows"):
        int8(randn(65, 256).to("cuda", torch.float16))
    with pytest.raises(RuntimeError, match="scales must be"):
        int8(s=s8.float())
    with pytest.raises(RuntimeError, match="scales must have shape"):
        int8(s=s8[:16])
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        int8(x.cpu())
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        int8(torch.empty(2 * 256 + 1, device="cuda", dtype=torch.float16)[1:].view(2, 256))
    with pytest.raises(RuntimeError, match="bias must have shape"):
        int8(bias=randn(31).to("cuda", torch.float16))
    with pytest.raises(RuntimeError, match="residual must have"):
        int8(res=randn(2, 31).to("cuda", torch.float16))
    with pytest.raises(RuntimeError, match="activation"):
        int8(act=7)
    with pytest.raises(RuntimeError, match="variant"):
        int8(variant=cuda_ops.QUANT_VARIANT_LAST + 1)
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        int8(x.float(), s=s8.float())
    with pytest.raises(RuntimeError, match="qweight"):
        int8(q=w4.qweight)
    with pytest.raises(RuntimeError, match="group size"):
        w = Int4Weight.quantize(randn(32, 384).to("cuda", torch.float16), 48)
        quant_ext.quant_linear_int4(randn(1, 384).to("cuda", torch.float16), w.qweight, w.scales, w.zeros, 48, None,
                                    0, None, 0, False)
    with pytest.raises(RuntimeError, match="zeros must be"):
        quant_ext.quant_linear_int4(x, w4.qweight, w4.scales, w4.zeros.int(), 128, None, 0, None, 0, False)
    with pytest.raises(RuntimeError, match="scales and zeros must have shape"):
        quant_ext.quant_linear_int4(x, w4.qweight, w4.scales, w4.zeros, 64, None, 0, None, 0, False)


@pytest.mark.gpu
def test_cuda_opcheck(quant_ext):
    """torch.library.opcheck: schema and fake-tensor registration of both ops."""
    w8, w4 = make_weight("int8", 24, 256, 0, torch.float16), make_weight("int4", 24, 256, 128, torch.float16)
    x, b = randn(3, 256).to("cuda", torch.float16), randn(24).to("cuda", torch.float16)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(quant_ext.quant_linear_int8, (x, w8.qweight, w8.scales, b, 1), test_utils=tests)
    torch.library.opcheck(quant_ext.quant_linear_int4, (x, w4.qweight, w4.scales, w4.zeros, 128, None, 0,
                                                        randn(3, 24).to("cuda", torch.float16)), test_utils=tests)
    if not bf16_kernels():  # below sm_80 the tiled ops refuse every call (tiled())
        return
    t8, t4 = TiledInt8Weight.from_row_major(w8), TiledInt4Weight.from_row_major(w4)
    torch.library.opcheck(quant_ext.quant_linear_tiled, (x, t8.qweight, t8.scales, 24, 8, 0, b, 1), test_utils=tests)
    torch.library.opcheck(quant_ext.quant_linear_tiled, (x, t4.qweight, t4.scale_zero, 24, 4, 128, None, 0),
                          test_utils=tests)
    torch.library.opcheck(quant_ext.quant_linear_tiled_pair, (x, t8.qweight, t8.scales, 24, 0, b, 1, x, t8.qweight,
                                                              t8.scales, 24, 0, None, 0, 8), test_utils=tests)
    torch.library.opcheck(quant_ext.quant_linear_tiled_sum, (x, t4.qweight, t4.scale_zero, 128, x, t4.qweight,
                                                             t4.scale_zero, 128, 24, 4, b, None,
                                                             randn(3, 24).to("cuda", torch.float16)), test_utils=tests)


# ----- the tiled layout (TiledInt8Weight / TiledInt4Weight, made at load by the cuda backend's prepare_linear_weight):
# the same kernels reading the same weights in another order, so every output equals the row-major one bit for bit

def tiled(weight):
    """The weight in the kernels' tiled layout. Where this build's kernels run below sm_80 (the "7.5+PTX" build on
    an H100: the T4 path) the op must refuse that layout with its one-line error, checked here, and the test is
    skipped: the tiled layout is read by the sm_80+ loop only (prepare_linear_weight never makes it there)."""
    t = (TiledInt4Weight if isinstance(weight, Int4Weight) else TiledInt8Weight).from_row_major(weight)
    if not bf16_kernels():
        dtype = t.scale_dtype if isinstance(t, TiledInt4Weight) else t.scales.dtype
        x = torch.ones(1, t.in_features, device="cuda", dtype=dtype)
        with pytest.raises(RuntimeError, match="needs kernels built for compute capability 8.0"):
            run_cuda(cuda_ops.load_extension(), x, t)
        pytest.skip("the tiled layout needs the sm_80+ kernels; this build runs below sm_80 (refused as it must be)")
    return t


def wide_launch(n, variant):
    """Whether the tiled launcher runs a narrow layer's configuration (QuantConfigWide: one tile of channels a block
    and 16 warps, k split otherwise than in the row-major kernel, so equal to it within fp16 rounding, not bit for
    bit): a grid of at most one block a SM, every variant but the two-tile ones (2, 4)."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return -(-n // 16) <= sms and variant not in (2, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", [0, 1, 2, 3, 4, FOLD])
def test_cuda_tiled_equals_row_major(quant_ext, variant, dtype, fmt):
    """Every variant (1 and 2 run the LEAN loop with their tiles on a tiled weight; the plain kernel they run on a
    row-major one is bit-identical to it), 1-64 rows, n a multiple of 16 or not (the last tile padded; with two tiles
    a warp, a block past the last tile), the whole epilogue: bit for bit where the launcher picks the same
    configuration for both layouts, within the rule of the reference where a narrow layer's runs (wide_launch)."""
    bf16_or_skip(quant_ext, dtype)
    for n, k in ((97, 2048), (1000, 2560), (2200, 1024), (6144, 1024)):
        weight = make_weight(fmt, n, k, 128, dtype, seed=n)
        t = tiled(weight)
        b = randn(n, seed=5).to("cuda", dtype)
        for rows in CUDA_ROWS:
            x, res = randn(rows, k, seed=rows).to("cuda", dtype), randn(rows, n, seed=6).to("cuda", dtype)
            got = run_cuda(quant_ext, x, t, b, "gelu", res, variant=variant)
            what = f"{fmt} {dtype} v{variant} {rows}x{n}x{k}"
            if wide_launch(n, variant):
                assert_epilogue_by_rule(got, x, weight, b, "gelu", res, f"{what} (tiled, narrow layer)",
                                        exact=variant == FOLD)
            else:
                want = run_cuda(quant_ext, x, weight, b, "gelu", res, variant=variant)
                assert torch.equal(got, want), f"{what}: tiled differs from row-major"


@pytest.mark.gpu
@pytest.mark.parametrize("group", [32, 64, 128, 256, 512])
def test_cuda_tiled_int4_groups(quant_ext, group):
    """Groups dividing 512 (the tiled scale words at the LEAN kernel's group stride), zero points over the 4-bit
    range and 200, 1-40 rows, a narrow layer and a wide one: within the rule of the reference, and equal to the
    row-major kernel where both run the same configuration."""
    for n in (70, 2200):
        weight = make_weight("int4", n, 2048, group, torch.float16, seed=group)
        weight.zeros.copy_(torch.randint(0, 17, weight.zeros.shape, device="cuda", dtype=torch.uint8))
        weight.zeros[:8] = 200
        t = tiled(weight)
        for rows in (1, 12, 40):
            x = randn(rows, 2048, seed=rows).to("cuda", torch.float16)
            for variant in (0, FOLD):
                got = run_cuda(quant_ext, x, t, variant=variant)
                if not wide_launch(n, variant):
                    assert torch.equal(got, run_cuda(quant_ext, x, weight, variant=variant)), (n, group, rows, variant)
            assert_by_rule(run_cuda(quant_ext, x, t), x, weight.dequantize(torch.float16), None, torch.float16,
                           f"tiled int4 {n}x2048 g{group} {rows} rows")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", DECODE_SHAPES_GPU, ids=lambda s: "x".join(map(str, s)))
def test_cuda_tiled_decode_shapes(quant_ext, shape, fmt):
    """The family's decode shapes through the op table's prepared weight: by the rule, and equal to row-major where
    both run the same configuration (not on a narrow layer: wide_launch)."""
    m, n, k, group = shape
    weight = make_weight(fmt, n, k, group, torch.float16)
    tiled(weight)  # skips below sm_80, where nothing is tiled
    t = cuda_ops.prepare_linear_weight(weight)
    assert isinstance(t, TiledInt4Weight if fmt == "int4" else TiledInt8Weight)
    x, b = randn(m, k).to("cuda", torch.float16), randn(n, seed=2).to("cuda", torch.float16)
    assert cuda_ops.supports_tiled_linear(x, t, b)
    out = cuda_ops.tiled_linear(x, t, b)
    if not wide_launch(n, 0):
        assert torch.equal(out, cuda_ops.int8_linear(x, weight, b) if fmt == "int8" else
                           cuda_ops.int4_linear(x, weight, b))
    assert_by_rule(out, x, weight.dequantize(torch.float16), b, torch.float16, f"tiled {fmt} {m}x{n}x{k}")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tiled_narrow_layer_rows(quant_ext, dtype, fmt):
    """A narrow layer (pythia-1.4b's 4h->h and dense, and a ragged one) at 1-64 rows: the launcher's one tile of
    channels a block for every row count (QuantConfigWide for 1, 2, 4 and 8 tiles of rows), by the rule of the
    reference with the whole epilogue; variant 1 (one tile, forced) runs the same kernel as auto, bit for bit."""
    bf16_or_skip(quant_ext, dtype)
    for n, k in ((2048, 8192), (2048, 2048), (100, 1536)):
        assert wide_launch(n, 0)
        weight = make_weight(fmt, n, k, 128, dtype, seed=k)
        t = tiled(weight)
        b = randn(n, seed=3).to("cuda", dtype)
        for rows in (1, 8, 9, 16, 17, 32, 33, 64):
            x, res = randn(rows, k, seed=rows).to("cuda", dtype), randn(rows, n, seed=4).to("cuda", dtype)
            got = run_cuda(quant_ext, x, t, b, "gelu", res)
            assert_epilogue_by_rule(got, x, weight, b, "gelu", res, f"tiled {fmt} {dtype} {rows}x{n}x{k}")
            assert torch.equal(run_cuda(quant_ext, x, t, b, "gelu", res, variant=1), got), (fmt, rows, n)


@pytest.mark.gpu
def test_cuda_prepare_linear_weight(quant_ext, monkeypatch):
    """What the cuda backend tiles at load (and what it leaves alone), and the op table's routing of the result: the
    tiled kernel up to 64 rows, the reference (through dequantize) above."""
    # 2400 channels: 150 tiles, more than an H100's or H200's 132 SMs, so the tiled kernel is the row-major one's twin
    w8, w4 = make_weight("int8", 2400, 2048, 0, torch.float16), make_weight("int4", 2400, 2048, 128, torch.float16)
    if not bf16_kernels():  # a build running below sm_80 (the T4 path) keeps the row-major formats
        assert cuda_ops.prepare_linear_weight(w8) is w8 and cuda_ops.prepare_linear_weight(w4) is w4
        pytest.skip("this build runs below sm_80: nothing is tiled (checked)")
    assert isinstance(cuda_ops.prepare_linear_weight(w8), TiledInt8Weight)
    assert isinstance(cuda_ops.prepare_linear_weight(w4), TiledInt4Weight)
    for keep in (make_weight("int4", 96, 2048, 16, torch.float16),   # group % 32: the Triton kernel's
                 make_weight("int4", 96, 2304, 96, torch.float16),   # 512 % 96: the plain kernel's
                 make_weight("int8", 96, 2080, 0, torch.float16),    # k % 64
                 make_weight("int8", 96, 2048, 0, torch.float16).to("cpu"),
                 torch.randn(96, 2048, device="cuda", dtype=torch.float16)):
        assert cuda_ops.prepare_linear_weight(keep) is keep
    monkeypatch.setattr(cuda_ops, "QUANT_TILED", 0)
    assert cuda_ops.prepare_linear_weight(w4) is w4
    monkeypatch.setattr(cuda_ops, "QUANT_TILED", 1)
    monkeypatch.delenv("NEOX_RT_BACKEND", raising=False)
    monkeypatch.delenv("NEOX_RT_OP_BACKENDS", raising=False)
    try:
        ops.select_backend(None, "cuda")
        linear = ops.OPS["linear"]
        for weight in (w8, w4):
            t = linear.prepare(weight)
            for rows, want in ((1, "cuda"), (64, "cuda"), (65, "torch")):
                x = randn(rows, 2048, seed=rows).to("cuda", torch.float16)
                assert linear.served_by(x, t) == want
                assert torch.equal(linear(x, t), linear(x, weight)) or want == "torch"
                assert_by_rule(linear(x, t), x, weight.dequantize(torch.float16), None, torch.float16,
                               f"op table tiled {type(t).__name__} {rows} rows")
    finally:
        ops.select_backend("torch")


@pytest.mark.gpu
def test_cuda_tiled_bad_input_raises(quant_ext):
    """quant_linear_tiled's own checks, one RuntimeError each."""
    w8, w4 = make_weight("int8", 40, 256, 0, torch.float16), make_weight("int4", 40, 256, 128, torch.float16)
    t8, t4 = tiled(w8), tiled(w4)
    x = randn(2, 256).to("cuda", torch.float16)
    op = quant_ext.quant_linear_tiled
    with pytest.raises(RuntimeError, match="bits 8 or 4"):
        op(x, t8.qweight, t8.scales, 40, 5, 0, None, 0, None, 0, False)
    with pytest.raises(RuntimeError, match=r"qweight \[48, 256\]"):
        op(x, w8.qweight, w8.scales, 40, 8, 0, None, 0, None, 0, False)  # row-major rows (40) are not 48
    with pytest.raises(RuntimeError, match="scale words must have shape"):
        op(x, t4.qweight, t4.scale_zero[:, :1].contiguous(), 40, 4, 128, None, 0, None, 0, False)
    with pytest.raises(RuntimeError, match="scales must be"):
        op(x, t4.qweight, w4.scales, 40, 4, 128, None, 0, None, 0, False)  # fp16 scales, not the int32 words
    with pytest.raises(RuntimeError, match="group size dividing 512"):
        op(x, t4.qweight, t4.scale_zero, 40, 4, 96, None, 0, None, 0, False)
    with pytest.raises(RuntimeError, match="int8 scales must have shape"):
        op(x, t8.qweight, t8.scales[:8], 40, 8, 0, None, 0, None, 0, False)


# ----- a parallel-residual layer's pairs of tiled linears in one launch (linear_pair: quant_linear_tiled_pair,
# linear_sum: quant_linear_tiled_sum; 1-8 rows)

FUSED_ROWS = [1, 2, 3, 8]
# (n1, k1, n2, k2): 1.4b's QKV and h->4h / dense and 4h->h, 20B's, and ragged ones (a narrow layer, n not a multiple
# of 16 or 32, k of 20 int4 / 40 int8 chunks over 8 warps)
PAIR_SHAPES = [(6144, 2048, 8192, 2048), (18432, 6144, 24576, 6144), (1000, 2560, 97, 1024), (2400, 1024, 1536, 512)]
SUM_SHAPES = [(2048, 2048, 2048, 8192), (6144, 6144, 6144, 24576), (1000, 2560, 1000, 1024), (2400, 512, 2400, 2560)]


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [0, 8])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tiled_pair(quant_ext, dtype, fmt, warps):
    """Two tiled linears in one launch: each output within the rule of the reference with its own bias and activation;
    at 8 warps a block also bit for bit the single launch wherever that runs 8 warps too (not a narrow layer's 16:
    wide_launch), the pair's tiles of channels a warp being the single launch's or not (one or two tiles sum in the
    same order); ``warps`` 0: the default (4-warp blocks, k split four ways: the rule only)."""
    bf16_or_skip(quant_ext, dtype)
    for n1, k1, n2, k2 in PAIR_SHAPES:
        w1, w2 = make_weight(fmt, n1, k1, 128, dtype, seed=n1), make_weight(fmt, n2, k2, 128, dtype, seed=n2 + 1)
        t1, t2 = tiled(w1), tiled(w2)
        b1, b2 = randn(n1, seed=3).to("cuda", dtype), randn(n2, seed=4).to("cuda", dtype)
        for rows, pdl in zip(FUSED_ROWS, (False, True, False, True)):
            x1, x2 = randn(rows, k1, seed=rows).to("cuda", dtype), randn(rows, k2, seed=rows + 9).to("cuda", dtype)
            assert cuda_ops.supports_tiled_linear_pair(x1, t1, b1, None, x2, t2, None, "gelu")
            poison_allocator()
            q1, s1, g1 = cuda_ops._tiled_args(t1)
            q2, s2, g2 = cuda_ops._tiled_args(t2)
            y1, y2 = quant_ext.quant_linear_tiled_pair(x1, q1, s1, n1, g1, b1, 0, x2, q2, s2, n2, g2, None, 1,
                                                       4 if fmt == "int4" else 8, pdl, warps)
            what = f"pair {fmt} {dtype} {rows} rows {n1}x{k1} + {n2}x{k2} pdl {pdl} warps {warps}"
            assert_epilogue_by_rule(y1, x1, w1, b1, None, None, what + " (first)")
            assert_epilogue_by_rule(y2, x2, w2, None, "gelu", None, what + " (second)")
            for y, x, t, b, act, n in ((y1, x1, t1, b1, None, n1), (y2, x2, t2, None, "gelu", n2)):
                if not wide_launch(n, 0) and warps == 8:
                    want = run_cuda(quant_ext, x, t, b, act, pdl=pdl)
                    assert torch.equal(y, want), f"{what}: differs from its single launch ({n} channels)"


# (hidden, n1, n2, rows): 1.4b's QKV and h->4h, 20B's (two rows fill the shared memory), the default model's and a
# ragged pair (n not a multiple of 16)
NORM_PAIR_SHAPES = [(2048, 6144, 8192, (1, 3, 8)), (6144, 18432, 24576, (1, 2)), (512, 1536, 2048, (1, 8)),
                    (1024, 1000, 97, (1, 5))]


@pytest.mark.gpu
@pytest.mark.parametrize("warps", [0, 8])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tiled_norm_pair(quant_ext, dtype, fmt, warps):
    """The dual LayerNorm inside the pair's launch, the kernel at every size it takes (up to 16384 values of x; the
    op table sends it fewer, supports_tiled_norm_linear_pair): each output within the rule of the reference op (LN1 /
    LN2, then the linear, in fp64, against the same ops at x's dtype), x with an offset far from its spread (the
    two-pass statistics) and random LayerNorm parameters, with and without PDL, at the default warps a block (4)
    and at 8."""
    bf16_or_skip(quant_ext, dtype)
    for h, n1, n2, rows_list in NORM_PAIR_SHAPES:
        w1, w2 = make_weight(fmt, n1, h, 128, dtype, seed=n1), make_weight(fmt, n2, h, 128, dtype, seed=n2 + 1)
        t1, t2 = tiled(w1), tiled(w2)
        b1 = randn(n1, seed=3).to("cuda", dtype)
        ln = [(randn(h, seed=10 + i) * (0.5 if i % 2 else 1) + (0 if i % 2 else 1)).to("cuda", dtype) for i in range(4)]
        for rows in rows_list:
            x = (randn(rows, h, seed=rows) * 2 + 30).to("cuda", dtype)
            pdl = rows % 2 == 1
            assert cuda_ops.supports_tiled_norm_linear_pair(x, *ln, 1e-5, t1, b1, None, t2, None, "gelu") == (
                rows * h <= cuda_ops.QUANT_NORM_AUTO_MAX_ELEMS)
            poison_allocator()
            q1, s1, g1 = cuda_ops._tiled_args(t1)
            q2, s2, g2 = cuda_ops._tiled_args(t2)
            y1, y2 = quant_ext.quant_linear_tiled_norm_pair(x, *ln, 1e-5, q1, s1, n1, g1, b1, 0, q2, s2, n2, g2, None,
                                                            1, 4 if fmt == "int4" else 8, pdl, warps)
            what = f"norm pair {fmt} {dtype} {rows} rows h {h}: {n1} + {n2} pdl {pdl} warps {warps}"
            d = (lambda t: None if t is None else t.double())
            for y, (lw, lb), w, b, act in ((y1, ln[:2], w1, b1, None), (y2, ln[2:], w2, None, "gelu")):
                ref64 = ops.linear_ref(ops.layernorm_ref(x.double(), lw.double(), lb.double(), 1e-5),
                                       w.dequantize(dtype).double(), d(b), act)
                assert_within_rule(y, ref64, ops.linear_ref(ops.layernorm_ref(x, lw, lb, 1e-5), w, b, act), what)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tiled_sum(quant_ext, dtype, fmt):
    """Two tiled linears of one output summed in one launch, with both biases and the residual: within the rule of
    the reference's sum (x1 W1^T + x2 W2^T + b1 + b2 + residual in fp64 against the reference op at x's dtype), on
    narrow layers (16 warps) and wide ones, k1 != k2, in both orders (b_first: x2's chunks first)."""
    bf16_or_skip(quant_ext, dtype)
    for n, k1, _, k2 in SUM_SHAPES:
        w1, w2 = make_weight(fmt, n, k1, 128, dtype, seed=k1), make_weight(fmt, n, k2, 128, dtype, seed=k2 + 1)
        t1, t2 = tiled(w1), tiled(w2)
        b1, b2 = randn(n, seed=3).to("cuda", dtype), randn(n, seed=4).to("cuda", dtype)
        for rows in FUSED_ROWS:
            x1, x2 = randn(rows, k1, seed=rows).to("cuda", dtype), randn(rows, k2, seed=rows + 9).to("cuda", dtype)
            res = randn(rows, n, seed=6).to("cuda", dtype)
            for bias1, bias2, residual, pdl, b_first in ((b1, b2, res, True, False), (None, None, None, False, False),
                                                         (None, b2, res, False, False), (b1, b2, res, True, True),
                                                         (None, b2, None, False, True)):
                assert cuda_ops.supports_tiled_linear_sum(x1, t1, x2, t2, bias1, bias2, residual)
                poison_allocator()
                q1, s1, g1 = cuda_ops._tiled_args(t1)
                q2, s2, g2 = cuda_ops._tiled_args(t2)
                got = quant_ext.quant_linear_tiled_sum(x1, q1, s1, g1, x2, q2, s2, g2, n, 4 if fmt == "int4" else 8,
                                                       bias1, bias2, residual, pdl, b_first)
                d = (lambda t: None if t is None else t.double())
                ref64 = ops.linear_sum_ref(x1.double(), w1.dequantize(dtype).double(), x2.double(),
                                           w2.dequantize(dtype).double(), d(bias1), d(bias2), d(residual))
                low = ops.linear_ref(x2, w2, bias2, residual=ops.linear_ref(x1, w1, bias1, residual=residual))
                assert_within_rule(got, ref64, low, f"sum {fmt} {dtype} {rows} rows {n}x({k1} + {k2}) bias "
                                                    f"{bias1 is not None} b_first {b_first}")


def assert_graph_replays_equal(chain, x, what):
    """``chain(x, pdl)`` (a tensor or a tuple of them) run eager without PDL, then with PDL captured in a CUDA graph
    on a copy of x: three replays each equal the eager run bit for bit."""
    want = chain(x, False)
    want = want if isinstance(want, tuple) else (want,)
    static_x = x.clone()
    chain(static_x, True)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static_x, True)
    out = out if isinstance(out, tuple) else (out,)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, w) for o, w in zip(out, want)), what


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_tiled_sum_norm(quant_ext, dtype, fmt):
    """The sum with the next layer's dual LayerNorm in its last block (quant_linear_tiled_sum_norm), at every row
    count the kernel takes (the op table sends it one): y bit for bit the plain sum's, LN1(y) and LN2(y) within the
    rule of the reference LayerNorm of that y (fp64 against torch's fp32 LayerNorm at y's dtype), y far from zero
    (the two-pass statistics) and random LayerNorm parameters, narrow layers (16 warps) and wide ones, with and
    without PDL; called twice in a row, so the second launch finds its ticket counter left at zero."""
    bf16_or_skip(quant_ext, dtype)
    bits = 4 if fmt == "int4" else 8
    for n, k1, _, k2 in SUM_SHAPES:
        w1, w2 = make_weight(fmt, n, k1, 128, dtype, seed=k1), make_weight(fmt, n, k2, 128, dtype, seed=k2 + 1)
        t1, t2 = tiled(w1), tiled(w2)
        q1, s1, g1 = cuda_ops._tiled_args(t1)
        q2, s2, g2 = cuda_ops._tiled_args(t2)
        b1, b2 = randn(n, seed=3).to("cuda", dtype), randn(n, seed=4).to("cuda", dtype)
        ln = [(randn(n, seed=10 + i) * (0.5 if i % 2 else 1) + (0 if i % 2 else 1)).to("cuda", dtype) for i in range(4)]
        for rows in FUSED_ROWS:
            x1, x2 = randn(rows, k1, seed=rows).to("cuda", dtype), randn(rows, k2, seed=rows + 9).to("cuda", dtype)
            res = (randn(rows, n, seed=6) * 2 + 30).to("cuda", dtype)
            pair_normalises = cuda_ops.QUANT_FUSED == 2 and rows * n <= cuda_ops.QUANT_NORM_AUTO_MAX_ELEMS
            assert cuda_ops.supports_tiled_linear_sum_norm(x1, t1, x2, t2, b1, b2, res, *ln, 1e-5) == (
                (cuda_ops.SUM_NORM == 2 or (cuda_ops.SUM_NORM == 3 and not pair_normalises))
                and rows <= cuda_ops.SUM_NORM_MAX_ROWS)
            for pdl in (rows % 2 == 1, True):
                poison_allocator()
                y, a, m = quant_ext.quant_linear_tiled_sum_norm(x1, q1, s1, g1, x2, q2, s2, g2, n, bits, b1, b2, res,
                                                                *ln, 1e-5, pdl)
                want = quant_ext.quant_linear_tiled_sum(x1, q1, s1, g1, x2, q2, s2, g2, n, bits, b1, b2, res, pdl)
                what = f"sum norm {fmt} {dtype} {rows} rows {n}x({k1} + {k2}) pdl {pdl}"
                assert torch.equal(y, want), f"{what}: y differs from the plain sum's"
                for got, (lw, lb) in ((a, ln[:2]), (m, ln[2:])):
                    ref64 = ops.layernorm_ref(y.double(), lw.double(), lb.double(), 1e-5)
                    assert_within_rule(got, ref64, ops.layernorm_ref(y, lw, lb, 1e-5), f"{what} LayerNorm")


@pytest.mark.gpu
def test_cuda_sum_norm_graph_replay(quant_ext):
    """Two layers' sums with the next LayerNorms chained with PDL (the second's inputs the first's outputs) and
    captured in a CUDA graph: every replay equals the eager chain without PDL bit for bit (each launch's last block
    leaves the shared ticket at zero for the next)."""
    h = 2048
    for fmt, bits in (("int8", 8), ("int4", 4)):
        t_dense = tiled(make_weight(fmt, h, h, 128, torch.float16, 2))
        t_down = tiled(make_weight(fmt, h, 4 * h, 128, torch.float16, 3))
        q1, s1, g1 = cuda_ops._tiled_args(t_dense)
        q2, s2, g2 = cuda_ops._tiled_args(t_down)
        ln = [randn(h, seed=20 + i).to("cuda", torch.float16) for i in range(4)]
        x = randn(1, h).to("cuda", torch.float16)
        up = randn(1, 4 * h, seed=5).to("cuda", torch.float16)

        def chain(inp, pdl):
            y, a, m = quant_ext.quant_linear_tiled_sum_norm(inp, q1, s1, g1, up, q2, s2, g2, h, bits, None, None, inp,
                                                            *ln, 1e-5, pdl)
            return quant_ext.quant_linear_tiled_sum_norm(a, q1, s1, g1, up, q2, s2, g2, h, bits, None, None, m,
                                                         *ln, 1e-5, pdl)

        assert_graph_replays_equal(chain, x, fmt)


@pytest.mark.gpu
def test_cuda_fused_graph_replay(quant_ext):
    """The fused pair and sum chained with PDL and captured in a CUDA graph: every replay equals the eager chain
    without PDL bit for bit (the sums meet in a fixed order)."""
    for fmt in ("int8", "int4"):
        h = 2048
        t_qkv, t_up = tiled(make_weight(fmt, 3 * h, h, 128, torch.float16)), tiled(make_weight(fmt, 4 * h, h, 128,
                                                                                                 torch.float16, 1))
        t_dense, t_down = tiled(make_weight(fmt, h, h, 128, torch.float16, 2)), tiled(make_weight(fmt, h, 4 * h, 128,
                                                                                                    torch.float16, 3))
        x = randn(1, h).to("cuda", torch.float16)

        def chain(inp, pdl):
            qkv, up = quant_ext.quant_linear_tiled_pair(inp, *cuda_ops._tiled_args(t_qkv)[:2], 3 * h,
                                                        cuda_ops._tiled_args(t_qkv)[2], None, 0, inp,
                                                        *cuda_ops._tiled_args(t_up)[:2], 4 * h,
                                                        cuda_ops._tiled_args(t_up)[2], None, 2,
                                                        4 if fmt == "int4" else 8, pdl)
            q1, s1, g1 = cuda_ops._tiled_args(t_dense)
            q2, s2, g2 = cuda_ops._tiled_args(t_down)
            return quant_ext.quant_linear_tiled_sum(qkv[:, :h].contiguous(), q1, s1, g1, up, q2, s2, g2, h,
                                                    4 if fmt == "int4" else 8, None, None, inp, pdl)

        assert_graph_replays_equal(chain, x, fmt)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_sum_b_first_layer_graph_replay(quant_ext, fmt):
    """A decode layer's chain as the model runs it with NEOX_RT_SUM_B_FIRST=1: the fused pair, rotary decode
    attention launched with pdl_late (the sum may start only after attention's own wait), the sum reading the pair's
    4h output before its wait (b_first). Captured with PDL in a CUDA graph, every replay equals the eager chain
    without PDL bit for bit (attention's output and the caches too), and the sum equals the a-first sum within fp16
    rounding (the same sums in another order)."""
    h, nh, hd, rd, cap, pos_ = 2048, 16, 128, 32, 256, 100
    bits = 4 if fmt == "int4" else 8
    t_qkv, t_up = tiled(make_weight(fmt, 3 * h, h, 128, torch.float16)), tiled(make_weight(fmt, 4 * h, h, 128,
                                                                                             torch.float16, 1))
    t_dense, t_down = tiled(make_weight(fmt, h, h, 128, torch.float16, 2)), tiled(make_weight(fmt, h, 4 * h, 128,
                                                                                                torch.float16, 3))
    qa, qb = cuda_ops._tiled_args(t_qkv), cuda_ops._tiled_args(t_up)
    q1, s1, g1 = cuda_ops._tiled_args(t_dense)
    q2, s2, g2 = cuda_ops._tiled_args(t_down)
    kc = randn(1, nh, cap, hd, seed=11, scale=0.5).to("cuda", torch.float16)
    vc = randn(1, nh, cap, hd, seed=12).to("cuda", torch.float16)
    positions = torch.tensor([[pos_]], device="cuda")
    seqlens = torch.tensor([pos_ + 1], device="cuda")
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd))
    ang = torch.outer(torch.arange(cap, dtype=torch.float32), inv)
    cos, sin = ang.cos().to("cuda"), ang.sin().to("cuda")
    x = randn(1, h, seed=13).to("cuda", torch.float16)

    def chain(inp, pdl, b_first=True):
        qkv, up = quant_ext.quant_linear_tiled_pair(inp, qa[0], qa[1], 3 * h, qa[2], None, 0, inp, qb[0], qb[1],
                                                    4 * h, qb[2], None, 2, bits, pdl)
        ctx = quant_ext.rotary_decode_attention(qkv.view(1, 1, 3 * h), positions, cos, sin, rd, kc, vc, seqlens,
                                                hd ** -0.5, pdl, 0, False, 0, b_first)
        y = quant_ext.quant_linear_tiled_sum(ctx.view(1, h), q1, s1, g1, up, q2, s2, g2, h, bits, None, None, inp,
                                             pdl, b_first)
        return ctx, y, kc.clone()

    assert_graph_replays_equal(chain, x, fmt)
    _, y_b, _ = chain(x, False)
    _, y_a, _ = chain(x, False, False)
    assert torch.isfinite(y_b).all()
    torch.testing.assert_close(y_b, y_a, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_quantized_graph_decode_b_first(quant_ext, monkeypatch, fmt):
    """The embedded default model, quantized, decoding through CUDA graphs (the pair, rotary decode attention and the
    sum chained with PDL, as a token runs): with NEOX_RT_SUM_B_FIRST=1 the teacher-forced logits equal those of the
    eager decode without PDL bit for bit (the same kernels in the same order, each starting after the one before it
    has finished: the graph's sums, reading the 4h output before their wait, see what they see there), and the
    default order's graph logits within fp16 rounding."""
    import neox_rt
    from neox_rt.default_model import DEFAULT_MODEL_DIR
    from neox_rt.engine.graphs import DecodeGraphRunner
    from tests.conftest import teacher_forced_logits

    monkeypatch.delenv("NEOX_RT_BACKEND", raising=False)
    monkeypatch.delenv("NEOX_RT_OP_BACKENDS", raising=False)
    gen = torch.Generator().manual_seed(8)
    prompt = torch.randint(0, 512, (13,), generator=gen).tolist()
    cont = torch.randint(0, 512, (13,), generator=gen).tolist()

    def teacher_forced(model, graphs):
        runner = DecodeGraphRunner(model) if graphs else None
        logits = teacher_forced_logits(model, prompt, cont, runner)
        if runner is not None:
            assert runner.captures == 1 and runner.disabled_reason is None, runner.disabled_reason
        return logits

    try:
        ops.select_backend(None, "cuda")
        model = neox_rt.load(DEFAULT_MODEL_DIR, dtype="float16", device="cuda", quantize=fmt, progress=False).model
        if not bf16_kernels():
            pytest.skip("the fused quantized sum needs kernels built for sm_80 or newer")
        with torch.no_grad():
            monkeypatch.setattr(cuda_ops, "SUM_B_FIRST", True)
            graph_b = teacher_forced(model, True)
            pdl = cuda_ops.PDL
            monkeypatch.setattr(cuda_ops, "PDL", False)
            eager_b = teacher_forced(model, False)
            monkeypatch.setattr(cuda_ops, "PDL", pdl)
            monkeypatch.setattr(cuda_ops, "SUM_B_FIRST", False)
            graph_a = teacher_forced(model, True)
    finally:
        ops.select_backend("torch")
    assert torch.isfinite(graph_b).all()
    assert torch.equal(graph_b, eager_b), f"{fmt}: graph decode (PDL) and eager decode (no PDL) differ with b_first"
    err = (graph_b - graph_a).abs().max().item()
    assert err <= 1e-2 * graph_a.abs().max().item(), f"{fmt}: b_first vs default order {err}"
    assert (graph_b.argmax(-1) == graph_a.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.gpu
def test_cuda_fused_bad_input_raises(quant_ext):
    """quant_linear_tiled_pair / _sum's own checks, one RuntimeError each."""
    t8 = tiled(make_weight("int8", 40, 256, 0, torch.float16))
    t4 = tiled(make_weight("int4", 40, 256, 128, torch.float16))
    x = randn(2, 256).to("cuda", torch.float16)
    pair, fsum = quant_ext.quant_linear_tiled_pair, quant_ext.quant_linear_tiled_sum
    with pytest.raises(RuntimeError, match="at most 8 rows"):
        x9 = randn(9, 256).to("cuda", torch.float16)
        pair(x9, t8.qweight, t8.scales, 40, 0, None, 0, x9, t8.qweight, t8.scales, 40, 0, None, 0, 8, False)
    with pytest.raises(RuntimeError, match=r"takes warps 0 \(auto\), 8 or 4, got 5"):
        pair(x, t8.qweight, t8.scales, 40, 0, None, 0, x, t8.qweight, t8.scales, 40, 0, None, 0, 8, False, 5)
    with pytest.raises(RuntimeError, match="same leading shape"):
        fsum(x, t8.qweight, t8.scales, 0, x[:1], t8.qweight, t8.scales, 0, 40, 8, None, None, None, False)
    if bf16_kernels():
        t8b = tiled(make_weight("int8", 40, 256, 0, torch.bfloat16))
        with pytest.raises(RuntimeError, match="one dtype"):
            pair(x, t8.qweight, t8.scales, 40, 0, None, 0, x.bfloat16(), t8b.qweight, t8b.scales, 40, 0, None, 0, 8,
                 False)
    with pytest.raises(RuntimeError, match="qweight must be Char"):  # an int4 weight named as int8
        pair(x, t8.qweight, t8.scales, 40, 0, None, 0, x, t4.qweight, t4.scale_zero, 40, 128, None, 0, 8, False)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        fsum(x, t4.qweight, t4.scale_zero, 128, x, t4.qweight, t4.scale_zero, 128, 40, 4, None, None,
             randn(2, 41).to("cuda", torch.float16), False)
    norm_pair = quant_ext.quant_linear_tiled_norm_pair
    ln = [torch.ones(256, device="cuda", dtype=torch.float16) for _ in range(4)]
    with pytest.raises(RuntimeError, match=r"LayerNorm parameters must have shape \[256\]"):
        norm_pair(x, *ln[:3], ln[3][:128], 1e-5, t8.qweight, t8.scales, 40, 0, None, 0, t8.qweight, t8.scales, 40, 0,
                  None, 0, 8, False)
    sum_norm = quant_ext.quant_linear_tiled_sum_norm
    with pytest.raises(RuntimeError, match=r"LayerNorm parameters must have shape \[40\]"):
        sum_norm(x, t8.qweight, t8.scales, 0, x, t8.qweight, t8.scales, 0, 40, 8, None, None, None, *ln, 1e-5, False)
    t_wide = tiled(make_weight("int8", 8200, 256, 0, torch.float16))
    ln_wide = [torch.ones(8200, device="cuda", dtype=torch.float16) for _ in range(4)]
    with pytest.raises(RuntimeError, match="normalises up to 8 rows of a multiple of 8 up to 8192 values"):
        sum_norm(x, t_wide.qweight, t_wide.scales, 0, x, t_wide.qweight, t_wide.scales, 0, 8200, 8, None, None, None,
                 *ln_wide, 1e-5, False)
    t_big = tiled(make_weight("int8", 40, 6144, 0, torch.float16))
    ln_big = [torch.ones(6144, device="cuda", dtype=torch.float16) for _ in range(4)]
    with pytest.raises(RuntimeError, match="normalises in shared memory at most 16384"):
        norm_pair(randn(3, 6144).to("cuda", torch.float16), *ln_big, 1e-5, t_big.qweight, t_big.scales, 40, 0, None,
                  0, t_big.qweight, t_big.scales, 40, 0, None, 0, 8, False)


@pytest.mark.gpu
def test_cuda_fused_op_table(quant_ext, monkeypatch):
    """The default selection on a GPU: linear_pair and linear_sum run the fp16 GEMV pair for tensor weights and the
    fused quantized kernels for tiled weights of one format at up to 8 rows; more rows, mixed formats or
    NEOX_RT_QUANT_FUSED=0 fall back to two linear ops, each still on the tiled kernel."""
    monkeypatch.delenv("NEOX_RT_BACKEND", raising=False)
    monkeypatch.delenv("NEOX_RT_OP_BACKENDS", raising=False)
    try:
        ops.select_backend(None, "cuda")
        pair, lsum = ops.OPS["linear_pair"], ops.OPS["linear_sum"]
        assert [impl for impl, _ in pair.impls] == [cuda_ops.linear_pair, cuda_ops.tiled_linear_pair]
        assert [impl for impl, _ in lsum.impls] == [cuda_ops.linear_sum, cuda_ops.tiled_linear_sum]
        t8 = tiled(make_weight("int8", 96, 2048, 0, torch.float16))
        t4 = tiled(make_weight("int4", 96, 2048, 128, torch.float16))
        x = randn(4, 2048).to("cuda", torch.float16)
        assert cuda_ops.supports_tiled_linear_sum(x, t8, x, t8) and cuda_ops.supports_tiled_linear_pair(
            x, t4, None, None, x, t4, None, "gelu")
        assert not cuda_ops.supports_tiled_linear_sum(x, t8, x, t4)                       # two formats
        x9 = randn(9, 2048).to("cuda", torch.float16)
        assert not cuda_ops.supports_tiled_linear_pair(x9, t4, None, None, x9, t4, None, None)  # 9 rows
        assert not cuda_ops.supports_linear_sum_push(x[:1], t8, x[:1], t8)                # no push for formats
        y_fused = lsum(x, t8, x, t8)
        monkeypatch.setattr(cuda_ops, "QUANT_FUSED", 0)
        assert not cuda_ops.supports_tiled_linear_sum(x, t8, x, t8)
        y_two = lsum(x, t8, x, t8)  # two launches, the first output the second's residual (two roundings)
        torch.testing.assert_close(y_fused, y_two, rtol=2e-3, atol=2e-3)
    finally:
        ops.select_backend("torch")


@pytest.mark.gpu
@pytest.mark.parametrize("sum_norm,b_first", [(0, False), (2, False), (0, True), (2, True), (3, True)])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_cuda_quantized_default_model(quant_ext, monkeypatch, fmt, sum_norm, b_first):
    """The embedded default model loaded with quantize= on the cuda backend: every linear of the layers tiled at load
    (row-major with NEOX_RT_QUANT_TILED=0), and the logits of its kernels equal the reference runtime's (dequantize,
    then matmul) on the same model within fp16 rounding, in both layouts: a 32-token prompt (32 rows, the kernels'
    range), 8 one-token sequences and one (8 rows and one: the decode configurations, where QKV and h->4h, dense and
    4h->h run as the fused pairs; with ``sum_norm`` 2 the one row's sums also normalise for the next layer (3, the
    default: not here, where the next pair normalises its 384 values itself); with ``b_first`` the sums read
    4h->h's chunks first, before their wait, and decode attention triggers them late)."""
    import neox_rt
    from neox_rt.default_model import DEFAULT_MODEL_DIR
    from neox_rt.model.layers import Linear

    monkeypatch.delenv("NEOX_RT_BACKEND", raising=False)
    monkeypatch.delenv("NEOX_RT_OP_BACKENDS", raising=False)
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 512, shape, generator=gen).to("cuda") for shape in ((1, 32), (8, 1), (1, 1))]
    tiled_types = {"int8": TiledInt8Weight, "int4": TiledInt4Weight}
    row_types = {"int8": Int8Weight, "int4": Int4Weight}
    logits = {}
    try:
        for layout in ("tiled", "row-major"):
            monkeypatch.setattr(cuda_ops, "QUANT_TILED", int(layout == "tiled"))
            monkeypatch.setattr(cuda_ops, "SUM_NORM", sum_norm)
            monkeypatch.setattr(cuda_ops, "SUM_B_FIRST", b_first)
            ops.select_backend(None, "cuda")
            neox = neox_rt.load(DEFAULT_MODEL_DIR, dtype="float16", device="cuda", quantize=fmt, progress=False)
            kinds = {type(m.weight) for m in neox.model.gpt_neox.layers.modules() if isinstance(m, Linear)}
            # below sm_80 (the "7.5+PTX" build) nothing is tiled
            assert kinds == {(tiled_types if layout == "tiled" and bf16_kernels() else row_types)[fmt]}, (layout,
                                                                                                          kinds)
            x = torch.zeros(1, 384, dtype=torch.float16, device="cuda")
            qkv = neox.model.gpt_neox.layers[0].attention.query_key_value.weight
            assert ops.OPS["linear"].served_by(x, qkv) == "cuda"
            layer0, layer1 = neox.model.gpt_neox.layers[:2]
            dense, down = layer0.attention.dense.weight, layer0.mlp.dense_4h_to_h.weight
            up = torch.zeros(1, down.in_features, dtype=torch.float16, device="cuda")
            ln1, ln2 = layer1.input_layernorm, layer1.post_attention_layernorm
            served = ops.OPS["linear_sum_norm"].served_by(x, dense, up, down, None, None, x, ln1.weight, ln1.bias,
                                                          ln2.weight, ln2.bias, ln1.eps)
            assert served == ("cuda" if sum_norm == 2 and layout == "tiled" and bf16_kernels() else "torch"), served
            with torch.no_grad():
                fast = [neox.logits(ids).float() for ids in batches]
                ops.select_backend("torch")
                ref = [neox.logits(ids).float() for ids in batches]
            for f, r in zip(fast, ref):
                assert torch.isfinite(f).all()
                err = (f - r).abs().max().item()
                assert err <= 1e-2 * r.abs().max().item(), f"{fmt} {layout}: max |cuda - reference| {err}"
                agree = (f.argmax(-1) == r.argmax(-1)).float().mean().item()
                assert agree >= 0.9, f"{fmt} {layout}: top-1 agreement {agree:.3f}"
            logits[layout] = fast
            del neox
    finally:
        ops.select_backend("torch")
    for t, r in zip(logits["tiled"], logits["row-major"]):
        assert (t - r).abs().max().item() <= 1e-2 * r.abs().max().item()
