"""Quantized checkpoints: ours written and read, and the GPTQ and AWQ 4-bit layouts of the hub read.

Ours (``quantization_config.quant_method == "neox_rt"``): an HF directory whose ``config.json`` carries
``{"quant_method": "neox_rt", "format": "int8"|"int4", "bits", "group_size", "sym", "method", "lm_head"}`` and whose
safetensors hold the model's ``state_dict``: a quantized linear's tensors are ``<linear>.weight.qweight``,
``<linear>.weight.scales`` (and ``.zeros`` for int4) in the layout of :mod:`neox_rt.quant.formats`, everything else
as in a float HF checkpoint. It loads directly, streamed like a float one (:func:`neox_rt.quant.apply.load_streaming`).

GPTQ (``quant_method == "gptq"``, AutoGPTQ / GPTQModel / transformers' layout, as published for Pythia and
GPT-NeoX): per quantized linear ``<linear>.qweight`` int32 [in / 8, out] (8 4-bit values packed along the INPUT
dim: value i of column n in row i // 8 at bits 4 * (i % 8)), ``<linear>.qzeros`` int32 [in / group, out / 8]
(packed along the OUTPUT dim the same way), ``<linear>.scales`` fp16 [in / group, out], ``<linear>.g_idx`` int32 [in]
(the group of each input feature) and the float ``<linear>.bias``. Dequantized: W[n, i] = scales[g, n] * (q[i, n] -
z[g, n]) with g = g_idx[i]; in the default ("v1", ``checkpoint_format`` "gptq" or absent) format the stored zero is
z - 1 (AutoGPTQ subtracts one before packing and its kernels add it back, so z = stored + 1, 1..16), in
``checkpoint_format == "gptq_v2"`` (GPTQModel) it is z itself. Supported: bits 4, ``desc_act`` false with g_idx
= i // group (checked), ``group_size`` a multiple of 8 or -1 (one group), ``sym`` true (every zero 8, checked) or
false. Each linear converts exactly to an :class:`~neox_rt.quant.formats.Int4Weight` (q transposed to [out, in] and
repacked along the input dim; zeros as bytes; scales kept fp16). Anything else is one NeoxRtError line.

AWQ (``quant_method == "awq"``, AutoAWQ's GEMM layout, :class:`AWQPlan`): ``qweight`` int32 [in, out / 8] and
``qzeros`` packed along the output dim in AWQ's interleaved order, ``scales`` [in / group, out], the stored zero the
zero itself; it converts exactly to an Int4Weight the same way.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from neox_rt.checkpoints.hf import resolve_checkpoint
from neox_rt.errors import NeoxRtError
from neox_rt.model.config import NeoXConfig
from neox_rt.parallel.context import SINGLE, TensorParallel
from neox_rt.quant.apply import (WeightPlan, empty_model, load_streaming, memory_report, quantized_linear_names,
                                 QuantizeAtLoad, quantize_weight, log)
from neox_rt.quant.formats import INT4_PER_WORD, Int4Weight, Int8Weight, check_row_shard_groups, pack_int4
from neox_rt.quant.gptq import load_calibrated

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json")


def quantization_config(directory: str) -> dict | None:
    """``config.json``'s ``quantization_config`` (or a ``quantize_config.json`` beside it, AutoGPTQ's), or None."""
    cfg_path = os.path.join(directory, "config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            qc = json.load(f).get("quantization_config")
        if qc is not None:
            return qc
    legacy = os.path.join(directory, "quantize_config.json")
    if os.path.isfile(legacy):
        with open(legacy, encoding="utf-8") as f:
            qc = json.load(f)
        qc.setdefault("quant_method", "gptq")
        return qc
    return None


# ----------------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------------

class NeoxRtPlan(WeightPlan):
    """A linear is quantized where the checkpoint holds ``<linear>.weight.qweight``; its buffers are read (this
    rank's slice: whole int4 groups, checked) and kept in their stored dtypes."""

    def __init__(self, model, sources, qc: dict, directory: str):
        fmt = qc.get("format") or {8: "int8", 4: "int4"}.get(qc.get("bits"))
        if fmt not in ("int8", "int4"):
            raise NeoxRtError(f"{directory}: neox_rt quantization_config with format {qc.get('format')!r}, bits "
                              f"{qc.get('bits')!r}: expected int8 or int4")
        self.cls = Int8Weight if fmt == "int8" else Int4Weight
        self.group_size = int(qc.get("group_size") or 128)
        self.names = {n for n in quantized_linear_names(model, include_lm_head=True)
                      if f"{n}.weight.qweight" in sources}
        self.buffers = ("qweight", "scales") if fmt == "int8" else ("qweight", "scales", "zeros")

    def quantized(self, name):
        return name in self.names

    def tensor_names(self, name):
        return [f"{name}.weight.{b}" for b in self.buffers]

    def build(self, name, linear, split_dim, sources, tp, device, dtype):
        out, k = linear.weight.shape
        full_k = k * tp.size if split_dim == 1 else k
        if self.cls is Int4Weight and split_dim == 1:
            check_row_shard_groups(full_k, tp.size, self.group_size, name)
        local = {"qweight": (out, k if self.cls is Int8Weight else -(-k // INT4_PER_WORD)),
                 "scales": (out,) if self.cls is Int8Weight else (out, -(-k // self.group_size)),
                 "zeros": (out, -(-k // self.group_size))}
        tensors = {}
        for buf, dim in self.cls.shard_dims(split_dim).items():
            src = sources[f"{name}.weight.{buf}"]
            want = list(local[buf])
            if dim is not None:
                want[dim] *= tp.size
            if list(src.shape) != want:
                raise NeoxRtError(f"{src.name} has shape {list(src.shape)}, expected {want}")
            if dim is None:
                tensors[buf] = src.read(None, 0, 0)
            else:
                size = local[buf][dim]
                tensors[buf] = src.read(dim, tp.rank * size, (tp.rank + 1) * size)
        tensors = {k_: t.to(device) for k_, t in tensors.items()}
        if self.cls is Int8Weight:
            return Int8Weight(tensors["qweight"], tensors["scales"])
        return Int4Weight(tensors["qweight"], tensors["scales"], tensors["zeros"], k, self.group_size)


def save_quantized(src: str, dst: str, fmt: str, group_size: int = 128, method="rtn", method_fn=quantize_weight,
                   dtype="float16", include_lm_head: bool = False, max_shard_bytes: int = 4 * 2**30,
                   progress: bool = True, calibration: torch.Tensor | None = None, device="cpu") -> dict:
    """Quantize the float HF checkpoint ``src`` into ``dst`` (module docstring); returns its quantization_config.

    The source streams in layer by layer, each linear quantized as it is read (:func:`load_streaming`, on CPU), so
    host memory holds the quantized model plus one float tensor; the output is written in shards of at most
    ``max_shard_bytes`` with a ``model.safetensors.index.json`` when there are several. With ``calibration``
    (token ids [N, L]) the method gets each linear's Hessian from the layer-by-layer calibration pass of
    :func:`neox_rt.quant.gptq.load_calibrated` on ``device`` (one float layer held at a time).
    """
    from safetensors.torch import save_file
    if not isinstance(include_lm_head, bool):  # the reader takes one format a checkpoint (quantization_config)
        raise NeoxRtError(f"a quantized checkpoint keeps one format: include_lm_head must be True or False, got "
                          f"{include_lm_head!r}")
    directory = resolve_checkpoint(src)
    config = NeoXConfig.from_json(directory)
    if calibration is not None:
        model = load_calibrated(config, directory, fmt, calibration, group_size, method_fn, dtype, device,
                                include_lm_head, progress=progress).to("cpu")
    else:
        model = empty_model(config, dtype)
        model = load_streaming(model, directory, QuantizeAtLoad(model, fmt, group_size, include_lm_head, method_fn),
                               "cpu", progress)
    os.makedirs(dst, exist_ok=True)
    qc = {"quant_method": "neox_rt", "format": fmt, "bits": 8 if fmt == "int8" else 4,
          "group_size": group_size if fmt == "int4" else None, "sym": fmt == "int8", "method": method,
          "lm_head": include_lm_head}
    if calibration is not None:
        qc["calibration"] = {"samples": calibration.shape[0], "seqlen": calibration.shape[1]}
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = qc
    cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            shutil.copyfile(os.path.join(directory, name), os.path.join(dst, name))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    shards, current, size = [], {}, 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(dst, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        with open(os.path.join(dst, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                       "weight_map": weight_map}, f, indent=2)
    log.info("neox_rt: wrote %s: %s", dst, memory_report(model))
    return qc


# ----------------------------------------------------------------------------------------------------
# GPTQ
# ----------------------------------------------------------------------------------------------------

def _unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [r, c] packed 8 a word along dim 0 -> int32 [r * 8, c] in [0, 15] (value i in word i // 8)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = (packed[:, None, :] >> shifts[None, :, None]) & 0xF  # [r, 8, c]
    return q.reshape(-1, packed.shape[1])


def _unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [r, c] packed 8 a word along dim 1 -> int32 [r, c * 8] in [0, 15]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return ((packed[:, :, None] >> shifts) & 0xF).reshape(packed.shape[0], -1)


class HubInt4Plan(WeightPlan):
    """What the hub's 4-bit layouts (GPTQ's, AWQ's) share: a linear is quantized where the checkpoint holds
    ``<linear>.qweight``; groups of ``group_size`` input features (-1: one group); this rank's slice of a linear."""

    method = ""

    def __init__(self, model, sources, qc: dict, directory: str):
        self.where = f"{self.method} checkpoint {directory}"
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise NeoxRtError(f"{self.where}: bits {bits} is not supported (only 4-bit {self.method} loads)")
        self.group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
        if self.group_size != -1 and (self.group_size <= 0 or self.group_size % INT4_PER_WORD):
            raise NeoxRtError(f"{self.where}: group_size {self.group_size} is not supported (a multiple of 8, or -1)")
        self.names = {n for n in quantized_linear_names(model, include_lm_head=True) if f"{n}.qweight" in sources}
        if not self.names:
            raise NeoxRtError(f"{self.where}: no <linear>.qweight tensors")

    def quantized(self, name):
        return name in self.names

    def slice_of(self, name, linear, split_dim, sources, tp, shapes):
        """(k, group, rows, cols, groups): this rank's input rows r0:r1, output columns c0:c1 and groups g0:g1 of
        linear ``name`` (column-parallel: a slice of the outputs; row-parallel: of the inputs, whole groups), after
        checking the shapes ``shapes(full_k, full_out, group, groups)`` gives by tensor."""
        out, k = linear.weight.shape
        full_out = out * tp.size if split_dim == 0 else out
        full_k = k * tp.size if split_dim == 1 else k
        group = full_k if self.group_size == -1 else self.group_size
        groups = -(-full_k // group)
        if full_k % 8:
            raise NeoxRtError(f"{self.where}: {name} has {full_k} input features, not a multiple of 8")
        for t, shape in shapes(full_k, full_out, group, groups).items():
            have = list(sources[f"{name}.{t}"].shape)
            if have != shape:
                raise NeoxRtError(f"{self.where}: {name}.{t} has shape {have}, expected {shape} (bits 4, group "
                                  f"{group})")
        if split_dim == 1:
            check_row_shard_groups(full_k, tp.size, group, name)
        r0, r1 = (tp.rank * k, (tp.rank + 1) * k) if split_dim == 1 else (0, k)
        c0, c1 = (tp.rank * out, (tp.rank + 1) * out) if split_dim == 0 else (0, out)
        return k, group, (r0, r1), (c0, c1), (r0 // group, -(-r1 // group))


class GPTQPlan(HubInt4Plan):
    """Reads the GPTQ 4-bit layout (module docstring) into :class:`Int4Weight`."""

    method = "GPTQ"

    def __init__(self, model, sources, qc: dict, directory: str):
        super().__init__(model, sources, qc, directory)
        if qc.get("desc_act"):
            raise NeoxRtError(f"{self.where}: desc_act (act-order) true is not supported; re-quantize with desc_act "
                              f"false")
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq")) or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise NeoxRtError(f"{self.where}: checkpoint_format {fmt!r} is not supported (gptq or gptq_v2)")
        self.zero_offset = 1 if fmt == "gptq" else 0
        self.sym = bool(qc.get("sym", True))

    def tensor_names(self, name):
        return [f"{name}.{t}" for t in ("qweight", "qzeros", "scales", "g_idx")]

    def build(self, name, linear, split_dim, sources, tp, device, dtype):
        def shapes(full_k, full_out, group, groups):
            return {"qweight": [full_k // 8, full_out], "qzeros": [groups, -(-full_out // 8)],
                    "scales": [groups, full_out], "g_idx": [full_k]}

        k, group, (r0, r1), (c0, c1), (g0, g1) = self.slice_of(name, linear, split_dim, sources, tp, shapes)
        full_k = sources[f"{name}.g_idx"].shape[0]
        g_idx = sources[f"{name}.g_idx"].read(None, 0, 0).to(torch.int64)
        if not torch.equal(g_idx, torch.arange(full_k) // group):
            raise NeoxRtError(f"{self.where}: {name}.g_idx is not i // group_size (an act-order checkpoint?): "
                              f"not supported")
        qweight = sources[f"{name}.qweight"].read(0, r0 // 8, r1 // 8)[:, c0:c1]
        scales = sources[f"{name}.scales"].read(0, g0, g1)[:, c0:c1]
        zeros = _unpack_cols(sources[f"{name}.qzeros"].read(0, g0, g1))[:, c0:c1] + self.zero_offset
        if self.sym and not bool((zeros == 8).all()):
            raise NeoxRtError(f"{self.where}: sym is true but {name} has zero points other than 8 "
                              f"(sym/asym mismatch)")
        q = _unpack_rows(qweight).t()  # [out, k]
        return Int4Weight(pack_int4(q).to(device), scales.t().contiguous().to(device),
                          zeros.t().contiguous().to(torch.uint8).to(device), k, group)


AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""AWQ's GEMM packing puts output column 8 j + (0, 2, 4, 6, 1, 3, 5, 7)[i] in nibble i of word j: the nibble of
column 8 j + c is AWQ_REVERSE_ORDER[c]."""


def _unpack_awq_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [r, c] in AWQ's GEMM packing (8 values a word along dim 1, interleaved) -> int32 [r, c * 8] in [0, 15]
    in column order."""
    return _unpack_cols(packed).reshape(packed.shape[0], -1, 8)[:, :, list(AWQ_REVERSE_ORDER)].reshape(
        packed.shape[0], -1)


class AWQPlan(HubInt4Plan):
    """Reads AWQ's 4-bit GEMM layout (AutoAWQ, transformers' ``AwqConfig``: ``quant_method == "awq"``, ``version``
    "gemm", ``zero_point`` true) into :class:`Int4Weight`: per quantized linear ``<linear>.qweight`` int32 [in,
    out / 8] and ``<linear>.qzeros`` int32 [in / group, out / 8], both packed along the OUTPUT dim in AWQ's
    interleaved order (:data:`AWQ_REVERSE_ORDER`), ``<linear>.scales`` fp16 [in / group, out]; W[n, i] =
    scales[g, n] * (q[i, n] - z[g, n]) with g = i // group and the stored zero z itself. Its other versions (gemv,
    gemv_fast, marlin, exllama, ipex) and zero_point false are one NeoxRtError line."""

    method = "AWQ"

    def __init__(self, model, sources, qc: dict, directory: str):
        super().__init__(model, sources, qc, directory)
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise NeoxRtError(f"{self.where}: version {version!r} is not supported (only AWQ's gemm layout loads)")
        if not qc.get("zero_point", True):
            raise NeoxRtError(f"{self.where}: zero_point false is not supported (only AWQ with zero points loads)")

    def tensor_names(self, name):
        return [f"{name}.{t}" for t in ("qweight", "qzeros", "scales")]

    def build(self, name, linear, split_dim, sources, tp, device, dtype):
        def shapes(full_k, full_out, group, groups):
            return {"qweight": [full_k, full_out // 8], "qzeros": [groups, full_out // 8],
                    "scales": [groups, full_out]}

        if (linear.weight.shape[0] * (tp.size if split_dim == 0 else 1)) % 8:
            raise NeoxRtError(f"{self.where}: {name} has {linear.weight.shape[0]} output features a rank, not a "
                              f"multiple of 8 (AWQ packs 8 outputs a word)")
        k, group, (r0, r1), (c0, c1), (g0, g1) = self.slice_of(name, linear, split_dim, sources, tp, shapes)
        if c0 % 8 or c1 % 8:
            raise NeoxRtError(f"{self.where}: {name}'s {c1 - c0} output features a rank do not split AWQ's words of 8")
        q = _unpack_awq_cols(sources[f"{name}.qweight"].read(0, r0, r1)[:, c0 // 8:c1 // 8]).t()  # [out, k]
        zeros = _unpack_awq_cols(sources[f"{name}.qzeros"].read(0, g0, g1)[:, c0 // 8:c1 // 8])
        scales = sources[f"{name}.scales"].read(0, g0, g1)[:, c0:c1]
        return Int4Weight(pack_int4(q.contiguous()).to(device), scales.t().contiguous().to(device),
                          zeros.t().contiguous().to(torch.uint8).to(device), k, group)


def load_quantized_checkpoint(directory: str, config: NeoXConfig, qc: dict, dtype="float16", device="cpu",
                              tp: TensorParallel = SINGLE, progress: bool = True):
    """A quantized checkpoint (``qc``: its quantization_config, ours or GPTQ's) streamed into a model."""
    from neox_rt.checkpoints.hf import index_checkpoint
    method = qc.get("quant_method")
    plans = {"neox_rt": NeoxRtPlan, "gptq": GPTQPlan, "awq": AWQPlan}
    if method not in plans:
        raise NeoxRtError(f"checkpoint {directory}: quantization method {method!r} is not supported (neox_rt, gptq, "
                          f"awq)")
    sources = index_checkpoint(directory)
    model = empty_model(config, dtype, tp)
    model = load_streaming(model, directory, plans[method](model, sources, qc, directory), device, progress, sources)
    log.info("neox_rt: %s", memory_report(model))
    return model
