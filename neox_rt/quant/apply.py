"""Quantizing a model's linears: in place on a built model (:func:`quantize_model`), or while its checkpoint streams
in, layer by layer (:func:`load_streaming`), and the memory report of what is quantized and what stays float.

A linear is quantized by swapping its ``weight`` parameter for a format object (``del linear.weight; linear.weight
= fmt``); its bias stays a float parameter. By default the linears of the transformer layers are quantized and the
embedding and the LM head stay in the model's float dtype (``include_lm_head=True`` quantizes the LM head too).

Peak memory of :func:`load_streaming`: the model is built on ``meta`` (no storage) and materialised one unit at a
time (the embedding, each layer, the final LayerNorm, the LM head); a quantized linear's float weight is never
allocated in the model: its tensor (this rank's slice) is read, cast to the model dtype on the target device,
quantized and dropped. So device memory peaks at the quantized model plus one float weight tensor (plus its fp32
copy during the rounding: about 3x the largest linear, e.g. 20B's h->4h, 302 MB in fp16 at TP=1), and host memory
at one tensor, as in the float loader.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from neox_rt.checkpoints.hf import IGNORED, TensorSource, copy_slice, index_checkpoint, progress_bar
from neox_rt.errors import NeoxRtError
from neox_rt.model.build import parse_dtype
from neox_rt.model.config import NeoXConfig
from neox_rt.model.layers import Linear
from neox_rt.model.model import NeoXForCausalLM
from neox_rt.ops.table import OPS
from neox_rt.parallel.context import SINGLE, TensorParallel, tp_split_dim
from neox_rt.quant.formats import Int4Weight, WeightFormat, check_row_shard_groups, format_class

log = logging.getLogger("neox_rt")

LM_HEAD = "embed_out"


def quantize_weight(weight: torch.Tensor, fmt: str, group_size: int = 128, stats=None) -> WeightFormat:
    """The round-to-nearest method: ``weight`` [out, in] in format ``fmt`` (``"int8"`` or ``"int4"``), scales in
    the weight's dtype. ``stats`` (calibration statistics) is unused: RTN needs none. Every quantization method has
    this signature (:data:`neox_rt.quantize.METHODS`)."""
    cls = format_class(fmt)
    return cls.quantize(weight, group_size) if cls is Int4Weight else cls.quantize(weight)


def quantized_linear_names(model: NeoXForCausalLM, include_lm_head: bool | str = False) -> list[str]:
    """The module names of the linears that quantization replaces: every linear of the layers, and the LM head
    with ``include_lm_head`` (when the model has its own; a tied head is the embedding and stays float)."""
    return [name for name, mod in model.named_modules() if isinstance(mod, Linear)
            and (name != LM_HEAD or include_lm_head)]


def head_format(fmt: str, include_lm_head: bool | str) -> str | None:
    """The LM head's format: None (float) for a false ``include_lm_head``, the layers' ``fmt`` for True, else the
    format it names ("int8" or "int4": e.g. int4 layers with an int8 head)."""
    if not include_lm_head:
        return None
    head = fmt if include_lm_head is True else include_lm_head
    format_class(head)
    return head


def linear_formats(model: NeoXForCausalLM, fmt: str, group_size: int = 128,
                   include_lm_head: bool | str = False) -> dict[str, str]:
    """Module name -> format of every linear that quantization replaces (:func:`quantized_linear_names`; the LM head
    takes :func:`head_format`), each tensor-parallel shard's int4 groups checked."""
    format_class(fmt)
    head = head_format(fmt, include_lm_head)
    out = {name: head if name == LM_HEAD else fmt for name in quantized_linear_names(model, include_lm_head)}
    for name, f in out.items():
        _check_groups(model, name, f, group_size)
    return out


def _check_groups(model: NeoXForCausalLM, name: str, fmt: str, group_size: int) -> None:
    lin = model.get_submodule(name)
    if fmt == "int4" and tp_split_dim(f"{name}.weight") == 1:
        full_in = _in_features(lin) * model.tp.size
        check_row_shard_groups(full_in, model.tp.size, group_size, name)


def _in_features(lin: Linear) -> int:
    w = lin.weight
    return w.in_features if isinstance(w, WeightFormat) else w.shape[1]


def set_weight(linear: Linear, fmt: WeightFormat) -> None:
    """Swap a linear's weight (parameter or format) for ``fmt``."""
    del linear.weight
    linear.weight = fmt


def quantize_model(model: NeoXForCausalLM, fmt: str, group_size: int = 128, include_lm_head: bool | str = False,
                   method: Callable = quantize_weight) -> NeoXForCausalLM:
    """Quantize a built and loaded model's linears in place, one at a time (each float weight freed as its format
    replaces it, in the layout the linear op's kernels read: :func:`prepare_weights`); returns the model. Each
    tensor-parallel rank quantizes its own shard. ``include_lm_head``: True (the LM head in ``fmt`` too) or a format
    of its own ("int8" beside int4 layers)."""
    formats = linear_formats(model, fmt, group_size, include_lm_head)
    for name, f in formats.items():
        lin = model.get_submodule(name)
        if isinstance(lin.weight, WeightFormat):
            raise NeoxRtError(f"{name} is already quantized ({type(lin.weight).__name__})")
        with torch.no_grad():
            set_weight(lin, OPS["linear"].prepare(method(lin.weight.data, f, group_size, None)))
    return model


def prepare_weights(model: nn.Module) -> nn.Module:
    """Every quantized linear's weight in the layout the ``linear`` op's kernels read best
    (:meth:`neox_rt.ops.table.Op.prepare`: on the CUDA backend the tiled int8 / int4 forms), one linear at a time
    (the converted copy allocated beside one old weight at most); after loading, before any CUDA graph is captured.
    Float weights, and weights no backend converts, stay as they are. Returns the model."""
    for mod in model.modules():
        if isinstance(mod, Linear) and isinstance(mod.weight, WeightFormat):
            prepared = OPS["linear"].prepare(mod.weight)
            if prepared is not mod.weight:
                set_weight(mod, prepared)
    return model


class StageQuantizer:
    """Quantizes a model's linears as a streaming loader fills them: called with the names of the parameters a stage
    (a layer) filled, it replaces each quantized linear's weight among them by its format at once (each rank its
    own shard, in the layout the linear op's kernels read), so the float weights of one layer at most are on the
    device at a time."""

    def __init__(self, fmt: str, group_size: int = 128, include_lm_head: bool | str = False,
                 method: Callable = quantize_weight):
        format_class(fmt)
        head_format(fmt, include_lm_head)
        self.fmt, self.group_size, self.method, self.include_lm_head = fmt, group_size, method, include_lm_head
        self.formats: dict[str, str] | None = None

    def __call__(self, model: NeoXForCausalLM, filled: list[str]) -> None:
        if self.formats is None:  # the first stage: which linears, and does every shard hold whole groups
            self.formats = linear_formats(model, self.fmt, self.group_size, self.include_lm_head)
        for pname in filled:
            name = pname[:-len(".weight")] if pname.endswith(".weight") else None
            if name in self.formats:
                lin = model.get_submodule(name)
                with torch.no_grad():
                    set_weight(lin, OPS["linear"].prepare(self.method(lin.weight.data, self.formats[name],
                                                                      self.group_size, None)))


# ----------------------------------------------------------------------------------------------------
# The memory report
# ----------------------------------------------------------------------------------------------------

@dataclass
class MemoryReport:
    """Bytes of a model's weights: quantized (formats) and float (parameters), by part."""
    quantized_bytes: int = 0
    quantized_linears: int = 0
    formats: dict[str, int] = field(default_factory=dict)  # format kind (WeightFormat.kind) -> linears
    float_bytes: dict[str, int] = field(default_factory=dict)  # "embedding", "lm head", "layers" -> bytes
    lm_head_quantized: bool = False
    lm_head_kind: str | None = None  # the LM head's format kind where it is quantized

    @property
    def total_bytes(self) -> int:
        return self.quantized_bytes + sum(self.float_bytes.values())

    def __str__(self) -> str:
        fl = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.float_bytes.items() if v)
        kinds = ", ".join(f"{n} {k}" for k, n in self.formats.items()) or "none"
        head = f", the LM head among them ({self.lm_head_kind})" if self.lm_head_quantized else ""
        return (f"weights {self.total_bytes / 2**20:.1f} MiB: quantized {self.quantized_bytes / 2**20:.1f} MiB "
                f"({self.quantized_linears} linears{head}: {kinds}); float: {fl}")


def memory_report(model: nn.Module) -> MemoryReport:
    """What the weights of ``model`` take on its device: the formats' buffers, and the float parameters by part
    (the embedding, the LM head, and the rest of the layers: LayerNorms, biases, unquantized linears)."""
    report = MemoryReport()
    for name, mod in model.named_modules():
        if isinstance(mod, WeightFormat):
            report.quantized_bytes += mod.nbytes()
            report.quantized_linears += 1
            report.formats[mod.kind] = report.formats.get(mod.kind, 0) + 1
            if name.startswith(LM_HEAD + "."):
                report.lm_head_quantized, report.lm_head_kind = True, mod.kind
    for name, p in model.named_parameters():
        part = ("embedding" if name.startswith("gpt_neox.embed_in") else "lm head" if name.startswith(LM_HEAD)
                else "layers")
        report.float_bytes[part] = report.float_bytes.get(part, 0) + p.numel() * p.element_size()
    return report


# ----------------------------------------------------------------------------------------------------
# Streaming load: one unit of the model at a time
# ----------------------------------------------------------------------------------------------------

class WeightPlan:
    """How :func:`load_streaming` fills the linears: ``quantized(name)`` says whether linear ``name`` gets a format,
    ``tensor_names(name)`` which checkpoint tensors that format is read from (checked for presence), and
    ``build(name, linear, split_dim, sources, tp, device, dtype)`` returns the format for this rank (the linear's
    ``weight`` still the meta parameter of its local shape)."""

    def quantized(self, name: str) -> bool:
        raise NotImplementedError

    def tensor_names(self, name: str) -> list[str]:
        raise NotImplementedError

    def build(self, name, linear, split_dim, sources, tp, device, dtype) -> WeightFormat:
        raise NotImplementedError


class QuantizeAtLoad(WeightPlan):
    """Float checkpoint in, formats out: each linear's float tensor is read (this rank's slice), cast to the model
    dtype on the device and quantized by ``method`` (round to nearest by default)."""

    def __init__(self, model: NeoXForCausalLM, fmt: str, group_size: int = 128, include_lm_head: bool | str = False,
                 method: Callable = quantize_weight):
        self.fmt, self.group_size, self.method = fmt, group_size, method
        self.formats = linear_formats(model, fmt, group_size, include_lm_head)

    def quantized(self, name):
        return name in self.formats

    def tensor_names(self, name):
        return [f"{name}.weight"]

    def build(self, name, linear, split_dim, sources, tp, device, dtype):
        w = torch.empty(linear.weight.shape, dtype=dtype, device=device)
        copy_slice(w, sources[f"{name}.weight"], split_dim, tp)
        return self.method(w, self.formats[name], self.group_size, None)


def streaming_units(model: NeoXForCausalLM) -> list[tuple[str, nn.Module]]:
    """(prefix, module) in load order: the embedding, each layer, the final LayerNorm, the LM head."""
    units = [("gpt_neox.embed_in", model.gpt_neox.embed_in)]
    units += [(f"gpt_neox.layers.{i}", layer) for i, layer in enumerate(model.gpt_neox.layers)]
    units.append(("gpt_neox.final_layer_norm", model.gpt_neox.final_layer_norm))
    if hasattr(model, LM_HEAD):
        units.append((LM_HEAD, model.embed_out))
    return units


def empty_model(config: NeoXConfig, dtype, tp: TensorParallel = SINGLE) -> NeoXForCausalLM:
    """The model on ``meta`` in ``dtype``: shapes, no storage."""
    with torch.device("meta"):
        model = NeoXForCausalLM(config, tp)
    return model.to(parse_dtype(dtype)).eval()


def _is_vocab(name: str) -> bool:
    return name in ("gpt_neox.embed_in.weight", "embed_out.weight")


def load_streaming(model: NeoXForCausalLM, directory: str, plan: WeightPlan, device, progress: bool = True,
                   sources: dict[str, TensorSource] | None = None,
                   after_unit: Callable[[str, nn.Module], None] | None = None) -> NeoXForCausalLM:
    """Fill a model built by :func:`empty_model` from the checkpoint in ``directory``, unit by unit (module
    docstring): the linears that ``plan`` quantizes receive their formats, every other parameter its tensor (this
    rank's slice) in the model dtype. Missing, unexpected and misshapen tensors are one error naming them.
    ``after_unit(prefix, unit)`` runs as each unit is filled, before the next is read (GPTQ's calibration pass,
    :mod:`neox_rt.quant.gptq`, quantizes a layer there)."""
    sources = sources if sources is not None else index_checkpoint(directory)
    tp, dtype = model.tp, model.dtype
    quantized = {name for name, mod in model.named_modules() if isinstance(mod, Linear) and plan.quantized(name)}
    float_params = {n: p for n, p in model.named_parameters()
                    if not (n.endswith(".weight") and n[:-len(".weight")] in quantized)}
    expected = set(float_params) | {t for name in quantized for t in plan.tensor_names(name)}
    present = {n for n in sources if not IGNORED.search(n)}
    if model.config.tie_word_embeddings:
        present.discard("embed_out.weight")
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing:
        raise NeoxRtError(f"checkpoint {directory} is missing tensors: {_names(missing)}")
    if unexpected:
        raise NeoxRtError(f"checkpoint {directory} has unexpected tensors: {_names(unexpected)}")
    bad = []
    for name, p in float_params.items():
        dim = tp_split_dim(name)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= tp.size
        have = sources[name].shape
        ok = (len(have) == 2 and have[1] == shape[1] and have[0] <= shape[0]) if _is_vocab(name) else \
            have == tuple(shape)
        if not ok:
            bad.append(f"{name} has shape {list(have)}, expected {shape}")
    if bad:
        raise NeoxRtError(f"checkpoint {directory} does not match the config: {'; '.join(bad[:4])}"
                          + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""))
    bar = progress_bar(sum(s.numel() * s.element_size() for s in model.parameters()), enabled=progress)
    for prefix, unit in streaming_units(model):
        linears = [(f"{prefix}.{n}" if n else prefix, m) for n, m in unit.named_modules() if isinstance(m, Linear)]
        linears = [(n, m) for n, m in linears if n in quantized]
        shapes = {n: m.weight.shape for n, m in linears}
        held = {n: m.weight for n, m in linears}  # meta parameters: the plan reads their local shapes
        for _, m in linears:
            del m.weight  # not allocated by to_empty
        unit.to_empty(device=device)
        for n, p in unit.named_parameters(prefix=prefix):
            copy_slice(p, sources[n], tp_split_dim(n), tp)
        for n, m in linears:
            m.weight = held[n]
            with torch.no_grad():
                fmt = plan.build(n, m, tp_split_dim(f"{n}.weight"), sources, tp, device, dtype)
            if tuple(fmt.shape) != tuple(shapes[n]):
                raise NeoxRtError(f"checkpoint {directory}: {n} holds a {list(fmt.shape)} weight, expected "
                                  f"{list(shapes[n])}")
            set_weight(m, fmt.to(device))
        if bar is not None:
            bar.update(sum(p.numel() * p.element_size() for p in unit.parameters()))
        if after_unit is not None:
            after_unit(prefix, unit)
    if bar is not None:
        bar.close()
    return model


def _names(names: list[str], limit: int = 6) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_quantizing(config: NeoXConfig, directory: str, fmt: str, group_size: int = 128, dtype="float16",
                    device="cpu", tp: TensorParallel = SINGLE, include_lm_head: bool | str = False,
                    progress: bool = True) -> NeoXForCausalLM:
    """A float HF checkpoint loaded straight into a quantized model, layer by layer (module docstring)."""
    model = empty_model(config, dtype, tp)
    model = load_streaming(model, directory, QuantizeAtLoad(model, fmt, group_size, include_lm_head), device,
                           progress)
    log.info("neox_rt: %s", memory_report(model))
    return model
