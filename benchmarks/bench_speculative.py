"""Speculative vs plain decoding, side by side, on CPU: greedy and sampled, batch 1 to 16.

    python benchmarks/bench_speculative.py --target runs/tiny --draft runs/draft

Prompts are slices of Python standard-library source files; every mode decodes the same
prompts in batches of B rows (one padded forward per step or round), and the modes
alternate batch by batch so machine noise hits them alike. Plain decoding runs one token
per row per forward through the same `ragged_forward` the speculative rounds use; every
speculative output is checked to equal the plain one token for token, greedy and seeded
sampled alike (each row's draws depend on its seed and position only). The plain rows
record the share of distinct 4-byte windows in what the target wrote (about 0.6 for the
validation files' own text, a few percent for a loop), so a figure from a model that loops
shows it.

Two parts:
- the table (--batches, default 1 and 8; greedy and T = 1): draft at each --gammas,
  adaptive γ, prompt lookup, and with --ngram-draft the target's n-gram draft at each
  --gammas (moe/serving/ngram_draft.py: greedy, the table's argmax, or a copy where the
  text repeats more of its tail than the table knows;
  sampled, draws from the table's distributions; `ngram_draft` is the largest γ);
- the grid (--grid-batches x --grid-gammas, greedy, the draft): where speculation stops
  paying as the batch grows;
- the engine (--engine-slots, default 1 and 8): the same prompts through the
  continuous-batching engine, plain against the draft at γ 2, prompt lookup and the
  n-gram draft greedy, and the draft and the n-gram draft at γ 2 sampled at T = 1, each
  output checked against the plain engine's.

Each run reports the measured speedup, α (accepted / judged), tokens per round, the
distinct experts each MoE layer ran per verify forward (against E(1 - (1 - K/E)^T) for
the T = B x width tokens it routed) and three predictions, all in units of t1, a plain
decode step's forward of the same batch as the timed plain runs ran it:

    time(plain) = P + (N - 1)(1 + h)
    time(spec)  = P + P_draft + (R - 1)(round + h_spec)
    round       = (W - 1) c + v(W)

N new tokens per row; R the target forwards until the batch's slowest row has N tokens,
simulated with each round's proposals n as the run made them, each passing with the row's
α (its prompt's α at batch 1: rows differ, and a batch waits for its slowest; one row
needs about N / E_round, E_round = mean of (1 - α^(n+1)) / (1 - α)); W the verify
forward's width; c a draft step in the timed runs over t1 (0 for lookup); P the target's
prefill in the plain runs, P_draft the draft's timed alone; h and h_spec the host time of a
plain step and of a round (drawing, accepting, bookkeeping: the timed runs' wall time
outside forwards). The three differ in v(W), the verify forward over t1:
- `predicted_dense`: v = 1, the textbook assumption that checking W tokens costs one step;
- `predicted_moe`: v = the weight bytes the verify forward reads over those of a decode
  step (shared weights plus the experts it touched, counted here): what a memory-bound
  device pays for the MoE twist;
- `predicted`: v as the timed runs measured it (their verify forwards' mean time, the
  widths as they came: `v_in_run`), so this one checks R, the rounds simulated from α.
Each forward width is also timed alone, one after another (`v`, `t1_isolated_s`,
`c_isolated`); on this CPU at batch 1 those timings read slower than the same forwards
inside a decoding loop, and by a share that differs by width, so they are kept but not
used.
Results go to benchmarks/results/speculative.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe.cost.estimate import expected_experts_hit  # noqa: E402
from moe.io.checkpoint import load_model  # noqa: E402
from moe.model.transformer import count_parameters  # noqa: E402
from moe.serving.cache import KVCache  # noqa: E402
from moe.serving.engine import Engine, EngineConfig  # noqa: E402
from moe.serving.ngram_draft import NgramDraft, NgramProposer  # noqa: E402
from moe.serving.sampling import SamplingParams, draw_seed, draw_tokens  # noqa: E402
from moe.serving.speculative import (PromptLookupProposer, SpeculativeStats, ragged_forward,  # noqa: E402
                                     speculative_generate)
from moe.serving.speculative_engine import SpeculativeEngine  # noqa: E402
from moe.serving.text import TextTokenizer, load_tokenizer  # noqa: E402
from train import distinct_4grams  # noqa: E402


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


def load_ngram_table(path: str, vocab_size: int) -> NgramDraft:
    """--ngram-draft's table for a target of `vocab_size`; a missing, corrupt or foreign
    file ends the benchmark with `error: ...`."""
    try:
        table = NgramDraft.load(path)
        table.check_vocab(vocab_size, path)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    return table


def checkpoint_name(path: str) -> str:
    """Which checkpoint a run folder resolves to (its ckpt/latest), else the path itself."""
    latest = Path(path) / "ckpt" / "latest"
    return latest.read_text().strip() if latest.is_file() else path


@torch.no_grad()
def forward_times(model, prompts: list[list[int]], widths: list[int], repeats: int) -> dict[int, float]:
    """Per width w: the fastest of `repeats` cached forwards of B = len(prompts) rows over w
    new tokens each after its prompt; width 0 stands for the prefill of the prompts. The
    widths take turns within each repeat, so a slow spell of this shared machine hits them
    alike, and the minimum counts: noise only ever adds time."""
    cache = KVCache(model.cfg, len(prompts), max(map(len, prompts)) + max(widths) + 1)
    ragged_forward(model, cache, prompts, [0] * len(prompts))
    times = {w: float("inf") for w in widths}
    for _ in range(repeats):
        for w in widths:
            rows, starts = (prompts, [0] * len(prompts)) if w == 0 else ([p[-w:] for p in prompts],
                                                                          [len(p) for p in prompts])
            start = time.perf_counter()
            ragged_forward(model, cache, rows, starts)
            times[w] = min(times[w], time.perf_counter() - start)
    return times


@torch.no_grad()
def plain_decode(model, prompts: list[list[int]], params: SamplingParams,
                 timing: dict | None = None) -> list[list[int]]:
    """params.max_new_tokens tokens per row, one per row per forward, each row's draws its
    own (seed, position) ones, as speculative_generate draws them. `timing` adds up the
    seconds of the prefills ("prefill_s") and of the decode steps' forwards ("forward_s"),
    the decode steps ("steps") and the calls ("runs")."""
    cache = KVCache(model.cfg, len(prompts), max(map(len, prompts)) + params.max_new_tokens + 1)
    seeds = [draw_seed(params) for _ in prompts]
    start = time.perf_counter()
    logits = ragged_forward(model, cache, prompts, [0] * len(prompts))  # [B, W, V]
    prefill_s, forward_s = time.perf_counter() - start, 0.0
    last = [len(p) - 1 for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in range(params.max_new_tokens):
        positions = [len(p) + step for p in prompts]
        draws = draw_tokens([logits[b, i:i + 1] for b, i in enumerate(last)], [params] * len(prompts),
                            seeds, positions)  # [B] of [token]
        for out, (token,) in zip(outputs, draws):
            out.append(token)
        if step + 1 < params.max_new_tokens:
            start = time.perf_counter()
            logits, last = ragged_forward(model, cache, draws, positions), [0] * len(prompts)
            forward_s += time.perf_counter() - start
    if timing is not None:
        timing["prefill_s"] += prefill_s
        timing["forward_s"] += forward_s
        timing["steps"] += params.max_new_tokens - 1
        timing["runs"] += 1
    return outputs


def engine_run(model, prompts: list[list[int]], params: SamplingParams, slots: int,
               **speculative) -> tuple[list[list[int]], float, SpeculativeStats | None]:
    """Every prompt through the continuous-batching engine with `slots` batch slots, plain
    or (given draft= or lookup=, gamma=) speculative: outputs, wall seconds, statistics."""
    config = EngineConfig(max_num_seqs=slots)
    engine = SpeculativeEngine(model, config=config, **speculative) if speculative else Engine(model, config)
    requests = [engine.add_request(p, params) for p in prompts]
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    return [r.output for r in requests], seconds, engine.stats if speculative else None


def engine_table(target, draft, ngram_table, prompts, slots_list: list[int], new_tokens: int,
                 repeats: int, gamma: int, seed: int) -> list[dict]:
    """Every prompt through the engine, plain against each proposer, at each number of
    batch slots, greedy and sampled at T = 1 (seeded; the draft and the n-gram draft at
    γ 2 there, where a proposal passes less often): the fastest of `repeats` runs,
    alternating modes, every output checked against the plain engine's."""
    rows = []
    for sampled in (False, True):
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True,
                                temperature=1.0 if sampled else 0.0, seed=seed if sampled else None)
        modes = {"draft_gamma2": dict(draft=draft, gamma=2)}
        if not sampled:
            modes["prompt_lookup"] = dict(lookup=PromptLookupProposer(), gamma=gamma)
        if ngram_table is not None:
            modes["ngram_draft_gamma2" if sampled else "ngram_draft"] = dict(lookup=NgramProposer(ngram_table),
                                                                            gamma=2 if sampled else gamma)
        for slots in slots_list:
            best = dict.fromkeys(["plain", *modes], float("inf"))
            stats = {}
            for _ in range(repeats):
                reference, seconds, _ = engine_run(target, prompts, params, slots)
                best["plain"] = min(best["plain"], seconds)
                for name, kwargs in modes.items():
                    out, seconds, stats[name] = engine_run(target, prompts, params, slots, **kwargs)
                    if out != reference:
                        sys.exit(f"error: {name} in the engine with {slots} slots differs from plain decoding; "
                                 "this is a bug")
                    best[name] = min(best[name], seconds)
            for name in modes:
                s = stats[name]
                rows.append(dict(mode=name, slots=slots, sampled=sampled, gamma=modes[name]["gamma"],
                                 speedup=best["plain"] / best[name], seconds=best[name], plain_seconds=best["plain"],
                                 alpha=s.verified_acceptance, tokens_per_round=s.mean_accepted_length))
                print(f"engine, {slots} slots, {'T=1' if sampled else 'greedy':6s} {name:18s} "
                      f"α {s.verified_acceptance:.2f} tokens/round {s.mean_accepted_length:.2f} "
                      f"speedup {rows[-1]['speedup']:.2f}", flush=True)
    return rows


class VerifyCounter:
    """A forward hook for the target: each verify forward's width and the distinct experts
    each MoE layer ran for its tokens (padding included: it is computed too). Forwards
    wider than `max_width` are prefills and not counted."""

    def __init__(self, max_width: int):
        self.max_width, self.widths, self.experts = max_width, [], []

    def record(self, module, args, output) -> None:
        width = args[0].shape[1]
        if width <= self.max_width:
            self.widths.append(width)
            self.experts.append([len(torch.unique(s.expert_ids)) for s in output.routing])


def expected_tokens(alpha: float, n: int) -> float:
    """E(n): expected tokens of a round that proposed n, each passing with probability α."""
    return (1 - alpha ** (n + 1)) / (1 - alpha) if alpha < 1 else n + 1.0


def expected_calls(alphas: np.ndarray, lengths: list[int], new_tokens: int, trials: int = 2000) -> float:
    """Target forwards a batch needs until its slowest row has `new_tokens` tokens, its rows
    passing proposals with probabilities `alphas` [B]: a batch runs until its last row is
    done, so it takes more rounds than new_tokens / E, the more so the more its rows' α
    differ. Simulated, with proposals of the lengths seen in the run."""
    rng = np.random.default_rng(0)
    lengths_np = np.asarray(lengths)
    have = np.zeros((trials, len(alphas)))
    calls = np.zeros(trials)
    while (have < new_tokens).any():
        live = have < new_tokens
        n = rng.choice(lengths_np, size=have.shape)  # [trials, B] proposals this round
        passes = rng.random((*have.shape, int(lengths_np.max()))) < alphas[:, None]
        accepted = np.minimum(np.cumprod(passes, axis=-1).sum(-1), n)  # leading passes, at most n
        have += live * (accepted + 1)
        calls += live.any(-1)
    return float(calls.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="runs/tiny")
    parser.add_argument("--draft", default="runs/draft")
    parser.add_argument("--ngram-draft", help="also time this n-gram draft of the target "
                                              "(scripts/build_ngram_draft.py) at each γ")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="the table's batch sizes")
    parser.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 6], help="the table's fixed γ")
    parser.add_argument("--grid-batches", type=int, nargs="*", default=[1, 2, 4, 8, 16],
                        help="the grid's batch sizes (none: no grid)")
    parser.add_argument("--grid-gammas", type=int, nargs="*", default=[1, 2, 4, 6, 8])
    parser.add_argument("--n-prompts", type=int, default=16, help="prompts per run (at least the largest batch)")
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per batch and mode: the last counts experts, the fastest of the others "
                             "is timed (with 1, the one run does both)")
    parser.add_argument("--engine-slots", type=int, nargs="*", default=[1, 8],
                        help="also decode through the engine with these batch slots (none: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/speculative.json")
    args = parser.parse_args()
    if args.repeats < 1 or min(args.batches + args.grid_batches + args.gammas + args.grid_gammas + args.engine_slots) < 1:
        sys.exit("error: --repeats, batch sizes, engine slots and γ must be at least 1")
    torch.set_num_threads(args.threads)
    for path in (args.target, args.draft):
        if not Path(path).exists():
            sys.exit(f"error: {path} does not exist: train it first (python train.py ...) or pass "
                     "--target/--draft checkpoints")
    target, draft = load_model(args.target).eval(), load_model(args.draft).eval()
    ngram_table = load_ngram_table(args.ngram_draft, target.cfg.vocab_size) if args.ngram_draft else None
    cfg = target.cfg
    sizes = args.batches + args.grid_batches
    n_prompts = max([args.n_prompts, *sizes])
    tokenizer = load_tokenizer(args.target)
    prompts = stdlib_prompts(n_prompts, args.prompt_len, args.seed, tokenizer)
    counts = count_parameters(cfg)
    per_expert = 3 * cfg.d_model * cfg.d_expert  # weights of one expert in one layer
    shared = counts.total - counts.experts  # weights every forward reads
    max_width = max(args.gammas + args.grid_gammas + [16]) + 2  # adaptive γ reaches 16; wider forwards are prefills
    if args.prompt_len <= max_width:
        sys.exit(f"error: --prompt-len must exceed {max_width}, the widest verify forward, so that a "
                 "prefill is told apart from a verify step")

    costs: dict[int, dict] = {}  # per batch: times in seconds
    prompt_alpha: dict[tuple[str, bool], list[float]] = {}  # (mode, sampled) -> α of each prompt at batch 1

    def timings(batch: int) -> dict:
        """Per batch, each forward timed alone, in units of the target's forward over one
        token per row (t1, in seconds here): the draft step c, the prefills and v(w), the
        target forward over w tokens per row."""
        if batch not in costs:
            rows = prompts[:batch]
            target_t = forward_times(target, rows, list(range(max_width + 1)), 9)
            draft_t = forward_times(draft, rows, [0, 1], 9)
            t1 = target_t[1]
            costs[batch] = dict(t1=t1, c=draft_t[1] / t1, prefill=target_t[0] / t1,
                                draft_prefill=draft_t[0] / t1,
                                v={w: t / t1 for w, t in target_t.items() if w > 0})
        return costs[batch]

    def run(batch: int, sampled: bool, modes: dict) -> list[dict]:
        """Every mode over the same prompts in batches of `batch` rows, alternating batch by batch."""
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True,
                                temperature=1.0 if sampled else 0.0, seed=args.seed if sampled else None)
        groups = [prompts[i:i + batch] for i in range(0, n_prompts - batch + 1, batch)]
        seconds = dict.fromkeys(["plain", *modes], 0.0)
        stats = {name: SpeculativeStats() for name in modes}
        # host time (drawing, accepting, bookkeeping: wall time outside forwards), from the timed runs
        timed = {name: SpeculativeStats() for name in modes}
        timed_s = dict.fromkeys(seconds, 0.0)
        plain_timing = dict(prefill_s=0.0, forward_s=0.0, steps=0, runs=0)
        timed_runs = dict.fromkeys(modes, 0)  # speculative_generate calls in `timed`
        row_alpha = {name: [] for name in modes}  # per group: its α, or its rows' α from batch 1
        counters = {name: VerifyCounter(max_width) for name in modes}
        decode_experts, variety = [], []
        for group in groups:
            best = dict.fromkeys(seconds, float("inf"))
            for repeat in range(args.repeats):
                start = time.perf_counter()
                reference = plain_decode(target, group, params, plain_timing)
                elapsed = time.perf_counter() - start
                best["plain"], timed_s["plain"] = min(best["plain"], elapsed), timed_s["plain"] + elapsed
                for name, kwargs in modes.items():
                    counted = repeat == args.repeats - 1  # the hook stays out of the other, timed runs
                    if counted:
                        handle = target.register_forward_hook(counters[name].record)
                    before = (stats[name].accepted, sum(stats[name].reached))
                    start = time.perf_counter()
                    timed_run = not counted or args.repeats == 1
                    out, _ = speculative_generate(target, group, params, stats=stats[name] if counted else timed[name],
                                                  **kwargs)
                    elapsed = time.perf_counter() - start
                    if counted:
                        handle.remove()
                        judged = sum(stats[name].reached) - before[1]
                        row_alpha[name].append((stats[name].accepted - before[0]) / max(judged, 1))
                    if timed_run:
                        best[name] = min(best[name], elapsed)
                        timed_s[name] += elapsed
                        timed_runs[name] += 1
                    if out != reference:
                        sys.exit(f"error: {name} at batch {batch}: speculative output differs from plain "
                                 "decoding; this is a bug")
            for name in seconds:
                seconds[name] += best[name]
            variety += [distinct_4grams(tokenizer.decode(out).encode()) for out in reference]
            counter = VerifyCounter(1)  # a decode step's experts, for the bytes ratio
            handle = target.register_forward_hook(counter.record)
            plain_decode(target, group, replace(params, max_new_tokens=2))
            handle.remove()
            decode_experts += counter.experts
        cost = timings(batch)
        decode = sum(sum(e) for e in decode_experts) / len(decode_experts)  # over layers, per decode step
        n_new = args.new_tokens
        # the unit: a plain decode step's forward as the timed runs ran it (forwards timed
        # alone read slower here at batch 1, and by a share that differs by width)
        t1 = plain_timing["forward_s"] / plain_timing["steps"]
        prefill_s = plain_timing["prefill_s"] / plain_timing["runs"]
        host_plain = (timed_s["plain"] - plain_timing["forward_s"] - plain_timing["prefill_s"]) / plain_timing["steps"] / t1
        plain_time = prefill_s / t1 + (n_new - 1) * (1 + host_plain)
        rows = [dict(mode="plain", batch=batch, sampled=sampled, target_forwards_per_token=1.0,
                     tokens_per_s=len(groups) * batch * n_new / seconds["plain"], seconds=seconds["plain"],
                     decode_experts_per_layer=decode / len(cfg.moe_layers), t1_s=t1, t1_isolated_s=cost["t1"],
                     host_per_step=host_plain,
                     distinct_4grams=sum(variety) / len(variety))]
        for name, kwargs in modes.items():
            s, counter = stats[name], counters[name]
            alpha = s.verified_acceptance
            e_round = sum(expected_tokens(alpha, n) for n in s.proposal_lengths) / len(s.proposal_lengths)
            ts, runs = (timed[name], timed_runs[name]) if args.repeats > 1 else (stats[name], len(groups))
            # each run's first target forward is its prefill (with the first proposals), and
            # its first draft forward the draft's: the rest are verify forwards and draft steps
            v_run = (ts.target_time_s - runs * prefill_s) / (ts.target_calls - runs) / t1
            draft_prefill_s = cost["draft_prefill"] * cost["t1"]
            c = ((ts.draft_time_s - runs * draft_prefill_s) / (ts.draft_forwards - runs) / t1
                 if "draft" in kwargs else 0.0)
            touched = [sum(e) for e in counter.experts]  # per verify forward, over layers
            moe_v = sum((shared + t * per_expert) / (shared + decode * per_expert) for t in touched) / len(touched)
            widths = counter.widths
            round_of = {"predicted_dense": lambda w: (w - 1) * c + 1.0,
                        "predicted_moe": lambda w: (w - 1) * c + moe_v,
                        "predicted": lambda w: (w - 1) * c + v_run}
            extra = draft_prefill_s / t1 if "draft" in kwargs else 0.0
            # each row's own α where batch 1 measured it for this prompt (rows differ: the slowest
            # sets the batch's pace), else the batch's α
            known = prompt_alpha.get((name, sampled))
            alphas = [np.array(known[g * batch:(g + 1) * batch]) if known else np.full(batch, a)
                      for g, a in enumerate(row_alpha[name])]
            calls = sum(expected_calls(a, s.proposal_lengths, n_new) for a in alphas) / len(alphas)
            if batch == 1:
                prompt_alpha[(name, sampled)] = row_alpha[name]
            host = (timed_s[name] - ts.target_time_s - ts.draft_time_s) / ts.target_calls / t1
            predictions = {key: plain_time / (prefill_s / t1 + extra
                                              + (calls - 1) * (sum(map(f, widths)) / len(widths) + host))
                           for key, f in round_of.items()}
            mean_width = sum(widths) / len(widths)
            tokens = batch * mean_width
            rows.append(dict(
                mode=name, batch=batch, sampled=sampled, gamma=kwargs["gamma"],
                adaptive=bool(kwargs.get("adaptive")), speedup=seconds["plain"] / seconds[name],
                **predictions, alpha=alpha, tokens_per_round=s.mean_accepted_length,
                expected_tokens_per_round=e_round, target_forwards_per_token=s.target_calls * batch / s.generated,
                expected_target_forwards_per_token=calls / n_new,
                tokens_per_s=len(groups) * batch * n_new / seconds[name], seconds=seconds[name],
                mean_verify_width=mean_width,
                verify_experts_per_layer=sum(touched) / len(touched) / len(cfg.moe_layers),
                uniform_routing_experts=expected_experts_hit(cfg.n_experts, cfg.experts_per_token, tokens),
                verify_over_decode_bytes=moe_v, c=c, c_isolated=cost["c"] if "draft" in kwargs else 0.0,
                v_in_run=v_run, v={w: cost["v"][w] for w in sorted(set(widths))},
                host_per_round=host, host_per_plain_step=host_plain,
                prefill=prefill_s / t1, draft_prefill=extra,
                mean_proposal_length=s.proposed / max(s.rounds, 1),
                per_position_acceptance=s.per_position_acceptance))
            print(f"batch {batch:2d} {'T=1' if sampled else 'greedy':6s} {name:15s} α {alpha:.2f} "
                  f"tokens/round {s.mean_accepted_length:.2f} experts/layer {rows[-1]['verify_experts_per_layer']:.1f} "
                  f"speedup {rows[-1]['speedup']:.2f} predicted {predictions['predicted']:.2f} "
                  f"(dense {predictions['predicted_dense']:.2f}, MoE bytes {predictions['predicted_moe']:.2f})",
                  flush=True)
        return rows

    plain_decode(target, prompts[:1], SamplingParams(max_new_tokens=4))  # warm-up
    table = []
    for batch in args.batches:
        for sampled in (False, True):
            modes = {**{f"draft_gamma{g}": dict(draft=draft, gamma=g) for g in args.gammas},
                     "draft_adaptive": dict(draft=draft, gamma=max(args.gammas), adaptive=True),
                     "prompt_lookup": dict(proposer=PromptLookupProposer(), gamma=max(args.gammas))}
            if ngram_table is not None:  # at every γ: greedy proposals pass far more often than sampled ones
                modes.update({f"ngram_draft_gamma{g}": dict(proposer=NgramProposer(ngram_table), gamma=g)
                              for g in args.gammas if g < max(args.gammas)})
                modes["ngram_draft"] = dict(proposer=NgramProposer(ngram_table), gamma=max(args.gammas))
            table += run(batch, sampled, modes)
    grid = []
    for batch in args.grid_batches:
        grid += run(batch, False, {f"draft_gamma{g}": dict(draft=draft, gamma=g) for g in args.grid_gammas})
    engine = engine_table(target, draft, ngram_table, prompts[:n_prompts], args.engine_slots, args.new_tokens,
                          args.repeats, max(args.gammas), args.seed)
    stops = {}  # γ -> the first batch where speculation ran slower than plain decoding
    for g in args.grid_gammas if args.grid_batches else []:
        losing = [r["batch"] for r in grid if r.get("gamma") == g and r["speedup"] < 1]
        stops[g] = min(losing) if losing else None
    result = dict(benchmark="speculative", command="python " + " ".join(sys.argv), device="cpu",
                  threads=args.threads, repeats=args.repeats, target=args.target, draft=args.draft, ngram_draft=args.ngram_draft,
                  target_checkpoint=checkpoint_name(args.target), draft_checkpoint=checkpoint_name(args.draft),
                  target_config=vars(cfg), draft_config=vars(draft.cfg), n_prompts=n_prompts,
                  prompt_len=args.prompt_len, new_tokens=args.new_tokens, prompts="stdlib *.py slices",
                  shared_params=shared, params_per_expert_per_layer=per_expert,
                  runs=table, grid=grid, engine=engine, first_losing_batch_per_gamma=stops)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"first batch where speculation loses, per γ: {stops}; results -> {args.out}")


if __name__ == "__main__":
    main()
