"""Many task-mix runs side by side, to learn how often a setting solves each task.

Why: one task-mix run is one draw. Whether lookup makes its jump, or add learns its
carries, changes from seed to seed (README, "The task mix"), so a setting is judged by
the share of seeds that solve a task, and that takes many runs. On a GPU the tiny model
leaves the device mostly idle, so a dozen runs share it at once; on a CPU, run one at a
time. Each run is a plain `train.py` (its own folder, metrics.jsonl and checkpoints);
this starts them, stops what is still running at --time-limit (SIGTERM: train.py saves a
checkpoint and exits), and gathers every evaluation into one JSON.

    python3 scripts/sweep_tasks.py --seeds 0 1 2 3 --variant base: \
        --variant long:train.max_steps=4800 --parallel 12 --time-limit 300 \
        --out benchmarks/results/train_tasks_sweep_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe.config import load_setup  # noqa: E402
from moe.training.data import prepare  # noqa: E402
from moe.training.run_folder import metrics_rows  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    """"NAME:section.key=value,section.key=value" -> (NAME, ["section.key=value", ...])."""
    name, colon, settings = text.partition(":")
    if not colon or not name:
        raise SystemExit(f"error: --variant {text!r}: write NAME:SECTION.KEY=VALUE,... "
                         f"(NAME: alone for the config as it is)")
    overrides = [s for s in re.split(r",(?=\w+\.\w+=)", settings) if s]  # a value may hold commas
    for s in overrides:
        if "=" not in s or "." not in s.partition("=")[0]:
            raise SystemExit(f"error: --variant {name}: {s!r} is not SECTION.KEY=VALUE")
    return name, overrides


def run_summary(folder: Path) -> dict:
    """Every evaluation a run logged (task routing left out) and how far it got."""
    try:
        rows = metrics_rows(folder)
    except (OSError, ValueError):
        rows = []
    evals = [{k: v for k, v in r["eval"].items() if k.startswith("acc_") or k in ("step", "val_loss")}
             for r in rows if "eval" in r]
    train = [r for r in rows if "ce" in r]
    return {"steps": train[-1]["step"] if train else 0,
            "tokens_per_s": train[-1]["tokens_per_s"] if train else None, "evals": evals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tasks.toml")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME:SECTION.KEY=VALUE,...")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--time-limit", type=float, default=600, help="seconds; then every run is stopped")
    parser.add_argument("--workdir", default="runs/sweep", help="where the run folders go")
    parser.add_argument("--out", required=True, help="JSON of every run's evaluations")
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    if args.parallel < 1:
        raise SystemExit(f"error: --parallel must be at least 1, got {args.parallel}")

    jobs = [(name, overrides, seed) for seed in args.seeds for name, overrides in variants]
    for name, overrides, seed in jobs:  # each corpus once, before runs that share it start
        setup = load_setup(args.config, [*overrides, f"train.seed={seed}"])
        prepare(setup["data"], seed, setup["model"].vocab_size)
    pending, running, done = list(jobs), {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    while pending or running:
        while pending and len(running) < args.parallel and time.monotonic() - start < args.time_limit:
            name, overrides, seed = pending.pop(0)
            folder = Path(args.workdir) / f"{name}_s{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, str(ROOT / "train.py"), "--config", args.config, "--out", str(folder),
                       "--overwrite", "--quiet", "--set", f"train.seed={seed}"]
            for o in overrides:
                command += ["--set", o]
            log = open(folder.parent / f"{folder.name}.log", "w")
            running[folder] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                cwd=ROOT), name, overrides, seed, time.monotonic(), log)
            print(f"[{time.monotonic() - start:5.0f}s] started {folder.name}", flush=True)
        over = time.monotonic() - start >= args.time_limit
        for folder, (proc, name, overrides, seed, t0, log) in list(running.items()):
            if over and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if proc.poll() is not None:
                log.close()
                status = "finished" if proc.returncode == 0 else ("stopped" if over else f"exit {proc.returncode}")
                tail = (folder.parent / f"{folder.name}.log").read_text()[-600:] if proc.returncode else ""
                done[folder] = {"variant": name, "overrides": overrides, "seed": seed, "status": status,
                                "wall_s": round(time.monotonic() - t0, 1), **run_summary(folder),
                                **({"log_tail": tail} if tail else {})}
                del running[folder]
                last = done[folder]["evals"][-1] if done[folder]["evals"] else {}
                print(f"[{time.monotonic() - start:5.0f}s] {folder.name}: {status} at step "
                      f"{done[folder]['steps']}, " + " ".join(f"{k[4:]} {v:.2f}" for k, v in last.items()
                                                               if k.startswith("acc_")), flush=True)
        if over:
            for name, overrides, seed in pending:
                done[Path(args.workdir) / f"{name}_s{seed}"] = {"variant": name, "overrides": overrides,
                                                                "seed": seed, "status": "not started"}
            pending = []
        time.sleep(1)

    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": device,
              "config": args.config, "parallel": args.parallel, "time_limit_s": args.time_limit,
              "wall_s": round(time.monotonic() - start, 1),
              "runs": [done[Path(args.workdir) / f"{n}_s{s}"] for n, _, s in jobs]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
