"""Batched generation over the preallocated KV cache: prefill, then one token per step.

Prompts of different lengths run together (right-padded; each token's position is its cache slot, and
the causal mask never lets a real token see padding). Each sequence stops on its own at EOS, a stop
string or the token cap. The host looks at the new tokens only every ``check_every`` steps on a GPU, so
the decode loop does not synchronise per token.
"""
from __future__ import annotations

import numbers
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from neox_rt.engine.graphs import DecodeGraphRunner, graphs_enabled
from neox_rt.engine.kv_cache import KVCache
from neox_rt.engine.sampling import SamplingParams, sample
from neox_rt.engine.tokenizer import Tokenizer
from neox_rt.errors import NeoxRtError


PREFILL_CHUNK = 512
"""Prompt positions one prefill forward takes: a chunk's attention scores are [batch, heads, chunk, prompt], so a
2048-token 20B prompt holds 0.26 GB of them at a time instead of 1 GB (int4 20B with a 2048-token cache fits a
15 GiB cap only so); the weights are read once a chunk, which a prompt this long does not notice."""

ACCEPTED_PROMPTS = ("a str, a list of token ids (ints) or a 1-D integer tensor/array for one prompt; a list of "
                    "those or a 2-D integer tensor/array [batch, seq] for a batch")


def _describe(x) -> str:
    """What was passed, for an error message: the type and a short repr (a tensor's dtype and shape)."""
    if _is_array(x):
        return f"a {x.ndim}-D {type(x).__name__} of {x.dtype} with shape {tuple(x.shape)}"
    text = repr(x)
    note = " (a bool is not a token id)" if isinstance(x, bool) else ""
    return f"{type(x).__name__} {text if len(text) <= 40 else text[:37] + '...'}{note}"


def _is_array(x) -> bool:
    """A torch tensor or a numpy array (numpy is not imported for this: only if the caller already did)."""
    if isinstance(x, torch.Tensor):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.ndarray)


def _is_token_id(x) -> bool:
    """A Python or numpy integer; bool (True is an int in Python) is not a token id."""
    if type(x) is int:
        return True
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        return False
    np = sys.modules.get("numpy")
    return np is None or not isinstance(x, np.bool_)


def _array_ids(x, where: str) -> list:
    """A tensor or array of integer dtype as (nested) Python ints, on the CPU."""
    if isinstance(x, torch.Tensor):
        integer = not x.dtype.is_floating_point and not x.dtype.is_complex and x.dtype != torch.bool
        if not integer:
            raise NeoxRtError(f"{where} is {_describe(x)}: token ids must have an integer dtype "
                              f"(e.g. torch.long); accepted: {ACCEPTED_PROMPTS}")
        return x.detach().cpu().tolist()
    if x.dtype.kind not in "iu":
        raise NeoxRtError(f"{where} is {_describe(x)}: token ids must have an integer dtype "
                          f"(e.g. int64); accepted: {ACCEPTED_PROMPTS}")
    return x.tolist()


def _check_ids(ids: list[int], vocab_size: int | None, where: str) -> list[int]:
    if ids and vocab_size is not None:
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise NeoxRtError(f"{where}: token id {bad} at position {ids.index(bad)} is outside the model's "
                              f"vocabulary of {vocab_size} ids (0..{vocab_size - 1})")
    return ids


def _one_prompt(p, vocab_size: int | None, where: str) -> str | list[int]:
    """One prompt as a str or a list of Python ints (validated against the vocabulary)."""
    if isinstance(p, str):
        return p
    if _is_array(p):
        if p.ndim != 1:
            raise NeoxRtError(f"{where} is {_describe(p)}: one prompt of token ids must be 1-D; "
                              f"accepted: {ACCEPTED_PROMPTS}")
        return _check_ids(_array_ids(p, where), vocab_size, where)
    if isinstance(p, (list, tuple)):
        for i, x in enumerate(p):
            if not _is_token_id(x):
                raise NeoxRtError(f"{where} is a list of token ids but item {i} is {_describe(x)}: "
                                  f"token ids are ints (not bool, float or str); accepted: {ACCEPTED_PROMPTS}")
        return _check_ids([int(x) for x in p], vocab_size, where)
    raise NeoxRtError(f"{where} is {_describe(p)}; accepted: {ACCEPTED_PROMPTS}")


def normalize_prompts(prompts, vocab_size: int | None = None) -> tuple[list[str | list[int]], bool]:
    """``(batch, single)``: every accepted prompt form as a list of prompts, each a str or a list of ints.

    One prompt (``single`` True): a str, a list/tuple of ints, a 1-D integer tensor or numpy array. A batch:
    a list/tuple of such prompts (str and id prompts may mix), or a 2-D integer tensor/array [batch, seq].
    An empty list or tuple is an empty batch; an empty prompt ("" or no ids) starts from <|endoftext|>.
    Token ids must lie in ``0..vocab_size - 1`` (when given); a tensor on any device is copied to CPU ints.
    Anything else raises :class:`NeoxRtError` naming what was passed and what is accepted.
    """
    if isinstance(prompts, str):
        return [prompts], True
    if _is_array(prompts):
        if prompts.ndim == 1:
            return [_one_prompt(prompts, vocab_size, "the prompt")], True
        if prompts.ndim == 2:
            rows = _array_ids(prompts, "prompts")
            return [_check_ids(r, vocab_size, f"prompt {i} of the batch") for i, r in enumerate(rows)], False
        raise NeoxRtError(f"prompts is {_describe(prompts)}: a tensor of token ids must be 1-D (one prompt) or "
                          f"2-D [batch, seq]; accepted: {ACCEPTED_PROMPTS}")
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            return [], False
        if any(_is_token_id(x) for x in prompts):  # one prompt of token ids; every item must be an id
            for i, x in enumerate(prompts):
                if not _is_token_id(x):
                    raise NeoxRtError(f"prompts is a list mixing token ids (ints) with {_describe(x)} (item {i}): "
                                      f"a list of ints is one prompt, a list of prompts is a batch; "
                                      f"accepted: {ACCEPTED_PROMPTS}")
            return [_check_ids([int(x) for x in prompts], vocab_size, "the prompt")], True
        return [_one_prompt(p, vocab_size, f"prompt {i} of the batch") for i, p in enumerate(prompts)], False
    raise NeoxRtError(f"prompts is {_describe(prompts)}; accepted: {ACCEPTED_PROMPTS}")


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    """Generated ids (no prompt, no EOS)."""
    text: str
    """Generated text (no prompt, no EOS, cut before a stop string)."""
    finish_reason: str
    """"eos", "stop" (a stop string) or "length" (the token cap)."""
    message: str | None = None
    """A warning, e.g. that the prompt was truncated on the left."""
    logprobs: list[float] | None = None
    """log p(token) under the model (before temperature and filtering), one per generated token."""
    duration_seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return self.finish_reason != "length"


@dataclass
class _Seq:
    prompt_ids: list[int]
    message: str | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reason: str | None = None
    text: str = ""
    streamed: int = 0
    end_time: float = 0.0


class Generator:
    """Runs a loaded model with its tokenizer; keeps one KV cache and resets it for each call."""

    def __init__(self, model, tokenizer: Tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.cache = None
        w = model.gpt_neox.final_layer_norm.weight
        self.device, self.dtype = w.device, w.dtype
        self.max_positions = model.config.max_position_embeddings
        # Decode steps as CUDA graphs on CUDA (NEOX_RT_CUDA_GRAPHS=0: eager); recompute mode never uses them.
        self.graphs = DecodeGraphRunner(model, tokenizer.eos_id) if graphs_enabled(self.device, model.tp.size) else None

    # -- helpers ------------------------------------------------------------------------------------
    def _get_cache(self, batch: int, capacity: int):
        if self.cache is None or not self.cache.fits(batch, capacity, self.dtype, self.device):
            self.cache = None  # free the old buffers first
            self.cache = KVCache.for_model(self.model, batch, capacity)
        else:
            self.cache.reset()
        return self.cache

    def prepare_prompt(self, prompt, max_new_tokens: int, truncate: str = "error") -> tuple[list[int], str | None]:
        """Token ids of a prompt (str or ids, see :func:`normalize_prompts`) that fit with max_new_tokens in
        the model's positions; an empty prompt becomes [<|endoftext|>]."""
        prompt = _one_prompt(prompt, self.model.config.vocab_size, "the prompt")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if not ids:
            ids = [self.tokenizer.eos_id]  # an empty prompt starts like an unconditional sample
        if max_new_tokens >= self.max_positions:
            raise NeoxRtError(f"maximum_tokens ({max_new_tokens}) must be below the model's "
                              f"{self.max_positions} positions")
        room = self.max_positions - max_new_tokens
        if len(ids) > room:
            if truncate != "left":
                raise NeoxRtError(f"prompt of {len(ids)} tokens plus {max_new_tokens} new tokens exceeds the "
                                  f"model's {self.max_positions} positions")
            msg = f"prompt truncated on the left from {len(ids)} to {room} tokens to fit the context"
            return ids[-room:], msg
        return ids, None

    def _prefill(self, seqs: list[list[int]]) -> torch.Tensor:
        """Run the prompts through the model from slot 0, PREFILL_CHUNK positions at a time (each chunk attends to
        the cache the earlier ones wrote); logits [b, V] of each last token."""
        b = len(seqs)
        last = torch.tensor([len(s) - 1 for s in seqs], device=self.device)
        width = int(max(len(s) for s in seqs))
        ids = torch.full((b, width), self.tokenizer.eos_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        ids = ids.to(self.device)
        positions = torch.arange(width, device=self.device).expand(b, width)  # [b, S]
        logits = None
        for c0 in range(0, width, PREFILL_CHUNK):
            c1 = min(width, c0 + PREFILL_CHUNK)
            index = (last - c0).clamp(0, c1 - c0 - 1)
            out = self.model(ids[:, c0:c1], positions[:, c0:c1], self.cache, last_index=index)
            here = ((last >= c0) & (last < c1))[:, None]  # the rows whose last prompt token is in this chunk
            logits = out if logits is None else torch.where(here, out, logits)
        return logits

    # -- generation ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: Sequence, max_new_tokens: int = 64, sampling: SamplingParams | None = None,
                 stop: Sequence[str] = (), seed: int | None = None, truncate: str = "error",
                 recompute: bool = False, return_logprobs: bool = False,
                 on_text: Callable[[int, str], None] | None = None,
                 check_every: int | None = None) -> list[GenerationResult]:
        """Generate a continuation for each prompt of a batch (any form :func:`normalize_prompts` accepts; a
        single prompt is a batch of one here). See :class:`GenerationResult`.

        ``on_text(i, delta)`` receives sequence i's text as it is produced (streaming). ``recompute``
        reruns the whole sequence each step instead of using the KV cache (gpt-neox's ``recompute``).
        """
        if max_new_tokens <= 0:
            raise NeoxRtError(f"maximum_tokens must be positive, got {max_new_tokens}")
        prompts, _ = normalize_prompts(prompts, self.model.config.vocab_size)
        if not prompts:
            return []
        sampling = sampling or SamplingParams()
        stop = [s for s in stop if s]
        start = time.perf_counter()
        seqs = []
        for p in prompts:
            ids, msg = self.prepare_prompt(p, max_new_tokens, truncate)
            seqs.append(_Seq(ids, msg))
        if check_every is None:
            check_every = 1 if (on_text is not None or self.device.type != "cuda") else 8
        b = len(seqs)
        capacity = max(len(s.prompt_ids) for s in seqs) + max_new_tokens
        use_graphs = self.graphs is not None and not recompute and self.graphs.supports(b)
        self._get_cache(self.graphs.cache_rows(b) if use_graphs else b, capacity)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed if seed is not None else int(torch.seed() % (2**63)))
        vocab = min(self.tokenizer.vocab_size, self.model.config.vocab_size)
        greedy_vocab = vocab if sampling.greedy else None

        logits = self._prefill([s.prompt_ids for s in seqs])
        out = torch.empty(b, max_new_tokens, dtype=torch.long, device=self.device)
        logp = torch.empty(b, max_new_tokens, dtype=torch.float32, device=self.device) if return_logprobs else None
        positions = torch.tensor([len(s.prompt_ids) for s in seqs], device=self.device)  # slot of the next token
        checked = 0
        steps = 0
        chosen = None  # the greedy token when the decode graph already took the argmax
        for step in range(max_new_tokens):
            tok = chosen if chosen is not None else sample(logits, sampling, vocab, gen)
            tok = self.model.tp.broadcast(tok)  # rank 0's choice for all
            out[:, step] = tok
            if logp is not None:
                logp[:, step] = torch.log_softmax(logits.float(), -1).gather(-1, tok[:, None])[:, 0]
            steps = step + 1
            if steps == max_new_tokens:
                break
            if steps - checked >= check_every:
                self._check(seqs, out, logp, checked, steps, stop, on_text)
                checked = steps
                if all(s.reason is not None for s in seqs):
                    break
            if recompute:
                self._get_cache(b, capacity)
                host = out[:, :steps].tolist()
                logits = self._prefill([s.prompt_ids + host[i] for i, s in enumerate(seqs)])
            else:
                logits, chosen = self._decode(tok, positions, greedy_vocab, use_graphs)
                positions += 1
        self._check(seqs, out, logp, checked, steps, stop, on_text, final=True)
        results = []
        for s in seqs:
            results.append(GenerationResult(
                prompt_ids=s.prompt_ids, token_ids=s.tokens, text=s.text, finish_reason=s.reason,
                message=s.message, logprobs=s.logprobs if return_logprobs else None,
                duration_seconds=(s.end_time or time.perf_counter()) - start))
        return results

    def _decode(self, tok: torch.Tensor, positions: torch.Tensor, greedy_vocab: int | None, use_graphs: bool):
        """One decode step: tokens [b] at positions [b] -> (logits [b, V], greedy ids [b] or None).

        A CUDA-graph replay when a graph runner is active for this batch (it may also take the greedy
        argmax over the first ``greedy_vocab`` ids), else the eager forward.
        """
        if use_graphs:
            res = self.graphs.step(tok, positions, self.cache, greedy_vocab)
            if res is not None:
                return res
        return self.model(tok[:, None], positions[:, None], self.cache, decode=True)[:, 0], None

    def _check(self, seqs, out, logp, lo: int, hi: int, stop, on_text, final: bool = False) -> None:
        """Append tokens [lo, hi) of every unfinished sequence and apply EOS, stop strings and streaming."""
        if hi <= lo and not final:
            return
        new = out[:, lo:hi].tolist()
        new_lp = logp[:, lo:hi].tolist() if logp is not None else None
        eos = self.tokenizer.eos_id
        longest_stop = max((len(s) for s in stop), default=0)
        for i, s in enumerate(seqs):
            if s.reason is not None:
                continue
            toks = new[i]
            if eos in toks:
                cut = toks.index(eos)
                s.tokens += toks[:cut]
                if new_lp is not None:
                    s.logprobs += new_lp[i][:cut]
                s.reason = "eos"
            else:
                s.tokens += toks
                if new_lp is not None:
                    s.logprobs += new_lp[i]
            s.text = self.tokenizer.decode(s.tokens)
            if stop:
                hits = [(s.text.find(x), x) for x in stop if x in s.text]
                if hits:
                    at = min(hits)[0]
                    s.text = s.text[:at]
                    # keep the tokens up to the one that completed the stop string
                    n = next(n for n in range(1, len(s.tokens) + 1)
                             if any(x in self.tokenizer.decode(s.tokens[:n]) for x in stop))
                    s.tokens = s.tokens[:n]
                    if new_lp is not None:
                        s.logprobs = s.logprobs[:n]
                    s.reason = "stop"
            if s.reason is None and final:
                s.reason = "length"
            if s.reason is not None:
                s.end_time = time.perf_counter()
            if on_text is not None:
                # hold back text that may still turn out to start a stop string
                safe = len(s.text) if s.reason is not None else max(len(s.text) - max(longest_stop - 1, 0), 0)
                if s.text.endswith("\ufffd") and s.reason is None:
                    safe = min(safe, len(s.text) - 1)
                if safe > s.streamed:
                    on_text(i, s.text[s.streamed:safe])
                    s.streamed = safe

    # -- scoring ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, text_or_ids) -> tuple[list[int], list[float]]:
        """Token ids of a text (or the ids given: a list of ints, a 1-D integer tensor) and
        log p(token_t | tokens_<t) for t >= 1 (len(ids) - 1 values)."""
        prompt = _one_prompt(text_or_ids, self.model.config.vocab_size, "the text to score")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if len(ids) > self.max_positions:
            raise NeoxRtError(f"text of {len(ids)} tokens exceeds the model's {self.max_positions} positions")
        if len(ids) < 2:
            return ids, []
        self._get_cache(1, len(ids))
        x = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        logits = self.model(x, positions, self.cache)[0, :-1].float()  # [S-1, V]
        lp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
        return ids, lp.tolist()

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full logits [b, s, V] of equal-length sequences (no padding), from an empty cache."""
        b, s = input_ids.shape
        self._get_cache(b, s)
        positions = torch.arange(s, device=self.device).expand(b, s)
        return self.model(input_ids.to(self.device), positions, self.cache)
