"""GPTQ (#24, :mod:`neox_rt.quant.gptq`) on CPU: one linear against round to nearest, the layer-by-layer calibration
pass, ``python -m neox_rt.quantize --method gptq``, and the embedded default model's held-out perplexity."""
from __future__ import annotations

import json
import os

import pytest
import torch

import neox_rt
from neox_rt.api import NeoX
from neox_rt.default_model import default_model_path
from neox_rt.engine.kv_cache import KVCache
from neox_rt.engine.tokenizer import Tokenizer
from neox_rt.errors import NeoxRtError
from neox_rt.model.config import NeoXConfig
from neox_rt.quant.apply import memory_report, quantize_weight
from neox_rt.quant.gptq import (Hessian, calibration_tokens, gptq_quantize_weight, layer_forward, load_calibrated)
from tests.conftest import REPO, train_tool


FORMATS = [("int4", 128), ("int4", 32), ("int8", None)]
SHAPES = [(48, 300), (72, 256), (8, 136)]  # [out, in]: in 300 and 136 are not multiples of the group


def correlated_inputs(k, n, seed=0, dead=()):
    """n tokens of k features mixed by a random matrix (so H is far from diagonal); ``dead`` features are zero."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + 0.3 * torch.eye(k)
    scales = torch.linspace(0.2, 3, k)  # features of different power, as after a LayerNorm's weights
    x = (torch.randn(2 * n, k, generator=g) @ mix) * scales
    x[:, list(dead)] = 0
    return x[:n], x[n:]  # calibration, held out


def output_error(x, w, fmt):
    return float((x @ (w - fmt.dequantize(torch.float32)).t()).norm())


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("out,k", SHAPES)
def test_gptq_output_error_below_rtn(fmt, group, out, k):
    """||X W^T - X Q^T|| on held-out inputs of the calibration distribution: GPTQ below RTN (measured 0.70-0.75 of
    it on these shapes; asserted below 0.9); the result is the ordinary format class with RTN's shapes."""
    w = torch.randn(out, k, generator=torch.Generator().manual_seed(k))
    calib, held = correlated_inputs(k, 1024)
    h = Hessian(k)
    for chunk in calib.split(300):  # streamed batches
        h.add(chunk)
    q = gptq_quantize_weight(w, fmt, group or 128, h)
    rtn = quantize_weight(w, fmt, group or 128)
    assert type(q) is type(rtn)
    assert {n: t.shape for n, t in q.state_dict().items()} == {n: t.shape for n, t in rtn.state_dict().items()}
    assert output_error(held, w, q) < 0.9 * output_error(held, w, rtn)


@pytest.mark.parametrize("fmt,group", FORMATS)
@pytest.mark.parametrize("out,k", SHAPES)
def test_identity_hessian_gives_rtn_codes(fmt, group, out, k):
    """H = I (uncorrelated inputs of equal power): no error propagates, and the codes, scales and zeros are exactly
    round to nearest's, fp16 scales included."""
    w = torch.randn(out, k, generator=torch.Generator().manual_seed(1)).half()
    q = gptq_quantize_weight(w, fmt, group or 128, 2 * torch.eye(k))
    rtn = quantize_weight(w, fmt, group or 128)
    a, b = q.state_dict(), rtn.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), fmt
    assert q.scales.dtype == torch.float16


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_dead_inputs(fmt):
    """Inputs that are zero over the whole calibration set (H[k, k] = 0): their weights quantize to exactly 0, the
    rest still beat RTN."""
    out, k, dead = 32, 200, (0, 7, 130, 199)
    w = torch.randn(out, k, generator=torch.Generator().manual_seed(2))
    calib, held = correlated_inputs(k, 1024, dead=dead)
    h = Hessian(k)
    h.add(calib)
    q = gptq_quantize_weight(w, fmt, 64, h)
    deq = q.dequantize(torch.float32)
    assert torch.isfinite(deq).all() and torch.equal(deq[:, list(dead)], torch.zeros(out, len(dead)))
    assert output_error(held, w, q) < 0.9 * output_error(held, w, quantize_weight(w, fmt, 64))


def test_gptq_needs_statistics():
    with pytest.raises(NeoxRtError, match="calibration"):
        gptq_quantize_weight(torch.randn(8, 16), "int8", 128, None)
    with pytest.raises(NeoxRtError, match="Hessian of shape"):
        gptq_quantize_weight(torch.randn(8, 16), "int8", 128, torch.eye(8))


# ----------------------------------------------------------------------------------------------------
# The layer-by-layer pass
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("parallel", [True, False])
def test_layer_forward_is_the_layers_forward(parallel):
    """The calibration pass's layer (its linears called one by one, inputs seen) computes Layer.forward."""
    config = NeoXConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=32, rotary_pct=0.25,
                        use_parallel_residual=parallel)
    model = neox_rt.build_model(config)
    neox_rt.init_random(model, seed=5, std=0.1)
    layer = model.gpt_neox.layers[0]
    x = torch.randn(3, 11, 64)
    positions = torch.arange(11)[None].expand(3, 11)
    cos, sin = model.rotary()
    cache = KVCache(1, 3, 4, 16, 16, torch.float32, "cpu")
    want = layer(x, positions, cache.k[0], cache.v[0], cos, sin)
    seen = {}
    cache = KVCache(1, 3, 4, 16, 16, torch.float32, "cpu")
    got = layer_forward(layer, x, positions, cache.k[0], cache.v[0], cos, sin,
                        lambda name, t: seen.setdefault(name, t.shape))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the same ops, summed in another order
    assert seen == {"attention.query_key_value": (3, 11, 64), "attention.dense": (3, 11, 64),
                    "mlp.dense_h_to_4h": (3, 11, 64), "mlp.dense_4h_to_h": (3, 11, 256)}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_calibrated_pass_with_rtn_equals_quantize_at_load(tiny_checkpoint, fmt):
    """The streaming pass with round to nearest as its method gives exactly the model that quantize-at-load
    gives: the pass only adds statistics."""
    config = NeoXConfig.from_json(tiny_checkpoint)
    tokens = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(0))
    got = load_calibrated(config, tiny_checkpoint, fmt, tokens, 32, quantize_weight, "float32", progress=False,
                          include_lm_head=True)
    want = neox_rt.load(tiny_checkpoint, quantize=fmt, group_size=32, progress=False).model
    assert memory_report(got).quantized_linears == 2 * 4 + 1
    a = got.state_dict()
    want_head = quantize_weight(want.embed_out.weight.data, fmt, 32).state_dict()
    b = {**want.state_dict(), **{f"embed_out.weight.{n}": t for n, t in want_head.items()}}
    b.pop("embed_out.weight")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# ----------------------------------------------------------------------------------------------------
# Calibration text and the command line
# ----------------------------------------------------------------------------------------------------

CALIBRATION_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 30


def test_calibration_tokens(tiny_checkpoint, tmp_path):
    tok = Tokenizer(tiny_checkpoint)
    path = tmp_path / "calib.txt"
    path.write_text(CALIBRATION_TEXT)
    ids = torch.tensor(tok.encode(CALIBRATION_TEXT))
    got = calibration_tokens(str(path), tok, 4, 32)
    assert got.shape == (4, 32) and got.dtype == torch.int64
    windows = ids[: len(ids) // 32 * 32].view(-1, 32)
    assert all(any(torch.equal(row, w) for w in windows) for row in got)  # whole, non-overlapping windows
    assert len({tuple(r.tolist()) for r in got}) == 4 or len(ids) < 4 * 32
    few = calibration_tokens(str(path), tok, 10_000, 32)  # a short text: every window, once
    assert few.shape == (len(ids) // 32, 32)


@pytest.mark.parametrize("content,message", [
    (None, "calibration file not found"),
    (b"", "is empty"),
    (b"  \n\n", "is empty"),
    (b"def f():\xff\xfe\n", "not valid UTF-8"),
    (b"x = 1\n", "fewer than one sequence"),
])
def test_calibration_file_errors(tiny_checkpoint, tmp_path, content, message):
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(NeoxRtError, match=message) as e:
        calibration_tokens(str(path), Tokenizer(tiny_checkpoint), 4, 32)
    assert "\n" not in str(e.value)


def test_quantize_cli_gptq(tiny_checkpoint, tmp_path):
    """``--method gptq --calibration FILE`` writes our checkpoint (method "gptq"), which loads as the very model the
    calibration pass built."""
    from neox_rt import quantize
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION_TEXT)
    dst = str(tmp_path / "gptq4")
    args = [tiny_checkpoint, dst, "--bits", "4", "--group-size", "32", "--method", "gptq", "--calibration",
            str(calib), "--nsamples", "4", "--seqlen", "32", "--dtype", "float32"]
    assert quantize.main(args) == 0
    qc = json.loads(open(os.path.join(dst, "config.json")).read())["quantization_config"]
    assert qc["method"] == "gptq" and qc["format"] == "int4" and qc["calibration"] == {"samples": 4, "seqlen": 32}
    loaded = neox_rt.load(dst, progress=False).model
    tokens = calibration_tokens(str(calib), Tokenizer(tiny_checkpoint), 4, 32)
    want = load_calibrated(NeoXConfig.from_json(tiny_checkpoint), tiny_checkpoint, "int4", tokens, 32,
                           dtype="float32", progress=False)
    a, b = loaded.state_dict(), want.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    rtn = neox_rt.load(tiny_checkpoint, quantize="int4", group_size=32, progress=False).model
    assert not torch.equal(a["gpt_neox.layers.0.mlp.dense_4h_to_h.weight.qweight"],
                           rtn.state_dict()["gpt_neox.layers.0.mlp.dense_4h_to_h.weight.qweight"])


def test_quantize_cli_gptq_errors(tiny_checkpoint, tmp_path, capsys):
    from neox_rt import quantize
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIBRATION_TEXT)
    dst = str(tmp_path / "x")
    cases = [
        (["--method", "gptq"], "needs --calibration"),
        (["--calibration", str(calib)], "not used by --method rtn"),
        (["--method", "gptq", "--calibration", str(tmp_path / "nowhere.txt")], "calibration file not found"),
        (["--method", "gptq", "--calibration", str(calib), "--seqlen", "4096"], "exceeds the model's"),
        (["--method", "gptq", "--calibration", str(calib), "--tokenizer", str(tmp_path / "t.json")],
         "no tokenizer for the calibration text"),
        (["--method", "awq"], "unknown --method"),
    ]
    for extra, message in cases:
        assert quantize.main([tiny_checkpoint, dst, "--bits", "4", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (extra, err)


# ----------------------------------------------------------------------------------------------------
# The embedded default model
# ----------------------------------------------------------------------------------------------------

CALIBRATION_FILES = ("argparse.py", "dataclasses.py", "typing.py")
"""Standard library modules of the running interpreter to calibrate on: in the default model's training data, not
among tools/train_default_model.py's held-out files (which the held-out sample is cut from)."""


@pytest.mark.skipif(default_model_path() is None, reason="no trained default model shipped")
def test_default_model_gptq_int4_beats_rtn(tmp_path):
    """Held-out perplexity of the default model, CPU fp32, int4-g128: GPTQ calibrated on 8 x 256 tokens of stdlib
    source below round to nearest (measured: fp32 13.278, RTN 14.222; GPTQ 14.1 with this small set, 13.8 with
    64 x 512 tokens); asserted with a margin of 0.5% of RTN's."""
    tool = train_tool()
    assert not set(CALIBRATION_FILES) & set(tool.HELDOUT_FILES)
    root = tool.stdlib_root()
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(open(os.path.join(root, f), encoding="utf-8").read() for f in CALIBRATION_FILES),
                     encoding="utf-8")
    directory = default_model_path()
    tok = Tokenizer(directory)
    tokens = calibration_tokens(str(calib), tok, 8, 256)
    heldout = open(os.path.join(REPO, "tests", "data", "heldout_sample.txt"), encoding="utf-8").read()
    gptq = NeoX(load_calibrated(NeoXConfig.from_json(directory), directory, "int4", tokens, 128, dtype="float32",
                                progress=False), tok)
    rtn = neox_rt.load(directory, quantize="int4", group_size=128, progress=False)
    ppl_gptq, _ = tool.sample_perplexity(gptq, heldout)
    ppl_rtn, _ = tool.sample_perplexity(rtn, heldout)
    assert ppl_gptq < 0.995 * ppl_rtn, (ppl_gptq, ppl_rtn)
