"""The GPT-NeoX model: Attention, MLP, Layer, Model; module names match the HF checkpoint.

Every block is built from :mod:`neox_rt.model.layers`, which call the op table, so the fused kernels replace the
reference one by one. Under tensor parallelism each module holds its shard (see :mod:`neox_rt.parallel`).
"""
from __future__ import annotations

import torch
from torch import nn

from neox_rt.model.config import NeoXConfig
from neox_rt.model.layers import (ColumnParallelLinear, LayerNorm, RowParallelLinear, VocabParallelEmbedding,
                                  dual_layernorm, linear_pair, row_parallel_sum)
from neox_rt.ops.reference import rotary_tables, softmax_scale
from neox_rt.ops.table import OPS
from neox_rt.parallel.context import SINGLE, TensorParallel, check_tp_size, padded_vocab_size


class Attention(nn.Module):
    def __init__(self, config: NeoXConfig, tp: TensorParallel):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads // tp.size  # heads on this rank
        self.head_dim = config.head_dim
        self.rotary_ndims = config.rotary_ndims
        self.scale = softmax_scale(self.head_dim)
        self.query_key_value = ColumnParallelLinear(h, 3 * h, config.attention_bias, tp)
        self.dense = RowParallelLinear(h, h, config.attention_bias, tp)

    def forward(self, x, positions, k_cache, v_cache, cos, sin, decode_seqlens=None, residual=None):
        """Partial output of this rank (before the all-reduce): dense(attend(qkv(x))) (+ bias + residual on rank 0).

        x [b, s, h]; positions [b, s]; k_cache/v_cache [B, nh, T, hd]. ``decode_seqlens`` [b] (= positions + 1)
        selects the one-token decode kernel.
        """
        qkv = self.query_key_value(x)  # [b, s, nh*3*hd]
        ctx = self.attend(qkv, positions, k_cache, v_cache, cos, sin, decode_seqlens)
        return self.dense(ctx, residual=residual)  # [b, s, h]

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
        self.dense_h_to_4h = ColumnParallelLinear(h, f, True, tp)
        self.dense_4h_to_h = RowParallelLinear(f, h, True, tp)

    def forward(self, x, residual=None):
        """Partial output of this rank (before the all-reduce): dense_4h_to_h(act(dense_h_to_4h(x)))."""
        return self.dense_4h_to_h(self.dense_h_to_4h(x, self.act), residual=residual)  # [b, s, h]


class Layer(nn.Module):
    def __init__(self, config: NeoXConfig, tp: TensorParallel):
        super().__init__()
        self.parallel = config.use_parallel_residual
        self.tp = tp
        self.input_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.attention = Attention(config, tp)
        self.mlp = MLP(config, tp)

    def forward(self, x, positions, k_cache, v_cache, cos, sin, decode_seqlens=None,
                defer_all_reduce: bool = False):
        """x [b, s, h] (or the previous layer's deferred sum) -> this layer's output; with ``defer_all_reduce`` the
        output's all-reduce may be left to the next layer's LayerNorm (see layers.row_parallel_sum)."""
        ln1, ln2, att, mlp = self.input_layernorm, self.post_attention_layernorm, self.attention, self.mlp
        if self.parallel:
            # x = x + attn(ln1(x)) + mlp(ln2(x)), ONE all-reduce; the residual and the row-parallel biases ride in the
            # output projections' epilogue
            x, a_in, m_in = dual_layernorm(x, ln1, ln2)
            qkv, up = linear_pair(att.query_key_value, a_in, mlp.dense_h_to_4h, m_in, mlp.act)
            ctx = att.attend(qkv, positions, k_cache, v_cache, cos, sin, decode_seqlens)  # [b, s, nh*hd]
            return row_parallel_sum(self.tp, att.dense, ctx, mlp.dense_4h_to_h, up, residual=x,
                                    defer_all_reduce=defer_all_reduce,
                                    layernorms=(ln1.weight, ln1.bias, ln2.weight, ln2.bias))
        # a = x + attn(ln1(x)); x = a + mlp(ln2(a)): two all-reduces
        a = self.tp.all_reduce(att(ln1(x), positions, k_cache, v_cache, cos, sin, decode_seqlens, residual=x))
        return self.tp.all_reduce(mlp(ln2(a), residual=a))


class GPTNeoX(nn.Module):
    def __init__(self, config: NeoXConfig, tp: TensorParallel):
        super().__init__()
        rows = padded_vocab_size(config.vocab_size, tp.size)
        self.embed_in = VocabParallelEmbedding(rows, config.hidden_size, tp)
        self.layers = nn.ModuleList(Layer(config, tp) for _ in range(config.num_hidden_layers))
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)


class NeoXForCausalLM(nn.Module):
    """GPT-NeoX reading and writing a KV cache (any object with per-layer ``k[i]`` / ``v[i]`` of shape
    [B, nh, T, hd], e.g. :class:`neox_rt.engine.kv_cache.KVCache`). Parameter names equal the HF checkpoint's."""

    def __init__(self, config: NeoXConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        check_tp_size(config, tp.size)  # heads split whole: a NeoxRtError naming both numbers otherwise
        self.config = config
        self.tp = tp
        self.vocab_rows = padded_vocab_size(config.vocab_size, tp.size)
        self.gpt_neox = GPTNeoX(config, tp)
        if not config.tie_word_embeddings:
            self.embed_out = ColumnParallelLinear(config.hidden_size, self.vocab_rows, False, tp)
        self._rotary = None

    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.gpt_neox.embed_in.weight
        return self.embed_out.weight

    @property
    def device(self) -> torch.device:
        return self.gpt_neox.final_layer_norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.gpt_neox.final_layer_norm.weight.dtype

    def rotary(self):
        """cos, sin tables [max_pos, rd/2] (fp32), computed once on the model's device."""
        device = self.device
        if self._rotary is None or self._rotary[0].device != device:
            c = self.config
            self._rotary = rotary_tables(c.rotary_ndims, c.max_position_embeddings, c.rotary_emb_base, device)
        return self._rotary

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache,
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
        for i, layer in enumerate(self.gpt_neox.layers):  # every layer but the last may defer its all-reduce
            x = layer(x, positions, cache.k[i], cache.v[i], cos, sin, seqlens, defer_all_reduce=i < last)
        if last_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_index][:, None]  # [b, 1, h]
        x = self.gpt_neox.final_layer_norm(x)
        logits = self.tp.all_gather_last_dim(OPS["linear"](x, self.lm_head_weight()))  # [b, s, vocab_rows]
        if self.vocab_rows > c.vocab_size:  # TP padding rows: never returned, so never sampled or scored
            logits = logits[..., :c.vocab_size]  # [b, s, V]
        return logits[:, 0] if last_index is not None else logits
