"""Greedy decode speed on a Hugging Face Mixtral checkpoint: ours against transformers.

Why: a user who brings a Mixtral-format checkpoint (moe/io/hf.py) can run it with either
library; this measures what running it here buys, on identical weights and identical
tokens. One tiny randomly initialised MixtralForCausalLM is saved with save_pretrained and
loaded by both sides; each side decodes the same prompts greedily with its KV cache:

    ours:          moe.io.checkpoint.load_model(folder), then moe.serving.generation.prefill and
                   the decode step of moe/serving/static_decode.py over the contiguous
                   moe.serving.cache.KVCache, argmax per step: eager, and compiled
                   (torch.compile of the whole static-shape step; its compile time is
                   reported apart and not counted)
    transformers:  MixtralForCausalLM.generate(do_sample=False), its default cache

The generated tokens must be identical (asserted) before any time counts. Repeats are
interleaved (eager, compiled, theirs, eager, ...) so background load hits all alike; the
best repeat of each is kept, and the figures are ratios of tokens/s, at batch 1 and 8.

    python benchmarks/bench_hf_decode.py            # CPU, 2 threads
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/bench_hf_decode.py   # a cold compile
    python benchmarks/bench_hf_decode.py --quick    # fewer tokens and repeats

Results go to benchmarks/results/hf_decode_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from moe.serving.cache import KVCache
from moe.io.checkpoint import load_model
from moe.serving.generation import generate, prefill
from moe.serving.static_decode import DecodeStep
from moe.model.transformer import Transformer
from moe.serving.sampling import SamplingParams

MIXTRAL = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
               num_experts_per_tok=2, max_position_embeddings=512, rope_theta=10000.0)


def random_mixtral(seed: int) -> transformers.MixtralForCausalLM:
    """Every weight drawn at random (norms around 1) so routing spreads over the experts."""
    torch.manual_seed(seed)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0, 0.1) if "norm" in name else param.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None  # always the full number of new tokens
    model.generation_config.pad_token_id = 0
    return model


def decoder(model: Transformer, batch: int, slots: int, compile: bool) -> DecodeStep:
    """One decode step with its own cache, kept across repeats (compiled once)."""
    cache = KVCache(model.cfg, batch, slots, model.embed.weight.device, model.embed.weight.dtype)
    return DecodeStep(model, cache, compile)


@torch.no_grad()
def ours_greedy(step: DecodeStep, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompts [B, T] -> new tokens [B, new_tokens], KV-cached, argmax each step."""
    batch, length = prompts.shape
    token = prefill(step.model, prompts, step.cache)[:, -1].argmax(dim=-1)  # [B]
    out = [token]
    for i in range(new_tokens - 1):
        positions = torch.full((batch,), length + i, device=prompts.device)  # [B]
        token = step(token, positions).argmax(dim=-1)  # [B]
        out.append(token)
    return torch.stack(out, dim=1)  # [B, new_tokens]


@torch.no_grad()
def theirs_greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                         max_new_tokens=new_tokens, do_sample=False)
    return out[:, prompts.shape[1]:]  # [B, new_tokens]


def timed(fn) -> tuple[float, torch.Tensor]:
    begin = time.perf_counter()
    result = fn()
    return time.perf_counter() - begin, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 2 repeats")
    parser.add_argument("--no-compile", action="store_true", help="eager only (no torch.compile side)")
    parser.add_argument("--out", default="benchmarks/results/hf_decode_cpu.json")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.repeats = 16, 2
    torch.set_num_threads(args.threads)

    reference = random_mixtral(seed=0)
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        ours = load_model(folder).eval()

    runs = []
    for batch in args.batches:
        prompts = torch.randint(0, MIXTRAL["vocab_size"], (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(batch))
        expected = theirs_greedy(reference, prompts, args.new_tokens)  # also warms up
        slots = args.prompt_len + args.new_tokens
        sides = {"eager": decoder(ours, batch, slots, compile=False)}
        if not args.no_compile:
            sides["compiled"] = decoder(ours, batch, slots, compile=True)
        for name, step in sides.items():  # the compiled side compiles here, untimed
            got = ours_greedy(step, prompts, args.new_tokens)
            assert torch.equal(got, expected), f"batch {batch}, {name}: tokens differ from transformers"
        if batch == 1:  # the engine's plain generation path gives the same tokens too
            params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
            assert generate(ours, prompts[0].tolist(), params) == expected[0].tolist()
        times = {name: [] for name in [*sides, "transformers"]}
        for _ in range(args.repeats):
            for name, step in sides.items():
                seconds, got = timed(lambda: ours_greedy(step, prompts, args.new_tokens))
                assert torch.equal(got, expected)
                times[name].append(seconds)
            seconds, got = timed(lambda: theirs_greedy(reference, prompts, args.new_tokens))
            assert torch.equal(got, expected)
            times["transformers"].append(seconds)
        tokens = batch * args.new_tokens
        row = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "identical_tokens": True,
               **{f"{name}_tokens_per_s": tokens / min(t) for name, t in times.items()},
               **{f"{name}_s": t for name, t in times.items()}}
        for name in sides:
            row[f"{name}_over_transformers"] = row[f"{name}_tokens_per_s"] / row["transformers_tokens_per_s"]
        if "compiled" in sides:
            row["compile_s"] = sides["compiled"].compile_seconds
        runs.append(row)
        print(f"batch {batch}: " + ", ".join(f"{name} {row[f'{name}_tokens_per_s']:.0f} tok/s" for name in times)
              + "; " + ", ".join(f"{name}/transformers {row[f'{name}_over_transformers']:.2f}x" for name in sides)
              + (f"; compile {row['compile_s']:.1f} s" if "compile_s" in row else "") + " (identical tokens)")

    result = {"benchmark": "greedy decode, tiny random Mixtral, ours (eager, compiled) vs transformers.generate",
              "command": "python " + " ".join(sys.argv),
              "inductor_cache": ("fresh: TORCHINDUCTOR_CACHE_DIR=" + os.environ["TORCHINDUCTOR_CACHE_DIR"]
                                 if "TORCHINDUCTOR_CACHE_DIR" in os.environ
                                 else "the default one, warm after a first run (compile_s is then lower)"),
              "device": "cpu", "threads": args.threads, "dtype": "float32",
              "mixtral_config": MIXTRAL,
              "transformers_attention": reference.config._attn_implementation,
              "transformers_experts": getattr(reference.config, "_experts_implementation", None),
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "timing": f"best of {args.repeats} interleaved repeats",
              "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
