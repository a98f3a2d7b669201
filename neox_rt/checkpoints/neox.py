"""gpt-neox native checkpoints (the 20B "slim weights" layout): find, validate, and stream them into a model
at any tensor-parallel size, resharding on the fly.

Layout (see /work/shared/NEOX_FACTS.md): ``<root>/latest`` names a tag; ``<root>/<tag>/`` holds either
``layer_LL-model_TT-model_states.pt`` files (pipeline layout; LL = pipeline layer index, TT = tensor-parallel
rank) or one ``mp_rank_TT_model_states.pt`` per rank whose ``module`` dict has keys ``sequential.LL.key``
(sequential layout, pipe-parallel-size 0). Pipeline layer LL holds:

- 0: ``word_embeddings.weight`` (vocab rows split on dim 0);
- 2 .. L+1: transformer layer LL-2, keys as in HF without the prefix (MLP named ``dense_h_to_4h`` /
  ``dense_4h_to_h`` or ``linear1`` / ``linear2``);
- L+3: ``norm.{weight,bias}``; L+4: ``final_linear.weight`` (vocab rows split on dim 0; absent when tied).

Resharding: a runtime rank of ``tp`` copies from every source rank whose slice of a column-parallel (dim 0)
or row-parallel (dim 1) tensor overlaps its own; LayerNorms are replicated; with the parallel residual
(``gpt-j-residual``) gpt-neox adds each rank's copy of the row-parallel output bias before the one all-reduce,
so the full bias is the SUM of the per-rank copies (summed in float64); with the sequential residual the bias
is replicated and added once. Files are opened with ``torch.load(mmap=True, weights_only=True)`` one
pipeline layer at a time and dropped once copied, so peak host memory stays around one layer.

The model shape comes from the gpt-neox YAML config (via :mod:`neox_rt.checkpoints.neox_yaml`) plus the vocabulary rows
found in the checkpoint; metadata files (``mp_rank_XX_model_states.pt`` in the pipeline layout: args, RNG
state) are never opened.
"""
from __future__ import annotations

import glob
import os
import pickle
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from neox_rt.checkpoints import neox_yaml
from neox_rt.checkpoints.hf import progress_bar, torch_load_weights_only
from neox_rt.errors import NeoxRtError
from neox_rt.model.build import build_model, default_device
from neox_rt.model.config import NeoXConfig
from neox_rt.model.model import NeoXForCausalLM
from neox_rt.parallel.context import SINGLE, TensorParallel, tp_split_dim

LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")
RANK_FILE = re.compile(r"mp_rank_(\d+)_model_states\.pt")
TOKENIZER_NAMES = ("20B_tokenizer.json", "tokenizer.json")
IGNORED_KEY = re.compile(r"(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")
"""Buffers some checkpoints carry; recomputed, never loaded."""
MLP_ALIASES = {"mlp.linear1.": "mlp.dense_h_to_4h.", "mlp.linear2.": "mlp.dense_4h_to_h."}
"""Newer gpt-neox MLP names -> the older names (and HF's)."""
ROW_BIASES = ("attention.dense.bias", "mlp.dense_4h_to_h.bias")


def layer_file_name(stage: int, rank: int) -> str:
    return f"layer_{stage:02d}-model_{rank:02d}-model_states.pt"


def rank_file_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


# ---------------------------------------------------------------------------------------------------------
# Names: HF parameter name <-> (pipeline layer index, gpt-neox key)
# ---------------------------------------------------------------------------------------------------------

def neox_location(hf_name: str, num_layers: int) -> tuple[int, str]:
    """(pipeline layer index LL, key inside that layer's state) of an HF parameter name."""
    if hf_name == "gpt_neox.embed_in.weight":
        return 0, "word_embeddings.weight"
    if hf_name.startswith("gpt_neox.final_layer_norm."):
        return num_layers + 3, "norm." + hf_name.rsplit(".", 1)[1]
    if hf_name == "embed_out.weight":
        return num_layers + 4, "final_linear.weight"
    m = re.fullmatch(r"gpt_neox\.layers\.(\d+)\.(.+)", hf_name)
    if not m:
        raise ValueError(f"no gpt-neox location for parameter {hf_name}")
    return int(m.group(1)) + 2, m.group(2)


def normalize_neox_key(key: str) -> str:
    """``mlp.linear1.weight`` -> ``mlp.dense_h_to_4h.weight`` (newer gpt-neox names -> older ones)."""
    for new, old in MLP_ALIASES.items():
        if key.startswith(new):
            return old + key[len(new):]
    return key


def split_kind(hf_name: str, parallel_residual: bool) -> str:
    """How the TP ranks of a gpt-neox checkpoint hold a tensor: 'dim0', 'dim1', 'sum' or 'replicated'."""
    if hf_name.endswith(ROW_BIASES):
        return "sum" if parallel_residual else "replicated"
    dim = tp_split_dim(hf_name)
    return "replicated" if dim is None else f"dim{dim}"


def full_shapes(config: NeoXConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> full (unsharded) shape of every parameter, in the model's order (no memory allocated)."""
    with torch.device("meta"):
        model = NeoXForCausalLM(config, SINGLE)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def stage_plan(config: NeoXConfig) -> dict[int, list[tuple[str, str]]]:
    """Pipeline layer index -> [(HF name, gpt-neox key)], in pipeline order."""
    plan: dict[int, list[tuple[str, str]]] = {}
    for name in full_shapes(config):
        stage, key = neox_location(name, config.num_hidden_layers)
        plan.setdefault(stage, []).append((name, key))
    return dict(sorted(plan.items()))


def rank_shape(full: tuple[int, ...], kind: str, tp: int) -> tuple[int, ...]:
    """Shape one of ``tp`` source ranks stores for a tensor of full shape ``full``."""
    if kind in ("dim0", "dim1"):
        dim = int(kind[3])
        shape = list(full)
        shape[dim] //= tp
        return tuple(shape)
    return full


# ---------------------------------------------------------------------------------------------------------
# Finding the checkpoint, its config and its tokenizer
# ---------------------------------------------------------------------------------------------------------

def _weight_files(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return [n for n in names if LAYER_FILE.fullmatch(n) or RANK_FILE.fullmatch(n)]


def is_neox_checkpoint(path: str) -> bool:
    """True for a gpt-neox checkpoint root (``latest`` or ``global_step*/``) or a tag directory."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return False
    if os.path.isfile(os.path.join(path, "latest")) or _weight_files(path):
        return True
    return any(os.path.isdir(p) for p in glob.glob(os.path.join(path, "global_step*")))


def find_tag_dir(path: str) -> tuple[str, str]:
    """(root, tag directory) of a checkpoint root holding ``latest``, or of a tag directory itself."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise NeoxRtError(f"checkpoint directory not found: {path}")
    if _weight_files(path) and not os.path.isfile(os.path.join(path, "latest")):
        return os.path.dirname(path), path
    latest = os.path.join(path, "latest")
    if not os.path.isfile(latest):
        tags = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "global_step*")) if os.path.isdir(p))
        hint = (f"; it has {', '.join(tags[:4])}: pass that directory (e.g. {os.path.join(path, tags[-1])})"
                if tags else "")
        raise NeoxRtError(f"gpt-neox checkpoint {path} has no 'latest' file ({latest} is missing){hint}")
    try:
        with open(latest, encoding="utf-8") as f:
            tag = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise NeoxRtError(f"cannot read {latest}: {e}") from None
    if not tag or "/" in tag or tag in (".", ".."):
        raise NeoxRtError(f"{latest} does not name a checkpoint tag (it holds {tag!r})")
    tag_dir = os.path.join(path, tag)
    if not os.path.isdir(tag_dir):
        raise NeoxRtError(f"{latest} names tag {tag!r}, but {tag_dir} does not exist")
    return path, tag_dir


def find_configs(root: str, tag_dir: str) -> list[str]:
    """The YAML config files of a checkpoint: ``<tag>/configs/`` (gpt-neox saves them there), else
    ``<root>/configs/``, else ``<root>/*.yml``; all files of the first place that has any, sorted."""
    for folder in (os.path.join(tag_dir, "configs"), os.path.join(root, "configs"), root):
        found = sorted(glob.glob(os.path.join(folder, "*.yml")) + glob.glob(os.path.join(folder, "*.yaml")))
        if found:
            return found
    return []


def find_tokenizer(cfg: dict, root: str, tag_dir: str, config_paths: Sequence[str]) -> str | None:
    """The tokenizer JSON: the config's ``vocab-file`` (as given, or relative to the config's folder or the
    checkpoint, or its file name inside the checkpoint), else ``20B_tokenizer.json`` / ``tokenizer.json``
    in the checkpoint directory."""
    vocab = cfg.get("vocab_file")
    candidates = []
    if vocab:
        candidates.append(vocab)
        bases = [os.path.dirname(p) for p in config_paths] + [root, tag_dir]
        candidates += [os.path.join(b, vocab) for b in bases]
        candidates += [os.path.join(b, os.path.basename(vocab)) for b in (root, tag_dir)]
    candidates += [os.path.join(b, n) for b in (root, tag_dir) for n in TOKENIZER_NAMES]
    for c in candidates:
        if os.path.isfile(c):
            return c
    return None


# ---------------------------------------------------------------------------------------------------------
# Reading files safely
# ---------------------------------------------------------------------------------------------------------

def safe_load(path: str) -> dict:
    """``torch.load(weights_only=True)``, memory-mapped where the format allows; NeoxRtError otherwise."""
    if not os.path.isfile(path):
        raise NeoxRtError(f"missing checkpoint file {path}")
    try:
        state = torch_load_weights_only(path)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise NeoxRtError(f"refusing to load {path}: it needs unsafe unpickling (Python objects other than "
                          f"tensors), and neox_rt loads with weights_only=True only ({first[:160]})") from None
    except Exception as e:  # noqa: BLE001 - zip errors, EOF, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NeoxRtError(f"corrupt checkpoint file {path}: {first[:200]}") from None
    if not isinstance(state, dict):
        raise NeoxRtError(f"checkpoint file {path} does not hold a dict of tensors")
    return state


@dataclass
class NeoxCheckpoint:
    """An opened (validated layout, not yet read) gpt-neox checkpoint."""
    root: str
    tag_dir: str
    layout: str
    """'pipeline' (layer files) or 'sequential' (mp_rank files with a module dict)."""
    tp: int
    """Tensor-parallel size the checkpoint was saved with."""
    config: NeoXConfig
    config_paths: list[str]
    tokenizer: str | None
    files: dict[tuple[int, int], str] = field(repr=False, default_factory=dict)
    """(pipeline layer, rank) -> file name (pipeline layout)."""
    dtype: torch.dtype | None = None
    """dtype of the stored weights (of the word embeddings)."""
    _modules: dict[int, dict] = field(repr=False, default_factory=dict)

    # -- reading one pipeline layer of one rank, validated --------------------------------------------------
    def _path(self, stage: int, rank: int) -> str:
        if self.layout == "pipeline":
            return os.path.join(self.tag_dir, self.files.get((stage, rank), layer_file_name(stage, rank)))
        return os.path.join(self.tag_dir, rank_file_name(rank))

    def _module(self, rank: int) -> dict:
        if rank not in self._modules:
            path = self._path(0, rank)
            state = safe_load(path)
            module = state.get("module")
            if not isinstance(module, dict):
                raise NeoxRtError(f"{path} has no 'module' dict of weights (is it a pipeline-layout metadata "
                                  f"file whose layer_*.pt files are missing?)")
            self._modules[rank] = module
        return self._modules[rank]

    def read_stage(self, stage: int, rank: int, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """gpt-neox key -> tensor of pipeline layer ``stage`` on source ``rank`` (tensors may be mmap views).

        ``expected`` maps each key (older MLP names) to the shape this rank must store; a missing,
        unexpected or misshapen tensor is a NeoxRtError naming the file and the tensor.
        """
        path = self._path(stage, rank)
        if self.layout == "pipeline":
            raw = safe_load(path)
            where = path
        else:
            prefix = f"sequential.{stage}."
            raw = {k[len(prefix):]: v for k, v in self._module(rank).items() if k.startswith(prefix)}
            where = f"{path} (module keys sequential.{stage}.*)"
        state = {}
        for key, value in raw.items():
            if IGNORED_KEY.search(key):
                continue
            if not isinstance(value, torch.Tensor):
                raise NeoxRtError(f"{where}: entry {key!r} is not a tensor")
            state[normalize_neox_key(key)] = value
        missing = [k for k in expected if k not in state]
        if missing:
            raise NeoxRtError(f"{where} is missing tensor{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        extra = [k for k in state if k not in expected]
        if extra:
            raise NeoxRtError(f"{where} has unexpected tensor{'s' if len(extra) > 1 else ''} {', '.join(extra)} "
                              f"(does the config match this checkpoint?)")
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise NeoxRtError(f"{where}: tensor {key} has shape {list(state[key].shape)}, expected "
                                  f"{list(shape)} from the config (hidden-size {self.config.hidden_size}, "
                                  f"num-attention-heads {self.config.num_attention_heads}, "
                                  f"model-parallel-size {self.tp})")
        return state

    def release(self) -> None:
        self._modules.clear()

    # -- whole-checkpoint iteration --------------------------------------------------------------------------
    def stages(self):
        """Yield (stage, [(hf name, neox key, full shape, kind)], reader(rank) -> validated state)."""
        shapes = full_shapes(self.config)
        for stage, entries in stage_plan(self.config).items():
            items = [(name, key, shapes[name], split_kind(name, self.config.use_parallel_residual))
                     for name, key in entries]
            expected = {key: rank_shape(full, kind, self.tp) for _, key, full, kind in items}
            cache: dict[int, dict] = {}

            def reader(rank, stage=stage, expected=expected, cache=cache):
                if rank not in cache:
                    cache[rank] = self.read_stage(stage, rank, expected)
                return cache[rank]
            yield stage, items, reader
            cache.clear()  # drop this layer's mmaps before the next is opened


def fill_tensor(dst: torch.Tensor, key: str, full: tuple[int, ...], kind: str, reader: Callable[[int], dict],
                src_tp: int, rank: int, size: int) -> None:
    """Write runtime rank ``rank`` of ``size``'s part of a tensor into ``dst`` from the source ranks.

    ``dst`` has the runtime's local shape (dim 0 of vocab tensors may cover padding rows beyond the
    checkpoint's: they are zeroed). Only source ranks that overlap this rank's slice are read.
    """
    if kind == "replicated":
        dst.copy_(reader(0)[key])
        return
    if kind == "sum":
        total = reader(0)[key].to(torch.float64)
        for s in range(1, src_tp):
            total = total + reader(s)[key].to(torch.float64)
        dst.copy_(total)
        return
    dim = int(kind[3])
    local = dst.shape[dim]
    lo, hi = rank * local, (rank + 1) * local  # this rank's rows/cols of the full tensor
    per = full[dim] // src_tp  # rows/cols each source rank stores
    for s in range(src_tp):
        a, b = max(lo, s * per), min(hi, (s + 1) * per)
        if a < b:
            dst.narrow(dim, a - lo, b - a).copy_(reader(s)[key].narrow(dim, a - s * per, b - a))
    stored = src_tp * per
    if hi > stored:  # vocabulary padding of the runtime beyond the checkpoint's rows
        start = max(lo, stored)
        dst.narrow(dim, start - lo, hi - start).zero_()


# ---------------------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------------------

def _read_config(config, root: str, tag_dir: str) -> tuple[dict, list[str]]:
    if isinstance(config, dict):
        return neox_yaml.parse_config(config, where="config", warn=None), []
    if config is None:
        paths = find_configs(root, tag_dir)
        if not paths:
            raise NeoxRtError(f"gpt-neox checkpoint {root} has no YAML config (looked in {tag_dir}/configs/, "
                              f"{root}/configs/ and {root}/*.yml): pass the config, e.g. "
                              f"neox_rt.load(path, config='20B.yml')")
    else:
        paths = [config] if isinstance(config, str) else list(config)
    return neox_yaml.read_configs(paths, warn=None), paths


def open_checkpoint(path: str, config=None, tokenizer: str | None = None) -> NeoxCheckpoint:
    """Locate and validate the layout of a gpt-neox checkpoint (root with ``latest``, or a tag directory).

    ``config``: YAML path(s) or an already-read mapping; by default the checkpoint's own YAML files.
    Only file names and the embedding's shape are read here; tensors are read by :func:`load_into`.
    """
    root, tag_dir = find_tag_dir(path)
    cfg, config_paths = _read_config(config, root, tag_dir)
    names = os.listdir(tag_dir)
    files = {}
    for n in names:
        m = LAYER_FILE.fullmatch(n)
        if m:
            files[(int(m.group(1)), int(m.group(2)))] = n
    ranks_seq = sorted(int(m.group(1)) for n in names if (m := RANK_FILE.fullmatch(n)))
    if files:
        layout = "pipeline"
        found_tp = max(r for _, r in files) + 1
    elif ranks_seq:
        layout = "sequential"
        found_tp = max(ranks_seq) + 1
    else:
        raise NeoxRtError(f"no gpt-neox weight files in {tag_dir} (expected layer_LL-model_TT-model_states.pt "
                          f"or mp_rank_TT_model_states.pt)")
    # The files decide the saved TP size (inference configs often edit model-parallel-size); a larger
    # model-parallel-size in the config means ranks are missing, which the file check below reports.
    tp = max(found_tp, cfg.get("model_parallel_size", 1))
    # The vocabulary rows come from the checkpoint itself (the padding depends on the saving TP size).
    ckpt = NeoxCheckpoint(root, tag_dir, layout, tp, None, config_paths, None, files)  # type: ignore[arg-type]
    first = ckpt._path(0, 0)
    if layout == "pipeline":
        if (0, 0) not in files:
            raise NeoxRtError(f"missing checkpoint file {first} (the word embeddings)")
        emb = safe_load(first).get("word_embeddings.weight")
    else:
        emb = ckpt._module(0).get("sequential.0.word_embeddings.weight")
    if not isinstance(emb, torch.Tensor) or emb.dim() != 2:
        raise NeoxRtError(f"{first} is missing tensor word_embeddings.weight")
    rows = emb.shape[0] * tp
    ckpt.dtype = emb.dtype
    del emb
    try:
        model_config = neox_yaml.to_model_config({**cfg, "padded_vocab_size": rows})
    except NeoxRtError as e:
        where = ", ".join(config_paths) or "config"
        raise NeoxRtError(f"{where}: {e}") from None
    if tp < 1 or model_config.num_attention_heads % tp or model_config.intermediate_size % tp:
        raise NeoxRtError(f"model-parallel-size {tp} does not divide the heads ({model_config.num_attention_heads})"
                          f" and MLP width ({model_config.intermediate_size}) of the config")
    ckpt.config = model_config
    ckpt.tokenizer = tokenizer or find_tokenizer(cfg, root, tag_dir, config_paths)
    # Every file must be there before any is read (a missing TP rank or layer fails fast).
    stages = list(stage_plan(model_config))
    if layout == "pipeline":
        for stage in stages:
            for r in range(tp):
                if (stage, r) not in files:
                    raise NeoxRtError(f"missing checkpoint file {ckpt._path(stage, r)} (pipeline layer {stage}, "
                                      f"tensor-parallel rank {r} of {tp}; config: {model_config.num_hidden_layers}"
                                      f" layers)")
        last = model_config.num_hidden_layers + 4  # final_linear; a tied model may still save it: ignored
        beyond = sorted(n for (s, _), n in files.items() if s > last)
        if beyond:
            raise NeoxRtError(f"{tag_dir} has layer files beyond the config's {model_config.num_hidden_layers} "
                              f"layers: {', '.join(beyond[:3])}")
    else:
        for r in range(tp):
            if r not in ranks_seq:
                raise NeoxRtError(f"missing checkpoint file {ckpt._path(0, r)} (tensor-parallel rank {r} of {tp})")
    return ckpt


# ---------------------------------------------------------------------------------------------------------
# Loading into a model, and the neox_rt.load entry point
# ---------------------------------------------------------------------------------------------------------

def load_into(model, ckpt: NeoxCheckpoint, progress: bool = True, device=None,
              after_stage: Callable[[list[str]], None] | None = None) -> None:
    """Fill every parameter of ``model`` (built for ``ckpt.config`` at any TP size) from the checkpoint.

    A parameter still on ``meta`` (the model built on meta) is allocated on ``device`` when its stage (a layer) is
    read, and ``after_stage(names)`` runs after each stage with the names of the parameters it filled: quantizing
    them there (:mod:`neox_rt.quant.apply`) means the float model is never whole on the device."""
    tp = model.tp
    params = dict(model.named_parameters())
    bar = progress_bar(sum(p.numel() * p.element_size() for p in params.values()), enabled=progress)
    done = set()
    with torch.no_grad():
        for _stage, items, reader in ckpt.stages():
            filled = []
            for name, key, full, kind in items:
                p = params[name]
                if p.is_meta:
                    owner, _, attr = name.rpartition(".")
                    p = torch.nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=False)
                    setattr(model.get_submodule(owner), attr, p)
                fill_tensor(p, key, full, kind, reader, ckpt.tp, tp.rank, tp.size)
                done.add(name)
                filled.append(name)
                if bar is not None:
                    bar.update(p.numel() * p.element_size())
            if after_stage is not None:
                after_stage(filled)
    ckpt.release()
    if bar is not None:
        bar.close()
    missing = sorted(set(params) - done)
    if missing:  # a bug, not a user error: the plan and the model disagree
        raise RuntimeError(f"parameters not loaded: {missing[:4]}")


def load_model(path: str, dtype="float32", device: str | None = None, tp: TensorParallel = SINGLE,
               progress: bool = True, config=None, tokenizer: str | None = None,
               after_stage: Callable[[NeoXForCausalLM, list[str]], None] | None = None):
    """A gpt-neox checkpoint directory as (model at runtime ``tp`` on ``device``, tokenizer path or None, root).

    With ``after_stage(model, names)`` the model is built on meta and each layer is allocated as it is read, then
    handed to ``after_stage`` (streaming quantization: see :func:`load_into`)."""
    device = device or default_device()
    ckpt = open_checkpoint(path, config=config, tokenizer=tokenizer)
    if after_stage is None:
        model = build_model(ckpt.config, dtype, device, tp)
        load_into(model, ckpt, progress=progress)
    else:
        model = build_model(ckpt.config, dtype, "meta", tp)
        load_into(model, ckpt, progress=progress, device=device, after_stage=lambda names: after_stage(model, names))
    return model, ckpt.tokenizer, ckpt.root
