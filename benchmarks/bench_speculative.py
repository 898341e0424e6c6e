"""Speculative vs plain greedy decoding, side by side, CPU, 2 threads, batch 1.

    python benchmarks/bench_speculative.py --target runs/tiny --draft runs/draft

For each prompt (a slice of a Python standard-library source file) the target decodes
greedily with plain KV-cached generation, then speculatively with the draft at fixed γ, with
adaptive γ, and with prompt lookup (no draft); the modes alternate prompt by prompt so
machine noise hits them alike, and every speculative output is checked to equal the plain
one token for token. Reported per mode: target forwards per generated token (plain: 1),
the draft acceptance rate (accepted / proposed), α (accepted / judged), mean accepted length, tokens/s and the wall-clock speedup.

The speedup is also predicted from measured parts and from what each round actually
proposed (n tokens: γ, or fewer near the end, with adaptive γ, or from prompt lookup):
Σ E(n) / Σ (n c + v(n + 1)) over the rounds, with E(n) = (1 - α^(n+1))/(1 - α) the expected
tokens of a round, c the time of one draft step over one target step (0 for prompt lookup),
and v(w) the time of a target forward over w tokens over one of a single token, both timed
here at the prompts' positions. Results go to benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe.serving.cache import KVCache  # noqa: E402
from moe.io.checkpoint import load_model  # noqa: E402
from moe.serving.generation import generate, prefill  # noqa: E402
from moe.serving.sampling import SamplingParams  # noqa: E402
from moe.serving.speculative import PromptLookupProposer, SpeculativeStats, speculative_generate  # noqa: E402
from moe.serving.text import TextTokenizer, load_tokenizer  # noqa: E402


def stdlib_prompts(n: int, length: int, seed: int, tokenizer: TextTokenizer) -> list[list[int]]:
    """n prompts of `length` tokens (the target's tokenizer), each from the start of a line
    in a stdlib .py file."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    g = torch.Generator().manual_seed(seed)
    prompts = []
    while len(prompts) < n:
        text = files[int(torch.randint(len(files), (1,), generator=g))].read_bytes()
        if len(text) < 4 * length:
            continue
        start = int(torch.randint(len(text) - 2 * length, (1,), generator=g))
        start = text.index(b"\n", start) + 1
        prompts.append(tokenizer.encode(text[start:start + 8 * length].decode(errors="replace"))[:length])
    return prompts


def checkpoint_name(path: str) -> str:
    """Which checkpoint a run folder resolves to (its ckpt/latest), else the path itself."""
    latest = Path(path) / "ckpt" / "latest"
    return latest.read_text().strip() if latest.is_file() else path


@torch.no_grad()
def step_time(model, prompt: list[int], width: int, repeats: int) -> float:
    """Fastest of `repeats` cached forwards over `width` new tokens after `prompt` (the
    minimum, not the median: on a shared machine noise only ever adds time)."""
    cache = KVCache(model.cfg, 1, len(prompt) + width + 1)
    prefill(model, torch.tensor([prompt]), cache)
    tokens = torch.tensor([prompt[-width:]])  # [1, width]
    positions = torch.arange(len(prompt), len(prompt) + width)[None]  # [1, width]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(tokens, positions, cache)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="runs/tiny")
    parser.add_argument("--draft", default="runs/draft")
    parser.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--n-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per prompt and mode; the fastest counts")
    parser.add_argument("--out", default="benchmarks/results/speculative.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for path in (args.target, args.draft):
        if not Path(path).exists():
            sys.exit(f"{path} does not exist: train it first (python train.py ...) or pass "
                     "--target/--draft checkpoints")
    target, draft = load_model(args.target).eval(), load_model(args.draft).eval()
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    prompts = stdlib_prompts(args.n_prompts, args.prompt_len, args.seed, load_tokenizer(args.target))

    modes = {"plain": None, **{f"draft_gamma{g}": dict(draft=draft, gamma=g) for g in args.gammas},
             "draft_adaptive": dict(draft=draft, gamma=max(args.gammas), adaptive=True),
             "prompt_lookup": dict(proposer=PromptLookupProposer(), gamma=max(args.gammas))}
    seconds = dict.fromkeys(modes, 0.0)
    stats = {name: SpeculativeStats() for name in modes if name != "plain"}
    generate(target, prompts[0][:8], SamplingParams(max_new_tokens=4))  # warm-up
    for prompt in prompts:
        best = dict.fromkeys(modes, float("inf"))  # fastest of the repeats, per mode
        for repeat in range(args.repeats):
            start = time.perf_counter()
            reference = generate(target, prompt, params)
            best["plain"] = min(best["plain"], time.perf_counter() - start)
            for name, kwargs in modes.items():
                if kwargs is None:
                    continue
                start = time.perf_counter()
                out, _ = speculative_generate(target, [prompt], params,
                                              stats=stats[name] if repeat == 0 else None, **kwargs)
                best[name] = min(best[name], time.perf_counter() - start)
                if out[0] != reference:
                    sys.exit(f"{name}: speculative output differs from plain greedy; this is a bug")
        for name in modes:
            seconds[name] += best[name]

    target_step = sum(step_time(target, p, 1, 9) for p in prompts[:4])
    c = sum(step_time(draft, p, 1, 9) for p in prompts[:4]) / target_step
    generated = args.n_prompts * args.new_tokens
    runs = [dict(mode="plain", target_forwards_per_token=1.0, tokens_per_s=generated / seconds["plain"],
                 seconds=seconds["plain"])]
    verify_cost = {}  # v(w), timed once per width

    def v(width: int) -> float:
        if width not in verify_cost:
            verify_cost[width] = sum(step_time(target, p, width, 9) for p in prompts[:4]) / target_step
        return verify_cost[width]
    for name, s in stats.items():
        alpha = s.verified_acceptance  # per judged proposal, as the formula assumes
        lengths = s.proposal_lengths

        def tokens(n: int) -> float:  # E(n): expected tokens of a round that proposed n
            return (1 - alpha ** (n + 1)) / (1 - alpha) if alpha < 1 else n + 1.0
        draft_c = c if "draft" in name else 0.0
        expected = sum(map(tokens, lengths)) / len(lengths)
        predicted = sum(map(tokens, lengths)) / sum(n * draft_c + v(n + 1) for n in lengths)
        runs.append(dict(
            mode=name, gamma=modes[name]["gamma"], adaptive=bool(modes[name].get("adaptive")),
            target_forwards_per_token=s.target_calls / s.generated,
            fewer_target_forwards=s.generated / s.target_calls,
            tokens_per_s=generated / seconds[name], seconds=seconds[name],
            speedup=seconds["plain"] / seconds[name],
            predicted_speedup=predicted, alpha=alpha, expected_tokens_per_round=expected,
            c=c, v={w: verify_cost[w] for w in sorted(verify_cost)},
            **{k: val for k, val in s.as_dict().items() if k not in ("cost_ratio",)},
            cost_ratio_in_run=s.cost_ratio))
    result = dict(benchmark="speculative", device="cpu", threads=2, batch=1, repeats=args.repeats, target=args.target,
                  draft=args.draft, target_checkpoint=checkpoint_name(args.target),
                  draft_checkpoint=checkpoint_name(args.draft), target_config=vars(target.cfg), draft_config=vars(draft.cfg),
                  n_prompts=args.n_prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  prompts="stdlib *.py slices", runs=runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'mode':<16}{'fwd/token':>10}{'fewer fwd':>10}{'alpha':>7}{'accepted':>9}{'tok/s':>8}"
          f"{'speedup':>8}{'predicted':>10}")
    for r in runs:
        print(f"{r['mode']:<16}{r['target_forwards_per_token']:>10.3f}{r.get('fewer_target_forwards', 1):>10.2f}"
              f"{r.get('alpha', 0):>7.2f}{r.get('mean_accepted_length', 1):>9.2f}{r['tokens_per_s']:>8.1f}"
              f"{r.get('speedup', 1):>8.2f}{r.get('predicted_speedup', 1):>10.2f}")
    print(f"c = {c:.3f} (draft step / target step); results -> {args.out}")


if __name__ == "__main__":
    main()
