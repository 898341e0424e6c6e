"""Training throughput on CPU: one process against 2-rank data parallel (DDP) and 2-rank
expert parallel, side by side in one run, plus the bytes the expert all_to_all moves.

    .venv/bin/python benchmarks/bench_distributed.py                      # tiny.toml, 3 repeats
    .venv/bin/python benchmarks/bench_distributed.py --steps 10 --repeats 2 --set model.n_layers=2

Every process runs with OMP_NUM_THREADS=1 and the same per-rank batch, so two ranks do
twice the work of one process on twice the cores: the ideal ratio is 2.0 and what falls
short of it is the price of the gradient all-reduce (and, for expert parallel, of the
token exchanges). Modes are interleaved, repeat by repeat, in a rotating order, so a
busy machine slows them alike; the medians and their ratios are reported.

Each measurement is a fresh launch of this file as a worker (under torchrun for 2 ranks)
that trains with train.py's own pieces (moe.parallel.distributed.init / parallelize /
gradient_clipper, moe.training.loop.train_step) on synthetic tokens: warm-up steps, then
timed steps between barriers. For expert parallel the worker also reads
moe.parallel.expert_parallel's byte counter: per rank and step, the forward dispatch should equal
tokens x K x d_model x 4 bytes (float32) per MoE layer, dropless.

Writes benchmarks/results/distributed_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"one process": (1, []), "DDP, 2 ranks": (2, []), "expert parallel, 2 ranks": (2, ["--expert-parallel", "2"])}


def worker(args) -> None:
    import numpy as np
    import torch

    from moe.parallel import distributed
    from moe.config import load_setup
    from moe.training.data import get_batch
    from moe.model.transformer import Transformer
    from moe.training.loop import make_optimizer, train_step

    setup = load_setup(args.config, args.set + ["train.device=\"cpu\""])
    model_cfg, cfg = setup["model"], setup["train"]
    ranks = distributed.init(cfg, args.expert_parallel)
    tokens = np.random.default_rng(0).integers(0, 256, 1 << 20).astype(np.uint16)  # synthetic bytes
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    trained = distributed.parallelize(model, ranks)
    optimizer = make_optimizer(model, cfg)
    clip = distributed.gradient_clipper(model, ranks)

    def step(index: int) -> None:
        micro = [get_batch(tokens, cfg.seq_len, cfg.batch_size, cfg.seed,
                           distributed.batch_index(index, i, cfg.grad_accum, ranks)) for i in range(cfg.grad_accum)]
        train_step(trained, optimizer, micro, cfg, index, ranks.device, None, clip)

    for index in range(args.warmup):
        step(index)
    if ranks.plan is not None:
        ranks.plan.bytes_moved.reset()
    distributed.barrier(ranks)
    began = time.perf_counter()
    for index in range(args.warmup, args.warmup + args.steps):
        step(index)
    distributed.barrier(ranks)
    elapsed = time.perf_counter() - began
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * ranks.world_size
    result = {"tokens_per_s": args.steps * tokens_per_step / elapsed, "world_size": ranks.world_size}
    if ranks.plan is not None:
        n_moe = len(model_cfg.moe_layers)
        rank_tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        result["all_to_all_per_rank_step"] = {
            "formula_dispatch_bytes": rank_tokens * model_cfg.experts_per_token * model_cfg.d_model * 4 * n_moe,
            "sent_bytes": {k: v / args.steps for k, v in sorted(ranks.plan.bytes_moved.total.items())},
            "sent_to_other_rank_bytes": {k: v / args.steps for k, v in sorted(ranks.plan.bytes_moved.remote.items())},
            "tokens": rank_tokens, "k": model_cfg.experts_per_token, "d_model": model_cfg.d_model,
            "moe_layers": n_moe, "element_bytes": 4}
    if ranks.is_main:
        Path(args.result).write_text(json.dumps(result))
    distributed.shutdown(ranks)


def launch(mode: str, args, result: Path) -> dict:
    n_ranks, extra = MODES[mode]
    script = [str(Path(__file__).resolve()), "--worker", "--result", str(result), "--config", args.config,
              "--steps", str(args.steps), "--warmup", str(args.warmup), *[f"--set={s}" for s in args.set], *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n_ranks)]
                if n_ranks > 1 else [sys.executable])
    done = subprocess.run(launcher + script, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/distributed_cpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--expert-parallel", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import torch
    names = list(MODES)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # rotate the order
                runs[name].append(launch(name, args, Path(tmp) / "result.json"))
                print(f"repeat {repeat + 1}/{args.repeats} {name:26s} "
                      f"{runs[name][-1]['tokens_per_s']:8,.0f} tokens/s", flush=True)
    median = {name: statistics.median(r["tokens_per_s"] for r in runs[name]) for name in names}
    base = median["one process"]
    exchange = runs["expert parallel, 2 ranks"][-1]["all_to_all_per_rank_step"]
    report = {
        "command": "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "threads_per_process": 1},
        "config": args.config, "overrides": args.set, "timed_steps": args.steps, "repeats": args.repeats,
        "tokens_per_s": {name: [r["tokens_per_s"] for r in runs[name]] for name in names},
        "median_tokens_per_s": median,
        "ratio_to_one_process": {name: median[name] / base for name in names},
        "all_to_all_per_rank_step": exchange,
        "dispatch_over_formula": exchange["sent_bytes"]["dispatch"] / exchange["formula_dispatch_bytes"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for name in names:
        print(f"{name:26s} {median[name]:8,.0f} tokens/s  {median[name] / base:.2f}x one process")
    print(f"all_to_all dispatch per rank and step: {exchange['sent_bytes']['dispatch']:,.0f} bytes sent, "
          f"formula tokens x K x width x 4 x layers = {exchange['formula_dispatch_bytes']:,} "
          f"({report['dispatch_over_formula']:.3f}x); written to {args.out}")


if __name__ == "__main__":
    main()
