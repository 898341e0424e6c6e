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

   The kernels work in base 2 (exp2, log2(e) folded into the scale), and key blocks
   below the diagonal skip the causal mask: only the diagonal blocks pay for it.

   Query head h reads KV head h // (H // G): multi-query and grouped-query attention
   cost no copy of K and V. Lengths need not be block multiples (masks on every load).
   With STORE_LSE the kernel also stores lse = m + log(l) per query row and head, what
   the backward (kernels/attention_backward.py) recomputes the probabilities from.

2. `paged_attention`: a few new queries per sequence (decode, or a speculative check)
   against keys stored in a pool of fixed-size blocks, found through a block table. With
   one query per sequence there is little parallelism across queries, so the key range is
   split (flash-decoding): one program per (query, KV head, slice) runs the loop above for
   all the query heads of its KV head at once (a [group, keys] tile on the tensor cores,
   so each key is read once per query, not once per head) and writes a partial
   (m, l, acc); a second kernel merges the slices:

       M = max_s m_s;  O = sum_s acc_s * exp(m_s - M) / sum_s l_s * exp(m_s - M)

   The queries of sequence b are its last query_start[b+1] - query_start[b] tokens and
   see the keys up to their own position (causal among themselves).

   A prefill chunk of hundreds of queries would read every key once per query that way,
   so from FLASH_MIN_QUERIES new queries in one sequence `paged_attention_triton` runs
   the prefill loop of (1) instead, over blocks of the chunk's queries, with each key
   block found through the block table (`paged_prefill_triton`).

Each function has a plain-PyTorch reference with the same signature (`*_reference`), its
specification, and the paged one a batched form (`paged_attention_batched`, grouped by
query length in `paged_attention_grouped`) that the engine runs off CUDA. Which one runs
is decided in one place, kernels/ops.py.

Shapes: N packed tokens, B sequences, H query heads, G KV heads, Dh head_dim,
NB pool blocks, bs block_size, MB blocks per table row, Nq queries, SP key splits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.backend import KERNEL_DTYPES
from kernels.triton_import import tl, triton

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): folded into the scale


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


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """q [B, H, T, Dh], k and v [B, G, S, Dh], mask [B, T, S] (True = may attend): the
    contiguous cache's attention, and the padded form of every reference below."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)


def ragged_plan(seq_lens: Tensor, query_start: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Where each of the N queries sits in a padded [B, Q] grid, and what it may read of a
    padded [B, width] key row: (seq_of [N], index [N], mask [B, Q, width]). The same for
    every layer, so a step computes it once."""
    query_lens = (query_start[1:] - query_start[:-1]).long()  # [B]
    n_tokens = int(query_start[-1])
    seq_of = torch.repeat_interleave(torch.arange(len(query_lens), device=seq_lens.device), query_lens)  # [N]
    index = torch.arange(n_tokens, device=seq_lens.device) - query_start[seq_of].long()  # [N]
    query_pos = seq_lens[seq_of].long() - query_lens[seq_of] + index  # [N]
    padded_pos = torch.zeros(len(query_lens), int(query_lens.max()), dtype=torch.long,
                             device=seq_lens.device)  # [B, Q]; padding queries sit at 0: finite, dropped
    padded_pos[seq_of, index] = query_pos
    slots = torch.arange(width, device=seq_lens.device)  # [S]
    return seq_of, index, slots[None, None, :] <= padded_pos[:, :, None]  # mask [B, Q, S]


def paged_attention_planned(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                            plan: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """`paged_attention_batched` with the layout already worked out by `ragged_plan`."""
    seq_of, index, mask = plan
    padded_q = q.new_zeros(mask.shape[0], mask.shape[1], *q.shape[1:])  # [B, Q, H, Dh]
    padded_q[seq_of, index] = q
    keys = k_pool[block_tables.long()].flatten(1, 2)  # [B, MB * bs, G, Dh]
    values = v_pool[block_tables.long()].flatten(1, 2)  # [B, MB * bs, G, Dh]
    out = masked_attention(padded_q.transpose(1, 2), keys.transpose(1, 2).to(q.dtype),
                           values.transpose(1, 2).to(q.dtype), mask)  # [B, H, Q, Dh]
    return out.transpose(1, 2)[seq_of, index]  # [N, H, Dh]


def paged_attention_batched(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                            seq_lens: Tensor, query_start: Tensor) -> Tensor:
    """`paged_attention_reference` without a loop over sequences: gather every sequence's
    blocks into a padded [B, MB * bs] key row and run one masked attention."""
    plan = ragged_plan(seq_lens, query_start, block_tables.shape[1] * k_pool.shape[1])
    return paged_attention_planned(q, k_pool, v_pool, block_tables, plan)


@dataclass
class PagedLayout:
    """One ragged step over a paged cache, as the attention needs it: what each sequence
    may read (block_tables int32 [B, MB], seq_lens int32 [B], query_start int32 [B + 1]),
    the longest chunk (picks the Triton kernel without a host sync) and, for the reference
    path, one padded attention per query length (`groups`: query indices [Nq_g], block
    tables [B_g, MB_g], ragged_plan). Built once per step by `paged_layout`, used by
    every layer."""
    block_tables: Tensor
    seq_lens: Tensor
    query_start: Tensor
    max_query_len: int
    groups: list[tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]]


def paged_layout(tables: list[list[int]], query_lens: list[int], seq_lens: list[int],
                 block_size: int, device: torch.device | str) -> PagedLayout:
    """The layout of a step in which sequence b holds blocks tables[b], brings query_lens[b]
    new tokens and then holds seq_lens[b] tokens. The reference groups make a 240-token
    prefill chunk beside 15 decodes cost a 240 x 240 and a 15 x 1 x S score grid, not
    16 x 240 x 240."""
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables],
                                dtype=torch.int32)  # [B, MB]; padding -> block 0
    starts = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    by_length: dict[int, list[int]] = {}
    for b, n_new in enumerate(query_lens):
        if n_new:  # a sequence with no new token has nothing to attend
            by_length.setdefault(n_new, []).append(b)
    groups = []
    for n_new, members in by_length.items():
        index = (starts[members][:, None] + torch.arange(n_new)).reshape(-1)  # [B_g * n_new] query rows
        group_width = max(len(tables[b]) for b in members)
        group_starts = torch.arange(0, (len(members) + 1) * n_new, n_new, dtype=torch.int32,
                                    device=device)  # [B_g + 1]
        groups.append((index.to(device), block_tables[members, :group_width].to(device),
                       ragged_plan(lens[members], group_starts, group_width * block_size)))
    return PagedLayout(block_tables.to(device), lens, starts.to(device), max(query_lens, default=0),
                       groups)


def paged_attention_grouped(q: Tensor, k_pool: Tensor, v_pool: Tensor, layout: PagedLayout) -> Tensor:
    """The reference path the engine runs off CUDA: `paged_attention_planned` once per
    query length of the step (`layout.groups`). q [N, H, Dh] -> [N, H, Dh]."""
    out = torch.empty_like(q)
    for index, tables, plan in layout.groups:
        out[index] = paged_attention_planned(q[index], k_pool, v_pool, tables, plan)
    return out


# ---------------------------------------------------------------------------------------
# Prefill kernel: packed ragged sequences, causal, online softmax
# ---------------------------------------------------------------------------------------

@triton.jit
def _online_softmax_step(q, k_ptr, v_ptr, kv_offsets, kv_mask, rows, cols, length, m, l, acc,
                         scale_log2, PRECISION: tl.constexpr, DIAGONAL: tl.constexpr):
    """One key block of the online softmax, in base 2 (log2(e) is in `scale_log2`).
    Off the diagonal every key is below every query row and inside the sequence, so only
    DIAGONAL blocks pay for the causal mask."""
    k = tl.load(k_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
    v = tl.load(v_ptr + kv_offsets, mask=kv_mask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    if DIAGONAL:
        allowed = (cols[None, :] <= rows[:, None]) & (cols < length)[None, :]
        s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    correction = tl.exp2(m - m_new)
    l = l * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def _varlen_causal_kernel(
    # pointers (lse_ptr is only written with STORE_LSE; pass any pointer, e.g. o, without)
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_seqlens_ptr,
    # sizes
    group_size, head_dim, scale_log2,
    # strides (q and o share theirs; k and v share theirs; lse [N, H] its own)
    stride_qn, stride_qh, stride_qd, stride_kn, stride_kg, stride_kd, stride_ln, stride_lh,
    # meta-parameters (BLOCK_M a multiple of BLOCK_N)
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
    # ---- online softmax: key blocks below the diagonal unmasked, then the diagonal ----
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kv_base = kv_head * stride_kg + ds[None, :] * stride_kd
    diagonal = block * BLOCK_M
    for n0 in range(0, diagonal, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_offsets = (start + cols).to(tl.int64)[:, None] * stride_kn + kv_base
        m, l, acc = _online_softmax_step(q, k_ptr, v_ptr, kv_offsets, d_ok[None, :], rows, cols,
                                         length, m, l, acc, scale_log2, PRECISION, False)
    for n0 in range(diagonal, tl.minimum(diagonal + BLOCK_M, length), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        kv_offsets = (start + cols).to(tl.int64)[:, None] * stride_kn + kv_base
        kv_mask = (cols < length)[:, None] & d_ok[None, :]
        m, l, acc = _online_softmax_step(q, k_ptr, v_ptr, kv_offsets, kv_mask, rows, cols,
                                         length, m, l, acc, scale_log2, PRECISION, True)
    # ---- normalise and store; the log-sum-exp too when the backward needs it ---------
    l = tl.where(row_ok, l, 1.0)
    out = acc / l[:, None]
    tl.store(o_ptr + q_offsets, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    if STORE_LSE:  # natural log (m is base 2: times ln 2), as the backward expects
        tl.store(lse_ptr + (start + rows).to(tl.int64) * stride_ln + head * stride_lh,
                 m * 0.6931471805599453 + tl.log(l), mask=row_ok)


def check_varlen_args(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> None:
    """Refuse, by name, what the varlen kernels cannot take."""
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


def longest(cu_seqlens: Tensor, max_seqlen: int | None) -> int:
    """The longest sequence: `max_seqlen` when the caller knows it (no host sync), else
    read from cu_seqlens (one sync)."""
    if max_seqlen is not None:
        return max_seqlen
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.shape[0] > 1 else 0


@functools.cache
def device_limits(device: torch.device) -> tuple[int, int]:
    """(multiprocessors, shared-memory bytes one program may use) of `device`, read once;
    off CUDA (the interpreter) an H100's figures, so the launch tables stay the same."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 232448)
    return 132, 232448


def varlen_launch(max_len: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles, warps and pipeline depth for the varlen forward, per shape and dtype: wide
    query tiles for long sequences on a GPU (few programs re-read K/V), 16-row tiles for
    short ones and for the interpreter; halved until the pipelined K/V tiles and the
    query tile fit the device's shared memory (fp32 at head_dim 128 and above would not)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if max_len <= 64:
        config = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
    elif device.type != "cuda":
        config = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    else:
        config = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if block_d >= 128 else 4, num_stages=3)
    size = dtype.itemsize
    limit = device_limits(device)[1]

    def needs(c):  # q tile + pipelined K and V tiles
        return (c["BLOCK_M"] + 2 * c["num_stages"] * c["BLOCK_N"]) * block_d * size
    while needs(config) > limit and config["BLOCK_N"] > 16:
        config.update(BLOCK_M=max(16, config["BLOCK_M"] // 2), BLOCK_N=config["BLOCK_N"] // 2,
                      num_stages=max(1, config["num_stages"] - 1))
    if needs(config) > limit:
        raise ValueError(f"head_dim {head_dim} in {dtype} needs {needs(config)} B of shared memory "
                         f"even at 16-row tiles, over this device's {limit} B; use bf16/fp16 or "
                         "the reference backend")
    return dict(config, BLOCK_D=block_d)


def varlen_causal_attention_triton(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                                   max_seqlen: int | None = None, launch: dict | None = None
                                   ) -> Tensor:
    """The Triton path of `varlen_causal_attention_reference`: same arguments, same result.
    `max_seqlen` (the longest sequence, when the caller knows it) saves the one host sync
    that reading it from cu_seqlens costs; `launch` overrides `varlen_launch`'s choice.
    Launches one kernel (plus copies when q, k, v are not contiguous)."""
    check_varlen_args(q, k, v, cu_seqlens)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # one stride set per pair
    out = torch.empty_like(q)
    n_heads, head_dim = q.shape[1], q.shape[2]
    max_len = longest(cu_seqlens, max_seqlen)
    config = dict(varlen_launch(max_len, head_dim, q.dtype, q.device), **(launch or {}))
    if max_len:
        grid = (triton.cdiv(max_len, config["BLOCK_M"]), n_heads, cu_seqlens.shape[0] - 1)
        _varlen_causal_kernel[grid](
            q, k, v, out, out, cu_seqlens,  # out stands in for lse_ptr: nothing stored there
            n_heads // k.shape[1], head_dim, LOG2E / math.sqrt(head_dim),
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), 0, 0,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", STORE_LSE=False, **config)
    return out


# ---------------------------------------------------------------------------------------
# Decode kernels: paged keys, the key range split over programs, then merged
# ---------------------------------------------------------------------------------------

@triton.jit
def _paged_split_kernel(
    # pointers
    q_ptr, k_pool_ptr, v_pool_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    m_ptr, l_ptr, acc_ptr,
    # sizes
    n_seqs, group_size, head_dim, block_size, split_len, scale_log2,
    # strides
    stride_qn, stride_qh, stride_qd, stride_pb, stride_ps, stride_pg, stride_pd, stride_tb,
    stride_mn, stride_mh, stride_an, stride_ah, stride_as,
    # meta-parameters
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # ---- which query, which KV head (all its query heads at once), which key slice ---
    query = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # the query's sequence: the last b with query_start[b] <= query (binary search)
    lo = 0
    hi = n_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        right = tl.load(query_start_ptr + mid) <= query
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid - 1)
    seq = lo.to(tl.int64)
    # causal: it sees keys 0 .. its own position, counted back from the sequence's end
    n_keys = tl.load(seq_lens_ptr + seq) - tl.load(query_start_ptr + seq + 1) + query + 1
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_keys)
    group = tl.arange(0, BLOCK_G)
    group_ok = group < group_size
    heads = kv_head * group_size + group  # [BLOCK_G] query heads reading this KV head
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < head_dim
    q = tl.load(q_ptr + query * stride_qn + heads[:, None] * stride_qh + ds[None, :] * stride_qd,
                mask=group_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    # ---- online softmax (base 2) over this slice; keys found through the block table -
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        blocks = tl.load(block_tables_ptr + seq * stride_tb + cols // block_size, mask=col_ok,
                         other=0).to(tl.int64)
        offsets = (blocks * stride_pb + (cols % block_size) * stride_ps + kv_head * stride_pg)[:, None] \
            + ds[None, :] * stride_pd
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_pool_ptr + offsets, mask=kv_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_pool_ptr + offsets, mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        correction = tl.exp2(m - m_new)
        l = l * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
        m = m_new
    # ---- partial result of this slice (m = -inf, l = 0 when the slice is empty) ------
    head_offsets = query * stride_mn + heads * stride_mh + split
    tl.store(m_ptr + head_offsets, m, mask=group_ok)
    tl.store(l_ptr + head_offsets, l, mask=group_ok)
    tl.store(acc_ptr + query * stride_an + heads[:, None] * stride_ah + split * stride_as
             + ds[None, :], acc, mask=group_ok[:, None] & d_ok[None, :])


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
    # ---- rescale every slice to the common max and normalise (m is in base 2) --------
    m_all = tl.max(m, axis=0)  # finite: the first slice always holds key 0
    scale = tl.exp2(m - m_all)
    out = tl.sum(acc * scale[:, None], axis=0) / tl.sum(l * scale, axis=0)
    tl.store(o_ptr + query * stride_on + head * stride_oh + ds * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=d_ok)


def paged_launch(max_keys: int, n_queries: int, n_kv_heads: int, device: torch.device) -> dict:
    """Keys per program and tile for the split kernel: enough (query, KV head, slice)
    programs to keep every multiprocessor busy a few times over, each slice a whole
    number of 64-key steps for long contexts (16 for short ones); at most 64 slices,
    what the merge holds on chip. In the H100 sweep (benchmarks/results/gpu_logs/
    kernels_gpu_h100_with_sweep.json, "sweep") no variant of slice, warps or pipeline
    depth beat this by more than the run-to-run spread, at batch 1 and 32, GQA and MQA."""
    step = 64 if max_keys >= 512 else 16
    programs = 4 * device_limits(device)[0]
    wanted = min(triton.cdiv(max_keys, step), 64, max(1, programs // max(1, n_queries * n_kv_heads)))
    split_len = triton.cdiv(triton.cdiv(max_keys, wanted), step) * step
    return dict(split_len=split_len, num_warps=4, num_stages=2)


def check_paged_args(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                     seq_lens: Tensor, query_start: Tensor) -> None:
    """Refuse, by name, what the paged kernels cannot take."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    n_kv_heads = k_pool.shape[2]
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


def paged_decode_triton(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                        seq_lens: Tensor, query_start: Tensor, split_len: int | None = None,
                        launch: dict | None = None) -> Tensor:
    """The split-key (flash-decoding) path of `paged_attention_reference`: same arguments,
    same result, for any query counts; fast when each sequence brings a few queries.

    One program per (query, KV head, key slice) computes all the query heads of its KV
    head as one [group, keys] tile on the tensor cores, so each key and value is read
    once per query, not once per query head; a second kernel merges the slices.
    `split_len` (keys per program, a multiple of 16) and `launch` (num_warps, num_stages)
    override `paged_launch`. Launches: the two kernels (each query finds its sequence by
    a binary search over query_start in the kernel; no host sync)."""
    check_paged_args(q, k_pool, v_pool, block_tables, seq_lens, query_start)
    n_queries, n_heads, head_dim = q.shape
    n_kv_heads, block_size = k_pool.shape[2], k_pool.shape[1]
    max_keys = block_tables.shape[1] * block_size
    config = paged_launch(max_keys, n_queries, n_kv_heads, q.device)
    config.update(launch or {})
    if split_len is not None:
        config["split_len"] = split_len
    split_len = config.pop("split_len")
    if split_len % 16:
        raise ValueError(f"split_len must be a multiple of 16, got {split_len}")
    block_n = 64 if split_len % 64 == 0 else 16
    n_splits = triton.cdiv(max_keys, split_len)
    m = torch.empty(n_queries, n_heads, n_splits, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(n_queries, n_heads, n_splits, head_dim, device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(head_dim))
    group = n_heads // n_kv_heads
    if n_queries:
        _paged_split_kernel[(n_queries, n_kv_heads, n_splits)](
            q, k_pool, v_pool, block_tables, seq_lens, query_start, m, l, acc,
            seq_lens.shape[0], group, head_dim, block_size, split_len, LOG2E / math.sqrt(head_dim),
            q.stride(0), q.stride(1), q.stride(2), *k_pool.stride(), block_tables.stride(0),
            m.stride(0), m.stride(1), acc.stride(0), acc.stride(1), acc.stride(2),
            BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **config)
        _paged_merge_kernel[(n_queries, n_heads)](
            m, l, acc, out, n_splits, head_dim,
            m.stride(0), m.stride(1), acc.stride(0), acc.stride(1), acc.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_D=block_d)
    return out


# ---------------------------------------------------------------------------------------
# Prefill over a paged cache: query blocks of a chunk, keys through the block table
# ---------------------------------------------------------------------------------------

@triton.jit
def _paged_prefill_kernel(
    # pointers
    q_ptr, k_pool_ptr, v_pool_ptr, o_ptr, block_tables_ptr, seq_lens_ptr, query_start_ptr,
    # sizes
    group_size, head_dim, block_size, scale_log2,
    # strides (q and o share theirs)
    stride_qn, stride_qh, stride_qd, stride_pb, stride_ps, stride_pg, stride_pd, stride_tb,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # ---- which sequence, which query head, which block of the sequence's new queries --
    block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_begin = tl.load(query_start_ptr + seq)
    n_new = tl.load(query_start_ptr + seq + 1) - q_begin
    if block * BLOCK_M >= n_new:
        return
    n_keys = tl.load(seq_lens_ptr + seq)  # the new tokens' keys included
    first = n_keys - n_new + block * BLOCK_M  # position of this block's first query
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_new
    positions = n_keys - n_new + rows  # [BLOCK_M] each query's position: it sees keys 0..it
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < head_dim
    q_offsets = ((q_begin + rows).to(tl.int64)[:, None] * stride_qn + head * stride_qh
                 + ds[None, :] * stride_qd)
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # ---- online softmax: keys before the block unmasked, then the diagonal -----------
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_tb
    kv_base = (head // group_size) * stride_pg + ds[None, :] * stride_pd
    diagonal = first // BLOCK_N * BLOCK_N  # key blocks before it are seen by every row
    for n0 in range(0, diagonal, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        pages = tl.load(table + cols // block_size).to(tl.int64)
        kv_offsets = (pages * stride_pb + (cols % block_size) * stride_ps)[:, None] + kv_base
        m, l, acc = _online_softmax_step(q, k_pool_ptr, v_pool_ptr, kv_offsets, d_ok[None, :],
                                         positions, cols, n_keys, m, l, acc, scale_log2,
                                         PRECISION, False)
    for n0 in range(diagonal, tl.minimum(first + BLOCK_M, n_keys), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_keys
        pages = tl.load(table + cols // block_size, mask=col_ok, other=0).to(tl.int64)
        kv_offsets = (pages * stride_pb + (cols % block_size) * stride_ps)[:, None] + kv_base
        m, l, acc = _online_softmax_step(q, k_pool_ptr, v_pool_ptr, kv_offsets,
                                         col_ok[:, None] & d_ok[None, :], positions, cols,
                                         n_keys, m, l, acc, scale_log2, PRECISION, True)
    # ---- normalise and store ----------------------------------------------------------
    l = tl.where(row_ok, l, 1.0)
    tl.store(o_ptr + q_offsets, (acc / l[:, None]).to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


def paged_prefill_triton(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                         seq_lens: Tensor, query_start: Tensor, max_query_len: int | None = None,
                         launch: dict | None = None) -> Tensor:
    """The flash path of `paged_attention_reference`: same arguments, same result, for any
    query counts; fast when sequences bring chunks of many queries (the engine's prefill).

    One program per (block of a sequence's new queries, query head, sequence) runs the
    online softmax of the varlen kernel above, reading each key block once per query
    block through the block table instead of once per query as the split kernel does.
    `max_query_len` (the most new queries of one sequence, when the caller knows it)
    saves the one host sync of reading it from query_start; `launch` overrides
    `varlen_launch`'s tiles (in both H100 sweeps, 4 warps instead of 8 were 13% faster
    on 256-token chunks and no faster on 2048: a lead not yet in the table). Launches one
    kernel."""
    check_paged_args(q, k_pool, v_pool, block_tables, seq_lens, query_start)
    n_heads, head_dim = q.shape[1], q.shape[2]
    longest_chunk = longest(query_start, max_query_len)
    config = dict(varlen_launch(longest_chunk, head_dim, q.dtype, q.device), **(launch or {}))
    out = torch.empty_like(q)
    if longest_chunk:
        grid = (triton.cdiv(longest_chunk, config["BLOCK_M"]), n_heads, query_start.shape[0] - 1)
        _paged_prefill_kernel[grid](
            q, k_pool, v_pool, out, block_tables, seq_lens, query_start,
            n_heads // k_pool.shape[2], head_dim, k_pool.shape[1], LOG2E / math.sqrt(head_dim),
            q.stride(0), q.stride(1), q.stride(2), *k_pool.stride(), block_tables.stride(0),
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **config)
    return out


FLASH_MIN_QUERIES = 16  # from this many new queries in one sequence, paged_prefill_triton


def paged_attention_triton(q: Tensor, k_pool: Tensor, v_pool: Tensor, block_tables: Tensor,
                           seq_lens: Tensor, query_start: Tensor, max_query_len: int | None = None
                           ) -> Tensor:
    """The Triton path of `paged_attention_reference`: the split-key decode kernel when
    every sequence brings fewer than FLASH_MIN_QUERIES new queries (decoding, speculative
    checks), the flash kernel when one brings a chunk (prefill, mixed steps).
    `max_query_len` says which without a host sync; left out, it is read from query_start."""
    chunk = longest(query_start, max_query_len)
    if chunk >= FLASH_MIN_QUERIES:
        return paged_prefill_triton(q, k_pool, v_pool, block_tables, seq_lens, query_start, chunk)
    return paged_decode_triton(q, k_pool, v_pool, block_tables, seq_lens, query_start)
