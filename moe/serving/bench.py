"""Serving benchmark: continuous against static batching on the same synthetic requests.

Why synthetic: the lengths must be controlled to explain the result. Prompts have a fixed
length; output lengths are fixed or exponential with a cap (the spread is what static
batching pays for), EOS is ignored so a request generates exactly its length. Requests
arrive all at once or as a Poisson process at a given rate (by default 90% of the static
baseline's measured capacity, where static queues start to build).

Both modes run in one process, interleaved (continuous, static, static, continuous, ...)
after a warm-up of both, so drift of a shared machine hits both alike; what counts is the
ratio of each mode's best repeat. Metrics follow the serving literature:

    TTFT   time to first token: arrival -> first generated token
    TPOT   time per output token after the first: (finish - first token) / (n - 1)
    ITL    inter-token latency: gaps between consecutive tokens of a request
    e2e    end-to-end latency: arrival -> last token
    output tokens/s and requests/s over the run (first arrival -> last finish)
    mean running batch, KV utilisation (the share of the run's KV memory holding tokens),
    preemptions
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time

import torch

from moe.serving.engine import Engine, EngineConfig
from moe.serving.requests import Request
from moe.model.transformer import Transformer
from moe.serving.sampling import SamplingParams
from moe.serving.static_batching import run_static_batch


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    arrivals: list[float]  # seconds after the start of the run, non-decreasing


def make_workload(n: int, prompt_len: int, output_dist: str, mean_output: int, max_output: int,
                  rate: float | None, seed: int, vocab_size: int = 259) -> Workload:
    """`rate` None: all requests at time 0; else Poisson arrivals at `rate` per second.
    Prompt ids are printable ASCII (bytes 32..126 of our tokenizer), taken modulo a
    smaller vocabulary (a Hugging Face model's tokenizer may have fewer ids)."""
    g = torch.Generator().manual_seed(seed)
    prompts = (torch.randint(32, 127, (n, prompt_len), generator=g) % vocab_size).tolist()
    if output_dist == "fixed":
        lens = [mean_output] * n
    elif output_dist == "exponential":
        draws = torch.empty(n).exponential_(1.0 / mean_output, generator=g)
        lens = [max(1, min(max_output, math.ceil(x))) for x in draws.tolist()]
    else:
        raise ValueError(f"output_dist must be 'fixed' or 'exponential', got {output_dist!r}")
    if rate is None:
        arrivals = [0.0] * n
    else:
        gaps = torch.empty(n).exponential_(rate, generator=g)
        arrivals = gaps.cumsum(0).sub(gaps[0]).tolist()
    return Workload(prompts, lens, arrivals)


def _requests(workload: Workload, start: float) -> list[Request]:
    return [Request(i, p, SamplingParams(max_new_tokens=n, ignore_eos=True), start + a)
            for i, (p, n, a) in enumerate(zip(workload.prompts, workload.output_lens, workload.arrivals))]


def _wait_until(clock, moment: float) -> None:
    delay = moment - clock()
    if delay > 0:
        time.sleep(delay)


def run_continuous(model: Transformer, workload: Workload, config: EngineConfig,
                   clock=time.perf_counter) -> dict:
    engine = Engine(model, config, clock)
    start = clock()
    pending = _requests(workload, start)
    served = []
    while pending or engine.has_unfinished():
        while pending and pending[0].arrival_time <= clock():
            request = pending.pop(0)
            served.append(engine.add_request(request.prompt, request.params, request.arrival_time))
        if engine.has_unfinished():
            engine.step()
        elif pending:
            _wait_until(clock, pending[0].arrival_time)
    pool = engine.blocks.num_blocks
    return summarise("continuous", served, start, engine.batch_sizes,
                     statistics.fmean(engine.block_utilisation), engine.preemptions,
                     dict(slots=config.max_num_seqs, kv_pool_tokens=pool * config.block_size))


def run_static(model: Transformer, workload: Workload, slots: int, clock=time.perf_counter) -> dict:
    """Batches of up to `slots` requests, formed from those waiting when the last batch ends."""
    max_len = model.cfg.max_seq_len
    start = clock()
    pending = _requests(workload, start)
    served, live, utilisation = [], [], []
    while pending:
        _wait_until(clock, pending[0].arrival_time)
        now = clock()
        batch = [r for r in pending[:slots] if r.arrival_time <= now]
        pending = pending[len(batch):]
        steps = run_static_batch(model, batch, clock)
        live += steps
        # the batch reserves slots x max_seq_len of cache; count what live rows hold
        lens = [len(r.prompt) for r in batch]
        for step, n_live in enumerate(steps):
            held = sum(min(p + step + 1, len(r.tokens)) for p, r in zip(lens, batch) if len(r.output) > step)
            utilisation.append(held / (slots * max_len))
        served += batch
    return summarise("static", served, start, live, statistics.fmean(utilisation), 0,
                     dict(slots=slots, kv_pool_tokens=slots * max_len))


def distribution(values: list[float]) -> dict:
    if not values:
        return dict(mean=float("nan"), p50=float("nan"), p90=float("nan"), p99=float("nan"))
    ordered = sorted(values)

    def percentile(q: float) -> float:  # linear interpolation between closest ranks
        x = q * (len(ordered) - 1)
        lo, hi = math.floor(x), math.ceil(x)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (x - lo)

    return dict(mean=statistics.fmean(ordered), p50=percentile(0.5), p90=percentile(0.9),
                p99=percentile(0.99))


def summarise(mode: str, requests: list[Request], start: float, batch_sizes: list[int],
              kv_utilisation: float, preemptions: int, extra: dict) -> dict:
    end = max(r.finish_time for r in requests)
    wall = end - start
    outputs = sum(len(r.output) for r in requests)
    itl = [b - a for r in requests for a, b in zip(r.token_times, r.token_times[1:])]
    return dict(
        mode=mode, **extra, n_requests=len(requests),
        mean_prompt_len=statistics.fmean(len(r.prompt) for r in requests),
        mean_output_len=outputs / len(requests),
        steps=len(batch_sizes), mean_batch=statistics.fmean(batch_sizes), wall_s=wall,
        output_tokens_per_s=outputs / wall, requests_per_s=len(requests) / wall,
        ttft_s=distribution([r.first_token_time - r.arrival_time for r in requests]),
        tpot_s=distribution([(r.finish_time - r.first_token_time) / (len(r.output) - 1)
                             for r in requests if len(r.output) > 1]),
        itl_s=distribution(itl),
        e2e_s=distribution([r.finish_time - r.arrival_time for r in requests]),
        kv_utilisation=kv_utilisation, preemptions=preemptions)


def step_ceiling(output_lens: list[int], slots: int) -> float:
    """Static steps (sum of each batch's longest) over the fewest steps continuous batching
    could take (all tokens spread over the slots): the speed-up bound from scheduling alone,
    E[max] / E[mean] for all-at-once arrivals."""
    static = sum(max(output_lens[i:i + slots]) for i in range(0, len(output_lens), slots))
    return static / (sum(output_lens) / slots)


def compare(model: Transformer, workload: Workload, slots: int, repeats: int, engine_config: dict) -> dict:
    """Interleaved runs of both modes. The ratios compare each mode's best repeat (highest
    tokens/s; lowest p50 latency): on a shared machine, noise only ever slows a run down."""
    config = EngineConfig(max_num_seqs=slots, **engine_config)
    runs = []
    for repeat in range(repeats):
        order = ("continuous", "static") if repeat % 2 == 0 else ("static", "continuous")
        for mode in order:
            run = (run_continuous(model, workload, config) if mode == "continuous"
                   else run_static(model, workload, slots))
            runs.append(dict(run, repeat=repeat))
    best = {mode: dict(output_tokens_per_s=max(r["output_tokens_per_s"] for r in runs if r["mode"] == mode),
                       e2e_p50=min(r["e2e_s"]["p50"] for r in runs if r["mode"] == mode))
            for mode in ("continuous", "static")}
    return dict(
        runs=runs,
        comparison=dict(
            slots=slots, poisson=any(a > 0 for a in workload.arrivals),
            throughput_ratio=(best["continuous"]["output_tokens_per_s"]
                              / best["static"]["output_tokens_per_s"]),
            e2e_p50_ratio=best["static"]["e2e_p50"] / best["continuous"]["e2e_p50"],
            step_ceiling=step_ceiling(workload.output_lens, slots)))
