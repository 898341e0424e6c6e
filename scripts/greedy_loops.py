"""How often a trained model's greedy continuation falls into a loop, over many prompts.

Why: the main job prints greedy samples after four fixed prompts, and whether one of four
loops is a small, lucky sample. This takes N prompts from the run's validation files
(each the 80 bytes after a line start), writes the model's greedy continuation of each
(the first 300 bytes, as train.py's samples), and measures the share of distinct 4-byte
windows in it (train.distinct_4grams: near 0 for a loop of one word or line, about 0.6
for code) beside the same share in the 300 bytes the file itself continues with. A
continuation below --loop-below counts as a loop.

    .venv/bin/python scripts/greedy_loops.py runs/tiny runs/tiny1500 \
        --out benchmarks/results/greedy_loops_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.config import SECTIONS, from_dict  # noqa: E402
from moe.io.checkpoint import load_model  # noqa: E402
from moe.io.files import CheckpointError  # noqa: E402
from moe.serving.text import load_tokenizer  # noqa: E402
from moe.training.data import is_validation_file, source_files  # noqa: E402
from train import SAMPLE_BYTES, distinct_4grams, greedy_sample  # noqa: E402

PROMPT_BYTES = 80


def validation_prompts(setup: dict, n: int, seed: int) -> list[tuple[str, bytes]]:
    """n (prompt, what the file continues with) pairs from the run's validation files."""
    data = from_dict(SECTIONS["data"], setup["data"], "data")
    if data.source == "tasks":
        raise ValueError("this run trained on the task mix: its answers are scored by exact match, not loops")
    root, files = source_files(data.source)
    text = b"".join(f.read_bytes() for f in files if is_validation_file(str(f.relative_to(root)), data.val_fraction))
    starts = np.flatnonzero(np.frombuffer(text[:-(PROMPT_BYTES + SAMPLE_BYTES)], dtype=np.uint8) == ord("\n")) + 1
    if not len(starts):
        raise ValueError(f"its validation files (data.val_fraction = {data.val_fraction}) hold no line with "
                         f"{PROMPT_BYTES + SAMPLE_BYTES} bytes after it to take a prompt from")
    pairs = []
    for s in np.random.default_rng(seed).choice(starts, size=min(n, len(starts)), replace=False):
        prompt = text[s:s + PROMPT_BYTES].decode(errors="ignore")
        pairs.append((prompt, text[s + PROMPT_BYTES:s + PROMPT_BYTES + SAMPLE_BYTES]))
    return pairs


def summary(shares: list[float], loop_below: float) -> dict:
    return {"mean": float(np.mean(shares)), "median": float(np.median(shares)),
            "p5": float(np.percentile(shares, 5)), "loop_share": float(np.mean(np.array(shares) < loop_below))}


def measure(run: Path, n: int, seed: int, loop_below: float) -> dict:
    setup = json.loads((run / "setup.json").read_text())
    model, tokenizer = load_model(run).eval(), load_tokenizer(run)
    pairs = validation_prompts(setup, n, seed)
    model_shares, text_shares, examples = [], [], []
    began = time.perf_counter()
    for i, (prompt, truth) in enumerate(pairs):
        text = greedy_sample(model, tokenizer, prompt)
        model_shares.append(distinct_4grams(text.encode()))
        text_shares.append(distinct_4grams(truth))
        if len(examples) < 3 and model_shares[-1] < loop_below:
            examples.append({"prompt": prompt, "greedy": text})
        print(f"\r{run}: {i + 1}/{len(pairs)} prompts", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    latest = run / "ckpt" / "latest"
    return {"run": str(run), "checkpoint": latest.read_text().strip() if latest.is_file() else None,
            "seconds": time.perf_counter() - began, "greedy": summary(model_shares, loop_below),
            "validation_text": summary(text_shares, loop_below), "looping_examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders trained on text (train.py)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loop-below", type=float, default=0.2,
                        help="a continuation with fewer distinct 4-byte windows than this counts as a loop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = parser.parse_args()
    if args.prompts < 1 or not 0 < args.loop_below < 1:
        sys.exit("error: --prompts must be at least 1 and --loop-below in (0, 1)")
    torch.set_num_threads(args.threads)
    rows = []
    for run in map(Path, args.runs):
        try:
            rows.append(measure(run, args.prompts, args.seed, args.loop_below))
        except (FileNotFoundError, CheckpointError, ValueError) as error:
            sys.exit(f"error: {run}: {error}")
        g, t = rows[-1]["greedy"], rows[-1]["validation_text"]
        print(f"{run}: greedy loops in {g['loop_share']:.0%} of {args.prompts} prompts (distinct 4-grams mean "
              f"{g['mean']:.0%}); the text itself {t['loop_share']:.0%} (mean {t['mean']:.0%})")
    result = {"command": "python " + " ".join(sys.argv), "prompts": args.prompts, "prompt_bytes": PROMPT_BYTES,
              "continuation_bytes": SAMPLE_BYTES, "loop_below": args.loop_below, "threads": args.threads,
              "runs": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
