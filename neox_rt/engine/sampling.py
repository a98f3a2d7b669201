"""Next-token choice with gpt-neox's semantics: temperature, then top-k, then top-p (top token kept)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from neox_rt.errors import NeoxRtError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 is greedy (argmax); otherwise logits are divided by it."""
    top_k: int = 0
    """Keep the k most likely tokens (0: off)."""
    top_p: float = 0.0
    """Nucleus: keep the smallest set whose probability reaches top_p; the top token always stays (0: off)."""

    def __post_init__(self):
        if self.temperature < 0:
            raise NeoxRtError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise NeoxRtError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise NeoxRtError(f"top_p must be in [0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside top-k, then outside the nucleus top-p. logits [b, V] fp32."""
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the token that crosses top_p
        remove[..., 0] = False  # the top token always stays
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, valid_vocab: int,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids [b] from logits [b, V]; ids >= valid_vocab (padded rows) are never chosen."""
    logits = logits.float()
    if valid_vocab < logits.shape[-1]:
        logits = logits[..., :valid_vocab]
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def request_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator whose state depends only on ``(seed, index)``: the randomness of token ``index`` of a
    seeded request, the same whatever else runs beside it and after a preemption's recompute."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 0x9E3779B97F4A7C15 + int(index) * 0xBF58476D1CE4E5B9 + 1) % (1 << 64))
    return g


def sample_row(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, valid_vocab: int,
               generator: torch.Generator) -> int:
    """One id from logits [V] (any device) with :func:`sample`'s semantics (temperature, top-k, then top-p; ids >=
    valid_vocab never chosen), by inverting the CDF at one uniform draw of the CPU ``generator``: the choice
    depends only on the logits and the generator, not on the device's random state."""
    x = logits.float()[:valid_vocab]
    if temperature == 0.0 or top_k == 1:
        return int(x.argmax())
    x = filter_logits(x[None] / temperature, top_k, top_p)[0]
    cum = torch.softmax(x, dim=-1).double().cumsum(dim=-1)  # fp64: a scan's order barely moves a bin edge
    u = torch.rand((), generator=generator).to(cum.device)
    # the first id whose cumulative probability exceeds u * total: never a filtered id (its probability is 0);
    # should rounding put u * total at the very top, the last id of nonzero probability
    i = int(torch.searchsorted(cum, (u * cum[-1])[None], right=True)[0])
    if i >= x.shape[-1] or not torch.isfinite(x[i]):
        i = int(torch.nonzero(torch.isfinite(x))[-1])
    return i


def to_device_queued(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: to a GPU through page-locked memory (a copy from
    ordinary memory may wait for the work queued before it, such as a step still running)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def sample_rows(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                valid_vocab: int, uniforms: list[float]) -> list[int]:
    """:func:`sample_row` for every row of logits [m, V] at once, row i with its own temperature (> 0), top-k,
    top-p and uniform draw ``uniforms[i]`` (``torch.rand((), generator=g)`` of that row's generator): the same
    choice per row as :func:`sample_row`, in a few batched operations and one wait for the device instead of a
    handful of launches and a wait per row."""
    return sample_rows_queued(logits, temperature, top_k, top_p, valid_vocab, uniforms).tolist()


def sample_rows_queued(logits: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                       valid_vocab: int, uniforms: list[float]) -> torch.Tensor:
    """:func:`sample_rows` as ids [m] on the logits' device, nothing waited for (on a GPU only queued). On the CPU
    the rows go a few at a time (each block's work stays in the cache: one row at a time is faster there than all
    of them at once)."""
    if logits.device.type == "cpu":
        step = max(1, (1 << 17) // logits.shape[-1])
        if len(temperature) > step:
            return torch.cat([sample_rows_queued(logits[i:i + step], temperature[i:i + step], top_k[i:i + step],
                                                 top_p[i:i + step], valid_vocab, uniforms[i:i + step])
                              for i in range(0, len(temperature), step)])
    x = logits.float()[:, :valid_vocab]
    dev = x.device
    v = x.shape[-1]

    def put(values, dtype):  # a small host list to the device without waiting for it
        return to_device_queued(torch.tensor(values, dtype=dtype), dev)

    x = x / put(temperature, torch.float32)[:, None]
    if any(0 < t < v for t in top_k) or any(0.0 < t < 1.0 for t in top_p):
        # filter_logits per row: top-k (logits below the row's kth value), then top-p on what top-k kept
        k = put([min(t, v) for t in top_k], torch.int64)
        p = put([t if 0.0 < t < 1.0 else 2.0 for t in top_p], torch.float32)  # 2.0: off
        sorted_x, order = torch.sort(x, descending=True, dim=-1)
        kth = sorted_x.gather(1, (k - 1).clamp(min=0)[:, None])
        kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
        x = x.masked_fill(x < kth, float("-inf"))
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))  # the same order: x sorted after top-k
        remove = torch.softmax(sorted_x, dim=-1).cumsum(dim=-1) > p[:, None]
        remove[:, 1:] = remove[:, :-1].clone()  # keep the token that crosses top_p
        remove[:, 0] = False
        x = x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    # fp64: how a scan sums a row (one row or many, CPU or GPU) moves a bin edge by ~1e-16, not ~1e-7: a draw lands
    # in the same bin as sample_row's
    cum = torch.softmax(x, dim=-1).double().cumsum(dim=-1)
    i = torch.searchsorted(cum, (put(uniforms, torch.float64) * cum[:, -1])[:, None], right=True)[:, 0]
    # as sample_row: rounding past the top, or onto a filtered id, takes the last id of nonzero probability
    finite = torch.isfinite(x)
    ic = i.clamp(max=v - 1)
    bad = (i >= v) | ~finite.gather(1, ic[:, None])[:, 0]
    last = (v - 1) - finite.flip(-1).to(torch.int8).argmax(dim=-1)
    return torch.where(bad, last, ic)
