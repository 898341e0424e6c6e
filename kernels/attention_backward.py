"""Backward of the causal varlen flash attention, so training runs through the kernels.

What you will learn here: flash attention's backward (Dao et al., FlashAttention-2): the
T x T probabilities are never stored; each is recomputed from the saved per-row
log-sum-exp, P = exp(Q K^T * scale - lse), one tile at a time.

    forward (kernels/attention.py's kernel with STORE_LSE: lse = m + log(l) per row, head)

    delta = rowsum(dO * O)                                   # [N, H], once, in PyTorch

    dK/dV kernel, one program per (key block, KV head, sequence):
        for each query head h sharing this KV head:          # GQA/MQA reduced on chip
            for each query block i from the diagonal to the sequence end:
                P  = exp(Q_i K_j^T * scale - lse_i), masked causal and past the end
                dV_j += P^T dO_i
                dS = P * (dO_i V_j^T - delta_i)
                dK_j += dS^T Q_i * scale

    dQ kernel, one program per (query block, query head, sequence):
        for each key block j up to the diagonal:
            dQ_i += (P * (dO_i V_j^T - delta_i)) K_j * scale

Splitting dQ from dK/dV costs one more recomputation of P but needs no atomic adds, so
the result is deterministic. `varlen_causal_attention_trainable` wraps all three as one
`torch.autograd.Function`.

Shapes: N packed tokens, B sequences, H query heads, G KV heads, Dh head_dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.attention import (LOG2E, _varlen_causal_kernel, check_varlen_args, longest,
                               varlen_launch)
from kernels.triton_import import tl, triton


# ---------------------------------------------------------------------------------------
# dK and dV: one key block, all the query heads of its KV head
# ---------------------------------------------------------------------------------------

@triton.jit
def _varlen_dkdv_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, cu_seqlens_ptr,
    # sizes
    group_size, head_dim, scale,
    # strides (q and do share theirs; k, v, dk, dv theirs; lse and delta theirs)
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kg, stride_kd, stride_ln, stride_lh,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # ---- which sequence, which KV head, which key block ------------------------------
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    length = tl.load(cu_seqlens_ptr + seq + 1) - start
    if block * BLOCK_N >= length:
        return
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < length
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < head_dim
    kv_offsets = ((start + cols).to(tl.int64)[:, None] * stride_kn + kv_head * stride_kg
                  + ds[None, :] * stride_kd)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    # ---- every query head of the group, every query block from the diagonal ----------
    for head in range(kv_head * group_size, (kv_head + 1) * group_size):
        for m0 in range(block * BLOCK_N, length, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < length
            q_offsets = ((start + rows).to(tl.int64)[:, None] * stride_qn + head * stride_qh
                         + ds[None, :] * stride_qd)
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
            do = tl.load(do_ptr + q_offsets, mask=q_mask, other=0.0)
            stat_offsets = (start + rows).to(tl.int64) * stride_ln + head * stride_lh
            lse = tl.load(lse_ptr + stat_offsets, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + stat_offsets, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
            allowed = (cols[None, :] <= rows[:, None]) & row_ok[:, None] & col_ok[None, :]
            p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            d_s = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(d_s.to(q.dtype)), q, dk, input_precision=PRECISION)
    tl.store(dk_ptr + kv_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + kv_offsets, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


# ---------------------------------------------------------------------------------------
# dQ: one query block of one head, key blocks up to the diagonal
# ---------------------------------------------------------------------------------------

@triton.jit
def _varlen_dq_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, cu_seqlens_ptr,
    # sizes
    group_size, head_dim, scale,
    # strides (q, do, dq share theirs; k and v theirs; lse and delta theirs)
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kg, stride_kd, stride_ln, stride_lh,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # ---- which sequence, which query head, which query block -------------------------
    block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq)
    length = tl.load(cu_seqlens_ptr + seq + 1) - start
    if block * BLOCK_M >= length:
        return
    kv_head = head // group_size
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < head_dim
    q_offsets = ((start + rows).to(tl.int64)[:, None] * stride_qn + head * stride_qh
                 + ds[None, :] * stride_qd)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + q_offsets, mask=q_mask, other=0.0)
    do = tl.load(do_ptr + q_offsets, mask=q_mask, other=0.0)
    stat_offsets = (start + rows).to(tl.int64) * stride_ln + head * stride_lh
    lse = tl.load(lse_ptr + stat_offsets, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + stat_offsets, mask=row_ok, other=0.0)
    # ---- key blocks up to the diagonal ----------------------------------------------
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kv_base = kv_head * stride_kg + ds[None, :] * stride_kd
    for n0 in range(0, tl.minimum((block + 1) * BLOCK_M, length), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_offsets = (start + cols).to(tl.int64)[:, None] * stride_kn + kv_base
        kv_mask = (cols < length)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        allowed = (cols[None, :] <= rows[:, None]) & row_ok[:, None] & (cols < length)[None, :]
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        d_s = p * (dp - delta[:, None])
        dq = tl.dot(d_s.to(k.dtype), k, dq, input_precision=PRECISION)
    tl.store(dq_ptr + q_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ---------------------------------------------------------------------------------------
# Wrappers and the autograd Function
# ---------------------------------------------------------------------------------------

def backward_launch(max_len: int, head_dim: int, device: torch.device) -> dict:
    """Square tiles for the two backward kernels: 16 for short sequences, 64 on a GPU,
    32 in the interpreter (small test shapes). 64 with 4 warps was the fastest of
    `bench_kernels.py --sweep` on an H200 at head_dim 128 (8 warps, or 32-row tiles,
    were 1.3-1.7x slower)."""
    block = 16 if max_len <= 64 else (64 if device.type == "cuda" else 32)
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                num_warps=4, num_stages=2)


def varlen_attention_forward_lse(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                                 max_seqlen: int | None = None) -> tuple[Tensor, Tensor]:
    """Like `varlen_causal_attention_triton` (q [N, H, Dh], k, v [N, G, Dh]), and also the
    log-sum-exp of each query row's scaled scores: -> out [N, H, Dh], lse [N, H] float32."""
    check_varlen_args(q, k, v, cu_seqlens)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    n_tokens, n_heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.zeros(n_tokens, n_heads, device=q.device, dtype=torch.float32)
    max_len = longest(cu_seqlens, max_seqlen)
    config = varlen_launch(max_len, head_dim, q.dtype, q.device)
    if max_len:
        grid = (triton.cdiv(max_len, config["BLOCK_M"]), n_heads, cu_seqlens.shape[0] - 1)
        _varlen_causal_kernel[grid](
            q, k, v, out, lse, cu_seqlens, n_heads // k.shape[1], head_dim,
            LOG2E / math.sqrt(head_dim), *q.stride(), *k.stride(), *lse.stride(),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", STORE_LSE=True, **config)
    return out, lse


def varlen_attention_backward(d_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                              lse: Tensor, cu_seqlens: Tensor, max_seqlen: int | None = None,
                              launch: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `varlen_attention_forward_lse`'s out for d_out [N, H, Dh]
    -> dq [N, H, Dh], dk [N, G, Dh], dv [N, G, Dh]. Launches the two kernels and one
    torch reduction (delta); `launch` overrides `backward_launch`."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    d_out = d_out.contiguous()
    delta = (d_out.float() * out.float()).sum(dim=-1)  # [N, H]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    max_len = longest(cu_seqlens, max_seqlen)
    if not max_len:
        return dq, dk, dv
    config = dict(backward_launch(max_len, head_dim, q.device), **(launch or {}))
    n_seqs = cu_seqlens.shape[0] - 1
    sizes = (n_heads // n_kv_heads, head_dim, 1.0 / math.sqrt(head_dim))
    strides = (*q.stride(), *k.stride(), *lse.stride())
    meta = dict(config, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    _varlen_dkdv_kernel[(triton.cdiv(max_len, config["BLOCK_N"]), n_kv_heads, n_seqs)](
        q, k, v, d_out, lse, delta, dk, dv, cu_seqlens, *sizes, *strides, **meta)
    _varlen_dq_kernel[(triton.cdiv(max_len, config["BLOCK_M"]), n_heads, n_seqs)](
        q, k, v, d_out, lse, delta, dq, cu_seqlens, *sizes, *strides, **meta)
    return dq, dk, dv


class _TritonVarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        max_seqlen = longest(cu_seqlens, max_seqlen)
        out, lse = varlen_attention_forward_lse(q, k, v, cu_seqlens, max_seqlen)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        return out

    @staticmethod
    def backward(ctx, d_out):
        dq, dk, dv = varlen_attention_backward(d_out, *ctx.saved_tensors, ctx.max_seqlen)
        return dq, dk, dv, None, None


def varlen_causal_attention_trainable(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                                      max_seqlen: int | None = None) -> Tensor:
    """`varlen_causal_attention_triton` with a Triton backward: gradients reach q, k, v.
    Same arguments and result as `varlen_causal_attention_reference`; `max_seqlen` as in
    `varlen_causal_attention_triton`."""
    return _TritonVarlenAttention.apply(q, k, v, cu_seqlens, max_seqlen)
