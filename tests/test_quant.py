"""Weight-only quantization (#24) on CPU: the formats, quantizing a model in place and at load, quantized checkpoints
(ours and GPTQ's layout, written here by a writer that follows AutoGPTQ's documented packing), and fidelity of the
embedded default model (held-out perplexity, greedy agreement)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file

import neox_rt
from neox_rt.default_model import default_model_path
from neox_rt.engine.kv_cache import KVCache
from neox_rt.errors import NeoxRtError
from neox_rt.model.config import NeoXConfig
from neox_rt.model.layers import Linear
from neox_rt.quant.apply import memory_report, prepare_weights, quantize_model
from neox_rt.quant.formats import (Int4Weight, Int8Weight, TiledInt4Weight, TiledInt8Weight, check_row_shard_groups,
                                   pack_int4, tile_rows, unpack_int4, untile_rows)
from tests.conftest import REPO, train_tool


TINY = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=32, rotary_pct=0.25)


def tiny_checkpoint(tmp_path, seed=3, **overrides):
    """A random tiny float HF checkpoint: (directory, model)."""
    config = NeoXConfig(**{**TINY, **overrides})
    model = neox_rt.build_model(config)
    neox_rt.init_random(model, seed=seed, std=0.1)
    d = tmp_path / "fp"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    cfg = {"model_type": "gpt_neox", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
           "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
           "intermediate_size": config.intermediate_size, "max_position_embeddings": config.max_position_embeddings,
           "rotary_pct": config.rotary_pct, "use_parallel_residual": True, "hidden_act": "gelu",
           "tie_word_embeddings": False, "layer_norm_eps": 1e-5, "rotary_emb_base": 10000}
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d), model


def logits(model, ids=(5, 17, 3, 42, 8, 1)):
    ids = torch.tensor([list(ids)])
    return model(ids, torch.arange(ids.shape[1])[None], KVCache.for_model(model, 1, 16))


def dequantized_copy(quantized, config):
    """A float model holding the dequantized weights of ``quantized`` as plain parameters."""
    plain = neox_rt.build_model(config)
    state = {}
    for name, mod in quantized.named_modules():
        if isinstance(mod, Linear):
            w = mod.weight
            state[f"{name}.weight"] = w.dequantize(torch.float32) if not isinstance(w, torch.Tensor) else w
            if mod.bias is not None:
                state[f"{name}.bias"] = mod.bias
    for name, p in quantized.named_parameters():
        state.setdefault(name, p)
    plain.load_state_dict(state)
    return plain


# ----------------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k,group", [(256, 128), (300, 128), (100, 32), (72, 64)])
def test_int4_rtn_error_and_layout(k, group):
    """Every value within half a step of its group; the last group may be shorter; the packed layout is the one
    documented (value i of a row in word i // 8 at bits 4 * (i % 8), bytes with even i in the low nibble)."""
    w = torch.randn(7, k) * torch.linspace(0.1, 3, k)  # groups of different ranges
    fmt = Int4Weight.quantize(w, group)
    assert fmt.qweight.shape == (7, -(-k // 8)) and fmt.scales.shape == (7, -(-k // group))
    deq = fmt.dequantize(torch.float32)
    g = torch.arange(k) // group
    assert ((deq - w).abs() <= fmt.scales[:, g] / 2 * (1 + 1e-5)).all()
    q = fmt.unpacked()
    assert int(q.max()) <= 15
    words = fmt.qweight
    i = 13
    assert int((words[2, i // 8] >> (4 * (i % 8))) & 0xF) == int(q[2, i])
    assert torch.equal(fmt.qweight.view(torch.uint8)[:, : k // 2] & 0xF, q[:, 0:2 * (k // 2):2])
    assert torch.equal(unpack_int4(pack_int4(q), k), q)


def test_int8_rtn_and_module_behaviour():
    w = torch.randn(9, 40, dtype=torch.float16)
    fmt = Int8Weight.quantize(w)
    assert fmt.scales.dtype == torch.float16 and fmt.qweight.abs().max() <= 127
    assert ((fmt.dequantize(torch.float32) - w.float()).abs() <= fmt.scales.float()[:, None] / 2 * 1.001).all()
    assert fmt.nbytes() == 9 * 40 + 9 * 2 and fmt.shape == (9, 40)
    assert sorted(fmt.state_dict()) == ["qweight", "scales"]
    zero = Int8Weight.quantize(torch.zeros(2, 16))
    assert torch.equal(zero.dequantize(torch.float32), torch.zeros(2, 16))
    with pytest.raises(NeoxRtError, match="multiple of 8"):
        Int4Weight.quantize(w, 12)


def test_dequantize_in_row_chunks_equals_one_go(monkeypatch):
    """dequantize works a chunk of rows at a time (its fp32 temporaries bounded, #24's 15 GiB cap): with chunks of
    1 row, 3 rows and all rows, the same tensor bit for bit, ragged group included."""
    from neox_rt.quant import formats
    w = torch.randn(37, 300, dtype=torch.float16)
    for fmt in (Int8Weight.quantize(w), Int4Weight.quantize(w, 128)):
        monkeypatch.setattr(formats, "DEQUANT_CHUNK_ELEMS", 1 << 30)
        whole = {dtype: fmt.dequantize(dtype) for dtype in (torch.float16, torch.float32)}
        for chunk in (1, 3 * 300 + 5):
            monkeypatch.setattr(formats, "DEQUANT_CHUNK_ELEMS", chunk)
            for dtype, want in whole.items():
                got = fmt.dequantize(dtype)
                assert got.dtype == dtype and torch.equal(got, want), (type(fmt).__name__, chunk, dtype)


def test_tiled_layout_puts_each_chunk_of_a_tile_together():
    """tile_rows: byte b of row 16 T + r at chunk c lands at T * 16 * row_bytes + c * 1024 + r * 64 + b, the rows
    past n (padding to 16) are zero, and untile_rows gives the row-major tensor back, for int8 and int32 rows."""
    q = torch.randint(-127, 128, (37, 192), dtype=torch.int8)
    t = tile_rows(q)
    assert t.shape == (48, 192) and t.dtype == torch.int8
    flat, src = t.view(torch.uint8).flatten(), q.view(torch.uint8)
    for row in (0, 5, 15, 16, 36):
        for b in (0, 63, 64, 130, 191):
            tile, r = divmod(row, 16)
            c, off = divmod(b, 64)
            assert flat[tile * 16 * 192 + c * 1024 + r * 64 + off] == src[row, b], (row, b)
    assert not untile_rows(t, 48)[37:].any()  # the padding rows 37-47: zero
    assert torch.equal(untile_rows(t, 37), q)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (16, 48), dtype=torch.int32)
    assert torch.equal(untile_rows(tile_rows(words), 16), words)
    with pytest.raises(NeoxRtError, match="multiple of 64 bytes"):
        tile_rows(torch.zeros(16, 100, dtype=torch.int8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tiled_formats_are_the_same_weights(dtype):
    """TiledInt8Weight / TiledInt4Weight (the CUDA kernels' layout) dequantize to exactly the row-major format's
    weight and give it back unchanged (scales' bits, zero points up to 255, a ragged n), so the reference and every
    backend that declines them see the same weight."""
    w = torch.randn(45, 256, dtype=dtype)
    w8, w4 = Int8Weight.quantize(w), Int4Weight.quantize(w, 64)
    w4.zeros[3] = 255
    t8, t4 = TiledInt8Weight.from_row_major(w8), TiledInt4Weight.from_row_major(w4)
    assert t4.scale_zero.shape == (3, 4, 16) and t8.qweight.shape == (48, 256)
    assert (t8.out_features, t8.in_features, t4.out_features, t4.in_features) == (45, 256, 45, 256)
    assert t4.scale_zero[0, 1, 3].item() == (w4.scales[3, 1].view(torch.int16).item() & 0xFFFF) | (255 << 16)
    for t, fmt in ((t8, w8), (t4, w4)):
        back = t.row_major()
        assert type(back) is type(fmt)
        assert all(torch.equal(a, b) for a, b in zip(back.buffers(), fmt.buffers()))
        for out in (torch.float32, dtype):
            assert torch.equal(t.dequantize(out), fmt.dequantize(out))
    x = torch.randn(3, 256, dtype=torch.float32)
    for t, fmt in ((t8, w8), (t4, w4)):  # the reference op (dequantize, then matmul) on either form
        assert torch.equal(neox_rt.ops.linear_ref(x, t), neox_rt.ops.linear_ref(x, fmt))
    with pytest.raises(NeoxRtError, match="16-bit scales"):
        TiledInt4Weight.from_row_major(Int4Weight.quantize(torch.randn(16, 128), 128))


def test_prepare_weights_swaps_what_the_linear_op_converts(tmp_path):
    """quant.apply.prepare_weights asks the linear op (Op.prepare) once per quantized linear and installs what it
    returns; the reference backend converts nothing; the cuda backend's converter leaves CPU weights alone."""
    from neox_rt.ops import cuda as cuda_ops
    from neox_rt.ops.table import OPS
    _, model = tiny_checkpoint(tmp_path)
    quantize_model(model, "int8")
    before = {n: m.weight for n, m in model.named_modules() if isinstance(m, Linear)}
    assert prepare_weights(model) is model
    assert all(m.weight is before[n] for n, m in model.named_modules() if isinstance(m, Linear))
    assert all(cuda_ops.prepare_linear_weight(w) is w for w in before.values())
    want = logits(model)
    op = OPS["linear"]
    try:
        op.prepares = (lambda w: TiledInt8Weight.from_row_major(w) if type(w) is Int8Weight else w,)
        prepare_weights(model)
    finally:
        op.prepares = ()
    tiled = [m.weight for m in model.modules() if isinstance(m, Linear) and isinstance(m.weight, TiledInt8Weight)]
    report = memory_report(model)
    assert len(tiled) == 8 and report.quantized_linears == 8 and report.formats == {"int8 tiled": 8}
    assert "8 linears: 8 int8 tiled" in str(report)
    assert torch.equal(logits(model), want)  # the reference runs the tiled weights through dequantize


def test_a_group_never_straddles_a_shard():
    check_row_shard_groups(24576, 8, 128)  # 20B 4h->h at TP 8: 3072 = 24 groups each
    check_row_shard_groups(300, 1, 128)  # one rank: a short last group is fine
    with pytest.raises(NeoxRtError, match="straddle"):
        check_row_shard_groups(2560, 8, 128)  # 2.8b dense at TP 8: 320 per rank


# ----------------------------------------------------------------------------------------------------
# A model: in place, at load, exact against the dequantized weights
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_logits_equal_the_dequantized_model_exactly(tmp_path, fmt):
    """The reference runtime on the quantized model gives exactly the logits of the same model holding the
    dequantized weights as tensors (CPU, fp32): quantization adds no error beyond the weights' rounding."""
    directory, model = tiny_checkpoint(tmp_path)
    quantize_model(model, fmt, group_size=32, include_lm_head=True)
    assert memory_report(model).quantized_linears == 2 * 4 + 1
    assert torch.equal(logits(model), logits(dequantized_copy(model, model.config)))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantize_at_load_equals_quantizing_the_loaded_model(tmp_path, fmt):
    directory, _ = tiny_checkpoint(tmp_path)
    streamed = neox_rt.load(directory, quantize=fmt, group_size=32, progress=False)
    loaded = neox_rt.load(directory, progress=False)
    quantize_model(loaded.model, fmt, group_size=32)
    a, b = streamed.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = streamed.memory_report()
    assert report.quantized_linears == 8 and report.float_bytes["embedding"] == 96 * 64 * 4
    assert report.float_bytes["lm head"] == 96 * 64 * 4 and "quantized" in str(report)
    assert not any(p.is_meta for p in streamed.model.parameters())


# ----------------------------------------------------------------------------------------------------
# Our checkpoint: python -m neox_rt.quantize
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_cli_writes_a_checkpoint_that_loads_directly(tmp_path, bits):
    from neox_rt import quantize
    directory, _ = tiny_checkpoint(tmp_path)
    dst = str(tmp_path / f"q{bits}")
    assert quantize.main([directory, dst, "--bits", str(bits), "--group-size", "32", "--dtype", "float32"]) == 0
    cfg = json.loads(open(os.path.join(dst, "config.json")).read())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "neox_rt" and qc["bits"] == bits and qc["method"] == "rtn"
    loaded = neox_rt.load(dst, progress=False)
    fmt = "int8" if bits == 8 else "int4"
    want = neox_rt.load(directory, quantize=fmt, group_size=32, progress=False)
    assert memory_report(loaded.model).formats == {fmt: 8}
    assert torch.equal(logits(loaded.model), logits(want.model))
    with pytest.raises(NeoxRtError, match="already quantized"):
        neox_rt.load(dst, quantize="int8", progress=False)


def test_quantize_cli_errors(tmp_path, capsys):
    from neox_rt import quantize
    directory, _ = tiny_checkpoint(tmp_path)
    assert quantize.main([directory, str(tmp_path / "g"), "--bits", "4", "--method", "gptq"]) == 2
    assert "needs --calibration" in capsys.readouterr().err
    assert quantize.main([str(tmp_path / "nowhere"), str(tmp_path / "x"), "--bits", "8"]) == 2
    assert quantize.main([directory, str(tmp_path / "y"), "--bits", "4", "--group-size", "12"]) == 2


# ----------------------------------------------------------------------------------------------------
# GPTQ: a writer of the hub layout (AutoGPTQ's pack), then our loader
# ----------------------------------------------------------------------------------------------------

def gptq_pack_rows(q):
    """AutoGPTQ's qweight packing: int [in, out] -> int32 [in / 8, out], value i of a column in row i // 8 at bits
    4 * (i % 8)."""
    q = q.to(torch.int64)
    packed = torch.zeros(q.shape[0] // 8, q.shape[1], dtype=torch.int64)
    for j in range(8):
        packed |= q[j::8] << (4 * j)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def gptq_pack_cols(z):
    """AutoGPTQ's qzeros packing: int [groups, out] -> int32 [groups, out / 8] along the output dim."""
    z = z.to(torch.int64) & 0xF
    packed = torch.zeros(z.shape[0], z.shape[1] // 8, dtype=torch.int64)
    for j in range(8):
        packed |= z[:, j::8] << (4 * j)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def grouped_layer_linears(model, group):
    """(name, W^T in groups [in / group, group, out] fp32) of every linear of the model's layers."""
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and name.startswith("gpt_neox.layers"):
            w = mod.weight.detach().float()  # [out, in]
            yield name, w.t().reshape(w.shape[1] // group, group, w.shape[0])


def write_gptq(tmp_path, model, group=32, sym=False, v2=False, qc_overrides=None):
    """The tiny model's layer linears in the GPTQ layout (RTN with GPTQ's quantizer), everything else float; returns
    (directory, the dequantized weights by linear name, computed from the packed tensors as AutoGPTQ does)."""
    state, dense = {}, {}
    for name, wg in grouped_layer_linears(model, group):
        k, out = wg.shape[0] * group, wg.shape[2]
        if sym:
            scale = (wg.abs().amax(1) * 2 / 15).clamp(min=1e-8)
            zero = torch.full_like(scale, 8.0)
        else:
            lo, hi = wg.amin(1).clamp(max=0), wg.amax(1).clamp(min=0)
            scale = ((hi - lo) / 15).clamp(min=1e-8)
            zero = torch.round(-lo / scale)
        scale = scale.half()
        q = (torch.round(wg / scale.float()[:, None]) + zero[:, None]).clamp(0, 15).reshape(k, out)
        state[f"{name}.qweight"] = gptq_pack_rows(q)
        state[f"{name}.qzeros"] = gptq_pack_cols(zero.to(torch.int64) - (0 if v2 else 1))
        state[f"{name}.scales"] = scale
        state[f"{name}.g_idx"] = (torch.arange(k) // group).to(torch.int32)
        g = torch.arange(k) // group
        dense[name] = (scale.float()[g] * (q - zero[g])).t()  # the documented dequantization, [out, in]
    qc = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": sym,
          "checkpoint_format": "gptq_v2" if v2 else "gptq", **(qc_overrides or {})}
    return save_hub(tmp_path / ("gptq_v2" if v2 else "gptq"), tmp_path, model, state, dense, qc), dense


def save_hub(d, tmp_path, model, state, dense, qc) -> str:
    """A hub-layout checkpoint in directory ``d``: ``state`` (the quantized linears' tensors) with the float biases of
    those linears and every other parameter of ``model`` in fp16, and tiny_checkpoint's config with ``qc``."""
    for name in dense:
        if model.get_submodule(name).bias is not None:
            state[f"{name}.bias"] = model.get_submodule(name).bias.detach().half()
    for name, p in model.named_parameters():
        if not any(name == f"{n}.weight" or name == f"{n}.bias" for n in dense):
            state[name] = p.detach().half()
    d.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"))
    cfg = json.loads(open(os.path.join(str(tmp_path / "fp"), "config.json")).read())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("layout,options", [("gptq", dict(sym=False, v2=False)), ("gptq", dict(sym=True)),
                                            ("gptq", dict(v2=True)), ("awq", {})])
def test_hub_checkpoint_loads_as_its_dequantized_weights(tmp_path, layout, options):
    """Every quantized linear of a GPTQ (v1 or v2 zeros, symmetric or not) or AWQ GEMM checkpoint is exactly its
    documented dequantization, and the model's logits equal the reference runtime on those dequantized weights."""
    directory, model = tiny_checkpoint(tmp_path)
    hub_dir, dense = (write_gptq if layout == "gptq" else write_awq)(tmp_path, model, **options)
    loaded = neox_rt.load(hub_dir, progress=False).model
    assert memory_report(loaded).formats == {"int4": 8}
    for name, w in dense.items():
        got = loaded.get_submodule(name).weight
        assert isinstance(got, Int4Weight) and got.group_size == 32
        torch.testing.assert_close(got.dequantize(torch.float32), w, rtol=0, atol=0)
    assert torch.equal(logits(loaded), logits(dequantized_copy(loaded, loaded.config)))


@pytest.mark.parametrize("layout", ["gptq", "awq"])
def test_hub_missing_and_misshapen_tensors(tmp_path, layout):
    """A quantized linear's tensor missing, or one row short: one NeoxRtError naming it."""
    from safetensors.torch import load_file
    directory, model = tiny_checkpoint(tmp_path)
    hub_dir, _ = (write_gptq if layout == "gptq" else write_awq)(tmp_path, model)
    path = os.path.join(hub_dir, "model.safetensors")
    state = load_file(path)
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h"
    good = dict(state)
    del state[f"{name}.qzeros"]
    save_file(state, path)
    with pytest.raises(NeoxRtError, match="missing tensors: .*dense_4h_to_h.qzeros"):
        neox_rt.load(hub_dir, progress=False)
    for t in ("scales", "qzeros"):
        bad = dict(good)
        bad[f"{name}.{t}"] = good[f"{name}.{t}"][:-1].contiguous()
        save_file(bad, path)
        with pytest.raises(NeoxRtError, match=f"dense_4h_to_h.{t} has shape"):
            neox_rt.load(hub_dir, progress=False)


# ----------------------------------------------------------------------------------------------------
# AWQ: a writer of AutoAWQ's GEMM layout, then our loader
# ----------------------------------------------------------------------------------------------------

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's pack: nibble i of word j holds output column 8 j + AWQ_ORDER[i]


def awq_pack_cols(q):
    """AutoAWQ's GEMM packing of qweight and qzeros: int [r, out] -> int32 [r, out / 8] along the output dim, word j
    holding columns 8 j + AWQ_ORDER[i] at bits 4 i."""
    q = q.to(torch.int64) & 0xF
    packed = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for i, c in enumerate(AWQ_ORDER):
        packed |= q[:, c::8] << (4 * i)
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def write_awq(tmp_path, model, group=32, qc_overrides=None):
    """The tiny model's layer linears in AWQ's GEMM layout (asymmetric RTN with zero points), everything else float;
    returns (directory, the dequantized weights by linear name: scales[g, n] * (q[i, n] - zeros[g, n]))."""
    state, dense = {}, {}
    for name, wg in grouped_layer_linears(model, group):
        k, out = wg.shape[0] * group, wg.shape[2]
        lo, hi = wg.amin(1), wg.amax(1)
        scale = ((hi - lo) / 15).clamp(min=1e-5).half()
        zero = torch.round(-lo / scale.float()).clamp(0, 15)
        q = (torch.round(wg / scale.float()[:, None]) + zero[:, None]).clamp(0, 15).reshape(k, out)
        state[f"{name}.qweight"] = awq_pack_cols(q)
        state[f"{name}.qzeros"] = awq_pack_cols(zero)
        state[f"{name}.scales"] = scale
        g = torch.arange(k) // group
        dense[name] = (scale.float()[g] * (q - zero[g])).t()  # [out, in]
    qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
          **(qc_overrides or {})}
    return save_hub(tmp_path / "awq", tmp_path, model, state, dense, qc), dense


def test_awq_unpacks_the_interleaved_order():
    """One word by hand: columns 0..7 holding 0..7 pack as nibbles (0, 2, 4, 6, 1, 3, 5, 7) and unpack back."""
    from neox_rt.quant.checkpoint import _unpack_awq_cols
    q = torch.arange(8)[None]
    word = awq_pack_cols(q)
    assert word.item() == sum(c << (4 * i) for i, c in enumerate(AWQ_ORDER))
    assert _unpack_awq_cols(word).tolist() == [list(range(8))]


@pytest.mark.parametrize("layout,change,message", [
    ("gptq", dict(desc_act=True), "desc_act"),
    ("gptq", dict(bits=8), "bits 8"),
    ("gptq", dict(sym=True), "sym/asym mismatch"),  # the data is asymmetric
    ("gptq", dict(checkpoint_format="marlin"), "checkpoint_format"),
    ("awq", dict(version="gemv"), "version 'gemv' is not supported"),
    ("awq", dict(zero_point=False), "zero_point false"),
    ("awq", dict(bits=8), "bits 8"),
    ("awq", dict(group_size=12), "group_size 12"),
])
def test_hub_unsupported_variants_are_one_line(tmp_path, layout, change, message):
    directory, model = tiny_checkpoint(tmp_path)
    hub_dir, _ = (write_gptq if layout == "gptq" else write_awq)(tmp_path, model, qc_overrides=change)
    with pytest.raises(NeoxRtError, match=message) as e:
        neox_rt.load(hub_dir, progress=False)
    assert "\n" not in str(e.value)


def _tp_hub_worker(rank: int, world: int, port: int, dirs: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from tests.test_tensor_parallel import launch_rank
    tp = launch_rank(rank, world, port)
    try:
        shards = {}
        for method, d in dirs.items():
            m = neox_rt.load(d, dtype="float32", device="cpu", tp=tp, progress=False).model
            shards[method] = {n: mod.weight.dequantize(torch.float32) for n, mod in m.named_modules()
                              if isinstance(mod, Linear) and isinstance(mod.weight, Int4Weight)}
        torch.save(shards, os.path.join(out_dir, f"hub_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_hub_layouts_at_tp2_load_their_shards(tmp_path):
    """GPTQ and AWQ checkpoints at TP=2 (gloo): each rank reads its slice of the packed tensors (AWQ's words of 8
    outputs split whole between ranks, the groups of a row-parallel layer too), and the ranks' dequantized shards put
    together equal the TP=1 load's weights exactly."""
    import torch.multiprocessing as mp

    from neox_rt.parallel import tp_split_dim
    from tests.test_tensor_parallel import _free_port
    _, model = tiny_checkpoint(tmp_path)
    dirs = {"gptq": write_gptq(tmp_path, model)[0], "awq": write_awq(tmp_path, model)[0]}
    mp.spawn(_tp_hub_worker, args=(2, _free_port(), dirs, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(os.path.join(tmp_path, f"hub_rank{r}.pt")) for r in range(2)]
    for method, d in dirs.items():
        whole = neox_rt.load(d, progress=False).model
        assert len(ranks[0][method]) == 8, method
        for name, w0 in ranks[0][method].items():
            full = torch.cat([r[method][name] for r in ranks], dim=tp_split_dim(f"{name}.weight"))
            want = whole.get_submodule(name).weight.dequantize(torch.float32)
            assert torch.equal(full, want), (method, name)


# ----------------------------------------------------------------------------------------------------
# Fidelity of the embedded default model
# ----------------------------------------------------------------------------------------------------

def heldout_text() -> str:
    """The held-out sample the default model's perplexity is measured on."""
    with open(os.path.join(REPO, "tests", "data", "heldout_sample.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.mark.skipif(default_model_path() is None, reason="no trained default model shipped")
def test_default_model_fidelity():
    """Held-out perplexity of the default model, CPU fp32: int8 within 1% of the float model, int4-g128 (RTN) within
    the issue's 10% (measured on the 13.8M-parameter model: 13.278 fp32, 13.276 int8, 14.222 int4-g128 = +7.1%; the
    6.8M model it replaced lost only 0.67%: the better-trained model uses its weights' precision more); greedy
    continuations of the golden prompts from int8 mostly identical to the float model's."""
    tool = train_tool()
    text = heldout_text()
    golden = json.load(open(os.path.join(REPO, "tests", "data", "default_model_golden.json")))
    prompts = [c["prompt"] for c in golden["continuations"]]
    ppl, greedy = {}, {}
    for q in (None, "int8", "int4"):
        m = neox_rt.load(default_model_path(), quantize=q, group_size=128, progress=False)
        ppl[q], _ = tool.sample_perplexity(m, text)
        greedy[q] = [r.token_ids for r in m.generate(prompts, max_new_tokens=16)]
    assert math.isfinite(ppl[None])
    assert ppl["int8"] / ppl[None] - 1 < 0.01, ppl
    assert ppl["int4"] / ppl[None] - 1 < 0.10, ppl

    def same_prefix(a, b):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return n
    agree8 = sum(same_prefix(a, b) for a, b in zip(greedy["int8"], greedy[None])) / sum(map(len, greedy[None]))
    assert agree8 >= 0.5, (agree8, greedy)


@pytest.mark.skipif(default_model_path() is None, reason="no trained default model shipped")
def test_quantize_lm_head():
    """quantize_lm_head: the LM head in the layers' format (the memory report says so), the held-out perplexity with an
    int8 head within 1% of the float model's and an int4-g128 head's within 10%; without quantize= a one-line error."""
    import neox_rt
    tool = train_tool()
    text = heldout_text()
    base, _ = tool.sample_perplexity(neox_rt.load(default_model_path(), progress=False), text)
    for fmt, cls, bound in (("int8", Int8Weight, 0.01), ("int4", Int4Weight, 0.10)):
        m = neox_rt.load(default_model_path(), quantize=fmt, quantize_lm_head=True, progress=False)
        assert type(m.model.embed_out.weight) is cls
        report = m.memory_report()
        assert report.lm_head_quantized and "the LM head among them" in str(report)
        assert "lm head" not in report.float_bytes
        ppl, _ = tool.sample_perplexity(m, text)
        assert abs(ppl / base - 1) < bound, (fmt, ppl, base)
    # int4 layers with an int8 head (the issue allows the head in int8): each linear in its format, the report
    # names the head's, and the perplexity is that of int4 layers alone within the int8 head's 1%
    mixed = neox_rt.load(default_model_path(), quantize="int4", quantize_lm_head="int8", progress=False)
    assert type(mixed.model.embed_out.weight) is Int8Weight
    assert all(type(lay.attention.query_key_value.weight) is Int4Weight for lay in mixed.model.gpt_neox.layers)
    assert "the LM head among them (int8)" in str(mixed.memory_report())
    int4_only, _ = tool.sample_perplexity(neox_rt.load(default_model_path(), quantize="int4", progress=False), text)
    ppl, _ = tool.sample_perplexity(mixed, text)
    assert abs(ppl / int4_only - 1) < 0.01, (ppl, int4_only)
    plain = neox_rt.load(default_model_path(), quantize="int8", progress=False).memory_report()
    assert not plain.lm_head_quantized and plain.float_bytes["lm head"] > 0
    with pytest.raises(NeoxRtError, match="quantize_lm_head needs quantize="):
        neox_rt.load(default_model_path(), quantize_lm_head=True, progress=False)
    with pytest.raises(NeoxRtError, match="quantize_lm_head must be"):
        neox_rt.load(default_model_path(), quantize="int4", quantize_lm_head="int2", progress=False)


def test_generate_flags():
    from neox_rt.generate import parse_settings
    from neox_rt.serve import _settings, build_parser
    s = parse_settings(["--quantize", "int4", "--group-size", "64", "--prompt", "x"])
    assert (s.quantize, s.group_size, s.quantize_lm_head) == ("int4", 64, False)
    assert parse_settings(["--quantize", "int8", "--quantize-lm-head", "--prompt", "x"]).quantize_lm_head
    assert parse_settings(["--prompt", "x"]).quantize is None
    with pytest.raises(NeoxRtError, match="multiple of 8"):
        parse_settings(["--quantize", "int4", "--group-size", "12", "--prompt", "x"])
    with pytest.raises(NeoxRtError, match="--quantize-lm-head needs --quantize"):
        parse_settings(["--quantize-lm-head", "--prompt", "x"])
    assert parse_settings(["--quantize", "int4", "--quantize-lm-head", "int8", "--prompt", "x"]).quantize_lm_head == "int8"
    assert parse_settings(["--quantize", "int4", "--no-quantize-lm-head", "--prompt", "x"]).quantize_lm_head is False
    # the server passes its quantization flags through generate's settings
    s = _settings(build_parser().parse_args(["--quantize", "int4", "--group-size", "64", "--quantize-lm-head"]))
    assert (s.quantize, s.group_size, s.quantize_lm_head) == ("int4", 64, True)
    s = _settings(build_parser().parse_args(["--quantize", "int4", "--quantize-lm-head", "int8"]))
    assert (s.quantize, s.quantize_lm_head) == ("int4", "int8")
