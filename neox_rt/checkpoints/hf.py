"""Checkpoint reading: HF safetensors (single or sharded) and ``pytorch_model*.bin``, streamed tensor by
tensor onto the target device and dtype, each rank reading only its tensor-parallel slice."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from neox_rt.errors import NeoxRtError
from neox_rt.parallel.context import tp_split_dim

IGNORED = re.compile(r"(attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")
"""Buffers some HF uploads carry; they are recomputed, never loaded."""


@dataclass
class TensorSource:
    """One tensor of a checkpoint: its full shape and a reader of a dim-`dim` slice [start, stop)."""
    name: str
    file: str
    shape: tuple[int, ...]
    read: Callable[[int | None, int, int], torch.Tensor]


def resolve_checkpoint(path: str) -> str:
    """A local directory (or a file inside it), or a Hugging Face hub id resolved to a local snapshot."""
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise NeoxRtError(f"checkpoint directory not found: {path} (and huggingface_hub is not installed "
                              f"to resolve it as a hub id)") from None
        try:
            return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"])
        except Exception as e:  # noqa: BLE001 - no network, unknown repo, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NeoxRtError(f"checkpoint directory not found: {path}, and fetching it as a Hugging Face "
                              f"hub id failed ({first})") from None
    raise NeoxRtError(f"checkpoint directory not found: {path}")


def checkpoint_files(directory: str) -> list[str]:
    """The weight files of an HF checkpoint directory, preferring safetensors."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise NeoxRtError(f"corrupt index {index}: {e}") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
        if missing:
            raise NeoxRtError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return [os.path.join(directory, f) for f in files]
    names = sorted(os.listdir(directory))
    safet = [n for n in names if n.endswith(".safetensors")]
    if safet:
        return [os.path.join(directory, n) for n in safet]
    bins = [n for n in names if re.fullmatch(r"pytorch_model.*\.bin", n)]
    if bins:
        return [os.path.join(directory, n) for n in bins]
    raise NeoxRtError(f"no weights in {directory}: expected model.safetensors, sharded safetensors with "
                      f"model.safetensors.index.json, or pytorch_model*.bin")


def _slice(t, dim, start, stop):
    if dim is None:
        return t[...]
    index = [slice(None)] * len(t.get_shape() if hasattr(t, "get_shape") else t.shape)
    index[dim] = slice(start, stop)
    return t[tuple(index)]


def _safetensors_sources(path: str) -> Iterator[TensorSource]:
    from safetensors import safe_open
    try:
        handle = safe_open(path, framework="pt", device="cpu")
        keys = list(handle.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise NeoxRtError(f"corrupt checkpoint file {path}: {e}") from None
    for key in keys:
        sl = handle.get_slice(key)

        def read(dim, start, stop, sl=sl, key=key):
            try:
                return _slice(sl, dim, start, stop)
            except Exception as e:  # noqa: BLE001
                raise NeoxRtError(f"corrupt checkpoint file {path}: cannot read tensor {key}: {e}") from None
        yield TensorSource(key, path, tuple(sl.get_shape()), read)


def torch_load_weights_only(path: str):
    """``torch.load(weights_only=True)`` to CPU, memory-mapped where the format allows (raises as torch does)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


def _bin_sources(path: str) -> Iterator[TensorSource]:
    try:
        state = torch_load_weights_only(path)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for unsafe pickles, zip errors, EOF, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NeoxRtError(f"cannot load checkpoint file {path} safely (weights_only): {first}") from None
    if not isinstance(state, dict):
        raise NeoxRtError(f"checkpoint file {path} does not hold a dict of tensors")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        yield TensorSource(key, path, tuple(t.shape), lambda dim, a, b, t=t: _slice(t, dim, a, b))


def index_checkpoint(directory: str) -> dict[str, TensorSource]:
    """Name -> source for every tensor of the checkpoint, without reading tensor data."""
    sources: dict[str, TensorSource] = {}
    for path in checkpoint_files(directory):
        gen = _safetensors_sources(path) if path.endswith(".safetensors") else _bin_sources(path)
        for src in gen:
            sources[src.name] = src
    return sources


def _param_plan(model) -> dict[str, tuple[torch.nn.Parameter, tuple[int, ...], int | None]]:
    """Checkpoint name -> (parameter, expected full shape, tp split dim) for every model parameter."""
    tp = model.tp
    plan = {}
    for name, p in model.named_parameters():
        dim = tp_split_dim(name)
        shape = list(p.shape)
        if dim is not None:
            shape[dim] *= tp.size
        plan[name] = (p, tuple(shape), dim)
    return plan


def _is_vocab(name: str) -> bool:
    return name in ("gpt_neox.embed_in.weight", "embed_out.weight")


def load_weights(model, directory: str, progress: bool = True) -> None:
    """Copy every parameter of ``model`` (already on its device and dtype) from the checkpoint.

    Missing tensors, unexpected tensors and shape mismatches are errors that name the tensors. Each
    tensor is read (only this rank's slice), converted and copied before the next is read.
    """
    sources = index_checkpoint(directory)
    plan = _param_plan(model)
    tied = model.config.tie_word_embeddings
    present = {n for n in sources if not IGNORED.search(n)}
    if tied:
        present.discard("embed_out.weight")
    missing = sorted(set(plan) - present)
    unexpected = sorted(present - set(plan))
    if missing:
        raise NeoxRtError(f"checkpoint {directory} is missing tensors: {_names(missing)}")
    if unexpected:
        raise NeoxRtError(f"checkpoint {directory} has unexpected tensors: {_names(unexpected)}")
    bad = []
    for name, (p, shape, dim) in plan.items():
        have = sources[name].shape
        if _is_vocab(name):
            # The runtime may pad the vocabulary further (tensor parallelism): fewer rows are fine.
            ok = len(have) == 2 and have[1] == shape[1] and have[0] <= shape[0]
        else:
            ok = have == shape
        if not ok:
            bad.append(f"{name} has shape {list(have)}, expected {list(shape)}")
    if bad:
        raise NeoxRtError(f"checkpoint {directory} does not match the config: {'; '.join(bad[:4])}"
                          + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""))
    bar = progress_bar(sum(p.numel() * p.element_size() for p, _, _ in plan.values()), enabled=progress)
    tp = model.tp
    for name, (p, shape, dim) in plan.items():
        copy_slice(p, sources[name], dim, tp)
        if bar is not None:
            bar.update(p.numel() * p.element_size())
    if bar is not None:
        bar.close()


def copy_slice(p: torch.Tensor, src: TensorSource, dim: int | None, tp) -> None:
    """Copy this rank's slice of ``src`` (split on ``dim``, None: whole) into ``p``; vocabulary rows beyond the
    checkpoint's (padding for tensor parallelism) become zeros."""
    with torch.no_grad():
        if dim is None:
            p.copy_(src.read(None, 0, 0))
        else:
            local = p.shape[dim]
            start, stop = tp.rank * local, (tp.rank + 1) * local
            avail = src.shape[dim]
            if stop <= avail:
                p.copy_(src.read(dim, start, stop))
            else:  # vocabulary padding rows beyond the checkpoint: zeros
                p.zero_()
                if start < avail:
                    p.narrow(dim, 0, avail - start).copy_(src.read(dim, start, avail))


def _names(names: list[str], limit: int = 6) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def progress_bar(total_bytes: int, enabled: bool):
    """A tqdm bar on stderr that appears only if loading takes more than a second."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights", delay=1.0, leave=False)
