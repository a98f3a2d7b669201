"""The peer-to-peer all-reduce kernel (csrc/kernels/allreduce.cuh, ``torch.ops.neox_rt.p2p_all_reduce``).

On one GPU several "ranks" run in one process, each on its own stream, their buffers plain device memory of the
same GPU (what symmetric memory maps across GPUs): each rank's kernel pushes its flagged input into the others'
buffers and waits for theirs, so the kernels only finish if they run concurrently and the protocol is right. The sum
must be the fp32 sum in rank order rounded once, the same bits on every rank, over many calls (both parities, the
sequence numbers growing). The two-GPU path (symmetric memory, NCCL beside it) is tested in test_tensor_parallel.py. The selection
logic (which tensors go to the kernel, the setting) is tested on CPU.
"""
from __future__ import annotations

import pytest
import torch

from neox_rt.parallel import p2p as parallel
from neox_rt.errors import NeoxRtError
from neox_rt.parallel import P2P_HEADER_BYTES, P2P_SLOT_BYTES, P2PAllReduce

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


class _Handle:
    def __init__(self, ptrs):
        self.buffer_ptrs = ptrs


def test_p2p_mode_setting(monkeypatch):
    monkeypatch.delenv("NEOX_RT_P2P_ALLREDUCE", raising=False)
    assert parallel.p2p_mode() == 1
    for v in ("0", "1", "2"):
        monkeypatch.setenv("NEOX_RT_P2P_ALLREDUCE", v)
        assert parallel.p2p_mode() == int(v)
    monkeypatch.setenv("NEOX_RT_P2P_ALLREDUCE", "yes")
    with pytest.raises(NeoxRtError, match="NEOX_RT_P2P_ALLREDUCE='yes'"):
        parallel.p2p_mode()


def test_p2p_wants_only_small_aligned_cuda_tensors_in_graphs(monkeypatch):
    """CPU tensors, odd sizes, non-contiguous or oversized tensors go to NCCL; mode 1 only while capturing."""
    p2p = P2PAllReduce(torch.empty(0), _Handle([16, 32]), rank=0, mode=2)
    assert not p2p.wants(torch.zeros(8))  # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert p2p.wants(torch.zeros(8))  # 32 bytes
    assert not p2p.wants(torch.zeros(3))  # 12 bytes: not a multiple of 16
    assert not p2p.wants(torch.zeros(0))
    assert not p2p.wants(torch.zeros(P2P_SLOT_BYTES // 8 + 4))  # over half the slot
    assert p2p.wants(torch.zeros(P2P_SLOT_BYTES // 8))
    assert not p2p.wants(torch.zeros(8, 2).t())  # not contiguous
    assert not p2p.wants(torch.zeros(8, dtype=torch.int32))
    graphs_only = P2PAllReduce(torch.empty(0), _Handle([16, 32]), rank=0, mode=1)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not graphs_only.wants(torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert graphs_only.wants(torch.zeros(8))


def test_p2p_off_reasons_on_cpu(monkeypatch):
    monkeypatch.setenv("NEOX_RT_P2P_ALLREDUCE", "0")
    assert parallel._p2p_local_reason(2, torch.device("cpu")) == "NEOX_RT_P2P_ALLREDUCE=0"
    monkeypatch.setenv("NEOX_RT_P2P_ALLREDUCE", "1")
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    assert parallel._p2p_local_reason(2, torch.device("cpu")) == "NCCL_P2P_DISABLE is set"
    monkeypatch.delenv("NCCL_P2P_DISABLE")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert parallel._p2p_local_reason(4, torch.device("cpu")) == "the ranks span several nodes"
    assert "more than" in parallel._p2p_local_reason(16, torch.device("cpu"))
    if not torch.cuda.is_available():
        assert parallel._p2p_local_reason(2, torch.device("cpu")) == "fewer GPUs than ranks on this node"


# ----------------------------------------------------------------------------------------------------
# GPU: several ranks in one process
# ----------------------------------------------------------------------------------------------------

def _buffers(world: int, slot: int = P2P_SLOT_BYTES):
    return [torch.zeros(P2P_HEADER_BYTES + 2 * world * slot, dtype=torch.uint8, device="cuda")
            for _ in range(world)]


def _run_ranks(ext, xs, bufs, slot=P2P_SLOT_BYTES, pdl=False):
    """Each rank's call on its own stream (concurrently), the outputs after all finished."""
    ptrs = [b.data_ptr() for b in bufs]
    streams = [torch.cuda.Stream() for _ in xs]
    outs = []
    torch.cuda.synchronize()
    for r, (x, s) in enumerate(zip(xs, streams)):
        with torch.cuda.stream(s):
            outs.append(ext.p2p_all_reduce(x, ptrs, r, slot, pdl))
    torch.cuda.synchronize()
    return outs


def _expected(xs):
    acc = torch.zeros_like(xs[0], dtype=torch.float32)
    for x in xs:
        acc += x.float()
    return acc.to(xs[0].dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world", [2, 3, 4])
def test_p2p_all_reduce_ranks_on_streams(ext, dtype, world):
    """Many calls (both parities, counters growing) of varied sizes: every rank gets the fp32 sum in rank order,
    rounded once, bit for bit."""
    bufs = _buffers(world)
    g = torch.Generator(device="cuda").manual_seed(world)
    elems16 = 16 // torch.tensor([], dtype=dtype).element_size()
    most = P2P_SLOT_BYTES // 2 // (16 // elems16)  # half a slot
    for call, n in enumerate([6144, 6144, 8 * elems16, elems16, 6144 * 2, most, 6144]):
        xs = [torch.randn(1, 1, n, generator=g, device="cuda").mul_(3).to(dtype) for _ in range(world)]
        outs = _run_ranks(ext, xs, bufs, pdl=call % 2 == 1)
        want = _expected(xs)
        for r, out in enumerate(outs):
            assert out.shape == xs[r].shape and out.dtype == dtype
            assert torch.equal(out, want), (call, n, r)


@pytest.mark.gpu
def test_p2p_all_reduce_inputs_unchanged_and_state_advances(ext):
    bufs = _buffers(2)
    xs = [torch.randn(6144, device="cuda", dtype=torch.float16) for _ in range(2)]
    copies = [x.clone() for x in xs]
    for _ in range(5):
        _run_ranks(ext, xs, bufs)
    for x, c in zip(xs, copies):
        assert torch.equal(x, c)
    for b in bufs:
        assert b[128:136].view(torch.int32).tolist() == [5, 0]  # the sequence number of the last call, no error


@pytest.mark.gpu
def test_p2p_all_reduce_bad_input(ext):
    bufs = _buffers(2)
    ptrs = [b.data_ptr() for b in bufs]
    x = torch.randn(6144, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="needs 2 to 8 buffers"):
        ext.p2p_all_reduce(x, ptrs[:1], 0, P2P_SLOT_BYTES)
    with pytest.raises(RuntimeError, match=r"rank 2 is not in \[0, 2\)"):
        ext.p2p_all_reduce(x, ptrs, 2, P2P_SLOT_BYTES)
    with pytest.raises(RuntimeError, match=r"at most 65536 \(half a slot\); got 65552 bytes"):
        ext.p2p_all_reduce(torch.zeros(32776, device="cuda", dtype=torch.float16), ptrs, 0, P2P_SLOT_BYTES)
    with pytest.raises(RuntimeError, match="multiple of 16 bytes"):
        ext.p2p_all_reduce(torch.zeros(7, device="cuda", dtype=torch.float16), ptrs, 0, P2P_SLOT_BYTES)
    with pytest.raises(RuntimeError, match="buffer 1 is null"):
        ext.p2p_all_reduce(x, [ptrs[0], 0], 0, P2P_SLOT_BYTES)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        ext.p2p_all_reduce(torch.zeros(8, device="cuda", dtype=torch.int32), ptrs, 0, P2P_SLOT_BYTES)
    with pytest.raises((RuntimeError, NotImplementedError), match="CPU"):  # no CPU kernel is registered
        ext.p2p_all_reduce(torch.zeros(8), ptrs, 0, P2P_SLOT_BYTES)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("h", [768, 6144])  # a reducing block of 128 threads / of 512 (20B's hidden: 768 vectors)
def test_sum_push_then_reduce_dual_layernorm(ext, dtype, world, h):
    """The fused form, several calls interleaved with the separate kernel (one sequence number for both): each rank's
    gemv_sum pushes its output (its own result unchanged), each rank's p2p_reduce_dual_layernorm returns the fp32 sum
    in rank order rounded once (bit for bit) and the dual LayerNorm of exactly that."""
    k1, k2 = 256, 1024
    bufs = _buffers(world)
    ptrs = [b.data_ptr() for b in bufs]
    g = torch.Generator(device="cuda").manual_seed(7)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    ln = [rnd(h, scale=0.1) + 1, rnd(h, scale=0.1), rnd(h, scale=0.1) + 1, rnd(h, scale=0.1)]
    streams = [torch.cuda.Stream() for _ in range(world)]
    for call in range(4):
        args = [(rnd(1, 1, k1), rnd(h, k1, scale=0.05), rnd(1, 1, k2), rnd(h, k2, scale=0.05), rnd(h), rnd(h),
                 rnd(1, 1, h) if r == 0 else None) for r in range(world)]
        torch.cuda.synchronize()
        partials, reduced = [], []
        for r, s in enumerate(streams):
            with torch.cuda.stream(s):
                partials.append(ext.gemv_sum(*args[r], 0, 0, call % 2 == 0, ptrs, r, P2P_SLOT_BYTES))
        for r, s in enumerate(streams):
            with torch.cuda.stream(s):
                reduced.append(ext.p2p_reduce_dual_layernorm(partials[r], ptrs, r, P2P_SLOT_BYTES, *ln, 1e-5,
                                                             call % 2 == 1))
        torch.cuda.synchronize()
        want = _expected(partials)
        want_ln = ext.dual_layernorm(want, *ln, 1e-5)
        for r in range(world):
            assert torch.equal(partials[r], ext.gemv_sum(*args[r], 0, 0, False)), (call, r)
            xs, a, m = reduced[r]
            assert torch.equal(xs, want), (call, r)
            # the same LayerNorm of the same x; its block may have more threads than the plain kernel's (128), so
            # the fp32 statistics are summed in another order: within one fp16 rounding
            for got, ref in ((a, want_ln[0]), (m, want_ln[1])):
                torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -9, atol=1e-3, msg=f"{call} {r}")
        if call == 1:  # the separate all-reduce in between takes the next sequence number
            xs = [rnd(1, 1, h) for _ in range(world)]
            assert all(torch.equal(o, _expected(xs)) for o in _run_ranks(ext, xs, bufs))
    for b in bufs:
        assert b[128:136].view(torch.int32).tolist() == [5, 0]


@pytest.mark.gpu
def test_sum_push_bad_input(ext):
    bufs = _buffers(2)
    ptrs = [b.data_ptr() for b in bufs]
    x1, w1 = torch.randn(1, 64, device="cuda", dtype=torch.float16), torch.randn(6, 64, device="cuda",
                                                                                  dtype=torch.float16)
    with pytest.raises(RuntimeError, match="out_features % 4 == 0"):
        ext.gemv_sum(x1, w1, x1, w1, None, None, None, 0, 0, False, ptrs, 0, P2P_SLOT_BYTES)
    with pytest.raises(RuntimeError, match="takes one row"):
        w = torch.ones(64, device="cuda", dtype=torch.float16)
        ext.p2p_reduce_dual_layernorm(torch.zeros(2, 64, device="cuda", dtype=torch.float16), ptrs, 0,
                                      P2P_SLOT_BYTES, w, w, w, w, 1e-5)
