"""Rotary positions and multi-query / grouped-query / multi-head attention.

Why multi-query attention: at decode time every step reads the whole KV cache, and the
cache, not the weights, is what caps the batch at long context. With G KV heads shared by
H query heads the cache shrinks by H / G; G = 1 (multi-query, as reported for GPT-4) is
the extreme. A query head h reads KV head h // (H // G); K and V are never repeated in
memory, the grouping is done by the attention call (`enable_gqa`).

Rotary embeddings use the "rotate half" layout (the first half of a head's channels pairs
with the second half), the convention of GPT-NeoX, LLaMA and Mixtral in Hugging Face
format, so their weights load without permuting rows. Angles are computed from the
positions we are given, per token, so every sequence in a batch can sit at its own
position (what continuous batching and speculative decoding need).

Shapes: B batch, T new tokens, S cached keys, D d_model, H query heads, G KV heads,
Dh head_dim.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from kernels.ops import causal_attention
from moe.config import ModelConfig
from moe.profiling import label


# ---------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------

def rope_angles(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotation for each position: positions [B, T] -> 2 x [B, T, Dh/2]."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=positions.device,
                                      dtype=torch.float32) / head_dim)  # [Dh/2]
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, Dh/2]
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Channel pairs (i, i + Dh/2) of x [B, heads, T, Dh] turned by the angles whose cos and
    sin are [B, 1, T, Dh/2]: four multiply-adds into one output, no temporaries."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    out1, out2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin)
    return out


class _Rope(torch.autograd.Function):
    """The rotation's gradient is the rotation back (by minus the angle): four
    multiply-adds, where autograd through the chunk-and-cat form takes twice as many
    passes over the tensor."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        cos, sin = ctx.saved_tensors
        return rotate(grad.contiguous(), cos, -sin), None, None


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + Dh/2) of x [B, heads, T, Dh] by the position's angle."""
    if torch.compiler.is_compiling():  # the compiler fuses the plain form (and refuses `out=` views)
        return apply_rope_reference(x, cos, sin)
    return _Rope.apply(x.float(), cos[:, None], sin[:, None]).to(x.dtype)


def apply_rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """apply_rope as the rotation is usually written (the specification the tests hold it to)."""
    x1, x2 = x.float().chunk(2, dim=-1)  # 2 x [B, heads, T, Dh/2]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh/2], broadcast over heads
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


# ---------------------------------------------------------------------------------------
# The attention layer
# ---------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Project to H query heads and G KV heads, rotate, attend, project back.

    With a cache, the cache does the attending: it stores the new K/V at their positions
    and attends over everything the sequence has stored so far. Any object with
    `attend(layer, q, k, v, positions) -> [B, H, T, Dh]` can serve (moe/serving/cache.py).
    Which attention kernel runs is decided in kernels/ops.py.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.kernel_backend = cfg.kernel_backend
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor,
                cache=None) -> Tensor:
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", h=self.n_heads)  # [B, H, T, Dh]
        k = rearrange(self.wk(x), "b t (g d) -> b g t d", g=self.n_kv_heads)  # [B, G, T, Dh]
        v = rearrange(self.wv(x), "b t (g d) -> b g t d", g=self.n_kv_heads)  # [B, G, T, Dh]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        with label("attention"):  # a profiler label (benchmarks/bench_decode.py)
            if cache is not None:  # the cache stores K/V and runs the paged or masked attention
                out = cache.attend(self.layer, q, k, v, positions)
            else:
                out = causal_attention(q, k, v, self.kernel_backend,
                                       self.dropout if self.training else 0.0)  # kernels/ops.py
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))  # [B, T, D]
