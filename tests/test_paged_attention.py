"""The paged KV cache's ops (#23) against the dense ones: the references against each other, the Triton kernels
(under TRITON_INTERPRET=1 on CPU, small shapes) and, on a GPU, the CUDA extension's decode (skipped where neox_rt._C
is not built) against fp64 math by the house rule.

A paged cache [num_blocks, nh, bs, hd] and a dense cache [b, nh, T, hd] holding the same tokens must give the same
attention. Layouts are awkward on purpose: blocks handed out in a shuffled order (non-contiguous, out of order,
with unused blocks between them), no block shared between sequences, table entries past a sequence's length set to
-1 or to another sequence's block, lengths of one token, exactly a block, mid-block and several blocks. Every cache
slot no sequence owns is NaN: a kernel that reads past a length fails the finiteness check. Tolerance rule: the
kernel's max error against an fp64 reference is at most twice PyTorch's own error at the same dtype plus one unit of
output rounding; the two references (paged and dense) run the same fp32 math on the same values and must agree
exactly; k/v writes are data movement plus the rotary math, v exact. Outputs the kernels allocate are NaN before
they run (``poisoned_empty``), and cache slots a write must not touch keep their bits.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import pytest  # noqa: E402

from neox_rt import ops  # noqa: E402
from neox_rt.ops.reference import (attention_ref, decode_attention_ref, gather_paged,  # noqa: E402
                                   paged_decode_attention_ref, paged_prefill_attention_ref,
                                   paged_rotary_kv_write_ref, rotary_kv_write_ref, rotary_tables)

triton = pytest.importorskip("triton")
from neox_rt.kernels import paged_attention as k_paged  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
HEAD_SIZES = [32, 64, 80, 96, 128, 256]
ROTARY = {32: 8, 64: 16, 80: 20, 96: 24, 128: 32, 256: 64}  # rotary_pct 0.25 as in the family
DTYPES = [torch.float16, torch.float32]
BS = 16
DECODE_LENGTHS = [1, 16, 17, 37, 48]  # one token, exactly a block, one past a block, mid-block, three full blocks


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    """Random normal values on DEV, never exactly zero."""
    x = torch.randn(*shape, generator=gen(seed)) * scale
    x = torch.where(x == 0, torch.full_like(x, 1e-3), x)
    return x.to(DEV, dtype)


def assert_by_rule(out, torch_low, ref64, dtype, what=""):
    """kernel error vs fp64 <= 2 x torch's own error at this dtype + one output ulp at the largest value."""
    assert out.dtype == dtype, (out.dtype, dtype)
    assert torch.isfinite(out).all(), f"{what}: non-finite output (an unwritten element or a NaN slot was read)"
    kernel_err = (out.double() - ref64).abs().max().item()
    torch_err = (torch_low.double() - ref64).abs().max().item()
    bound = 2 * torch_err + torch.finfo(dtype).eps * ref64.abs().max().item()
    assert kernel_err <= bound, f"{what}: kernel err {kernel_err:.3g} > 2 x torch err {torch_err:.3g} + eps"


def bits(t):
    """The raw bits of a float tensor (NaN == NaN), for 'untouched' checks."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@contextlib.contextmanager
def poisoned_empty():
    """torch.empty returns NaN-filled (float) or -7-filled (int) memory while active, so that an output element a
    kernel wrapper allocates and the kernel forgets to write is caught, on CPU as on the GPU."""
    real = torch.empty

    def empty(*size, **kw):
        t = real(*size, **kw)
        return t.fill_(float("nan") if t.is_floating_point() else -7)

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


class Layout:
    """Block tables for sequences of the given lengths: blocks drawn from a shuffled pool with spare blocks (holes),
    no block shared, table entries past a sequence's blocks -1 (even rows) or another sequence's block (odd rows)."""

    def __init__(self, lengths, bs=BS, spare=3, extra_cols=1, seed=0):
        self.lengths, self.bs = list(lengths), bs
        need = [math.ceil(n / bs) for n in self.lengths]
        self.num_blocks = sum(need) + spare
        self.max_blocks = max(need + [1]) + extra_cols
        pool = torch.randperm(self.num_blocks, generator=gen(seed)).tolist()
        tables = torch.full((len(self.lengths), self.max_blocks), -1, dtype=torch.int32)
        self.owned = []
        for i, k in enumerate(need):
            ids, pool = pool[:k], pool[k:]
            self.owned.append(ids)
            tables[i, :k] = torch.tensor(ids, dtype=torch.int32)
        for i in range(1, len(need), 2):  # stale entries pointing at a block someone else owns (or a spare)
            other = self.owned[i - 1] or pool or [0]
            tables[i, need[i]:] = other[0]
        self.block_tables = tables.to(DEV)
        self.seqlens = torch.tensor(self.lengths, dtype=torch.int32, device=DEV)

    def slot(self, i, p):
        return self.owned[i][p // self.bs] * self.bs + p % self.bs

    def paged_from_dense(self, dense, nh, hd, dtype):
        """A NaN cache [num_blocks, nh, bs, hd] holding dense[i, :, :lengths[i]] through the tables."""
        cache = torch.full((self.num_blocks, nh, self.bs, hd), float("nan"), dtype=dtype, device=DEV)
        for i, n in enumerate(self.lengths):
            p = torch.arange(n, device=DEV)
            blocks = torch.tensor(self.owned[i], dtype=torch.long, device=DEV)[p // self.bs] if n else p
            cache[blocks, :, p % self.bs] = dense[i, :, :n].transpose(0, 1)  # [n, nh, hd]
        return cache


def dense_caches(layout, nh, hd, dtype, seed):
    """Dense caches [b, nh, T, hd], T the tables' capacity; slots past a length hold finite junk (the dense
    reference masks them)."""
    b, T = len(layout.lengths), layout.max_blocks * layout.bs
    return randn(b, nh, T, hd, dtype=dtype, seed=seed), randn(b, nh, T, hd, dtype=dtype, seed=seed + 1)


def decode_math(q, k, v, seqlens, scale, dtype):
    """Per-sequence softmax(q k^T * scale) v over the first seqlens[i] dense slots, computed in ``dtype``."""
    outs = []
    for i in range(q.shape[0]):
        n = int(seqlens[i])
        kk, vv = k[i, :, :n].to(dtype), v[i, :, :n].to(dtype)  # [nh, n, hd]
        sc = torch.einsum("hd,hnd->hn", q[i].to(dtype), kk) * scale
        p = torch.softmax(sc.float() if dtype != torch.float64 else sc, dim=-1).to(dtype)
        outs.append(torch.einsum("hn,hnd->hd", p, vv))
    return torch.stack(outs)


def rotate(x, c, s, rd, dtype):
    """NeoX rotate-half of x [n, nh, hd] with c, s [n, rd/2], computed in ``dtype``."""
    half = rd // 2
    x = x.to(dtype)
    x1, x2, rest = x[..., :half], x[..., half:rd], x[..., rd:]
    c, s = c[:, None, :].to(dtype), s[:, None, :].to(dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


# ----------------------------------------------------------------------------------------------------
# References: paged against dense
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", HEAD_SIZES)
def test_paged_decode_reference_equals_dense(hd, dtype):
    layout = Layout(DECODE_LENGTHS, seed=hd)
    nh = 3
    kd, vd = dense_caches(layout, nh, hd, dtype, seed=1)
    kp, vp = layout.paged_from_dense(kd, nh, hd, dtype), layout.paged_from_dense(vd, nh, hd, dtype)
    q = randn(len(DECODE_LENGTHS), nh, hd, dtype=dtype, seed=2, scale=2.0)
    scale = hd ** -0.5
    dense = decode_attention_ref(q, kd, vd, layout.seqlens, scale)
    paged = paged_decode_attention_ref(q, kp, vp, layout.block_tables, layout.seqlens, scale)
    assert torch.isfinite(paged).all()
    # the same fp32 math on the same values; only the order of the masked zeros' sums may differ
    torch.testing.assert_close(paged, dense, rtol=0, atol=torch.finfo(dtype).eps * dense.abs().max().item())


def test_paged_decode_reference_empty_sequence_gives_zeros():
    layout = Layout([0, 5, 0, 33])
    kd, vd = dense_caches(layout, 2, 32, torch.float32, seed=3)
    kp, vp = layout.paged_from_dense(kd, 2, 32, torch.float32), layout.paged_from_dense(vd, 2, 32, torch.float32)
    q = randn(4, 2, 32, seed=4)
    out = paged_decode_attention_ref(q, kp, vp, layout.block_tables, layout.seqlens, 0.2)
    assert torch.equal(out[[0, 2]], torch.zeros_like(out[[0, 2]]))
    dense = decode_attention_ref(q[[1, 3]], kd[[1, 3]], vd[[1, 3]], layout.seqlens[[1, 3]], 0.2)
    torch.testing.assert_close(out[[1, 3]], dense, rtol=0, atol=1e-6)


def write_case(lengths, new, nh, hd, dtype, seed=0, pad_every=3):
    """New tokens of each sequence (its last ``new[i]`` positions) as one varlen batch with padding tokens (slot
    -1, position 0) interleaved; returns (layout, qkv [n, nh*3*hd], positions [n], slots [n], owner [n])."""
    layout = Layout(lengths, seed=seed)
    pos, slots, owner = [], [], []
    for i, (n, m) in enumerate(zip(lengths, new)):
        for p in range(n - m, n):
            if len(pos) % pad_every == pad_every - 1:
                pos.append(0), slots.append(-1), owner.append(-1)
            pos.append(p), slots.append(layout.slot(i, p)), owner.append(i)
    pos.append(0), slots.append(-1), owner.append(-1)  # a trailing padding token (a graph bucket's tail)
    qkv = randn(len(pos), nh * 3 * hd, dtype=dtype, seed=seed + 5)
    return (layout, qkv, torch.tensor(pos, device=DEV), torch.tensor(slots, dtype=torch.int32, device=DEV),
            torch.tensor(owner, device=DEV))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", [32, 80])
def test_paged_write_reference_equals_dense(hd, dtype):
    nh, rd = 2, ROTARY[hd]
    layout, qkv, pos, slots, owner = write_case([19, 37, 1, 16], [19, 5, 1, 16], nh, hd, dtype)
    cos, sin = rotary_tables(rd, 64, 10000.0, device=DEV)
    kp = torch.full((layout.num_blocks, nh, BS, hd), float("nan"), dtype=dtype, device=DEV)
    vp = kp.clone()
    q = paged_rotary_kv_write_ref(qkv, pos, cos, sin, rd, kp, vp, slots)
    T = layout.max_blocks * BS
    kd = torch.full((len(layout.lengths), nh, T, hd), float("nan"), dtype=dtype, device=DEV)
    vd = kd.clone()
    for i in range(len(layout.lengths)):  # the dense op, one sequence (one cache row) at a time
        rows = (owner == i).nonzero()[:, 0]
        qi = rotary_kv_write_ref(qkv[rows][None], pos[rows][None], cos, sin, rd, kd[i:i + 1], vd[i:i + 1])[0]
        assert torch.equal(q[rows], qi)
    for paged, dense in ((kp, kd), (vp, vd)):  # through the tables: the same bits where the dense op wrote
        written = dense.isfinite()
        assert torch.equal(bits(gather_paged(paged, layout.block_tables))[written], bits(dense)[written])
        assert int(paged.isfinite().sum()) == int(written.sum())  # and nothing else (the rest still NaN)


def test_paged_write_reference_all_padding_writes_nothing():
    nh, hd = 2, 32
    kp = randn(4, nh, BS, hd, seed=1)
    vp = randn(4, nh, BS, hd, seed=2)
    k0, v0 = kp.clone(), vp.clone()
    qkv = randn(2, 3, nh * 3 * hd, seed=3)  # a padded [b, s] batch this time
    cos, sin = rotary_tables(8, 8, 10000.0, device=DEV)
    q = paged_rotary_kv_write_ref(qkv, torch.zeros(2, 3, dtype=torch.long, device=DEV), cos, sin, 8, kp, vp,
                                  torch.full((2, 3), -1, device=DEV))
    assert q.shape == (2, 3, nh, hd)
    assert torch.equal(kp, k0) and torch.equal(vp, v0)


def prefill_case(ctx, new, nh, hd, dtype, seed=0, pad=2):
    """Sequences holding ctx[i] + new[i] tokens (paged and dense), and the varlen queries of their new tokens."""
    lengths = [c + n for c, n in zip(ctx, new)]
    layout = Layout(lengths, seed=seed)
    kd, vd = dense_caches(layout, nh, hd, dtype, seed=seed + 1)
    kp, vp = layout.paged_from_dense(kd, nh, hd, dtype), layout.paged_from_dense(vd, nh, hd, dtype)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    q = randn(sum(new) + pad, nh, hd, dtype=dtype, seed=seed + 3, scale=2.0)  # ``pad`` rows past the last sequence
    return layout, kd, vd, kp, vp, qsl, q


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", HEAD_SIZES)
def test_paged_prefill_reference_equals_dense(hd, dtype):
    # a fresh prompt; a chunk starting mid-block (20 = a block + 4); one token after 31; a chunk of exactly a block
    # at a block boundary; a sequence with no new tokens this step
    ctx, new = [0, 20, 31, 16, 9], [19, 5, 1, 16, 0]
    nh = 2
    layout, kd, vd, kp, vp, qsl, q = prefill_case(ctx, new, nh, hd, dtype, seed=hd)
    scale = hd ** -0.5
    out = paged_prefill_attention_ref(q, kp, vp, layout.block_tables, qsl, layout.seqlens, scale)
    assert out.shape == q.shape and torch.isfinite(out).all()
    for i, (c, n) in enumerate(zip(ctx, new)):
        lo = int(qsl[i])
        positions = torch.arange(c, c + n, device=DEV)[None]
        if n:
            dense = attention_ref(q[None, lo:lo + n], kd[i:i + 1], vd[i:i + 1], positions, scale)[0]
            assert torch.equal(out[lo:lo + n], dense), f"sequence {i}"
    assert torch.equal(out[int(qsl[-1]):], torch.zeros_like(out[int(qsl[-1]):]))  # padding rows


def test_paged_step_equals_dense_step():
    """A chunked prefill then a decode step through the paged ops equal the dense ops' step, end to end."""
    nh, hd, rd, dtype = 2, 64, 16, torch.float32
    ctx, new = [0, 21, 3], [7, 4, 13]  # sequence 1 is mid-prompt (chunked prefill), its chunk starts mid-block
    lengths = [c + n for c, n in zip(ctx, new)]
    layout = Layout([n + 1 for n in lengths], seed=7)  # room for the decode token
    b, T = len(lengths), layout.max_blocks * BS
    cos, sin = rotary_tables(rd, 128, 10000.0, device=DEV)
    kd, vd = dense_caches(layout, nh, hd, dtype, seed=8)  # junk past each context: overwritten or masked
    kp = torch.full((layout.num_blocks, nh, BS, hd), float("nan"), device=DEV)
    vp = kp.clone()
    for i, c in enumerate(ctx):  # the existing context, in both caches
        for p in range(c):
            kp[layout.owned[i][p // BS], :, p % BS], vp[layout.owned[i][p // BS], :, p % BS] = kd[i, :, p], vd[i, :, p]
    qkv = randn(sum(new), nh * 3 * hd, seed=9)
    pos = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, new)]).to(DEV)
    slots = torch.tensor([layout.slot(i, p) for i, (c, n) in enumerate(zip(ctx, new)) for p in range(c, c + n)],
                         device=DEV)
    qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), device=DEV)
    scale = hd ** -0.5
    q = paged_rotary_kv_write_ref(qkv, pos, cos, sin, rd, kp, vp, slots)
    out = paged_prefill_attention_ref(q, kp, vp, layout.block_tables, qsl,
                                      torch.tensor(lengths, device=DEV), scale)
    for i in range(b):
        lo, hi = int(qsl[i]), int(qsl[i + 1])
        qi = rotary_kv_write_ref(qkv[None, lo:hi], pos[None, lo:hi], cos, sin, rd, kd[i:i + 1], vd[i:i + 1])
        assert torch.equal(out[lo:hi], attention_ref(qi, kd[i:i + 1], vd[i:i + 1], pos[None, lo:hi], scale)[0])
    # one decode token per sequence
    qkv1 = randn(b, nh * 3 * hd, seed=10)
    pos1 = torch.tensor(lengths, device=DEV)
    slots1 = torch.tensor([layout.slot(i, p) for i, p in enumerate(lengths)], device=DEV)
    q1 = paged_rotary_kv_write_ref(qkv1, pos1, cos, sin, rd, kp, vp, slots1)
    got = paged_decode_attention_ref(q1, kp, vp, layout.block_tables, pos1 + 1, scale)
    qd = rotary_kv_write_ref(qkv1[:, None], pos1[:, None], cos, sin, rd, kd, vd)[:, 0]
    want = decode_attention_ref(qd, kd, vd, pos1 + 1, scale)
    torch.testing.assert_close(got, want, rtol=0, atol=torch.finfo(dtype).eps * want.abs().max().item())
    assert T >= max(lengths) + 1


# ----------------------------------------------------------------------------------------------------
# Triton kernels (the interpreter on CPU); the CUDA extension's decode through the same checks on a GPU
# ----------------------------------------------------------------------------------------------------

def cuda_backend():
    """neox_rt.ops.cuda with the extension loaded, or None where neox_rt._C is not importable."""
    try:
        from neox_rt.ops import cuda as cuda_ops
        cuda_ops.load_extension()
    except ImportError:
        return None
    return cuda_ops


def decode_impl(name):
    """(kernel, supports) of the paged decode attention ``name``, "triton" or "cuda" (a skip without neox_rt._C)."""
    if name == "triton":
        return k_paged.paged_decode_attention, k_paged.supports_paged_decode_attention
    cuda_ops = cuda_backend()
    if cuda_ops is None:
        pytest.skip("neox_rt._C is not built here")
    return cuda_ops.paged_decode_attention, cuda_ops.supports_paged_decode_attention


def paged_case(lengths, bs, nh, hd, dtype, seed, junk_tables=False):
    """(layout, dense k, dense v, paged k, paged v) for sequences of ``lengths``; ``junk_tables``: the table entries
    past each sequence's blocks hold ids far outside the cache (never dereferenced)."""
    layout = Layout(lengths, bs=bs, seed=seed + hd)
    if junk_tables:
        for i, n in enumerate(lengths):
            layout.block_tables[i, math.ceil(n / bs):] = 2 ** 31 - 1 if i % 2 else -2 ** 31
    kd, vd = dense_caches(layout, nh, hd, dtype, seed=seed + 1)
    return layout, kd, vd, layout.paged_from_dense(kd, nh, hd, dtype), layout.paged_from_dense(vd, nh, hd, dtype)


def check_paged_decode(hd, dtype, lengths, bs=BS, seed=0, impl="triton", nh=2, junk_tables=False, repeat=1, **kw):
    """The kernel ``impl`` against fp64 math over the dense cache by the house rule; empty rows exactly zero.
    ``junk_tables``: table entries past each sequence's blocks hold ids far outside the cache (never dereferenced);
    ``repeat``: launches checked one after another (the CUDA merge's ticket counters must be back at zero)."""
    fn, supports = decode_impl(impl)
    layout, kd, vd, kp, vp = paged_case(lengths, bs, nh, hd, dtype, seed, junk_tables)
    q = randn(len(lengths), nh, hd, dtype=dtype, seed=seed + 2, scale=2.0)
    scale = hd ** -0.5
    assert supports(q, kp, vp, layout.block_tables, layout.seqlens, scale)
    live = [i for i, n in enumerate(lengths) if n]
    empty = [i for i, n in enumerate(lengths) if not n]
    ref64 = decode_math(q[live], kd[live], vd[live], layout.seqlens[live], scale, torch.float64)
    torch_low = decode_math(q[live], kd[live], vd[live], layout.seqlens[live], scale, dtype)
    for r in range(repeat):
        if q.is_cuda:  # the extension allocates its output in C++: leave a NaN block of that size for it to reuse
            torch.full_like(q, float("nan"))
        with poisoned_empty():
            out = fn(q, kp, vp, layout.block_tables, layout.seqlens, scale, **kw)
        assert out.shape == q.shape
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))
        what = f"paged decode {impl} hd={hd} {dtype} bs={bs} {kw} launch {r}"
        if impl == "cuda" and dtype == torch.float32:
            # fp32: exp2 (fast math) and the split summation order differ from torch's, whose own fp32 error is
            # near zero; as the dense CUDA decode's fp32 test (tests/test_kernels_cuda.py), a fixed tolerance
            assert torch.isfinite(out).all(), f"{what}: non-finite output"
            torch.testing.assert_close(out[live].double(), ref64, rtol=1e-4, atol=1e-5, msg=what)
        else:
            assert_by_rule(out[live], torch_low, ref64, dtype, what)


def paged_math(q, kp, vp, block_tables, seqlens, scale, dtype):
    """decode_math over the blocks the tables name (gathered dense), computed in ``dtype``."""
    return decode_math(q, gather_paged(kp, block_tables), gather_paged(vp, block_tables), seqlens, scale, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", HEAD_SIZES)
def test_paged_decode_triton(hd, dtype):
    check_paged_decode(hd, dtype, DECODE_LENGTHS)  # the planner's split (one chunk at these sizes on CPU)
    check_paged_decode(hd, dtype, [0, 45, 1], seed=3, num_splits=3, block_n=16)  # chunks merged; an empty row


@pytest.mark.parametrize("bs", [1, 8, 32])
def test_paged_decode_triton_block_sizes(bs):
    """Block sizes other than 16: a key step spanning several blocks (8, 1), a block spanning steps (32)."""
    check_paged_decode(80, torch.float16, [1, 8, 9, 40], bs=bs, num_splits=2, block_n=16)


def check_paged_write(hd, dtype, lengths, new, seed=0, lead_2d=False):
    nh, rd = 3, ROTARY[hd]
    layout, qkv, pos, slots, owner = write_case(lengths, new, nh, hd, dtype, seed=seed)
    cos, sin = rotary_tables(rd, 64, 10000.0, device=DEV)
    kp = torch.full((layout.num_blocks, nh, BS, hd), float("nan"), dtype=dtype, device=DEV)
    kp[layout.num_blocks - 1] = 7.0  # a block with stale finite values: untouched bits must survive too
    vp = kp.clone()
    k_before, v_before = kp.clone(), vp.clone()
    if lead_2d:  # the padded [b, s] form of the same tokens
        qkv, pos, slots = qkv[None], pos[None], slots[None]
    assert k_paged.supports_paged_rotary_kv_write(qkv, pos, cos, sin, rd, kp, vp, slots)
    with poisoned_empty():
        q = k_paged.paged_rotary_kv_write(qkv, pos, cos, sin, rd, kp, vp, slots)
    if lead_2d:
        qkv, pos, slots, q = qkv[0], pos[0], slots[0], q[0]
    n = qkv.shape[0]
    assert q.shape == (n, nh, hd)
    parts = qkv.view(n, nh, 3, hd)
    c, s = cos[pos], sin[pos]
    assert_by_rule(q, rotate(parts[:, :, 0], c, s, rd, dtype), rotate(parts[:, :, 0], c, s, rd, torch.float64),
                   dtype, f"paged write q hd={hd}")
    real = (slots >= 0).nonzero()[:, 0]
    blk, off = slots[real].long() // BS, slots[real].long() % BS
    assert_by_rule(kp[blk, :, off], rotate(parts[real, :, 1], c[real], s[real], rd, dtype),
                   rotate(parts[real, :, 1], c[real], s[real], rd, torch.float64), dtype, f"paged write k hd={hd}")
    assert torch.equal(vp[blk, :, off], parts[real, :, 2]), "v must be copied exactly"
    written = torch.zeros(layout.num_blocks, BS, dtype=torch.bool, device=DEV)
    written[blk, off] = True
    untouched = ~written[:, None, :, None].expand_as(kp)
    for after, before in ((kp, k_before), (vp, v_before)):
        assert torch.equal(bits(after)[untouched], bits(before)[untouched]), "a slot outside slot_mapping changed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", HEAD_SIZES)
def test_paged_write_triton(hd, dtype):
    # a fresh prompt; a chunk crossing a block boundary (14..18); one token; a chunk ending at a block's end
    check_paged_write(hd, dtype, [6, 19, 1, 16], [6, 5, 1, 3], seed=hd)


def test_paged_write_triton_padded_batch_and_ref_agree():
    check_paged_write(64, torch.float32, [5, 20], [5, 3], lead_2d=True)
    # kernel and reference write the same bits (same rotation math in fp32)
    nh, hd, rd = 2, 32, 8
    layout, qkv, pos, slots, _ = write_case([9, 30], [9, 14], nh, hd, torch.float32, seed=4)
    cos, sin = rotary_tables(rd, 64, 10000.0, device=DEV)
    caches = [torch.full((layout.num_blocks, nh, BS, hd), float("nan"), device=DEV) for _ in range(4)]
    q_ref = paged_rotary_kv_write_ref(qkv, pos, cos, sin, rd, caches[0], caches[1], slots)
    q_tri = k_paged.paged_rotary_kv_write(qkv, pos, cos, sin, rd, caches[2], caches[3], slots)
    torch.testing.assert_close(q_tri, q_ref, rtol=1e-6, atol=1e-6)  # fma vs separate multiply-add: 1-2 ulps
    torch.testing.assert_close(caches[2], caches[0], rtol=1e-6, atol=1e-6, equal_nan=True)
    assert torch.equal(bits(caches[3]), bits(caches[1]))


def test_supports_paged_rejects():
    layout = Layout([3, 20])
    kp = torch.randn(layout.num_blocks, 2, BS, 48)
    q = torch.randn(2, 2, 48)
    args = (layout.block_tables.cpu(), layout.seqlens.cpu(), 0.1)
    assert not k_paged.supports_paged_decode_attention(q, kp, kp, *args)  # head size 48
    kp, q = kp[..., :32].contiguous(), q[..., :32].contiguous()
    if not GPU:
        assert k_paged.supports_paged_decode_attention(q, kp, kp, *args)
    assert not k_paged.supports_paged_decode_attention(q, kp.half(), kp.half(), *args)  # dtype mismatch
    assert not k_paged.supports_paged_decode_attention(q, kp.transpose(1, 2), kp.transpose(1, 2), *args)
    assert not k_paged.supports_paged_decode_attention(q[:1], kp, kp, *args)  # table rows != batch
    assert not k_paged.supports_paged_decode_attention(q, kp, kp, args[0].float(), *args[1:])
    qkv = torch.randn(4, 2 * 3 * 32)
    cos, sin = rotary_tables(8, 16, 10000.0)
    pos, slots = torch.zeros(4, dtype=torch.long), torch.full((4,), -1)
    assert not k_paged.supports_paged_rotary_kv_write(qkv, pos, cos, sin, 7, kp, kp, slots)  # odd rotary
    assert not k_paged.supports_paged_rotary_kv_write(qkv, pos, cos, sin, 8, kp, kp, slots[:3])
    assert not k_paged.supports_paged_rotary_kv_write(qkv.half(), pos, cos, sin, 8, kp, kp, slots)


@pytest.mark.skipif(GPU, reason="the interpreter's registration; the GPU selects its own backends")
def test_op_table_serves_paged_ops_from_triton():
    try:
        assert ops.select_backend("triton") == "triton"
        layout = Layout([5, 17])
        kp = randn(layout.num_blocks, 2, BS, 32, seed=1)
        q = randn(2, 2, 32, seed=2)
        args = (q, kp, kp, layout.block_tables, layout.seqlens, 0.2)
        assert ops.OPS["paged_decode_attention"].served_by(*args) == "triton"
        torch.testing.assert_close(ops.OPS["paged_decode_attention"](*args), paged_decode_attention_ref(*args),
                                   rtol=1e-5, atol=1e-5)
        assert ops.OPS["paged_decode_attention"].served_by(q.double(), kp, kp, *args[3:]) == "torch"
        assert ops.OPS["paged_prefill_attention"].backend == "triton"  # and the Triton kernel serves prefill
    finally:
        ops.reset()


# ----------------------------------------------------------------------------------------------------
# GPU: the Triton and CUDA kernels at real sizes, graph capture (the reference and both kernels), routing
# ----------------------------------------------------------------------------------------------------

GPU_IMPLS = ["triton", "cuda"]
# an empty row, one token, exactly a block, one past it, mid-block lengths, long contexts
GPU_LENGTHS = [0, 1, 16, 17, 383, 2047, 4096]


def test_cuda_paged_decode_is_registered():
    """CPU: the CUDA op has its schema and kernel in bindings.cpp, a fake, a supports predicate and an op-table entry,
    and the compile check instantiates its kernels."""
    bindings = open(os.path.join(REPO, "csrc", "bindings.cpp")).read()
    cuda_py = open(os.path.join(REPO, "neox_rt", "ops", "cuda.py")).read()
    check = open(os.path.join(REPO, "csrc", "standalone", "compile_check.cu")).read()
    assert 'm.def("paged_decode_attention(' in bindings and 'm.impl("paged_decode_attention"' in bindings
    assert 'register_fake("neox_rt::paged_decode_attention")' in cuda_py
    assert '"paged_decode_attention": (paged_decode_attention, supports_paged_decode_attention)' in cuda_py
    assert '#include "kernels/paged_attention.cuh"' in check and "launch_paged_decode_attention<" in check
    assert "paged_decode_attention" in ops.CUDA_THEN_TRITON


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hd", HEAD_SIZES)
def test_paged_decode_gpu(impl, hd, dtype):
    check_paged_decode(hd, dtype, GPU_LENGTHS, impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("bs", [1, 8, 16, 32, 128])
@pytest.mark.parametrize("hd,dtype", [(128, torch.float16), (96, torch.bfloat16), (64, torch.float32)])
def test_paged_decode_block_sizes_gpu(impl, bs, hd, dtype):
    """Block sizes around the CUDA kernel's key step (32 keys at hd 128 fp16): steps spanning several blocks (1, 8,
    16), a block per step (32), steps inside one block (128); lengths ending mid-block, one of them long."""
    check_paged_decode(hd, dtype, [0, 1, 8, 9, 40, 333, 1500], bs=bs, impl=impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", GPU_IMPLS)
@pytest.mark.parametrize("bs", [1, 16])
def test_paged_decode_never_dereferences_entries_past_the_length_gpu(impl, bs):
    """Table entries past a sequence's blocks far outside the cache (+-2^31) and NaN in every slot no sequence owns:
    a kernel that reads either (its L2 prefetch included) faults or fails the finiteness check."""
    check_paged_decode(128, torch.float16, [0, 3, 16, 33, 700, 0, 1], bs=bs, impl=impl, junk_tables=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hd", [64, 96, 256])
@pytest.mark.parametrize("blocks_per_sm,merge_kernel,pdl,late", [
    (1, False, False, False), (1, False, True, False), (4, True, False, False), (64, False, True, False),
    (64, True, True, False), (0, False, True, False), (0, False, True, True), (64, False, True, True)])
def test_paged_decode_cuda_split_plans_gpu(dtype, hd, blocks_per_sm, merge_kernel, pdl, late):
    """The CUDA kernel's split plans (1 block per SM: long splits of many table blocks; 64: splits of a step or two,
    up to the 256-split cap), the in-kernel merge (ticket counters) and the merge kernel, PDL on and off (and with
    the next launch triggered after the blocks' wait, ``late``: NEOX_RT_SUM_B_FIRST=1); repeated launches find the
    counters back at zero. Rows inside the first split, on split and block edges, at the table's full capacity, and
    empty."""
    cuda_ops = cuda_backend()
    if cuda_ops is None:
        pytest.skip("neox_rt._C is not built here")
    saved = cuda_ops.PDL, cuda_ops.SUM_B_FIRST
    try:
        cuda_ops.PDL, cuda_ops.SUM_B_FIRST = pdl, late
        check_paged_decode(hd, dtype, [4096, 1, 2, 17, 64, 65, 127, 128, 129, 1000, 0, 4095, 333, 1500],
                           impl="cuda", nh=3, repeat=3, blocks_per_sm=blocks_per_sm, merge_kernel=merge_kernel)
    finally:
        cuda_ops.PDL, cuda_ops.SUM_B_FIRST = saved


@pytest.mark.gpu
def test_paged_decode_cuda_rejects_gpu():
    """The CUDA predicate declines what its kernel does not take (the op table then asks Triton), and the op itself
    says why in one line."""
    fn, supports = decode_impl("cuda")
    layout = Layout([5, 40])
    q = randn(2, 2, 64, dtype=torch.float16, seed=1)
    kp = randn(layout.num_blocks, 2, BS, 64, dtype=torch.float16, seed=2)
    args = (layout.block_tables, layout.seqlens, 0.125)
    assert supports(q, kp, kp, *args)
    assert not supports(q, kp, kp, layout.block_tables.long(), *args[1:])  # int64 tables: Triton's
    assert not supports(q, kp, kp, args[0], layout.seqlens.long(), args[2])
    odd = randn(layout.num_blocks, 2, 12, 64, dtype=torch.float16, seed=3)  # block size 12: not a power of two
    assert not supports(q, odd, odd, *args)
    assert not supports(q[..., :48].contiguous(), kp[..., :48].contiguous(), kp[..., :48].contiguous(), *args)
    assert not supports(q, kp.transpose(1, 2), kp.transpose(1, 2), *args)
    assert not supports(q.double(), kp.double(), kp.double(), *args)
    wide = torch.zeros(2, 256 * 256 + 1, dtype=torch.int32, device=DEV)  # wider than the kernel's split plan allows
    assert not supports(q, kp, kp, wide, *args[1:])
    with pytest.raises(RuntimeError, match="block_tables must be Int"):
        torch.ops.neox_rt.paged_decode_attention(q, kp, kp, layout.block_tables.long(), layout.seqlens, 0.1)
    with pytest.raises(RuntimeError, match="power of two"):
        torch.ops.neox_rt.paged_decode_attention(q, odd, odd, *args)
    with pytest.raises(RuntimeError, match="block_tables must be"):
        torch.ops.neox_rt.paged_decode_attention(q, kp, kp, layout.block_tables[:1], layout.seqlens, 0.1)


@pytest.mark.gpu
def test_paged_decode_cuda_opcheck_gpu():
    """torch.library.opcheck: the schema and the fake of the CUDA op."""
    decode_impl("cuda")
    layout = Layout([5, 40])
    q = randn(2, 2, 64, dtype=torch.float16, seed=1)
    kp = randn(layout.num_blocks, 2, BS, 64, dtype=torch.float16, seed=2)
    torch.library.opcheck(torch.ops.neox_rt.paged_decode_attention,
                          (q, kp, kp, layout.block_tables, layout.seqlens, 0.125),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["reference"] + GPU_IMPLS)
def test_paged_decode_graph_capture_gpu(impl):
    """Captured once, replayed with new seqlens and new block tables (other blocks, the same shapes): no host sync,
    a grid that depends on the shapes only; every replay equals an eager call bit for bit and the fp64 math by the
    rule."""
    fn = paged_decode_attention_ref if impl == "reference" else decode_impl(impl)[0]
    lengths = [1, 16, 300, 2047]
    layout, other = Layout(lengths, seed=1), Layout(lengths, seed=9)  # two block assignments, same table shape
    assert other.block_tables.shape == layout.block_tables.shape and other.num_blocks == layout.num_blocks
    kp = randn(layout.num_blocks, 4, BS, 128, dtype=torch.float16, seed=2)
    vp = randn(layout.num_blocks, 4, BS, 128, dtype=torch.float16, seed=3)
    q = randn(4, 4, 128, dtype=torch.float16, seed=4)
    tables, seqlens = layout.block_tables.clone(), layout.seqlens.clone()  # the graph's static inputs
    fn(q, kp, vp, tables, seqlens, 0.1)  # compile / allocate the merge counters outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(q, kp, vp, tables, seqlens, 0.1)
    for source, new_lengths in ((layout, [2, 17, 299, 2000]), (layout, [1, 1, 1, 1]), (other, lengths),
                                (other, [0, 5, 0, 1024])):
        tables.copy_(source.block_tables)
        seqlens.copy_(torch.tensor(new_lengths, device=DEV))
        graph.replay()
        torch.testing.assert_close(out, fn(q, kp, vp, tables, seqlens, 0.1), rtol=0, atol=0)
        ref64 = paged_math(q, kp, vp, tables, seqlens, 0.1, torch.float64)
        torch_low = paged_math(q, kp, vp, tables, seqlens, 0.1, torch.float16)
        assert_by_rule(out, torch_low, ref64, torch.float16, f"{impl} replay {new_lengths}")


@pytest.mark.gpu
def test_op_table_serves_paged_decode_from_cuda_gpu():
    """The default GPU selection: paged_decode_attention is CUDA first (int32 tables), Triton where CUDA declines
    (int64 tables), the reference past both."""
    if cuda_backend() is None:
        pytest.skip("neox_rt._C is not built here")
    try:
        ops.select_backend(None, "cuda")
        op = ops.OPS["paged_decode_attention"]
        assert op.backend == "cuda+triton"
        layout = Layout([5, 17, 0])
        kp = randn(layout.num_blocks, 2, BS, 64, dtype=torch.float16, seed=1)
        q = randn(3, 2, 64, dtype=torch.float16, seed=2)
        args = (q, kp, kp, layout.block_tables, layout.seqlens, 0.125)
        assert op.served_by(*args) == "cuda"
        assert op.served_by(q, kp, kp, layout.block_tables.long(), layout.seqlens, 0.125) == "triton"
        assert op.served_by(q.double(), kp.double(), kp.double(), *args[3:]) == "torch"
        ref64 = paged_math(q, kp, kp, layout.block_tables, layout.seqlens, 0.125, torch.float64)
        torch_low = paged_math(q, kp, kp, layout.block_tables, layout.seqlens, 0.125, torch.float16)
        assert_by_rule(op(*args), torch_low, ref64, torch.float16, "op table, cuda")
    finally:
        ops.reset()


# ----------------------------------------------------------------------------------------------------
# Paged prefill attention, Triton (chunked prefill, varlen): the interpreter on CPU, real sizes on the GPU
# ----------------------------------------------------------------------------------------------------

# (context before the chunk, chunk length) per sequence: a whole prompt in one chunk, ending mid-block; a chunk
# starting and ending mid-block (20..24); one token right after a block boundary; exactly a block at a block
# boundary; a sequence with no new token; a one-token prompt; a long chunk over several query and key tiles
PREFILL_CTX = [0, 20, 32, 16, 9, 0, 37]
PREFILL_NEW = [19, 5, 1, 16, 0, 1, 40]
# GPU: prompts up to 2048 tokens in one chunk, chunks after long contexts, one-token chunks, mid-block edges
PREFILL_CTX_GPU = [0, 0, 2047, 100, 1000, 5, 16, 0]
PREFILL_NEW_GPU = [2048, 1, 1, 77, 513, 300, 16, 0]


def chunk_math(q, kd, vd, ctx, new, scale, dtype):
    """Causal attention of each sequence's chunk (rows of q, one sequence after another) over its dense cache:
    query j of sequence i at position ctx[i] + j sees slots 0..that position; computed in ``dtype``."""
    outs, lo = [], 0
    for i, (c, n) in enumerate(zip(ctx, new)):
        if n:
            t = c + n
            kk, vv = kd[i, :, :t].to(dtype), vd[i, :, :t].to(dtype)  # [nh, t, hd]
            sc = torch.einsum("snd,ntd->nst", q[lo:lo + n].to(dtype), kk) * scale  # [nh, n, t]
            pos = torch.arange(c, t, device=q.device)
            sc = sc.masked_fill(torch.arange(t, device=q.device)[None, None, :] > pos[None, :, None], float("-inf"))
            p = torch.softmax(sc.float() if dtype != torch.float64 else sc, dim=-1).to(dtype)
            outs.append(torch.einsum("nst,ntd->snd", p, vv))
        lo += n
    return torch.cat(outs)


def check_paged_prefill(hd, dtype, ctx, new, bs=BS, nh=2, pad=3, seed=0, junk_tables=False, **kw):
    """The Triton kernel on the varlen chunks of sequences holding ctx[i] + new[i] tokens (NaN in every slot no
    sequence owns, tables with holes and stale entries) against fp64 math by the house rule; ``pad`` rows past the
    last sequence exactly zero; an output the wrapper allocates is NaN until written. ``junk_tables``: entries
    past each sequence's blocks far outside the cache (never dereferenced)."""
    lengths = [c + n for c, n in zip(ctx, new)]
    layout, kd, vd, kp, vp = paged_case(lengths, bs, nh, hd, dtype, seed, junk_tables)
    m = sum(new)
    qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = randn(m + pad, nh, hd, dtype=dtype, seed=seed + 3, scale=2.0)
    scale = hd ** -0.5
    args = (q, kp, vp, layout.block_tables, qsl, layout.seqlens, scale)
    assert k_paged.supports_paged_prefill_attention(*args)
    with poisoned_empty():
        out = k_paged.paged_prefill_attention(*args, **kw)
    assert out.shape == q.shape
    assert torch.equal(out[m:], torch.zeros_like(out[m:])), "padding rows must be zeros"
    if not m:
        return
    ref64 = chunk_math(q, kd, vd, ctx, new, scale, torch.float64)
    torch_low = chunk_math(q, kd, vd, ctx, new, scale, dtype)
    what = f"paged prefill hd={hd} {dtype} bs={bs} {kw}"
    if dtype == torch.float32:
        # fp32: the online softmax sums in another order than torch's, whose own fp32 error is near zero; as the
        # dense prefill kernel's fp32 test (tests/test_kernels_triton.py), 4 output ulps instead of 1
        assert torch.isfinite(out).all(), f"{what}: non-finite output"
        err = (out[:m].double() - ref64).abs().max().item()
        torch_err = (torch_low.double() - ref64).abs().max().item()
        assert err <= 2 * torch_err + 4 * torch.finfo(dtype).eps * ref64.abs().max().item(), (what, err, torch_err)
    else:
        assert_by_rule(out[:m], torch_low, ref64, dtype, what)


@pytest.mark.skipif(GPU, reason="interpreter sizes; the GPU tests below run the same cases larger")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd", HEAD_SIZES)
def test_paged_prefill_triton(hd, dtype):
    check_paged_prefill(hd, dtype, PREFILL_CTX, PREFILL_NEW)  # the wrapper's tiles
    # small tiles: several query tiles per chunk, key tiles before the diagonal (unmasked) and on it
    check_paged_prefill(hd, dtype, PREFILL_CTX, PREFILL_NEW, seed=5, block_m=16, block_n=16)


@pytest.mark.skipif(GPU, reason="interpreter sizes; the GPU tests below run the same cases larger")
@pytest.mark.parametrize("bs", [8, 16, 32])
def test_paged_prefill_triton_block_sizes(bs):
    """A key tile over several blocks (bs 8), one block (16), part of a block (32); chunks on and off block edges."""
    check_paged_prefill(80, torch.float16, [0, 5, 37, 30], [29, 3, 40, 1], bs=bs, block_m=16, block_n=16)
    check_paged_prefill(64, torch.float32, [0, 7, 3], [8, 9, 24], bs=bs, seed=2, block_m=16, block_n=32)


@pytest.mark.skipif(GPU, reason="interpreter sizes")
def test_paged_prefill_triton_edges():
    """No sequence at all (every row padding), sequences with no new token, a step without padding rows, int64
    indices, a strided q (the model's q[num_decodes:] slice of a wider tensor)."""
    kp = randn(3, 2, BS, 32, seed=1)
    q = randn(5, 2, 32, seed=2)
    empty = torch.zeros(0, 4, dtype=torch.int32, device=DEV)
    zero_qsl = torch.zeros(1, dtype=torch.int32, device=DEV)
    none = torch.zeros(0, dtype=torch.int32, device=DEV)
    with poisoned_empty():
        out = k_paged.paged_prefill_attention(q, kp, kp, empty, zero_qsl, none, 0.2)
    assert torch.equal(out, torch.zeros_like(q))
    check_paged_prefill(32, torch.float32, [3, 17], [0, 0], pad=4)  # every row padding, two sequences
    check_paged_prefill(32, torch.float16, [4, 0], [13, 7], pad=0)
    layout = Layout([12, 30], seed=3)
    kd, vd = dense_caches(layout, 2, 64, torch.float32, seed=4)
    kp, vp = layout.paged_from_dense(kd, 2, 64, torch.float32), layout.paged_from_dense(vd, 2, 64, torch.float32)
    wide = randn(20, 3, 64, seed=5)  # q = wide[:, 1:]: rows of stride 3 * 64, heads of 64
    qsl = torch.tensor([0, 5, 17])
    args = (wide[3:, 1:], kp, vp, layout.block_tables.long(), qsl, layout.seqlens.long(), 0.125)
    assert k_paged.supports_paged_prefill_attention(*args)
    got = k_paged.paged_prefill_attention(*args)
    torch.testing.assert_close(got, paged_prefill_attention_ref(*args), rtol=1e-5, atol=1e-5)


def test_supports_paged_prefill_rejects():
    layout = Layout([3, 20])
    kp = torch.randn(layout.num_blocks, 2, BS, 32)
    q = torch.randn(23, 2, 32)
    qsl = torch.tensor([0, 3, 23], dtype=torch.int32)
    tail = (layout.block_tables.cpu(), qsl, layout.seqlens.cpu(), 0.1)
    if not GPU:
        assert k_paged.supports_paged_prefill_attention(q, kp, kp, *tail)
    f = k_paged.supports_paged_prefill_attention
    assert not f(torch.randn(23, 2, 48), torch.randn(layout.num_blocks, 2, BS, 48),
                 torch.randn(layout.num_blocks, 2, BS, 48), *tail)  # head size 48
    assert not f(q, kp.half(), kp.half(), *tail)  # dtype mismatch
    assert not f(q.double(), kp.double(), kp.double(), *tail)
    assert not f(q, kp.transpose(1, 2), kp.transpose(1, 2), *tail)
    assert not f(q[None], kp, kp, *tail)
    assert not f(q, kp, kp, tail[0], qsl[:2], *tail[2:])  # query_start_loc must have b + 1 entries
    assert not f(q, kp, kp, tail[0], qsl.float(), *tail[2:])
    assert not f(q, kp, kp, tail[0].float(), *tail[1:])
    assert not f(q, kp, kp, *tail[:2], tail[2][:1], tail[3])
    assert not f(q, kp, kp, tail[0].t().contiguous().t(), *tail[1:])  # table rows not contiguous


@pytest.mark.skipif(GPU, reason="the interpreter's registration; the GPU selects its own backends")
def test_op_table_serves_paged_prefill_from_triton():
    """The triton backend registers the kernel; the default selection for a GPU ("fastest") gives it to Triton
    (the op has no CUDA implementation and is in neither CUDA preference set)."""
    try:
        assert ops.select_backend("triton") == "triton"
        op = ops.OPS["paged_prefill_attention"]
        layout = Layout([5, 17])
        kp = randn(layout.num_blocks, 2, BS, 32, seed=1)
        q = randn(9, 2, 32, seed=2)
        args = (q, kp, kp, layout.block_tables, torch.tensor([0, 2, 8], device=DEV), layout.seqlens, 0.2)
        assert op.served_by(*args) == "triton"
        torch.testing.assert_close(op(*args), paged_prefill_attention_ref(*args), rtol=1e-5, atol=1e-5)
        assert op.served_by(q.double(), kp.double(), kp.double(), *args[3:]) == "torch"
        assert "paged_prefill_attention" not in ops.PREFER_CUDA | ops.CUDA_THEN_TRITON
        ops.select_backend(None, "cuda")  # the GPU default, resolved on CPU (the CUDA extension may be absent)
        assert ops.OPS["paged_prefill_attention"].backend == "triton"
    finally:
        ops.reset()


def test_model_paged_step_triton_prefill_equals_reference():
    """Two varlen steps of a model through the paged cache (prompt chunks; then a decode, a chunk continuing
    mid-block and fresh prompts) with the Triton backend against the fp64 model by the house rule, the reference
    backend's fp32 run giving torch's own error; the paged prefill kernel serves every prefill call."""
    from neox_rt.engine.kv_cache import PagedKVCache
    from neox_rt.model.build import build_model, init_random
    from neox_rt.model.config import NeoXConfig
    from neox_rt.model.model import PagedAttentionMetadata

    config = NeoXConfig(vocab_size=96, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        max_position_embeddings=64)  # hd 64, rotary 16
    bs, num_blocks = 8, 20
    # step 1: A's whole prompt (13), B's first chunk (11); step 2: A decodes, B's chunk 11..30 (starts mid-block),
    # C a one-token prompt, D a prompt of exactly a block
    pool = torch.randperm(num_blocks, generator=gen(3)).tolist()
    blocks = {"A": pool[0:2], "B": pool[3:7], "C": pool[8:9], "D": pool[10:11]}  # holes between them
    steps = [([("A", 0, 13), ("B", 0, 11)], 0), ([("A", 13, 14), ("B", 11, 30), ("C", 0, 1), ("D", 0, 8)], 1)]
    ids_of = {name: torch.randint(0, 96, (30,), generator=gen(ord(name))).tolist() for name in "ABCD"}

    def run(backend, dtype):
        ops.select_backend(backend)
        model = build_model(config, dtype=dtype, device=DEV)
        init_random(model, seed=1, std=0.1)
        cache = PagedKVCache.for_model(model, num_blocks, bs)
        cache.k.fill_(float("nan"))  # slots no sequence owns: a read past a length shows
        cache.v.fill_(float("nan"))
        outs, calls = [], []
        op = ops.OPS["paged_prefill_attention"]
        if op.impls:  # record whether the kernel's predicate took each call
            (impl, supports), = op.impls
            op.impls = ((impl, lambda *a: calls.append(supports(*a)) or calls[-1]),)
        for chunks, num_decodes in steps:
            ids = [t for name, lo, hi in chunks for t in ids_of[name][lo:hi]]
            pos = [p for _, lo, hi in chunks for p in range(lo, hi)]
            slots = [blocks[name][p // bs] * bs + p % bs for name, lo, hi in chunks for p in range(lo, hi)]
            width = max(len(b) for b in blocks.values())
            tables = [blocks[name] + [0] * (width - len(blocks[name])) for name, _, _ in chunks]
            qsl = torch.tensor([0] + [hi - lo for _, lo, hi in chunks]).cumsum(0)
            meta = PagedAttentionMetadata(
                slot_mapping=torch.tensor(slots, device=DEV), block_tables=torch.tensor(tables, dtype=torch.int32,
                                                                                      device=DEV),
                seqlens=torch.tensor([hi for _, _, hi in chunks], dtype=torch.int32, device=DEV),
                query_start_loc=qsl.to(DEV, torch.int32), num_decodes=num_decodes)
            n = len(ids)
            outs.append(model(torch.tensor(ids, device=DEV)[None], torch.tensor(pos, device=DEV)[None], cache,
                              last_index=torch.arange(n, device=DEV), paged=meta))
        return outs, calls

    try:
        ref64, _ = run("torch", torch.float64)
        torch32, _ = run("torch", torch.float32)
        got, calls = run("triton", torch.float32)
    finally:
        ops.reset()
    assert calls and all(calls), calls  # one call a layer a step, each served by the kernel
    for step, (g, t, r) in enumerate(zip(got, torch32, ref64)):
        # fp32 end to end through two layers of kernels (LayerNorm, rotary, attention): 4 ulps of the largest logit
        assert torch.isfinite(g).all()
        err, torch_err = (g.double() - r).abs().max().item(), (t.double() - r).abs().max().item()
        assert err <= 2 * torch_err + 4 * torch.finfo(torch.float32).eps * r.abs().max().item(), (step, err, torch_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hd", HEAD_SIZES)
def test_paged_prefill_triton_gpu(hd, dtype):
    check_paged_prefill(hd, dtype, PREFILL_CTX_GPU, PREFILL_NEW_GPU, nh=3, junk_tables=True)
    check_paged_prefill(hd, dtype, PREFILL_CTX, PREFILL_NEW, seed=5)  # the CPU case: short chunks, small tiles


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [1, 8, 16, 32, 128])
@pytest.mark.parametrize("hd,dtype", [(128, torch.float16), (96, torch.bfloat16), (64, torch.float32)])
def test_paged_prefill_block_sizes_gpu(bs, hd, dtype):
    check_paged_prefill(hd, dtype, [0, 5, 37, 30, 700], [29, 3, 40, 1, 333], bs=bs, nh=3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paged_prefill_20b_shape_gpu(dtype):
    """GPT-NeoX-20B's 64 heads of 96: a 2048-token prompt in one chunk beside chunks after long contexts."""
    check_paged_prefill(96, dtype, [0, 1500, 3, 0], [2048, 548, 1, 17], nh=64, junk_tables=True)
