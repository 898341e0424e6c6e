"""The block manager: which blocks of the KV pool each sequence owns. Pure Python, no tensors.

Why apart from the cache: deciding who owns which block is bookkeeping the scheduler
needs every step (can this request grow? whom to preempt?), while the cache only stores
K/V tensors at the slots this manager hands out. One manager can serve several pools of
the same block count: the speculative engine's draft keeps its K/V in its own pool under
the target's block tables, so the two never disagree about room.

A sequence of n tokens holds ceil(n / block_size) blocks, taken from a free list as it
grows and given back when it finishes or is preempted. Token position p of a sequence
lives at slot table[p // block_size] * block_size + p % block_size of the pool.
Reference counts are kept per block so that a block can later be shared between
sequences (prefix caching); today every block has one owner.
"""

from __future__ import annotations


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got num_blocks="
                             f"{num_blocks}, block_size={block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() takes block 0 first
        self.tables: dict[int, list[int]] = {}  # sequence id -> its blocks, in token order
        self.ref_counts = [0] * num_blocks  # owners of each block

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def can_hold(self, seq_id: int, n_tokens: int) -> bool:
        """Whether sequence `seq_id` can grow to `n_tokens` stored tokens with the free blocks."""
        have = len(self.tables.get(seq_id, ()))
        return self.blocks_for(n_tokens) - have <= len(self.free_blocks)

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        """Grow the block table of `seq_id` to hold `n_tokens` tokens."""
        if not self.can_hold(seq_id, n_tokens):
            raise RuntimeError(f"sequence {seq_id} needs {self.blocks_for(n_tokens)} blocks for "
                               f"{n_tokens} tokens, only {len(self.free_blocks)} free; check "
                               "can_hold first and preempt a sequence to make room")
        table = self.tables.setdefault(seq_id, [])
        while len(table) < self.blocks_for(n_tokens):
            block = self.free_blocks.pop()
            self.ref_counts[block] += 1
            table.append(block)

    def release(self, seq_id: int) -> None:
        """Give the blocks of `seq_id` back to the pool (finished or preempted)."""
        for block in reversed(self.tables.pop(seq_id, [])):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Pool slots of positions start .. end - 1 of `seq_id` (blocks already reserved)."""
        table = self.tables[seq_id]
        return [table[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, end)]
