"""Backward of the Triton expert dispatch, so training runs through the kernels.

What you will learn here: the gradients of a grouped SwiGLU MLP computed in the forward's
own sorted, padded layout (kernels/moe_dispatch.py), and the per-expert weight gradients
as one grouped kernel (one program per expert and tile, no host loop over experts).

For a kept slot s (token t, expert e, routing weight w) in padded row r, the forward was

    gate, up = x[t] @ w_in[e]          h = silu(gate) * up          y[t] += w * (h @ w_out[e])

so with g = dy[t] @ w_out[e].T (the gradient reaching h before the weight):

    d weight[s] = sum_f g * h                    # = dy[t] . (h @ w_out[e])
    dh          = w * g
    d gate      = dh * up * silu'(gate),   d up = dh * silu(gate)
    dx[t]      += [d gate | d up] @ w_in[e].T    # K slots per token summed in order
    d w_in[e]   = sum over e's rows of x[t].T [d gate | d up]
    d w_out[e]  = sum over e's rows of h.T (w * dy[t])

    kernel 1, one program per (block b, hidden tile f): gate, up and g over the model
        width (gate and up recomputed rather than saved), then h, [d gate | d up] and this
        tile's share of d weight, all in the padded row order
    kernel 2: dx rows = [d gate | d up] @ w_in[e].T; the forward's down kernel does it
        (w_in read transposed through its strides, a weight of one)
    kernel 3, one program per (expert e, tile i, tile j): A_e.T @ B_e over e's padded
        rows, the rows gathered by token or read in place; gives d w_in and d w_out

Shapes: N tokens, D d_model, F expert hidden width, E experts, K experts per token,
S = N * K slots, P padded slot rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.moe_dispatch import (_down_weighted_kernel, _tile, align_slots,
                                  dispatch_and_combine_triton, expert_counts)
from kernels.triton_import import tl, triton


# ---------------------------------------------------------------------------------------
# Kernel 1: recompute gate and up, then h, [d gate | d up] and d weight per padded row
# ---------------------------------------------------------------------------------------

@triton.jit
def _swiglu_backward_kernel(
    # pointers
    x_ptr, dy_ptr, w_in_ptr, w_out_ptr, weight_ptr, sorted_slots_ptr, block_expert_ptr,
    h_ptr, dpre_ptr, dweight_ptr,
    # sizes
    n_tokens, n_slots, d_model, d_hidden,
    # strides (x and dy share theirs)
    stride_xn, stride_xd, stride_ie, stride_id, stride_if, stride_oe, stride_of, stride_od,
    stride_hp, stride_hf, stride_gp, stride_gf, stride_wt,
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
    w_in = w_in_ptr + expert * stride_ie
    w_out = w_out_ptr + expert * stride_oe
    # ---- gate, up (x @ w_in) and g (dy @ w_out.T) over the model width --------------
    gate = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    g = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, d_model, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < d_model
        row_offsets = tokens[:, None] * stride_xn + ds[None, :] * stride_xd
        row_mask = valid[:, None] & d_ok[None, :]
        x_rows = tl.load(x_ptr + row_offsets, mask=row_mask, other=0.0)
        dy_rows = tl.load(dy_ptr + row_offsets, mask=row_mask, other=0.0)
        w_mask = d_ok[:, None] & col_ok[None, :]
        w_gate = tl.load(w_in + ds[:, None] * stride_id + cols[None, :] * stride_if,
                         mask=w_mask, other=0.0)
        w_up = tl.load(w_in + ds[:, None] * stride_id + (cols + d_hidden)[None, :] * stride_if,
                       mask=w_mask, other=0.0)
        w_down_t = tl.load(w_out + ds[:, None] * stride_od + cols[None, :] * stride_of,
                           mask=w_mask, other=0.0)  # [BLOCK_D, BLOCK_F] = w_out[e].T tile
        gate = tl.dot(x_rows, w_gate, gate, input_precision=PRECISION)
        up = tl.dot(x_rows, w_up, up, input_precision=PRECISION)
        g = tl.dot(dy_rows, w_down_t, g, input_precision=PRECISION)
    # ---- epilogue: SwiGLU and its derivative ----------------------------------------
    weight = tl.load(weight_ptr + slots, mask=valid, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = silu * up
    dh = g * weight[:, None]
    d_gate = dh * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = dh * silu
    mask = valid[:, None] & col_ok[None, :]
    tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hp + cols[None, :] * stride_hf,
             h.to(h_ptr.dtype.element_ty), mask=mask)
    dpre = dpre_ptr + rows.to(tl.int64)[:, None] * stride_gp
    tl.store(dpre + cols[None, :] * stride_gf, d_gate.to(dpre_ptr.dtype.element_ty), mask=mask)
    tl.store(dpre + (cols + d_hidden)[None, :] * stride_gf, d_up.to(dpre_ptr.dtype.element_ty),
             mask=mask)
    tl.store(dweight_ptr + pid_f * stride_wt + slots, tl.sum(tl.where(mask, g * h, 0.0), axis=1),
             mask=valid)


# ---------------------------------------------------------------------------------------
# Kernel 3: grouped weight gradient, out[e] = A_e.T @ B_e over expert e's padded rows
# ---------------------------------------------------------------------------------------

@triton.jit
def _grouped_weight_grad_kernel(
    # pointers
    a_ptr, b_ptr, out_ptr, sorted_slots_ptr, expert_start_ptr, weight_ptr,
    # sizes
    n_tokens, n_slots, width_a, width_b,
    # strides
    stride_ar, stride_ai, stride_br, stride_bj, stride_oe, stride_oi, stride_oj,
    # meta-parameters: rows of A / B gathered by token (else read by padded row); B scaled
    A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, SCALE_B: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # ---- which expert, which output tile --------------------------------------------
    expert = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    lo = tl.load(expert_start_ptr + expert)
    hi = tl.load(expert_start_ptr + expert + 1)
    ii = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    jj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    i_ok = ii < width_a
    j_ok = jj < width_b
    # ---- sum over the expert's rows (an empty expert stores zeros) ------------------
    acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        slots = tl.load(sorted_slots_ptr + rows, mask=rows < hi, other=n_slots)
        valid = slots < n_slots
        tokens = (slots % n_tokens).to(tl.int64)
        a_rows = tokens if A_BY_TOKEN else rows.to(tl.int64)
        b_rows = tokens if B_BY_TOKEN else rows.to(tl.int64)
        a = tl.load(a_ptr + a_rows[:, None] * stride_ar + ii[None, :] * stride_ai,
                    mask=valid[:, None] & i_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_br + jj[None, :] * stride_bj,
                    mask=valid[:, None] & j_ok[None, :], other=0.0)
        if SCALE_B:
            weight = tl.load(weight_ptr + slots, mask=valid, other=0.0).to(tl.float32)
            b = (b.to(tl.float32) * weight[:, None]).to(a.dtype)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PRECISION)
    tl.store(out_ptr + expert * stride_oe + ii[:, None] * stride_oi + jj[None, :] * stride_oj,
             acc.to(out_ptr.dtype.element_ty), mask=i_ok[:, None] & j_ok[None, :])


# ---------------------------------------------------------------------------------------
# Wrapper: recompute the alignment, launch the three kernels
# ---------------------------------------------------------------------------------------

def _block_m(n_slots: int) -> int:
    """Rows per block of the backward's own alignment: 64-row tiles for the tensor cores
    once there are enough slots (128 would hold three [BLOCK_M, BLOCK_F] accumulators)."""
    return 16 if n_slots <= 1024 else 64


def dispatch_backward_triton(dy: Tensor, x: Tensor, expert_ids: Tensor, weights: Tensor,
                             w_in: Tensor, w_out: Tensor, capacity: int | None
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `dispatch_and_combine_triton`'s y for dy [N, D]:
    -> dx [N, D], d weights [N, K], d w_in [E, D, 2F], d w_out [E, F, D]."""
    n_tokens, d_model = x.shape
    n_experts, d_hidden = w_out.shape[0], w_out.shape[1]
    k = expert_ids.shape[1]
    n_slots = expert_ids.numel()
    block_m = _block_m(n_slots)
    plan = align_slots(expert_ids, n_experts, block_m, capacity)
    n_rows = plan.sorted_slots.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    dy = dy.contiguous()
    slot_weight = weights.t().reshape(-1).contiguous()  # [S] choice-major
    block_f, block_d = _tile(d_hidden), _tile(d_model)
    n_f_tiles = triton.cdiv(d_hidden, block_f)
    h = torch.empty(n_rows, d_hidden, device=x.device, dtype=x.dtype)  # [P, F]
    dpre = torch.empty(n_rows, 2 * d_hidden, device=x.device, dtype=x.dtype)  # [P, 2F]
    dweight_parts = torch.zeros(n_f_tiles, n_slots, device=x.device, dtype=torch.float32)
    _swiglu_backward_kernel[(n_rows // block_m, n_f_tiles)](
        x, dy, w_in, w_out, slot_weight, plan.sorted_slots, plan.block_expert,
        h, dpre, dweight_parts,
        n_tokens, n_slots, d_model, d_hidden,
        x.stride(0), x.stride(1), *w_in.stride(), *w_out.stride(),
        h.stride(0), h.stride(1), dpre.stride(0), dpre.stride(1), dweight_parts.stride(0),
        BLOCK_M=block_m, BLOCK_F=block_f, BLOCK_D=block_d, PRECISION=precision)
    # dx: [d gate | d up] @ w_in[e].T by the forward's down kernel, w_in read as [E, 2F, D].
    dx_slots = torch.zeros(n_slots, d_model, device=x.device, dtype=torch.float32)  # [S, D]
    ones = torch.ones(n_slots, device=x.device, dtype=torch.float32)
    _down_weighted_kernel[(n_rows // block_m, triton.cdiv(d_model, block_d))](
        dpre, w_in, dx_slots, plan.sorted_slots, plan.block_expert, ones,
        n_slots, 2 * d_hidden, d_model,
        dpre.stride(0), dpre.stride(1), w_in.stride(0), w_in.stride(2), w_in.stride(1),
        dx_slots.stride(0), dx_slots.stride(1),
        BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_F=_tile(2 * d_hidden), PRECISION=precision)
    dx = dx_slots.view(k, n_tokens, d_model).sum(dim=0).to(x.dtype)  # [N, D]
    # Weight gradients: each expert's padded rows, found from the kept counts.
    kept = expert_counts(expert_ids, n_experts)  # [E]
    if capacity is not None:
        kept = kept.clamp(max=capacity)
    padded = (kept + block_m - 1) // block_m * block_m  # [E]
    expert_start = torch.cat([padded.new_zeros(1), padded.cumsum(0)]).to(torch.int32)  # [E+1]
    d_w_in = torch.empty_like(w_in)
    d_w_out = torch.empty_like(w_out)
    for out, a, b, a_by_token, scale_b in ((d_w_in, x, dpre, True, False),
                                           (d_w_out, h, dy, False, True)):
        width_a, width_b = a.shape[1], b.shape[1]
        block_i, block_j = _tile(width_a), _tile(width_b)
        grid = (n_experts, triton.cdiv(width_a, block_i), triton.cdiv(width_b, block_j))
        _grouped_weight_grad_kernel[grid](
            a, b, out, plan.sorted_slots, expert_start, slot_weight,
            n_tokens, n_slots, width_a, width_b,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), *out.stride(),
            A_BY_TOKEN=a_by_token, B_BY_TOKEN=not a_by_token, SCALE_B=scale_b,
            BLOCK_R=block_m, BLOCK_I=block_i, BLOCK_J=block_j, PRECISION=precision)
    d_weights = dweight_parts.sum(dim=0).view(k, n_tokens).t().to(weights.dtype)  # [N, K]
    return dx, d_weights, d_w_in, d_w_out


# ---------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------

class _TritonDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, expert_ids, weights, w_in, w_out, capacity):
        y, dropped = dispatch_and_combine_triton(x, expert_ids, weights, w_in, w_out, capacity)
        ctx.save_for_backward(x, expert_ids, weights, w_in, w_out)
        ctx.capacity = capacity
        ctx.mark_non_differentiable(dropped)
        return y, dropped

    @staticmethod
    def backward(ctx, dy, _d_dropped):
        x, expert_ids, weights, w_in, w_out = ctx.saved_tensors
        if expert_ids.numel() == 0:
            return (torch.zeros_like(x), None, torch.zeros_like(weights), torch.zeros_like(w_in),
                    torch.zeros_like(w_out), None)
        dx, d_weights, d_w_in, d_w_out = dispatch_backward_triton(
            dy, x, expert_ids, weights, w_in, w_out, ctx.capacity)
        return dx, None, d_weights, d_w_in, d_w_out, None


def dispatch_and_combine_trainable(x: Tensor, expert_ids: Tensor, weights: Tensor, w_in: Tensor,
                                   w_out: Tensor, capacity: int | None) -> tuple[Tensor, Tensor]:
    """`dispatch_and_combine_triton` with a Triton backward: gradients reach x, the routing
    weights, w_in and w_out. Same arguments and results as `dispatch_and_combine`."""
    return _TritonDispatch.apply(x, expert_ids, weights, w_in, w_out, capacity)
