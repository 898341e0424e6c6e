"""Where a decode step's time goes, and how close it runs to the machine.

Three measurements, each side by side in one process (ratios; absolute times only mean
something on a named GPU):

1. dispatch   the MoE layer's experts at decode sizes (the tiny config's 16 experts of
              128 x 128, top-2) in its three inference forms, N = 1 .. 256 tokens:
              sorted (the reference: one matmul per expert used), dense (every expert on
              every token, the unchosen weighted 0) and gathered (each slot gathers its
              expert's weights; what a compiled step runs). kernels/ops.py picks dense
              for few tokens through small experts from these figures.
2. engine     the engine's step at 8 and 16 slots, every request decoding, on the trained
              tiny model, eager and with its compiled all-decode step, against a bare
              batched forward of the same tokens over a contiguous cache; and the eager
              step split by the profiler labels the code carries (schedule, layout,
              attention, router, dispatch, sampling, postprocess).
3. roofline   decode at batch 1 on a large config (weights at least 4x this machine's
              last-level cache): bytes of weights and KV read per token over the copy
              bandwidth measured in the same run (moe.cost.hardware.measure_hardware),
              as a share of the measured time per token.

    .venv/bin/python benchmarks/bench_decode.py --ckpt runs/tiny --threads 2
    python3 benchmarks/bench_decode.py --ckpt runs/tiny      # on a GPU: there by default

Writes benchmarks/results/decode_cpu.json (decode_gpu.json on a GPU, with its name).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from kernels.moe_dispatch import dispatch_and_combine, dispatch_dense, dispatch_gathered
from moe.config import ModelConfig
from moe.cost.hardware import measure_hardware
from moe.io.checkpoint import load_model
from moe.model.transformer import Transformer, count_parameters
from moe.serving.cache import KVCache
from moe.serving.engine import Engine, EngineConfig
from moe.profiling import synchronize
from moe.serving.generation import prefill
from moe.serving.sampling import SamplingParams
from moe.serving.static_decode import DecodeStep

LABELS = ("schedule", "layout", "attention", "router", "dispatch", "sampling", "postprocess")
# a large MoE for the roofline: 16 experts of 1024 x 2048 in 8 layers, about 3.3 GB in float32
LARGE = dict(vocab_size=4096, d_model=1024, n_layers=8, n_heads=8, n_kv_heads=1, d_expert=2048,
             n_experts=16, experts_per_token=2, max_seq_len=256)


def timed(fn, device: torch.device) -> tuple[float, object]:
    """(seconds one call of fn takes, the device's queued work included; what it returned)."""
    synchronize(device)
    began = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - began, result


def best_median(fn, repeats: int, inner: int, device: torch.device) -> float:
    """The lowest, over `repeats` blocks, of the median time of `inner` calls of fn."""
    return min(statistics.median(timed(fn, device)[0] for _ in range(inner)) for _ in range(repeats))


@torch.no_grad()
def bench_dispatch(repeats: int, device: torch.device) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    n_experts, d_model, d_hidden = 16, 128, 128
    w_in = (torch.randn(n_experts, d_model, 2 * d_hidden, generator=g) * 0.1).to(device)
    w_out = (torch.randn(n_experts, d_hidden, d_model, generator=g) * 0.1).to(device)
    rows = []
    for n in (1, 2, 8, 16, 64, 256):
        x = torch.randn(n, d_model, generator=g).to(device)
        ids = torch.stack([torch.randperm(n_experts, generator=g)[:2] for _ in range(n)]).to(device)  # [N, 2]
        weights = torch.rand(n, 2, generator=g).to(device)
        forms = {"sorted": lambda: dispatch_and_combine(x, ids, weights, w_in, w_out, None),
                 "dense": lambda: dispatch_dense(x, ids, weights, w_in, w_out),
                 "gathered": lambda: dispatch_gathered(x, ids, weights, w_in, w_out)}
        expected = forms["sorted"]()[0]
        row = {"tokens": n}
        for name, form in forms.items():
            torch.testing.assert_close(form()[0], expected, rtol=1e-4, atol=1e-4)
            row[f"{name}_us"] = 1e6 * best_median(form, repeats, 50, device)
        row["dense_over_sorted"] = row["dense_us"] / row["sorted_us"]
        rows.append(row)
        print(f"dispatch N {n:3d}: " + ", ".join(f"{k} {row[f'{k}_us']:.0f} us" for k in forms), flush=True)
    return rows


def make_prompts(slots: int, prompt_len: int, vocab: int) -> list[list[int]]:
    """The same `slots` random prompts for the engines and the bare forward."""
    g = torch.Generator().manual_seed(slots)
    return [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(slots)]


@torch.no_grad()
def bench_engine(model: Transformer, slots: int, repeats: int, prompt_len: int = 64,
                 steps: int = 24) -> dict:
    """Median engine step with every slot decoding, eager and with the compiled all-decode
    step (EngineConfig.compile), against a bare forward of [slots, 1] tokens over a
    contiguous cache at the same positions, the three timed in turn; and the eager step's
    profile split."""
    new_tokens = steps + 8
    device = next(model.parameters()).device
    engines = {name: Engine(model, EngineConfig(max_num_seqs=slots, max_num_batched_tokens=slots * prompt_len,
                                                compile=name == "compiled"))
               for name in ("eager", "compiled")}

    def start_decoding(engine: Engine) -> None:
        for prompt in make_prompts(slots, prompt_len, model.cfg.vocab_size):
            engine.add_request(prompt, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        while not all(r.output for r in engine.running) or len(engine.running) < slots:
            engine.step()  # prefill: every request takes its first token
        engine.step()  # the first all-decode step (the compiled engine compiles here)

    times = {"eager": [], "compiled": [], "bare": []}
    for _ in range(repeats):
        for engine in engines.values():
            start_decoding(engine)
        cache = KVCache(model.cfg, slots, prompt_len + new_tokens, device, next(model.parameters()).dtype)
        prompts = torch.tensor(make_prompts(slots, prompt_len, model.cfg.vocab_size), device=device)
        prefill(model, prompts, cache)
        step = DecodeStep(model, cache)
        tokens = torch.zeros(slots, dtype=torch.long, device=device)
        block = {name: [] for name in times}
        for i in range(steps):  # in turn, so all three see the same background load
            for name, engine in engines.items():
                block[name].append(timed(engine.step, device)[0])
            positions = torch.full((slots,), prompt_len + i, device=device)
            block["bare"].append(timed(lambda: step(tokens, positions), device)[0])
        for name in times:
            times[name].append(statistics.median(block[name]))
        for engine in engines.values():
            engine.run()
            engine.take_finished()
    engine = engines["eager"]
    start_decoding(engine)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    engine.run()
    totals = {e.key: e.cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.key in LABELS}  # ms
    step_ms, compiled_ms, bare_ms = (1e3 * min(times[name]) for name in ("eager", "compiled", "bare"))
    split = {label: totals.get(label, 0.0) for label in LABELS}
    split["other"] = max(0.0, step_ms - sum(split.values()))
    result = {"slots": slots, "prompt_len": prompt_len, "engine_step_ms": step_ms, "bare_forward_ms": bare_ms,
              "engine_over_bare": step_ms / bare_ms, "compiled_engine_step_ms": compiled_ms,
              "compiled_engine_over_bare": compiled_ms / bare_ms,
              "compile_s": engines["compiled"].decode_graph.compile_seconds, "split_ms": split,
              "split_note": "of the eager step; profiled steps run slower than the timed ones (the profiler's "
                            "own cost); labels are inclusive: dispatch and router inside the forward, "
                            "sampling inside postprocess"}
    print(f"engine {slots} slots: step {step_ms:.2f} ms eager, {compiled_ms:.2f} ms compiled "
          f"(compile {result['compile_s']:.1f} s), bare forward {bare_ms:.2f} ms; eager "
          f"{result['engine_over_bare']:.2f}x, compiled {result['compiled_engine_over_bare']:.2f}x the bare forward; "
          "split " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()), flush=True)
    return result


def last_level_cache() -> int | None:
    """The largest CPU cache this machine reports (sysfs), in bytes."""
    sizes = []
    for file in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = file.read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=None)


@torch.no_grad()
def bench_roofline(threads: int, tokens: int, device: torch.device) -> dict:
    """Batch-1 greedy decode of the LARGE config: measured ms per token against the time to
    read, once per token, the weights it uses (all but the routed experts, plus the K
    experts per layer its routing picked) and its KV cache, at the measured copy bandwidth.
    On a GPU the weights are bf16 and the step is compiled (CUDA graphs): eager launches
    alone would take longer than reading the bytes."""
    cuda = device.type == "cuda"
    cfg = ModelConfig(**LARGE, kernel_backend="torch")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = Transformer(cfg).to(device, dtype).eval()
    counts = count_parameters(cfg)
    per_expert = 3 * cfg.d_model * cfg.d_expert
    prompt_len, size = 16, torch.tensor([], dtype=dtype).element_size()
    cache = KVCache(cfg, 1, prompt_len + tokens + 1, device, dtype)
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    token = prefill(model, prompt.to(device), cache)[:, -1].argmax(-1)
    step = DecodeStep(model, cache, compile=cuda)
    for _ in range(3):  # compiles, then records the CUDA graph; writes position prompt_len again below
        step(token, torch.tensor([prompt_len], device=device))
    times, bandwidths = [], []
    for i in range(tokens):  # the bandwidth measured between tokens: both under the same load
        if i % 4 == 0:
            bandwidths.append(measure_hardware(device.type).bandwidth)
        position = torch.tensor([prompt_len + i], device=device)
        seconds, logits = timed(lambda: step(token, position), device)
        times.append(seconds)
        token = logits.argmax(-1)
    bandwidth = statistics.median(bandwidths)
    touched = cfg.experts_per_token * len(cfg.moe_layers)  # one token: exactly K distinct per layer
    context = prompt_len + tokens / 2
    kv_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * context * size
    weight_bytes = ((counts.total - counts.experts) + touched * per_expert) * size
    measured = statistics.median(times)
    roofline = (weight_bytes + kv_bytes) / bandwidth
    result = {"config": LARGE, "dtype": str(dtype), "compiled": cuda, "total_params": counts.total,
              "weight_bytes_total": counts.total * size,
              "last_level_cache_bytes": (torch.cuda.get_device_properties(device).L2_cache_size
                                         if cuda else last_level_cache()), "threads": threads,
              "copy_bandwidth_bytes_per_s": bandwidth, "experts_touched_per_token": touched,
              "bytes_read_per_token": weight_bytes + kv_bytes, "measured_ms_per_token": 1e3 * measured,
              "roofline_ms_per_token": 1e3 * roofline, "share_of_roofline": roofline / measured,
              "compile_s": step.compile_seconds}
    print(f"roofline: {result['bytes_read_per_token'] / 1e6:.0f} MB per token at "
          f"{bandwidth / 1e9:.1f} GB/s = {1e3 * roofline:.1f} ms; measured {1e3 * measured:.1f} ms; "
          f"{result['share_of_roofline']:.0%} of the roofline", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default="runs/tiny", help="the trained tiny model (python train.py)")
    parser.add_argument("--slots", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--roofline-tokens", type=int, default=12)
    parser.add_argument("--skip", nargs="*", default=[], choices=["dispatch", "engine", "roofline"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"command": "python " + " ".join(sys.argv), "device": name, "threads": args.threads,
              "checkpoint": args.ckpt}
    if "dispatch" not in args.skip:
        result["dispatch"] = bench_dispatch(args.repeats, device)
    if "engine" not in args.skip:
        model = load_model(args.ckpt, device).eval()
        result["engine"] = [bench_engine(model, slots, args.repeats) for slots in args.slots]
    if "roofline" not in args.skip:
        result["roofline"] = bench_roofline(args.threads, args.roofline_tokens, device)
    out = Path(args.out or f"benchmarks/results/decode_{'gpu' if device.type == 'cuda' else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
