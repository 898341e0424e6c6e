"""Kernel benchmark: each Triton kernel beside its reference, the obvious PyTorch way, and
the device's own measured ceilings, with the error of every row.

Why side by side: absolute times depend on the machine and on what else runs on it; the
ratio between two implementations timed in one process, on the same inputs, does not.
Each row reports time, TFLOP/s, GB/s, its share of the ceilings measured in the same run
(a large device-to-device copy; a large bf16 matmul), the speed-up over the reference
and, for every implementation, max |out - ref| and ||out - ref|| / ||ref|| against a
float32 computation on the same (rounded) inputs.

    python benchmarks/bench_kernels.py                 # on a GPU: realistic shapes, bf16
    python benchmarks/bench_kernels.py --quick         # small shapes (CPU: PyTorch rows only)
    TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --quick --dtype float16
                                                       # CPU plumbing check of the Triton rows

Rows (GPU shapes from the issue "Kernels that are right and fast on a real GPU"):
    dispatch        Mixtral-like MoE (D 4096, 8 experts top-2, F 14336) at 1/16/256/4096
                    tokens: triton | reference (per-expert loop) | dense (the same FLOPs
                    as one SwiGLU over all N*K slots: the matmul rate to compare with)
    dispatch_fwd_bwd  forward + backward at 4096 tokens: triton | reference (on a CPU also
                    grouped: F.grouped_mm, what CPU training runs)
    prefill         causal, B 4, T 2048, H 32, Dh 128, MQA and MHA: triton varlen |
                    reference (per-sequence SDPA) | sdpa_flash (padded batch, flash backend)
    prefill_fwd_bwd the same shapes, forward + backward
    decode          paged, batch 1 and 32 over 4k context (H 32, G 8 and MQA): triton |
                    reference (per-sequence gather + SDPA) | sdpa_contiguous (no paging)
    paged_prefill   the engine's prefill through the paged cache: a 256-token chunk after
                    3840 cached tokens, and whole 2048-token prompts (B 4, H 32, G 8):
                    triton (flash through the block table) | triton_decode (the split
                    kernel) | triton_contiguous (varlen on unpaged K/V, whole prompts) |
                    reference
    triton_graph    (decode, and dispatch up to 256 tokens) the Triton call replayed from a
                    CUDA graph: the kernels' own time without Python and launch overhead
    train_step      one AdamW step of a small MoE model, kernel_backend triton | torch

`targets` in the JSON holds the issue's figures as measured ratios beside their goals.
Results go to benchmarks/results/kernels_<device>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.attention import (paged_attention_reference, paged_attention_triton,
                               paged_decode_triton, paged_prefill_triton,
                               varlen_causal_attention_reference,
                               varlen_causal_attention_triton)
from kernels.attention_backward import varlen_causal_attention_trainable
from kernels.backend import triton_available
from kernels.moe_dispatch import (dispatch_and_combine, dispatch_and_combine_triton,
                                  dispatch_config, dispatch_grouped, dispatch_launch)
from kernels.moe_dispatch_backward import dispatch_and_combine_trainable
from moe.config import ModelConfig
from moe.cost.hardware import measure_hardware
from moe.model.transformer import Transformer, count_parameters, model_loss


# ---------------------------------------------------------------------------------------
# Timing, ceilings, errors
# ---------------------------------------------------------------------------------------

def timed(fn, device: torch.device, repeats: int, budget_ms: float | None = None) -> float:
    """Median seconds of `fn()`: on CUDA triton's do_bench (events, L2 flushed between
    runs, warm-up first) with `budget_ms` of timed runs (default 5 ms per repeat, at least
    50: a kernel call fits hundreds of times; a 40 ms training step needs its own budget),
    on CPU a wall-clock loop after three warm-up calls."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=budget_ms or max(50, 5 * repeats),
                                       return_mode="median") / 1e3
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def graphed(fn):
    """`fn` captured once in a CUDA graph, replayed by the returned closure: what is left
    of a call without the Python and launch overhead (how a serving loop that captures
    its decode step, as gpt-fast and vLLM do, would run it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return lambda: (graph.replay(), out)[1]


def measure_ceilings(device: torch.device) -> dict:
    """What this device reaches (moe.cost.hardware.measure_hardware: a large copy, counting bytes
    read and written; a square matmul in bf16, float32 on CPU), as the rows' shares use it."""
    reached = measure_hardware(str(device))
    return dict(copy_gb_per_s=reached.bandwidth / 1e9, matmul_tflops=reached.peak_flops / 1e12,
                measured_by="moe.cost.hardware.measure_hardware")


def errors(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> dict:
    """The worst over the tensors (an output, or each gradient) of max |out - ref| and of
    ||out - ref|| / ||ref||, in float64; NaN stays NaN."""
    worst = dict(max_abs_err=0.0, rel_err=0.0)
    for out, ref in zip(outs, refs, strict=True):
        diff = out.double() - ref.double()
        worst["max_abs_err"] = max(worst["max_abs_err"], diff.abs().max().item(), key=_nan_first)
        worst["rel_err"] = max(worst["rel_err"], (diff.norm() / ref.double().norm()).item(),
                               key=_nan_first)
    return worst


def _nan_first(value: float) -> float:
    return float("inf") if value != value else value


def row(kernel: str, impl: str, shape: dict, seconds: float, flops: float, bytes_moved: float,
        ceilings: dict, err: dict | None = None) -> dict:
    tflops, gbs = flops / seconds / 1e12, bytes_moved / seconds / 1e9
    out = dict(kernel=kernel, impl=impl, shape=shape, ms=seconds * 1e3, tflops=tflops,
               gb_per_s=gbs, share_of_matmul=tflops / ceilings["matmul_tflops"],
               share_of_copy=gbs / ceilings["copy_gb_per_s"])
    out.update(err or {})
    return out


def first(out):
    """The output tensor of an implementation (the dispatch also returns a drop count)."""
    return [out[0] if isinstance(out, tuple) else out]


def bench_rows(kernel: str, shape: dict, impls: dict, expect: list[torch.Tensor] | None,
               flops: float, bytes_moved: float, device, repeats: int, ceilings: dict,
               results=lambda fn: first(fn()), graph: bool = False) -> list[dict]:
    """Time each implementation; first check what `results(fn)` gives against `expect`
    (float32, computed on the same rounded inputs). With `graph`, the Triton path is also
    timed as a CUDA graph replay (row "triton_graph")."""
    rows = []
    for name, fn in impls.items():
        err = errors(results(fn), expect) if expect is not None else None
        rows.append(row(kernel, name, shape, timed(fn, device, repeats), flops, bytes_moved,
                        ceilings, err))
        if name == "triton" and graph and device.type == "cuda":
            try:
                replay = graphed(fn)
            except RuntimeError as e:  # say so in the results rather than lose the run
                print(f"  {kernel} {shape}: no CUDA graph ({str(e)[:200]})", flush=True)
                continue
            err = errors(results(replay), expect) if expect is not None else None
            rows.append(row(kernel, "triton_graph", shape, timed(replay, device, repeats), flops,
                            bytes_moved, ceilings, err))
        print(f"  {kernel} {name} {json.dumps(shape)}: {rows[-1]['ms']:.3f} ms", flush=True)
    return rows


# ---------------------------------------------------------------------------------------
# Expert dispatch
# ---------------------------------------------------------------------------------------

def dispatch_inputs(n_tokens, d_model, d_hidden, n_experts, k, device, dtype, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(n_tokens, d_model, device=device, dtype=dtype, generator=gen)
    logits = torch.randn(n_tokens, n_experts, device=device, generator=gen)
    weights, ids = logits.softmax(-1).topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    w_in = (torch.randn(n_experts, d_model, 2 * d_hidden, device=device, dtype=dtype,
                        generator=gen) * d_model**-0.5)
    w_out = (torch.randn(n_experts, d_hidden, d_model, device=device, dtype=dtype,
                         generator=gen) * d_hidden**-0.5)
    return x, ids, weights, w_in, w_out


def dispatch_cost(n_tokens, d_model, d_hidden, n_experts, k, element_size):
    flops = 6 * n_tokens * k * d_model * d_hidden
    used = min(n_experts, n_tokens * k)  # experts that receive a token read their weights
    bytes_moved = (used * 3 * d_model * d_hidden + 2 * n_tokens * d_model) * element_size
    return flops, bytes_moved


def bench_dispatch(shape_args, device, dtype, use_triton, repeats, ceilings):
    n_tokens, d_model, d_hidden, n_experts, k = shape_args
    x, ids, weights, w_in, w_out = dispatch_inputs(*shape_args, device, dtype)
    shape = dict(N=n_tokens, D=d_model, F=d_hidden, E=n_experts, K=k)
    flops, bytes_moved = dispatch_cost(*shape_args, x.element_size())
    wide = [t.float() for t in (x, weights, w_in, w_out)]
    expect = first(dispatch_and_combine(wide[0], ids, *wide[1:], None))
    del wide
    slots = x.repeat(k, 1)  # [N*K, D]: the dense baseline's rows

    def dense():  # the same FLOPs as one SwiGLU over every slot, through the matmul library
        gate, up = (slots @ w_in[0]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w_out[0]
    impls = {"reference": lambda: dispatch_and_combine(x, ids, weights, w_in, w_out, None)}
    if use_triton:
        impls["triton"] = lambda: dispatch_and_combine_triton(x, ids, weights, w_in, w_out, None)
    rows = bench_rows("dispatch", shape, impls, expect, flops, bytes_moved, device, repeats,
                      ceilings, graph=n_tokens <= 256)
    return rows + bench_rows("dispatch", shape, {"dense": dense}, None, flops, bytes_moved,
                             device, repeats, ceilings)  # another function: no error to report


def forward_backward(fn, inputs: list[torch.Tensor], grad: torch.Tensor):
    """A closure running fn() and backpropagating `grad` into `inputs` (what is timed)."""
    def step():
        for t in inputs:
            t.grad = None
        first(fn())[0].backward(grad)
    return step


def gradients_of(inputs: list[torch.Tensor]):
    """`bench_rows`' results for a forward_backward step: run it, read the gradients."""
    return lambda step: (step(), [t.grad for t in inputs])[1]


def bench_dispatch_train(shape_args, device, dtype, use_triton, repeats, ceilings):
    """Forward + backward: x, routing weights, w_in, w_out all get gradients."""
    n_tokens, d_model, d_hidden, n_experts, k = shape_args
    x, ids, weights, w_in, w_out = dispatch_inputs(*shape_args, device, dtype, seed=1)
    shape = dict(N=n_tokens, D=d_model, F=d_hidden, E=n_experts, K=k)
    flops, bytes_moved = dispatch_cost(*shape_args, x.element_size())
    flops, bytes_moved = 3 * flops, 3 * bytes_moved  # backward ~ 2 x forward
    grad = torch.randn_like(x)
    wide = [t.float().requires_grad_() for t in (x, weights, w_in, w_out)]
    forward_backward(lambda: dispatch_and_combine(wide[0], ids, *wide[1:], None), wide,
                     grad.float())()
    expect = [t.grad for t in wide]
    del wide
    leaves = [t.requires_grad_() for t in (x, weights, w_in, w_out)]
    impls = {"reference": dispatch_and_combine}
    if use_triton:
        impls["triton"] = dispatch_and_combine_trainable
    if device.type == "cpu":  # what CPU training runs (kernels.ops.expert_dispatch)
        impls["grouped"] = dispatch_grouped
    impls = {name: forward_backward(lambda fn=fn: fn(x, ids, weights, w_in, w_out, None),
                                    leaves, grad) for name, fn in impls.items()}
    return bench_rows("dispatch_fwd_bwd", shape, impls, expect, flops, bytes_moved, device,
                      repeats, ceilings, gradients_of(leaves))


# ---------------------------------------------------------------------------------------
# Causal prefill
# ---------------------------------------------------------------------------------------

def prefill_inputs(n_seqs, length, n_heads, n_kv_heads, head_dim, device, dtype, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    n = n_seqs * length
    q, k, v = (torch.randn(n, h, head_dim, device=device, dtype=dtype, generator=gen)
               for h in (n_heads, n_kv_heads, n_kv_heads))
    cu_seqlens = torch.arange(0, n + 1, length, device=device, dtype=torch.int32)
    return q, k, v, cu_seqlens


def padded(t: torch.Tensor, n_seqs: int, n_heads: int | None = None) -> torch.Tensor:
    """[B*T, heads, Dh] -> [B, heads, T, Dh]; K/V repeated to `n_heads` when given."""
    t = t.view(n_seqs, -1, t.shape[1], t.shape[2]).transpose(1, 2)
    return t.repeat_interleave(n_heads // t.shape[1], dim=1) if n_heads else t


def sdpa_flash(q, k, v, n_seqs):
    """SDPA on the padded batch with the flash backend only (K/V repeated for GQA: what a
    user of SDPA does where flash takes no grouped K/V)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    n_heads = q.shape[1]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(padded(q, n_seqs), padded(k, n_seqs, n_heads),
                                              padded(v, n_seqs, n_heads), is_causal=True)


def prefill_expect(q, k, v, n_seqs, grad=None):
    """float32 causal attention on the same inputs (and its gradients when `grad`)."""
    wide = [t.float().requires_grad_(grad is not None) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(padded(wide[0], n_seqs), padded(wide[1], n_seqs, q.shape[1]),
                                         padded(wide[2], n_seqs, q.shape[1]), is_causal=True)
    out = out.transpose(1, 2).reshape(q.shape)  # [B*T, H, Dh]
    if grad is None:
        return [out]
    out.backward(grad.float())
    return [t.grad for t in wide]


def prefill_cost(n_seqs, length, n_heads, n_kv_heads, head_dim, element_size):
    flops = 4 * n_seqs * length * length / 2 * n_heads * head_dim  # causal half of QK^T and PV
    n = n_seqs * length
    bytes_moved = (2 * n * n_heads + 2 * n * n_kv_heads) * head_dim * element_size
    return flops, bytes_moved


def bench_prefill(shape_args, device, dtype, use_triton, repeats, ceilings, train=False):
    """The forward, or with `train` forward + backward into q, k and v."""
    n_seqs, length, n_heads, n_kv_heads, head_dim = shape_args
    q, k, v, cu_seqlens = prefill_inputs(*shape_args, device, dtype, seed=int(train))
    shape = dict(B=n_seqs, T=length, H=n_heads, G=n_kv_heads, Dh=head_dim)
    flops, bytes_moved = prefill_cost(*shape_args, q.element_size())
    impls = {"reference": lambda: varlen_causal_attention_reference(q, k, v, cu_seqlens)}
    if device.type == "cuda":
        impls["sdpa_flash"] = lambda: sdpa_flash(q, k, v, n_seqs).transpose(1, 2).reshape(q.shape)
    if use_triton:
        triton_path = varlen_causal_attention_trainable if train else varlen_causal_attention_triton
        impls["triton"] = lambda: triton_path(q, k, v, cu_seqlens, length)
    if not train:
        return bench_rows("prefill", shape, impls, prefill_expect(q, k, v, n_seqs), flops,
                          bytes_moved, device, repeats, ceilings)
    grad = torch.randn_like(q)
    expect = prefill_expect(q, k, v, n_seqs, grad)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    impls = {name: forward_backward(fn, leaves, grad) for name, fn in impls.items()}
    return bench_rows("prefill_fwd_bwd", shape, impls, expect, 3.5 * flops, 3 * bytes_moved,
                      device, repeats, ceilings, gradients_of(leaves))  # backward ~ 2.5 x forward


# ---------------------------------------------------------------------------------------
# Paged decode
# ---------------------------------------------------------------------------------------

def decode_inputs(n_seqs, context, n_heads, n_kv_heads, head_dim, block_size, device, dtype,
                  n_new=1):
    """Every sequence at `context` keys, its blocks scattered in the pool, its last `n_new`
    tokens the queries: -> paged_attention's arguments, and the same keys and values
    contiguous [B, G, S, Dh]."""
    gen = torch.Generator(device).manual_seed(0)
    blocks_each = -(-context // block_size)
    n_blocks = n_seqs * blocks_each
    k_pool = torch.randn(n_blocks, block_size, n_kv_heads, head_dim, device=device, dtype=dtype,
                         generator=gen)
    v_pool = torch.randn(k_pool.shape, device=device, dtype=dtype, generator=gen)
    tables = torch.randperm(n_blocks, device=device, generator=gen).view(n_seqs, blocks_each)
    tables = tables.to(torch.int32)  # [B, MB]
    seq_lens = torch.full((n_seqs,), context, device=device, dtype=torch.int32)
    query_start = torch.arange(0, n_seqs * n_new + 1, n_new, device=device, dtype=torch.int32)
    q = torch.randn(n_seqs * n_new, n_heads, head_dim, device=device, dtype=dtype, generator=gen)
    keys = k_pool[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    values = v_pool[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    return (q, k_pool, v_pool, tables, seq_lens, query_start), keys, values


def bench_decode(shape_args, device, dtype, use_triton, repeats, ceilings):
    n_seqs, context, n_heads, n_kv_heads, head_dim, block_size = shape_args
    args, keys, values = decode_inputs(*shape_args, device, dtype)
    q = args[0]
    shape = dict(B=n_seqs, S=context, H=n_heads, G=n_kv_heads, Dh=head_dim, block_size=block_size)
    flops = 4 * n_seqs * context * n_heads * head_dim
    bytes_moved = 2 * n_seqs * context * n_kv_heads * head_dim * q.element_size()
    expect = [F.scaled_dot_product_attention(
        q.float()[:, :, None], keys.float(), values.float(), enable_gqa=True)[:, :, 0]]  # [B, H, Dh]
    impls = {
        "reference": lambda: paged_attention_reference(*args),
        "sdpa_contiguous": lambda: F.scaled_dot_product_attention(
            q[:, :, None], keys, values, enable_gqa=True)[:, :, 0],
    }
    if use_triton:
        impls["triton"] = lambda: paged_attention_triton(*args, max_query_len=1)
    return bench_rows("decode", shape, impls, expect, flops, bytes_moved, device, repeats,
                      ceilings, graph=True)


def bench_paged_prefill(shape_args, device, dtype, use_triton, repeats, ceilings):
    """A prefill chunk of C new tokens per sequence at the end of S cached keys, as the
    serving engine runs it: the flash kernel through the block table (`triton`, what
    paged_attention_triton picks) beside the split-key decode kernel it replaces there
    (`triton_decode`) and, for a whole prompt (C = S), the varlen kernel on contiguous
    K/V (`triton_contiguous`: what paging costs)."""
    n_seqs, context, chunk, n_heads, n_kv_heads, head_dim, block_size = shape_args
    args, keys, values = decode_inputs(n_seqs, context, n_heads, n_kv_heads, head_dim,
                                       block_size, device, dtype, n_new=chunk)
    q = args[0]
    shape = dict(B=n_seqs, S=context, C=chunk, H=n_heads, G=n_kv_heads, Dh=head_dim,
                 block_size=block_size)
    pairs = chunk * (context - chunk) + chunk * (chunk + 1) / 2  # (query, key) pairs per sequence
    flops = 4 * n_seqs * pairs * n_heads * head_dim
    bytes_moved = 2 * n_seqs * (context * n_kv_heads + chunk * n_heads) * head_dim * q.element_size()
    expect = [paged_attention_reference(*[t.float() if t.is_floating_point() else t for t in args])]
    impls = {"reference": lambda: paged_attention_reference(*args)}
    if use_triton:
        impls["triton"] = lambda: paged_attention_triton(*args, max_query_len=chunk)
        impls["triton_decode"] = lambda: paged_decode_triton(*args)
        if chunk == context:
            k, v = (t.transpose(1, 2).flatten(0, 1) for t in (keys, values))  # [B*S, G, Dh]
            cu_seqlens = args[5]
            impls["triton_contiguous"] = lambda: varlen_causal_attention_triton(
                q, k, v, cu_seqlens, chunk)
    return bench_rows("paged_prefill", shape, impls, expect, flops, bytes_moved, device,
                      repeats, ceilings)


# ---------------------------------------------------------------------------------------
# A whole training step
# ---------------------------------------------------------------------------------------

def bench_train_step(cfg: ModelConfig, batch, length, device, dtype, use_triton, repeats,
                     ceilings):
    """One AdamW step (forward, loss, backward, update) per backend; tokens/s in each row."""
    tokens = torch.randint(0, cfg.vocab_size, (batch, length + 1), device=device)
    shape = dict(B=batch, T=length, D=cfg.d_model, L=cfg.n_layers, E=cfg.n_experts,
                 K=cfg.experts_per_token)
    flops = 6 * count_parameters(cfg).active * batch * length  # matmul FLOPs, attention aside
    rows = []
    for name, backend in (("reference", "torch"), ("triton", "triton"))[:1 + use_triton]:
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(cfg, kernel_backend=backend))
        model = model.to(device=device, dtype=dtype).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = model_loss(model.cfg, model(tokens[:, :-1]), tokens[:, 1:]).total
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        # a second of steps (about 20 on an H100): do_bench's default budget held two or
        # three, and the figure moved by a third between runs (README, Kernels)
        r = row("train_step", name, shape, timed(step, device, repeats, budget_ms=1000), flops, 0.0, ceilings)
        rows.append(dict(r, tokens_per_s=batch * length / (r["ms"] / 1e3)))
        print(f"  train_step {name}: {r['ms']:.3f} ms", flush=True)
        del model, optimizer
    return rows


# ---------------------------------------------------------------------------------------
# Shapes, ratios, output
# ---------------------------------------------------------------------------------------

MIXTRAL_MOE = (4096, 14336, 8, 2)  # D, F, E, K
GPU_SHAPES = dict(
    dispatch=[(n, *MIXTRAL_MOE) for n in (1, 16, 256, 4096)],
    dispatch_fwd_bwd=[(4096, *MIXTRAL_MOE)],
    prefill=[(4, 2048, 32, 1, 128), (4, 2048, 32, 32, 128)],
    prefill_fwd_bwd=[(4, 2048, 32, 1, 128), (4, 2048, 32, 32, 128)],
    decode=[(1, 4096, 32, 8, 128, 16), (32, 4096, 32, 8, 128, 16), (32, 4096, 32, 1, 128, 16)],
    paged_prefill=[(4, 4096, 256, 32, 8, 128, 16), (4, 2048, 2048, 32, 8, 128, 16)],
    train=(ModelConfig(d_model=1024, n_layers=4, n_heads=16, n_kv_heads=4, d_expert=2816,
                       n_experts=8, max_seq_len=2048), 8, 1024),
)
QUICK_SHAPES = dict(
    dispatch=[(3, 64, 96, 8, 2), (40, 64, 96, 8, 2)],
    dispatch_fwd_bwd=[(40, 64, 96, 8, 2), (3072, 128, 128, 16, 2)],  # and a task-mix batch
    prefill=[(2, 40, 4, 1, 32), (2, 40, 4, 4, 32)],
    prefill_fwd_bwd=[(2, 40, 4, 1, 32)],
    decode=[(1, 100, 4, 2, 32, 16), (3, 100, 4, 1, 32, 16)],
    paged_prefill=[(2, 100, 20, 4, 2, 32, 16), (2, 40, 40, 4, 1, 32, 16)],
    train=(ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, d_expert=128,
                       n_experts=4, max_seq_len=64), 2, 32),
)


# Alternatives each sweep times after the table's own choice (kernels/: *_launch).
DISPATCH_ALTERNATIVES = [dispatch_config(*c) for c in (
    (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 128, 64, 4, 4), (64, 128, 64, 4, 3),
    (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4),
    (128, 256, 64, 8, 3))]
PREFILL_ALTERNATIVES = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st)
                        for m, n, w, st in ((128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                                            (128, 128, 8, 2), (128, 32, 4, 4))]
BACKWARD_ALTERNATIVES = [dict(BLOCK_M=b, BLOCK_N=b, num_warps=w, num_stages=st)
                         for b, w, st in ((64, 8, 2), (64, 4, 2), (32, 4, 2), (64, 8, 3))]


def sweep(shapes: dict, device, dtype, repeats) -> list[dict]:
    """Time launch configurations of each kernel at `shapes` (on the GPU shapes, what the
    launch tables in kernels/ were read from), the table's own choice first. Each
    variant's output is compared with the first's, so one that computes something else
    shows."""
    from kernels.attention import paged_launch, varlen_launch
    from kernels.attention_backward import (backward_launch, varlen_attention_backward,
                                            varlen_attention_forward_lse)
    results = []

    def run(kernel, shape, variants, make):
        base = None
        for launch in variants:
            fn = make(launch)
            try:
                out = first(fn())[0].float()
                base = out if base is None else base
                err = errors([out], [base])["rel_err"]
                ms = timed(fn, device, repeats) * 1e3
            except Exception as e:  # a configuration the device refuses (shared memory)
                results.append(dict(kernel=kernel, shape=shape, launch=launch, error=str(e)[:200]))
                print(f"  sweep {kernel} {shape} {launch}: {str(e)[:100]}", flush=True)
                continue
            results.append(dict(kernel=kernel, shape=shape, launch=launch, ms=ms,
                                rel_err_vs_first=err))
            print(f"  sweep {kernel} {json.dumps(shape)} {json.dumps(launch)}: {ms:.3f} ms "
                  f"(vs first {err:.1e})", flush=True)

    for shape in shapes["dispatch"][1:]:  # the single-token shape aside
        n = shape[0]
        x, ids, weights, w_in, w_out = dispatch_inputs(*shape, device, dtype)
        run("dispatch", dict(N=n), [dispatch_launch(n * shape[4], device)] + DISPATCH_ALTERNATIVES,
            lambda c: lambda: dispatch_and_combine_triton(x, ids, weights, w_in, w_out, None, c))
        del x, ids, weights, w_in, w_out
    for shape in shapes["prefill"]:
        length, head_dim = shape[1], shape[4]
        q, k, v, cu = prefill_inputs(*shape, device, dtype)
        run("prefill", dict(G=shape[3]),
            [varlen_launch(length, head_dim, dtype, device)] + PREFILL_ALTERNATIVES,
            lambda c: lambda: varlen_causal_attention_triton(q, k, v, cu, length, c))
        out, lse = varlen_attention_forward_lse(q, k, v, cu, length)
        grad = torch.randn_like(q)
        run("prefill_backward", dict(G=shape[3]),
            [backward_launch(length, head_dim, device)] + BACKWARD_ALTERNATIVES,
            lambda c: lambda: torch.cat([g.flatten() for g in varlen_attention_backward(
                grad, q, k, v, out, lse, cu, length, c)]))
    for shape in shapes["paged_prefill"]:
        n_seqs, context, chunk, n_heads, n_kv_heads, head_dim, block_size = shape
        args, _, _ = decode_inputs(n_seqs, context, n_heads, n_kv_heads, head_dim, block_size,
                                   device, dtype, n_new=chunk)
        run("paged_prefill", dict(S=context, C=chunk),
            [varlen_launch(chunk, head_dim, dtype, device)] + PREFILL_ALTERNATIVES,
            lambda c: lambda: paged_prefill_triton(*args, chunk, c))
    for shape in shapes["decode"]:
        n_seqs, context, n_kv_heads = shape[0], shape[1], shape[3]
        args, _, _ = decode_inputs(*shape, device, dtype)
        table = paged_launch(context, n_seqs, n_kv_heads, device)
        half = max(16, table["split_len"] // 32 * 16)  # a multiple of 16
        variants = [table, dict(table, split_len=half), dict(table, split_len=2 * table["split_len"]),
                    dict(table, num_warps=8), dict(table, num_stages=3),
                    dict(table, split_len=half, num_stages=3)]
        run("decode", dict(B=n_seqs, G=n_kv_heads), variants,
            lambda c: lambda: paged_decode_triton(*args, launch=c))
    return results


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_reference: reference time / this row's time, for rows of one kernel and shape."""
    for r in rows:
        ref = next(o for o in rows if o["kernel"] == r["kernel"] and o["shape"] == r["shape"]
                   and o["impl"] == "reference")
        r["speedup_vs_reference"] = ref["ms"] / r["ms"]


def targets(rows: list[dict], ceilings: dict) -> list[dict]:
    """The issue's figures: each a measured ratio beside its goal (GPU runs only)."""
    def find(kernel, impl, **shape):
        return [r for r in rows if r["kernel"] == kernel and r["impl"] == impl
                and all(r["shape"].get(key) == value for key, value in shape.items())]
    out = []
    for r in find("dispatch", "triton") + find("dispatch", "triton_graph"):
        n = r["shape"]["N"]
        if 16 <= n <= 256:
            # the most any kernel could gain: the loop's time over the time to read every
            # used expert's weights once at the measured copy bandwidth
            ref = find("dispatch", "reference", N=n)[0]
            floor_ms = r["ms"] * r["gb_per_s"] / ceilings["copy_gb_per_s"]
            out.append(dict(figure=f"dispatch N={n}: {r['impl']} speed / bf16 per-expert loop",
                            goal=2.0, measured=r["speedup_vs_reference"],
                            best_possible=ref["ms"] / floor_ms))
        if n >= 4096:
            dense = find("dispatch", "dense", N=n)[0]
            out.append(dict(figure=f"dispatch N={n}: triton TFLOP/s / dense bf16 matmul TFLOP/s",
                            goal=0.6, measured=r["tflops"] / dense["tflops"]))
    for kernel in ("prefill", "prefill_fwd_bwd"):
        for r in find(kernel, "triton"):
            flash = find(kernel, "sdpa_flash", **r["shape"])
            if flash:
                out.append(dict(figure=f"{kernel} G={r['shape']['G']}: triton TFLOP/s / SDPA flash",
                                goal=0.8 if kernel == "prefill" else None,
                                measured=r["tflops"] / flash[0]["tflops"]))
    for r in find("decode", "triton", B=32) + find("decode", "triton_graph", B=32):
        out.append(dict(figure=f"decode B=32 S={r['shape']['S']} G={r['shape']['G']} {r['impl']}: "
                               "GB/s / device copy GB/s", goal=0.7, measured=r["share_of_copy"]))
    for r in find("paged_prefill", "triton"):
        for other in ("triton_decode", "triton_contiguous"):
            base = find("paged_prefill", other, **r["shape"])
            if base:
                out.append(dict(figure=f"paged_prefill C={r['shape']['C']} S={r['shape']['S']}: "
                                       f"triton speed / {other}", goal=None,
                                measured=base[0]["ms"] / r["ms"]))
    for t in out:
        t["met"] = None if t["goal"] is None else t["measured"] >= t["goal"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--only", nargs="*", default=None,
                        choices=["dispatch", "dispatch_fwd_bwd", "prefill", "prefill_fwd_bwd",
                                 "decode", "paged_prefill", "train"],
                        help="run these row groups only")
    parser.add_argument("--sweep", action="store_true",
                        help="also time launch configurations per kernel; JSON key 'sweep'")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    use_triton = triton_available() and (device.type == "cuda" or interpreted)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if use_triton:
        note = f"Triton rows and reference rows timed side by side on {name}" + (
            " through the interpreter: a plumbing check, the times mean nothing" if interpreted else "")
    else:
        note = (f"no Triton rows: they need a CUDA GPU (device here: {name}, triton importable: "
                f"{triton_available()}); only the PyTorch rows ran, GPU figures are still owed")
    print(note, flush=True)
    quick = args.quick or device.type == "cpu"
    shapes = QUICK_SHAPES if quick else GPU_SHAPES
    groups = args.only or list(shapes)
    repeats = 5 if quick else 20
    ceilings = measure_ceilings(device)
    print(f"ceilings: copy {ceilings['copy_gb_per_s']:.0f} GB/s, matmul "
          f"{ceilings['matmul_tflops']:.1f} TFLOP/s", flush=True)
    run = dict(dispatch=bench_dispatch, dispatch_fwd_bwd=bench_dispatch_train,
               prefill=bench_prefill, prefill_fwd_bwd=functools.partial(bench_prefill, train=True), decode=bench_decode,
               paged_prefill=bench_paged_prefill)
    rows = []
    for group in groups:
        if group == "train":
            rows += bench_train_step(*shapes["train"], device, dtype, use_triton, repeats, ceilings)
            continue
        for shape in shapes[group]:
            rows += run[group](shape, device, dtype, use_triton, repeats, ceilings)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    add_speedups(rows)
    swept = []
    if args.sweep and use_triton:
        try:
            swept = sweep(shapes, device, dtype, repeats)
        except Exception:  # keep the rows measured so far
            import traceback
            traceback.print_exc()
    for r in rows:
        tokens = f"  {r['tokens_per_s']:.0f} tok/s" if "tokens_per_s" in r else ""
        err = f"  rel_err {r['rel_err']:.1e}" if "rel_err" in r else ""
        print(f"{r['kernel']:16} {r['impl']:15} {json.dumps(r['shape']):62} {r['ms']:9.3f} ms "
              f"{r['tflops']:7.1f} TFLOP/s {r['gb_per_s']:7.0f} GB/s  x{r['speedup_vs_reference']:.2f}"
              f"{err}{tokens}")
    goals = targets(rows, ceilings) if device.type == "cuda" and use_triton else []
    for t in goals:
        print(f"{t['figure']:72} {t['measured']:6.2f}  goal {t['goal']}  "
              f"{'' if t['met'] is None else ('met' if t['met'] else 'NOT MET')}")
    slug = "gpu" if device.type == "cuda" else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = Path(args.out or f"benchmarks/results/kernels_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    out.write_text(json.dumps(dict(
        command="python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:]),
        device=name, multiprocessors=props.multi_processor_count if props else None,
        dtype=str(dtype).removeprefix("torch."), triton=use_triton, interpreted=interpreted,
        triton_version=__import__("triton").__version__ if triton_available() else None,
        torch=torch.__version__, note=note, ceilings=ceilings, targets=goals, rows=rows,
        **(dict(sweep=swept) if swept else {})),
        indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
