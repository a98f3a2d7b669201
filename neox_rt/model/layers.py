"""The building blocks of the model, sharded for tensor parallelism (Megatron style).

Each block says *what* it computes and calls the op table (:data:`neox_rt.ops.OPS`), which decides *how*: which
kernel serves a call, for which dtype and weight format. A linear's weight is a tensor ``[out, in]`` or a weight
format object (the op table's references dequantize it; kernels for a format register beside the fp16 ones), so a
new format needs no branch here. Column-parallel linears hold a slice of the output features, row-parallel ones a
slice of the input features and produce a partial sum; :func:`row_parallel_sum` ends the parallel-residual layer
with its one all-reduce, which the tensor-parallel context may defer into the next layer's LayerNorm
(:class:`PendingSum`).
"""
from __future__ import annotations

import torch
from torch import nn

from neox_rt.ops.table import OPS
from neox_rt.parallel.context import TensorParallel


class Linear(nn.Module):
    """y = act(x @ W.T + b) + residual; weight [out, in], bias [out] (HF names)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None):
        return OPS["linear"](x, self.weight, self.bias, activation, residual=residual)


class ColumnParallelLinear(Linear):
    """A linear whose output features are split over the ranks: rank r holds rows [r*out/tp, (r+1)*out/tp) of W and
    b and returns its slice of y; no communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features, out_features // tp.size, bias)


class RowParallelLinear(Linear):
    """A linear whose input features are split over the ranks: rank r holds columns [r*in/tp, (r+1)*in/tp) of W and
    returns a partial sum; the bias (replicated) and the residual are added on rank 0 only, so the all-reduce that
    follows adds them exactly once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TensorParallel):
        super().__init__(in_features // tp.size, out_features, bias)
        self.lead = tp.rank == 0

    def lead_bias(self) -> torch.Tensor | None:
        return self.bias if self.lead else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's partial sum x_r @ W_r.T (+ bias + residual on rank 0)."""
        return OPS["linear"](x, self.weight, self.lead_bias(), residual=residual if self.lead else None)


class LayerNorm(nn.Module):
    """LN(x) = (x - mean) / sqrt(var + eps) * weight + bias, replicated on every rank."""

    def __init__(self, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OPS["layernorm"](x, self.weight, self.bias, self.eps)


class VocabParallelEmbedding(nn.Module):
    """Vocab-parallel embedding: rank r holds rows [r*V/tp, (r+1)*V/tp); out-of-shard ids give zeros, summed over the
    ranks by an all-reduce."""

    def __init__(self, vocab_rows: int, hidden: int, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.rows = vocab_rows // tp.size
        self.weight = nn.Parameter(torch.empty(self.rows, hidden), requires_grad=False)

    def forward(self, ids):
        if self.tp.size == 1:
            return self.weight[ids]
        start = self.tp.rank * self.rows
        local = ids - start
        inside = (local >= 0) & (local < self.rows)
        out = self.weight[local.clamp(0, self.rows - 1)] * inside[..., None].to(self.weight.dtype)
        return self.tp.all_reduce(out)


class PendingSum:
    """A layer's partial output whose all-reduce was deferred into the next layer's LayerNorm: the sum kernel pushed
    it to the peers (:meth:`neox_rt.parallel.p2p.P2PAllReduce.linear_sum_push`), and :func:`dual_layernorm` reduces
    and normalises it in one kernel."""

    def __init__(self, partial: torch.Tensor, p2p):
        self.partial, self.p2p = partial, p2p


class NormedSum:
    """A layer's output ``x`` with the next layer's two LayerNorms of it already applied (``ln1``, ``ln2``): the
    ``linear_sum_norm`` op normalised it in the sum's launch, so the next layer's pair reads them directly."""

    def __init__(self, x: torch.Tensor, ln1: torch.Tensor, ln2: torch.Tensor):
        self.x, self.ln1, self.ln2 = x, ln1, ln2


def dual_layernorm(x, ln1: LayerNorm, ln2: LayerNorm):
    """(x, LN1(x), LN2(x)) for a parallel-residual layer; ``x`` may be the previous layer's :class:`PendingSum`,
    whose all-reduce then happens here (the reduced x is returned as the residual stream)."""
    if isinstance(x, PendingSum):
        return x.p2p.reduce_dual_layernorm(x.partial, ln1.weight, ln1.bias, ln2.weight, ln2.bias, ln1.eps)
    return (x, *OPS["dual_layernorm"](x, ln1.weight, ln1.bias, ln2.weight, ln2.bias, ln1.eps))


def norm_linear_pair(x, ln1: LayerNorm, ln2: LayerNorm, first: ColumnParallelLinear, second: ColumnParallelLinear,
                     activation2: str | None):
    """(x, first(LN1(x)), act2(second(LN2(x)))): the parallel-residual layer's dual LayerNorm and column-parallel
    pair, one op (a backend may run the LayerNorms inside the pair's launch). ``x`` may be the previous layer's
    :class:`PendingSum`, reduced and normalised by :func:`dual_layernorm` first, or its :class:`NormedSum`, already
    normalised."""
    if isinstance(x, NormedSum):
        return (x.x, *linear_pair(first, x.ln1, second, x.ln2, activation2))
    if isinstance(x, PendingSum):
        x, a_in, m_in = dual_layernorm(x, ln1, ln2)
        return (x, *linear_pair(first, a_in, second, m_in, activation2))
    return (x, *OPS["norm_linear_pair"](x, ln1.weight, ln1.bias, ln2.weight, ln2.bias, ln1.eps, first.weight,
                                        first.bias, None, second.weight, second.bias, activation2))


def linear_pair(first: ColumnParallelLinear, x1, second: ColumnParallelLinear, x2, activation2: str | None):
    """(first(x1), act2(second(x2))): two column-parallel linears of the same layer, one op (a backend may run both
    in one launch)."""
    return OPS["linear_pair"](x1, first.weight, first.bias, None, x2, second.weight, second.bias, activation2)


def row_parallel_sum(tp: TensorParallel, first: RowParallelLinear, x1, second: RowParallelLinear, x2,
                     residual: torch.Tensor, defer_all_reduce: bool = False, layernorms: tuple = (),
                     next_layernorms: tuple[LayerNorm, LayerNorm] | None = None):
    """all_reduce(first(x1) + second(x2)) + biases + residual: two row-parallel linears summed, then ONE all-reduce.

    With ``defer_all_reduce`` the tensor-parallel context may leave the all-reduce to the next layer's LayerNorm
    (whose parameters ``layernorms`` it checks) and return a :class:`PendingSum`; otherwise the reduced tensor.
    With ``next_layernorms`` (the next layer's two LayerNorms) and one rank, where a kernel serves ``linear_sum_norm``
    for these arguments, the sum and both LayerNorms of it come from that op as a :class:`NormedSum`.
    """
    args = (x1, first.weight, x2, second.weight, first.lead_bias(), second.lead_bias(),
            residual if first.lead else None)
    if next_layernorms is not None and tp.size == 1:
        ln1, ln2 = next_layernorms
        norm_args = (*args, ln1.weight, ln1.bias, ln2.weight, ln2.bias, ln1.eps)
        normed = OPS["linear_sum_norm"].call_kernel(*norm_args)
        if normed is not None:
            return NormedSum(*normed)
    if defer_all_reduce and tp.p2p is not None and tp.p2p.defers(args, layernorms):
        tp.all_reduce_calls += 1
        return PendingSum(tp.p2p.linear_sum_push(*args), tp.p2p)
    return tp.all_reduce(OPS["linear_sum"](*args))
