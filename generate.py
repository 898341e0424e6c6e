"""Generate text from a checkpoint, serve a file of requests, or benchmark the engine.

    # stream one completion as it is generated
    python generate.py --ckpt runs/tiny --prompt "def main(" --max-new-tokens 100 --temperature 0.8

    # speculative decoding: a draft proposes 4 tokens, the target checks them in one forward
    python generate.py --ckpt runs/tiny --draft runs/draft --speculate 4 --prompt "import os"
    python generate.py --ckpt runs/tiny --draft runs/draft --prompt-file prompts.jsonl   # in the engine
    python generate.py --ckpt runs/tiny --prompt-lookup --prompt "..."   # proposals from earlier text
    python generate.py --ckpt runs/tiny --ngram-draft runs/tiny/ngram_draft.safetensors --speculate 6 \
        --prompt "import os"   # then from a table of the target's own guesses (scripts/build_ngram_draft.py)

    # many requests through the continuous-batching engine: JSONL in, JSONL out
    # (one object per line: {"prompt": "...", "max_new_tokens": 50, "temperature": 0.7, ...})
    python generate.py --ckpt runs/tiny --prompt-file prompts.jsonl --out results.jsonl

    # a Hugging Face Mixtral folder: its tokenizer.json is used when the `tokenizers`
    # package is installed (a dependency), else our byte-level tokenizer
    python generate.py --ckpt path/to/mixtral --prompt "The capital of France is"

    # continuous vs static batching, side by side; writes benchmarks/results/*.json
    python generate.py bench --ckpt runs/tiny --slots 8 16
    python generate.py bench --arrival poisson            # rate: 90% of static capacity

Without --ckpt, `bench` uses a randomly initialised model of --config (speed does not
depend on the weights when EOS is ignored). The logic lives in moe/serving/generation.py,
moe/serving/engine.py, moe/serving/static_batching.py and moe/serving/bench.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from moe.cli import run_main
from moe.io.checkpoint import load_model, stored_dtype
from moe.config import load_model_config
from moe.serving.engine import Engine, EngineConfig
from moe.serving.generation import stream
from moe.model.transformer import Transformer, require_causal
from moe.serving.sampling import SamplingParams
from moe.serving.stopping import Detokenizer
from moe.serving.text import TextStream, TextTokenizer, load_tokenizer, text_pieces

SAMPLING_KEYS = {f.name for f in dataclasses.fields(SamplingParams)}
SETTING_TYPES = dict(temperature=(int, float), top_k=(int,), top_p=(int, float), max_new_tokens=(int,),
                     seed=(int,), ignore_eos=(bool,))
ENGINE_DEFAULTS = EngineConfig()  # the engine flags' defaults: EngineConfig's, written there only


def mb_to_bytes(mb: float | None) -> int | None:
    return None if mb is None else int(mb * 2**20)


def bytes_to_mb(n: int | None) -> float | None:
    return None if n is None else n / 2**20


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-num-batched-tokens", type=int, default=ENGINE_DEFAULTS.max_num_batched_tokens,
                        help="tokens per forward")
    parser.add_argument("--prefill-chunk", type=int, default=ENGINE_DEFAULTS.prefill_chunk,
                        help="longest prompt piece per step")
    parser.add_argument("--block-size", type=int, default=ENGINE_DEFAULTS.block_size,
                        help="tokens per KV block")
    parser.add_argument("--num-blocks", type=int, default=ENGINE_DEFAULTS.num_blocks,
                        help="KV pool size in blocks")
    parser.add_argument("--kv-cache-mb", type=float, default=bytes_to_mb(ENGINE_DEFAULTS.kv_cache_bytes),
                        help="KV pool size as a memory budget")
    parser.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                        default=ENGINE_DEFAULTS.prefix_caching,
                        help="recompute every prompt in full (default: reuse cached prefix blocks)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the decode step first: --prompt's (speculative: the target's "
                             "verify step), or the engine's all-decode steps (pays for long runs; the compile "
                             "time is printed)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "float64"],
                        help="weights and KV cache (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def parse_engine_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse, check --device and --threads, then fill the dtype default for the device:
    bfloat16 on CUDA (the tensor cores' type, half the bytes per decode step), float32 on CPU."""
    args = parser.parse_args(argv)
    check_device(args.device)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    if args.dtype is None:
        args.dtype = default_dtype(getattr(args, "ckpt", None), args.device)
    return args


def default_dtype(ckpt: str | None, device: str) -> str:
    """The checkpoint's own dtype (a bf16 release stays bf16), except float32 on CUDA, which
    runs in bf16 (the tensor cores' type, half the bytes per decode step); a random init:
    bf16 on CUDA, float32 on CPU."""
    cuda = device.startswith("cuda")
    dtype = stored_dtype(ckpt) if ckpt else torch.float32
    if cuda and dtype == torch.float32:
        dtype = torch.bfloat16
    return str(dtype).removeprefix("torch.")


def check_device(name: str) -> None:
    """Refuse a device torch cannot use here before weights are loaded onto it (safetensors
    would report the checkpoint as corrupt)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}, but {torch.cuda.device_count()} CUDA devices are visible; "
                         "use --device cpu or a visible cuda:N")


def engine_settings(args) -> dict:
    """EngineConfig's fields from the engine flags, all but max_num_seqs (--max-num-seqs or --slots)."""
    return dict(max_num_batched_tokens=args.max_num_batched_tokens, prefill_chunk=args.prefill_chunk,
                block_size=args.block_size, num_blocks=args.num_blocks,
                kv_cache_bytes=mb_to_bytes(args.kv_cache_mb), prefix_caching=args.prefix_caching,
                compile=args.compile)


def build_model(args) -> tuple[Transformer, str]:
    """The model to generate from, refused at once if it cannot generate (expert choice)."""
    dtype = getattr(torch, args.dtype)
    if args.ckpt:
        model = load_model(args.ckpt, args.device, dtype).eval()
        require_causal(model.cfg)
        return model, str(args.ckpt)
    torch.manual_seed(0)
    cfg = load_model_config(args.config, args.set)
    require_causal(cfg)
    return Transformer(cfg).to(args.device, dtype).eval(), f"random init of {args.config}"


# ---------------------------------------------------------------------------------------
# generate: one streamed prompt, or a JSONL file through the engine
# ---------------------------------------------------------------------------------------

def load_text_tokenizer(path: str, model: Transformer, bos: bool) -> TextTokenizer:
    """The checkpoint's tokenizer (see moe/serving/text.py), checked against the model; named on stderr."""
    tokenizer = load_tokenizer(path)
    problem = tokenizer.vocab_problem(model.cfg.vocab_size)
    if problem:
        sys.exit(f"error: {problem}")
    if bos and tokenizer.bos_id is None:
        sys.exit(f"error: --bos, but the tokenizer ({tokenizer.source}) has no BOS id (config.json "
                 "names no bos_token_id); drop --bos or add bos_token_id to config.json")
    print(f"tokenizer: {tokenizer.source}", file=sys.stderr)
    return tokenizer


def encode_prompt(tokenizer: TextTokenizer, prompt: str, bos: bool) -> list[int]:
    return ([tokenizer.bos_id] if bos else []) + tokenizer.encode(prompt)


def stream_prompt(model: Transformer, prompt: list[int], params: SamplingParams,
                  detok: Detokenizer, compile: bool = False) -> None:
    """Print text as tokens arrive, holding back what may yet change or start a stop string;
    with `compile`, the decode step's compile time goes to stderr once it is known."""
    tokens = stream(model, prompt, params, detok, compile)
    for piece in text_pieces(report_compile(tokens) if compile else tokens, params, detok):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def report_compile(tokens):
    """Pass `tokens` through; the time between the first (from the prompt's forward) and the
    second (the first decode step, which compiles) goes to stderr."""
    began = None
    for i, token in enumerate(tokens):
        if i == 1:
            print(f"[compile: the first decode step took {time.perf_counter() - began:.1f} s]", file=sys.stderr)
        began = time.perf_counter()
        yield token


def proposer_flags(args) -> list[str]:
    """The speculative-decoding flags given; more than one is refused (each is a way to
    propose tokens)."""
    given = [flag for flag, value in (("--draft", args.draft), ("--prompt-lookup", args.prompt_lookup),
                                      ("--ngram-draft", args.ngram_draft)) if value]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} are different ways to propose tokens: give one "
                         "(--ngram-draft includes prompt lookup)")
    return given


def load_ngram_table(args):
    """--ngram-draft's table, read before the model loads so that a missing or wrong file
    is refused at once; None without the flag."""
    if not args.ngram_draft:
        return None
    from moe.serving.ngram_draft import NgramDraft
    table = NgramDraft.load(args.ngram_draft)
    if not table.dist_keys:
        print(f"note: {args.ngram_draft} holds no distributions (it was built before they existed), so a "
              "sampled request gets its fixed guesses, which seldom equal the target's draw; build it again "
              "with scripts/build_ngram_draft.py", file=sys.stderr)
    return table


def model_free_proposer(args, model: Transformer, table):
    """The proposer that needs no draft model, as the flags ask: prompt lookup alone, or
    followed by the n-gram draft `table`; None for neither."""
    from moe.serving.speculative import PromptLookupProposer
    if table is None:
        return PromptLookupProposer() if args.prompt_lookup else None
    from moe.serving.ngram_draft import NgramProposer
    table.check_vocab(model.cfg.vocab_size, f"--ngram-draft {args.ngram_draft}")
    return NgramProposer(table)


def speculate_prompt(model: Transformer, args, prompt: list[int], params: SamplingParams,
                     detok: Detokenizer, proposer) -> None:
    """Stream the completion decoded speculatively (each round's tokens as they are kept),
    then print the run's statistics on stderr. `proposer`: prompt lookup or the n-gram
    draft, else None for --draft. With --compile the target's verify forward is compiled
    first (a draft's steps stay eager)."""
    from moe.serving.speculative import speculative_generate
    draft = load_model(args.draft, args.device, getattr(torch, args.dtype)).eval() if args.draft else None
    text = TextStream(params, detok)

    def show(row: int, tokens: list[int]) -> None:
        for token in tokens:
            sys.stdout.write(text.push(token))
        sys.stdout.flush()
    graphs: dict = {}
    _, stats = speculative_generate(model, [prompt], params, proposer=proposer, draft=draft,
                                    gamma=args.speculate, adaptive=args.adaptive, detok=detok,
                                    on_tokens=show, compile=args.compile, compiled_steps=graphs)
    sys.stdout.write(text.finish() + "\n")
    for step in graphs.values():
        print(f"[compile: the verify step compiled in {step.compile_seconds:.1f} s]", file=sys.stderr)
    print(json.dumps(stats.as_dict()), file=sys.stderr)


def parse_line(line: str) -> tuple[str, SamplingParams]:
    item = json.loads(line)
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
        raise ValueError('each line must be an object with a "prompt" string')
    unknown = set(item) - SAMPLING_KEYS - {"prompt"}
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}; known: prompt, {', '.join(sorted(SAMPLING_KEYS))}")
    settings = {k: v for k, v in item.items() if k != "prompt"}
    if "stop" in settings:
        stop = settings["stop"]
        settings["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
        if not all(isinstance(s, str) for s in settings["stop"]):
            raise ValueError('"stop" must be a string or a list of strings')
    for key, kinds in SETTING_TYPES.items():
        value = settings.get(key)
        wrong_bool = isinstance(value, bool) != (kinds == (bool,))
        if value is not None and (wrong_bool or not isinstance(value, kinds)):
            raise ValueError(f'"{key}" must be {" or ".join(k.__name__ for k in kinds)}, got {value!r}')
    return item["prompt"], SamplingParams(**settings)


def serve_file(model: Transformer, path: str, out: str | None, engine_config: EngineConfig,
               tokenizer: TextTokenizer, bos: bool, draft: Transformer | None = None,
               gamma: int = 4, adaptive: bool = False, lookup=None) -> None:
    """Every request of the file through the engine; speculative with a `draft` model or a
    `lookup` proposer (prompt lookup, or with the n-gram draft)."""
    if draft is not None or lookup is not None:
        from moe.serving.speculative_engine import SpeculativeEngine
        engine = SpeculativeEngine(model, draft, gamma, engine_config, adaptive=adaptive, lookup=lookup)
    else:
        engine = Engine(model, engine_config)
    lines = Path(path).read_text().splitlines()
    sink = open(out, "w") if out else sys.stdout
    counts = {"results": 0, "refused": 0}

    def emit(result: dict) -> None:  # each result as soon as it is known
        sink.write(json.dumps(result) + "\n")
        sink.flush()
        counts["results"] += 1
        counts["refused"] += result["status"] == "refused"
    line_of = {}
    try:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                prompt, params = parse_line(line)
            except (ValueError, TypeError) as error:
                emit(dict(line=number, status="refused", refusal=f"line {number}: {error}"))
                continue
            ids = encode_prompt(tokenizer, prompt, bos)
            line_of[engine.add_request(ids, params, detok=tokenizer.detokenizer(ids)).request_id] = number
        while engine.has_unfinished() or engine.finished:
            steps = engine.steps
            engine.step()
            for r in engine.take_finished():
                emit(result_of(line_of[r.request_id], r))
            if engine.has_unfinished() and engine.steps == steps and not engine.finished:
                raise RuntimeError("no request could be scheduled; this is a scheduler bug, please report it")
    finally:
        if out:
            sink.close()
    if out:
        print(f"{counts['results']} results -> {out} ({counts['refused']} refused)")
    if engine.decode_graph is not None and engine.decode_graph.compile_seconds is not None:
        print(f"[compile: the engine's decode step compiled in {engine.decode_graph.compile_seconds:.1f} s]",
              file=sys.stderr)
    if draft is not None or lookup is not None:  # the speculative statistics, as --prompt prints them
        print(json.dumps(engine.stats.as_dict()), file=sys.stderr)


def result_of(number: int, r) -> dict:
    """One --prompt-file result: the request's line, outcome and timings."""
    result = dict(line=number, status=r.status, finish_reason=r.finish_reason)
    if r.refusal:
        result["refusal"] = r.refusal
    else:
        result.update(text=r.text, output_tokens=len(r.output), preemptions=r.preemptions,
                      ttft_s=r.first_token_time - r.arrival_time, e2e_s=r.finish_time - r.arrival_time)
    return result


def main_generate(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint directory or run folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text to continue; the completion is streamed")
    source.add_argument("--prompt-file", help="JSONL, one request per line")
    parser.add_argument("--out", help="where --prompt-file results go (JSONL); default stdout")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--bos", action="store_true", help="start the prompt with the BOS token")
    parser.add_argument("--max-num-seqs", type=int, default=ENGINE_DEFAULTS.max_num_seqs,
                        help="engine batch slots")
    parser.add_argument("--draft", help="speculative decoding: the draft's checkpoint or run folder")
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="speculative decoding without a draft: propose from earlier text")
    parser.add_argument("--ngram-draft", help="speculative decoding with this n-gram draft of the model "
                                              "(scripts/build_ngram_draft.py): greedy, its guesses (a copy where the "
                                              "text repeats more than it knows); sampled, draws from its "
                                              "distributions")
    parser.add_argument("--speculate", type=int, default=4, help="tokens proposed per target call (gamma)")
    parser.add_argument("--adaptive", action="store_true", help="grow/shrink gamma with acceptance")
    add_engine_args(parser)
    args = parse_engine_args(parser, argv)
    speculative = proposer_flags(args)
    if args.adaptive and not speculative:
        raise ValueError("--adaptive changes γ of speculative decoding: give --draft, --prompt-lookup or "
                         "--ngram-draft too, or drop it")
    config = EngineConfig(max_num_seqs=args.max_num_seqs, **engine_settings(args))  # refused before loading
    if args.threads:
        torch.set_num_threads(args.threads)
    table = load_ngram_table(args)
    model, _ = build_model(args)
    tokenizer = load_text_tokenizer(args.ckpt, model, args.bos)
    lookup = model_free_proposer(args, model, table)
    if args.prompt is not None:
        prompt = encode_prompt(tokenizer, args.prompt, args.bos)
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.max_new_tokens,
                                tuple(args.stop), args.seed, args.ignore_eos)
        detok = tokenizer.detokenizer(prompt)
        if speculative:
            speculate_prompt(model, args, prompt, params, detok, lookup)
        else:
            stream_prompt(model, prompt, params, detok, args.compile)
    else:
        draft = load_model(args.draft, args.device, getattr(torch, args.dtype)).eval() if args.draft else None
        serve_file(model, args.prompt_file, args.out, config, tokenizer, args.bos, draft,
                   args.speculate, args.adaptive, lookup)


# ---------------------------------------------------------------------------------------
# bench: continuous vs static batching
# ---------------------------------------------------------------------------------------

def main_bench(argv: list[str]) -> None:
    """The engine in this process; with --url, a running server from the client (http_bench)."""
    url = argparse.ArgumentParser(add_help=False)
    url.add_argument("--url")
    if url.parse_known_args(argv)[0].url is not None:
        from moe.serving import http_bench
        http_bench.main(argv)
        return
    from moe.serving import bench

    parser = argparse.ArgumentParser(prog="generate.py bench", description=bench.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="--url URL benchmarks a running OpenAI-compatible server "
                                     "from the client instead (moe/serving/http_bench.py); "
                                     "`generate.py bench --url URL --help` lists its flags")
    parser.add_argument("--ckpt", default=None, help="checkpoint; default: random init of --config")
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--set", action="append", default=[], help="config override, e.g. model.n_layers=2")
    parser.add_argument("--n-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-dist", default="exponential", choices=["exponential", "fixed"])
    parser.add_argument("--mean-output", type=int, default=32)
    parser.add_argument("--max-output", type=int, default=128)
    parser.add_argument("--arrival", default="all", choices=["all", "poisson"])
    parser.add_argument("--rate", type=float, default=None,
                        help="requests/s; default: --load x static capacity")
    parser.add_argument("--load", type=float, default=0.9, help="Poisson rate as a share of static capacity")
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 16], help="batch slots to compare at")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None,
                        help="JSON path; default benchmarks/results/generation_<arrival>.json")
    add_engine_args(parser)
    args = parse_engine_args(parser, argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, source = build_model(args)
    check_workload_args(args, model.cfg.max_seq_len)
    engine_config = engine_settings(args)

    def workload(rate):
        return bench.make_workload(args.n_requests, args.prompt_len, args.output_dist, args.mean_output,
                                   args.max_output, rate, args.seed, model.cfg.vocab_size)

    warm = bench.make_workload(4, args.prompt_len, "fixed", 8, 8, None, args.seed + 1, model.cfg.vocab_size)
    bench.run_continuous(model, warm, EngineConfig(max_num_seqs=4, **engine_config))
    bench.run_static(model, warm, 4)
    results = dict(model=dataclasses.asdict(model.cfg), model_source=source,
                   device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                   dtype=args.dtype, threads=torch.get_num_threads(), argv=["bench", *argv],
                   runs=[], comparisons=[])
    for slots in args.slots:
        rate = args.rate
        if args.arrival == "poisson" and rate is None:
            capacity = bench.run_static(model, workload(None), slots)["requests_per_s"]
            rate = args.load * capacity
        compared = bench.compare(model, workload(rate if args.arrival == "poisson" else None), slots,
                                 args.repeats, engine_config)
        for run in compared["runs"]:
            run["arrival_rate"] = rate
        results["runs"] += compared["runs"]
        results["comparisons"].append(dict(compared["comparison"], arrival_rate=rate))
    print_table(results)
    out = Path(args.out or f"benchmarks/results/generation_{args.arrival}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")


def check_workload_args(args, max_seq_len: int) -> None:
    """Refuse workload flags that would otherwise fail deep inside the benchmark, naming the flag."""
    for key in ("n_requests", "prompt_len", "mean_output", "max_output", "repeats"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if min(args.slots) < 1:
        raise ValueError(f"--slots must each be at least 1, got {' '.join(map(str, args.slots))}")
    for key in ("rate", "load"):
        if getattr(args, key) is not None and getattr(args, key) <= 0:
            raise ValueError(f"--{key} must be positive, got {getattr(args, key)}")
    if args.prompt_len >= max_seq_len:
        raise ValueError(f"--prompt-len {args.prompt_len} leaves no room to generate within the model's "
                         f"max_seq_len = {max_seq_len}; lower --prompt-len")


def print_table(results: dict) -> None:
    print(f"model: {results['model_source']}, device {results['device']}, {results['dtype']}, "
          f"{results['threads']} threads")
    header = f"{'mode':>10} {'slots':>5} {'tok/s':>8} {'req/s':>7} {'batch':>6} {'TTFT p50':>9} " \
             f"{'TPOT p50':>9} {'e2e p50':>8} {'e2e p99':>8} {'KV use':>6} {'preempt':>7}"
    print(header)
    for r in results["runs"]:
        print(f"{r['mode']:>10} {r['slots']:>5} {r['output_tokens_per_s']:>8.1f} {r['requests_per_s']:>7.2f} "
              f"{r['mean_batch']:>6.2f} {r['ttft_s']['p50']:>9.3f} {r['tpot_s']['p50']:>9.4f} "
              f"{r['e2e_s']['p50']:>8.3f} {r['e2e_s']['p99']:>8.3f} {r['kv_utilisation']:>6.2f} "
              f"{r['preemptions']:>7}")
    for c in results["comparisons"]:
        print(f"slots {c['slots']}: continuous/static tokens/s {c['throughput_ratio']:.2f}x "
              f"(step ceiling E[max]/E[mean] {c['step_ceiling']:.2f}x); "
              f"static/continuous p50 e2e {c['e2e_p50_ratio']:.2f}x")


# ---------------------------------------------------------------------------------------
# serve: an OpenAI-compatible HTTP server over the engine
# ---------------------------------------------------------------------------------------

def build_server(argv: list[str]):
    """(the FastAPI app, its engine loop, host, port) from `generate.py serve` arguments."""
    from moe.serving.server import EngineLoop, build_app
    parser = argparse.ArgumentParser(prog="generate.py serve", description="An OpenAI-compatible "
                                     "server: POST /v1/completions, GET /v1/models, /health, /metrics")
    parser.add_argument("--ckpt", default=None, help="checkpoint directory or run folder; "
                        "default: random init of --config (for load tests)")
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--set", action="append", default=[], help="config override (random init)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="the model id clients send (default: --ckpt)")
    parser.add_argument("--bos", action="store_true", help="start text prompts with the BOS token")
    parser.add_argument("--max-num-seqs", type=int, default=ENGINE_DEFAULTS.max_num_seqs,
                        help="sequences running at once")
    parser.add_argument("--draft", help="speculative decoding: the draft's checkpoint or run folder")
    parser.add_argument("--prompt-lookup", action="store_true",
                        help="speculative decoding without a draft: propose from earlier text")
    parser.add_argument("--ngram-draft", help="speculative decoding with this n-gram draft of the model "
                                              "(scripts/build_ngram_draft.py): greedy, its guesses (a copy where the "
                                              "text repeats more than it knows); sampled, draws from its "
                                              "distributions")
    parser.add_argument("--speculate", type=int, default=4, help="tokens proposed per target call (gamma)")
    add_engine_args(parser)
    args = parse_engine_args(parser, argv)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65536), got {args.port}")
    proposer_flags(args)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, **engine_settings(args))
    if args.threads:
        torch.set_num_threads(args.threads)
    table = load_ngram_table(args)
    model, source = build_model(args)
    tokenizer = load_text_tokenizer(args.ckpt, model, args.bos) if args.ckpt else load_tokenizer(None)
    lookup = model_free_proposer(args, model, table)
    if args.draft or lookup is not None:
        from moe.serving.speculative_engine import SpeculativeEngine
        draft = load_model(args.draft, args.device, getattr(torch, args.dtype)).eval() if args.draft else None
        engine = SpeculativeEngine(model, draft, args.speculate, config, lookup=lookup)
    else:
        engine = Engine(model, config)
    loop = EngineLoop(engine)
    name = args.model_name or (str(args.ckpt) if args.ckpt else Path(args.config).stem)
    return build_app(loop, tokenizer, name, args.bos), loop, args.host, args.port, source


def main_serve(argv: list[str]) -> None:
    import uvicorn
    app, loop, host, port, source = build_server(argv)
    loop.start()
    print(f"serving {source} on http://{host}:{port}/v1 (POST /v1/completions)", file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        loop.stop()


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        run_main(main_bench, sys.argv[2:])
    elif sys.argv[1:2] == ["serve"]:
        run_main(main_serve, sys.argv[2:])
    else:
        run_main(main_generate, sys.argv[1:])
