"""Weight formats: a quantized linear weight as a type (``Int8Weight``, ``Int4Weight``), never a flag.

A format is an ``nn.Module`` holding buffers, so ``.to(device)``, ``state_dict`` and ``load_state_dict`` work and a
checkpoint names its tensors ``<linear>.weight.<buffer>``. It takes the place of a :class:`neox_rt.model.layers.Linear`
parameter ``weight`` (``del linear.weight; linear.weight = fmt``); the op table's reference runs it as "dequantize,
then matmul" (:func:`neox_rt.ops.reference.dense_weight`) and kernels that read the packed form register for it
(:mod:`neox_rt.ops.triton`). Every format has ``out_features``, ``in_features``, ``dequantize(dtype) -> [out, in]``,
``nbytes()`` and a classmethod ``quantize(weight, ...)`` (round to nearest, RTN).

- :class:`Int8Weight`: symmetric, one scale per output channel: ``W[n, k] = qweight[n, k] * scales[n]``, qweight int8
  in [-127, 127] ``[out, in]``.
- :class:`Int4Weight`: asymmetric, groups of ``group_size`` (default 128) consecutive input features with one scale
  and one integer zero point each: ``W[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]``, q in [0, 15].
  Packed along the input dim, 8 values per int32 word (see the class docstring for the exact bit order).

Tensor parallelism: each rank's shard is quantized on its own (or sliced from a quantized checkpoint along whole
groups); :meth:`WeightFormat.shard_dims` says which dim of each buffer a column- or row-parallel split cuts.
"""
from __future__ import annotations

import torch
from torch import nn

from neox_rt.errors import NeoxRtError

INT4_PER_WORD = 8
"""4-bit values per int32 word of :class:`Int4Weight`'s ``qweight``."""

DEQUANT_CHUNK_ELEMS = 1 << 22
"""Weights a ``dequantize`` step handles at once: its fp32 temporaries stay at a few times 16 MB whatever the layer
(20B's h->4h is 151M weights: dequantized in one go, its fp32 temporaries took 2.4 GB beside the fp16 result and
broke the 15 GiB cap of #24); the result, of the asked dtype, is the only full-size tensor."""


def _by_row_chunks(out_features: int, in_features: int, dtype: torch.dtype, device, rows_fn) -> torch.Tensor:
    """[out, in] of ``dtype`` filled ``rows_fn(r0, r1)`` (fp32 rows r0..r1-1) a chunk of rows at a time."""
    out = torch.empty(out_features, in_features, dtype=dtype, device=device)
    step = max(1, DEQUANT_CHUNK_ELEMS // max(1, in_features))
    for r0 in range(0, out_features, step):
        r1 = min(out_features, r0 + step)
        out[r0:r1] = rows_fn(r0, r1)  # the one rounding to dtype, as before
    return out


class WeightFormat(nn.Module):
    """Base of the weight formats: buffers only, no parameters; ``shape`` is the dense ``(out, in)``."""

    FORMAT = ""  # the checkpoint's name for the format (``quantization_config``)
    KIND = ""  # its name in the memory report: FORMAT, or a runtime form's (e.g. "int4 tiled")

    @property
    def kind(self) -> str:
        return self.KIND or self.FORMAT

    def nbytes(self) -> int:
        """Bytes of every buffer (packed weight, scales, zeros): what decode reads per token."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.scales.device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover - each format defines it
        raise NotImplementedError

    @classmethod
    def shard_dims(cls, split_dim: int | None) -> dict[str, int | None]:
        """Buffer name -> the dim a tensor-parallel split cuts, for a weight split on ``split_dim`` of [out, in]
        (0: column-parallel, 1: row-parallel, None: replicated)."""
        raise NotImplementedError


def _checked_weight(weight: torch.Tensor) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise NeoxRtError(f"a weight to quantize must be a 2-D float tensor [out, in], got "
                          f"{getattr(weight, 'shape', type(weight).__name__)}")
    return weight


class Int8Weight(WeightFormat):
    """W[n, k] = qweight[n, k] * scales[n]: int8 ``qweight`` [out, in] in [-127, 127], ``scales`` [out] (float).

    Symmetric (no zero point): the absmax of each output row maps to 127; -128 is never used, so negation is exact.
    """

    FORMAT = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scales.shape != qweight.shape[:1]:
            raise NeoxRtError(f"Int8Weight needs int8 qweight [out, in] and scales [out], got {qweight.dtype} "
                              f"{list(qweight.shape)} and {list(scales.shape)}")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @classmethod
    def empty(cls, out_features: int, in_features: int, scale_dtype=torch.float16, device=None) -> "Int8Weight":
        return cls(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                   torch.empty(out_features, dtype=scale_dtype, device=device))

    @classmethod
    def quantize(cls, weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> "Int8Weight":
        """RTN: scales = absmax(W[n, :]) / 127 rounded to ``scale_dtype`` (default: the weight's dtype), then
        qweight = round(W / scales) (an all-zero row gets scale 1)."""
        w = _checked_weight(weight).float()
        scale_dtype = scale_dtype or weight.dtype
        absmax = w.abs().amax(dim=1)
        scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)).to(scale_dtype)
        q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q, scales)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """qweight * scales in fp32, rounded once to ``dtype``: [out, in] (a chunk of rows at a time)."""
        return _by_row_chunks(self.out_features, self.in_features, dtype, self.qweight.device,
                              lambda r0, r1: self.qweight[r0:r1].float() * self.scales[r0:r1].float()[:, None])

    @classmethod
    def shard_dims(cls, split_dim):
        return {"qweight": split_dim, "scales": 0 if split_dim == 0 else None}

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, scales={self.scales.dtype}"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[out, k] integers in [0, 15] -> int32 [out, ceil(k / 8)]: value k of a row sits in word k // 8 at bits
    4 * (k % 8) (k padded with zeros to a multiple of 8)."""
    out, k = q.shape
    words = -(-k // INT4_PER_WORD)
    padded = torch.zeros(out, words * INT4_PER_WORD, dtype=torch.int64, device=q.device)
    padded[:, :k] = q.to(torch.int64)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=q.device)
    packed = (padded.view(out, words, INT4_PER_WORD) << shifts).sum(dim=2)  # < 2**32, no carries between nibbles
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: int32 [out, words] -> uint8 [out, k] in [0, 15]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    q = (packed[:, :, None] >> shifts) & 0xF  # arithmetic shift, then the mask drops the sign bits
    return q.reshape(packed.shape[0], -1)[:, :k].to(torch.uint8)


class Int4Weight(WeightFormat):
    """W[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g], g = k // group_size; q and zeros integers.

    Buffers: ``qweight`` int32 [out, ceil(in / 8)], ``scales`` float [out, groups], ``zeros`` uint8 [out, groups],
    groups = ceil(in / group_size): when in_features is not a multiple of the group size the LAST group is shorter
    (no padding of the math; ``qweight`` pads k to a multiple of 8 with zero nibbles that no one reads).

    Layout (for the kernels): row n of ``qweight`` holds row n of W along k, value k in word k // 8 at bits
    4 * (k % 8) (sequential nibbles, the GPTQ order along k). On a little-endian machine that is byte-identical to
    uint8 [out, ceil(in / 2)] with k even in the low nibble, so a kernel may read it as int32 words, as bytes, or
    as 16-byte vectors of 32 values. Rows are contiguous along k like the fp16 weight [out, in] the decode GEMVs
    stream today: a GEMV walks k with each thread reading 16 contiguous bytes of one row, and one scale and zero
    per 128 values of that row (``scales``/``zeros`` row-major [out, groups], contiguous along the row too).

    Asymmetric, chosen because (1) round-to-nearest with a min/max range per group uses all 16 levels, where a
    symmetric grid leaves one unused and wastes half its range on skewed groups: at 4 bits that is the larger
    part of the error on small models; (2) it represents GPTQ checkpoints exactly, symmetric (zero 8) or not; (3)
    it costs one byte per group (0.06 bits a weight) and one integer subtract per value in the kernel.
    """

    FORMAT = "int4"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, in_features: int,
                 group_size: int):
        super().__init__()
        if group_size <= 0 or group_size % INT4_PER_WORD:
            raise NeoxRtError(f"int4 group size must be a positive multiple of 8, got {group_size}")
        groups = -(-in_features // group_size)
        out = qweight.shape[0] if qweight.dim() == 2 else -1
        if (qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[1] != -(-in_features // 8)
                or scales.shape != (out, groups) or zeros.shape != (out, groups) or zeros.dtype != torch.uint8):
            raise NeoxRtError(
                f"Int4Weight of in_features {in_features}, group {group_size} needs int32 qweight [out, "
                f"{-(-in_features // 8)}], scales and uint8 zeros [out, {groups}]; got {qweight.dtype} "
                f"{list(qweight.shape)}, {list(scales.shape)}, {zeros.dtype} {list(zeros.shape)}")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.in_features = int(in_features)
        self.group_size = int(group_size)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @classmethod
    def empty(cls, out_features: int, in_features: int, group_size: int = 128, scale_dtype=torch.float16,
              device=None) -> "Int4Weight":
        groups = -(-in_features // group_size)
        return cls(torch.empty(out_features, -(-in_features // 8), dtype=torch.int32, device=device),
                   torch.empty(out_features, groups, dtype=scale_dtype, device=device),
                   torch.empty(out_features, groups, dtype=torch.uint8, device=device), in_features, group_size)

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = 128,
                 scale_dtype: torch.dtype | None = None) -> "Int4Weight":
        """RTN per group (GPTQ's min/max quantizer): lo = min(min W_g, 0), hi = max(max W_g, 0),
        scale = (hi - lo) / 15 rounded to ``scale_dtype`` (default the weight's), zero = clamp(round(-lo / scale),
        0, 15), q = clamp(round(W / scale) + zero, 0, 15). A group of zeros gets scale 1."""
        w = _checked_weight(weight).float()
        if group_size <= 0 or group_size % INT4_PER_WORD:
            raise NeoxRtError(f"int4 group size must be a positive multiple of 8, got {group_size}")
        scale_dtype = scale_dtype or weight.dtype
        out, k = w.shape
        groups = -(-k // group_size)
        pad = groups * group_size - k
        # the padded tail of a short last group repeats its first value: it moves neither min nor max
        first_of_last = (groups - 1) * group_size
        wg = torch.cat([w, w[:, first_of_last:first_of_last + 1].expand(out, pad)], 1) if pad else w
        wg = wg.view(out, groups, group_size)
        lo = wg.amin(dim=2).clamp(max=0)
        hi = wg.amax(dim=2).clamp(min=0)
        scales = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi)).to(scale_dtype)
        s = scales.float()
        zeros = torch.round(-lo / s).clamp_(0, 15)
        q = (torch.round(wg / s[:, :, None]) + zeros[:, :, None]).clamp_(0, 15).reshape(out, -1)[:, :k]
        return cls(pack_int4(q), scales, zeros.to(torch.uint8), k, group_size)

    def unpacked(self) -> torch.Tensor:
        """q as uint8 [out, in]."""
        return unpack_int4(self.qweight, self.in_features)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """(q - zero) * scale per group in fp32, rounded once to ``dtype``: [out, in] (a chunk of rows at a time)."""
        g = torch.arange(self.in_features, device=self.qweight.device) // self.group_size

        def rows(r0, r1):
            q = unpack_int4(self.qweight[r0:r1], self.in_features).float()
            return (q - self.zeros[r0:r1].float()[:, g]) * self.scales[r0:r1].float()[:, g]

        return _by_row_chunks(self.out_features, self.in_features, dtype, self.qweight.device, rows)

    @classmethod
    def shard_dims(cls, split_dim):
        return {"qweight": split_dim, "scales": split_dim, "zeros": split_dim}

    def extra_repr(self) -> str:
        return (f"out_features={self.out_features}, in_features={self.in_features}, group_size={self.group_size}, "
                f"scales={self.scales.dtype}")


TILE_ROWS = 16
"""Rows of W in a tile of the tiled layout (:func:`tile_rows`)."""

TILE_CHUNK_BYTES = 64
"""Bytes of a row in a chunk of the tiled layout: 64 int8 or 128 int4 values."""


def tile_rows(packed: torch.Tensor) -> torch.Tensor:
    """The CUDA kernels' tiled layout of a packed weight: row-major [n, cols] (int8 or int32, ``cols`` bytes a row a
    multiple of 64) -> the same dtype [n_pad, cols], n_pad = n rounded up to 16 (the new rows zero), in which each
    tile of 16 rows holds its chunks one after another, a chunk being the 64 bytes of k of each of the 16 rows, row
    after row: byte b of row 16 T + r at chunk c lies at ``T * 16 * row_bytes + c * 1024 + r * 64 + b``. A warp of
    the kernel then reads a chunk's half-tile (8 rows x 64 bytes) as 512 contiguous bytes where the row-major layout
    gives it eight pieces of 64 (bench/NOTES.md, session 18)."""
    n, cols = packed.shape
    row_bytes = cols * packed.element_size()
    if row_bytes % TILE_CHUNK_BYTES:
        raise NeoxRtError(f"the tiled layout needs rows of a multiple of {TILE_CHUNK_BYTES} bytes, got {row_bytes}")
    n_pad = -(-n // TILE_ROWS) * TILE_ROWS
    u8 = torch.zeros(n_pad, row_bytes, dtype=torch.uint8, device=packed.device)
    u8[:n] = packed.contiguous().view(torch.uint8)
    tiles = u8.view(n_pad // TILE_ROWS, TILE_ROWS, row_bytes // TILE_CHUNK_BYTES, TILE_CHUNK_BYTES)
    return tiles.permute(0, 2, 1, 3).contiguous().view(packed.dtype).view(n_pad, cols)


def untile_rows(tiled: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`tile_rows`: [n_pad, cols] tiled -> row-major [n, cols]."""
    n_pad, cols = tiled.shape
    row_bytes = cols * tiled.element_size()
    tiles = tiled.contiguous().view(torch.uint8).view(n_pad // TILE_ROWS, row_bytes // TILE_CHUNK_BYTES, TILE_ROWS,
                                                      TILE_CHUNK_BYTES)
    return tiles.permute(0, 2, 1, 3).contiguous().view(n_pad, row_bytes)[:n].view(tiled.dtype)


class TiledInt8Weight(WeightFormat):
    """An :class:`Int8Weight` in the CUDA kernels' tiled layout: ``qweight`` int8 [n_pad, in] as :func:`tile_rows`
    leaves it, ``scales`` [out] as before. A runtime form, never saved: :meth:`row_major` gives the format back
    (``dequantize`` goes through it, so the reference and every other backend still see the same weight)."""

    FORMAT = ""
    KIND = "int8 tiled"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        n_pad = -(-scales.shape[0] // TILE_ROWS) * TILE_ROWS if scales.dim() == 1 else -1
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[0] != n_pad:
            raise NeoxRtError(f"TiledInt8Weight needs int8 qweight [{n_pad}, in] for scales {list(scales.shape)}, "
                              f"got {qweight.dtype} {list(qweight.shape)}")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @classmethod
    def from_row_major(cls, weight: Int8Weight) -> "TiledInt8Weight":
        return cls(tile_rows(weight.qweight), weight.scales)

    def row_major(self) -> Int8Weight:
        return Int8Weight(untile_rows(self.qweight, self.out_features), self.scales)

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.row_major().dequantize(dtype)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, in_features={self.in_features}, tiled"


class TiledInt4Weight(WeightFormat):
    """An :class:`Int4Weight` in the CUDA kernels' tiled layout: ``qweight`` int32 [n_pad, in / 8] as
    :func:`tile_rows` leaves it, and each group's scale and zero point of a row in one word, scale bits | zero << 16,
    ``scale_zero`` int32 [n_pad / 16, groups, 16] (the 16 rows of a tile side by side: one 4-byte load a row and
    group instead of two scattered ones). A runtime form, never saved: :meth:`row_major` gives the format back."""

    FORMAT = ""
    KIND = "int4 tiled"

    def __init__(self, qweight: torch.Tensor, scale_zero: torch.Tensor, out_features: int, in_features: int,
                 group_size: int, scale_dtype: torch.dtype):
        super().__init__()
        n_pad = -(-out_features // TILE_ROWS) * TILE_ROWS
        groups = -(-in_features // group_size)
        if (qweight.dtype != torch.int32 or tuple(qweight.shape) != (n_pad, -(-in_features // 8))
                or scale_zero.dtype != torch.int32 or tuple(scale_zero.shape) != (n_pad // TILE_ROWS, groups,
                                                                                  TILE_ROWS)):
            raise NeoxRtError(f"TiledInt4Weight of [{out_features}, {in_features}], group {group_size} needs int32 "
                              f"qweight [{n_pad}, {-(-in_features // 8)}] and scale_zero [{n_pad // TILE_ROWS}, "
                              f"{groups}, {TILE_ROWS}]; got {qweight.dtype} {list(qweight.shape)}, "
                              f"{scale_zero.dtype} {list(scale_zero.shape)}")
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale_zero", scale_zero)
        self._out_features = int(out_features)
        self.in_features = int(in_features)
        self.group_size = int(group_size)
        self.scale_dtype = scale_dtype

    @classmethod
    def from_row_major(cls, weight: Int4Weight) -> "TiledInt4Weight":
        if weight.scales.element_size() != 2:
            raise NeoxRtError(f"the tiled int4 layout packs 16-bit scales, got {weight.scales.dtype}")
        n, groups = weight.scales.shape
        n_pad = -(-n // TILE_ROWS) * TILE_ROWS
        words = torch.zeros(n_pad, groups, dtype=torch.int32, device=weight.scales.device)
        words[:n] = (weight.scales.view(torch.int16).to(torch.int32) & 0xFFFF) | (weight.zeros.to(torch.int32) << 16)
        scale_zero = words.view(n_pad // TILE_ROWS, TILE_ROWS, groups).transpose(1, 2).contiguous()
        return cls(tile_rows(weight.qweight), scale_zero, n, weight.in_features, weight.group_size,
                   weight.scales.dtype)

    def row_major(self) -> Int4Weight:
        n = self.out_features
        words = self.scale_zero.transpose(1, 2).reshape(-1, self.scale_zero.shape[1])[:n]
        scales = (words & 0xFFFF).to(torch.int16).view(self.scale_dtype)  # the low 16 bits, as they were
        zeros = (words >> 16).to(torch.uint8)
        return Int4Weight(untile_rows(self.qweight, n), scales.contiguous(), zeros.contiguous(), self.in_features,
                          self.group_size)

    @property
    def out_features(self) -> int:
        return self._out_features

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.row_major().dequantize(dtype)

    def extra_repr(self) -> str:
        return (f"out_features={self.out_features}, in_features={self.in_features}, group_size={self.group_size}, "
                f"scales={self.scale_dtype}, tiled")


FORMATS = {cls.FORMAT: cls for cls in (Int8Weight, Int4Weight)}
"""Format name (``"int8"``, ``"int4"``) -> class."""


def format_class(name: str) -> type[WeightFormat]:
    if name not in FORMATS:
        raise NeoxRtError(f"unknown weight format {name!r}; choose {' or '.join(FORMATS)}")
    return FORMATS[name]


def check_row_shard_groups(in_features: int, tp_size: int, group_size: int, what: str = "a row-parallel linear"):
    """An int4 group must not straddle a tensor-parallel shard boundary: for a weight whose input dim is split,
    each rank's in_features / tp must be a whole number of groups (else one NeoxRtError naming the fix)."""
    if tp_size > 1 and (in_features % tp_size or (in_features // tp_size) % group_size):
        raise NeoxRtError(f"int4 group size {group_size} does not divide the input features of each "
                          f"tensor-parallel shard of {what} ({in_features} / tp {tp_size}): a group would straddle "
                          f"a shard boundary; choose a group size that divides {in_features // tp_size}")
