"""Paged unique KV: fixed-size blocks handed to sequences from a free list."""

from __future__ import annotations

from collections import deque

from kb.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that `seq` can hold `num_tokens` tokens in total."""
        need = -(-num_tokens // self.block_size)
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        n = self.blocks_needed(seq, num_tokens)
        assert n <= self.num_free, "allocate() without can_allocate()"
        seq.block_table.extend(self.free.popleft() for _ in range(n))

    def release(self, seq: Sequence) -> None:
        self.free.extend(seq.block_table)
        seq.block_table.clear()
        seq.num_computed = 0

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks
