"""Greedy decode speed on a Hugging Face Mixtral checkpoint: ours against transformers.

Why: a user who brings a Mixtral-format checkpoint (moe/io/hf.py) can run it with either
library; this measures what running it here buys, on identical weights and identical
tokens. One tiny randomly initialised MixtralForCausalLM is saved with save_pretrained and
loaded by both sides; each side decodes the same prompts greedily with its KV cache:

    ours:          moe.io.checkpoint.load_model(folder), then moe.serving.generation.prefill and
                   decode_step over the contiguous moe.serving.cache.KVCache, argmax per step
    transformers:  MixtralForCausalLM.generate(do_sample=False), its default cache

The generated tokens must be identical (asserted) before any time counts. Repeats are
interleaved (ours, theirs, ours, ...) so background load hits both alike; the best repeat
of each is kept, and the figure is the ratio of tokens/s, at batch 1 and batch 8.

    python benchmarks/bench_hf_decode.py            # CPU, 2 threads
    python benchmarks/bench_hf_decode.py --quick    # fewer tokens and repeats

Results go to benchmarks/results/hf_decode_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers

from moe.serving.cache import KVCache
from moe.io.checkpoint import load_model
from moe.serving.generation import decode_step, generate, prefill
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


@torch.no_grad()
def ours_greedy(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """prompts [B, T] -> new tokens [B, new_tokens], KV-cached, argmax each step."""
    batch, length = prompts.shape
    cache = KVCache(model.cfg, batch, length + new_tokens, prompts.device,
                    model.embed.weight.dtype)
    token = prefill(model, prompts, cache)[:, -1].argmax(dim=-1)  # [B]
    out = [token]
    for step in range(new_tokens - 1):
        positions = torch.full((batch,), length + step, device=prompts.device)  # [B]
        token = decode_step(model, token, positions, cache).argmax(dim=-1)  # [B]
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
        got = ours_greedy(ours, prompts, args.new_tokens)
        assert torch.equal(got, expected), f"batch {batch}: tokens differ from transformers"
        if batch == 1:  # the engine's plain generation path gives the same tokens too
            params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
            assert generate(ours, prompts[0].tolist(), params) == expected[0].tolist()
        ours_times, theirs_times = [], []
        for _ in range(args.repeats):
            seconds, got = timed(lambda: ours_greedy(ours, prompts, args.new_tokens))
            assert torch.equal(got, expected)
            ours_times.append(seconds)
            seconds, got = timed(lambda: theirs_greedy(reference, prompts, args.new_tokens))
            assert torch.equal(got, expected)
            theirs_times.append(seconds)
        tokens = batch * args.new_tokens
        row = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
               "identical_tokens": True,
               "ours_tokens_per_s": tokens / min(ours_times),
               "transformers_tokens_per_s": tokens / min(theirs_times),
               "ours_s": ours_times, "transformers_s": theirs_times}
        row["speedup"] = row["ours_tokens_per_s"] / row["transformers_tokens_per_s"]
        runs.append(row)
        print(f"batch {batch}: ours {row['ours_tokens_per_s']:.0f} tok/s, transformers "
              f"{row['transformers_tokens_per_s']:.0f} tok/s, ours/transformers "
              f"{row['speedup']:.2f}x (identical tokens)")

    result = {"benchmark": "greedy decode, tiny random Mixtral, ours vs transformers.generate",
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
