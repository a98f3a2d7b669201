"""The paged KV cache's bookkeeping: a fixed pool of blocks of ``block_size`` token slots, a free list, and one
block table per sequence.

Pure Python, no tensors: block ``b`` is an index into the cache tensors the model runner owns (slot ``p`` of a
sequence lives in block ``table[p // block_size]`` at offset ``p % block_size``). A sequence's table grows as its
tokens do, a new block only when the last one is full, so ``len(table) == ceil(slots / block_size)`` always.

Not here (later options): prefix caching (hash full blocks, share them by reference count, copy on write), and a
watermark of blocks kept free at admission. The free list is FIFO (a freed block is reused last), which is what
an LRU prefix cache would want.
"""
from __future__ import annotations

from collections import deque


class NoFreeBlocks(RuntimeError):
    """An allocation the pool cannot serve; callers check ``can_allocate`` / ``can_append`` first."""


class BlockManager:
    """Owns ``num_blocks`` KV blocks of ``block_size`` token slots each, keyed by sequence id."""

    def __init__(self, num_blocks: int, block_size: int = 16):
        if type(num_blocks) is not int or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        if type(block_size) is not int or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._tables: dict[str, list[int]] = {}
        self._slots: dict[str, int] = {}  # token slots reserved per sequence (<= len(table) * block_size)

    # --- counters (metrics) --------------------------------------------------------------------------------
    @property
    def num_total(self) -> int:
        return self.num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def capacity_tokens(self) -> int:
        """Token slots of the whole pool: the longest sequence that can ever be held."""
        return self.num_blocks * self.block_size

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` slots: ceil(num_tokens / block_size)."""
        return -(-num_tokens // self.block_size)

    # --- queries -------------------------------------------------------------------------------------------
    def has(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: str) -> tuple[int, ...]:
        """The sequence's blocks in position order; () if it owns none."""
        return tuple(self._tables.get(seq_id, ()))

    def num_slots(self, seq_id: str) -> int:
        """Token slots reserved for the sequence (0 if it owns no blocks)."""
        return self._slots.get(seq_id, 0)

    def can_allocate(self, num_tokens: int) -> bool:
        """Whether a sequence that owns nothing yet could get slots for ``num_tokens`` tokens now."""
        return self.blocks_needed(num_tokens) <= len(self._free)

    def can_append(self, seq_id: str, num_tokens: int = 1) -> bool:
        """Whether the sequence's slots can grow by ``num_tokens`` (free if its last block has room)."""
        slots = self._slots.get(seq_id, 0)
        grow = self.blocks_needed(slots + num_tokens) - len(self._tables.get(seq_id, ()))
        return grow <= len(self._free)

    # --- changes -------------------------------------------------------------------------------------------
    def allocate(self, seq_id: str, num_tokens: int) -> tuple[int, ...]:
        """A new block table with slots for ``num_tokens`` tokens (>= 1) for a sequence that owns nothing."""
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already owns blocks")
        if num_tokens < 1:
            raise ValueError(f"allocate needs num_tokens >= 1, got {num_tokens}")
        need = self.blocks_needed(num_tokens)
        if need > len(self._free):
            raise NoFreeBlocks(f"{seq_id!r} needs {need} blocks for {num_tokens} tokens, {len(self._free)} free")
        self._tables[seq_id] = [self._free.popleft() for _ in range(need)]
        self._slots[seq_id] = num_tokens
        return tuple(self._tables[seq_id])

    def append(self, seq_id: str, num_tokens: int = 1) -> tuple[int, ...]:
        """Grow the sequence's slots by ``num_tokens``; returns the blocks added (none while the last has room)."""
        if seq_id not in self._tables:
            raise ValueError(f"sequence {seq_id!r} owns no blocks; allocate first")
        if num_tokens < 0:
            raise ValueError(f"append needs num_tokens >= 0, got {num_tokens}")
        table = self._tables[seq_id]
        slots = self._slots[seq_id] + num_tokens
        grow = self.blocks_needed(slots) - len(table)
        if grow > len(self._free):
            raise NoFreeBlocks(f"{seq_id!r} needs {grow} more blocks, {len(self._free)} free")
        added = [self._free.popleft() for _ in range(grow)]
        table.extend(added)
        self._slots[seq_id] = slots
        return tuple(added)

    def ensure(self, seq_id: str, num_tokens: int) -> tuple[int, ...]:
        """Slots for at least ``num_tokens`` tokens in total (allocating or growing); returns the blocks added."""
        if seq_id not in self._tables:
            return self.allocate(seq_id, num_tokens)
        return self.append(seq_id, max(0, num_tokens - self._slots[seq_id]))

    def free(self, seq_id: str) -> int:
        """Return the sequence's blocks to the free list; the number freed (0 if it owned none, so twice is safe)."""
        table = self._tables.pop(seq_id, None)
        self._slots.pop(seq_id, None)
        if not table:
            return 0
        self._free.extend(table)
        return len(table)

    # --- invariants ----------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise AssertionError unless: every block id is in range; no block is owned twice, nor both owned and
        free, nor free twice; used + free == total; each table is exactly ceil(slots / block_size) long."""
        owned: dict[int, str] = {}
        for seq_id, table in self._tables.items():
            assert len(table) == self.blocks_needed(self._slots[seq_id]) and table, \
                f"{seq_id!r}: {len(table)} blocks for {self._slots[seq_id]} slots"
            for b in table:
                assert 0 <= b < self.num_blocks, f"{seq_id!r} owns block {b} outside [0, {self.num_blocks})"
                assert b not in owned, f"block {b} owned by both {owned[b]!r} and {seq_id!r}"
                owned[b] = seq_id
        assert self._slots.keys() == self._tables.keys(), "slot counts and tables name different sequences"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert all(0 <= b < self.num_blocks for b in free), "a free block id is out of range"
        both = free & owned.keys()
        assert not both, f"blocks both free and owned: {sorted(both)}"
        assert len(owned) + len(free) == self.num_blocks, \
            f"used {len(owned)} + free {len(free)} != total {self.num_blocks}"
