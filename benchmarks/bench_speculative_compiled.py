"""Speculative decoding against the fastest plain decoding on this CPU: both compiled.

    python benchmarks/bench_speculative_compiled.py --target runs/tiny \
        --ngram-draft runs/tiny/ngram_draft.safetensors

Why a second benchmark: benchmarks/bench_speculative.py compares eager speculative rounds
with eager plain decoding. But at these sizes an eager step is almost all Python dispatch,
and the compiled plain step (moe/serving/static_decode.py, DecodeStep) is several times
faster, so it is the baseline a user who wants speed has. Here the target's verify forward
is compiled too (`speculative_generate(compile=True)`: one graph of B rows x (γ + 1)
tokens, VerifyStep) and both sides are timed on the same prompts, alternating group by
group. Only the proposers that cost no model run here (prompt lookup, and with
--ngram-draft the target's n-gram draft: its table's guesses for greedy requests, or a copy
where the text repeats more of its tail than the table knows;
draws from its distributions for sampled ones). With --draft, the
draft model's decode step is compiled and timed beside the target's at each batch
(`draft_step`: c = its time over the target step's). Compiled, both are bound by a fixed
cost per step more than by their size, so c stays far above the draft's share of the
target's weights, and the draft's proposals are not compiled here: its rounds start with
a ragged forward over the tokens it has not seen.

Every speculative output is checked to equal the compiled plain decoding's token for
token, greedy and seeded at T = 1. Per batch and mode: the speedup (the fastest of
--repeats runs per prompt group, summed over groups), α, tokens per round, the compiled
plain step and verify forward (milliseconds, from the timed runs), and a prediction from
those parts: time(plain) = (N - 1)(t1 + h), time(spec) = (R - 1)(t_verify + h_spec), with R
the target forwards until a batch's slowest row has N tokens, simulated from each row's α
(bench_speculative.expected_calls; each prompt's α from batch 1, when batch 1 ran first),
and h, h_spec the host time per step and per round
(wall time outside forwards; the eager prefill counts there, on both sides). The parts are
timed inside the same runs, so the prediction checks the accounting and the simulated
rounds, not the costs. Each mode's first call compiles its verify graph when its (batch,
γ) is new and is not timed; `compile_s` is that call's time.
Results go to benchmarks/results/speculative_compiled.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_speculative import (checkpoint_name, expected_calls, load_ngram_table,  # noqa: E402
                                          stdlib_prompts)
from moe.io.checkpoint import load_model  # noqa: E402
from moe.serving.cache import KVCache  # noqa: E402
from moe.serving.ngram_draft import NgramProposer  # noqa: E402
from moe.serving.sampling import SamplingParams, draw_seed, draw_tokens  # noqa: E402
from moe.serving.speculative import PromptLookupProposer, SpeculativeStats, ragged_forward, speculative_generate  # noqa: E402
from moe.serving.static_decode import DecodeStep  # noqa: E402
from moe.serving.text import load_tokenizer  # noqa: E402


@torch.no_grad()
def compiled_plain_decode(step: DecodeStep, prompts: list[list[int]], params: SamplingParams,
                          timing: dict) -> list[list[int]]:
    """params.max_new_tokens tokens per row: the prompts prefilled eagerly into the step's
    cache, then one compiled forward of [B] tokens per token, each row's draws its own
    (seed, position) ones. `timing` adds up the seconds in compiled steps and their count."""
    seeds = [draw_seed(params) for _ in prompts]
    logits = ragged_forward(step.model, step.cache, prompts, [0] * len(prompts))
    logits = torch.stack([logits[b, len(p) - 1] for b, p in enumerate(prompts)])  # [B, V]
    outputs: list[list[int]] = [[] for _ in prompts]
    for i in range(params.max_new_tokens):
        positions = [len(p) + i for p in prompts]
        drawn = [block[0] for block in draw_tokens(list(logits[:, None]), [params] * len(prompts), seeds,
                                                   positions)]
        for out, token in zip(outputs, drawn):
            out.append(token)
        if i + 1 < params.max_new_tokens:
            start = time.perf_counter()
            logits = step(torch.tensor(drawn), torch.tensor(positions))
            timing["forward_s"] += time.perf_counter() - start
            timing["steps"] += 1
    return outputs


def run_batch(target, prompts: list[list[int]], batch: int, sampled: bool, modes: dict,
              new_tokens: int, repeats: int, seed: int, graphs: dict, prompt_alpha: dict) -> list[dict]:
    """Compiled plain decoding against each mode (name -> (proposer, γ)) with the compiled
    verify step, over the prompts in groups of `batch`, modes alternating within each group.
    `prompt_alpha` ((mode, sampled) -> α of each prompt) is filled at batch 1 and read at
    larger batches, whose rows differ in α (a batch waits for its slowest row)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=1.0 if sampled else 0.0,
                            seed=seed if sampled else None)
    groups = [prompts[i:i + batch] for i in range(0, len(prompts) - batch + 1, batch)]
    if ("plain", batch) not in graphs:
        cache = KVCache(target.cfg, batch, max(map(len, prompts)) + new_tokens + 1)
        graphs["plain", batch] = DecodeStep(target, cache, compile=True)
    step = graphs["plain", batch]
    steps = graphs.setdefault("verify", {})
    compile_s = {}
    compiled_plain_decode(step, groups[0], params, dict(forward_s=0.0, steps=0))  # compiles (once per batch)
    compile_s["plain"] = step.compile_seconds
    for name, (proposer, gamma) in modes.items():  # compiles the verify graph of each (batch, γ) once
        began = time.perf_counter()
        speculative_generate(target, groups[0], params, proposer=proposer, gamma=gamma, compile=True,
                             compiled_steps=steps)
        compile_s[name] = time.perf_counter() - began
    seconds = dict.fromkeys(["plain", *modes], 0.0)
    timing = dict(forward_s=0.0, steps=0)
    wall = dict.fromkeys(seconds, 0.0)
    stats = {name: SpeculativeStats() for name in modes}
    alphas = {name: [] for name in modes}  # per group: the α of its runs
    for group in groups:
        best = dict.fromkeys(seconds, float("inf"))
        for name in modes:
            alphas[name].append([])
        for _ in range(repeats):
            start = time.perf_counter()
            reference = compiled_plain_decode(step, group, params, timing)
            elapsed = time.perf_counter() - start
            best["plain"], wall["plain"] = min(best["plain"], elapsed), wall["plain"] + elapsed
            for name, (proposer, gamma) in modes.items():
                before = (stats[name].accepted, sum(stats[name].reached))
                start = time.perf_counter()
                out, _ = speculative_generate(target, group, params, proposer=proposer, gamma=gamma, compile=True,
                                              compiled_steps=steps, stats=stats[name])
                elapsed = time.perf_counter() - start
                best[name], wall[name] = min(best[name], elapsed), wall[name] + elapsed
                alphas[name][-1].append((stats[name].accepted - before[0]) / max(sum(stats[name].reached) - before[1], 1))
                if out != reference:
                    sys.exit(f"error: {name} at batch {batch}: compiled speculative output differs from compiled "
                             "plain decoding; this is a bug (or a near-tie the two graphs round apart)")
        for name in seconds:
            seconds[name] += best[name]
    t1 = timing["forward_s"] / timing["steps"]
    host_plain = (wall["plain"] - timing["forward_s"]) / timing["steps"]  # per step: drawing, prefill, bookkeeping
    rows = [dict(mode="plain_compiled", batch=batch, sampled=sampled, seconds=seconds["plain"],
                 tokens_per_s=len(groups) * batch * new_tokens / seconds["plain"], step_ms=1e3 * t1,
                 host_ms_per_step=1e3 * host_plain, compile_s=compile_s["plain"])]
    for name, (_, gamma) in modes.items():
        s = stats[name]
        t_verify = s.target_time_s / s.target_calls
        host = (wall[name] - s.target_time_s) / s.target_calls
        # each group's α (over its runs); at a larger batch each row's prompt's α from batch 1
        group_alpha = [float(np.mean(a)) for a in alphas[name]]
        if batch == 1:
            prompt_alpha[name, sampled] = group_alpha
        known = prompt_alpha.get((name, sampled))
        rows_alpha = [np.array(known[g * batch:(g + 1) * batch]) if known else np.full(batch, a)
                      for g, a in enumerate(group_alpha)]
        calls = sum(expected_calls(a, s.proposal_lengths, new_tokens) for a in rows_alpha) / len(groups)
        predicted = ((new_tokens - 1) * (t1 + host_plain)) / ((calls - 1) * (t_verify + host))
        rows.append(dict(mode=name, batch=batch, sampled=sampled, gamma=gamma, speedup=seconds["plain"] / seconds[name],
                         predicted=predicted, alpha=s.verified_acceptance, tokens_per_round=s.mean_accepted_length,
                         target_forwards_per_token=s.target_calls * batch / s.generated,
                         expected_target_forwards_per_token=calls / new_tokens,
                         seconds=seconds[name], tokens_per_s=len(groups) * batch * new_tokens / seconds[name],
                         verify_ms=1e3 * t_verify, verify_over_step=t_verify / t1, host_ms_per_round=1e3 * host,
                         compile_s=compile_s[name]))
        print(f"batch {batch:2d} {'T=1' if sampled else 'greedy':6s} {name:21s} α {s.verified_acceptance:.2f} "
              f"tokens/round {s.mean_accepted_length:.2f} verify {1e3 * t_verify:.2f} ms (step {1e3 * t1:.2f}) "
              f"speedup {rows[-1]['speedup']:.2f} predicted {predicted:.2f}", flush=True)
    return rows


@torch.no_grad()
def step_times(model, batch: int, prompt_len: int, repeats: int = 30) -> tuple[float, float]:
    """(median seconds of the compiled [batch] decode step after a prompt of prompt_len, compile seconds)."""
    cache = KVCache(model.cfg, batch, prompt_len + repeats + 2)
    prompts = torch.randint(3, model.cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    ragged_forward(model, cache, prompts.tolist(), [0] * batch)
    step, tokens = DecodeStep(model, cache, compile=True), torch.zeros(batch, dtype=torch.long)
    step(tokens, torch.full((batch,), prompt_len))  # compiles
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        step(tokens, torch.full((batch,), prompt_len + 1 + i))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), step.compile_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="runs/tiny")
    parser.add_argument("--ngram-draft", help="also time this n-gram draft of the target "
                                              "(scripts/build_ngram_draft.py)")
    parser.add_argument("--draft", help="also time this draft model's compiled decode step against the target's")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--gammas", type=int, nargs="+", default=[2, 3, 4, 6],
                        help="tokens proposed per round, one compiled verify graph (γ + 1 wide) each")
    parser.add_argument("--n-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per group and mode; the fastest counts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/speculative_compiled.json")
    args = parser.parse_args()
    if min(args.batches + args.gammas + [args.repeats, args.new_tokens]) < 1:
        sys.exit("error: batch sizes, --gammas, --repeats and --new-tokens must be at least 1")
    if args.n_prompts < max(args.batches):
        sys.exit(f"error: --n-prompts ({args.n_prompts}) must be at least the largest batch ({max(args.batches)})")
    if not Path(args.target).exists():
        sys.exit(f"error: {args.target} does not exist: train it first (python train.py) or pass --target")
    torch.set_num_threads(args.threads)
    target = load_model(args.target).eval()
    if args.prompt_len + args.new_tokens >= target.cfg.max_seq_len:
        sys.exit(f"error: --prompt-len + --new-tokens must stay below the target's context of "
                 f"{target.cfg.max_seq_len} tokens")
    proposers = {"prompt_lookup": PromptLookupProposer()}
    if args.ngram_draft:
        proposers["ngram_draft"] = NgramProposer(load_ngram_table(args.ngram_draft, target.cfg.vocab_size))
    draft = None
    if args.draft:
        if not Path(args.draft).exists():
            sys.exit(f"error: {args.draft} does not exist: train it (README, speculative decoding) or drop --draft")
        draft = load_model(args.draft).eval()
    prompts = stdlib_prompts(args.n_prompts, args.prompt_len, args.seed, load_tokenizer(args.target))
    draft_steps = []
    for batch in args.batches if draft is not None else []:  # one right after the other
        t_target, _ = step_times(target, batch, args.prompt_len)
        t_draft, compile_s = step_times(draft, batch, args.prompt_len)
        draft_steps.append(dict(batch=batch, target_step_ms=1e3 * t_target, draft_step_ms=1e3 * t_draft,
                                c=t_draft / t_target, draft_compile_s=compile_s))
        print(f"batch {batch:2d} compiled steps: target {1e3 * t_target:.2f} ms, draft {1e3 * t_draft:.2f} ms, "
              f"c = {t_draft / t_target:.2f}", flush=True)
    graphs: dict = {}
    prompt_alpha: dict = {}
    rows = []
    modes = {f"{name}_gamma{g}": (proposer, g) for name, proposer in proposers.items() for g in args.gammas}
    for batch in args.batches:
        for sampled in (False, True):
            rows += run_batch(target, prompts, batch, sampled, modes, args.new_tokens, args.repeats, args.seed,
                              graphs, prompt_alpha)
    result = dict(benchmark="speculative_compiled", command="python " + " ".join(sys.argv), device="cpu",
                  threads=args.threads, repeats=args.repeats, target=args.target,
                  target_checkpoint=checkpoint_name(args.target), ngram_draft=args.ngram_draft, gammas=args.gammas,
                  n_prompts=args.n_prompts, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                  prompts="stdlib *.py slices", torch=torch.__version__, draft=args.draft,
                  draft_checkpoint=checkpoint_name(args.draft) if args.draft else None, draft_step=draft_steps,
                  runs=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
