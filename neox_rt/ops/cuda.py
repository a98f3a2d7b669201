"""The ``cuda`` backend: ops of the CUDA extension ``neox_rt._C`` (sources in csrc/) as op-table implementations.

:func:`implementations` imports the extension (its import registers ``torch.ops.neox_rt.*`` through
``torch.library``), adds fake implementations so the ops trace under ``torch.compile``, and returns each op with
a cheap ``supports(*args)`` predicate; calls it rejects run the PyTorch reference. The peer-to-peer all-reduce
kernels are called by :mod:`neox_rt.parallel.p2p`. ``python -m neox_rt.ops.cuda bench`` times the GEMV against cuBLAS; ``bench/kernels.py
--sweep`` against the Triton tiles too (the numbers behind :func:`supports_linear`).

The ``linear`` op holds four implementations, tried in order: the fp16/bf16 GEMV for tensor weights, then the
weight-only quantized kernels for the formats of :mod:`neox_rt.quant.formats` (``quant_linear_tiled`` for the tiled
forms that :func:`prepare_linear_weight` makes at load, ``quant_linear_int8`` for an
:class:`~neox_rt.quant.formats.Int8Weight`, ``quant_linear_int4`` for an :class:`~neox_rt.quant.formats.Int4Weight`;
csrc/kernels/quant_gemm.cuh): 1-``QUANT_MAX_ROWS`` rows of x on tensor cores, W dequantized in registers exactly as
``dequantize(x.dtype)`` does, bias, activation and residual fused. Each predicate rejects the others' weights; what
they all decline goes to the Triton kernels (the ``cuda+triton`` default) or the reference. For the tiled forms, the
parallel-residual layer's pairs run in one launch each (``norm_linear_pair``: the dual LayerNorm, QKV and h->4h;
``linear_sum``: dense and 4h->h summed) up to ``QUANT_FUSED_MAX_ROWS`` rows. A decode step's rotary + KV write
runs inside the decode attention's launch (``rotary_decode_attention``).
"""
from __future__ import annotations

import functools
import os

import torch

from neox_rt.errors import NeoxRtError
# torch only (the op table may import the formats)
from neox_rt.quant.formats import TILE_ROWS, Int4Weight, Int8Weight, TiledInt4Weight, TiledInt8Weight

# Extension ops and their activation codes (csrc/kernels/gemv.cuh).
ACTIVATIONS = {None: 0, "gelu": 1, "gelu_fast": 2, "gelu_new": 2, "gelu_pytorch_tanh": 2, "relu": 3}
DECODE_HEAD_SIZES = (32, 64, 80, 96, 128, 256)
# Paged decode attention's table limits (csrc/kernels/paged_attention.cuh): at most kPagedMaxBlocks entries a row,
# and positions (max_blocks * block_size) * head size below 2^31.
PAGED_MAX_BLOCKS = 256 * 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _env_int(name: str, default: int, lo: int, hi: int | None = None) -> int:
    """An integer setting from the environment; a bad value is a one-line NeoxRtError naming it."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < lo or (hi is not None and value > hi):
        span = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise NeoxRtError(f"{name}={text!r}: expected an integer {span}")
    return value


def _env_choice(name: str, choices: tuple[int, ...]) -> int:
    """An integer setting that must be one of ``choices`` (the first is the default)."""
    value = _env_int(name, choices[0], min(choices), max(choices))
    if value not in choices:
        raise NeoxRtError(f"{name}={value}: expected one of {', '.join(map(str, choices))}")
    return value


# The op table sends the CUDA GEMV x of at most this many rows (the kernel's limit; more rows, prefill, go to
# cuBLAS); NEOX_RT_GEMV_MAX_ROWS (1-16) lowers it for A/B runs. Above one row it takes only the layers its
# tensor-core tiles win (k % 64 == 0 and at most GEMV_MMA_MAX_WEIGHT elements of W: every layer of pythia-1.4b and
# 6.9b and 20B's dense; the Triton tiles keep 20B's qkv, h->4h and 4h->h (113-151M elements), 4-5% faster there as
# one cold call on an H100 and slower in a batch-8 decode with the tiles everywhere: bench/NOTES.md, session 6).
GEMV_MAX_ROWS = _env_int("NEOX_RT_GEMV_MAX_ROWS", 16, 1, 16)
GEMV_MMA_MAX_WEIGHT = 96 << 20
# csrc/kernels/gemv.cuh: 0 = auto (per shape: one row the 8-warp blocks, 2-16 rows the tensor-core tiles; where
# k % 64 != 0 the stream kernel or legacy), 1 = legacy (the first version), 2/3/4 = stream with k split over 1/2/4 warps, 5/6 = 8-warp blocks of 8 / 4 rows,
# 7/8 = tensor-core tiles for 2-16 rows, k over 8/16 warps, 9/10 = the same with 3 steps of W in flight, 11 = 8-warp
# blocks of 16 rows (k over 2 warps)
# (GemvVariant in csrc/kernels/gemv.cuh; bench/kernels.py --sweep).
GEMV_VARIANT = _env_int("NEOX_RT_GEMV_VARIANT", 0, 0, 11)
# Programmatic dependent launch on sm_90 of the GEMV, LayerNorm, rotary + KV write and decode attention (each
# starts under the previous kernel's tail and waits for its inputs inside; ignored on older GPUs). On by default:
# 20B decode 14.85 vs 15.00 ms/token on one H100 in the same run with the GEMV's (bench/NOTES.md); NEOX_RT_PDL=0
# turns it off.
PDL = os.environ.get("NEOX_RT_PDL", "1") != "0"
# Decode attention's split plan: about this many blocks per SM over the grid (0: the extension's default,
# kDecodeBlocksPerSm in csrc/kernels/decode_attention.cuh); bench/kernels.py --sweep compares plans.
DECODE_BLOCKS_PER_SM = _env_int("NEOX_RT_DECODE_BLOCKS_PER_SM", 0, 0)
# Its step scheme: 0 the extension's default, 1 single-buffered, 2 double-buffered (pipelined) steps.
DECODE_VARIANT = _env_int("NEOX_RT_DECODE_VARIANT", 0, 0, 2)
# A decode step's rotary + KV write inside the decode attention's launch (rotary_decode_attention; one kernel a layer
# fewer): 1 (default), 0 the two kernels (rotary_kv_write, then decode_attention) for A/B runs.
DECODE_ROTARY_FUSED = _env_int("NEOX_RT_DECODE_ROTARY_FUSED", 1, 0, 1)
# Decode attention's splits over each sequence's length instead of the cache's capacity (contiguous caches:
# decode_len_split in csrc/kernels/decode_attention.cuh): 1 on, 0 (default: not yet run on a GPU) off. A short
# sequence in a long cache then spreads over the grid's splits instead of one or two long ones.
DECODE_SPLIT_BY_LEN = _env_int("NEOX_RT_DECODE_SPLIT_BY_LEN", 0, 0, 1)
# The fused pairs of single-row GEMVs (linear_pair, linear_sum; csrc/kernels/gemv_fused.cuh): warps splitting a
# row's k (0 auto, 2, 4, 8) and the blocks per SM their registers are fitted to (0 auto: 3 in fp16, 2 in bf16; 2, 3 or
# 4), for A/B runs.
GEMV2_KSPLIT = _env_choice("NEOX_RT_GEMV2_KSPLIT", (0, 2, 4, 8))
GEMV2_MIN_BLOCKS = _env_choice("NEOX_RT_GEMV2_MIN_BLOCKS", (0, 2, 3, 4))
# The weight-only quantized linears (csrc/kernels/quant_gemm.cuh): the most rows of x they take (1-64, the kernels'
# limit; NEOX_RT_QUANT_MAX_ROWS lowers it, e.g. where the Triton tiles measure faster at many rows) and their
# configuration for A/B runs (QuantVariant: 0 auto, 1 / 2 the plain kernel with one / two tiles of 16 channels a warp,
# 3 / 4 the LEAN kernel with its own tiles / two tiles, 5 FOLD: LEAN with the zero point and the scale out of the
# per-weight work, fp16 only, int4 in groups of a multiple of 128 and up to 16 rows, LEAN elsewhere; not bit-identical
# to the reference (weights not rounded to fp16); the measurements in csrc/kernels/quant_gemm.cuh and bench/NOTES.md).
QUANT_MAX_ROWS = _env_int("NEOX_RT_QUANT_MAX_ROWS", 64, 1, 64)
QUANT_VARIANT_LAST = 5  # kQuantVariantLast
QUANT_VARIANT = _env_int("NEOX_RT_QUANT_VARIANT", 0, 0, QUANT_VARIANT_LAST)
# The kernels' tiled layout (TiledInt8Weight / TiledInt4Weight, prepare_linear_weight): 1 (default) converts every
# quantized weight the LEAN kernel can read at load, 0 keeps the row-major formats (A/B runs).
QUANT_TILED = _env_int("NEOX_RT_QUANT_TILED", 1, 0, 1)
# A parallel-residual layer's pairs of tiled linears in one launch each (linear_pair: QKV and h->4h; linear_sum:
# dense and 4h->h, summed; quant_gemm_pair_kernel / quant_gemm_sum_kernel) at up to QUANT_FUSED_MAX_ROWS rows with
# the auto variant, and the dual LayerNorm inside the pair's launch (norm_linear_pair) where x is small
# (QUANT_NORM_AUTO_MAX_ELEMS): 2 (default) both, 1 the pairs only, 0 neither (A/B runs).
QUANT_FUSED = _env_int("NEOX_RT_QUANT_FUSED", 2, 0, 2)
QUANT_FUSED_MAX_ROWS = 8  # quant_fused_max_rows()
QUANT_NORM_MAX_ELEMS = 16384  # kQuantNormMaxElems: rows x hidden the kernel normalises in shared memory
# ... and what the op table sends it: every pair block normalises x for itself, so the LayerNorm's work grows with
# hidden x blocks (~hidden^2) and with the rows (normalised one after another), while the kernel boundary it saves is
# fixed. On one H100 (bench/NOTES.md session 19) it gained at one row of hidden 2048 (1.4b int4 0.83 -> 0.79 ms a
# token) and lost at hidden 6144 (20B int4 5.07 -> 5.31) and at 8 rows of 2048 (1.4b batch 8): at most 2560 values.
QUANT_NORM_AUTO_MAX_ELEMS = 2560
# The next layer's dual LayerNorm in the sum's launch (linear_sum_norm: the last block of gemv_sum_kernel, fp16 /
# bf16 weights, or of quant_gemm_sum_kernel, tiled int8 / int4, normalises y; csrc/kernels/layernorm.cuh's
# sum_norm_tail), in place of the LayerNorm's kernel and its boundary: 0 off, 1 for tensor weights, 2 for the
# quantized sums too, 3 (default) for tensor weights and for the quantized sums whose next pair would not take the
# LayerNorm inside (rows x hidden above QUANT_NORM_AUTO_MAX_ELEMS, or QUANT_FUSED < 2). One H100 at one row
# (bench/NOTES.md session 22): fp16 pythia-1.4b 1.26 -> 1.20 ms a token, 20B 13.60 -> 13.57; quantized, 1.4b int4
# 0.70 -> 0.75 (its pairs lose the LayerNorm inside, which was cheaper there than the sum's last block), and since
# the sum reads 4h->h first (SUM_B_FIRST, session 24) 20B int8 7.19-7.21 -> 7.12-7.13 and int4 4.69-4.70 ->
# 4.66-4.70 (against the other arms of one call), where the LayerNorm otherwise runs as a kernel of its own. The op
# table sends it SUM_NORM_MAX_ROWS rows (the kernels take up to kSumNormMaxRows = 8, normalised one after another by
# one block) of a hidden size up to SUM_NORM_MAX_HIDDEN (kSumNormVecs vectors of 8 a thread of 8 warps).
SUM_NORM = _env_int("NEOX_RT_SUM_NORM", 3, 0, 3)
# The quantized sum's order (quant_gemm_sum_kernel's BFIRST): 1 (default) runs 4h->h's chunks first, all of them
# before the dependent launch's wait, while decode attention runs (its x, the pair's output, complete before the sum
# starts: decode attention then lets the sum launch only after its own wait, `pdl_late`, in every decode-attention op
# here); 0 dense's chunks first, asked for before the wait, and the rest after it (A/B runs). One H100 at one row with
# the int8 LM head (bench/NOTES.md session 24): 20B int4 4.70 -> 4.63 ms a token, int8 7.30 -> 7.19; 1.4b int4
# 0.66 -> 0.64, int8 0.75 -> 0.66.
SUM_B_FIRST = bool(_env_int("NEOX_RT_SUM_B_FIRST", 1, 0, 1))
SUM_NORM_MAX_ROWS = 1
SUM_NORM_MAX_HIDDEN = 8192
LAYERNORM_MAX_HIDDEN_UNALIGNED = 8192  # 1024 threads x 8 scalars (csrc/kernels/layernorm.cuh)

_fakes_registered = False


def load_extension():
    """Import ``neox_rt._C``; ImportError with the build command if it was not built."""
    try:
        import neox_rt._C  # noqa: F401  (registers torch.ops.neox_rt.*)
    except ImportError as e:
        raise ImportError(
            "the CUDA extension neox_rt._C is not built (build it on a machine with nvcc and a CUDA torch: "
            "`TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .`)"
        ) from e
    _register_fakes()
    return torch.ops.neox_rt


def _register_fakes() -> None:
    """Shape-only implementations so the ops work with fake/meta tensors (torch.compile, opcheck)."""
    global _fakes_registered
    if _fakes_registered:
        return
    lib = torch.library

    @lib.register_fake("neox_rt::scaled_causal_softmax")
    def _(scores, query_positions, scale):
        return torch.empty_like(scores)

    @lib.register_fake("neox_rt::rotary_kv_write")
    def _(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache, pdl=False):
        b, s, _ = qkv.shape
        return qkv.new_empty(b, s, k_cache.shape[1], k_cache.shape[3])

    @lib.register_fake("neox_rt::decode_attention")
    def _(q, k_cache, v_cache, seqlens, scale, pdl=False, blocks_per_sm=0, merge_kernel=False, variant=0,
          pdl_late=False, split_by_len=False):
        return torch.empty_like(q)

    @lib.register_fake("neox_rt::rotary_decode_attention")
    def _(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache, seqlens, scale, pdl=False, blocks_per_sm=0,
          merge_kernel=False, variant=0, pdl_late=False, split_by_len=False):
        return qkv.new_empty(qkv.shape[0], k_cache.shape[1], k_cache.shape[3])

    @lib.register_fake("neox_rt::paged_decode_attention")
    def _(q, k_cache, v_cache, block_tables, seqlens, scale, pdl=False, blocks_per_sm=0, merge_kernel=False,
          pdl_late=False):
        return torch.empty_like(q)

    @lib.register_fake("neox_rt::layernorm")
    def _(x, weight, bias, eps, pdl=False):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @lib.register_fake("neox_rt::dual_layernorm")
    def _(x, weight1, bias1, weight2, bias2, eps, pdl=False):
        return (torch.empty_like(x, memory_format=torch.contiguous_format),
                torch.empty_like(x, memory_format=torch.contiguous_format))

    @lib.register_fake("neox_rt::gemv")
    def _(x, weight, bias, activation, residual=None, variant=0, pdl=False):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @lib.register_fake("neox_rt::quant_linear_int8")
    def _(x, qweight, scales, bias, activation, residual=None, variant=0, pdl=False):
        return x.new_empty(*x.shape[:-1], qweight.shape[0])

    @lib.register_fake("neox_rt::quant_linear_int4")
    def _(x, qweight, scales, zeros, group_size, bias, activation, residual=None, variant=0, pdl=False):
        return x.new_empty(*x.shape[:-1], qweight.shape[0])

    @lib.register_fake("neox_rt::quant_linear_tiled")
    def _(x, qweight, scales, out_features, bits, group_size, bias, activation, residual=None, variant=0, pdl=False):
        return x.new_empty(*x.shape[:-1], out_features)

    @lib.register_fake("neox_rt::quant_linear_tiled_pair")
    def _(x1, qweight1, scales1, out_features1, group_size1, bias1, activation1, x2, qweight2, scales2, out_features2,
          group_size2, bias2, activation2, bits, pdl=False, warps=0):
        return x1.new_empty((*x1.shape[:-1], out_features1)), x2.new_empty((*x2.shape[:-1], out_features2))

    @lib.register_fake("neox_rt::quant_linear_tiled_norm_pair")
    def _(x, ln_weight1, ln_bias1, ln_weight2, ln_bias2, eps, qweight1, scales1, out_features1, group_size1, bias1,
          activation1, qweight2, scales2, out_features2, group_size2, bias2, activation2, bits, pdl=False, warps=0):
        return x.new_empty((*x.shape[:-1], out_features1)), x.new_empty((*x.shape[:-1], out_features2))

    @lib.register_fake("neox_rt::quant_linear_tiled_sum")
    def _(x1, qweight1, scales1, group_size1, x2, qweight2, scales2, group_size2, out_features, bits, bias1, bias2,
          residual=None, pdl=False, b_first=False):
        return x1.new_empty((*x1.shape[:-1], out_features))

    @lib.register_fake("neox_rt::quant_linear_tiled_sum_norm")
    def _(x1, qweight1, scales1, group_size1, x2, qweight2, scales2, group_size2, out_features, bits, bias1, bias2,
          residual, ln_weight1, ln_bias1, ln_weight2, ln_bias2, eps, pdl=False, b_first=False):
        shape = (*x1.shape[:-1], out_features)
        return x1.new_empty(shape), x1.new_empty(shape), x1.new_empty(shape)

    @lib.register_fake("neox_rt::gemv_pair")
    def _(x1, weight1, bias1, activation1, x2, weight2, bias2, activation2, ksplit=0, min_blocks=0, pdl=False):
        return x1.new_empty(*x1.shape[:-1], weight1.shape[0]), x2.new_empty(*x2.shape[:-1], weight2.shape[0])

    @lib.register_fake("neox_rt::gemv_sum")
    def _(x1, weight1, x2, weight2, bias1, bias2, residual=None, ksplit=0, min_blocks=0, pdl=False,
          push_buffers=None, push_rank=0, push_slot_bytes=0):
        return x1.new_empty(*x1.shape[:-1], weight1.shape[0])

    @lib.register_fake("neox_rt::gemv_sum_norm")
    def _(x1, weight1, x2, weight2, bias1, bias2, residual, ln_weight1, ln_bias1, ln_weight2, ln_bias2, eps, ksplit=0,
          min_blocks=0, pdl=False):
        shape = (*x1.shape[:-1], weight1.shape[0])
        return x1.new_empty(shape), x1.new_empty(shape), x1.new_empty(shape)

    @lib.register_fake("neox_rt::p2p_reduce_dual_layernorm")
    def _(x, buffers, rank, slot_bytes, weight1, bias1, weight2, bias2, eps, pdl=False):
        return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(3))

    @lib.register_fake("neox_rt::p2p_all_reduce")
    def _(x, buffers, rank, slot_bytes, pdl=False):
        return torch.empty_like(x)

    _fakes_registered = True


# ----------------------------------------------------------------------------------------------------
# Implementations with the reference signatures of neox_rt.ops
# ----------------------------------------------------------------------------------------------------

def layernorm(x, weight, bias, eps):
    return torch.ops.neox_rt.layernorm(x, weight, bias, float(eps), PDL)


def dual_layernorm(x, weight1, bias1, weight2, bias2, eps):
    return tuple(torch.ops.neox_rt.dual_layernorm(x, weight1, bias1, weight2, bias2, float(eps), PDL))


def linear(x, weight, bias=None, activation=None, residual=None):
    return torch.ops.neox_rt.gemv(x, weight, bias, ACTIVATIONS[activation], residual, GEMV_VARIANT, PDL)


def int8_linear(x, weight: Int8Weight, bias=None, activation=None, residual=None):
    """The ``linear`` op for an :class:`Int8Weight` (W8A16): act(x @ (q * s).T + bias) + residual."""
    return torch.ops.neox_rt.quant_linear_int8(x, weight.qweight, weight.scales, bias, ACTIVATIONS[activation],
                                               residual, QUANT_VARIANT, PDL)


def int4_linear(x, weight: Int4Weight, bias=None, activation=None, residual=None):
    """The ``linear`` op for an :class:`Int4Weight` (W4A16): W = (q - zero) * scale per group."""
    return torch.ops.neox_rt.quant_linear_int4(x, weight.qweight, weight.scales, weight.zeros, weight.group_size,
                                               bias, ACTIVATIONS[activation], residual, QUANT_VARIANT, PDL)


def tiled_linear(x, weight, bias=None, activation=None, residual=None):
    """The ``linear`` op for a :class:`TiledInt8Weight` or :class:`TiledInt4Weight` (the kernels' tiled layout)."""
    if isinstance(weight, TiledInt4Weight):
        return torch.ops.neox_rt.quant_linear_tiled(x, weight.qweight, weight.scale_zero, weight.out_features, 4,
                                                    weight.group_size, bias, ACTIVATIONS[activation], residual,
                                                    QUANT_VARIANT, PDL)
    return torch.ops.neox_rt.quant_linear_tiled(x, weight.qweight, weight.scales, weight.out_features, 8, 0, bias,
                                                ACTIVATIONS[activation], residual, QUANT_VARIANT, PDL)


def _tiled_args(weight) -> tuple:
    """(qweight, scales or int4's scale words, group size or 0) of a tiled weight, as the extension takes them."""
    if isinstance(weight, TiledInt4Weight):
        return weight.qweight, weight.scale_zero, weight.group_size
    return weight.qweight, weight.scales, 0


def _tiled_bits(weight) -> int:
    """The bits a weight of a tiled format holds (the fused ops' ``bits``)."""
    return 4 if isinstance(weight, TiledInt4Weight) else 8


def tiled_linear_pair(x1, w1, b1, act1, x2, w2, b2, act2):
    """The ``linear_pair`` op for two tiled weights of one format: both linears in one launch."""
    q1, s1, g1 = _tiled_args(w1)
    q2, s2, g2 = _tiled_args(w2)
    bits = _tiled_bits(w1)
    return tuple(torch.ops.neox_rt.quant_linear_tiled_pair(x1, q1, s1, w1.out_features, g1, b1, ACTIVATIONS[act1], x2,
                                                           q2, s2, w2.out_features, g2, b2, ACTIVATIONS[act2], bits,
                                                           PDL))


def tiled_linear_sum(x1, w1, x2, w2, bias1=None, bias2=None, residual=None):
    """The ``linear_sum`` op for two tiled weights of one format: x1 W1^T + x2 W2^T + biases + residual in one launch,
    the fp32 sums rounded once."""
    q1, s1, g1 = _tiled_args(w1)
    q2, s2, g2 = _tiled_args(w2)
    bits = _tiled_bits(w1)
    return torch.ops.neox_rt.quant_linear_tiled_sum(x1, q1, s1, g1, x2, q2, s2, g2, w1.out_features, bits, bias1,
                                                    bias2, residual, PDL, SUM_B_FIRST)


def linear_sum_norm(x1, w1, x2, w2, bias1, bias2, residual, ln_w1, ln_b1, ln_w2, ln_b2, eps):
    """The ``linear_sum_norm`` op for tensor weights at one row: gemv_sum, then the next layer's dual LayerNorm of y
    by the launch's last block: (y, LN1(y), LN2(y))."""
    return tuple(torch.ops.neox_rt.gemv_sum_norm(x1, w1, x2, w2, bias1, bias2, residual, ln_w1, ln_b1, ln_w2, ln_b2,
                                                 float(eps), GEMV2_KSPLIT, GEMV2_MIN_BLOCKS, PDL))


def tiled_linear_sum_norm(x1, w1, x2, w2, bias1, bias2, residual, ln_w1, ln_b1, ln_w2, ln_b2, eps):
    """The ``linear_sum_norm`` op for two tiled weights of one format: the sum, then the next layer's dual LayerNorm
    of it by the launch's last block: (y, LN1(y), LN2(y))."""
    q1, s1, g1 = _tiled_args(w1)
    q2, s2, g2 = _tiled_args(w2)
    bits = _tiled_bits(w1)
    return tuple(torch.ops.neox_rt.quant_linear_tiled_sum_norm(x1, q1, s1, g1, x2, q2, s2, g2, w1.out_features, bits,
                                                               bias1, bias2, residual, ln_w1, ln_b1, ln_w2, ln_b2,
                                                               float(eps), PDL, SUM_B_FIRST))


def tiled_norm_linear_pair(x, ln_w1, ln_b1, ln_w2, ln_b2, eps, w1, b1, act1, w2, b2, act2):
    """The ``norm_linear_pair`` op for two tiled weights of one format: the dual LayerNorm and both linears in one
    launch (each block normalises x for its own linear in shared memory)."""
    q1, s1, g1 = _tiled_args(w1)
    q2, s2, g2 = _tiled_args(w2)
    bits = _tiled_bits(w1)
    return tuple(torch.ops.neox_rt.quant_linear_tiled_norm_pair(
        x, ln_w1, ln_b1, ln_w2, ln_b2, float(eps), q1, s1, w1.out_features, g1, b1, ACTIVATIONS[act1], q2, s2,
        w2.out_features, g2, b2, ACTIVATIONS[act2], bits, PDL))


def linear_pair(x1, w1, b1, act1, x2, w2, b2, act2):
    return tuple(torch.ops.neox_rt.gemv_pair(x1, w1, b1, ACTIVATIONS[act1], x2, w2, b2, ACTIVATIONS[act2],
                                             GEMV2_KSPLIT, GEMV2_MIN_BLOCKS, PDL))


def linear_sum(x1, w1, x2, w2, bias1=None, bias2=None, residual=None):
    return torch.ops.neox_rt.gemv_sum(x1, w1, x2, w2, bias1, bias2, residual, GEMV2_KSPLIT, GEMV2_MIN_BLOCKS, PDL)


def linear_sum_push(p2p, x1, w1, x2, w2, bias1=None, bias2=None, residual=None):
    """linear_sum whose output also goes, flagged, into every peer's slot of ``p2p`` (a parallel.P2PAllReduce),
    for :func:`p2p_reduce_dual_layernorm` there; the caller checks that this module serves the linear_sum call."""
    return torch.ops.neox_rt.gemv_sum(x1, w1, x2, w2, bias1, bias2, residual, GEMV2_KSPLIT, GEMV2_MIN_BLOCKS, PDL,
                                      p2p.ptrs, p2p.rank, p2p.slot_bytes)


def p2p_reduce_dual_layernorm(p2p, partial, weight1, bias1, weight2, bias2, eps):
    """(sum over ranks of the partial, LN1(sum), LN2(sum)): the all-reduce of the peers' linear_sum_push outputs and
    the dual LayerNorm in one kernel."""
    return tuple(torch.ops.neox_rt.p2p_reduce_dual_layernorm(partial, p2p.ptrs, p2p.rank, p2p.slot_bytes, weight1,
                                                             bias1, weight2, bias2, float(eps), PDL))


def rotary_kv_write(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache):
    return torch.ops.neox_rt.rotary_kv_write(qkv, positions, cos, sin, int(rotary_ndims), k_cache, v_cache, PDL)


def decode_attention(q, k_cache, v_cache, seqlens, scale, blocks_per_sm: int | None = None,
                     merge_kernel: bool = False, variant: int | None = None):
    """Flash-decoding in one launch (the last block of each head merges the splits); ``blocks_per_sm`` (split
    plan, default DECODE_BLOCKS_PER_SM), ``merge_kernel`` (a second merge kernel instead) and ``variant`` (step
    scheme, default DECODE_VARIANT) are for tests and bench sweeps; DECODE_SPLIT_BY_LEN splits each sequence's
    length rather than the capacity."""
    bps = DECODE_BLOCKS_PER_SM if blocks_per_sm is None else int(blocks_per_sm)
    var = DECODE_VARIANT if variant is None else int(variant)
    return torch.ops.neox_rt.decode_attention(q, k_cache, v_cache, seqlens, float(scale), PDL, bps,
                                              bool(merge_kernel), var, SUM_B_FIRST, bool(DECODE_SPLIT_BY_LEN))


def rotary_decode_attention(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache, seqlens, scale,
                            blocks_per_sm: int | None = None, merge_kernel: bool = False, variant: int | None = None):
    """:func:`rotary_kv_write` then :func:`decode_attention` in one launch: every block rotates its head's q, the
    block whose split holds the new slot rotates k and writes k and v there (the caches bit for bit as the two
    kernels write them; the output as theirs up to the order of the sums, the new key taken from shared memory)."""
    bps = DECODE_BLOCKS_PER_SM if blocks_per_sm is None else int(blocks_per_sm)
    var = DECODE_VARIANT if variant is None else int(variant)
    return torch.ops.neox_rt.rotary_decode_attention(qkv, positions, cos, sin, int(rotary_ndims), k_cache, v_cache,
                                                     seqlens, float(scale), PDL, bps, bool(merge_kernel), var,
                                                     SUM_B_FIRST, bool(DECODE_SPLIT_BY_LEN))


def paged_decode_attention(q, k_cache, v_cache, block_tables, seqlens, scale, blocks_per_sm: int | None = None,
                           merge_kernel: bool = False):
    """:func:`decode_attention` over the paged cache, through the block tables (one launch, the grid from the table's
    width); ``blocks_per_sm`` (default DECODE_BLOCKS_PER_SM) and ``merge_kernel`` are for tests and bench sweeps."""
    bps = DECODE_BLOCKS_PER_SM if blocks_per_sm is None else int(blocks_per_sm)
    return torch.ops.neox_rt.paged_decode_attention(q, k_cache, v_cache, block_tables, seqlens, float(scale), PDL,
                                                    bps, bool(merge_kernel), SUM_B_FIRST)


def scaled_causal_softmax(scores, query_positions, scale):
    return torch.ops.neox_rt.scaled_causal_softmax(scores, query_positions, float(scale))


def attention(q, k_cache, v_cache, positions, scale):
    """Prefill attention: QK^T and PV through cuBLAS (fp32 accumulation), the fused causal softmax between.

    Like the reference it reads only the first max(positions) + 1 cache slots (one host sync: prefill is not
    graph-captured). q [b, s, nh, hd] -> [b, s, nh, hd].
    """
    b = q.shape[0]
    t = int(positions.max().item()) + 1
    k = k_cache[:b, :, :t]  # [b, nh, t, hd]
    v = v_cache[:b, :, :t]
    scores = torch.matmul(q.transpose(1, 2), k.transpose(-1, -2))  # [b, nh, s, t]
    probs = torch.ops.neox_rt.scaled_causal_softmax(scores, positions.contiguous(), float(scale))
    return torch.matmul(probs, v).transpose(1, 2)  # [b, s, nh, hd]


# ----------------------------------------------------------------------------------------------------
# supports(): cheap checks on the arguments, no device work
# ----------------------------------------------------------------------------------------------------

def _cuda_float(t: torch.Tensor, dtypes=FLOAT_DTYPES) -> bool:
    return t.is_cuda and t.dtype in dtypes and t.is_contiguous()


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    """The compute capability the extension's kernels run as on ``device``: the device's own, or lower where the
    build's newest target is older and the driver compiles its PTX (a "7.5+PTX" build on an H100 runs the T4 code:
    no bf16 tensor cores there, whatever the card has)."""
    cap = torch.cuda.get_device_capability(device)
    try:
        arch = torch.ops.neox_rt.kernel_arch(device.index if device.index is not None
                                              else torch.cuda.current_device())
    except (AttributeError, RuntimeError):  # an extension without the op: the device decides, as before
        return cap
    return min(cap, divmod(int(arch), 10))


def _aligned16(*ts) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


def supports_layernorm(x, weight, bias, eps=1e-5, *rest) -> bool:
    """CUDA float x contiguous, weight/bias [hidden] of x's dtype; hidden fits the register-resident row."""
    n = x.shape[-1] if x.dim() else 0
    if not (_cuda_float(x) and n > 0):
        return False
    params = (weight, bias) + tuple(t for t in rest if isinstance(t, torch.Tensor))
    if not all(p.dtype == x.dtype and p.is_contiguous() and p.shape == (n,) and p.device == x.device
               for p in params):
        return False
    vec = 16 // x.element_size()
    if n % vec == 0 and _aligned16(x, *params):
        return n <= 1024 * 8 * vec
    return n <= LAYERNORM_MAX_HIDDEN_UNALIGNED


def supports_dual_layernorm(x, weight1, bias1, weight2, bias2, eps=1e-5) -> bool:
    return supports_layernorm(x, weight1, bias1, eps, weight2, bias2)


def supports_linear(x, weight, bias=None, activation=None, residual=None) -> bool:
    """fp16/bf16 CUDA, contiguous, at most GEMV_MAX_ROWS rows, in_features % 8 == 0, 16-byte aligned; an
    optional residual of the output's shape and dtype. Above one row only where the tensor-core tiles run and win
    (in_features % 64 == 0, a weight of at most GEMV_MMA_MAX_WEIGHT elements, bf16 only from sm_80 on)."""
    if (activation not in ACTIVATIONS or not isinstance(weight, torch.Tensor)
            or not _cuda_float(x, (torch.float16, torch.bfloat16))):
        return False
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if k == 0 or k % 8 or rows > GEMV_MAX_ROWS:
        return False
    if rows > 1 and (k % 64 or weight.shape[0] * k > GEMV_MMA_MAX_WEIGHT
                     or (x.dtype == torch.bfloat16 and _capability(x.device)[0] < 8)):
        return False
    if not (weight.dtype == x.dtype and weight.is_contiguous() and weight.dim() == 2 and weight.shape[1] == k):
        return False
    if bias is not None and not (bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == weight.shape[:1]):
        return False
    if residual is not None and not (residual.dtype == x.dtype and residual.is_contiguous()
                                     and residual.shape == (*x.shape[:-1], weight.shape[0])):
        return False
    return _aligned16(x, weight)


def _quant_common(x, weight, bias, activation, residual, chunk: int) -> bool:
    """What the quantized linears share: x fp16 (bf16 from sm_80 on) on CUDA, contiguous and 16-byte aligned, with
    1..QUANT_MAX_ROWS rows and in_features a positive multiple of ``chunk``; the weight's buffers on x's device,
    contiguous, scales of x's dtype (a tiled int4 weight: its ``scale_dtype``); bias [out] and residual [..., out]
    of x's dtype, contiguous."""
    if activation not in ACTIVATIONS or not _cuda_float(x, (torch.float16, torch.bfloat16)) or x.dim() == 0:
        return False
    k = x.shape[-1]
    if k == 0 or k % chunk or k != weight.in_features or not 0 < x.numel() // k <= QUANT_MAX_ROWS:
        return False
    buffers = tuple(weight.buffers())
    scale_dtype = weight.scale_dtype if isinstance(weight, TiledInt4Weight) else weight.scales.dtype
    if not all(b.device == x.device and b.is_contiguous() for b in buffers) or scale_dtype != x.dtype:
        return False
    n = weight.out_features
    if bias is not None and not (bias.dtype == x.dtype and bias.device == x.device and bias.is_contiguous()
                                 and bias.shape == (n,)):
        return False
    if residual is not None and not (residual.dtype == x.dtype and residual.device == x.device
                                     and residual.is_contiguous() and residual.shape == (*x.shape[:-1], n)):
        return False
    if x.dtype == torch.bfloat16 and _capability(x.device)[0] < 8:
        return False
    return _aligned16(x, weight.qweight)


def supports_int8_linear(x, weight, bias=None, activation=None, residual=None) -> bool:
    """An :class:`Int8Weight` (int8 qweight [out, in], scales [out] of x's dtype) with in_features % 64 == 0, and
    x, bias, residual as :func:`_quant_common` says."""
    return (isinstance(weight, Int8Weight) and weight.qweight.dtype == torch.int8
            and _quant_common(x, weight, bias, activation, residual, 64))


def supports_int4_linear(x, weight, bias=None, activation=None, residual=None) -> bool:
    """An :class:`Int4Weight` with in_features % 128 == 0, a group size that is a multiple of 32 and divides
    in_features (int32 qweight, scales of x's dtype, uint8 zeros [out, in / group]), and x, bias, residual as
    :func:`_quant_common` says. (bf16 also needs zero points below 128, which every 4-bit zero point is.)"""
    return (isinstance(weight, Int4Weight) and weight.group_size % 32 == 0
            and weight.in_features % weight.group_size == 0 and weight.qweight.dtype == torch.int32
            and weight.zeros.dtype == torch.uint8 and _quant_common(x, weight, bias, activation, residual, 128))


def _gemv2_operand(x, weight, bias, like) -> bool:
    """One row of x (numel == in_features, a multiple of 16) of ``like``'s dtype and device, weight [n, in], bias [n],
    contiguous and 16-byte aligned: an operand of the fused GEMV pairs."""
    k = x.shape[-1] if x.dim() else 0
    return (isinstance(weight, torch.Tensor) and _cuda_float(x, (torch.float16, torch.bfloat16))
            and x.dtype == like.dtype and x.device == like.device
            and k > 0 and k % 16 == 0 and x.numel() == k and weight.dtype == x.dtype and weight.is_contiguous()
            and weight.dim() == 2 and weight.shape[1] == k and weight.device == x.device
            and (bias is None or (bias.dtype == x.dtype and bias.is_contiguous() and bias.shape == weight.shape[:1]))
            and _aligned16(x, weight))


def supports_linear_pair(x1, w1, b1, act1, x2, w2, b2, act2) -> bool:
    """Both problems one row (decode at batch 1), fp16/bf16 CUDA, in_features % 16 == 0, 16-byte aligned."""
    return act1 in ACTIVATIONS and act2 in ACTIVATIONS and _gemv2_operand(x1, w1, b1, x1) and _gemv2_operand(
        x2, w2, b2, x1)


def supports_linear_sum(x1, w1, x2, w2, bias1=None, bias2=None, residual=None) -> bool:
    """As supports_linear_pair, weights of the same out_features, a residual of the output's shape."""
    if not (_gemv2_operand(x1, w1, bias1, x1) and _gemv2_operand(x2, w2, bias2, x1) and w1.shape[0] == w2.shape[0]
            and x1.shape[:-1] == x2.shape[:-1]):
        return False
    return residual is None or (residual.dtype == x1.dtype and residual.is_contiguous()
                                and residual.device == x1.device and residual.shape == (*x1.shape[:-1], w1.shape[0]))


def _fused_tiled(x1, w1, x2, w2) -> bool:
    """Two tiled weights of one format (made by :func:`prepare_linear_weight`, so within the kernels' bounds), x1 and x2
    of one leading shape with 1..QUANT_FUSED_MAX_ROWS rows, the auto variant, and the fusion on (QUANT_FUSED)."""
    if not (QUANT_FUSED and QUANT_VARIANT == 0 and type(w1) is type(w2)
            and isinstance(w1, (TiledInt8Weight, TiledInt4Weight))):
        return False
    if x1.dim() == 0 or x2.dim() == 0 or x1.shape[:-1] != x2.shape[:-1] or x1.shape[-1] == 0:
        return False
    return x1.numel() // x1.shape[-1] <= QUANT_FUSED_MAX_ROWS


def supports_tiled_linear_pair(x1, w1, b1, act1, x2, w2, b2, act2) -> bool:
    """Two tiled weights of one format, each linear as :func:`supports_tiled_linear` takes it, up to
    QUANT_FUSED_MAX_ROWS rows."""
    return (_fused_tiled(x1, w1, x2, w2) and supports_tiled_linear(x1, w1, b1, act1)
            and supports_tiled_linear(x2, w2, b2, act2))


def supports_tiled_norm_linear_pair(x, ln_w1, ln_b1, ln_w2, ln_b2, eps, w1, b1, act1, w2, b2, act2) -> bool:
    """As :func:`supports_tiled_linear_pair` with x for both linears, QUANT_FUSED 2, a hidden size that is a multiple
    of 8, rows x hidden up to QUANT_NORM_AUTO_MAX_ELEMS (where it measured faster; the kernel takes up to
    QUANT_NORM_MAX_ELEMS), and LayerNorm parameters [hidden] of x's dtype on its device, contiguous and 16-byte
    aligned."""
    if not _norm_pair_takes(x.numel()) or not supports_tiled_linear_pair(x, w1, b1, act1, x, w2, b2, act2):
        return False
    k = x.shape[-1]
    return k % 8 == 0 and _layernorm_params_ok(x, k, (ln_w1, ln_b1, ln_w2, ln_b2))


def _norm_pair_takes(elems: int) -> bool:
    """Whether the op table sends a tiled pair's x of ``elems`` values (rows x hidden) to the pair with the dual
    LayerNorm inside: QUANT_FUSED 2 and at most QUANT_NORM_AUTO_MAX_ELEMS (within the kernel's QUANT_NORM_MAX_ELEMS).
    The quantized sums' SUM_NORM 3 normalises exactly where it does not."""
    return QUANT_FUSED == 2 and elems <= min(QUANT_NORM_AUTO_MAX_ELEMS, QUANT_NORM_MAX_ELEMS)


def _layernorm_params_ok(x, n, params) -> bool:
    """LayerNorm parameters [n] of x's dtype on its device, contiguous and 16-byte aligned (the fused kernels'
    vector loads)."""
    return all(isinstance(p, torch.Tensor) and p.dtype == x.dtype and p.device == x.device and p.is_contiguous()
               and p.shape == (n,) for p in params) and _aligned16(*params)


def supports_tiled_linear_sum(x1, w1, x2, w2, bias1=None, bias2=None, residual=None) -> bool:
    """As :func:`supports_tiled_linear_pair`, the two weights of the same out_features, the residual of the output's
    shape."""
    return (_fused_tiled(x1, w1, x2, w2) and w1.out_features == w2.out_features
            and supports_tiled_linear(x1, w1, bias1, None, residual) and supports_tiled_linear(x2, w2, bias2, None,
                                                                                               residual))


def _sum_norm_ok(x1, n, params) -> bool:
    """Up to SUM_NORM_MAX_ROWS rows of x1, a hidden size n that is a multiple of 8 up to SUM_NORM_MAX_HIDDEN, and
    LayerNorm parameters [n] of x1's dtype on its device, contiguous and 16-byte aligned."""
    return (n % 8 == 0 and 0 < n <= SUM_NORM_MAX_HIDDEN and x1.numel() // max(x1.shape[-1], 1) <= SUM_NORM_MAX_ROWS
            and _layernorm_params_ok(x1, n, params))


def supports_linear_sum_norm(x1, w1, x2, w2, bias1, bias2, residual, ln_w1, ln_b1, ln_w2, ln_b2, eps) -> bool:
    """SUM_NORM 1-3, as :func:`supports_linear_sum` (tensor weights, one row), and :func:`_sum_norm_ok`."""
    return (SUM_NORM >= 1 and supports_linear_sum(x1, w1, x2, w2, bias1, bias2, residual)
            and _sum_norm_ok(x1, w1.shape[0], (ln_w1, ln_b1, ln_w2, ln_b2)))


def supports_tiled_linear_sum_norm(x1, w1, x2, w2, bias1, bias2, residual, ln_w1, ln_b1, ln_w2, ln_b2, eps) -> bool:
    """SUM_NORM 2, or 3 where the next layer's pair would not normalise its x itself (the output, rows x
    out_features, above QUANT_NORM_AUTO_MAX_ELEMS, or QUANT_FUSED < 2: see supports_tiled_norm_linear_pair); as
    :func:`supports_tiled_linear_sum`, and :func:`_sum_norm_ok`."""
    rows = x1.numel() // max(x1.shape[-1], 1)
    return ((SUM_NORM == 2 or (SUM_NORM == 3 and not _norm_pair_takes(rows * w1.out_features)))
            and supports_tiled_linear_sum(x1, w1, x2, w2, bias1, bias2, residual)
            and _sum_norm_ok(x1, w1.out_features, (ln_w1, ln_b1, ln_w2, ln_b2)))


def supports_linear_sum_push(x1, w1, x2, w2, bias1=None, bias2=None, residual=None) -> bool:
    """Whether :func:`linear_sum_push` (the fp16/bf16 GEMV pair's kernel) can run this ``linear_sum`` call: tensor
    weights only (a quantized pair runs its own kernel, which pushes nothing: the all-reduce then runs on its own)."""
    return supports_linear_sum(x1, w1, x2, w2, bias1, bias2, residual)


def supports_rotary_kv_write(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache) -> bool:
    """CUDA float, everything contiguous, caches of qkv's dtype, int64 positions, fp32 tables."""
    return (_cuda_float(qkv) and k_cache.dtype == qkv.dtype and v_cache.dtype == qkv.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous() and positions.dtype == torch.int64
            and positions.is_contiguous() and cos.dtype == torch.float32 and sin.dtype == torch.float32
            and cos.is_contiguous() and sin.is_contiguous() and rotary_ndims % 2 == 0)


def supports_decode_attention(q, k_cache, v_cache, seqlens, scale) -> bool:
    """CUDA float q [b, nh, hd] with hd in DECODE_HEAD_SIZES, contiguous and 16-byte aligned q and caches of
    q's dtype, int64 seqlens."""
    return (_cuda_float(q) and q.dim() == 3 and q.shape[-1] in DECODE_HEAD_SIZES and q.is_contiguous()
            and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype and k_cache.is_contiguous()
            and v_cache.is_contiguous() and seqlens.dtype == torch.int64 and seqlens.is_contiguous()
            and _aligned16(q, k_cache, v_cache))


def supports_rotary_decode_attention(qkv, positions, cos, sin, rotary_ndims, k_cache, v_cache, seqlens,
                                     scale) -> bool:
    """``NEOX_RT_DECODE_ROTARY_FUSED`` on; CUDA float qkv [b, 1, nh*3*hd] with hd in DECODE_HEAD_SIZES and caches
    [B >= b, nh, T, hd] of its dtype, all contiguous, qkv and caches 16-byte aligned; int64 positions [b, 1] and
    seqlens [b]; fp32 tables [max_pos >= 1, rotary_ndims / 2], rotary_ndims even; everything on qkv's device."""
    if not (DECODE_ROTARY_FUSED and _cuda_float(qkv) and qkv.dim() == 3 and qkv.shape[1] == 1
            and k_cache.dim() == 4):
        return False
    b, nh, hd = qkv.shape[0], k_cache.shape[1], k_cache.shape[3]
    rd = int(rotary_ndims)
    return (hd in DECODE_HEAD_SIZES and qkv.shape[2] == 3 * nh * hd and k_cache.shape[0] >= b
            and v_cache.shape == k_cache.shape and k_cache.dtype == qkv.dtype and v_cache.dtype == qkv.dtype
            and qkv.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
            and positions.dtype == torch.int64 and tuple(positions.shape) == (b, 1) and positions.is_contiguous()
            and seqlens.dtype == torch.int64 and tuple(seqlens.shape) == (b,) and seqlens.is_contiguous()
            and 0 <= rd <= hd and rd % 2 == 0 and cos.dtype == torch.float32 and sin.dtype == torch.float32
            and cos.dim() == 2 and cos.shape[0] >= 1 and cos.shape[1] == rd // 2 and sin.shape == cos.shape
            and cos.is_contiguous() and sin.is_contiguous()
            and all(t.device == qkv.device for t in (positions, cos, sin, k_cache, v_cache, seqlens))
            and k_cache.shape[2] * hd < 2 ** 31 and _aligned16(qkv, k_cache, v_cache))


def supports_paged_decode_attention(q, k_cache, v_cache, block_tables, seqlens, scale) -> bool:
    """CUDA float q [b, nh, hd] with hd in DECODE_HEAD_SIZES; caches [num_blocks >= 1, nh, bs, hd] of q's dtype, bs a
    power of two; int32 block_tables [b, max_blocks <= PAGED_MAX_BLOCKS] and seqlens [b] on q's device; everything
    contiguous, q and caches 16-byte aligned; max_blocks * bs * hd < 2^31. (Triton takes int64 tables.)"""
    if not (_cuda_float(q) and q.dim() == 3 and q.shape[-1] in DECODE_HEAD_SIZES and k_cache.dim() == 4
            and block_tables.dim() == 2):
        return False
    b, nh, hd = q.shape
    num_blocks, cache_nh, bs, cache_hd = k_cache.shape
    return (k_cache.dtype == q.dtype and v_cache.dtype == q.dtype and v_cache.shape == k_cache.shape
            and cache_nh == nh and cache_hd == hd and num_blocks >= 1 and bs >= 1 and bs & (bs - 1) == 0
            and k_cache.is_contiguous() and v_cache.is_contiguous()
            and block_tables.dtype == torch.int32 and block_tables.shape[0] == b and block_tables.is_contiguous()
            and block_tables.shape[1] <= PAGED_MAX_BLOCKS and max(block_tables.shape[1], 1) * bs * hd < 2 ** 31
            and seqlens.dtype == torch.int32 and seqlens.shape == (b,) and seqlens.is_contiguous()
            and k_cache.device == q.device and v_cache.device == q.device
            and block_tables.device == q.device and seqlens.device == q.device
            and _aligned16(q, k_cache, v_cache))


def supports_attention(q, k_cache, v_cache, positions, scale) -> bool:
    """CUDA float q, caches of q's dtype, int64 positions."""
    return (q.is_cuda and q.dtype in FLOAT_DTYPES and k_cache.dtype == q.dtype and v_cache.dtype == q.dtype
            and positions.dtype == torch.int64)


def supports_scaled_causal_softmax(scores, query_positions, scale) -> bool:
    """CUDA float scores [b, nh, s, t] contiguous, int64 positions."""
    return _cuda_float(scores) and scores.dim() == 4 and query_positions.dtype == torch.int64


def supports_tiled_linear(x, weight, bias=None, activation=None, residual=None) -> bool:
    """A :class:`TiledInt8Weight` or :class:`TiledInt4Weight` (made by :func:`prepare_linear_weight`, so within the
    kernel's bounds), x, bias, residual as :func:`_quant_common` says, and kernels built for sm_80 or newer."""
    if not isinstance(weight, (TiledInt8Weight, TiledInt4Weight)):
        return False
    chunk = 128 if isinstance(weight, TiledInt4Weight) else 64
    return _quant_common(x, weight, bias, activation, residual, chunk) and _capability(x.device)[0] >= 8


def _tileable(weight) -> bool:
    """Whether the LEAN kernel reads ``weight`` in the tiled layout (csrc/kernels/quant_gemm.cuh, quant_lean_ok and
    the launchers' checks): CUDA, kernels of sm_80 or newer, in_features a multiple of the chunk (64 int8, 128
    int4), int4 groups of a multiple of 32 dividing 512 and in_features with 16-bit scales, and 32-bit offsets."""
    if not (weight.qweight.is_cuda and _capability(weight.qweight.device)[0] >= 8):
        return False
    k, n_pad = weight.in_features, -(-weight.out_features // TILE_ROWS) * TILE_ROWS
    if isinstance(weight, Int4Weight):
        g = weight.group_size
        ok = (k % 128 == 0 and g % 32 == 0 and 512 % g == 0 and k % g == 0 and weight.scales.element_size() == 2
              and weight.zeros.dtype == torch.uint8)
        return ok and n_pad * (k // 2) + 512 < 2 ** 31
    return k % 64 == 0 and n_pad * k + 512 < 2 ** 31


def prepare_linear_weight(weight):
    """The ``linear`` op's layout converter (:meth:`neox_rt.ops.table.Op.prepare`): an :class:`Int8Weight` or
    :class:`Int4Weight` the LEAN kernel can read becomes its tiled form (its warps' loads 512 contiguous bytes instead
    of eight 64-byte pieces: 6-10% faster on the 20B and 1.4b decode linears on an H100, bench/NOTES.md session 18);
    anything else, or ``NEOX_RT_QUANT_TILED=0``, stays as it is."""
    if not QUANT_TILED or type(weight) not in (Int8Weight, Int4Weight) or not _tileable(weight):
        return weight
    with torch.no_grad():
        return (TiledInt4Weight if isinstance(weight, Int4Weight) else TiledInt8Weight).from_row_major(weight)


PREPARES = {"linear": prepare_linear_weight}
"""Op name -> this backend's weight-layout converter (registered beside its implementations)."""

IMPLS = {
    "layernorm": (layernorm, supports_layernorm),
    "dual_layernorm": (dual_layernorm, supports_dual_layernorm),
    # tried in order: the fp16 GEMV takes tensor weights, the quantized kernels their formats
    "linear": [(linear, supports_linear), (tiled_linear, supports_tiled_linear), (int8_linear, supports_int8_linear),
               (int4_linear, supports_int4_linear)],
    # the fp16 GEMV pairs for tensor weights, then the quantized pairs for tiled weights
    "linear_pair": [(linear_pair, supports_linear_pair), (tiled_linear_pair, supports_tiled_linear_pair)],
    "linear_sum": [(linear_sum, supports_linear_sum), (tiled_linear_sum, supports_tiled_linear_sum)],
    # the quantized pair with the dual LayerNorm in its launch; tensor weights go to the reference's two ops
    "norm_linear_pair": (tiled_norm_linear_pair, supports_tiled_norm_linear_pair),
    # the sums with the next layer's dual LayerNorm in their launch (fp16 GEMV, then tiled quantized weights); the rest
    # to the reference's two ops
    "linear_sum_norm": [(linear_sum_norm, supports_linear_sum_norm),
                        (tiled_linear_sum_norm, supports_tiled_linear_sum_norm)],
    "rotary_kv_write": (rotary_kv_write, supports_rotary_kv_write),
    "decode_attention": (decode_attention, supports_decode_attention),
    "rotary_decode_attention": (rotary_decode_attention, supports_rotary_decode_attention),
    "paged_decode_attention": (paged_decode_attention, supports_paged_decode_attention),
    "attention": (attention, supports_attention),
    "scaled_causal_softmax": (scaled_causal_softmax, supports_scaled_causal_softmax),
}


def implementations() -> dict:
    """op name -> (implementation, supports predicate), or a list of them tried in order; loads the extension
    (ImportError if it is missing)."""
    load_extension()
    return dict(IMPLS)


# ----------------------------------------------------------------------------------------------------
# Benchmark: GEMV vs cuBLAS (python -m neox_rt.ops.cuda bench [--out FILE])
# ----------------------------------------------------------------------------------------------------

def _time_ms(fn, iters=50, warmup=10) -> float:
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s_, e_ in zip(starts, ends):
        s_.record()
        fn()
        e_.record()
    torch.cuda.synchronize()
    return sorted(s_.elapsed_time(e_) for s_, e_ in zip(starts, ends))[iters // 2]


def bench(out: str | None = None) -> list[dict]:
    """Median time (CUDA events, L2 warm) of the GEMV and F.linear over the model's linear shapes."""
    import json
    import torch.nn.functional as F
    load_extension()
    shapes = {  # (out, in) of the linears of pythia-1.4b, pythia-6.9b and 20B (TP=1)
        "1.4b qkv": (6144, 2048), "1.4b h->4h": (8192, 2048), "1.4b 4h->h": (2048, 8192),
        "6.9b qkv": (12288, 4096), "6.9b h->4h": (16384, 4096), "6.9b 4h->h": (4096, 16384),
        "20b qkv": (18432, 6144), "20b h->4h": (24576, 6144), "20b 4h->h": (6144, 24576),
        "lm head 6.9b": (50432, 4096),
    }
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        bias = torch.randn(n, device="cuda", dtype=torch.float16) * 0.02
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t_kernel = _time_ms(lambda: torch.ops.neox_rt.gemv(x, w, bias, 1))
            t_cublas = _time_ms(lambda: F.gelu(F.linear(x, w, bias)))
            rows.append(dict(shape=name, m=m, n=n, k=k, gemv_ms=t_kernel, cublas_ms=t_cublas,
                             gemv_gbps=w.numel() * 2 / t_kernel / 1e6, speedup=t_cublas / t_kernel))
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                l2="warm", rows=rows)
    if out:
        with open(out, "w") as f:
            json.dump(info, f, indent=1)
    print(f"{'shape':14s} {'m':>3s} {'gemv ms':>9s} {'cublas ms':>9s} {'GB/s':>7s} {'speedup':>7s}")
    for r in rows:
        print(f"{r['shape']:14s} {r['m']:3d} {r['gemv_ms']:9.4f} {r['cublas_ms']:9.4f} {r['gemv_gbps']:7.0f} "
              f"{r['speedup']:7.2f}")
    return rows


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["bench"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    bench(a.out)
