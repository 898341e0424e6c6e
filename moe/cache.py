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

from moe.attention import masked_attention
from moe.config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, self.max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, G, S, Dh]
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # [L, B, G, S, Dh]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """Write k, v [B, G, T, Dh] at `positions` [B, T], then attend q [B, H, T, Dh] over
        slots 0..position of each query."""
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
        return masked_attention(q, keys.to(q.dtype), values.to(q.dtype), mask)
