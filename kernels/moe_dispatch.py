"""Expert dispatch: run each token through its K experts and sum the weighted outputs.

What you will learn here: how a Mixture-of-Experts layer becomes two grouped matrix
multiplies without ever copying the tokens into per-expert buffers (vLLM's fused MoE).

The N x K (token, expert) slots are numbered choice-major (slot s = choice * N + token), so
every token's first choice comes before any second choice; a capacity limit then keeps
the first `capacity` slots of each expert and first choices win the places.

    align (on the device, no host loop over experts):
        order   = stable argsort of the slots by expert         # slots grouped by expert
        rank    = position of each slot inside its expert's run  # >= capacity -> dropped
        padded  = each expert's kept run rounded up to BLOCK_M   # one expert per block
        sorted_slots[padded_start[e] + rank] = slot              # the rest: padding (= S)
        block_expert[b] = expert owning rows b*BLOCK_M ..        # -1 past the padded total

    up kernel, one program per (block b, hidden tile f):
        e = block_expert[b];  rows = x[sorted_slots[b] % N]     # gathered in place by index
        gate, up = rows @ w_in[e][:, f], rows @ w_in[e][:, F + f]  # fp32 accumulators
        h[b, f] = silu(gate) * up                               # SwiGLU fused in the epilogue

    down kernel, one program per (block b, output tile d):
        out[slot, d] = weight[slot] * (h[b] @ w_out[e][:, d])    # routing weight in the epilogue

    combine: y[n] = sum over choices j of out[j * N + n]        # token order, deterministic

`dispatch_and_combine` (the reference, one batched matmul per expert), `dispatch_grouped`
(the same loop as two grouped matmuls, for CPU training) and
`dispatch_and_combine_triton` share one signature; `kernels.ops.expert_dispatch` picks one.

Shapes: N tokens, D d_model, F expert hidden width, E experts, K experts per token,
S = N * K slots, P padded slot rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.backend import KERNEL_DTYPES
from kernels.triton_import import tl, triton


# ---------------------------------------------------------------------------------------
# Reference: one batched matmul per expert (the specification)
# ---------------------------------------------------------------------------------------

def sort_slots(expert_ids: Tensor, n_experts: int, capacity: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """The slots of expert_ids [N, K], choice-major (slot s = choice * N + token), grouped
    by expert with one stable sort: order [kept] (the first `capacity` slots of each
    expert's run, or all), counts [E] kept per expert, dropped [] slots over capacity."""
    check_expert_ids(expert_ids, n_experts)
    slot_expert = expert_ids.t().reshape(-1)  # [K*N]
    order = torch.argsort(slot_expert, stable=True)  # slots grouped by expert
    counts = expert_counts(slot_expert, n_experts)  # [E]
    if capacity is not None:
        starts = counts.cumsum(0) - counts  # first sorted index of each expert's run
        rank = torch.arange(order.numel(), device=order.device) - starts[slot_expert[order]]
        order = order[rank < capacity]  # keep the first `capacity` slots of each run
        counts = counts.clamp(max=capacity)
    return order, counts, slot_expert.new_tensor(slot_expert.numel()) - order.numel()


def dispatch_and_combine(x: Tensor, expert_ids: Tensor, weights: Tensor, w_in: Tensor,
                         w_out: Tensor, capacity: int | None) -> tuple[Tensor, Tensor]:
    """Run each token through its experts and sum the weighted outputs.

    x [N, D], expert_ids and weights [N, K], w_in [E, D, 2F], w_out [E, F, D]
    -> y [N, D], number of slots dropped by `capacity`.
    """
    order, counts, dropped = sort_slots(expert_ids, w_in.shape[0], capacity)
    slot_weight = weights.t().reshape(-1)  # [K*N]
    tokens = order % expert_ids.shape[0]  # [kept] token of each sorted slot
    y = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            rows = tokens[start:start + count]
            gate, up = (x[rows] @ w_in[expert]).chunk(2, dim=-1)  # 2 x [count, F]
            out = (F.silu(gate) * up) @ w_out[expert]  # [count, D]
            y.index_add_(0, rows, out * slot_weight[order[start:start + count], None])
        start += count
    return y, dropped


def dispatch_grouped(x: Tensor, expert_ids: Tensor, weights: Tensor, w_in: Tensor,
                     w_out: Tensor, capacity: int | None) -> tuple[Tensor, Tensor]:
    """The reference's sum with its loop over experts replaced by two grouped matmuls
    (torch's F.grouped_mm over the sorted rows, one group per expert): one gather of the
    rows and one scatter back, where the loop does one of each per expert, and no host
    sync. What training runs on CPU, where the loop's per-expert gathers, zero-filled
    gradients and scatters cost as much as the matmuls."""
    order, counts, dropped = sort_slots(expert_ids, w_in.shape[0], capacity)
    ends = counts.cumsum(0).to(torch.int32)  # [E] end row of each expert's group
    tokens = order % expert_ids.shape[0]  # [kept] token of each sorted slot
    gate, up = F.grouped_mm(x.index_select(0, tokens), w_in, offs=ends).chunk(2, dim=-1)  # 2 x [kept, F]
    out = F.grouped_mm(F.silu(gate) * up, w_out, offs=ends)  # [kept, D]
    slot_weight = weights.t().reshape(-1)[order, None]  # [kept, 1]
    y = torch.zeros_like(x).index_add_(0, tokens, out * slot_weight)
    return y, dropped


def dispatch_dense(x: Tensor, expert_ids: Tensor, weights: Tensor, w_in: Tensor,
                   w_out: Tensor) -> tuple[Tensor, Tensor]:
    """The same sum computed by every expert for every token, the unchosen ones weighted 0:
    two batched matmuls over all E experts, static shapes, no host sync, dropless.

    E / K times the arithmetic of the sorted dispatch, so it pays only where arithmetic is
    not the cost: a few tokens through small experts, a decode step of a small model, where
    the sorted form's E little matmuls and its Python loop cost more than reading all E
    experts (kernels.ops.expert_dispatch decides).
    """
    check_expert_ids(expert_ids, w_in.shape[0])
    n_experts, (n_tokens, d_model) = w_in.shape[0], x.shape
    gates = weights.new_zeros(n_tokens, n_experts).scatter_add_(1, expert_ids, weights)  # [N, E], 0 = not chosen
    gate, up = torch.bmm(x.expand(n_experts, n_tokens, d_model), w_in).chunk(2, dim=-1)  # 2 x [E, N, F]
    hidden = F.silu(gate) * up * gates.t()[..., None]  # [E, N, F]
    # CUDA autocast runs sum in float32: the result goes back to the experts' dtype
    return torch.bmm(hidden, w_out).sum(0).to(x.dtype), expert_ids.new_zeros(())  # [N, D]


def dispatch_gathered(x: Tensor, expert_ids: Tensor, weights: Tensor, w_in: Tensor,
                      w_out: Tensor) -> tuple[Tensor, Tensor]:
    """The same sum, each (token, choice) slot gathering its expert's weights: static
    shapes, no host sync, dropless (gpt-fast's Mixtral). What a compiled decode step runs:
    a graph cannot hold the sorted form's loop over counts read back from the device, and
    reading only the K chosen experts per token beats the dense form there."""
    check_expert_ids(expert_ids, w_in.shape[0])
    (n_tokens, k), slot_expert = expert_ids.shape, expert_ids.reshape(-1)  # [N * K], token-major
    rows = x.repeat_interleave(k, dim=0)[:, None]  # [N * K, 1, D]
    gate, up = torch.bmm(rows, w_in[slot_expert])[:, 0].chunk(2, dim=-1)  # 2 x [N * K, F]
    hidden = (F.silu(gate) * up * weights.reshape(-1, 1))[:, None]  # [N * K, 1, F]
    out = torch.bmm(hidden, w_out[slot_expert])[:, 0]  # [N * K, D]
    return out.view(n_tokens, k, -1).sum(1).to(x.dtype), expert_ids.new_zeros(())  # as in dispatch_dense


def check_expert_ids(expert_ids: Tensor, n_experts: int) -> None:
    """Refuse expert ids outside 0 .. E-1 on both paths, without a host sync on a GPU
    (an asynchronous device assert; on CPU it raises at once)."""
    if expert_ids.numel():
        torch._assert_async(((expert_ids >= 0) & (expert_ids < n_experts)).all(),
                            f"expert ids must lie in 0 .. {n_experts - 1} (the number of experts "
                            "in w_in / w_out); check the router's output")


def expert_counts(expert_ids: Tensor, n_experts: int) -> Tensor:
    """Slots per expert, [E] int64; scatter_add rather than torch.bincount, which waits
    for the device to learn its output size."""
    flat = expert_ids.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int64))


# ---------------------------------------------------------------------------------------
# Align: slots sorted by expert, each expert's run padded to the block size
# ---------------------------------------------------------------------------------------

@dataclass
class Alignment:
    sorted_slots: Tensor  # [P] int32 slot of each padded row; S marks padding
    block_expert: Tensor  # [P / BLOCK_M] int32 expert of each block; -1 = past the end
    padded_total: Tensor  # [] int64 rows in use (sum of padded runs), left on the device
    dropped: Tensor  # [] int64 slots dropped by the capacity limit


def align_slots(expert_ids: Tensor, n_experts: int, block_m: int,
                capacity: int | None) -> Alignment:
    """Sort the slots of expert_ids [N, K] by expert, one expert per block of `block_m` rows.

    P is the bound S + E * (block_m - 1) rather than the exact padded total, so nothing
    waits for the device; blocks past the total get expert -1 and return at once.
    """
    n_slots = expert_ids.numel()
    device = expert_ids.device
    slot_expert = expert_ids.t().reshape(-1)  # [S] choice-major
    order = torch.argsort(slot_expert, stable=True)  # [S] slots grouped by expert
    counts = expert_counts(slot_expert, n_experts)  # [E]
    sorted_expert = slot_expert[order]  # [S]
    rank = torch.arange(n_slots, device=device) - (counts.cumsum(0) - counts)[sorted_expert]
    kept = counts if capacity is None else counts.clamp(max=capacity)  # [E]
    padded = (kept + block_m - 1) // block_m * block_m  # [E]
    padded_end = padded.cumsum(0)  # [E]
    n_rows = -(-(n_slots + n_experts * (block_m - 1)) // block_m) * block_m  # P
    destination = padded_end[sorted_expert] - padded[sorted_expert] + rank  # [S]
    if capacity is not None:
        destination = torch.where(rank < capacity, destination, n_rows)  # dropped -> spare row
    sorted_slots = torch.full((n_rows + 1,), n_slots, dtype=torch.int32, device=device)
    sorted_slots[destination] = order.to(torch.int32)
    block_start = torch.arange(0, n_rows, block_m, device=device)  # [P / BLOCK_M]
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < n_experts, block_expert, -1).to(torch.int32)
    return Alignment(sorted_slots[:n_rows], block_expert, padded_end[-1], n_slots - kept.sum())


# ---------------------------------------------------------------------------------------
# Kernel 1: gathered rows @ w_in[e], SwiGLU fused
# ---------------------------------------------------------------------------------------

@triton.jit
def _up_swiglu_kernel(
    # pointers
    x_ptr, w_in_ptr, h_ptr, sorted_slots_ptr, block_expert_ptr,
    # sizes
    n_tokens, n_slots, d_model, d_hidden,
    # strides
    stride_xn, stride_xd, stride_we, stride_wd, stride_wf, stride_hp, stride_hf,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # ---- which rows and which hidden columns ----------------------------------------
    pid_m = tl.program_id(0)
    pid_f = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    valid = slots < n_slots
    tokens = (slots % n_tokens).to(tl.int64)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = cols < d_hidden
    w_expert = w_in_ptr + expert * stride_we
    # ---- gate and up over the model width, fp32 accumulators -------------------------
    gate = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, d_model, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d_model
        x_rows = tl.load(x_ptr + tokens[:, None] * stride_xn + ds[None, :] * stride_xd,
                         mask=valid[:, None] & d_ok[None, :], other=0.0)
        w_mask = d_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_expert + ds[:, None] * stride_wd + cols[None, :] * stride_wf,
                         mask=w_mask, other=0.0)
        w_up = tl.load(w_expert + ds[:, None] * stride_wd + (cols + d_hidden)[None, :] * stride_wf,
                       mask=w_mask, other=0.0)
        gate = tl.dot(x_rows, w_gate, gate, input_precision=PRECISION)
        up = tl.dot(x_rows, w_up, up, input_precision=PRECISION)
    # ---- epilogue: SwiGLU, store in sorted (padded) row order ------------------------
    h = gate * tl.sigmoid(gate) * up
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hp + cols[None, :] * stride_hf,
             h.to(h_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------
# Kernel 2: h @ w_out[e], routing weight in the epilogue, written to the slot's row
# ---------------------------------------------------------------------------------------

@triton.jit
def _down_weighted_kernel(
    # pointers
    h_ptr, w_out_ptr, out_ptr, sorted_slots_ptr, block_expert_ptr, weight_ptr,
    # sizes
    n_slots, d_hidden, d_model,
    # strides
    stride_hp, stride_hf, stride_we, stride_wf, stride_wd, stride_os, stride_od,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # ---- which rows and which output columns -----------------------------------------
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slots = tl.load(sorted_slots_ptr + rows)
    valid = slots < n_slots
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d_model
    w_expert = w_out_ptr + expert * stride_we
    # ---- down projection over the hidden width ---------------------------------------
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for f0 in range(0, d_hidden, BLOCK_F):
        fs = f0 + tl.arange(0, BLOCK_F)
        f_ok = fs < d_hidden
        h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hp + fs[None, :] * stride_hf,
                    mask=valid[:, None] & f_ok[None, :], other=0.0)
        w = tl.load(w_expert + fs[:, None] * stride_wf + cols[None, :] * stride_wd,
                    mask=f_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    # ---- epilogue: scale by the routing weight, scatter to the slot's own row --------
    weight = tl.load(weight_ptr + slots, mask=valid, other=0.0).to(tl.float32)
    acc = acc * weight[:, None]
    tl.store(out_ptr + slots.to(tl.int64)[:, None] * stride_os + cols[None, :] * stride_od,
             acc, mask=valid[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------
# Wrapper: check, align, allocate, launch, combine
# ---------------------------------------------------------------------------------------

def _tile(width: int, cap: int = 64) -> int:
    """A power-of-two tile between 16 (tl.dot's minimum) and `cap` covering `width`."""
    return max(16, min(cap, triton.next_power_of_2(width)))


def dispatch_config(block_m: int, block_out: int, block_reduce: int, num_warps: int,
                    num_stages: int) -> dict:
    """One launch of both forward kernels: BLOCK_M rows per block; each kernel's output
    tile (the up kernel's hidden columns, the down kernel's model columns) up to
    `block_out` wide and its reduction step up to `block_reduce` (clamped to the widths)."""
    return dict(BLOCK_M=block_m, BLOCK_OUT=block_out, BLOCK_REDUCE=block_reduce,
                num_warps=num_warps, num_stages=num_stages)


def dispatch_launch(n_slots: int, device: torch.device) -> dict:
    """The launch for `n_slots` slots. Few slots (decoding) read whole weight matrices for
    a handful of rows: 16-row blocks, deep pipelines to keep bytes in flight; many slots
    (prefill, training) need 128-row tiles for the tensor cores. The interpreter gets
    small tiles: it runs the test shapes. The GPU entries come from
    `python benchmarks/bench_kernels.py --sweep` at Mixtral's widths (the "sweep" keys of
    benchmarks/results/gpu_logs/kernels_gpu_h200_before_paged_prefill.json and
    kernels_gpu_h100_with_sweep.json): from 512 slots
    (256 tokens) 128 x 128 tiles with 8 warps were 6-15% faster than 64-row tiles on
    both cards, and at 8,192 slots as fast as the 32-deep reduction step used before;
    at 32 slots no variant beat 16-row tiles by more than the spread."""
    if device.type != "cuda":
        return dispatch_config(16 if n_slots <= 1024 else 64, 64, 64, 4, 2)
    if n_slots <= 128:
        return dispatch_config(16, 128, 64, 4, 4)
    return dispatch_config(128, 128, 64, 8, 3)


def dispatch_and_combine_triton(x: Tensor, expert_ids: Tensor, weights: Tensor, w_in: Tensor,
                                w_out: Tensor, capacity: int | None, launch: dict | None = None
                                ) -> tuple[Tensor, Tensor]:
    """The Triton path of `dispatch_and_combine`: same arguments, same results. `launch`
    (a `dispatch_config`) replaces `dispatch_launch`'s choice. Launches: the alignment's torch ops (argsort,
    scatter_add, cumsum, searchsorted, a scatter; no host sync), the two kernels, and
    the sum over choices."""
    n_tokens, d_model = x.shape
    n_experts, d_hidden = w_out.shape[0], w_out.shape[1]
    if w_in.shape != (n_experts, d_model, 2 * d_hidden) or w_out.shape[2] != d_model:
        raise ValueError(f"w_in {tuple(w_in.shape)} and w_out {tuple(w_out.shape)} must be "
                         f"[E, D, 2F] and [E, F, D] with D = {d_model} (x is {tuple(x.shape)})")
    if expert_ids.shape != weights.shape or expert_ids.shape[0] != n_tokens:
        raise ValueError(f"expert_ids {tuple(expert_ids.shape)} and weights "
                         f"{tuple(weights.shape)} must both be [N, K] with N = {n_tokens}")
    if x.dtype not in KERNEL_DTYPES or w_in.dtype != x.dtype or w_out.dtype != x.dtype:
        raise ValueError(f"x, w_in, w_out must share one of {KERNEL_DTYPES}, got {x.dtype}, "
                         f"{w_in.dtype}, {w_out.dtype}; use dispatch_and_combine for others")
    check_expert_ids(expert_ids, n_experts)
    n_slots = expert_ids.numel()
    if n_slots == 0:
        return torch.zeros_like(x), expert_ids.new_zeros(())
    c = launch or dispatch_launch(n_slots, x.device)
    block_m, out_tile, reduce_tile = c["BLOCK_M"], c["BLOCK_OUT"], c["BLOCK_REDUCE"]
    pipeline = dict(num_warps=c["num_warps"], num_stages=c["num_stages"])
    plan = align_slots(expert_ids, n_experts, block_m, capacity)
    n_rows = plan.sorted_slots.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    slot_weight = weights.t().reshape(-1).contiguous()  # [S] choice-major, like the slots
    h = torch.empty(n_rows, d_hidden, device=x.device, dtype=x.dtype)  # [P, F]
    block_f = _tile(d_hidden, out_tile)
    grid = (n_rows // block_m, triton.cdiv(d_hidden, block_f))
    _up_swiglu_kernel[grid](
        x, w_in, h, plan.sorted_slots, plan.block_expert,
        n_tokens, n_slots, d_model, d_hidden,
        x.stride(0), x.stride(1), w_in.stride(0), w_in.stride(1), w_in.stride(2),
        h.stride(0), h.stride(1),
        BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_D=_tile(d_model, reduce_tile),
        PRECISION=precision, **pipeline)
    out = torch.zeros(n_slots, d_model, device=x.device, dtype=torch.float32)  # [S, D]
    block_d = _tile(d_model, out_tile)
    grid = (n_rows // block_m, triton.cdiv(d_model, block_d))
    _down_weighted_kernel[grid](
        h, w_out, out, plan.sorted_slots, plan.block_expert, slot_weight,
        n_slots, d_hidden, d_model,
        h.stride(0), h.stride(1), w_out.stride(0), w_out.stride(1), w_out.stride(2),
        out.stride(0), out.stride(1),
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_F=_tile(d_hidden, reduce_tile),
        PRECISION=precision, **pipeline)
    k = expert_ids.shape[1]
    y = out.view(k, n_tokens, d_model).sum(dim=0)  # [N, D], choices summed in order
    return y.to(x.dtype), plan.dropped
