"""Client-side serving benchmark: a load generator for any OpenAI-compatible /v1/completions.

Why from the client: a user waits for more than the engine's steps. The in-process
benchmark (moe/serving/bench.py) times the engine alone; a request sent over HTTP also
pays for the server's request parsing, its event loop, the queue to the engine thread,
detokenisation, server-sent-event framing and the network. The numbers here are taken
with the client's clock, so they are what a user of the server sees. And since only the
OpenAI protocol is spoken, the same command measures any compatible server (this
repository's `generate.py serve`, vLLM, SGLang, ...) on the same workload.

    python generate.py serve --threads 2 &                    # a random-init configs/tiny.toml
    python generate.py bench --url http://127.0.0.1:8000 --rate inf            # capacity
    python generate.py bench --url http://127.0.0.1:8000 --rate 2.5 --out benchmarks/results/x.json
    python generate.py bench --url http://127.0.0.1:8000 --workload shared-prefix

Workloads (token-id prompts, so their lengths are exact; ids are printable ASCII, as in
bench.py; `ignore_eos: true`, so a request generates exactly `max_tokens` unless the
model's context ends first):
    random         prompt lengths uniform in [--prompt-len-min, --prompt-len-max]; output
                   lengths as bench.py draws them (--output-dist, --mean-output, --max-output)
    shared-prefix  --n-requests prompts: one --prefix-len prefix, then a distinct
                   --suffix-len suffix each; --output-len tokens each (what a prefix cache
                   saves on)
Requests arrive as a Poisson process at --rate requests/s, or all at once (--rate inf).

Counting tokens: this server sends one chunk per piece of stable text, and a token that
completes no character (part of a UTF-8 sequence, a held-back stop string) sends none, so
chunks are not tokens. Every request therefore asks for `"logprobs": 0`: the server then
sends one chunk per token, each naming it in `logprobs.tokens`, as vLLM does too. A
server that sends a `usage` object in its stream has the last word on the count; one that
ignores logprobs is counted one token per chunk with text. (`stream_options` is not sent:
this server refuses fields it does not know.)

Metrics, all on the client's clock (time.perf_counter), over the requests that completed:
    TTFT   request sent -> first chunk carrying a token
    TPOT   per request, (e2e - TTFT) / (output tokens - 1)
    ITL    gaps between consecutive chunks carrying tokens
    e2e    request sent -> end of its stream ([DONE])
    output tokens/s and requests/s over the run: first request sent -> last stream ended
each as mean, p50, p90 and p99 (bench.distribution). Failures (an HTTP error, an error
event, a stream cut short) are counted, with a sample message; the server's /metrics
are read before and after the run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import re
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

from moe.serving.bench import Workload, distribution, make_workload

WORKLOADS = ("random", "shared-prefix")
PROMETHEUS_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?)\s+(\S+)(?:\s+-?\d+)?")


# ---------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------

def random_workload(n_requests: int, prompt_len_min: int, prompt_len_max: int, output_dist: str,
                    mean_output: int, max_output: int, rate_per_s: float, seed: int) -> Workload:
    """bench.make_workload's output lengths and arrivals, with each prompt cut to a length
    drawn uniformly from [prompt_len_min, prompt_len_max]."""
    full = make_workload(n_requests, prompt_len_max, output_dist, mean_output, max_output,
                         arrival_rate(rate_per_s), seed)
    g = torch.Generator().manual_seed(seed + 1)
    prompt_lens = torch.randint(prompt_len_min, prompt_len_max + 1, (n_requests,), generator=g).tolist()
    return Workload([p[:n] for p, n in zip(full.prompts, prompt_lens)], full.output_lens, full.arrivals)


def shared_prefix_workload(n_requests: int, prefix_len: int, suffix_len: int, output_len: int,
                           rate_per_s: float, seed: int) -> Workload:
    """One prefix of `prefix_len` ids, then each request's own `suffix_len` random ids."""
    suffixes = make_workload(n_requests, suffix_len, "fixed", output_len, output_len,
                             arrival_rate(rate_per_s), seed)
    prefix = make_workload(1, prefix_len, "fixed", 1, 1, None, seed + 1).prompts[0]
    return Workload([prefix + s for s in suffixes.prompts], suffixes.output_lens, suffixes.arrivals)


def arrival_rate(rate_per_s: float) -> float | None:
    """make_workload's rate: None (all at once) for an infinite rate."""
    return None if math.isinf(rate_per_s) else rate_per_s


# ---------------------------------------------------------------------------------------
# One streamed request
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Chunk:
    time_s: float  # perf_counter when its event arrived
    logprob_tokens: int | None  # tokens its logprobs name; None: it has no logprobs
    has_text: bool


@dataclasses.dataclass
class RequestResult:
    prompt_tokens: int
    max_tokens: int
    sent_s: float  # perf_counter when the request was sent
    end_s: float  # perf_counter when its stream ended (or it failed)
    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    usage_tokens: int | None = None  # completion_tokens of a usage object in the stream
    finish_reason: str | None = None
    error: str | None = None

    def tokens_per_chunk(self) -> list[int]:
        """What each chunk carries: the tokens its logprobs name when the server sends them
        at all, else one per chunk with text."""
        if any(c.logprob_tokens is not None for c in self.chunks):
            return [c.logprob_tokens or 0 for c in self.chunks]
        return [int(c.has_text) for c in self.chunks]

    def token_times_s(self) -> list[float]:
        return [c.time_s for c, n in zip(self.chunks, self.tokens_per_chunk()) if n]

    def output_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else sum(self.tokens_per_chunk())

    def ttft_s(self) -> float:
        return self.token_times_s()[0] - self.sent_s

    def e2e_s(self) -> float:
        return self.end_s - self.sent_s


def request_body(model: str, prompt: list[int], max_tokens: int, temperature: float) -> dict:
    return dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
                stream=True, ignore_eos=True, logprobs=0)


def error_message(body: bytes) -> str:
    """An OpenAI-style error body's message, else the body itself (shortened)."""
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]


async def send(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """POST one streamed completion; every event timestamped as it arrives."""
    sent = time.perf_counter()
    result = RequestResult(len(body["prompt"]), body["max_tokens"], sent, sent)
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {error_message(await response.aread())}"
            else:
                await read_events(response, result)
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
    if result.error is None and not result.token_times_s():
        result.error = "the stream carried no token"
    if result.error is not None:
        result.end_s = time.perf_counter()
    return result


async def read_events(response: httpx.Response, result: RequestResult) -> None:
    """Server-sent events into `result` until [DONE]; an error event or a stream that ends
    without [DONE] sets `result.error`."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        now, data = time.perf_counter(), line[len("data:"):].strip()
        result.end_s = now
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            result.error = f"error event: {error.get('message', error) if isinstance(error, dict) else error}"
            return
        if event.get("usage"):
            result.usage_tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices") or []:
            logprobs = choice.get("logprobs")
            result.chunks.append(Chunk(now, len(logprobs["tokens"]) if logprobs else None,
                                       bool(choice.get("text"))))
            result.finish_reason = choice.get("finish_reason") or result.finish_reason
    result.error = "the stream ended without [DONE]"


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------

async def run_workload(client: httpx.AsyncClient, url: str, model: str, workload: Workload,
                       temperature: float) -> list[RequestResult]:
    """Each request sent at its arrival time (seconds after the start), all streamed at once."""
    start = time.perf_counter()

    async def at(arrival_s: float, body: dict) -> RequestResult:
        await asyncio.sleep(max(0.0, start + arrival_s - time.perf_counter()))
        return await send(client, url, body)
    return await asyncio.gather(*(
        at(arrival, request_body(model, prompt, n, temperature))
        for prompt, n, arrival in zip(workload.prompts, workload.output_lens, workload.arrivals)))


async def served_model(client: httpx.AsyncClient, url: str) -> str:
    """The first model GET /v1/models lists."""
    try:
        response = await client.get(url + "/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as error:
        raise ValueError(f"--url {url}: GET /v1/models named no model ({type(error).__name__}: "
                         f"{error}); is the server up? Or name the model with --model") from None


async def server_metrics(client: httpx.AsyncClient, url: str) -> dict[str, float] | None:
    """GET /metrics parsed, or None where the server has no such endpoint."""
    try:
        response = await client.get(url + "/metrics")
    except httpx.HTTPError:
        return None
    return parse_prometheus(response.text) if response.status_code == 200 else None


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text format: {'name' or 'name{labels}': value}; comments and lines that
    are not samples are skipped."""
    samples = {}
    for line in text.splitlines():
        match = PROMETHEUS_SAMPLE.fullmatch(line.strip())
        if match:
            try:
                samples[match[1]] = float(match[2])
            except ValueError:
                continue
    return samples


async def warm_up(client: httpx.AsyncClient, url: str, model: str, n_requests: int,
                  temperature: float, seed: int) -> None:
    """A few short requests first (a fresh server's first forwards are slow); one that fails
    stops the benchmark with its message (a wrong --model, a server that refuses ids...)."""
    if n_requests == 0:
        return
    warm = make_workload(n_requests, 8, "fixed", 4, 4, None, seed)
    for result in await run_workload(client, url, model, warm, temperature):
        if result.error:
            raise ValueError(f"a warm-up request to {url} failed: {result.error}")


async def benchmark(url: str, model: str | None, workload: Workload, temperature: float,
                    warmup_requests: int, timeout_s: float, seed: int) -> dict:
    """The model served, the summary, the server's /metrics before and after, and each
    request's own figures."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)  # no client queue
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        model = model or await served_model(client, url)
        await warm_up(client, url, model, warmup_requests, temperature, seed + 2)
        before = await server_metrics(client, url)
        results = await run_workload(client, url, model, workload, temperature)
        after = await server_metrics(client, url)
    return dict(model=model, summary=summarise(results), metrics_before=before, metrics_after=after,
                requests=[request_record(r) for r in results])


def summarise(results: list[RequestResult]) -> dict:
    done = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    wall_s = max(r.end_s for r in results) - min(r.sent_s for r in results)
    output_tokens = sum(r.output_tokens() for r in done)
    return dict(
        n_requests=len(results), completed=len(done),
        failures=dict(count=len(failed), sample=failed[0].error if failed else None,
                      messages=dict(Counter(r.error for r in failed))),
        finish_reasons=dict(Counter(str(r.finish_reason) for r in done)),
        wall_s=wall_s, output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / wall_s if wall_s > 0 else float("nan"),
        requests_per_s=len(done) / wall_s if wall_s > 0 else float("nan"),
        mean_prompt_tokens=sum(r.prompt_tokens for r in results) / len(results),
        mean_output_tokens=output_tokens / len(done) if done else float("nan"),
        ttft_s=distribution([r.ttft_s() for r in done]),
        tpot_s=distribution([(r.e2e_s() - r.ttft_s()) / (r.output_tokens() - 1)
                             for r in done if r.output_tokens() > 1]),
        itl_s=distribution([b - a for r in done for a, b in zip(r.token_times_s(), r.token_times_s()[1:])]),
        e2e_s=distribution([r.e2e_s() for r in done]))


def request_record(result: RequestResult) -> dict:
    done = result.error is None
    return dict(prompt_tokens=result.prompt_tokens, max_tokens=result.max_tokens,
                output_tokens=result.output_tokens() if done else None,
                ttft_s=result.ttft_s() if done else None, e2e_s=result.e2e_s(),
                finish_reason=result.finish_reason, error=result.error)


# ---------------------------------------------------------------------------------------
# The command line: generate.py bench --url URL ...
# ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="generate.py bench --url URL", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id to send; default: GET /v1/models' first")
    parser.add_argument("--workload", default="random", choices=WORKLOADS)
    parser.add_argument("--rate", type=float, default=math.inf,
                        help="Poisson arrivals, requests/s; inf: all at once (default)")
    parser.add_argument("--n-requests", type=int, default=64)
    parser.add_argument("--prompt-len-min", type=int, default=8, help="random: shortest prompt, tokens")
    parser.add_argument("--prompt-len-max", type=int, default=64, help="random: longest prompt, tokens")
    parser.add_argument("--output-dist", default="exponential", choices=["exponential", "fixed"],
                        help="random: output lengths")
    parser.add_argument("--mean-output", type=int, default=32, help="random: mean output, tokens")
    parser.add_argument("--max-output", type=int, default=128, help="random: longest output, tokens")
    parser.add_argument("--prefix-len", type=int, default=192, help="shared-prefix: shared tokens")
    parser.add_argument("--suffix-len", type=int, default=8, help="shared-prefix: distinct tokens each")
    parser.add_argument("--output-len", type=int, default=16, help="shared-prefix: output tokens each")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy, as bench.py")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2, help="short requests sent before measuring")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds an HTTP read may wait")
    parser.add_argument("--server", default=None, metavar="COMMAND",
                        help="how the server was started, recorded in the JSON (the client cannot see it)")
    parser.add_argument("--out", default=None,
                        help="JSON path; default benchmarks/results/serving_<workload>.json")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, refused with a ValueError naming the flag where they cannot work."""
    args = build_parser().parse_args(argv)
    if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", args.url):
        raise ValueError(f"--url must be an http:// or https:// URL, e.g. http://127.0.0.1:8000, "
                         f"got {args.url!r}")
    args.url = args.url.rstrip("/")
    if not args.rate > 0:
        raise ValueError(f"--rate must be positive requests/s, or inf for all at once, got {args.rate}")
    at_least = dict(n_requests=1, prompt_len_min=1, prompt_len_max=1, mean_output=1, max_output=1,
                    prefix_len=1, suffix_len=1, output_len=1, warmup=0)
    for key, least in at_least.items():
        if getattr(args, key) < least:
            raise ValueError(f"--{key.replace('_', '-')} must be at least {least}, got {getattr(args, key)}")
    if args.prompt_len_max < args.prompt_len_min:
        raise ValueError(f"--prompt-len-max {args.prompt_len_max} is below --prompt-len-min "
                         f"{args.prompt_len_min}")
    if not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.timeout < math.inf:
        raise ValueError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    return args


def workload_params(args: argparse.Namespace) -> dict:
    """The flags that define the workload, as the JSON records them (rate None: all at once)."""
    keys = (("prompt_len_min", "prompt_len_max", "output_dist", "mean_output", "max_output")
            if args.workload == "random" else ("prefix_len", "suffix_len", "output_len"))
    return dict(name=args.workload, n_requests=args.n_requests, rate_per_s=arrival_rate(args.rate),
                seed=args.seed, temperature=args.temperature, ignore_eos=True,
                **{key: getattr(args, key) for key in keys})


def build_workload(args: argparse.Namespace) -> Workload:
    if args.workload == "random":
        return random_workload(args.n_requests, args.prompt_len_min, args.prompt_len_max, args.output_dist,
                               args.mean_output, args.max_output, args.rate, args.seed)
    return shared_prefix_workload(args.n_requests, args.prefix_len, args.suffix_len, args.output_len,
                                  args.rate, args.seed)


def main(argv: list[str]) -> dict:
    """Run the benchmark the flags describe, print it, write its JSON; returns the record."""
    args = parse_args(argv)
    result = asyncio.run(benchmark(args.url, args.model, build_workload(args), args.temperature,
                                   args.warmup, args.timeout, args.seed))
    record = dict(command=sys.argv, server=args.server, url=args.url,
                  workload=workload_params(args), **result)
    print_summary(record)
    out = Path(args.out or f"benchmarks/results/serving_{args.workload.replace('-', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"-> {out}")
    return record


def print_summary(record: dict) -> None:
    s, w = record["summary"], record["workload"]
    arrival = "all at once" if w["rate_per_s"] is None else f"Poisson {w['rate_per_s']:g} requests/s"
    print(f"{record['url']} model {record['model']}: {w['name']}, {w['n_requests']} requests, {arrival}")
    print(f"completed {s['completed']}/{s['n_requests']}, failures {s['failures']['count']}"
          + (f" (e.g. {s['failures']['sample']})" if s["failures"]["count"] else ""))
    print(f"{s['output_tokens_per_s']:.1f} output tokens/s, {s['requests_per_s']:.2f} requests/s "
          f"over {s['wall_s']:.2f} s ({s['mean_prompt_tokens']:.1f} prompt, "
          f"{s['mean_output_tokens']:.1f} output tokens per request)")
    print(f"{'ms':>6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        d = s[f"{name}_s"]
        print(f"{name.upper():>6} " + " ".join(f"{1000 * d[q]:>9.2f}" for q in ("mean", "p50", "p90", "p99")))
