"""Preallocated KV cache: one buffer per k and v, never grown per token."""
from __future__ import annotations

import torch


class KVCache:
    """k, v: [layers, batch, heads, capacity, head_dim]. Slot p of row i holds the (rotated) key of
    sequence i at position p. Nothing reads a slot past the position being decoded, and
    :meth:`reset` clears everything between prompts, so no state leaks from one prompt to the next."""

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (layers, batch, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def fits(self, batch: int, capacity: int, dtype: torch.dtype, device) -> bool:
        return (self.batch >= batch and self.capacity >= capacity and self.k.dtype == dtype
                and self.k.device == torch.device(device))

    @classmethod
    def for_model(cls, model, batch: int, capacity: int) -> "KVCache":
        """A cache for ``batch`` sequences of up to ``capacity`` tokens, of the model's (this rank's) heads, dtype
        and device."""
        c = model.config
        return cls(c.num_hidden_layers, batch, c.num_attention_heads // model.tp.size, capacity, c.head_dim,
                   dtype=model.dtype, device=model.device)

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PagedKVCache:
    """The paged KV cache (#23): k, v [layers, num_blocks, heads, block_size, head_dim]; ``k[i]`` is layer i's
    pool of blocks. Which block holds which sequence's tokens is the block manager's business
    (:mod:`neox_rt.engine.block_manager`); slots past a sequence's length may hold stale values, never read."""

    def __init__(self, layers: int, num_blocks: int, heads: int, block_size: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (layers, num_blocks, heads, block_size, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[3]

    @staticmethod
    def block_bytes(model, block_size: int) -> int:
        """Bytes of one block across all layers, k and v, for the model's (this rank's) heads and dtype."""
        c = model.config
        elem = torch.empty((), dtype=model.dtype).element_size()
        return 2 * c.num_hidden_layers * (c.num_attention_heads // model.tp.size) * block_size * c.head_dim * elem

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int = 16) -> "PagedKVCache":
        """A pool of ``num_blocks`` blocks of ``block_size`` tokens of the model's heads, dtype and device."""
        c = model.config
        return cls(c.num_hidden_layers, num_blocks, c.num_attention_heads // model.tp.size, block_size, c.head_dim,
                   dtype=model.dtype, device=model.device)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
