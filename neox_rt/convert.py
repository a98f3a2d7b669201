"""``python -m neox_rt.convert SRC DST``: gpt-neox native checkpoints <-> Hugging Face safetensors directories.

- gpt-neox -> HF (``--to hf``): ``config.json``, ``model.safetensors`` (or shards plus
  ``model.safetensors.index.json`` above ``--max-shard-size``) and a copy of the tokenizer as
  ``tokenizer.json``; loadable by ``transformers.GPTNeoXForCausalLM``. TP shards are merged as
  :mod:`neox_rt.checkpoints.neox` describes (row-parallel biases summed); one pipeline layer is in memory at
  a time, plus the safetensors shard being written.
- HF -> gpt-neox (``--to neox --tp T --pp P``): ``latest``, ``<tag>/layer_LL-model_TT-model_states.pt``
  (``--pp`` >= 1; the files are the same for every pipeline size, the YAML records it) or, with ``--pp 0``,
  ``<tag>/mp_rank_TT_model_states.pt`` with a ``module`` dict (sequential layout); a gpt-neox YAML config
  ``neox_config.yml`` and the tokenizer beside them. The vocabulary is padded with zero rows to a multiple
  of T; with the parallel residual each rank stores bias / T of the row-parallel biases (so they sum back).

``--to`` defaults to the other format than SRC's. Errors print one line ``neox_rt: error: ...``, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

import torch

from neox_rt.checkpoints.hf import IGNORED, index_checkpoint, resolve_checkpoint
from neox_rt.checkpoints.neox import (fill_tensor, full_shapes, is_neox_checkpoint, layer_file_name, open_checkpoint,
                                      rank_file_name, split_kind, stage_plan)
from neox_rt.errors import ArgumentParser, NeoxRtError
from neox_rt.model.config import NeoXConfig
from neox_rt.parallel.context import padded_vocab_size

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bfloat16"}
NEW_MLP_NAMES = {"mlp.dense_h_to_4h.": "mlp.linear1.", "mlp.dense_4h_to_h.": "mlp.linear2."}


def _prepare_output(dst: str, force: bool) -> None:
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise NeoxRtError(f"output path {dst} exists and is not a directory")
    if os.path.isdir(dst) and os.listdir(dst) and not force:
        raise NeoxRtError(f"output directory {dst} is not empty (pass --force to write into it)")
    os.makedirs(dst, exist_ok=True)


def parse_size(text: str) -> int:
    """'4GB', '500MB', '100KB' or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise NeoxRtError(f"cannot read size {text!r} (use e.g. 4GB, 500MB)")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit])


# ---------------------------------------------------------------------------------------------------------
# gpt-neox -> HF
# ---------------------------------------------------------------------------------------------------------

def neox_to_hf(src: str, dst: str, config=None, tokenizer: str | None = None, dtype=None,
               max_shard_bytes: int = 4 << 30, force: bool = False) -> str:
    """Write the HF directory ``dst`` from the gpt-neox checkpoint ``src``; returns ``dst``."""
    from safetensors.torch import save_file
    ckpt = open_checkpoint(src, config=config, tokenizer=tokenizer)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or ckpt.dtype)
    _prepare_output(dst, force)
    shapes = full_shapes(ckpt.config)
    order = [name for entries in stage_plan(ckpt.config).values() for name, _ in entries]
    nbytes = {n: torch.Size(shapes[n]).numel() * dtype.itemsize for n in order}
    shard_of, shards, size = {}, [[]], 0  # greedy: a new shard when the current one would overflow
    for n in order:
        if shards[-1] and size + nbytes[n] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        shard_of[n] = len(shards) - 1
        size += nbytes[n]
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    pending: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _stage, items, reader in ckpt.stages():
            for name, key, full, kind in items:
                out = torch.empty(full, dtype=dtype)
                fill_tensor(out, key, full, kind, reader, ckpt.tp, 0, 1)
                pending[name] = out
                shard = shard_of[name]
                if all(n in pending for n in shards[shard]):
                    save_file({n: pending.pop(n) for n in shards[shard]}, os.path.join(dst, files[shard]),
                              metadata={"format": "pt"})
    ckpt.release()
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())},
                 "weight_map": {n: files[shard_of[n]] for n in order}}
        with open(os.path.join(dst, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    hf = ckpt.config.to_hf_dict()
    hf["torch_dtype"] = str(dtype).replace("torch.", "")
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2)
    if ckpt.tokenizer:
        shutil.copyfile(ckpt.tokenizer, os.path.join(dst, "tokenizer.json"))
    return dst


# ---------------------------------------------------------------------------------------------------------
# HF -> gpt-neox
# ---------------------------------------------------------------------------------------------------------

def neox_yaml_dict(config: NeoXConfig, tp: int, pp: int, dtype: torch.dtype, vocab_file: str | None) -> dict:
    """The gpt-neox YAML keys that describe ``config`` saved at ``tp`` x ``pp``."""
    act = config.hidden_act
    if act == "gelu":
        activation, fused = "gelu", False
    elif act in ("gelu_fast", "gelu_new", "gelu_pytorch_tanh"):
        activation, fused = "gelu", True  # gpt-neox's fused bias-gelu is the tanh approximation
    else:
        activation, fused = act, False
    d = {
        "pipe-parallel-size": pp,
        "model-parallel-size": tp,
        "num-layers": config.num_hidden_layers,
        "hidden-size": config.hidden_size,
        "num-attention-heads": config.num_attention_heads,
        "seq-length": config.max_position_embeddings,
        "max-position-embeddings": config.max_position_embeddings,
        "norm": "layernorm",
        "pos-emb": "rotary",
        "rotary-pct": float(config.rotary_pct),
        "rotary-emb-base": float(config.rotary_emb_base),
        "gpt-j-residual": bool(config.use_parallel_residual),
        "no-weight-tying": not config.tie_word_embeddings,
        "activation": activation,
        "bias-gelu-fusion": fused,
        "layernorm-epsilon": float(config.layer_norm_eps),
        "precision": PRECISION[dtype],
        "tokenizer-type": "HFTokenizer",
    }
    if config.intermediate_size != 4 * config.hidden_size:
        d["intermediate-size"] = config.intermediate_size
    if not config.attention_bias:
        d["use-bias-in-attn-linear"] = False
    if vocab_file:
        d["vocab-file"] = vocab_file
    return d


def _rank_part(read, full: tuple[int, ...], kind: str, rank: int, tp: int, dtype) -> torch.Tensor:
    """What source rank ``rank`` of ``tp`` stores for a full HF tensor read by ``read(dim, start, stop)``."""
    if kind == "replicated":
        return read(None, 0, 0).to(dtype)
    if kind == "sum":  # each rank adds its copy before the one all-reduce: store bias / tp
        return (read(None, 0, 0).to(torch.float64) / tp).to(dtype)
    dim = int(kind[3])
    n = full[dim]
    per = padded_vocab_size(n, tp) // tp  # only the vocabulary can need padding; others divide evenly
    lo, hi = rank * per, (rank + 1) * per
    shape = list(full)
    shape[dim] = per
    out = torch.zeros(shape, dtype=dtype)
    if lo < n:
        out.narrow(dim, 0, min(hi, n) - lo).copy_(read(dim, lo, min(hi, n)))
    return out


def hf_to_neox(src: str, dst: str, tp: int = 1, pp: int = 1, tag: str = "global_step0", dtype=None,
               mlp_names: str = "dense", tokenizer: str | None = None, force: bool = False) -> str:
    """Write the gpt-neox checkpoint ``dst`` (``pp`` >= 1: pipeline layout; 0: sequential) from an HF dir."""
    import yaml

    directory = resolve_checkpoint(src)
    config = NeoXConfig.from_json(directory)
    if tp < 1 or pp < 0:
        raise NeoxRtError(f"--tp must be >= 1 and --pp >= 0, got --tp {tp} --pp {pp}")
    if config.num_attention_heads % tp or config.intermediate_size % tp:
        raise NeoxRtError(f"--tp {tp} must divide the heads ({config.num_attention_heads}) and the MLP width "
                          f"({config.intermediate_size})")
    if not re.fullmatch(r"[\w.-]+", tag) or tag in (".", ".."):
        raise NeoxRtError(f"--tag {tag!r} must be a plain directory name such as global_step0")
    if mlp_names not in ("dense", "linear"):
        raise NeoxRtError(f"--mlp-names must be dense or linear, got {mlp_names!r}")
    sources = index_checkpoint(directory)
    shapes = full_shapes(config)
    missing = [n for n in shapes if n not in sources]
    if missing:
        raise NeoxRtError(f"checkpoint {directory} is missing tensors: {', '.join(missing[:6])}")
    bad = [f"{n} has shape {list(sources[n].shape)}, expected {list(s)}" for n, s in shapes.items()
           if tuple(sources[n].shape) != s]
    if bad:
        raise NeoxRtError(f"checkpoint {directory} does not match its config.json: {'; '.join(bad[:3])}")
    extra = [n for n in sources if n not in shapes and not IGNORED.search(n)
             and not (config.tie_word_embeddings and n == "embed_out.weight")]
    if extra:
        raise NeoxRtError(f"checkpoint {directory} has unexpected tensors: {', '.join(extra[:6])}")
    first = sources["gpt_neox.embed_in.weight"].read(0, 0, 1)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or first.dtype)
    tok = tokenizer or (os.path.join(directory, "tokenizer.json")
                        if os.path.isfile(os.path.join(directory, "tokenizer.json")) else None)
    if tok and not os.path.isfile(tok):
        raise NeoxRtError(f"tokenizer file not found: {tok}")
    _prepare_output(dst, force)
    tag_dir = os.path.join(dst, tag)
    os.makedirs(tag_dir, exist_ok=True)
    modules: list[dict] = [{} for _ in range(tp)]
    with torch.no_grad():
        for stage, entries in stage_plan(config).items():
            for rank in range(tp):
                state = {}
                for name, key in entries:
                    kind = split_kind(name, config.use_parallel_residual)
                    part = _rank_part(sources[name].read, shapes[name], kind, rank, tp, dtype)
                    if mlp_names == "linear":
                        for old, new in NEW_MLP_NAMES.items():
                            key = new + key[len(old):] if key.startswith(old) else key
                    state[key] = part.contiguous().clone()
                if pp == 0:
                    modules[rank].update({f"sequential.{stage}.{k}": v for k, v in state.items()})
                else:
                    torch.save(state, os.path.join(tag_dir, layer_file_name(stage, rank)))
    step = int(m.group(1)) if (m := re.search(r"(\d+)$", tag)) else 0
    for rank in range(tp):  # metadata (pipeline layout) or the weights themselves (sequential layout)
        meta = {"module": modules[rank] if pp == 0 else None, "iteration": step, "mp_world_size": tp,
                "dp_world_size": 1}
        torch.save(meta, os.path.join(tag_dir, rank_file_name(rank)))
    with open(os.path.join(dst, "latest"), "w", encoding="utf-8") as f:
        f.write(tag + "\n")
    vocab_name = None
    if tok:
        vocab_name = os.path.basename(tok)
        shutil.copyfile(tok, os.path.join(dst, vocab_name))
    with open(os.path.join(dst, "neox_config.yml"), "w", encoding="utf-8") as f:
        f.write("# gpt-neox model config written by neox_rt.convert (model shape and layout only)\n")
        yaml.safe_dump(neox_yaml_dict(config, tp, pp, dtype, vocab_name), f, sort_keys=False)
    return dst


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m neox_rt.convert",
                description="Convert GPT-NeoX checkpoints between the gpt-neox native layout (any TP/PP) and "
                            "Hugging Face safetensors directories.")
    p.add_argument("src", help="source checkpoint: a gpt-neox directory (with 'latest') or an HF directory")
    p.add_argument("dst", help="output directory (created; must be empty unless --force)")
    p.add_argument("--to", choices=("hf", "neox"), help="output format (default: the other one than SRC's)")
    p.add_argument("--config", nargs="+", help="gpt-neox YAML config(s) of SRC (default: found in SRC)")
    p.add_argument("--tokenizer", help="tokenizer JSON to copy (default: from SRC or its config's vocab-file)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="output dtype (default: as stored)")
    p.add_argument("--tp", type=int, default=1, help="--to neox: tensor-parallel size to write (default 1)")
    p.add_argument("--pp", type=int, default=1,
                   help="--to neox: pipeline size; >= 1 writes layer_* files, 0 sequential mp_rank_* files")
    p.add_argument("--tag", default="global_step0", help="--to neox: checkpoint tag directory name")
    p.add_argument("--mlp-names", choices=("dense", "linear"), default="dense",
                   help="--to neox: MLP keys dense_h_to_4h/dense_4h_to_h (20B release) or linear1/linear2")
    p.add_argument("--max-shard-size", default="4GB", help="--to hf: safetensors shard size (default 4GB)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        to = args.to or ("hf" if is_neox_checkpoint(args.src) else "neox")
        if to == "hf":
            if not is_neox_checkpoint(args.src):
                raise NeoxRtError(f"{args.src} is not a gpt-neox checkpoint directory (no 'latest', global_step*"
                                  f" or layer files)")
            neox_to_hf(args.src, args.dst, config=args.config, tokenizer=args.tokenizer, dtype=args.dtype,
                       max_shard_bytes=parse_size(args.max_shard_size), force=args.force)
        else:
            if is_neox_checkpoint(args.src):
                raise NeoxRtError(f"{args.src} is already a gpt-neox checkpoint; convert it to HF first "
                                  f"(--to hf) to change its layout")
            hf_to_neox(args.src, args.dst, tp=args.tp, pp=args.pp, tag=args.tag, dtype=args.dtype,
                       mlp_names=args.mlp_names, tokenizer=args.tokenizer, force=args.force)
    except NeoxRtError as e:
        print(f"neox_rt: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({to})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
