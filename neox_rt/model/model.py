"""The GPT-NeoX model: Attention, MLP, Layer, Model; module names match the HF checkpoint.

Every block is built from :mod:`neox_rt.model.layers`, which call the op table, so the fused kernels replace the
reference one by one. Under tensor parallelism each module holds its shard (see :mod:`neox_rt.parallel`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neox_rt.model.config import NeoXConfig
from neox_rt.model.layers import (ColumnParallelLinear, LayerNorm, RowParallelLinear, VocabParallelEmbedding,
                                  norm_linear_pair, row_parallel_sum)
from neox_rt.ops.reference import rotary_tables, softmax_scale
from neox_rt.ops.table import OPS
from neox_rt.parallel.context import SINGLE, TensorParallel, check_tp_size, padded_vocab_size


@dataclass
class PagedAttentionMetadata:
    """Where one varlen step's tokens live in a paged KV cache (#23); given to ``forward`` it replaces the dense
    cache path in exactly one place, :meth:`Attention.attend`.

    The step's tokens are flattened as input_ids [1, num_tokens], sequence after sequence; the first
    ``num_decodes`` sequences are one-token decodes (run by ``paged_decode_attention``), the rest prompt chunks
    (``paged_prefill_attention``, which also takes a one-token chunk). Per layer the cache's k, v are
    [num_blocks, nh, block_size, hd]."""
    slot_mapping: torch.Tensor
    """[num_tokens] int64: flat slot (block * block_size + offset) that receives each token's k and v."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks] int32: each sequence's blocks in position order (entries past it never read)."""
    seqlens: torch.Tensor
    """[num_seqs] int32: tokens of each sequence in the cache after this step (its new tokens included)."""
    query_start_loc: torch.Tensor
    """[num_seqs + 1] int32: cumulative new-token counts from 0 (sequence i's tokens are rows qsl[i]..qsl[i+1])."""
    num_decodes: int = 0
    """How many leading sequences are one-token decodes."""

    @property
    def is_decode(self) -> bool:
        """Every sequence of the step is a decode."""
        return self.num_decodes == self.seqlens.shape[0]


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

    def forward(self, x, positions, k_cache, v_cache, cos, sin, decode_seqlens=None, residual=None, paged=None):
        """Partial output of this rank (before the all-reduce): dense(attend(qkv(x))) (+ bias + residual on rank 0).

        x [b, s, h]; positions [b, s]; k_cache/v_cache [B, nh, T, hd]. ``decode_seqlens`` [b] (= positions + 1)
        selects the one-token decode kernel.
        """
        qkv = self.query_key_value(x)  # [b, s, nh*3*hd]
        ctx = self.attend(qkv, positions, k_cache, v_cache, cos, sin, decode_seqlens, paged)
        return self.dense(ctx, residual=residual)  # [b, s, h]

    def attend(self, qkv, positions, k_cache, v_cache, cos, sin, decode_seqlens=None, paged=None):
        """Rotary + cache write of the new k, v, then attention: qkv [b, s, nh*3*hd] -> context [b, s, nh*hd].
        With ``paged`` (a :class:`PagedAttentionMetadata`) the caches are paged and the step varlen."""
        if paged is not None:
            return self._attend_paged(qkv, positions, k_cache, v_cache, cos, sin, paged)
        b, s, _ = qkv.shape
        if decode_seqlens is not None and s == 1:  # rotary, cache write and decode attention: one op
            ctx = OPS["rotary_decode_attention"](qkv, positions, cos, sin, self.rotary_ndims, k_cache, v_cache,
                                                 decode_seqlens, self.scale)[:, None]  # [b, 1, nh, hd]
        else:
            q = OPS["rotary_kv_write"](qkv, positions, cos, sin, self.rotary_ndims, k_cache, v_cache)  # [b, s, nh, hd]
            ctx = OPS["attention"](q, k_cache, v_cache, positions, self.scale)  # [b, s, nh, hd]
        return ctx.reshape(b, s, -1)

    def _attend_paged(self, qkv, positions, k_cache, v_cache, cos, sin, m: PagedAttentionMetadata):
        """:meth:`attend` over a paged cache: qkv [1, n, nh*3*hd] (varlen) -> context [1, n, nh*hd]; the leading
        ``m.num_decodes`` tokens through the decode op, the prompt chunks after them through the prefill op."""
        b, s, _ = qkv.shape
        q = OPS["paged_rotary_kv_write"](qkv, positions, cos, sin, self.rotary_ndims, k_cache, v_cache,
                                         m.slot_mapping.reshape(b, s))
        q = q.reshape(b * s, self.num_heads, self.head_dim)  # [n, nh, hd]
        nd = m.num_decodes
        parts = []
        if nd:
            parts.append(OPS["paged_decode_attention"](q[:nd], k_cache, v_cache, m.block_tables[:nd],
                                                       m.seqlens[:nd], self.scale))
        if nd < m.seqlens.shape[0]:
            parts.append(OPS["paged_prefill_attention"](q[nd:], k_cache, v_cache, m.block_tables[nd:],
                                                        m.query_start_loc[nd:] - nd, m.seqlens[nd:], self.scale))
        ctx = parts[0] if len(parts) == 1 else torch.cat(parts)
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
                defer_all_reduce: bool = False, paged=None, next_layer: "Layer | None" = None):
        """x [b, s, h] (or the previous layer's deferred or normalised sum) -> this layer's output; with
        ``defer_all_reduce`` the output's all-reduce may be left to the next layer's LayerNorm, and with
        ``next_layer`` (a parallel-residual layer) its LayerNorms may be applied in this layer's sum (see
        layers.row_parallel_sum)."""
        ln1, ln2, att, mlp = self.input_layernorm, self.post_attention_layernorm, self.attention, self.mlp
        if self.parallel:
            # x = x + attn(ln1(x)) + mlp(ln2(x)), ONE all-reduce; the residual and the row-parallel biases ride in the
            # output projections' epilogue
            x, qkv, up = norm_linear_pair(x, ln1, ln2, att.query_key_value, mlp.dense_h_to_4h, mlp.act)
            ctx = att.attend(qkv, positions, k_cache, v_cache, cos, sin, decode_seqlens, paged)  # [b, s, nh*hd]
            return row_parallel_sum(self.tp, att.dense, ctx, mlp.dense_4h_to_h, up, residual=x,
                                    defer_all_reduce=defer_all_reduce,
                                    layernorms=(ln1.weight, ln1.bias, ln2.weight, ln2.bias),
                                    next_layernorms=None if next_layer is None or not next_layer.parallel else
                                    (next_layer.input_layernorm, next_layer.post_attention_layernorm))
        # a = x + attn(ln1(x)); x = a + mlp(ln2(a)): two all-reduces
        a = self.tp.all_reduce(att(ln1(x), positions, k_cache, v_cache, cos, sin, decode_seqlens, residual=x,
                                   paged=paged))
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
                last_index: torch.Tensor | None = None, decode: bool = False,
                paged: PagedAttentionMetadata | None = None) -> torch.Tensor:
        """Logits of the new tokens, written into ``cache``.

        input_ids [b, s]; positions [b, s] (cache slot and rotary position of each token); ``last_index``
        [b] keeps one position per sequence (prefill: the last prompt token) -> logits [b, V];
        otherwise logits [b, s, V]. ``decode`` selects the decode attention kernel (s == 1, each query
        at positions[:, 0] sees slots 0..positions).

        ``paged`` (:class:`PagedAttentionMetadata`): ``cache`` is paged (per layer [num_blocks, nh, bs, hd]),
        input_ids and positions [1, num_tokens] varlen, and ``last_index`` [m] token indices -> logits [m, V].
        """
        c = self.config
        cos, sin = self.rotary()
        x = self.gpt_neox.embed_in(input_ids)  # [b, s, h]
        seqlens = positions[:, 0] + 1 if decode else None
        last = len(self.gpt_neox.layers) - 1
        layers = self.gpt_neox.layers
        for i, layer in enumerate(layers):  # every layer but the last may defer its all-reduce or normalise its sum
            x = layer(x, positions, cache.k[i], cache.v[i], cos, sin, seqlens, defer_all_reduce=i < last, paged=paged,
                      next_layer=layers[i + 1] if i < last else None)
        if last_index is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last_index][:, None]  # [b, 1, h] (paged: [m, 1, h])
        x = self.gpt_neox.final_layer_norm(x)
        logits = self.tp.all_gather_last_dim(OPS["linear"](x, self.lm_head_weight()))  # [b, s, vocab_rows]
        if self.vocab_rows > c.vocab_size:  # TP padding rows: never returned, so never sampled or scored
            logits = logits[..., :c.vocab_size]  # [b, s, V]
        return logits[:, 0] if last_index is not None else logits
