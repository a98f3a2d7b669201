"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers"):
each linear's weight rounded column by column, the rounding error of every column spread over the columns not yet
rounded through the inverse Hessian of the layer's inputs, so that ||X W^T - X Q^T|| over calibration inputs X is
small, not ||W - Q||. The result is an ordinary :class:`~neox_rt.quant.formats.Int4Weight` / ``Int8Weight``: the
kernels, checkpoints and loaders downstream do not know which method made it.

Per linear (:func:`gptq_quantize_weight`, a method of :data:`neox_rt.quantize.METHODS`; ``stats`` its
:class:`Hessian`):

- H = 2 X^T X / n over the n calibration tokens of its input (accumulated in fp32 as the batches stream);
- dead inputs (H[k, k] = 0: never non-zero in the calibration set) get H[k, k] = 1 and W[:, k] = 0;
- dampening: H += damp * mean(diag H) * I (damp 0.01; tenfold again, up to three times, if Cholesky still fails);
- U = the upper Cholesky factor of H^-1; then for each column k in the natural order (no act-order, so the int4
  groups stay g = k // group_size, ``desc_act`` false in GPTQ's terms), in blocks of 128 columns:
  q_k = quant(w_k), e = (w_k - q_k) / U[k, k], w_j -= e * U[k, j] for the later columns j of the block; at the end
  of a block the later blocks get the block's errors at once (the "lazy batch" update: one matmul).
- the grid: int4 asymmetric per group, its scale and zero point computed (with exactly RTN's formula, scales rounded
  to the weight's dtype first) from the group's columns as they stand when the group's first column is reached,
  i.e. after the updates from every earlier column (blocks are whole groups, so a group never straddles a block);
  int8 symmetric, one scale per output channel from the absmax of the whole row, computed before the first column.
  With H = I (uncorrelated inputs of equal power) nothing propagates and the codes are RTN's.

Per model (:func:`load_calibrated`), streamed layer by layer like the loaders (:func:`neox_rt.quant.apply
.load_streaming`), so that the float weights of only one layer are ever held: the embedding of the calibration
tokens gives the hidden states [N, L, h] of the first layer; for each layer, the inputs of its four linears
(query_key_value and dense_h_to_4h see the LayerNorm outputs, dense the attention context, dense_4h_to_h the
activation) feed their Hessians; the linears are quantized in the order of the layer ("true sequential": the
inputs of dense and dense_4h_to_h are recomputed through the already quantized query_key_value / dense_h_to_4h, as
AutoGPTQ does by default), and the layer's outputs, recomputed WITH its quantized weights, are the next layer's
inputs (as the reference implementation does). Calibration runs in fp32 on CPU (the model dtype on a GPU); the
scales are rounded to the checkpoint's dtype.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Callable

import torch

from neox_rt.engine.tokenizer import Tokenizer
from neox_rt.errors import NeoxRtError, read_bytes
from neox_rt.model.build import parse_dtype
from neox_rt.model.config import NeoXConfig
from neox_rt.model.model import Layer, NeoXForCausalLM
from neox_rt.ops.reference import rotary_tables
from neox_rt.quant.apply import LM_HEAD, WeightPlan, empty_model, load_streaming, memory_report, set_weight
from neox_rt.quant.formats import Int4Weight, Int8Weight, WeightFormat, format_class, pack_int4

log = logging.getLogger("neox_rt")

DAMP = 0.01
"""Dampening: the fraction of the mean of diag(H) added to the diagonal (the paper's and AutoGPTQ's 1%)."""
BLOCK = 128
"""Columns per lazy-batch block (rounded up to a whole number of int4 groups)."""
NSAMPLES, SEQLEN = 128, 512
"""Default calibration set: 128 sequences of 512 tokens (the paper's 128 x 2048 on models of 2048 positions)."""

QKV, DENSE, H_TO_4H, FOUR_H_TO_H = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                    "mlp.dense_4h_to_h")


# ----------------------------------------------------------------------------------------------------
# One linear
# ----------------------------------------------------------------------------------------------------

class Hessian:
    """H = 2 / n * sum over n tokens of x x^T for the inputs x [in] of one linear, accumulated batch by batch."""

    def __init__(self, in_features: int, device=None, dtype: torch.dtype = torch.float32):
        self.sum = torch.zeros(in_features, in_features, dtype=dtype, device=device)  # [in, in]
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """x [..., in]: every row one token."""
        x = x.reshape(-1, self.sum.shape[0]).to(self.sum.dtype)  # [n, in]
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.tokens == 0:
            raise NeoxRtError("GPTQ: a linear saw no calibration tokens")
        return self.sum * (2.0 / self.tokens)


def _upper_cholesky_of_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """U upper triangular with U^T U = (H + damp * mean(diag H) * I)^-1; more dampening while Cholesky fails."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean = h.diagonal().mean()
    for attempt in range(4):
        low, info = torch.linalg.cholesky_ex(h + (damp * 10 ** attempt) * mean * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if int(info) == 0:
                if attempt:
                    log.warning("neox_rt: GPTQ: Hessian needed dampening %g", damp * 10 ** attempt)
                return upper
    raise NeoxRtError(f"GPTQ: the Hessian is not positive definite even with dampening {damp * 1000:g} "
                      f"(calibration inputs degenerate?)")


def _int4_grid(wt: torch.Tensor, scale_dtype: torch.dtype):
    """RTN's min/max grid of a group (:meth:`Int4Weight.quantize`): the group's columns wt [g, out] -> (scale,
    zero) [out] in fp32, the scale already rounded to ``scale_dtype``."""
    lo = wt.amin(dim=0).clamp(max=0)
    hi = wt.amax(dim=0).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi)).to(scale_dtype).float()
    return scale, torch.round(-lo / scale).clamp_(0, 15)


@contextlib.contextmanager
def _single_thread(device: torch.device):
    """One intra-op thread on CPU for GPTQ of one weight: the column loop's ops touch a few hundred KB each, where
    splitting over threads costs more than it saves (measured 10-20x slower with 2 threads on a busy 2-core
    machine, for the 4h->h weight of the default model: 6 s against 0.3 s)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize_weight(weight: torch.Tensor, fmt: str, group_size: int = 128, stats: Hessian | None = None,
                         damp: float = DAMP, block_size: int = BLOCK) -> WeightFormat:
    """GPTQ of ``weight`` [out, in] into format ``fmt`` (module docstring) given ``stats``, the :class:`Hessian` of
    its inputs (or H itself [in, in]); scales in the weight's dtype. The method signature of
    :data:`neox_rt.quantize.METHODS`."""
    with _single_thread(weight.device):
        return _gptq(weight, fmt, group_size, stats, damp, block_size)


def _gptq(weight, fmt, group_size, stats, damp, block_size) -> WeightFormat:
    cls = format_class(fmt)
    if stats is None:
        raise NeoxRtError("GPTQ needs calibration statistics (the Hessian of each linear's inputs): --calibration")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise NeoxRtError(f"a weight to quantize must be a 2-D float tensor [out, in], got "
                          f"{getattr(weight, 'shape', type(weight).__name__)}")
    if cls is Int4Weight and (group_size <= 0 or group_size % 8):
        raise NeoxRtError(f"int4 group size must be a positive multiple of 8, got {group_size}")
    scale_dtype = weight.dtype
    # W^T [k, out], so that a column of W (a row here) and the block's remaining columns are contiguous; the rows
    # not yet rounded carry the updates
    wt = weight.detach().t().float().contiguous()
    k, out = wt.shape
    h = (stats.matrix() if isinstance(stats, Hessian) else stats).to(wt.device, torch.float32).clone()  # [k, k]
    if h.shape != (k, k):
        raise NeoxRtError(f"GPTQ: Hessian of shape {list(h.shape)} for a weight with {k} input features")
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    wt[dead] = 0
    u = _upper_cholesky_of_inverse(h, damp)  # [k, k]

    int4 = cls is Int4Weight
    codes = torch.empty(k, out, dtype=torch.int16, device=wt.device)  # [k, out]
    if int4:
        groups = -(-k // group_size)
        scales = torch.empty(groups, out, dtype=torch.float32, device=wt.device)  # [groups, out]
        zeros = torch.empty(groups, out, dtype=torch.float32, device=wt.device)
        block_size = -(-block_size // group_size) * group_size  # whole groups per block
        lo_code, hi_code = 0, 15
    else:
        absmax = wt.abs().amax(dim=0)
        scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)).to(scale_dtype).float()  # [out]
        zero = torch.zeros_like(scale)
        lo_code, hi_code = -127, 127
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        wb = wt[b0:b1].clone()  # [B, out]
        ub = u[b0:b1, b0:b1]  # [B, B]
        errors = torch.empty_like(wb)  # [B, out]: the scaled errors of the block's columns
        for j in range(b1 - b0):
            col = b0 + j
            if int4 and col % group_size == 0:
                g = col // group_size
                scale, zero = _int4_grid(wb[j:j + group_size], scale_dtype)
                scales[g], zeros[g] = scale, zero
            x = wb[j]  # [out]
            q = (torch.round(x / scale) + zero).clamp_(lo_code, hi_code)
            codes[col] = q.to(torch.int16)
            err = (x - (q - zero) * scale) / ub[j, j]
            wb[j:] -= ub[j, j:, None] * err[None, :]
            errors[j] = err
        wt[b1:] -= u[b0:b1, b1:].t() @ errors  # the lazy batch update of the later blocks
    if int4:
        return Int4Weight(pack_int4(codes.t()), scales.t().to(scale_dtype).contiguous(),
                          zeros.t().to(torch.uint8).contiguous(), k, group_size)
    return Int8Weight(codes.t().to(torch.int8).contiguous(), scale.to(scale_dtype))


# ----------------------------------------------------------------------------------------------------
# Calibration data
# ----------------------------------------------------------------------------------------------------

def calibration_tokens(path: str, tokenizer: Tokenizer, nsamples: int = NSAMPLES, seqlen: int = SEQLEN) -> torch.Tensor:
    """The text file ``path`` tokenized and cut into at most ``nsamples`` sequences of ``seqlen`` tokens:
    non-overlapping windows spread evenly over the text, int64 [n, seqlen] (fewer than ``nsamples`` when the text
    is short: logged). A missing, unreadable, empty, non-UTF-8 or shorter-than-one-sequence file is one NeoxRtError."""
    if nsamples < 1 or seqlen < 2:
        raise NeoxRtError(f"calibration needs at least 1 sample of at least 2 tokens, got --nsamples {nsamples} "
                          f"--seqlen {seqlen}")
    data = read_bytes(path, "calibration file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NeoxRtError(f"calibration file {path} is not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        raise NeoxRtError(f"calibration file {path} is empty")
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    if ids.numel() < seqlen:
        raise NeoxRtError(f"calibration file {path} has {ids.numel()} tokens, fewer than one sequence of --seqlen "
                          f"{seqlen}")
    windows = ids.numel() // seqlen
    n = min(nsamples, windows)
    if n < nsamples:
        log.warning("neox_rt: calibration file %s holds %d sequences of %d tokens, not %d: using %d", path,
                    windows, seqlen, nsamples, n)
    starts = (torch.arange(n) * windows // n) * seqlen  # evenly spread whole windows
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])  # [n, seqlen]


# ----------------------------------------------------------------------------------------------------
# One layer, the whole model
# ----------------------------------------------------------------------------------------------------

def layer_forward(layer: Layer, x: torch.Tensor, positions, k_cache, v_cache, cos, sin,
                  see: Callable[[str, torch.Tensor], None] | None = None) -> torch.Tensor:
    """:meth:`Layer.forward` (one rank, prefill) written with the linears called one by one, handing each linear's
    input to ``see(name, input)`` first. x [b, s, h] -> [b, s, h]."""
    see = see or (lambda name, t: None)
    ln1, ln2, att, mlp = layer.input_layernorm, layer.post_attention_layernorm, layer.attention, layer.mlp
    a_in = ln1(x)
    see(QKV, a_in)
    ctx = att.attend(att.query_key_value(a_in), positions, k_cache, v_cache, cos, sin)  # [b, s, nh*hd]
    see(DENSE, ctx)
    attn = att.dense(ctx)
    if layer.parallel:
        # x = x + attn(ln1(x)) + mlp(ln2(x))
        m_in, residual = ln2(x), x
    else:
        # a = x + attn(ln1(x)); x = a + mlp(ln2(a))
        residual = x + attn
        m_in = ln2(residual)
    see(H_TO_4H, m_in)
    up = mlp.dense_h_to_4h(m_in, mlp.act)  # [b, s, 4h]
    see(FOUR_H_TO_H, up)
    down = mlp.dense_4h_to_h(up)
    return x + attn + down if layer.parallel else residual + down


def quantization_order(layer: Layer, sequential: bool = True) -> list[tuple[str, ...]]:
    """The layer's linears in the groups they are quantized in, each group's inputs computed with the earlier
    groups already quantized; one group of all four when not ``sequential``."""
    if not sequential:
        return [(QKV, DENSE, H_TO_4H, FOUR_H_TO_H)]
    if layer.parallel:  # both LayerNorm outputs come first
        return [(QKV, H_TO_4H), (DENSE, FOUR_H_TO_H)]
    return [(QKV,), (DENSE,), (H_TO_4H,), (FOUR_H_TO_H,)]


class _FloatPlan(WeightPlan):
    """Every linear loads float: the calibration pass quantizes them unit by unit."""

    def quantized(self, name):
        return False


class Calibration:
    """The layer-by-layer GPTQ pass, as :func:`load_streaming`'s ``after_unit``: holds the calibration hidden
    states [N, L, h] of the next unit and quantizes each unit's linears as it arrives (module docstring)."""

    def __init__(self, model: NeoXForCausalLM, tokens: torch.Tensor, fmt: str, group_size: int, method: Callable,
                 scale_dtype: torch.dtype, include_lm_head: bool = False, sequential: bool = True,
                 batch_size: int = 8):
        if model.tp.size != 1:
            raise NeoxRtError("GPTQ calibration runs on one rank (tp 1)")
        if tokens.dim() != 2 or tokens.shape[1] > model.config.max_position_embeddings:
            raise NeoxRtError(f"calibration sequences [{', '.join(map(str, tokens.shape))}] exceed the model's "
                              f"{model.config.max_position_embeddings} positions")
        self.model, self.tokens, self.fmt, self.group_size, self.method = model, tokens, fmt, group_size, method
        self.scale_dtype, self.include_lm_head, self.sequential = scale_dtype, include_lm_head, sequential
        self.batch_size = batch_size
        self.states = None  # [N, L, h] inputs of the next unit
        self.layers = {f"gpt_neox.layers.{i}": layer for i, layer in enumerate(model.gpt_neox.layers)}
        self.seconds = 0.0

    def _quantize(self, prefix: str, linear, hessian: Hessian) -> None:
        w = linear.weight.data.to(self.scale_dtype)  # the checkpoint's values (an fp16 source casts back exactly)
        fmt = self.method(w, self.fmt, self.group_size, hessian)
        set_weight(linear, fmt)

    @torch.no_grad()
    def __call__(self, prefix: str, unit) -> None:
        start = time.perf_counter()
        model = self.model
        if prefix == "gpt_neox.embed_in":
            self.states = unit(self.tokens.to(unit.weight.device)).to(model.dtype)  # [N, L, h]
        elif prefix in self.layers:
            self._layer(unit)
        elif prefix == "gpt_neox.final_layer_norm":
            quantize_head = self.include_lm_head and hasattr(model, LM_HEAD)
            self.states = unit(self.states) if quantize_head else None  # the LM head's inputs
        elif prefix == LM_HEAD and self.states is not None:
            hessian = Hessian(unit.weight.shape[1], self.states.device)
            for b0 in range(0, self.states.shape[0], self.batch_size):
                hessian.add(self.states[b0:b0 + self.batch_size])
            self._quantize(prefix, unit, hessian)
            self.states = None
        self.seconds += time.perf_counter() - start

    def _layer(self, layer: Layer) -> None:
        n, seq, _ = self.states.shape
        c = self.model.config
        device, dtype = self.states.device, self.states.dtype
        heads = c.num_attention_heads
        b = min(self.batch_size, n)
        k_cache = torch.zeros(b, heads, seq, c.head_dim, dtype=dtype, device=device)  # [b, nh, L, hd]
        v_cache = torch.zeros_like(k_cache)
        positions = torch.arange(seq, device=device)[None].expand(b, seq)  # [b, L]
        cos, sin = rotary_tables(c.rotary_ndims, c.max_position_embeddings, c.rotary_emb_base, device)

        def run(see=None, out=None):
            for b0 in range(0, n, b):
                x = self.states[b0:b0 + b]  # [b', L, h]
                y = layer_forward(layer, x, positions[:x.shape[0]], k_cache, v_cache, cos, sin, see)
                if out is not None:
                    out[b0:b0 + b] = y

        for group in quantization_order(layer, self.sequential):
            linears = {name: layer.get_submodule(name) for name in group}
            hessians = {name: Hessian(lin.weight.shape[1], device) for name, lin in linears.items()}
            run(lambda name, t: hessians[name].add(t) if name in hessians else None)
            for name, lin in linears.items():
                self._quantize(name, lin, hessians.pop(name))  # each Hessian freed once its linear is done
        out = torch.empty_like(self.states)
        run(out=out)  # the next layer sees this layer's outputs with its quantized weights
        self.states = out


def load_calibrated(config: NeoXConfig, directory: str, fmt: str, tokens: torch.Tensor, group_size: int = 128,
                    method: Callable = gptq_quantize_weight, dtype="float16", device="cpu",
                    include_lm_head: bool = False, sequential: bool = True, batch_size: int = 8,
                    progress: bool = True, sources=None) -> NeoXForCausalLM:
    """The float HF checkpoint in ``directory`` loaded and quantized by ``method`` (GPTQ by default) with the
    calibration sequences ``tokens`` [N, L], layer by layer (module docstring); returns the model in ``dtype`` on
    ``device`` with its layers' linears (and the LM head with ``include_lm_head``) in format ``fmt``. On CPU the
    calibration runs in fp32; peak memory: the quantized model, one float layer, 2 x N x L x hidden states and
    the Hessians of one layer."""
    dtype = parse_dtype(dtype)
    format_class(fmt)
    work_dtype = torch.float32 if torch.device(device).type == "cpu" else dtype
    model = empty_model(config, work_dtype)
    calibration = Calibration(model, tokens, fmt, group_size, method, dtype, include_lm_head, sequential,
                              batch_size)
    model = load_streaming(model, directory, _FloatPlan(), device, progress, sources, after_unit=calibration)
    model = model.to(dtype)
    log.info("neox_rt: GPTQ calibration on %d x %d tokens: %.1f s; %s", tokens.shape[0], tokens.shape[1],
             calibration.seconds, memory_report(model))
    return model
