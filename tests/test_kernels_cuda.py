"""The CUDA extension ``neox_rt._C`` against the references in neox_rt/ops/reference.py.

GPU tests (``@pytest.mark.gpu``) compare every kernel with its reference on awkward shapes. Tolerance rule
(house style): the kernel's max error against an fp64 reference is at most twice PyTorch's own error at the
same dtype (the reference op, or plain torch math, run on the same low-precision inputs); pure data movement
must be exact. Outputs are NaN-poisoned before each call; inputs are random, never zero. CPU tests check the
sources of the compile check exist and that a missing extension falls back to torch with one warning.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from neox_rt.engine.kv_cache import KVCache
from neox_rt import ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_HEADERS = ["common.cuh", "softmax.cuh", "rotary_kv_write.cuh", "decode_attention.cuh", "layernorm.cuh",
                  "gemv.cuh", "gemv_fused.cuh"]
DTYPES = [torch.float16, torch.bfloat16]
HEAD_SIZES = [32, 64, 80, 96, 128, 256]
ROTARY = {32: 8, 64: 16, 80: 20, 96: 24, 128: 32, 256: 64}  # rotary_pct 0.25 as in the family
CACHE_LENGTHS = [1, 17, 2047, 4096]
SEQ_LENGTHS = [1, 7, 83]
HIDDEN = [512, 1000, 2560, 6144, 7]  # 1000 / 7: not a multiple of the vector width
GEMV_SHAPES = [(1, 2048, 6144), (1, 6144, 24576), (3, 4096, 4096), (16, 256, 1024), (5, 331, 2560)]  # (m, out, in)


# ----------------------------------------------------------------------------------------------------
# CPU tests (run in CI)
# ----------------------------------------------------------------------------------------------------

def test_compile_check_sources_exist():
    check = os.path.join(REPO, "csrc", "standalone", "compile_check.cu")
    script = os.path.join(REPO, "scripts", "compile_cuda.sh")
    assert os.access(script, os.X_OK), "scripts/compile_cuda.sh must be executable (.ci/run calls it)"
    text = open(check).read()
    for h in KERNEL_HEADERS[1:]:
        assert os.path.isfile(os.path.join(REPO, "csrc", "kernels", h)), h
        assert f'#include "kernels/{h}"' in text, f"compile_check.cu does not include {h}"
    for f in ("csrc/bindings.cpp", "csrc/ops/ops.cu", "csrc/ops/ops.h", "CMakeLists.txt"):
        assert os.path.isfile(os.path.join(REPO, f)), f
    # Every op registered in bindings.cpp has a Python wrapper and a fake implementation.
    bindings = open(os.path.join(REPO, "csrc", "bindings.cpp")).read()
    cuda_ops_src = open(os.path.join(REPO, "neox_rt", "ops", "cuda.py")).read()
    for name in ("scaled_causal_softmax", "rotary_kv_write", "decode_attention", "rotary_decode_attention",
                 "layernorm", "dual_layernorm", "gemv"):
        assert f'm.impl("{name}"' in bindings
        assert f'register_fake("neox_rt::{name}")' in cuda_ops_src


def _extension_built() -> bool:
    try:
        import neox_rt._C  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_extension_built(), reason="the extension is built here; the fallback needs it missing")
def test_missing_extension_falls_back_with_one_warning(caplog):
    ops.reset()
    try:
        with caplog.at_level(logging.WARNING, logger="neox_rt"):
            assert ops.select_backend("cuda") == "torch"
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert "cuda backend unavailable" in warnings[0].getMessage()
        assert "neox_rt._C" in warnings[0].getMessage()
        assert all(op.impl is None for op in ops.OPS.values())
    finally:
        ops.reset()


def test_supports_rejects_cpu_tensors():
    from neox_rt.ops import cuda as cuda_ops
    x = torch.randn(2, 64)
    w = torch.randn(64)
    assert not cuda_ops.supports_layernorm(x, w, w, 1e-5)
    assert not cuda_ops.supports_linear(x.half(), torch.randn(8, 64).half())
    q = torch.randn(1, 2, 64)
    cache = torch.randn(1, 2, 8, 64)
    assert not cuda_ops.supports_decode_attention(q, cache, cache, torch.tensor([3]), 0.1)


def test_rotary_decode_attention_predicate_and_fallback(monkeypatch):
    """The fused op's predicate refuses CPU tensors, a step of more than one token and NEOX_RT_DECODE_ROTARY_FUSED=0;
    its fallback (on CPU: the reference ops) writes the caches at the new slots as rotary_kv_write does and returns
    decode_attention over them."""
    from neox_rt.ops import cuda as cuda_ops
    b, nh, hd, rd, T = 3, 2, 32, 8, 12
    cos, sin = ops.rotary_tables(rd, 64, 10000.0, "cpu")
    qkv = torch.randn(b, 1, nh * 3 * hd)
    pos = torch.tensor([[0], [5], [T - 1]])
    seqlens = torch.tensor([1, 6, T])
    kc, vc = torch.randn(b, nh, T, hd), torch.randn(b, nh, T, hd)
    args = (qkv, pos, cos, sin, rd, kc, vc, seqlens, hd ** -0.5)
    assert not cuda_ops.supports_rotary_decode_attention(*args)
    k_ref, v_ref = kc.clone(), vc.clone()
    out = ops.OPS["rotary_decode_attention"](*args)
    q = ops.rotary_kv_write_ref(qkv, pos, cos, sin, rd, k_ref, v_ref)
    assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref)
    assert torch.equal(out, ops.decode_attention_ref(q[:, 0], k_ref, v_ref, seqlens, hd ** -0.5))
    assert out.shape == (b, nh, hd)
    assert not torch.equal(kc[0, :, 0], torch.zeros(nh, hd))
    monkeypatch.setattr(cuda_ops, "DECODE_ROTARY_FUSED", 0)
    assert not cuda_ops.supports_rotary_decode_attention(*args)


# ----------------------------------------------------------------------------------------------------
# GPU tests
# ----------------------------------------------------------------------------------------------------

def rand(*shape, dtype=torch.float16, scale=1.0, device="cuda"):
    """Random normal values, never zero (zeros hide missing writes and wrong scales)."""
    x = torch.randn(*shape, device=device, dtype=torch.float64) * scale
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3), x)
    return x.to(dtype)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_by_rule(out, ref64, torch_out, what):
    """Kernel error vs fp64 at most 2x PyTorch's own error at the same dtype, and every element finite."""
    assert torch.isfinite(out).all(), f"{what}: non-finite output (unwritten poisoned element?)"
    e_kernel, e_torch = max_err(out, ref64), max_err(torch_out, ref64)
    # Floor: when PyTorch happens to be exact, allow one rounding step of the output dtype.
    floor = torch.finfo(out.dtype).eps * ref64.abs().max().item()
    assert e_kernel <= 2 * e_torch + floor, f"{what}: error {e_kernel:.3g} > 2 x torch {e_torch:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [1, 17, 2047, 4096])
@pytest.mark.parametrize("s", [1, 7])
def test_scaled_causal_softmax(ext, dtype, t, s):
    b, nh, scale = 2, 3, 0.125
    scores = rand(b, nh, s, t, dtype=dtype, scale=8.0)
    # Queries at the end of the rows, and one row offset so that part of a row is masked past s.
    qpos = (torch.arange(s, device="cuda") + max(t - s, 0))[None].repeat(b, 1)
    qpos[1] -= min(qpos[1].min().item(), 3)
    out = ext.scaled_causal_softmax(scores, qpos, scale)
    ref64 = ops.scaled_causal_softmax_ref(scores.double(), qpos, scale)
    mask = torch.arange(t, device="cuda")[None, None, None, :] > qpos[:, None, :, None]
    native = torch.softmax((scores * scale).masked_fill(mask, float("-inf")), dim=-1)  # torch at dtype
    assert out.dtype == dtype and out.shape == scores.shape
    assert_by_rule(out, ref64, native, f"softmax t={t} s={s}")
    assert (out.masked_select(mask) == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", HEAD_SIZES)
@pytest.mark.parametrize("s", SEQ_LENGTHS)
def test_rotary_kv_write(ext, dtype, hd, s):
    b, nh, B, T, max_pos = 3, 4, 4, 160, 256
    rd = ROTARY[hd]
    cos, sin = ops.rotary_tables(rd, max_pos, 10000.0, "cuda")
    qkv = rand(b, s, nh * 3 * hd, dtype=dtype)
    positions = torch.arange(s, device="cuda")[None] + torch.tensor([0, 5, 70], device="cuda")[:, None]  # [b, s]
    k_cache = torch.full((B, nh, T, hd), float("nan"), device="cuda", dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = ext.rotary_kv_write(qkv, positions, cos, sin, rd, k_cache, v_cache)
    q_ref = ops.rotary_kv_write_ref(qkv, positions, cos, sin, rd, k_ref, v_ref)
    k64, v64 = k_ref.double(), v_ref.double()
    q64 = ops.rotary_kv_write_ref(qkv.double(), positions, cos.double(), sin.double(), rd, k64, v64)
    assert q.shape == (b, s, nh, hd) and q.dtype == dtype
    assert_by_rule(q, q64, q_ref, f"rotary q hd={hd}")
    written = ~torch.isnan(k_ref)
    assert torch.equal(written, ~torch.isnan(k_cache)), "k written at the wrong slots"
    assert torch.equal(torch.isnan(v_cache), torch.isnan(v_ref)), "v written at the wrong slots"
    assert_by_rule(k_cache[written], k64[written], k_ref[written], f"rotary k hd={hd}")
    assert torch.equal(v_cache[written], v_ref[written]), "v is pure data movement: must be exact"


@pytest.mark.gpu
def test_rotary_kv_write_strided_vectors(ext):
    """rotary_ndims/2 not a multiple of 8 (2.8b: 10) and rotary on the whole head."""
    for hd, rd in ((80, 20), (64, 64), (96, 0)):
        cos, sin = ops.rotary_tables(rd, 64, 10000.0, "cuda")
        qkv = rand(1, 5, 2 * 3 * hd)
        pos = torch.arange(5, device="cuda")[None]
        kc, vc = (torch.full((1, 2, 8, hd), float("nan"), device="cuda", dtype=torch.float16) for _ in range(2))
        kr, vr = kc.clone(), vc.clone()
        q = ext.rotary_kv_write(qkv, pos, cos, sin, rd, kc, vc)
        qr = ops.rotary_kv_write_ref(qkv, pos, cos, sin, rd, kr, vr)
        # fp32 math in both; at most a one-ulp difference from fused multiply-adds
        torch.testing.assert_close(q, qr, atol=0, rtol=2 ** -10)
        torch.testing.assert_close(kc, kr, atol=0, rtol=2 ** -10, equal_nan=True)
        assert torch.equal(vc.nan_to_num(), vr.nan_to_num())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", HEAD_SIZES)
@pytest.mark.parametrize("T", CACHE_LENGTHS)
def test_decode_attention(ext, dtype, hd, T):
    b, nh, B = 3, 4, 4
    q = rand(b, nh, hd, dtype=dtype)
    k_cache = rand(B, nh, T, hd, dtype=dtype)
    v_cache = rand(B, nh, T, hd, dtype=dtype)
    seqlens = torch.tensor([T, max(1, T // 2 + 1), max(1, T - 3)], device="cuda")
    out = ext.decode_attention(q, k_cache, v_cache, seqlens, hd ** -0.5)
    ref = ops.decode_attention_ref(q, k_cache, v_cache, seqlens, hd ** -0.5)
    ref64 = ops.decode_attention_ref(q.double(), k_cache.double(), v_cache.double(), seqlens, hd ** -0.5)
    assert out.shape == q.shape and out.dtype == dtype
    assert_by_rule(out, ref64, ref, f"decode hd={hd} T={T}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("hd", [64, 96, 256])
@pytest.mark.parametrize("blocks_per_sm,merge_kernel,pdl,variant,by_len", [
    (1, False, False, 1, False), (1, False, True, 2, False), (4, True, False, 2, False), (64, False, True, 1, False),
    (64, True, True, 2, False), (0, False, True, 0, False), (0, False, True, 0, True), (4, True, False, 2, True),
    (1, False, True, 1, True)])
def test_decode_attention_split_plans(ext, dtype, hd, blocks_per_sm, merge_kernel, pdl, variant, by_len):
    """Every split plan (1 block per SM: many steps per split; 64: one step, tens of splits), the in-kernel merge
    (last block of each head, ticket counters) and the separate merge kernel, PDL on and off, single-buffered
    (variant 1) and pipelined (2) steps, the splits over the capacity or over each length (``by_len``,
    NEOX_RT_DECODE_SPLIT_BY_LEN); a batch of 13 sequences of different lengths, one of them inside the first split
    and one at the full capacity."""
    from neox_rt.ops import cuda as cuda_ops
    b, nh, T = 13, 5, 2047
    q = rand(b, nh, hd, dtype=dtype)
    kc, vc = rand(b + 1, nh, T, hd, dtype=dtype), rand(b + 1, nh, T, hd, dtype=dtype)
    seqlens = torch.tensor([T, 1, 2, 17, 64, 65, 127, 128, 129, 1000, 2046, 333, 1500], device="cuda")
    ref = ops.decode_attention_ref(q, kc, vc, seqlens, hd ** -0.5)
    ref64 = ops.decode_attention_ref(q.double(), kc.double(), vc.double(), seqlens, hd ** -0.5)
    saved = cuda_ops.PDL, cuda_ops.DECODE_SPLIT_BY_LEN
    try:
        cuda_ops.PDL, cuda_ops.DECODE_SPLIT_BY_LEN = pdl, int(by_len)
        for _ in range(3):  # repeated launches: the ticket counters must be back at zero after each
            out = cuda_ops.decode_attention(q, kc, vc, seqlens, hd ** -0.5, blocks_per_sm=blocks_per_sm,
                                            merge_kernel=merge_kernel, variant=variant)
            what = (f"decode {dtype} hd={hd} plan={blocks_per_sm} merge={merge_kernel} variant={variant} "
                    f"by_len={by_len}")
            if dtype == torch.float32:  # fp32: exp2 and summation order differ from torch's; no 2x rule there
                torch.testing.assert_close(out.double(), ref64, rtol=1e-4, atol=1e-5, msg=what)
            else:
                assert_by_rule(out, ref64, ref, what)
    finally:
        cuda_ops.PDL, cuda_ops.DECODE_SPLIT_BY_LEN = saved


@pytest.mark.gpu
@pytest.mark.parametrize("merge_kernel,variant", [(False, 1), (True, 2)])
def test_decode_attention_long_cache_caps_splits(ext, merge_kernel, variant):
    """One head over a 40000-slot cache with a plan that asks for thousands of splits: the planner caps them at
    256 (the merge keeps one weight per split in shared memory) and the result still follows the rule."""
    from neox_rt.ops import cuda as cuda_ops
    q, kc, vc = rand(1, 1, 64), rand(1, 1, 40000, 64), rand(1, 1, 40000, 64)
    for L in (40000, 39999, 300):
        sl = torch.tensor([L], device="cuda")
        out = cuda_ops.decode_attention(q, kc, vc, sl, 0.125, blocks_per_sm=64, merge_kernel=merge_kernel,
                                        variant=variant)
        ref = ops.decode_attention_ref(q, kc, vc, sl, 0.125)
        ref64 = ops.decode_attention_ref(q.double(), kc.double(), vc.double(), sl, 0.125)
        assert_by_rule(out, ref64, ref, f"long cache L={L}")


@pytest.mark.gpu
def test_decode_attention_empty_sequence_is_zero(ext):
    """seqlens 0 (nothing to attend to) gives zeros, not NaN, in one split or many, the splits over the capacity or
    over each length."""
    q, kc, vc = rand(2, 3, 96), rand(2, 3, 700, 96), rand(2, 3, 700, 96)
    for bps in (1, 64):
        for by_len in (False, True):
            out = torch.ops.neox_rt.decode_attention(q, kc, vc, torch.tensor([0, 700], device="cuda"), 0.1, False,
                                                     bps, False, 0, False, by_len)
            assert torch.equal(out[0], torch.zeros_like(out[0]))
            assert torch.isfinite(out[1]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("by_len", [False, True])
def test_decode_attention_cuda_graph(ext, by_len):
    """Captured once, replayed with other seqlens: no host sync, grid independent of seqlens (the splits over the
    capacity, or over each length: ``by_len``)."""
    q = rand(2, 4, 96)
    kc, vc = rand(2, 4, 600, 96), rand(2, 4, 600, 96)
    seqlens = torch.tensor([5, 9], device="cuda")
    args = (False, 0, False, 0, False, by_len)
    ext.decode_attention(q, kc, vc, seqlens, 0.1, *args)  # warm up outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ext.decode_attention(q, kc, vc, seqlens, 0.1, *args)
    for lens in ([1, 600], [333, 77]):
        seqlens.copy_(torch.tensor(lens))
        g.replay()
        ref = ops.decode_attention_ref(q, kc, vc, seqlens, 0.1)
        ref64 = ops.decode_attention_ref(q.double(), kc.double(), vc.double(), seqlens, 0.1)
        assert_by_rule(out, ref64, ref, f"graph replay {lens}")


def _rotary_decode_case(dtype, hd, b=7, nh=3, T=700, max_pos=1024):
    """A decode step's inputs: each new token at the end of its sequence (positions 0, inside the first split, at
    split-ish boundaries, the last slot), one past the cache (not written; its length the capacity) and one inside
    a longer sequence (its slot rewritten, keys after it); random old cache contents."""
    rd = ROTARY[hd]
    cos, sin = ops.rotary_tables(rd, max_pos, 10000.0, "cuda")
    qkv = rand(b, 1, nh * 3 * hd, dtype=dtype)
    p = torch.tensor([0, 3, 127, 128, T - 1, T + 5, 50][:b], device="cuda")
    seqlens = torch.tensor([1, 4, 128, 129, T, T, 300][:b], device="cuda")
    kc, vc = rand(b + 1, nh, T, hd, dtype=dtype), rand(b + 1, nh, T, hd, dtype=dtype)
    return qkv, p[:, None].contiguous(), cos, sin, rd, kc, vc, seqlens


def _rotary_decode_ref(qkv, pos, cos, sin, rd, kc, vc, seqlens, scale, rows):
    """(the reference at the dtype, in fp64) of the rows whose new slot is inside the cache (their cache rows taken
    along: the reference writes batch row i to cache row i)."""
    kc, vc = kc[rows], vc[rows]
    k64, v64 = kc.double(), vc.double()
    q64 = ops.rotary_kv_write_ref(qkv[rows].double(), pos[rows], cos.double(), sin.double(), rd, k64, v64)
    ref64 = ops.decode_attention_ref(q64[:, 0], k64, v64, seqlens[rows], scale)
    kr, vr = kc.clone(), vc.clone()
    qr = ops.rotary_kv_write_ref(qkv[rows], pos[rows], cos, sin, rd, kr, vr)
    return ops.decode_attention_ref(qr[:, 0], kr, vr, seqlens[rows], scale), ref64


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES + [torch.float32])
@pytest.mark.parametrize("hd", HEAD_SIZES)
@pytest.mark.parametrize("blocks_per_sm,merge_kernel,pdl,variant,late,by_len", [
    (0, False, True, 0, False, False), (1, False, False, 1, False, False), (64, True, True, 2, False, False),
    (64, False, False, 2, False, False), (0, False, True, 0, True, False), (64, False, True, 2, True, False),
    (0, False, True, 0, True, True), (4, True, False, 2, False, True)])
def test_rotary_decode_attention(ext, dtype, hd, blocks_per_sm, merge_kernel, pdl, variant, late, by_len):
    """rotary_decode_attention (rotary + KV write inside decode attention) against rotary_kv_write, then
    decode_attention, with the same split plan: the caches bit for bit (slots outside the cache untouched); the output
    bit for bit where the new token is not its sequence's last (the block writes it, then reads it back) or not in the
    cache, and by the rule against the fp64 reference everywhere (the last key taken from shared memory: its terms
    summed in another order). Every head size (rotary dims 8-64, partners not vector-aligned at 80 and 96), one split
    or many, both merges, PDL on and off, both step schemes; ``late``: both kernels launched with pdl_late (the next
    launch triggered after the blocks' wait, NEOX_RT_SUM_B_FIRST=1); ``by_len``: both split each sequence's length
    rather than the capacity (NEOX_RT_DECODE_SPLIT_BY_LEN=1)."""
    from neox_rt.ops import cuda as cuda_ops
    qkv, pos, cos, sin, rd, kc, vc, seqlens = _rotary_decode_case(dtype, hd)
    scale = hd ** -0.5
    saved = cuda_ops.PDL, cuda_ops.SUM_B_FIRST, cuda_ops.DECODE_SPLIT_BY_LEN
    try:
        cuda_ops.PDL, cuda_ops.SUM_B_FIRST, cuda_ops.DECODE_SPLIT_BY_LEN = pdl, late, int(by_len)
        k1, v1, k2, v2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
        q = cuda_ops.rotary_kv_write(qkv, pos, cos, sin, rd, k1, v1)
        out1 = cuda_ops.decode_attention(q[:, 0], k1, v1, seqlens, scale, blocks_per_sm=blocks_per_sm,
                                         merge_kernel=merge_kernel, variant=variant)
        for _ in range(2):  # repeated: the ticket counters are zero again after each launch
            out2 = cuda_ops.rotary_decode_attention(qkv, pos, cos, sin, rd, k2, v2, seqlens, scale,
                                                    blocks_per_sm=blocks_per_sm, merge_kernel=merge_kernel,
                                                    variant=variant)
            assert out2.shape == (qkv.shape[0], kc.shape[1], hd) and out2.dtype == dtype
            assert torch.equal(k2, k1) and torch.equal(v2, v1), f"hd={hd}: the caches differ"
            assert torch.equal(out2[5:], out1[5:]), f"hd={hd}: rows read back from the cache differ"
    finally:
        cuda_ops.PDL, cuda_ops.SUM_B_FIRST, cuda_ops.DECODE_SPLIT_BY_LEN = saved
    assert not torch.equal(k2, kc), "nothing written"
    # row 5's position is past the cache and row 7 is not in the batch: nothing written there
    assert torch.equal(k2[5], kc[5]) and torch.equal(v2[7], vc[7]), "a slot outside the cache was written"
    rows = [0, 1, 2, 3, 4, 6]  # the reference indexes the cache at the position
    ref, ref64 = _rotary_decode_ref(qkv, pos, cos, sin, rd, kc, vc, seqlens, scale, rows)
    if dtype == torch.float32:  # fp32: exp2 and summation order differ from torch's; no 2x rule there
        torch.testing.assert_close(out2[rows].double(), ref64, rtol=1e-4, atol=1e-5)
    else:
        assert_by_rule(out2[rows], ref64, ref, f"rotary decode hd={hd}")
        assert_by_rule(out1[rows], ref64, ref, f"two kernels hd={hd}")


@pytest.mark.gpu
def test_rotary_decode_attention_cuda_graph(ext):
    """Captured once, replayed with the next positions and lengths (graph inputs): each replay writes its new slot
    (as rotary_kv_write does, bit for bit) and attends over it."""
    from neox_rt.ops import cuda as cuda_ops
    qkv, pos, cos, sin, rd, kc, vc, seqlens = _rotary_decode_case(torch.float16, 96, b=2, T=600)
    pos.copy_(torch.tensor([[4], [8]]))
    seqlens.copy_(pos[:, 0] + 1)
    cuda_ops.rotary_decode_attention(qkv, pos, cos, sin, rd, kc, vc, seqlens, 0.1)  # warm up outside the capture
    torch.cuda.synchronize()
    k_ref, v_ref = kc.clone(), vc.clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = cuda_ops.rotary_decode_attention(qkv, pos, cos, sin, rd, kc, vc, seqlens, 0.1)
    for step in ([5, 9], [6, 599], [300, 10]):
        pos.copy_(torch.tensor(step)[:, None])
        seqlens.copy_(pos[:, 0] + 1)
        qkv.copy_(rand(*qkv.shape))
        before = k_ref.clone(), v_ref.clone()
        g.replay()
        ref, ref64 = _rotary_decode_ref(qkv, pos, cos, sin, rd, *before, seqlens, 0.1, [0, 1])
        cuda_ops.rotary_kv_write(qkv, pos, cos, sin, rd, k_ref, v_ref)
        assert torch.equal(kc, k_ref) and torch.equal(vc, v_ref), f"replay {step}: the caches differ"
        assert_by_rule(out, ref64, ref, f"graph replay {step}")


@pytest.mark.gpu
def test_rotary_decode_attention_bad_input(ext):
    """Shapes the kernel cannot take are refused with a message naming the problem."""
    qkv, pos, cos, sin, rd, kc, vc, seqlens = _rotary_decode_case(torch.float16, 64, b=2)
    with pytest.raises(RuntimeError, match="one new token a sequence"):
        ext.rotary_decode_attention(qkv.repeat(1, 2, 1), pos.repeat(1, 2), cos, sin, rd, kc, vc, seqlens, 0.1)
    with pytest.raises(RuntimeError, match="rotary_ndims"):
        ext.rotary_decode_attention(qkv, pos, cos, sin, rd + 1, kc, vc, seqlens, 0.1)
    with pytest.raises(RuntimeError, match="nh\\*3\\*hd"):
        ext.rotary_decode_attention(qkv[..., :-64].contiguous(), pos, cos, sin, rd, kc, vc, seqlens, 0.1)
    with pytest.raises(RuntimeError, match="positions"):
        ext.rotary_decode_attention(qkv, pos[:, 0].contiguous(), cos, sin, rd, kc, vc, seqlens, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", HIDDEN)
@pytest.mark.parametrize("rows", [1, 13])
@pytest.mark.parametrize("pdl", [False, True])
def test_layernorm_and_dual(ext, dtype, n, rows, pdl):
    x = rand(rows, n, dtype=dtype, scale=3.0) + 2  # a mean far from zero
    w1, b1, w2, b2 = (rand(n, dtype=dtype) for _ in range(4))
    out = ext.layernorm(x, w1, b1, 1e-5, pdl)
    ref = ops.layernorm_ref(x, w1, b1, 1e-5)
    ref64 = ops.layernorm_ref(x.double(), w1.double(), b1.double(), 1e-5)
    assert out.dtype == dtype
    assert_by_rule(out, ref64, ref, f"layernorm n={n}")
    o1, o2 = ext.dual_layernorm(x, w1, b1, w2, b2, 1e-5, pdl)
    assert torch.equal(o1, out)
    ref2 = ops.layernorm_ref(x, w2, b2, 1e-5)
    assert_by_rule(o2, ops.layernorm_ref(x.double(), w2.double(), b2.double(), 1e-5), ref2, f"dual n={n}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", GEMV_SHAPES)
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_fast"])
def test_gemv(ext, dtype, m, n, k, activation):
    from neox_rt.ops.cuda import ACTIVATIONS
    x = rand(m, k, dtype=dtype)
    w = rand(n, k, dtype=dtype, scale=k ** -0.5)
    bias = rand(n, dtype=dtype)
    out = ext.gemv(x, w, bias, ACTIVATIONS[activation])
    ref = ops.linear_ref(x, w, bias, activation)  # cuBLAS at the same dtype
    ref64 = ops.linear_ref(x.double(), w.double(), bias.double(), activation)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_by_rule(out, ref64, ref, f"gemv {m}x{n}x{k} {activation}")
    out3 = ext.gemv(x[None], w, None, 0)  # leading dims kept, no bias
    assert out3.shape == (1, m, n)
    assert_by_rule(out3, ops.linear_ref(x.double(), w.double())[None], ops.linear_ref(x, w)[None], "gemv no bias")


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(range(12)))  # GemvVariant in gemv.cuh
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("m,n,k", GEMV_SHAPES + [(1, 97, 1032), (2, 130, 4104), (1, 6, 16392), (2, 5, 8200),
                                                 (12, 45, 768), (9, 17, 384), (16, 1000, 6144), (2, 48, 2048),
                                                 (1, 301, 1536)])
def test_gemv_residual(ext, variant, pdl, m, n, k):
    """act(x W^T + b) + residual, the residual added in the epilogue, for both variants, with and without PDL."""
    dtype = torch.float16
    x = rand(m, k, dtype=dtype)
    w = rand(n, k, dtype=dtype, scale=k ** -0.5)
    bias, residual = rand(n, dtype=dtype), rand(m, n, dtype=dtype, scale=4.0)
    for activation, b in ((None, bias), (None, None), ("gelu_fast", bias)):
        from neox_rt.ops.cuda import ACTIVATIONS
        out = ext.gemv(x, w, b, ACTIVATIONS[activation], residual, variant, pdl)
        ref = ops.linear_ref(x, w, b, activation, residual=residual)
        ref64 = ops.linear_ref(x.double(), w.double(), None if b is None else b.double(), activation,
                               residual=residual.double())
        assert_by_rule(out, ref64, ref, f"gemv {m}x{n}x{k} {activation} residual v{variant} pdl={pdl}")


GEMV2_SHAPES = [  # (n1, k1, n2, k2): the 20B layer's pairs at TP=2 and TP=4, pythia-1.4b's, and awkward ones
    (9216, 6144, 12288, 6144), (4608, 6144, 6144, 6144), (6144, 2048, 8192, 2048), (301, 1040, 45, 4096),
    (6144, 3072, 6144, 12288), (2048, 2048, 2048, 8192), (77, 16, 77, 4112)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n1,k1,n2,k2", GEMV2_SHAPES)
@pytest.mark.parametrize("ksplit,min_blocks", [(0, 0), (2, 3), (4, 2), (8, 3), (8, 2), (2, 4)])
def test_gemv_pair(ext, dtype, n1, k1, n2, k2, ksplit, min_blocks):
    """Two single-row GEMVs in one launch against two references, with bias and activation, each problem its own;
    leading dims kept."""
    from neox_rt.ops.cuda import ACTIVATIONS
    x1, x2 = rand(1, 1, k1, dtype=dtype), rand(1, 1, k2, dtype=dtype)
    w1, w2 = rand(n1, k1, dtype=dtype, scale=k1 ** -0.5), rand(n2, k2, dtype=dtype, scale=k2 ** -0.5)
    b1, b2 = rand(n1, dtype=dtype), rand(n2, dtype=dtype)
    for act1, act2, bias1, bias2 in ((None, "gelu_fast", b1, b2), ("gelu", None, None, b2), ("relu", None, b1, None)):
        y1, y2 = ext.gemv_pair(x1, w1, bias1, ACTIVATIONS[act1], x2, w2, bias2, ACTIVATIONS[act2], ksplit,
                               min_blocks, True)
        assert y1.shape == (1, 1, n1) and y2.shape == (1, 1, n2) and y1.dtype == y2.dtype == dtype
        for y, x, w, b, act, name in ((y1, x1, w1, bias1, act1, "first"), (y2, x2, w2, bias2, act2, "second")):
            ref64 = ops.linear_ref(x.double(), w.double(), None if b is None else b.double(), act)
            assert_by_rule(y, ref64, ops.linear_ref(x, w, b, act), f"gemv_pair {name} {n1}x{k1}, {n2}x{k2} "
                           f"ksplit {ksplit} min_blocks {min_blocks} {act1}/{act2}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k1,k2", [(6144, 3072, 12288), (6144, 1536, 6144), (2048, 2048, 8192), (45, 4112, 16),
                                     (301, 1040, 4096)])
@pytest.mark.parametrize("ksplit,min_blocks", [(0, 0), (2, 3), (4, 2), (8, 3), (2, 4)])
def test_gemv_sum(ext, dtype, n, k1, k2, ksplit, min_blocks):
    """x1 W1^T + x2 W2^T + b1 + b2 + residual as one GEMV over the concatenated k, against the fp64 sum; every
    optional operand left out once."""
    x1, x2 = rand(1, k1, dtype=dtype), rand(1, k2, dtype=dtype)
    w1, w2 = rand(n, k1, dtype=dtype, scale=k1 ** -0.5), rand(n, k2, dtype=dtype, scale=k2 ** -0.5)
    b1, b2, res = rand(n, dtype=dtype), rand(n, dtype=dtype), rand(1, n, dtype=dtype, scale=4.0)
    for bias1, bias2, residual in ((b1, b2, res), (None, b2, res), (b1, None, None), (None, None, res)):
        y = ext.gemv_sum(x1, w1, x2, w2, bias1, bias2, residual, ksplit, min_blocks, True)
        assert y.shape == (1, n) and y.dtype == dtype

        def total(a, b, w_, v, c1, c2, r):
            out = a @ w_.T + b @ v.T
            for t in (c1, c2, r):
                out = out if t is None else out + t
            return out
        d = (lambda t: None if t is None else t.double())
        ref64 = total(x1.double(), x2.double(), w1.double(), w2.double(), d(bias1), d(bias2), d(residual))
        assert_by_rule(y, ref64, total(x1, x2, w1, w2, bias1, bias2, residual),
                       f"gemv_sum {n}x({k1}+{k2}) ksplit {ksplit} min_blocks {min_blocks}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k1,k2", [(6144, 6144, 24576), (2048, 2048, 8192), (512, 512, 2048), (8192, 1024, 2048),
                                     (56, 1040, 16)])
def test_gemv_sum_norm(ext, dtype, n, k1, k2):
    """gemv_sum with the next layer's dual LayerNorm in its last block: y bit for bit gemv_sum's, LN1(y) and LN2(y)
    within the rule of the reference LayerNorm of that y (y far from zero: the two-pass statistics), with and
    without PDL, twice in a row (the second launch finds its ticket at zero); a hidden size past 8192 or not a
    multiple of 8, and LayerNorm parameters of another shape, are clear errors."""
    x1, x2 = rand(1, k1, dtype=dtype), rand(1, k2, dtype=dtype)
    w1, w2 = rand(n, k1, dtype=dtype, scale=k1 ** -0.5), rand(n, k2, dtype=dtype, scale=k2 ** -0.5)
    b1, b2, res = rand(n, dtype=dtype), rand(n, dtype=dtype), rand(1, n, dtype=dtype, scale=4.0) + 20
    ln = [rand(n, dtype=dtype) * (0.5 if i % 2 else 1) + (0 if i % 2 else 1) for i in range(4)]
    for pdl in (False, True, True):
        y, a, m = ext.gemv_sum_norm(x1, w1, x2, w2, b1, b2, res, *ln, 1e-5, 0, 0, pdl)
        assert torch.equal(y, ext.gemv_sum(x1, w1, x2, w2, b1, b2, res, 0, 0, pdl)), f"{n}: y differs from gemv_sum's"
        for got, (lw, lb), name in ((a, ln[:2], "LN1"), (m, ln[2:], "LN2")):
            assert got.shape == y.shape and got.dtype == dtype
            ref64 = ops.layernorm_ref(y.double(), lw.double(), lb.double(), 1e-5)
            assert_by_rule(got, ref64, ops.layernorm_ref(y, lw, lb, 1e-5), f"gemv_sum_norm {name} {n} pdl={pdl}")
    with pytest.raises(RuntimeError, match=r"LayerNorm parameters must have shape \[%d\]" % n):
        ext.gemv_sum_norm(x1, w1, x2, w2, b1, b2, res, *ln[:3], ln[3][:8], 1e-5, 0, 0, True)


@pytest.mark.gpu
def test_gemv_sum_norm_bad_sizes(ext):
    for n in (8200, 60):
        x = rand(1, 64)
        w = rand(n, 64)
        ln = [rand(n) for _ in range(4)]
        with pytest.raises(RuntimeError, match="normalises out_features that are a multiple of 8 up to 8192"):
            ext.gemv_sum_norm(x, w, x, w, None, None, None, *ln, 1e-5, 0, 0, True)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_fused_pair_layer_chain_in_graph(ext, pdl):
    """The parallel-residual decode layer as the graph runs it with the fused pairs: dual LayerNorm, gemv_pair (QKV,
    h->4h + GeLU), rotary + KV write, decode attention, gemv_sum (dense + 4h->h + x), six layers captured with
    programmatic dependent launch. The sum reads h->4h's output three kernels later: a missing wait would read it
    stale. Replays must equal the chain run in plain stream order, bit for bit."""
    h, f, nh, hd, layers, pos = 1024, 4096, 8, 64, 6, 37
    cos, sin = ops.rotary_tables(16, 64, 10000.0, "cuda")
    ws = [tuple(rand(h) for _ in range(4)) + (rand(3 * nh * hd, h, scale=h ** -0.5), rand(f, h, scale=h ** -0.5),
                                              rand(h, nh * hd, scale=0.03), rand(h, f, scale=f ** -0.5), rand(f),
                                              rand(1, nh, 64, hd), rand(1, nh, 64, hd))
          for _ in range(layers)]
    positions, seqlens = torch.tensor([[pos]], device="cuda"), torch.tensor([pos + 1], device="cuda")
    x_static = rand(1, h)

    def chain(x, use_pdl):
        for g1, c1, g2, c2, qkv_w, up_w, dense_w, down_w, up_b, kc, vc in ws:
            a_in, m_in = ext.dual_layernorm(x, g1, c1, g2, c2, 1e-5, use_pdl)
            qkv, up = ext.gemv_pair(a_in, qkv_w, None, 0, m_in, up_w, up_b, 2, 0, 0, use_pdl)
            q = ext.rotary_kv_write(qkv[None], positions, cos, sin, 16, kc, vc, use_pdl)
            ctx = ext.decode_attention(q[:, 0], kc, vc, seqlens, hd ** -0.5, use_pdl).reshape(1, nh * hd)
            x = ext.gemv_sum(ctx, dense_w, up, down_w, None, None, x, 0, 0, use_pdl)
        return x

    assert_graph_replay_matches(chain, x_static, lambda: rand(1, h), pdl=pdl)


@pytest.mark.gpu
def test_fused_pair_routing(ext):
    """The op table sends the pairs to the fused kernels for one row only; more rows, odd k or mixed dtypes take
    the fallback (two linears)."""
    from neox_rt.ops import cuda as cuda_ops
    w1, w2, b = rand(64, 256), rand(32, 256), rand(64)
    x = rand(1, 256)
    assert cuda_ops.supports_linear_pair(x, w1, b, None, x, w2, None, "gelu")
    assert not cuda_ops.supports_linear_pair(rand(2, 256), w1, b, None, rand(2, 256), w2, None, "gelu")
    assert not cuda_ops.supports_linear_pair(x, w1, b, None, x.float(), w2.float(), None, "gelu")
    assert not cuda_ops.supports_linear_pair(rand(1, 264), rand(64, 264), None, None, x, w2, None, None)
    assert cuda_ops.supports_linear_sum(x, w1, rand(1, 128), rand(64, 128), b, None, rand(1, 64))
    assert not cuda_ops.supports_linear_sum(x, w1, x, w2, None, None, None)  # out_features differ
    assert not cuda_ops.supports_linear_sum(x, w1, x, w1, None, None, rand(1, 32))  # residual shape


def assert_graph_replay_matches(chain, x_static, fresh, pdl, trials=5):
    """Capture chain(x_static, pdl) in a CUDA graph (after a warm-up outside capture); then, `trials` times, load
    fresh() into x_static, replay, and require the output to equal chain run in plain stream order (no PDL) on a copy
    of the same input, bit for bit."""
    chain(x_static, pdl)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        with torch.cuda.graph(graph, stream=stream):
            y_static = chain(x_static, pdl)
    torch.cuda.current_stream().wait_stream(stream)
    for trial in range(trials):
        x_static.copy_(fresh())
        want = chain(x_static.clone(), False)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_static, want), f"replay {trial}: graph chain differs from the eager chain"


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 4])
def test_layernorm_gemv_chain_in_graph(ext, rows):
    """A parallel-residual block's chain (dual LayerNorm, two GEMVs reading its outputs, the next LayerNorm reading
    theirs) captured in a CUDA graph with programmatic dependent launch everywhere: each kernel starts before its
    predecessor ends, so a LayerNorm reading its x early (or through a stale cache line of a reused buffer) would
    differ. Replays must equal the chain run in plain stream order, bit for bit."""
    h, f, layers = 1024, 2048, 6
    ws = [tuple(rand(h, dtype=torch.float16) for _ in range(4)) + (rand(f, h, scale=h ** -0.5),
                                                                   rand(h, f, scale=f ** -0.5), rand(h, h, scale=0.03))
          for _ in range(layers)]
    x_static = rand(rows, h)

    def chain(x, pdl):
        for w1, b1, w2, b2, up_w, down_w, attn_w in ws:
            a_in, m_in = ext.dual_layernorm(x, w1, b1, w2, b2, 1e-5, pdl)
            a = ext.gemv(a_in, attn_w, None, 0, x, 0, pdl)  # attention stand-in + residual
            up = ext.gemv(m_in, up_w, None, 2, None, 0, pdl)
            x = ext.gemv(up, down_w, None, 0, a, 0, pdl)
        return x

    assert_graph_replay_matches(chain, x_static, lambda: rand(rows, h), pdl=True)


@pytest.mark.gpu
def test_gemv_routing_by_shape(ext):
    """The op table's CUDA GEMV: one row always; 2-16 rows only where the tensor-core tiles run (k % 64 == 0) and
    win (weights up to GEMV_MMA_MAX_WEIGHT elements); more rows never."""
    from neox_rt.ops import cuda as cuda_ops
    small, big = rand(256, 1024, dtype=torch.float16), torch.empty(18432, 6144, dtype=torch.float16, device="cuda")
    assert big.numel() > cuda_ops.GEMV_MMA_MAX_WEIGHT >= small.numel()
    for rows, w, want in ((1, small, True), (1, big, True), (4, small, True), (16, small, True), (4, big, False),
                          (17, small, False)):
        x = rand(rows, w.shape[1], dtype=torch.float16)
        assert cuda_ops.supports_linear(x, w) == (want and rows <= cuda_ops.GEMV_MAX_ROWS), (rows, w.shape)
    odd = rand(100, 1032, dtype=torch.float16)  # k % 64 != 0: the legacy configuration, slow above one row
    assert cuda_ops.supports_linear(rand(1, 1032, dtype=torch.float16), odd)
    assert not cuda_ops.supports_linear(rand(4, 1032, dtype=torch.float16), odd)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("rows", [1, 4, 16])  # the 8-warp single-row blocks; the tensor-core tiles
def test_gemv_chain_in_graph(ext, pdl, rows):
    """A chain of dependent GEMVs (each reads the previous output) captured in a CUDA graph: with programmatic
    dependent launch a kernel starts before its predecessor ends, so a missing wait would read stale input.
    The replay must equal the eager chain bit for bit, replay after replay, with fresh inputs each time."""
    h, f, layers = 1024, 4096, 6
    ws = [(rand(f, h, scale=h ** -0.5), rand(f), rand(h, f, scale=f ** -0.5), rand(h)) for _ in range(layers)]
    x_static = rand(rows, h)

    def chain(x, use_pdl):
        for w1, b1, w2, b2 in ws:
            up = ext.gemv(x, w1, b1, 2, None, 0, use_pdl)
            x = ext.gemv(up, w2, b2, 0, x, 0, use_pdl)  # residual: the input of this block
        return x

    assert_graph_replay_matches(chain, x_static, lambda: rand(rows, h), pdl=pdl)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", [64, 80, 96])
def test_prefill_attention(ext, dtype, hd):
    from neox_rt.ops import cuda as cuda_ops
    b, s, nh, T = 2, 37, 3, 64
    q = rand(b, s, nh, hd, dtype=dtype)
    kc, vc = rand(b, nh, T, hd, dtype=dtype), rand(b, nh, T, hd, dtype=dtype)
    positions = torch.arange(s, device="cuda")[None] + torch.tensor([0, 11], device="cuda")[:, None]
    out = cuda_ops.attention(q, kc, vc, positions, hd ** -0.5)
    ref64 = ops.attention_ref(q.double(), kc.double(), vc.double(), positions, hd ** -0.5)
    t = int(positions.max()) + 1  # plain torch at dtype (no fp32 upcast), as a user would write it
    scores = torch.einsum("bsnd,bntd->bnst", q, kc[:, :, :t]) * hd ** -0.5
    mask = torch.arange(t, device="cuda")[None, None, None] > positions[:, None, :, None]
    native = torch.einsum("bnst,bntd->bsnd", torch.softmax(scores.masked_fill(mask, float("-inf")), -1), vc[:, :, :t])
    assert out.shape == q.shape and out.dtype == dtype
    assert_by_rule(out, ref64, native, f"attention hd={hd}")


@pytest.mark.gpu
def test_opcheck(ext):
    """torch.library.opcheck: schema (mutated args), fake tensor and autograd registration of every op."""
    q = rand(2, 4, 64)
    kc, vc = rand(2, 4, 32, 64), rand(2, 4, 32, 64)
    cos, sin = ops.rotary_tables(16, 64, 10000.0, "cuda")
    qkv = rand(2, 3, 4 * 3 * 64)
    pos = torch.arange(3, device="cuda")[None].repeat(2, 1)
    x, w = rand(3, 256), rand(256)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(ext.decode_attention, (q, kc, vc, torch.tensor([5, 32], device="cuda"), 0.125),
                          test_utils=tests)
    torch.library.opcheck(ext.rotary_kv_write, (qkv, pos, cos, sin, 16, kc, vc), test_utils=tests)
    torch.library.opcheck(ext.rotary_decode_attention, (qkv[:, :1].contiguous(), pos[:, :1].contiguous(), cos, sin,
                                                        16, kc, vc, torch.tensor([1, 2], device="cuda"), 0.125),
                          test_utils=tests)
    torch.library.opcheck(ext.scaled_causal_softmax, (rand(2, 4, 3, 9), pos, 0.1), test_utils=tests)
    torch.library.opcheck(ext.layernorm, (x, w, w, 1e-5), test_utils=tests)
    torch.library.opcheck(ext.dual_layernorm, (x, w, w, w, w, 1e-5), test_utils=tests)
    torch.library.opcheck(ext.gemv, (x[:2], rand(24, 256), rand(24), 1), test_utils=tests)
    torch.library.opcheck(ext.gemv_pair, (x[:1], rand(24, 256), rand(24), 1, x[1:2], rand(40, 256), None, 0),
                          test_utils=tests)
    torch.library.opcheck(ext.gemv_sum, (x[:1], rand(24, 256), rand(1, 512), rand(24, 512), rand(24), None,
                                         rand(1, 24)), test_utils=tests)


@pytest.mark.gpu
def test_backend_registers_ops(ext):
    try:
        assert ops.select_backend("cuda", "cuda") == "cuda"
        backends = ops.active_backends()
        for name in ("layernorm", "dual_layernorm", "linear", "linear_pair", "linear_sum", "rotary_kv_write",
                     "decode_attention", "rotary_decode_attention", "attention"):
            assert backends[name] == "cuda", name
    finally:
        ops.reset()


# Whole model: fp16 random weights, head size 96 as 20B, kernels vs the PyTorch reference.
MODEL_CONFIG = dict(vocab_size=512, hidden_size=384, num_hidden_layers=4, num_attention_heads=4, rotary_pct=0.25,
                    max_position_embeddings=256, hidden_act="gelu_fast")


def _greedy(model, prompt, steps):
    """Greedy tokens and the logits of every step (prefill + cached decode), batch 1."""
    cache = KVCache.for_model(model, 1, len(prompt) + steps)
    ids = torch.tensor([prompt], device="cuda")
    pos = torch.arange(len(prompt), device="cuda")[None]
    logits = model(ids, pos, cache, last_index=torch.tensor([len(prompt) - 1], device="cuda"))  # [1, V]
    tokens, all_logits = [], [logits[0].float()]
    for step in range(steps):
        tok = int(logits[0].argmax())
        tokens.append(tok)
        p = len(prompt) + step
        logits = model(torch.tensor([[tok]], device="cuda"), torch.tensor([[p]], device="cuda"), cache,
                       decode=True)[:, 0]
        all_logits.append(logits[0].float())
    return tokens, all_logits


@pytest.mark.gpu
def test_whole_model_cuda_backend_matches_reference(ext):
    import neox_rt
    from neox_rt.model.config import NeoXConfig
    cfg = NeoXConfig(**MODEL_CONFIG)
    m16 = neox_rt.build_model(cfg, torch.float16, "cuda")
    neox_rt.init_random(m16, seed=1, std=0.05)
    m64 = neox_rt.build_model(cfg, torch.float64, "cuda")
    with torch.no_grad():
        for (_, p64), (_, p16) in zip(m64.named_parameters(), m16.named_parameters()):
            p64.copy_(p16.double())
    prompt = [3, 17, 42, 101, 7, 250, 9]
    try:
        ops.select_backend("torch")
        ref_tokens, ref_logits = _greedy(m16, prompt, 64)
        ops.select_backend("cuda", "cuda")
        assert ops.active_backends()["decode_attention"] == "cuda"
        tokens, logits = _greedy(m16, prompt, 64)
        ops.select_backend("torch")
        # Logits by rule on the prefill and the first decode step, both fed the same tokens.
        cache = KVCache.for_model(m64, 1, len(prompt) + 1)
        l64 = m64(torch.tensor([prompt], device="cuda"), torch.arange(len(prompt), device="cuda")[None], cache,
                  last_index=torch.tensor([len(prompt) - 1], device="cuda"))[0]
        assert_by_rule(logits[0], l64, ref_logits[0], "model prefill logits")
        for d, (x, y) in enumerate(zip(tokens, ref_tokens)):
            if x != y:  # only a near tie of the fp64 logits may flip an argmax
                seq = prompt + tokens[:d]
                c = KVCache.for_model(m64, 1, len(seq))
                l = m64(torch.tensor([seq], device="cuda"), torch.arange(len(seq), device="cuda")[None], c,
                        last_index=torch.tensor([len(seq) - 1], device="cuda"))[0]
                gap = (l[x] - l[y]).abs().item()
                assert gap <= 1e-2 * l.abs().max().item(), f"tokens part at step {d}: {x} vs {y}, gap {gap:.3g}"
                break
    finally:
        ops.reset()


ERROR_CASES = {  # op call on bad input -> the message it must raise (numbers and shapes in it)
    "gemv activation": (lambda e, x, w: e.gemv(x, w, None, 7), r"activation must be .* got 7"),
    "gemv k mismatch": (lambda e, x, w: e.gemv(x, w[:, :32].contiguous(), None, 0),
                        r"got x \[1, 64\] and weight \[8, 32\]"),
    "gemv variant": (lambda e, x, w: e.gemv(x, w, None, 0, None, 99), r"variant must be .* got 99"),
    "layernorm weight": (lambda e, x, w: e.layernorm(x, w[0, :32], w[0, :32], 1e-5), r"must be \[64\], got \[32\]"),
    "decode head size": (lambda e, x, w: e.decode_attention(x[:, None, :48].contiguous(), rand(1, 1, 8, 48),
                                                            rand(1, 1, 8, 48), torch.tensor([3], device="cuda"),
                                                            0.1), r"head sizes .* got 48"),
    "bias shape": (lambda e, x, w: e.gemv(x, w, w[0, :5].contiguous(), 0), r"must have shape \[8\], got \[5\]"),
    "gemv_pair two rows": (lambda e, x, w: e.gemv_pair(torch.cat([x, x]), w, None, 0, x, w, None, 0),
                           r"one row of x1, got \[2, 64\]"),
    "gemv_pair ksplit": (lambda e, x, w: e.gemv_pair(x, w, None, 0, x, w, None, 0, 3), r"ksplit .* got 3"),
    "gemv_sum out_features": (lambda e, x, w: e.gemv_sum(x, w, x, w[:4].contiguous(), None, None),
                              r"same out_features, got \[8, 64\] and \[4, 64\]"),
    "gemv_sum min_blocks": (lambda e, x, w: e.gemv_sum(x, w, x, w, None, None, None, 0, 5), r"min_blocks .* got 5"),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_raises_with_numbers(ext, case):
    """A bad argument is a RuntimeError whose message names the numbers (it once crashed the process: an integer
    streamed into the message from the extension's translation unit; see fmt() in csrc/ops/ops.cu)."""
    call, pattern = ERROR_CASES[case]
    with pytest.raises(RuntimeError, match=pattern):
        call(ext, rand(1, 64), rand(8, 64))
