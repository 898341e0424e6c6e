"""What keeping freed memory is worth to a CPU training step (moe.training.loop.keep_freed_memory).

Each setup's steps run in fresh child processes, with glibc's defaults and with the raised
mmap and trim thresholds, alternating, so the two sides share the machine's noise; each
child reports its median step time and the CPU seconds it spent in user and kernel mode.
The figure is the ratio of the medians over all rounds. Writes
benchmarks/results/train_step_cpu.json.

    .venv/bin/python benchmarks/bench_train_step.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {"main job": ("configs/tiny.toml", []), "task mix": ("configs/tasks.toml", [])}


def child(config: str, overrides: list[str], keep: bool, steps: int, threads: int) -> dict:
    """Run `steps` training steps of `config` (after 3 warm-up steps) in this process."""
    sys.path.insert(0, str(ROOT))
    from moe.training.loop import keep_freed_memory
    applied = keep_freed_memory() if keep else False
    import torch

    from moe.config import load_setup
    from moe.model.transformer import Transformer
    from moe.training.data import prepare, training_batch
    from moe.training.loop import make_optimizer, train_step
    torch.set_num_threads(threads)
    setup = load_setup(str(ROOT / config), overrides)
    model_cfg, cfg, data_cfg = setup["model"], setup["train"], setup["data"]
    corpus = prepare(data_cfg, cfg.seed, model_cfg.vocab_size)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    optimizer = make_optimizer(model, cfg)
    times, start = [], os.times()
    for i in range(steps + 3):
        batch = [training_batch(corpus, cfg.seq_len, cfg.batch_size, cfg.seed, i)]
        began = time.perf_counter()
        train_step(model, optimizer, batch, cfg, i + 1, torch.device("cpu"))
        if i >= 3:
            times.append(time.perf_counter() - began)
    end = os.times()
    return {"applied": applied, "median_step_s": statistics.median(times), "min_step_s": min(times),
            "user_s": end.user - start.user, "system_s": end.system - start.system}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per child")
    parser.add_argument("--rounds", type=int, default=3, help="child pairs per setup")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/train_step_cpu.json"))
    parser.add_argument("--child", nargs=2, metavar=("SETUP", "KEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, overrides = SETUPS[args.child[0]]
        print(json.dumps(child(config, overrides, args.child[1] == "1", args.steps, args.threads)))
        return

    rows = []
    for name in SETUPS:
        runs = {"default": [], "kept": []}
        for _ in range(args.rounds):
            for side, keep in (("default", "0"), ("kept", "1")):
                out = subprocess.run([sys.executable, __file__, "--child", name, keep, "--steps", str(args.steps),
                                      "--threads", str(args.threads)], capture_output=True, text=True, check=True)
                runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
        median = {side: statistics.median(r["median_step_s"] for r in runs[side]) for side in runs}
        row = {"setup": name, "config": SETUPS[name][0], "median_step_s": median,
               "speedup": median["default"] / median["kept"],
               "system_share": {side: sum(r["system_s"] for r in runs[side]) /
                                sum(r["user_s"] + r["system_s"] for r in runs[side]) for side in runs},
               "runs": runs}
        rows.append(row)
        print(f"{name:10s} step {median['default'] * 1e3:6.1f} ms -> {median['kept'] * 1e3:6.1f} ms "
              f"({row['speedup']:.2f}x); kernel share of CPU time {row['system_share']['default']:.0%} -> "
              f"{row['system_share']['kept']:.0%}", flush=True)
    report = {"command": f"python benchmarks/bench_train_step.py --threads {args.threads} --steps {args.steps} "
                         f"--rounds {args.rounds}",
              "device": "cpu", "threads": args.threads, "steps": args.steps, "rounds": args.rounds, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
