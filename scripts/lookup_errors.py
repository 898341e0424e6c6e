"""How a task-mix model answers `lookup`: right, another key's value, or something else,
by the number of keys in the prompt.

Why: a run whose `lookup` accuracy stalls near 30% may have learned to answer with some
value from the prompt without matching the query to its key; then it is right about once
in as many tries as there are keys (1/2 with two keys, 1/6 with six), and its wrong
answers are other keys' values. This tells that apart from a model that reads the values
wrongly. Answers are greedy generations on fresh prompts (`make_example`, seeded).

    .venv/bin/python scripts/lookup_errors.py runs/tasks_s1 --prompts 300 \
        --out benchmarks/results/lookup_errors_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.io.checkpoint import load_model  # noqa: E402
from moe.io.files import CheckpointError  # noqa: E402
from moe.serving.generation import generate  # noqa: E402
from moe.serving.sampling import SamplingParams  # noqa: E402
from moe.tokenizer import decode, encode  # noqa: E402
from moe.training.data import make_example  # noqa: E402


def classify(prompt: str, answer: str, said: str) -> str:
    """'right', 'other_key' (the value of another key in the prompt) or 'other'."""
    pairs = dict(pair.split("=") for pair in prompt.rstrip("|").split(" in ", 1)[1].split(","))
    if said == answer:
        return "right"
    return "other_key" if said in pairs.values() else "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a task-mix run folder or checkpoint")
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--seed", type=int, default=123, help="seeds the prompts")
    parser.add_argument("--out", default=None, help="JSON path")
    args = parser.parse_args()
    try:
        model = load_model(args.run).eval()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    rng = random.Random(args.seed)
    by_keys = defaultdict(lambda: defaultdict(int))  # keys in the prompt -> outcome -> count
    for _ in range(args.prompts):
        prompt, answer = make_example("lookup", rng)
        with torch.no_grad():
            out = generate(model, encode(prompt, bos=True), SamplingParams(max_new_tokens=4))
        said = decode(out)
        by_keys[prompt.count("=")][classify(prompt, answer, said)] += 1
    table = {keys: dict(counts, share_right=counts["right"] / sum(counts.values()))
             for keys, counts in sorted(by_keys.items())}
    totals = {kind: sum(c.get(kind, 0) for c in by_keys.values()) for kind in ("right", "other_key", "other")}
    for keys, row in table.items():
        print(f"{keys} keys: right {row['right']}/{sum(by_keys[keys].values())} "
              f"({row['share_right']:.0%}, chance {1 / keys:.0%}), another key's value {row.get('other_key', 0)}, "
              f"other {row.get('other', 0)}")
    print(f"all {args.prompts}: right {totals['right']}, another key's value {totals['other_key']}, "
          f"other {totals['other']}")
    if args.out:
        Path(args.out).write_text(json.dumps(dict(
            command="python scripts/lookup_errors.py " + " ".join(sys.argv[1:]), run=args.run,
            prompts=args.prompts, seed=args.seed, totals=totals, by_keys=table), indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
