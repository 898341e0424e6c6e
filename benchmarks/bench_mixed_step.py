"""A mixed engine step on CPU: one prefill chunk beside many decodes, attended through the
paged cache's reference path (moe/serving/cache.py), padded as one batch against grouped by
query length.

Why: padding every sequence to the longest query and the widest table turns a 240-token
chunk plus 15 decodes into a 16 x 240 x 240 score grid, where a 240 x 240 grid and 15
single rows are all that is needed. The cache now plans one padded attention per query
length; this times both on the same pool and layout, side by side, and checks they agree.

    python benchmarks/bench_mixed_step.py --threads 2       # -> benchmarks/results/mixed_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench_kernels import timed  # benchmarks/ is on the path when this runs as a script
from kernels.attention import paged_attention_batched
from moe.serving.blocks import BlockManager
from moe.serving.cache import PagedKVCache
from moe.config import load_model_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--chunk", type=int, default=240, help="prefill chunk tokens")
    parser.add_argument("--decodes", type=int, default=15, help="decoding sequences beside it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default="benchmarks/results/mixed_step_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_model_config(args.config, [])
    gen = torch.Generator().manual_seed(0)
    block_size = 16
    context = max(args.chunk, cfg.max_seq_len)
    decode_lens = torch.randint(args.chunk // 4, context, (args.decodes,), generator=gen).tolist()
    num_blocks = (args.decodes + 1) * (-(-context // block_size))
    cache = PagedKVCache(cfg, num_blocks=num_blocks, block_size=block_size)
    blocks = BlockManager(num_blocks, block_size)
    cache.k.normal_(generator=gen)
    cache.v.normal_(generator=gen)
    seq_lens = [args.chunk] + decode_lens
    query_lens = [args.chunk] + [1] * args.decodes
    for seq, length in enumerate(seq_lens):
        blocks.reserve(seq, length)
    cache.set_layout(blocks, list(range(len(seq_lens))), query_lens, seq_lens)
    n = sum(query_lens)
    q = torch.randn(1, cfg.n_heads, n, cfg.head_dim, generator=gen)
    k = torch.randn(1, cfg.n_kv_heads, n, cfg.head_dim, generator=gen)
    layout = cache.layout

    def padded():  # the old plan: every sequence padded to the longest query and table
        return paged_attention_batched(q[0].transpose(0, 1), cache.k[0], cache.v[0],
                                       layout.block_tables, layout.seq_lens,
                                       layout.query_start)

    def grouped():  # the cache's reference path (writes k, v first: included in its time)
        return cache.attend(0, q, k, k, None)[0].transpose(0, 1)

    max_err = (grouped() - padded()).abs().max().item()  # grouped() writes k, v first
    cpu = torch.device("cpu")
    padded_s, grouped_s = timed(padded, cpu, args.repeats), timed(grouped, cpu, args.repeats)
    result = dict(command="python benchmarks/bench_mixed_step.py " + " ".join(sys.argv[1:]),
                  config=args.config, threads=args.threads, chunk=args.chunk,
                  decode_seq_lens=decode_lens, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                  head_dim=cfg.head_dim, padded_ms=padded_s * 1e3, grouped_ms=grouped_s * 1e3,
                  speedup=padded_s / grouped_s, max_abs_diff=max_err,
                  scores_padded=len(seq_lens) * args.chunk * max(seq_lens),
                  scores_grouped=args.chunk * args.chunk + sum(decode_lens))
    print(f"{args.chunk}-token chunk + {args.decodes} decodes, {args.threads} threads: padded "
          f"{result['padded_ms']:.2f} ms, grouped {result['grouped_ms']:.2f} ms, "
          f"x{result['speedup']:.2f}, max |diff| {max_err:.1e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
