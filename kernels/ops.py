"""One entry point per kernel operation: what the model and the caches call, and the one
place that decides which implementation runs.

Why one place: each operation has up to three implementations (the Triton forward, a
trainable Triton pair with its backward, the plain-PyTorch reference that specifies
both), and the choice depends on the backend setting, the device, the dtype and whether
autograd needs a gradient (kernels.backend). Deciding it here, once per operation, keeps
the model and the caches free of kernel plumbing, and every test of "the switch picks
Triton" tests the same code the model runs.

    causal_attention   padded [B, H, T, Dh] batches, training and whole-prompt forwards
    varlen_attention   packed ragged sequences (cu_seqlens)
    paged_attention    a ragged serving step over a paged KV cache (PagedLayout)
    masked_attention   the contiguous cache: any [B, T, S] mask (reference only)
    expert_dispatch    tokens through their K experts, weighted and summed (Triton, the
                       sorted reference; CPU training the grouped-matmul form; at
                       inference, for a few tokens the dense form, in a compiled graph
                       the gathered one)

Shapes: B batch, T tokens, H query heads, G KV heads, Dh head_dim, N tokens, K experts per
token, D d_model, F expert width, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from kernels.attention import PagedLayout
from kernels.attention import masked_attention as masked_attention_reference
from kernels.attention import (paged_attention_grouped, paged_attention_triton,
                               varlen_causal_attention_reference, varlen_causal_attention_triton)
from kernels.attention_backward import varlen_causal_attention_trainable
from kernels.backend import needs_grad, use_triton
from kernels.moe_dispatch import (dispatch_and_combine, dispatch_and_combine_triton, dispatch_dense,
                                  dispatch_gathered, dispatch_grouped)
from kernels.moe_dispatch_backward import dispatch_and_combine_trainable


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, backend: str,
                     max_seqlen: int | None = None) -> Tensor:
    """Causal attention over packed ragged sequences: q [N, H, Dh], k and v [N, G, Dh],
    cu_seqlens int32 [B + 1] -> [N, H, Dh]. Triton (with its backward when autograd needs
    one) or the per-sequence reference."""
    if use_triton(backend, q, k, v, has_backward=True):
        attend = (varlen_causal_attention_trainable if needs_grad(q, k, v)
                  else varlen_causal_attention_triton)
        return attend(q, k, v, cu_seqlens, max_seqlen)
    return varlen_causal_attention_reference(q, k, v, cu_seqlens)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str, dropout: float = 0.0) -> Tensor:
    """q [B, H, T, Dh], k and v [B, G, T, Dh] -> [B, H, T, Dh]; token t sees tokens <= t.
    On the Triton path the B rows become B packed sequences of length T (no host sync);
    otherwise, and whenever attention dropout is on, PyTorch's SDPA."""
    if dropout == 0.0 and use_triton(backend, q, k, v, has_backward=True):
        batch, length = q.shape[0], q.shape[2]
        cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32,
                                  device=q.device)  # [B + 1]
        out = varlen_attention(rearrange(q, "b h t d -> (b t) h d"),
                               rearrange(k, "b g t d -> (b t) g d"),
                               rearrange(v, "b g t d -> (b t) g d"), cu_seqlens, backend, length)
        return rearrange(out, "(b t) h d -> b h t d", b=batch)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                          enable_gqa=True)


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, layout: PagedLayout,
                    backend: str) -> Tensor:
    """The new queries q [N, H, Dh] of a ragged step over pools k_pool, v_pool
    [NB, bs, G, Dh] laid out by `layout` -> [N, H, Dh]. Triton (the split-key decode
    kernel, or the flash kernel for prefill chunks) when no gradient is needed, else the
    reference, one padded attention per query length."""
    if use_triton(backend, q, k_pool):
        return paged_attention_triton(q, k_pool, v_pool, layout.block_tables, layout.seq_lens,
                                      layout.query_start, layout.max_query_len)
    return paged_attention_grouped(q, k_pool, v_pool, layout)


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [B, H, T, Dh], k and v [B, G, S, Dh], mask [B, T, S] (True = may attend); no
    kernel of ours: SDPA with the mask."""
    return masked_attention_reference(q, k.to(q.dtype), v.to(q.dtype), mask)


def expert_dispatch(x: Tensor, expert_ids: Tensor, weights: Tensor, w_in: Tensor, w_out: Tensor,
                    capacity: int | None, backend: str) -> tuple[Tensor, Tensor]:
    """x [N, D] through experts expert_ids [N, K] with weights [N, K], experts stacked in
    w_in [E, D, 2F] and w_out [E, F, D] -> (y [N, D], dropped slots). Under autocast the
    experts run in its dtype, as nn.Linear would: bf16 operands on the tensor cores with
    fp32 accumulators, rather than fp32 through FMA units."""
    dtype = (torch.get_autocast_dtype(x.device.type)
             if torch.is_autocast_enabled(x.device.type) else x.dtype)
    x, weights = x.to(dtype), weights.to(dtype)
    w_in, w_out = w_in.to(dtype), w_out.to(dtype)
    inference = capacity is None and not needs_grad(x, weights, w_in, w_out)
    if inference and torch.compiler.is_compiling():
        # a compiled decode step (moe/serving/static_decode.py): plain tensor ops, which the
        # compiler fuses on any device, rather than a Python loop or a kernel launch of ours
        return dispatch_gathered(x, expert_ids, weights, w_in, w_out)
    if use_triton(backend, x, w_in, has_backward=True):
        dispatch = (dispatch_and_combine_trainable if needs_grad(x, weights, w_in, w_out)
                    else dispatch_and_combine_triton)
        return dispatch(x, expert_ids, weights, w_in, w_out, capacity)
    if inference and few_tokens_small_experts(x.shape[0], w_in, w_out):
        return dispatch_dense(x, expert_ids, weights, w_in, w_out)
    if not inference and x.device.type == "cpu" and not torch.compiler.is_compiling():
        # CPU training (F.grouped_mm has no compiled CPU form in torch 2.13)
        return dispatch_grouped(x, expert_ids, weights, w_in, w_out, capacity)
    return dispatch_and_combine(x, expert_ids, weights, w_in, w_out, capacity)


DENSE_MAX_PAIRS = 1024  # token x expert products the dense form may compute (N x E)
DENSE_MAX_WEIGHTS = 4 * 2**20  # expert weights of one layer (16 MB in float32)


def few_tokens_small_experts(n_tokens: int, w_in: Tensor, w_out: Tensor) -> bool:
    """Whether running every expert on every token beats the sorted dispatch: few tokens
    (N x E <= 1024) through a layer whose experts are small (<= 4M weights in all). On 2 CPU
    threads with 16 experts of 128 x 128 the dense form takes about a quarter of the sorted
    one's time for 8 tokens, under half for 64, and loses at 256
    (benchmarks/results/decode_cpu.json); a large layer's experts cost their bytes, and
    there the sorted form reads only the chosen ones."""
    return (n_tokens * w_in.shape[0] <= DENSE_MAX_PAIRS
            and w_in.numel() + w_out.numel() <= DENSE_MAX_WEIGHTS)
