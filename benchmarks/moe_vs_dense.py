"""MoE against a dense model with the same active parameters per token, at equal steps and
at equal wall-clock time.

Why both: the case for GPT-4 being sparse is that at equal compute per token an MoE,
which holds E/K times more expert parameters, reaches a lower loss; at equal steps the
two see the same tokens with the same FLOPs per token. But on a CPU the MoE's dispatch
(routing, sorting tokens by expert, 16 small matmuls instead of one) makes a step slower
than its FLOPs say, so the fair question for someone with this machine is also: given the
same minutes, which is better? Three runs on the same batches and schedule shape:

1. the tiny MoE (16 experts, top-2) for --steps steps;
2. its dense twin (one FFN K experts wide, so each token touches as many FFN parameters)
   for the same steps, interleaved with 1 so both see the same machine load;
3. the dense twin again, for as many steps as fit in the MoE's training time (measured
   in 1 and 2), with its own cosine schedule over those steps.

Each is evaluated on the whole validation split (bits per byte) at a quarter, half,
three quarters and the end of its run; curves against steps and against seconds. All
steps are plain cross-entropy steps (train.unlikelihood_steps = 0: the main job's last
steps decode greedily, which would time decoding, not the architectures).

    .venv/bin/python benchmarks/moe_vs_dense.py --steps 400 --threads 2

Writes benchmarks/results/moe_vs_dense.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from moe.config import load_setup
from moe.model.transformer import Transformer, count_parameters
from moe.training.data import prepare, training_batch
from moe.training.loop import evaluate, make_optimizer, train_step

CHECKPOINTS = (0.25, 0.5, 0.75, 1.0)  # shares of a run at which it is evaluated


class Run:
    """One model in training: its step, its training seconds, its evaluations."""

    def __init__(self, name: str, model_cfg, cfg, corpus):
        torch.manual_seed(cfg.seed)
        self.name, self.cfg, self.corpus = name, cfg, corpus
        self.model = Transformer(model_cfg)
        self.optimizer = make_optimizer(self.model, cfg)
        counts = count_parameters(model_cfg)
        self.params = {"total_params": counts.total, "active_params": counts.active}
        self.step, self.seconds, self.evals = 0, 0.0, []
        self.eval_at = {max(1, round(share * cfg.max_steps)) for share in CHECKPOINTS}

    def advance(self) -> None:
        """One training step on batch `step` (the same batches for every run), then an
        evaluation when the run is at one of its checkpoints."""
        micro = [training_batch(self.corpus, self.cfg.seq_len, self.cfg.batch_size, self.cfg.seed,
                                self.step * self.cfg.grad_accum + i) for i in range(self.cfg.grad_accum)]
        began = time.perf_counter()
        train_step(self.model, self.optimizer, micro, self.cfg, self.step, torch.device("cpu"))
        self.seconds += time.perf_counter() - began
        self.step += 1
        if self.step in self.eval_at:
            bpb = evaluate(self.model, self.corpus, self.cfg, torch.device("cpu"))["val_bpb"]
            self.evals.append({"step": self.step, "train_seconds": self.seconds, "val_bpb": bpb})
            print(f"{self.name}: step {self.step}/{self.cfg.max_steps}, {self.seconds:.0f} s, "
                  f"val {bpb:.3f} bits/byte", flush=True)

    def summary(self) -> dict:
        return {"steps": self.step, "train_seconds": self.seconds, "seconds_per_step": self.seconds / self.step,
                **self.params, "evals": self.evals, "final_val_bpb": self.evals[-1]["val_bpb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--steps", type=int, default=400, help="steps of the MoE run and the equal-step dense run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", default="benchmarks/results/moe_vs_dense.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    setup = load_setup(args.config, [f"train.max_steps={args.steps}", "train.unlikelihood_steps=0", *args.set])
    cfg, moe_cfg = setup["train"], setup["model"]
    if cfg.unlikelihood_steps:
        sys.exit("error: moe_vs_dense.py runs plain cross-entropy steps; drop --set train.unlikelihood_steps")
    dense_cfg = dataclasses.replace(moe_cfg, moe_every=0, d_ff=moe_cfg.experts_per_token * moe_cfg.d_expert)
    corpus = prepare(setup["data"], cfg.seed, moe_cfg.vocab_size)
    moe, dense = Run("moe", moe_cfg, cfg, corpus), Run("dense", dense_cfg, cfg, corpus)
    for _ in range(args.steps):  # interleaved: both runs see the same machine load
        moe.advance()
        dense.advance()
    equal_time_steps = round(args.steps * moe.seconds / dense.seconds)
    timed = Run("dense, equal time", dense_cfg, dataclasses.replace(cfg, max_steps=equal_time_steps), corpus)
    while timed.step < equal_time_steps:
        timed.advance()

    runs = {"moe": moe.summary(), "dense_equal_steps": dense.summary(), "dense_equal_time": timed.summary()}
    result = {
        "command": "python " + " ".join(sys.argv), "config": args.config, "overrides": args.set,
        "device": "cpu", "threads": args.threads, "data": setup["data"].source,
        "tokenizer": setup["data"].tokenizer, "tokens_per_step": cfg.batch_size * cfg.seq_len * cfg.grad_accum,
        "runs": runs,
        "moe_over_dense_seconds_per_step": runs["moe"]["seconds_per_step"] / runs["dense_equal_steps"]["seconds_per_step"],
        "equal_steps_bpb": {"moe": runs["moe"]["final_val_bpb"], "dense": runs["dense_equal_steps"]["final_val_bpb"]},
        "equal_time_bpb": {"moe": runs["moe"]["final_val_bpb"], "dense": runs["dense_equal_time"]["final_val_bpb"]},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"equal steps ({args.steps}): moe {moe.evals[-1]['val_bpb']:.3f}, dense {dense.evals[-1]['val_bpb']:.3f} "
          f"bits/byte; a MoE step costs {result['moe_over_dense_seconds_per_step']:.2f}x a dense one; "
          f"equal time ({moe.seconds:.0f} s): moe {moe.evals[-1]['val_bpb']:.3f}, dense "
          f"({equal_time_steps} steps) {timed.evals[-1]['val_bpb']:.3f} bits/byte; "
          f"params moe {moe.params['total_params']:,} total / {moe.params['active_params']:,} active, dense "
          f"{dense.params['total_params']:,}; wrote {args.out}")


if __name__ == "__main__":
    main()
