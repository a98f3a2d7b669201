"""bench/profile_decode.py's bookkeeping (CPU): kernels of a step assigned to layers and slots."""
from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
profile_decode = pytest.importorskip("profile_decode")


def _step(layers: int, t0: float = 0.0):
    """A decode step as the runtime launches it: embedding, per layer 7 kernels, final LN, LM head, argmax."""
    names = ["indexSelectLargeIndex"]
    for _ in range(layers):
        names += ["_dual_layernorm_kernel", "gemv_kernel<1,1,4>", "rotary_kv_write_kernel",
                  "_decode_attention_kernel", "_decode_merge_kernel", "gemv_kernel<1,1,4>", "gemv_kernel<1,1,4>",
                  "gemv_kernel<1,1,4>"]
    names += ["_layernorm_kernel", "sm90_xmma_gemm_f16", "argmax_kernel"]
    kernels, t = [], t0
    for n in names:
        dur = 10.0 if "gemv" in n else 2.0
        kernels.append((n, t, dur))
        t += dur + 1.0  # a 1 us gap after every kernel
    return kernels


def test_assign_fused_pair_slots():
    """With the fused GEMV pairs a layer has two linear kernels, each in its own slot."""
    names = ["indexSelectLargeIndex"]
    for _ in range(2):
        names += ["_dual_layernorm_kernel", "void neox_rt::gemv_pair_kernel<__half, 2, 3, true>",
                  "rotary_kv_write_kernel", "_decode_attention_kernel",
                  "void neox_rt::gemv_sum_kernel<__half, 2, 3, true>"]
    names += ["_layernorm_kernel", "sm90_xmma_gemm_f16", "argmax_kernel"]
    kernels = [(n, 3.0 * i, 2.0) for i, n in enumerate(names)]
    slots, extra, _ = profile_decode.assign(kernels, 2)
    for layer in range(2):
        assert slots[(layer, "qkv + h->4h")] == [2.0] and slots[(layer, "dense + 4h->h")] == [2.0]
        assert not any((layer, lin) in slots for lin in ("qkv", "dense", "h->4h", "4h->h"))


def test_assign_slots_per_layer():
    slots, extra, _ = profile_decode.assign(_step(3), 3)
    assert set(extra) == {"embedding", "final LN + LM head + argmax"}
    for layer in range(3):
        assert len(slots[(layer, "layernorm")]) == 1
        for lin in ("qkv", "dense", "h->4h", "4h->h"):
            assert slots[(layer, lin)] == [10.0], (layer, lin)
        assert len(slots[(layer, "attention")]) == 2  # decode kernel + merge
        assert len(slots[(layer, "rotary+kv write")]) == 1


def test_summarize_gaps_and_bandwidth():
    steps = [_step(2, t0=1000.0 * i) for i in range(3)]
    wb = {"qkv": 3e6, "dense": 1e6, "h->4h": 4e6, "4h->h": 4e6}
    r = profile_decode.summarize(steps, 2, wb, copy_bw=3e12)
    n_kernels = len(steps[0])
    busy = sum(d for _, _, d in steps[0])
    assert r["kernel_busy_us_per_token"] == pytest.approx(busy)
    assert r["gaps_us_per_token"] == pytest.approx(n_kernels - 1)  # one 1 us gap between consecutive kernels
    qkv = r["slots"]["qkv"]
    assert qkv["kernels_per_layer"] == 1 and qkv["us_per_layer"] == pytest.approx(10.0)
    assert qkv["GBps"] == pytest.approx(3e6 / 10e-6 / 1e9)  # 300 GB/s: bytes per layer / us per layer
    # with a gap before every kernel, each adds its own duration plus the gap before it
    assert qkv["added_us_per_layer"] == pytest.approx(11.0)


def test_summarize_added_wall_under_overlap():
    """Kernels that start early (PDL) and overlap their predecessor add only what they run past its end."""
    step = [(n, 8.0 * i, 10.0) for i, (n, _, _) in enumerate(_step(2))]  # each starts 2 us before the last ends
    r = profile_decode.summarize([step], 2, {}, copy_bw=3e12)
    assert r["slots"]["qkv"]["us_per_layer"] == pytest.approx(10.0)
    assert r["slots"]["qkv"]["added_us_per_layer"] == pytest.approx(8.0)
    assert r["slots"]["attention"]["added_us_per_layer"] == pytest.approx(16.0)  # two kernels
    total = sum(v.get("added_us_per_layer", 0.0) * 2 for v in r["slots"].values())
    total += sum(v.get("added_us_per_token", 0.0) for v in r["slots"].values())
    assert total == pytest.approx(r["wall_us_per_token"])  # the adds partition the wall


def test_assign_rejects_unrecognised_step():
    assert profile_decode.assign([("gemv_kernel", 0.0, 1.0)], 2) == (None, None, None)


def test_assign_sequential_residual_layers():
    """A sequential-residual layer has two LayerNorm kernels; both belong to the layer they start."""
    names = ["indexSelectLargeIndex"]
    for _ in range(2):
        names += ["_layernorm_kernel", "gemv_kernel", "rotary_kv_write_kernel", "_decode_split_kernel",
                  "gemv_kernel", "_layernorm_kernel", "gemv_kernel", "gemv_kernel"]
    names += ["_layernorm_kernel", "sm90_xmma_gemm_f16"]
    kernels = [(n, float(i), 1.0) for i, n in enumerate(names)]
    slots, _, _ = profile_decode.assign(kernels, 2)
    for layer in range(2):
        assert len(slots[(layer, "layernorm")]) == 2
        assert all(len(slots[(layer, s)]) == 1 for s in ("qkv", "dense", "h->4h", "4h->h"))


def test_assign_quantized_fused_layers():
    """A quantized layer as the runtime launches it at one row of 1.4b: the pair with the LayerNorm inside (no
    LayerNorm kernel: the pair starts its layer), attention with rotary + KV write inside, the fused sum."""
    names = ["indexSelectLargeIndex"]
    for _ in range(3):
        names += ["void neox_rt::quant_gemm_pair_kernel<__half, neox_rt::QuantInt4, 1, true>",
                  "void neox_rt::decode_attention_split_kernel<__half, 128, true, true, 6, neox_rt::DecodeNewToken<__half> >",
                  "void neox_rt::quant_gemm_sum_kernel<__half, neox_rt::QuantInt4, 1>"]
    names += ["_layernorm_kernel", "gemv_kernel<1,1,4>", "argmax_kernel"]
    kernels = [(n, 3.0 * i, 2.0) for i, n in enumerate(names)]
    slots, extra, _ = profile_decode.assign(kernels, 3)
    for layer in range(3):
        for slot in ("qkv + h->4h", "attention", "dense + 4h->h"):
            assert slots[(layer, slot)] == [2.0], (layer, slot)
        assert (layer, "rotary+kv write") not in slots and (layer, "layernorm") not in slots
    assert extra["embedding"] == [2.0] and len(extra["final LN + LM head + argmax"]) == 3
