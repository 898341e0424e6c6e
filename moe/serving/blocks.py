"""The block manager: which blocks of the KV pool each sequence owns, and which full blocks
hold a prefix that a new request can reuse. Pure Python, no tensors.

Why apart from the cache: deciding who owns which block is bookkeeping the scheduler
needs every step (can this request grow? whom to preempt?), while the cache only stores
K/V tensors at the slots this manager hands out. One manager can serve several pools of
the same block count: the speculative engine's draft keeps its K/V in its own pool under
the target's block tables, so the two never disagree about room.

A sequence of n tokens holds ceil(n / block_size) blocks, taken as it grows and given
back when it finishes or is preempted. Token position p of a sequence lives at slot
table[p // block_size] * block_size + p % block_size of the pool.

Prefix caching (as in vLLM): once a block is full of computed tokens it is named by a
chained hash of its tokens and of the blocks before it, so equal names mean equal
prefixes (the tokens are compared too: a hash collision can never share a block). A
new request whose first blocks have names in the cache takes those blocks (reference
counted) instead of computing them again; a request that shares a system prompt with
earlier ones starts past it. A released block that holds a named prefix is kept, and
given to someone else only when no never-used block is left, least recently used first.

    free        never-named blocks with no owner: taken first
    evictable   named blocks with no owner, oldest use first: reused on a hit, else
                evicted (the name forgotten) when `free` runs out
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got num_blocks="
                             f"{num_blocks}, block_size={block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.prefix_caching = prefix_caching
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() takes block 0 first
        self.tables: dict[int, list[int]] = {}  # sequence id -> its blocks, in token order
        self.ref_counts = [0] * num_blocks  # owners of each block
        # prefix cache: name -> (block, its tokens, the name before it); and back
        self.named: dict[int, tuple[int, tuple[int, ...], int | None]] = {}
        self.name_of: dict[int, int] = {}  # block -> name
        self.evictable: OrderedDict[int, None] = OrderedDict()  # named, unowned; oldest first
        self.chains: dict[int, list[int]] = {}  # sequence id -> names of its full blocks
        self.prefix_lookups = 0  # full prompt blocks looked up
        self.prefix_hits = 0  # of those, found

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (never-named, or named but unowned)."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - self.available

    def can_hold(self, seq_id: int, n_tokens: int) -> bool:
        """Whether sequence `seq_id` can grow to `n_tokens` stored tokens with the free blocks."""
        have = len(self.tables.get(seq_id, ()))
        return self.blocks_for(n_tokens) - have <= self.available

    def reserve(self, seq_id: int, n_tokens: int) -> None:
        """Grow the block table of `seq_id` to hold `n_tokens` tokens."""
        if not self.can_hold(seq_id, n_tokens):
            raise RuntimeError(f"sequence {seq_id} needs {self.blocks_for(n_tokens)} blocks for "
                               f"{n_tokens} tokens, only {self.available} free; check "
                               "can_hold first and preempt a sequence to make room")
        table = self.tables.setdefault(seq_id, [])
        while len(table) < self.blocks_for(n_tokens):
            table.append(self._take())

    def _take(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.pop()
        else:  # evict the least recently used named block: its name is forgotten
            block, _ = self.evictable.popitem(last=False)
            del self.named[self.name_of.pop(block)]
        self.ref_counts[block] += 1
        return block

    def release(self, seq_id: int) -> None:
        """Give the blocks of `seq_id` back (finished or preempted); named ones stay findable."""
        self.chains.pop(seq_id, None)
        for block in reversed(self.tables.pop(seq_id, [])):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.name_of:
                    self.evictable[block] = None  # the most recently used end
                else:
                    self.free_blocks.append(block)

    # -- prefix caching ----------------------------------------------------------------

    def _name(self, parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def match_prefix(self, seq_id: int, tokens: list[int]) -> int:
        """For a sequence with no blocks yet: take the cached blocks of its longest named
        prefix, leaving at least its last token to compute (its logits are needed).
        Returns how many tokens are already computed."""
        if not self.prefix_caching or seq_id in self.tables:
            return 0
        table, chain, parent = [], [], None
        for i in range((len(tokens) - 1) // self.block_size):
            block_tokens = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            name = self._name(parent, block_tokens)
            self.prefix_lookups += 1
            entry = self.named.get(name)
            if entry is None or entry[1] != block_tokens or entry[2] != parent:
                self.prefix_lookups += (len(tokens) - 1) // self.block_size - i - 1
                break
            self.prefix_hits += 1
            block = entry[0]
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
            table.append(block)
            chain.append(name)
            parent = name
        if table:
            self.tables[seq_id], self.chains[seq_id] = table, chain
        return len(table) * self.block_size

    def fills_a_block(self, seq_id: int, n_computed: int) -> bool:
        """Whether `commit` has a block of `seq_id` to name (a cheap check before the caller
        gathers the sequence's tokens)."""
        return self.prefix_caching and n_computed // self.block_size > len(self.chains.get(seq_id, ()))

    def commit(self, seq_id: int, tokens: list[int], n_computed: int) -> None:
        """Name the blocks of `seq_id` that the first `n_computed` of `tokens` now fill, so
        later requests can find them. A block whose name another block already holds is
        left unnamed (it is freed as usual)."""
        if not self.prefix_caching:
            return
        chain = self.chains.setdefault(seq_id, [])
        table = self.tables[seq_id]
        for i in range(len(chain), n_computed // self.block_size):
            parent = chain[-1] if chain else None
            block_tokens = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            name = self._name(parent, block_tokens)
            block = table[i]
            if name not in self.named and block not in self.name_of:
                self.named[name] = (block, block_tokens, parent)
                self.name_of[block] = name
            chain.append(name)
