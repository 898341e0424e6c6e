"""Attention kernels: causal prefill over packed ragged sequences, and paged decoding.

What you will learn here: flash attention (never materialise the T x T score matrix;
keep a running max and sum per query row, the "online softmax") in two settings.

1. `varlen_causal_attention`: B sequences of different lengths packed back to back into
   N rows, sequence b at rows cu_seqlens[b] .. cu_seqlens[b+1]. One program per (query
   block, query head, sequence):

       q = Q[block]                                   # [BLOCK_M, Dh], kept on chip
       m, l, acc = -inf, 0, 0                         # fp32 row max, row sum, output
       for each key block j up to the diagonal:
           s = q @ K[j].T * scale, masked causal and past the sequence end
           m_new = max(m, rowmax(s));  p = exp(s - m_new)
           l = l * exp(m - m_new) + rowsum(p);  acc = acc * exp(m - m_new) + p @ V[j]
           m = m_new
       O[block] = acc / l

   Query head h reads KV head h // (H // G): multi-query and grouped-query attention
   cost no copy of K and V. Lengths need not be block multiples (masks on every load).
   With STORE_LSE the kernel also stores lse = m + log(l) per query row and head, what
   the backward (kernels/attention_backward.py) recomputes the probabilities from.

2. `paged_attention`: a few new queries per sequence (decode, or a speculative check)
   against keys stored in a pool of fixed-size blocks, found through a block table. With
   one query per sequence there is little parallelism across queries, so the key range is
   split (flash-decoding): each program runs the loop above over one slice of the keys and
   writes a partial (m, l, acc); a second kernel merges the slices:

       M = max_s m_s;  O = sum_s acc_s * exp(m_s - M) / sum_s l_s * exp(m_s - M)

   The queries of sequence b are its last query_start[b+1] - query_start[b] tokens and
   see the keys up to their own position (causal among themselves).

Each function has a plain-PyTorch reference with the same signature (`*_reference`), its
specification; `varlen_causal_attention` and `paged_attention` pick one per call through
`kernels.backend`.

Shapes: N packed tokens, B sequences, H query heads, G KV heads, Dh head_dim,
NB pool blocks, bs block_size, MB blocks per table row, Nq queries, SP key splits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.backend import KERNEL_DTYPES, use_triton
from kernels.triton_import import tl, triton


# ---------------------------------------------------------------------------------------
# References (the specifications)
# ---------------------------------------------------------------------------------------

def varlen_causal_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """q [N, H, Dh], k and v [N, G, Dh], cu_seqlens int32 [B + 1] -> [N, H, Dh]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            seq = F.scaled_dot_product_attention(  # [1, H, T, Dh]
                q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
                v[start:end].transpose(0, 1)[None], is_causal=True, enable_gqa=True)
            out[start:end] = seq[0].transpose(0, 1)
    return out


def paged_attention_reference(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                              seq_lens: Tensor, query_start: Tensor) -> Tensor:
    """q [Nq, H, Dh]; k_pool, v_pool [NB, bs, G, Dh]; block_tables int32 [B, MB]; seq_lens
    int32 [B] (keys stored, the new ones included); query_start int32 [B + 1] -> [Nq, H, Dh].
    One sequence at a time: gather its keys, attend its queries with a causal offset."""
    out = torch.empty_like(q)
    block_size = k_pool.shape[1]
    for b, (length, start, end) in enumerate(zip(seq_lens.tolist(), query_start[:-1].tolist(),
                                                 query_start[1:].tolist())):
        if end == start:
            continue
        blocks = block_tables[b, :-(-length // block_size)].long()
        keys = k_pool[blocks].flatten(0, 1)[:length]  # [S, G, Dh]
        values = v_pool[blocks].flatten(0, 1)[:length]  # [S, G, Dh]
        query_pos = length - (end - start) + torch.arange(end - start, device=q.device)  # [T]
        mask = torch.arange(length, device=q.device)[None, :] <= query_pos[:, None]  # [T, S]
        seq = F.scaled_dot_product_attention(  # [H, T, Dh]
            q[start:end].transpose(0, 1), keys.transpose(0, 1).to(q.dtype),
            values.transpose(0, 1).to(q.dtype), attn_mask=mask, enable_gqa=True)
        out[start:end] = seq.transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------
# Prefill kernel: packed ragged sequences, causal, online softmax
# ---------------------------------------------------------------------------------------

@triton.jit
def _varlen_causal_kernel(
    # pointers (lse_ptr is only written with STORE_LSE; pass any pointer, e.g. o, without)
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_seqlens_ptr,
    # sizes
    group_size, head_dim, scale,
    # strides (q and o share theirs; k and v share theirs; lse [N, H] its own)
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kg, stride_kd, stride_ln, stride_lh,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, STORE_LSE: tl.constexpr,
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
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # ---- online softmax over key blocks up to the diagonal ---------------------------
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kv_base = kv_head * stride_kg + ds[None, :] * stride_kd
    end = tl.minimum((block + 1) * BLOCK_M, length)
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_offsets = (start + cols).to(tl.int64)[:, None] * stride_kn + kv_base
        kv_mask = (cols < length)[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_M, BLOCK_N]
        allowed = (cols[None, :] <= rows[:, None]) & (cols < length)[None, :]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        correction = tl.exp(m - m_new)
        l = l * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    # ---- normalise and store; the log-sum-exp too when the backward needs it ---------
    l = tl.where(row_ok, l, 1.0)
    out = acc / l[:, None]
    tl.store(o_ptr + q_offsets, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        tl.store(lse_ptr + (start + rows).to(tl.int64) * stride_ln + head * stride_lh,
                 m + tl.log(l), mask=row_ok)


def varlen_causal_attention_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """The Triton path of `varlen_causal_attention_reference`: same arguments, same result."""
    n_tokens, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if k.shape != (n_tokens, n_kv_heads, head_dim) or v.shape != k.shape or n_heads % n_kv_heads:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be "
                         "[N, H, Dh], [N, G, Dh], [N, G, Dh] with G dividing H")
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of {KERNEL_DTYPES}, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}; use varlen_causal_attention_reference for others")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be int32 [B + 1], got {cu_seqlens.dtype} "
                         f"{tuple(cu_seqlens.shape)}; build it with .to(torch.int32)")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # one stride set per pair
    out = torch.empty_like(q)
    n_seqs = cu_seqlens.shape[0] - 1
    max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if n_seqs else 0
    block_m = block_n = 16 if max_len <= 64 else 64
    grid = (triton.cdiv(max_len, block_m), n_heads, n_seqs)
    if max_len:
        _varlen_causal_kernel[grid](
            q, k, v, out, out, cu_seqlens,  # out stands in for lse_ptr: nothing stored there
            n_heads // n_kv_heads, head_dim, 1.0 / math.sqrt(head_dim),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), 0, 0,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", STORE_LSE=False)
    return out


# ---------------------------------------------------------------------------------------
# Decode kernels: paged keys, the key range split over programs, then merged
# ---------------------------------------------------------------------------------------

@triton.jit
def _paged_split_kernel(
    # pointers
    q_ptr, k_pool_ptr, v_pool_ptr, block_tables_ptr, query_seq_ptr, query_pos_ptr,
    m_ptr, l_ptr, acc_ptr,
    # sizes
    group_size, head_dim, block_size, split_len, scale,
    # strides
    stride_qn, stride_qh, stride_qd, stride_pb, stride_ps, stride_pg, stride_pd, stride_tb,
    stride_mn, stride_mh, stride_an, stride_ah, stride_as,
    # meta-parameters
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ---- which query, which head, which slice of the keys ----------------------------
    query = tl.program_id(0)
    head = tl.program_id(1)
    split = tl.program_id(2)
    seq = tl.load(query_seq_ptr + query).to(tl.int64)
    n_keys = tl.load(query_pos_ptr + query) + 1  # causal: keys 0 .. own position
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_keys)
    kv_head = head // group_size
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < head_dim
    q = tl.load(q_ptr + query * stride_qn + head * stride_qh + ds * stride_qd, mask=d_ok,
                other=0.0).to(tl.float32)
    # ---- online softmax over this slice; keys found through the block table ----------
    m = float("-inf")
    l = 0.0
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        blocks = tl.load(block_tables_ptr + seq * stride_tb + cols // block_size, mask=col_ok,
                         other=0).to(tl.int64)
        offsets = (blocks * stride_pb + (cols % block_size) * stride_ps + kv_head * stride_pg)[:, None] \
            + ds[None, :] * stride_pd
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_pool_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_pool_ptr + offsets, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(col_ok, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))  # [BLOCK_N]
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        correction = tl.exp(m - m_new)
        l = l * correction + tl.sum(p, axis=0)
        acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    # ---- partial result of this slice (m = -inf, l = 0 when the slice is empty) ------
    tl.store(m_ptr + query * stride_mn + head * stride_mh + split, m)
    tl.store(l_ptr + query * stride_mn + head * stride_mh + split, l)
    tl.store(acc_ptr + query * stride_an + head * stride_ah + split * stride_as + ds, acc, mask=d_ok)


@triton.jit
def _paged_merge_kernel(
    # pointers
    m_ptr, l_ptr, acc_ptr, o_ptr,
    # sizes
    n_splits, head_dim,
    # strides
    stride_mn, stride_mh, stride_an, stride_ah, stride_as, stride_on, stride_oh, stride_od,
    # meta-parameters
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # ---- the partials of one (query, head) -------------------------------------------
    query = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < n_splits
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < head_dim
    base = query * stride_mn + head * stride_mh + splits
    m = tl.load(m_ptr + base, mask=split_ok, other=float("-inf"))
    l = tl.load(l_ptr + base, mask=split_ok, other=0.0)
    acc = tl.load(acc_ptr + query * stride_an + head * stride_ah + splits[:, None] * stride_as
                  + ds[None, :], mask=split_ok[:, None] & d_ok[None, :], other=0.0)
    # ---- rescale every slice to the common max and normalise -------------------------
    m_all = tl.max(m, axis=0)  # finite: the first slice always holds key 0
    scale = tl.exp(m - m_all)
    out = tl.sum(acc * scale[:, None], axis=0) / tl.sum(l * scale, axis=0)
    tl.store(o_ptr + query * stride_on + head * stride_oh + ds * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=d_ok)


def paged_attention_triton(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, query_start: Tensor,
                           split_len: int | None = None) -> Tensor:
    """The Triton path of `paged_attention_reference`: same arguments, same result.
    `split_len` (keys per program, a multiple of 16) defaults to enough slices to give the
    GPU a few hundred programs."""
    n_queries, n_heads, head_dim = q.shape
    n_kv_heads, block_size = k_pool.shape[2], k_pool.shape[1]
    if k_pool.shape[3] != head_dim or v_pool.shape != k_pool.shape or n_heads % n_kv_heads:
        raise ValueError(f"q {tuple(q.shape)}, k_pool {tuple(k_pool.shape)}, v_pool "
                         f"{tuple(v_pool.shape)} must be [Nq, H, Dh] and [NB, bs, G, Dh] with "
                         "G dividing H")
    if q.dtype not in KERNEL_DTYPES or k_pool.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q and the pools must be in {KERNEL_DTYPES}, got {q.dtype}, "
                         f"{k_pool.dtype}; use paged_attention_reference for others")
    if v_pool.stride() != k_pool.stride():
        raise ValueError("k_pool and v_pool must share one memory layout (strides); "
                         "make both contiguous")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_start", query_start)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}; convert with .to(torch.int32)")
    # Per query: its sequence and its position (on the device, no host sync).
    query_ids = torch.arange(n_queries, device=q.device)  # [Nq]
    query_seq = torch.searchsorted(query_start[1:], query_ids.to(torch.int32), right=True)  # [Nq]
    query_pos = (seq_lens[query_seq] - query_start[query_seq + 1] + query_ids).to(torch.int32)
    max_keys = block_tables.shape[1] * block_size
    if split_len is None:
        step = 64 if max_keys >= 512 else 16  # keys per loop step: wider tiles for long contexts
        wanted = min(triton.cdiv(max_keys, step), 64,  # the merge holds [splits, Dh] on chip
                     max(1, 512 // max(1, n_queries * n_heads)))
        split_len = triton.cdiv(triton.cdiv(max_keys, wanted), step) * step
    if split_len % 16:
        raise ValueError(f"split_len must be a multiple of 16, got {split_len}")
    block_n = 64 if split_len % 64 == 0 else 16
    n_splits = triton.cdiv(max_keys, split_len)
    m = torch.empty(n_queries, n_heads, n_splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(n_queries, n_heads, n_splits, head_dim, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if n_queries:
        _paged_split_kernel[(n_queries, n_heads, n_splits)](
            q, k_pool, v_pool, block_tables, query_seq, query_pos, m, l, acc,
            n_heads // n_kv_heads, head_dim, block_size, split_len, 1.0 / math.sqrt(head_dim),
            q.stride(0), q.stride(1), q.stride(2), *k_pool.stride(), block_tables.stride(0),
            m.stride(0), m.stride(1), acc.stride(0), acc.stride(1), acc.stride(2),
            BLOCK_N=block_n, BLOCK_D=block_d)
        _paged_merge_kernel[(n_queries, n_heads)](
            m, l, acc, out, n_splits, head_dim,
            m.stride(0), m.stride(1), acc.stride(0), acc.stride(1), acc.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=block_d)
    return out


# ---------------------------------------------------------------------------------------
# The switch: one name per operation, the backend picked per call
# ---------------------------------------------------------------------------------------

def varlen_causal_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                            backend: str = "auto") -> Tensor:
    """Causal attention over packed ragged sequences; `backend` as in kernels.backend."""
    if use_triton(backend, q, k, v):
        return varlen_causal_attention_triton(q, k, v, cu_seqlens)
    return varlen_causal_attention_reference(q, k, v, cu_seqlens)


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                    seq_lens: Tensor, query_start: Tensor, backend: str = "auto") -> Tensor:
    """Attention of new queries over a paged KV cache; `backend` as in kernels.backend."""
    fn = paged_attention_triton if use_triton(backend, q, k_pool) else paged_attention_reference
    return fn(q, k_pool, v_pool, block_tables, seq_lens, query_start)
