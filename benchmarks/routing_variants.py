"""The routing variants side by side: the same data, steps and seed for each, trained in
lockstep on one machine.

Why: GPT-4 is reported to route top-2 of 16 experts with a softmax, and that is our
default; since then people reach for sigmoid scores and auxiliary-loss-free balancing
(DeepSeek-V3), shared experts (DeepSeekMoE) and expert choice (Zhou et al., 2022). Whether
any of them helps a model of this size is a question this script answers with numbers,
not claims. Each variant is the tiny config with a few `model.*` settings changed:

    softmax_aux      top-2 softmax + Switch loss (the default, GPT-4 as reported)
    sigmoid_aux      sigmoid scores, top-2, Switch loss on the normalised scores
    softmax_bias     top-2 softmax, no aux loss: the selection bias balances
    sigmoid_bias     DeepSeek-V3's router: sigmoid scores, bias balancing
    shared_1         1 shared expert + top-1 routed: the same active parameters as top-2
    expert_choice    each expert takes N*K/E tokens (capacity factor 1); not causal, so
                     its validation figure reads the batch's later tokens (optimistic)

Two runs per variant, all variants interleaved step by step so they share the machine's
load (tokens/s are comparable as ratios):

1. text (configs/tiny.toml, --steps): validation bits per byte on the whole split; the
   load balance (busiest expert over the ideal N*K/E, Jain's fairness, experts that got
   no token) and the router's entropy, mean of the last 10% of steps, per layer; tokens/s;
2. the task mix (configs/tasks.toml, --task-steps): exact match and, per layer,
   I(task; expert), I(task; expert | token) and its shuffled control, in bits.

    .venv/bin/python benchmarks/routing_variants.py --steps 300 --task-steps 300 --threads 2

Writes benchmarks/results/routing_variants.json and docs/trained/routing_variants_balance.png
(busiest over ideal through the text run, per variant).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from moe.config import load_setup
from moe.model.transformer import Transformer, count_parameters
from moe.training.data import prepare, training_batch
from moe.training.loop import evaluate, make_optimizer, train_step

VARIANTS = {
    "softmax_aux": [],
    "sigmoid_aux": ['model.router_score="sigmoid"'],
    "softmax_bias": ['model.balance="bias"'],
    "sigmoid_bias": ['model.router_score="sigmoid"', 'model.balance="bias"'],
    "shared_1": ["model.n_shared_experts=1", "model.experts_per_token=1"],
    "expert_choice": ['model.routing="expert_choice"'],
}
TAIL = 0.1  # the share of the last steps whose routing statistics are averaged


class Run:
    """One variant in training: its model, step, seconds and routing history."""

    def __init__(self, name: str, config: str, overrides: list[str]):
        setup = load_setup(config, overrides)
        self.name, self.cfg, self.model_cfg = name, setup["train"], setup["model"]
        self.corpus = prepare(setup["data"], self.cfg.seed, self.model_cfg.vocab_size)
        torch.manual_seed(self.cfg.seed)
        self.model = Transformer(self.model_cfg)
        self.optimizer = make_optimizer(self.model, self.cfg)
        self.step, self.seconds, self.tokens, self.history = 0, 0.0, 0, []

    def advance(self) -> None:
        """One optimiser step on batch `step`: the same batches for every variant."""
        cfg = self.cfg
        micro = [training_batch(self.corpus, cfg.seq_len, cfg.batch_size, cfg.seed,
                                self.step * cfg.grad_accum + i) for i in range(cfg.grad_accum)]
        began = time.perf_counter()
        stats = train_step(self.model, self.optimizer, micro, cfg, self.step, torch.device("cpu"))
        self.seconds += time.perf_counter() - began
        self.tokens += cfg.batch_size * cfg.seq_len * cfg.grad_accum
        self.step += 1
        self.history.append({"ce": stats["ce"], "aux": stats["aux"],
                             "layers": [{key: layer[key] for key in ("max_over_ideal", "jain", "dead", "entropy")}
                                        for layer in stats["routing"]]})

    def summary(self) -> dict:
        tail = self.history[-max(1, round(TAIL * len(self.history))):]
        n_layers = len(tail[0]["layers"])

        def per_layer(key: str) -> list[float]:
            return [sum(h["layers"][i][key] for h in tail) / len(tail) for i in range(n_layers)]
        counts = count_parameters(self.model_cfg)
        result = evaluate(self.model, self.corpus, self.cfg, torch.device("cpu"))
        summary = {
            "steps": self.step, "train_seconds": self.seconds, "tokens_per_s": self.tokens / self.seconds,
            "total_params": counts.total, "active_params": counts.active,
            "max_over_ideal": per_layer("max_over_ideal"), "jain": per_layer("jain"),
            "dead": per_layer("dead"), "router_entropy": per_layer("entropy"),
            "balance_curve": [max(layer["max_over_ideal"] for layer in h["layers"]) for h in self.history],
        }
        if self.corpus.is_tasks:
            keep = ["acc_mean", *[k for k in result if k.startswith("acc_")],
                    "task_expert_mi_bits", "task_expert_mi_given_token_bits",
                    "task_expert_mi_given_token_shuffled_bits"]
            summary.update({key: result[key] for key in dict.fromkeys(keep)})
        else:
            summary["val_bpb"] = result["val_bpb"]
        return summary


def train_side_by_side(config: str, steps: int, names: list[str], extra: list[str]) -> dict[str, dict]:
    # plain cross-entropy steps: Run.advance calls train_step without unlikelihood
    runs = [Run(name, config, [f"train.max_steps={steps}", "train.unlikelihood_steps=0", *extra, *VARIANTS[name]])
            for name in names]
    for step in range(steps):
        for run in runs:
            run.advance()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            print(f"{config}: step {step + 1}/{steps}: " + ", ".join(
                f"{run.name} ce {run.history[-1]['ce']:.3f}" for run in runs), flush=True)
    return {run.name: run.summary() for run in runs}


def draw(text: dict[str, dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e \".[plots]\")")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, run in text.items():
        curve = torch.tensor(run["balance_curve"])
        width = max(1, len(curve) // 30)  # a moving mean over about 3% of the run
        smooth = curve.unfold(0, width, 1).mean(-1) if len(curve) >= width else curve
        ax.plot(range(width, width + len(smooth)), smooth.tolist(), label=name)
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="step", ylabel="busiest expert / ideal load (worst layer)",
           title="load balance while training, per routing variant")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="text steps per variant (configs/tiny.toml)")
    parser.add_argument("--task-steps", type=int, default=300, help="task-mix steps per variant (configs/tasks.toml)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="applied to every variant of both runs (e.g. train.batch_size=4 for a quick try)")
    parser.add_argument("--out", default="benchmarks/results/routing_variants.json")
    parser.add_argument("--plot", default="docs/trained/routing_variants_balance.png")
    args = parser.parse_args()
    if args.steps < 1 or args.task_steps < 1:
        parser.error("--steps and --task-steps must be at least 1")
    torch.set_num_threads(args.threads)

    text = train_side_by_side("configs/tiny.toml", args.steps, args.variants, args.set)
    tasks = train_side_by_side("configs/tasks.toml", args.task_steps, args.variants, args.set)
    baseline = text[args.variants[0]]["tokens_per_s"]
    variants = {}
    for name in args.variants:
        t, k = text[name], tasks[name]
        variants[name] = {
            "settings": VARIANTS[name], "val_bpb": t["val_bpb"],
            "tokens_per_s": t["tokens_per_s"], "tokens_per_s_vs_first": t["tokens_per_s"] / baseline,
            "total_params": t["total_params"], "active_params": t["active_params"],
            "max_over_ideal": t["max_over_ideal"], "jain": t["jain"], "dead": t["dead"],
            "router_entropy": t["router_entropy"], "balance_curve": t["balance_curve"],
            "tasks": {key: value for key, value in k.items() if key.startswith(("acc_", "task_expert"))},
        }
    result = {
        "command": "python " + " ".join(sys.argv), "device": "cpu", "threads": args.threads,
        "text": {"config": "configs/tiny.toml", "steps": args.steps},
        "tasks": {"config": "configs/tasks.toml", "steps": args.task_steps},
        "overrides": args.set, "tail_share": TAIL,
        "note": "expert_choice routes each token among the whole batch, later tokens included, so its "
                "validation figures see the future: not comparable as a language model's",
        "variants": variants,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    draw(text, Path(args.plot))
    print(f"{'variant':<15}{'bits/byte':>10}{'busiest/ideal':>15}{'jain':>7}{'dead':>6}{'entropy':>9}"
          f"{'tok/s x':>9}{'task acc':>10}{'MI|token':>10}")
    for name, v in variants.items():
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        print(f"{name:<15}{v['val_bpb']:>10.3f}{max(v['max_over_ideal']):>15.2f}{mean(v['jain']):>7.2f}"
              f"{mean(v['dead']):>6.1f}{mean(v['router_entropy']):>9.2f}{v['tokens_per_s_vs_first']:>9.2f}"
              f"{v['tasks']['acc_mean']:>10.3f}{mean(v['tasks']['task_expert_mi_given_token_bits']):>10.2f}")
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
