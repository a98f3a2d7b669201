"""The GPT-NeoX model: Attention, MLP, Layer, Model; module names match the HF checkpoint.

Every op goes through :data:`neox_rt.ops.OPS`, so the fused kernels replace the reference one by one.
Under tensor parallelism each module holds its shard (see :mod:`neox_rt.parallel`).
"""
from __future__ import annotations

import torch
from torch import nn

from neox_rt import ops
from neox_rt.config import NeoXConfig
from neox_rt.kv_cache import KVCache
from neox_rt.parallel import SINGLE, TensorParallel, check_tp_size, padded_vocab_size

OPS = ops.OPS


class Linear(nn.Module):
    """y = x @ W.T + b; under TP each rank holds the shard that parallel.tp_split_dim names."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None


class LayerNorm(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(hidden), requires_grad=False)


class Attention(nn.Module):
    def __init__(self, config: NeoXConfig, tp: TensorParallel):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads // tp.size  # heads on this rank
        self.head_dim = config.head_dim
        self.rotary_ndims = config.rotary_ndims
        self.scale = ops.softmax_scale(self.head_dim)
        self.query_key_value = Linear(h, 3 * h // tp.size, config.attention_bias)
        self.dense = Linear(h // tp.size, h, config.attention_bias)

    def forward(self, x, positions, k_cache, v_cache, cos, sin, decode_seqlens=None, bias=None, residual=None):
        """Partial output of this rank (before the all-reduce): dense(ctx) + bias + residual.

        x [b, s, h]; positions [b, s]; k_cache/v_cache [B, nh, T, hd]. ``decode_seqlens`` [b] (= positions + 1)
        selects the one-token decode kernel. ``bias`` (dense's, row-parallel) and ``residual`` [b, s, h] are
        added in the output projection's epilogue; the layer passes them on one rank only.
        """
        qkv = OPS["linear"](x, self.query_key_value.weight, self.query_key_value.bias)  # [b, s, nh*3*hd]
        ctx = self.attend(qkv, positions, k_cache, v_cache, cos, sin, decode_seqlens)
        return OPS["linear"](ctx, self.dense.weight, bias, residual=residual)  # [b, s, h]

    def attend(self, qkv, positions, k_cache, v_cache, cos, sin, decode_seqlens=None):
        """Rotary + cache write of the new k, v, then attention: qkv [b, s, nh*3*hd] -> context [b, s, nh*hd]."""
        b, s, _ = qkv.shape
        q = OPS["rotary_kv_write"](qkv, positions, cos, sin, self.rotary_ndims, k_cache, v_cache)  # [b, s, nh, hd]
        if decode_seqlens is not None and s == 1:
            ctx = OPS["decode_attention"](q[:, 0], k_cache, v_cache, decode_seqlens, self.scale)[:, None]
        else:
            ctx = OPS["attention"](q, k_cache, v_cache, positions, self.scale)  # [b, s, nh, hd]
        return ctx.reshape(b, s, -1)


class MLP(nn.Module):
    def __init__(self, config: NeoXConfig, tp: TensorParallel):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.act = config.hidden_act
        self.dense_h_to_4h = Linear(h, f // tp.size, True)
        self.dense_4h_to_h = Linear(f // tp.size, h, True)

    def forward(self, x, bias=None, residual=None):
        """Partial output of this rank (before the all-reduce): dense_4h_to_h(act(...)) + bias + residual."""
        up = OPS["linear"](x, self.dense_h_to_4h.weight, self.dense_h_to_4h.bias, self.act)  # [b, s, f/tp]
        return OPS["linear"](up, self.dense_4h_to_h.weight, bias, residual=residual)  # [b, s, h]


class Layer(nn.Module):
    def __init__(self, config: NeoXConfig, tp: TensorParallel):
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.eps = config.layer_norm_eps
        self.tp = tp
        self.input_layernorm = LayerNorm(config.hidden_size)
        self.post_attention_layernorm = LayerNorm(config.hidden_size)
        self.attention = Attention(config, tp)
        self.mlp = MLP(config, tp)

    def forward(self, x, positions, k_cache, v_cache, cos, sin, decode_seqlens=None, fuse_next: bool = False):
        """x [b, s, h], or the previous layer's :class:`PendingSum` -> this layer's output, or (``fuse_next``, where
        the peer-to-peer all-reduce can fuse, see :meth:`_pushes`) its PendingSum for the next layer."""
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        # The residual stream and the row-parallel output biases ride in the output projections' epilogues
        # (no separate add kernels). Under TP only rank 0 adds them, so the all-reduce sums them exactly once.
        lead = self.tp.rank == 0
        attn_bias = self.attention.dense.bias if lead else None
        mlp_bias = self.mlp.dense_4h_to_h.bias if lead else None
        if self.parallel:
            # x + attn(ln1(x)) + mlp(ln2(x)), ONE all-reduce. The two column-parallel linears (QKV, h->4h) are one op,
            # and so are the two row-parallel ones with the sum (dense + 4h->h + biases + x): a backend may run each
            # pair as one launch (the fallback: two linears, dense adding x and 4h->h adding that partial).
            att, mlp = self.attention, self.mlp
            if isinstance(x, PendingSum):  # the previous layer's all-reduce, in this LayerNorm's kernel
                x, a_in, m_in = x.reduce_dual_layernorm(ln1, ln2, self.eps)
            else:
                a_in, m_in = OPS["dual_layernorm"](x, ln1.weight, ln1.bias, ln2.weight, ln2.bias, self.eps)
            qkv, up = OPS["linear_pair"](a_in, att.query_key_value.weight, att.query_key_value.bias, None,
                                         m_in, mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias, mlp.act)
            ctx = att.attend(qkv, positions, k_cache, v_cache, cos, sin, decode_seqlens)  # [b, s, nh*hd]
            args = (ctx, att.dense.weight, up, mlp.dense_4h_to_h.weight, attn_bias, mlp_bias, x if lead else None)
            if fuse_next and self._pushes(*args):
                from neox_rt import cuda_ops
                self.tp.all_reduce_calls += 1
                return PendingSum(cuda_ops.linear_sum_push(self.tp.p2p, *args), self.tp.p2p)
            return self.tp.all_reduce(OPS["linear_sum"](*args))
        # a = x + attn(ln1(x)); x = a + mlp(ln2(a)): two all-reduces
        a = self.tp.all_reduce(self.attention(OPS["layernorm"](x, ln1.weight, ln1.bias, self.eps), positions,
                                              k_cache, v_cache, cos, sin, decode_seqlens,
                                              bias=attn_bias, residual=x if lead else None))
        return self.tp.all_reduce(self.mlp(OPS["layernorm"](a, ln2.weight, ln2.bias, self.eps), bias=mlp_bias,
                                           residual=a if lead else None))

    def _pushes(self, *sum_args) -> bool:
        """Whether this layer's all-reduce can go into the next layer's LayerNorm: the peer-to-peer all-reduce is on
        for this call (see parallel.P2PAllReduce), the CUDA kernels serve the sum (one row) and the dual LayerNorm
        (float16 / bfloat16, 8-byte vectors: hidden % 4 == 0), and the row fits a slot."""
        p2p = self.tp.p2p
        if p2p is None or not p2p.fuses():
            return False
        from neox_rt import cuda_ops
        x1 = sum_args[0]
        h = self.input_layernorm.weight.shape[0]
        return (cuda_ops.serves("linear_sum", *sum_args) and x1.dtype in (torch.float16, torch.bfloat16)
                and h % 4 == 0 and 4 * h <= p2p.slot_bytes
                and all(t.data_ptr() % 16 == 0 for t in (self.input_layernorm.weight, self.input_layernorm.bias,
                                                          self.post_attention_layernorm.weight,
                                                          self.post_attention_layernorm.bias)))


class PendingSum:
    """A parallel-residual layer's partial output whose all-reduce is left to the next layer's LayerNorm kernel: the
    sum kernel pushed it into every peer's slot (cuda_ops.linear_sum_push); the next layer reduces it and normalises
    in one kernel (cuda_ops.p2p_reduce_dual_layernorm), which returns the reduced x too (the residual stream)."""

    def __init__(self, partial: torch.Tensor, p2p):
        self.partial, self.p2p = partial, p2p

    def reduce_dual_layernorm(self, ln1, ln2, eps):
        from neox_rt import cuda_ops
        return cuda_ops.p2p_reduce_dual_layernorm(self.p2p, self.partial, ln1.weight, ln1.bias, ln2.weight, ln2.bias,
                                                  eps)


class Embedding(nn.Module):
    """Vocab-parallel embedding: rank r holds rows [r*V/tp, (r+1)*V/tp); out-of-shard ids give zeros."""

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


class GPTNeoX(nn.Module):
    def __init__(self, config: NeoXConfig, tp: TensorParallel):
        super().__init__()
        rows = padded_vocab_size(config.vocab_size, tp.size)
        self.embed_in = Embedding(rows, config.hidden_size, tp)
        self.layers = nn.ModuleList(Layer(config, tp) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size)


class NeoXForCausalLM(nn.Module):
    """GPT-NeoX with a preallocated KV cache. Parameter names equal the HF checkpoint's."""

    def __init__(self, config: NeoXConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        check_tp_size(config, tp.size)  # heads split whole: a NeoxRtError naming both numbers otherwise
        self.config = config
        self.tp = tp
        self.vocab_rows = padded_vocab_size(config.vocab_size, tp.size)
        self.gpt_neox = GPTNeoX(config, tp)
        if not config.tie_word_embeddings:
            self.embed_out = Linear(config.hidden_size, self.vocab_rows // tp.size, False)
        self._rotary = None

    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.gpt_neox.embed_in.weight
        return self.embed_out.weight

    def rotary(self):
        """cos, sin tables [max_pos, rd/2] (fp32), computed once on the model's device."""
        device = self.gpt_neox.final_layer_norm.weight.device
        if self._rotary is None or self._rotary[0].device != device:
            c = self.config
            self._rotary = ops.rotary_tables(c.rotary_ndims, c.max_position_embeddings, c.rotary_emb_base, device)
        return self._rotary

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        w = self.gpt_neox.final_layer_norm.weight
        return KVCache(c.num_hidden_layers, batch_size, c.num_attention_heads // self.tp.size, capacity,
                       c.head_dim, dtype=w.dtype, device=w.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                last_index: torch.Tensor | None = None, decode: bool = False) -> torch.Tensor:
        """Logits of the new tokens, written into ``cache``.

        input_ids [b, s]; positions [b, s] (cache slot and rotary position of each token); ``last_index``
        [b] keeps one position per sequence (prefill: the last prompt token) -> logits [b, V];
        otherwise logits [b, s, V]. ``decode`` selects the decode attention kernel (s == 1, each query
        at positions[:, 0] sees slots 0..positions).
        """
        c = self.config
        cos, sin = self.rotary()
        x = self.gpt_neox.embed_in(input_ids)  # [b, s, h]
        seqlens = positions[:, 0] + 1 if decode else None
        last = len(self.gpt_neox.layers) - 1
        for i, layer in enumerate(self.gpt_neox.layers):  # every layer but the last may leave its all-reduce to the next
            x = layer(x, positions, cache.k[i], cache.v[i], cos, sin, seqlens, fuse_next=i < last)
        if last_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_index][:, None]  # [b, 1, h]
        fln = self.gpt_neox.final_layer_norm
        x = OPS["layernorm"](x, fln.weight, fln.bias, c.layer_norm_eps)
        logits = self.tp.all_gather_last_dim(OPS["linear"](x, self.lm_head_weight()))  # [b, s, vocab_rows]
        if self.vocab_rows > c.vocab_size:  # TP padding rows: never returned, so never sampled or scored
            logits = logits[..., :c.vocab_size]  # [b, s, V]
        return logits[:, 0] if last_index is not None else logits
