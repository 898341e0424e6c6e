"""MoE against a dense model with the same active parameters per token, side by side.

Why: the case for GPT-4 being sparse is that at equal compute per token an MoE, which
holds E/K times more expert parameters, reaches a lower loss. This trains the tiny MoE
(16 experts, top-2) and a dense twin whose FFN is K experts wide (so each token touches
the same FFN parameters) on the same batches, step by step in one process, and records
validation loss for both, whichever way it comes out.

    .venv/bin/python benchmarks/moe_vs_dense.py --steps 200 --eval-every 50

Writes benchmarks/results/moe_vs_dense.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from moe.config import load_setup
from moe.training.data import get_batch, prepare
from moe.model.transformer import Transformer, count_parameters
from moe.training.loop import evaluate, make_optimizer, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default="benchmarks/results/moe_vs_dense.json")
    args = parser.parse_args()

    setup = load_setup(args.config, [f"train.max_steps={args.steps}", *args.set])
    cfg, moe_cfg = setup["train"], setup["model"]
    dense_cfg = dataclasses.replace(moe_cfg, moe_every=0, d_ff=moe_cfg.experts_per_token * moe_cfg.d_expert)
    corpus = prepare(setup["data"], seed=cfg.seed)
    device = torch.device("cpu")
    runs = {}
    for name, model_cfg in (("moe", moe_cfg), ("dense", dense_cfg)):
        torch.manual_seed(cfg.seed)
        model = Transformer(model_cfg)
        counts = count_parameters(model_cfg)
        runs[name] = {"model": model, "optimizer": make_optimizer(model, cfg), "seconds": 0.0,
                      "total_params": counts.total, "active_params": counts.active, "val_loss": []}
    for step in range(args.steps):
        micro = [get_batch(corpus.train, cfg.seq_len, cfg.batch_size, cfg.seed, step * cfg.grad_accum + i)
                 for i in range(cfg.grad_accum)]
        for name, run in runs.items():
            began = time.perf_counter()
            train_step(run["model"], run["optimizer"], micro, cfg, step, device)
            run["seconds"] += time.perf_counter() - began
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            line = [f"step {step + 1}"]
            for name, run in runs.items():
                loss = evaluate(run["model"], corpus, cfg, device)["val_loss"]
                run["val_loss"].append([step + 1, loss])
                line.append(f"{name} val loss {loss:.4f}")
            print(", ".join(line), flush=True)
    result = {"config": args.config, "overrides": args.set, "steps": args.steps,
              "tokens_per_step": cfg.batch_size * cfg.seq_len * cfg.grad_accum, "device": "cpu",
              "threads": torch.get_num_threads(), "data": setup["data"].source,
              "runs": {name: {k: v for k, v in run.items() if k not in ("model", "optimizer")}
                       for name, run in runs.items()}}
    moe_final, dense_final = (result["runs"][n]["val_loss"][-1][1] for n in ("moe", "dense"))
    result["final_val_loss_ratio_moe_over_dense"] = moe_final / dense_final
    result["train_time_ratio_moe_over_dense"] = runs["moe"]["seconds"] / runs["dense"]["seconds"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"final val loss: moe {moe_final:.4f}, dense {dense_final:.4f} (ratio {moe_final / dense_final:.3f}); "
          f"train time moe/dense {result['train_time_ratio_moe_over_dense']:.2f}; "
          f"params moe {runs['moe']['total_params']:,} total / {runs['moe']['active_params']:,} active, "
          f"dense {runs['dense']['total_params']:,}; wrote {args.out}")


if __name__ == "__main__":
    main()
