"""The MoE twist of speculative decoding: how many experts a verify step touches.

Why: speculation pays when checking γ + 1 tokens costs about as much as decoding one,
because a decode step is bound by reading the weights. For a dense model that holds at
any γ. For a sparse one it does not: a decode step of B sequences reads only the experts
its B tokens are routed to, while a verify step routes B(γ + 1) tokens and so reads more
of them. Under uniform top-K routing T tokens hit E(1 - (1 - K/E)^T) of E experts per
layer (moe/cost/estimate.py, expected_experts_hit).

This counts the distinct experts each MoE layer of a trained model actually uses for
T = B(γ + 1) real tokens (stretches of held-out Python, teacher-forced after 64 tokens of
context), against that formula, for batches 1-16 and γ 0-8, and turns the counts into
the weight bytes a verify step reads over those of a plain decode step of the same batch
(shared weights plus touched experts). That ratio is the factor by which the target's
verify forward costs more than the dense model's "about one decode step" assumption.

    .venv/bin/python benchmarks/verify_experts.py --ckpt runs/tiny --threads 2

Writes benchmarks/results/verify_experts.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe.cost.estimate import expected_experts_hit  # noqa: E402
from moe.io.checkpoint import load_model  # noqa: E402
from moe.model.transformer import count_parameters  # noqa: E402
from moe.serving.text import load_tokenizer  # noqa: E402
from moe.training.data import is_validation_file, source_files  # noqa: E402

CONTEXT = 64  # tokens before the verified ones


def held_out_tokens(tokenizer, val_fraction: float = 0.05) -> torch.Tensor:
    root, files = source_files("stdlib")
    text = "".join(f.read_text(errors="replace") for f in files
                   if is_validation_file(str(f.relative_to(root)), val_fraction))
    return torch.tensor(tokenizer.encode(text))


@torch.no_grad()
def distinct_experts(model, tokens: torch.Tensor, batch: int, width: int, draws: int,
                     generator: torch.Generator) -> list[float]:
    """Mean over `draws` of the distinct experts per MoE layer used by `batch` sequences'
    last `width` tokens (each after CONTEXT tokens of its own)."""
    totals = [0.0] * len(model.cfg.moe_layers)
    for _ in range(draws):
        starts = torch.randint(0, len(tokens) - CONTEXT - width, (batch,), generator=generator)
        rows = torch.stack([tokens[s:s + CONTEXT + width] for s in starts.tolist()])  # [B, C + w]
        routing = model(rows).routing
        for layer, stats in enumerate(routing):
            ids = stats.expert_ids.view(batch, CONTEXT + width, -1)[:, CONTEXT:]  # [B, w, K]
            totals[layer] += len(torch.unique(ids))
    return [t / draws for t in totals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="runs/tiny")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--gammas", type=int, nargs="+", default=list(range(9)))
    parser.add_argument("--draws", type=int, default=20, help="random batches per (batch, γ)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/verify_experts.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.ckpt).eval()
    cfg = model.cfg
    if not cfg.moe_layers:
        sys.exit(f"error: {args.ckpt} has no MoE layer: a dense model reads the same weights at any γ")
    tokens = held_out_tokens(load_tokenizer(args.ckpt))
    params = count_parameters(cfg)
    per_expert = 3 * cfg.d_model * cfg.d_expert  # weights of one expert in one layer
    shared = params.total - params.experts  # read by every step
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        decode = sum(distinct_experts(model, tokens, batch, 1, args.draws, generator))  # over layers
        for gamma in args.gammas:
            width = gamma + 1
            measured = distinct_experts(model, tokens, batch, width, args.draws, generator)
            uniform = expected_experts_hit(cfg.n_experts, cfg.experts_per_token, batch * width)
            rows.append(dict(batch=batch, gamma=gamma, tokens=batch * width,
                             experts_per_layer=measured, mean_experts=sum(measured) / len(measured),
                             uniform_routing=uniform,
                             verify_over_decode_bytes=(shared + sum(measured) * per_expert)
                             / (shared + decode * per_expert)))
            print(f"batch {batch:2d} γ {gamma}: {rows[-1]['mean_experts']:5.2f} experts/layer "
                  f"(uniform {uniform:5.2f}), verify reads {rows[-1]['verify_over_decode_bytes']:.2f}x "
                  "the weights of a decode step", flush=True)
    result = dict(command="python " + " ".join(sys.argv), checkpoint=args.ckpt, context=CONTEXT,
                  draws=args.draws, n_experts=cfg.n_experts, experts_per_token=cfg.experts_per_token,
                  shared_params=shared, params_per_expert_per_layer=per_expert, runs=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
