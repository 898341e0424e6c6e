"""KV caches: where the keys and values of tokens already seen are kept between steps.

Why a cache: without one, generating token t recomputes K and V for all t - 1 earlier
tokens. With one, each step computes K/V for its new tokens only, writes them, and
attends over what is stored.

`KVCache` is the simple contiguous layout (as in gpt-fast): one [B, G, S, Dh] buffer per
layer for K and for V, and slot s of a row holds position s. Because writes go by
position, each row may be at a different length, and rolling a sequence back (after a
rejected speculative proposal) costs nothing: the next write at an earlier position
overwrites, and a query at position p only ever looks at slots 0..p.

A cache serves attention through one method, `attend(layer, q, k, v, positions)`, so
other layouts (a paged pool of blocks for the serving engine) plug into the same model.

Shapes: L layers, B batch, G KV heads, S cache length, T new tokens, Dh head_dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.attention import PagedLayout, paged_layout
from kernels.ops import masked_attention, paged_attention
from moe.config import ModelConfig
from moe.serving.blocks import BlockManager


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, G, S, Dh]
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, G, S, Dh]
        # model.short_conv: each layer's convolution inputs (attention, and FFN with
        # short_conv_ffn) by position, for the taps that reach back past the new tokens;
        # written by position like K/V, so rollback is free. Row layer * sites + site.
        self.inputs = (torch.zeros(cfg.n_layers * cfg.conv_sites, batch_size, self.max_len, cfg.d_model,
                                   device=device, dtype=dtype)
                       if cfg.short_conv else None)  # [L * sites, B, S, D]

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only the cache rows `rows`, in that order (finished sequences dropped)."""
        index = torch.tensor(rows, device=self.k.device)
        self.k, self.v = self.k[:, index], self.v[:, index]
        if self.inputs is not None:
            self.inputs = self.inputs[:, index]

    def mix_inputs(self, row: int, h: Tensor, positions: Tensor, weight: Tensor) -> Tensor:
        """model.short_conv over a cache: write one site's inputs h [B, T, D] at
        `positions` [B, T], then h_t + sum_j weight[j] * h_(t-j) with the earlier inputs
        read back by position (none before position 0); weight [W, D]."""
        rows = torch.arange(h.shape[0], device=h.device)[:, None]  # [B, 1]
        self.inputs[row][rows, positions] = h.to(self.inputs.dtype)
        back = positions[..., None] - torch.arange(weight.shape[0], device=h.device)  # [B, T, W]
        taps = self.inputs[row][rows[..., None], back.clamp(min=0)].to(h.dtype)  # [B, T, W, D]
        taps = taps * (back >= 0)[..., None]
        return h + (taps * weight).sum(2)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Write k, v [B, G, T, Dh] at `positions` [B, T], then attend q [B, H, T, Dh] over
        slots 0..position of each query. Eager forwards read the slots up to the furthest
        position; a compiled one (moe/serving/static_decode.py) reads all max_len slots,
        masked, so its shapes never change and nothing waits for the host."""
        if torch.compiler.is_compiling():
            end = self.max_len  # the caller keeps positions inside the cache
        else:
            end = int(positions.max()) + 1
            if end > self.max_len or int(positions.min()) < 0:
                raise ValueError(f"position {end - 1} is outside this cache of {self.max_len} slots; "
                                 "make the cache (max_len) or model.max_seq_len larger")
        rows = torch.arange(q.shape[0], device=q.device)[:, None]  # [B, 1]
        # Advanced indices (rows, positions) around a slice put [B, T] first: [B, T, G, Dh].
        self.k[layer][rows, :, positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[layer][rows, :, positions] = v.transpose(1, 2).to(self.v.dtype)
        slots = torch.arange(end, device=q.device)  # [S]
        mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # [B, G, S, Dh]
        return masked_attention(q, keys, values, mask)  # kernels/ops.py


# ---------------------------------------------------------------------------------------
# Paged cache: one pool of fixed-size blocks, a block table per sequence (vLLM's layout)
# ---------------------------------------------------------------------------------------
#
# Why pages: a contiguous cache reserves max_seq_len slots per sequence up front, so most
# of it sits empty and the batch is capped by the worst case. With pages a sequence holds
# ceil(len / block_size) blocks taken from a shared free list as it grows, and gives them
# back the moment it finishes, so the pool fills with real tokens and more sequences fit.
# A block of `block_size` tokens costs 2 * L * block_size * G * Dh values: with multi-query
# attention (G = 1) the same memory holds n_heads times more tokens than multi-head would.
#
# A serving step runs one ragged batch: the new tokens of all B sequences flattened into
# tokens [1, N] at positions [1, N]. `set_layout` records where they go (slot mapping)
# and what each sequence may read (block tables, lengths, query offsets); `attend` writes
# the new K/V through the slot mapping and attends each query over its own sequence.
#
# More shapes: N new tokens in the step, NB blocks in the pool, bs block_size, MB blocks
# per table row.

def tap_slots(block_tables: Tensor, positions: Tensor, width: int, block_size: int) -> Tensor:
    """The pool slot of position - j (j < width) for each new token: block_tables [N, MB]
    (its sequence's), positions [N] -> [N, W]; positions before 0 read slot 0, masked later."""
    back = (positions.long()[:, None] - torch.arange(width, device=positions.device)).clamp(min=0)  # [N, W]
    block = block_tables.long().gather(1, back // block_size)  # [N, W]
    return block * block_size + back % block_size


def mix_pooled_inputs(pool: Tensor, slot_mapping: Tensor, slots: Tensor, h: Tensor, positions: Tensor,
                      weight: Tensor) -> Tensor:
    """Write one site's inputs h [N, D] at slot_mapping [N] of its pool
    [(NB + 1) * bs, D], then h + sum_j weight[j] * (input at position - j), read from
    slots [N, W] (none before position 0); weight [W, D]."""
    pool.index_copy_(0, slot_mapping, h.to(pool.dtype))
    taps = pool[slots].to(h.dtype)  # [N, W, D]
    before_start = positions.long()[:, None] - torch.arange(weight.shape[0], device=h.device) < 0  # [N, W]
    return h + (taps.masked_fill(before_start[..., None], 0) * weight).sum(1)


class PagedKVCache:
    """The pool's K/V tensors for every layer; which blocks belong to whom is the block
    manager's (moe/serving/blocks.py), passed to `set_layout` each step."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int = 16,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got num_blocks="
                             f"{num_blocks}, block_size={block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kernel_backend = cfg.kernel_backend  # which attention runs: kernels/ops.py
        # one block more than the block manager hands out: where the padding rows of a
        # static decode step write (PagedDecodeView), so they never touch a sequence's blocks
        self.scratch_slot = num_blocks * block_size
        shape = (cfg.n_layers, num_blocks + 1, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, NB + 1, bs, G, Dh]
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # [L, NB + 1, bs, G, Dh]
        # model.short_conv: each layer's convolution inputs in the same slots as K/V
        self.inputs = (torch.zeros(cfg.n_layers * cfg.conv_sites, (num_blocks + 1) * block_size, cfg.d_model,
                                   device=device, dtype=dtype)
                       if cfg.short_conv else None)  # [L * sites, (NB + 1) * bs, D]
        self.taps = cfg.short_conv  # W (0: no short convolution, nothing kept)
        self.layout: PagedLayout | None = None  # the step set by set_layout
        self.slot_mapping = torch.zeros(0, dtype=torch.long)  # [N] pool slot of each new token
        self.tap_slots = torch.zeros(0, self.taps, dtype=torch.long)  # [N, W] slot of position - j

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        inputs = cfg.d_model * cfg.conv_sites  # kept convolution inputs, per token
        return cfg.n_layers * block_size * (2 * cfg.n_kv_heads * cfg.head_dim + inputs) * element

    @classmethod
    def from_memory(cls, cfg: ModelConfig, budget_bytes: int, block_size: int = 16,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """As many blocks as fit in `budget_bytes` of K and V."""
        return cls(cfg, budget_bytes // cls.bytes_per_block(cfg, block_size, dtype), block_size,
                   device, dtype)

    def set_layout(self, blocks: BlockManager, seq_ids: list[int], query_lens: list[int],
                   seq_lens: list[int]) -> None:
        """Describe the next forward: sequence b brings query_lens[b] new tokens and will
        then hold seq_lens[b] tokens, in the blocks `blocks` has reserved for it."""
        if blocks.num_blocks != self.num_blocks or blocks.block_size != self.block_size:
            raise ValueError(f"block manager of {blocks.num_blocks} x {blocks.block_size} does not "
                             f"match this pool of {self.num_blocks} x {self.block_size}")
        self.layout = paged_layout([blocks.tables[s] for s in seq_ids], query_lens, seq_lens,
                                   self.block_size, self.k.device)
        # the pool slot of every new token, from the layout's tensors (no loop over tokens)
        new = torch.tensor(query_lens, device=self.k.device)  # [B]
        seq_of = torch.repeat_interleave(torch.arange(len(seq_ids), device=self.k.device), new)  # [N]
        first = self.layout.seq_lens.long() - new  # [B] position of each sequence's first new token
        position = first[seq_of] + torch.arange(len(seq_of), device=self.k.device) \
            - self.layout.query_start[:-1].long()[seq_of]  # [N]
        block = self.layout.block_tables[seq_of, position // self.block_size].long()  # [N]
        self.slot_mapping = block * self.block_size + position % self.block_size  # [N]
        if self.inputs is not None:
            self.tap_slots = tap_slots(self.layout.block_tables[seq_of], position, self.taps,
                                       self.block_size)  # [N, W]

    def mix_inputs(self, row: int, h: Tensor, positions: Tensor, weight: Tensor) -> Tensor:
        """KVCache.mix_inputs for the ragged step set by `set_layout`: h [1, N, D]."""
        return mix_pooled_inputs(self.inputs[row], self.slot_mapping, self.tap_slots, h[0], positions[0],
                                 weight)[None]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q [1, H, N, Dh], k and v [1, G, N, Dh] of the ragged step set by `set_layout`."""
        if q.shape[0] != 1 or q.shape[2] != self.slot_mapping.shape[0]:
            raise ValueError(f"a paged step runs one ragged row of {self.slot_mapping.shape[0]}"
                             f" tokens, got q of shape {tuple(q.shape)}; call set_layout first")
        k_pool, v_pool = self.k[layer], self.v[layer]  # [NB + 1, bs, G, Dh]
        k_pool.view(-1, *k_pool.shape[2:])[self.slot_mapping] = k[0].transpose(0, 1).to(k_pool.dtype)
        v_pool.view(-1, *v_pool.shape[2:])[self.slot_mapping] = v[0].transpose(0, 1).to(v_pool.dtype)
        out = paged_attention(q[0].transpose(0, 1), k_pool, v_pool, self.layout,
                              self.kernel_backend)  # [N, H, Dh], kernels/ops.py
        return out.transpose(0, 1)[None]  # [1, H, N, Dh]


class PagedDecodeView:
    """One decode step of B rows (one new token each) over a PagedKVCache's pool, with
    shapes that never change: B is the engine's slot count (padding rows write the scratch
    slot and read one masked key) and every block table is padded to the longest sequence,
    so one compiled graph serves every all-decode step (moe/serving/static_decode.py).

    slot_mapping [B] pool slot of each new token; block_tables [B, MB]; seq_lens [B]."""

    def __init__(self, cache: PagedKVCache, slot_mapping: Tensor, block_tables: Tensor, seq_lens: Tensor):
        self.cache, self.slot_mapping = cache, slot_mapping
        self.block_tables, self.seq_lens = block_tables, seq_lens

    def mix_inputs(self, row: int, h: Tensor, positions: Tensor, weight: Tensor) -> Tensor:
        """KVCache.mix_inputs for this step: h [B, 1, D] at positions [B, 1]."""
        slots = tap_slots(self.block_tables, positions[:, 0], self.cache.taps, self.cache.block_size)
        return mix_pooled_inputs(self.cache.inputs[row], self.slot_mapping, slots, h[:, 0], positions[:, 0],
                                 weight)[:, None]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q [B, H, 1, Dh], k and v [B, G, 1, Dh] -> [B, H, 1, Dh]."""
        k_pool, v_pool = self.cache.k[layer], self.cache.v[layer]  # [NB + 1, bs, G, Dh]
        k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, self.slot_mapping, k[:, :, 0].to(k_pool.dtype))
        v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, self.slot_mapping, v[:, :, 0].to(v_pool.dtype))
        keys = k_pool[self.block_tables].flatten(1, 2).transpose(1, 2)  # [B, G, MB * bs, Dh]
        values = v_pool[self.block_tables].flatten(1, 2).transpose(1, 2)
        slots = torch.arange(keys.shape[2], device=q.device)  # [S]
        mask = (slots[None, :] < self.seq_lens[:, None])[:, None, :]  # [B, 1, S]
        return masked_attention(q, keys, values, mask)  # kernels/ops.py
