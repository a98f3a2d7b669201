"""The public Python API: ``neox_rt.load(path)`` -> :class:`NeoX` with generate / score / logits."""
from __future__ import annotations

import os
from typing import Sequence

import torch

from neox_rt.checkpoints import neox as neox_checkpoint
from neox_rt.checkpoints.hf import load_weights, resolve_checkpoint
from neox_rt.engine.generation import GenerationResult, Generator, normalize_prompts
from neox_rt.engine.sampling import SamplingParams
from neox_rt.engine.tokenizer import Tokenizer
from neox_rt.errors import NeoxRtError
from neox_rt.model.build import build_model, default_device
from neox_rt.model.config import NeoXConfig
from neox_rt.model.model import NeoXForCausalLM
from neox_rt.ops.backends import select_backend
from neox_rt.parallel.context import SINGLE, TensorParallel
from neox_rt.quant.apply import StageQuantizer, load_quantizing, memory_report, prepare_weights, quantize_model
from neox_rt.quant.checkpoint import load_quantized_checkpoint, quantization_config

class NeoX:
    """A loaded model with its tokenizer."""

    def __init__(self, model: NeoXForCausalLM, tokenizer: Tokenizer | None, path: str | None = None):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.path = path
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise NeoxRtError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's "
                              f"vocabulary has only {self.config.vocab_size} rows: wrong tokenizer for this model?")
        self._generator = Generator(model, tokenizer) if tokenizer is not None else None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def memory_report(self):
        """Bytes of the weights: quantized linears (formats) and what stays float (embedding, LM head, LayerNorms
        and biases); ``str()`` of it is one line (:class:`neox_rt.quant.apply.MemoryReport`)."""
        return memory_report(self.model)

    def _need_tokenizer(self) -> Generator:
        if self._generator is None:
            raise NeoxRtError("no tokenizer: pass tokenizer=PATH to neox_rt.load (e.g. 20B_tokenizer.json)")
        return self._generator

    def generate(self, prompts, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 0.0, stop: Sequence[str] = (), seed: int | None = None,
                 truncate: str = "error", recompute: bool = False, return_logprobs: bool = False,
                 on_text=None) -> list[GenerationResult] | GenerationResult:
        """Continue each prompt; one :class:`GenerationResult` for one prompt, a list of them for a batch.

        One prompt (returns a ``GenerationResult``):

        - a ``str``;
        - a list (or tuple) of token ids, e.g. ``[12092, 1533]``;
        - a 1-D integer ``torch.Tensor`` (any device) or numpy array.

        A batch (returns a list of results in the same order, ``[]`` for an empty list):

        - a list of the above, str and id prompts mixed as you like, e.g. ``["Hello", [12092, 1533]]``;
        - a 2-D integer tensor or numpy array ``[batch, seq]`` (each row one prompt).

        An empty prompt (``""``, ``[]`` inside a batch, a tensor with no ids) starts from ``<|endoftext|>``
        like an unconditional sample. Token ids must lie in ``0 .. vocab_size - 1`` of the model's vocabulary.
        Anything else (None, a dict, a float, a bare int, bools, a list mixing ints and strs, a float tensor,
        a 3-D tensor, an id out of range) raises :class:`NeoxRtError` naming what was passed.

        ``temperature`` 0 is greedy; otherwise logits / temperature, then ``top_k``, then ``top_p``.
        ``seed`` makes sampling reproducible. ``stop`` strings end a sequence and cut its text before them.
        ``truncate="left"`` keeps the end of a prompt too long for the context (else an error). ``on_text(i,
        delta)`` streams sequence i's text. ``return_logprobs`` fills each result's ``logprobs``.
        """
        batch, single = normalize_prompts(prompts, self.config.vocab_size)
        results = self._need_tokenizer().generate(
            batch, max_new_tokens, SamplingParams(temperature, top_k, top_p), stop=stop, seed=seed,
            truncate=truncate, recompute=recompute, return_logprobs=return_logprobs, on_text=on_text)
        return results[0] if single else results

    def score(self, text) -> tuple[list[int], list[float]]:
        """(token ids, log-probabilities of tokens 1..n-1 given their prefix) of one text, or of one prompt of
        token ids (a list of ints, a 1-D integer tensor or array)."""
        return self._need_tokenizer().score(text)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [b, s, V] for a batch of equal-length id sequences."""
        gen = self._generator or Generator(self.model, _NoTokenizer())
        return gen.logits(input_ids)


class _NoTokenizer:
    eos_id = 0
    vocab_size = 1 << 30


def find_tokenizer(directory: str, tokenizer: str | None) -> Tokenizer | None:
    if tokenizer is not None:
        return Tokenizer(tokenizer)
    candidate = os.path.join(directory, "tokenizer.json")
    return Tokenizer(candidate) if os.path.isfile(candidate) else None


def load(path: str, dtype="float32", device: str | None = None, tokenizer: str | None = None,
         backend: str | None = None, tp: TensorParallel = SINGLE, progress: bool = True,
         config=None, quantize: str | None = None, group_size: int = 128,
         quantize_lm_head: bool | str = False) -> NeoX:
    """Load an HF GPT-NeoX checkpoint directory (or hub id) onto ``device`` in ``dtype``.

    A gpt-neox native checkpoint directory (``latest`` + ``global_stepN/``, any TP/PP layout) is resharded
    to ``tp`` on load (:mod:`neox_rt.checkpoints.neox`); ``config`` is then its YAML file(s) or mapping
    (default: the YAML files found in the checkpoint). For an HF directory ``config`` may be a
    :class:`NeoXConfig` that replaces its ``config.json`` (weights saved without one).

    Weights stream tensor by tensor (peak host memory about one tensor). ``tokenizer`` is a tokenizers
    JSON file; by default the directory's ``tokenizer.json``. ``backend`` picks the kernels
    (``cuda``, ``triton``, ``torch``; default: ``NEOX_RT_BACKEND`` or the fastest available).

    ``quantize="int8"|"int4"`` (``group_size`` for int4) quantizes the layers' linears by round to nearest while
    an HF checkpoint streams in, layer by layer (the float model is never held whole; :mod:`neox_rt.quant.apply`);
    the embedding stays in ``dtype``, and the LM head too unless ``quantize_lm_head``: True gives it the layers'
    format (about 0.6 GB less to read a token for 20B in int4), "int8" or "int4" that format (int4 layers with an
    int8 head: half the head's bytes, its rounding per channel). A quantized checkpoint (``quantization_config`` in its
    config.json: ours, written by ``python -m neox_rt.quantize``, or GPTQ 4-bit) loads as it is.
    """
    device = device or default_device()
    if quantize_lm_head and quantize is None:
        raise NeoxRtError("quantize_lm_head needs quantize='int8' or 'int4'")
    if quantize_lm_head not in (True, False, None, "int8", "int4"):
        raise NeoxRtError(f"quantize_lm_head must be True, False, 'int8' or 'int4', got {quantize_lm_head!r}")
    if neox_checkpoint.is_neox_checkpoint(path):
        select_backend(backend, device)
        # quantizing: each layer's linears as the layer is read (StageQuantizer), the float model never whole
        quantizer = StageQuantizer(quantize, group_size, quantize_lm_head) if quantize is not None else None
        model, tokenizer_path, root = neox_checkpoint.load_model(path, dtype, device, tp, progress, config,
                                                                 tokenizer, after_stage=quantizer)
        return NeoX(prepare_weights(model), Tokenizer(tokenizer_path) if tokenizer_path else None, root)
    directory = resolve_checkpoint(path)
    if not isinstance(config, NeoXConfig):
        config = NeoXConfig.from_json(directory)
    select_backend(backend, device)
    qc = quantization_config(directory)
    if qc is not None:
        if quantize is not None:
            raise NeoxRtError(f"checkpoint {directory} is already quantized ({qc.get('quant_method')}); load it "
                              f"without quantize=")
        model = prepare_weights(load_quantized_checkpoint(directory, config, qc, dtype, device, tp, progress))
    elif quantize is not None:
        model = prepare_weights(load_quantizing(config, directory, quantize, group_size, dtype, device, tp,
                                                include_lm_head=quantize_lm_head, progress=progress))
    else:
        model = build_model(config, dtype, device, tp)
        load_weights(model, directory, progress=progress)
    return NeoX(model, find_tokenizer(directory, tokenizer), directory)
