"""Kernel benchmark: each Triton kernel beside its reference and the obvious PyTorch way.

Why side by side: absolute times depend on the machine and on what else runs on it; the
ratio between two implementations timed in one process, on the same inputs, does not.
Each row reports time, TFLOP/s, GB/s and the share of the device's peak (for the GPUs
in PEAKS), and the speed-up over the reference.

    python benchmarks/bench_kernels.py                 # on a GPU: every row, bf16
    python benchmarks/bench_kernels.py --quick         # smaller shapes
    python benchmarks/bench_kernels.py --device cpu    # reference rows only (no Triton)

Rows:
    dispatch  triton (align + grouped GEMM, SwiGLU fused) | reference (per-expert loop)
    prefill   triton varlen | reference (per-sequence SDPA) | sdpa (padded batch, is_causal)
    decode    triton paged (flash-decoding) | reference (per-sequence gather + SDPA)
              | sdpa over a contiguous cache (no paging, the bandwidth bound to beat)
    dispatch_fwd_bwd  forward + backward: triton (kernels/moe_dispatch_backward.py)
                      | reference (per-expert loop under autograd)
    prefill_fwd_bwd   forward + backward: triton (kernels/attention_backward.py)
                      | reference (per-sequence SDPA) | sdpa (padded batch, is_causal)
    train_step        one AdamW step of a small MoE model, kernel_backend triton | torch
                      (reference), with tokens_per_s

Results go to benchmarks/results/kernels_<device>.json. On a CPU only the PyTorch rows
run and the file says so: the GPU figures have to come from a GPU run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kernels.attention import (paged_attention_reference, paged_attention_triton,
                               varlen_causal_attention_reference, varlen_causal_attention_triton)
from kernels.backend import triton_available
from kernels.attention_backward import varlen_causal_attention_trainable
from kernels.moe_dispatch import dispatch_and_combine, dispatch_and_combine_triton
from kernels.moe_dispatch_backward import dispatch_and_combine_trainable
from moe.config import ModelConfig
from moe.model import Transformer, count_parameters, model_loss

# Dense bf16 tensor-core peak (TFLOP/s) and memory bandwidth (GB/s), from the data sheets.
PEAKS = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "A100": (312.0, 2039.0)}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def row(kernel: str, impl: str, shape: dict, seconds: float, flops: float, bytes_moved: float,
        peak: tuple[float, float] | None) -> dict:
    tflops, gbs = flops / seconds / 1e12, bytes_moved / seconds / 1e9
    out = dict(kernel=kernel, impl=impl, shape=shape, ms=seconds * 1e3, tflops=tflops, gb_per_s=gbs)
    if peak:
        out.update(flops_share_of_peak=tflops / peak[0], bandwidth_share_of_peak=gbs / peak[1])
    return out


def bench_dispatch(n_tokens, d_model, d_hidden, n_experts, k, device, dtype, use_triton, repeats, peak):
    x = torch.randn(n_tokens, d_model, device=device, dtype=dtype)
    logits = torch.randn(n_tokens, n_experts, device=device)
    weights, ids = logits.softmax(-1).topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    w_in = torch.randn(n_experts, d_model, 2 * d_hidden, device=device, dtype=dtype) * 0.02
    w_out = torch.randn(n_experts, d_hidden, d_model, device=device, dtype=dtype) * 0.02
    shape = dict(N=n_tokens, D=d_model, F=d_hidden, E=n_experts, K=k)
    flops = 6 * n_tokens * k * d_model * d_hidden
    used = min(n_experts, n_tokens * k)
    bytes_moved = (used * 3 * d_model * d_hidden + 2 * n_tokens * d_model) * x.element_size()
    impls = {"reference": lambda: dispatch_and_combine(x, ids, weights, w_in, w_out, None)}
    if use_triton:
        impls["triton"] = lambda: dispatch_and_combine_triton(x, ids, weights, w_in, w_out, None)
    return [row("dispatch", name, shape, timed(fn, device, repeats), flops, bytes_moved, peak)
            for name, fn in impls.items()]


def bench_prefill(n_seqs, length, n_heads, n_kv_heads, head_dim, device, dtype, use_triton, repeats, peak):
    n = n_seqs * length
    q = torch.randn(n, n_heads, head_dim, device=device, dtype=dtype)
    k = torch.randn(n, n_kv_heads, head_dim, device=device, dtype=dtype)
    v = torch.randn(n, n_kv_heads, head_dim, device=device, dtype=dtype)
    cu_seqlens = torch.arange(0, n + 1, length, device=device, dtype=torch.int32)
    q4, k4, v4 = (t.view(n_seqs, length, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    shape = dict(B=n_seqs, T=length, H=n_heads, G=n_kv_heads, Dh=head_dim)
    flops = 4 * n_seqs * length * length / 2 * n_heads * head_dim  # causal half of QK^T and PV
    bytes_moved = (2 * q.numel() + 2 * k.numel()) * q.element_size()
    impls = {
        "reference": lambda: varlen_causal_attention_reference(q, k, v, cu_seqlens),
        "sdpa": lambda: F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True),
    }
    if use_triton:
        impls["triton"] = lambda: varlen_causal_attention_triton(q, k, v, cu_seqlens)
    return [row("prefill", name, shape, timed(fn, device, repeats), flops, bytes_moved, peak)
            for name, fn in impls.items()]


def bench_decode(n_seqs, context, n_heads, n_kv_heads, head_dim, block_size, device, dtype,
                 use_triton, repeats, peak):
    blocks_each = -(-context // block_size)
    n_blocks = n_seqs * blocks_each
    k_pool = torch.randn(n_blocks, block_size, n_kv_heads, head_dim, device=device, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    tables = torch.randperm(n_blocks, device=device).view(n_seqs, blocks_each).to(torch.int32)
    seq_lens = torch.full((n_seqs,), context, device=device, dtype=torch.int32)
    query_start = torch.arange(n_seqs + 1, device=device, dtype=torch.int32)  # one query each
    q = torch.randn(n_seqs, n_heads, head_dim, device=device, dtype=dtype)
    keys = k_pool[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()  # [B, G, S, Dh]
    values = v_pool[tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()
    args = (q, k_pool, v_pool, tables, seq_lens, query_start)
    shape = dict(B=n_seqs, S=context, H=n_heads, G=n_kv_heads, Dh=head_dim, block_size=block_size)
    flops = 4 * n_seqs * context * n_heads * head_dim
    bytes_moved = 2 * n_seqs * context * n_kv_heads * head_dim * q.element_size()
    impls = {
        "reference": lambda: paged_attention_reference(*args),
        "sdpa_contiguous": lambda: F.scaled_dot_product_attention(q[:, :, None], keys, values,
                                                                  enable_gqa=True),
    }
    if use_triton:
        impls["triton"] = lambda: paged_attention_triton(*args)
    return [row("decode", name, shape, timed(fn, device, repeats), flops, bytes_moved, peak)
            for name, fn in impls.items()]


def forward_backward(fn, inputs: list[torch.Tensor]):
    """A closure running fn() and backpropagating a fixed random gradient into `inputs`."""
    def step():
        for t in inputs:
            t.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)
    out = fn()
    grad = torch.randn_like(out[0] if isinstance(out, tuple) else out)
    return step


def bench_dispatch_train(n_tokens, d_model, d_hidden, n_experts, k, device, dtype, use_triton,
                         repeats, peak):
    """Forward + backward of the dispatch: x, routing weights, w_in, w_out all get gradients."""
    x = torch.randn(n_tokens, d_model, device=device, dtype=dtype)
    weights, ids = torch.randn(n_tokens, n_experts, device=device).softmax(-1).topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(dtype)
    w_in = torch.randn(n_experts, d_model, 2 * d_hidden, device=device, dtype=dtype) * 0.02
    w_out = torch.randn(n_experts, d_hidden, d_model, device=device, dtype=dtype) * 0.02
    leaves = [t.requires_grad_() for t in (x, weights, w_in, w_out)]
    shape = dict(N=n_tokens, D=d_model, F=d_hidden, E=n_experts, K=k)
    flops = 3 * 6 * n_tokens * k * d_model * d_hidden  # backward = 2 x forward
    used = min(n_experts, n_tokens * k)
    bytes_moved = 3 * (used * 3 * d_model * d_hidden + 2 * n_tokens * d_model) * x.element_size()
    impls = {"reference": dispatch_and_combine}
    if use_triton:
        impls["triton"] = dispatch_and_combine_trainable
    rows = []
    for name, fn in impls.items():
        step = forward_backward(lambda fn=fn: fn(x, ids, weights, w_in, w_out, None), leaves)
        rows.append(row("dispatch_fwd_bwd", name, shape, timed(step, device, repeats), flops,
                        bytes_moved, peak))
    return rows


def bench_prefill_train(n_seqs, length, n_heads, n_kv_heads, head_dim, device, dtype, use_triton,
                        repeats, peak):
    """Forward + backward of causal attention over B equal-length packed sequences."""
    n = n_seqs * length
    q = torch.randn(n, n_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(n, n_kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(n, n_kv_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    cu_seqlens = torch.arange(0, n + 1, length, device=device, dtype=torch.int32)
    shape = dict(B=n_seqs, T=length, H=n_heads, G=n_kv_heads, Dh=head_dim)
    flops = 3.5 * 4 * n_seqs * length * length / 2 * n_heads * head_dim  # backward = 2.5 x forward
    bytes_moved = 3 * (2 * q.numel() + 2 * k.numel()) * q.element_size()

    def sdpa():
        q4, k4, v4 = (t.view(n_seqs, length, -1, head_dim).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)
    impls = {"reference": lambda: varlen_causal_attention_reference(q, k, v, cu_seqlens),
             "sdpa": sdpa}
    if use_triton:
        impls["triton"] = lambda: varlen_causal_attention_trainable(q, k, v, cu_seqlens)
    return [row("prefill_fwd_bwd", name, shape, timed(forward_backward(fn, [q, k, v]), device,
                                                      repeats), flops, bytes_moved, peak)
            for name, fn in impls.items()]


def bench_train_step(cfg: ModelConfig, batch, length, device, dtype, use_triton, repeats, peak):
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
        r = row("train_step", name, shape, timed(step, device, repeats), flops, 0.0, peak)
        rows.append(dict(r, tokens_per_s=batch * length / (r["ms"] / 1e3)))
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_reference: reference time / this row's time, for rows of one kernel and shape."""
    for r in rows:
        ref = next(o for o in rows if o["kernel"] == r["kernel"] and o["shape"] == r["shape"]
                   and o["impl"] == "reference")
        r["speedup_vs_reference"] = ref["ms"] / r["ms"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    use_triton = device.type == "cuda" and triton_available()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((p for key, p in PEAKS.items() if key in name), None)
    note = ("Triton rows and reference rows timed side by side on " + name) if use_triton else (
        f"no Triton rows: they need a CUDA GPU (device here: {name}, triton importable: "
        f"{triton_available()}); only the PyTorch rows ran, GPU figures are still owed")
    print(note)
    quick = args.quick or device.type == "cpu"
    repeats = 5 if quick else 20
    rows = []
    dispatch_shapes = [(256, 256, 512, 8, 2)] if quick else [
        (16, 1024, 2816, 16, 2), (512, 1024, 2816, 16, 2), (4096, 1024, 2816, 16, 2)]
    for shape in dispatch_shapes:
        rows += bench_dispatch(*shape, device, dtype, use_triton, repeats, peak)
    prefill_shapes = [(2, 128, 8, 1, 64)] if quick else [(8, 1024, 16, 1, 128), (4, 2048, 16, 4, 128)]
    for shape in prefill_shapes:
        rows += bench_prefill(*shape, device, dtype, use_triton, repeats, peak)
    decode_shapes = [(4, 256, 8, 1, 64, 16)] if quick else [
        (1, 8192, 16, 1, 128, 16), (32, 2048, 16, 1, 128, 16), (64, 1024, 16, 4, 128, 16)]
    for shape in decode_shapes:
        rows += bench_decode(*shape, device, dtype, use_triton, repeats, peak)
    for shape in dispatch_shapes[-2:]:
        rows += bench_dispatch_train(*shape, device, dtype, use_triton, repeats, peak)
    for shape in prefill_shapes:
        rows += bench_prefill_train(*shape, device, dtype, use_triton, repeats, peak)
    train_cfg = (ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, d_expert=128,
                             n_experts=4, max_seq_len=64), 2, 64) if quick else (
        ModelConfig(d_model=1024, n_layers=4, n_heads=16, n_kv_heads=4, d_expert=2816,
                    n_experts=8, max_seq_len=2048), 8, 1024)
    rows += bench_train_step(*train_cfg, device, dtype, use_triton, repeats, peak)
    add_speedups(rows)
    for r in rows:
        tokens = f"  {r['tokens_per_s']:.0f} tokens/s" if "tokens_per_s" in r else ""
        print(f"{r['kernel']:16} {r['impl']:16} {json.dumps(r['shape']):70} {r['ms']:9.3f} ms "
              f"{r['tflops']:8.3f} TFLOP/s {r['gb_per_s']:9.1f} GB/s  "
              f"x{r['speedup_vs_reference']:.2f}{tokens}")
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = Path(args.out or f"benchmarks/results/kernels_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(device=name, dtype=str(dtype).removeprefix("torch."),
                                   triton=use_triton, note=note, torch=torch.__version__,
                                   rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
