"""The rotary embedding's autograd Function against the chunk-and-cat form it replaced,
alone (forward + backward on one layer's queries) and inside a whole training step.

Why: the Function was measured on CPU only (benchmarks/bench_train_step.py), where it
cut the step by a few percent; on a GPU both forms are a handful of elementwise kernels
and launch overhead can decide. The two forms alternate, round after round, in one
process, so drift on a shared machine hits both alike; each figure is a median.

    python benchmarks/bench_rope.py --out benchmarks/results/rope_gpu.json   # on a GPU
    .venv/bin/python benchmarks/bench_rope.py --quick                         # plumbing on CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moe.model.attention as attention  # noqa: E402
from benchmarks.bench_kernels import GPU_SHAPES, QUICK_SHAPES  # noqa: E402
from moe.model.transformer import Transformer, model_loss  # noqa: E402

FORMS = {"function": attention.apply_rope, "reference": attention.apply_rope_reference}


def wall(fn, device: torch.device, calls: int) -> float:
    """Seconds per call of `fn`, over `calls` calls after the device has drained."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - begin) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    parser.add_argument("--rounds", type=int, default=None, help="alternations of the two forms")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible; use --device cpu")
    quick = args.quick or device.type == "cpu"
    rounds = args.rounds or (3 if quick else 7)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg, batch, length = (QUICK_SHAPES if quick else GPU_SHAPES)["train"]
    cfg = dataclasses.replace(cfg, kernel_backend="triton" if device.type == "cuda" else "torch")
    head_dim = cfg.head_dim

    # one layer's queries: x [B, H, T, Dh]
    x = torch.randn(batch, cfg.n_heads, length, head_dim, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    cos, sin = attention.rope_angles(torch.arange(length, device=device).expand(batch, -1),
                                     head_dim, cfg.rope_base)
    torch.manual_seed(0)
    model = Transformer(cfg).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, length + 1), device=device)

    def op(form):
        return lambda: form(x, cos, sin).backward(grad)

    def step():
        loss = model_loss(cfg, model(tokens[:, :-1]), tokens[:, 1:]).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = {f"{what}_{name}": [] for what in ("op", "step") for name in FORMS}
    for name, form in FORMS.items():  # warm-up: kernels compiled, allocator filled
        attention.apply_rope = form
        wall(op(form), device, 3)
        wall(step, device, 2)
    for r in range(rounds):
        for name, form in FORMS.items():
            attention.apply_rope = form  # what Attention.forward calls
            times[f"op_{name}"].append(wall(op(form), device, 20 if not quick else 5))
            times[f"step_{name}"].append(wall(step, device, 5 if not quick else 2))
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.3f} ms" for k, v in times.items()),
              flush=True)
    attention.apply_rope = FORMS["function"]
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    result = dict(
        command="python benchmarks/bench_rope.py " + " ".join(sys.argv[1:]),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__, dtype=str(dtype).removeprefix("torch."), rounds=rounds,
        op_shape=dict(B=batch, H=cfg.n_heads, T=length, Dh=head_dim),
        step_shape=dict(B=batch, T=length, D=cfg.d_model, L=cfg.n_layers, E=cfg.n_experts),
        median_ms=ms,
        op_speedup=ms["op_reference"] / ms["op_function"],
        step_speedup=ms["step_reference"] / ms["step_function"],
        times_ms={k: [t * 1e3 for t in v] for k, v in times.items()})
    print(f"rope fwd+bwd: function {ms['op_function']:.3f} ms, reference {ms['op_reference']:.3f} ms "
          f"({result['op_speedup']:.2f}x); training step: {ms['step_function']:.2f} against "
          f"{ms['step_reference']:.2f} ms ({result['step_speedup']:.2f}x)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
