"""Static batching: the baseline continuous batching is measured against.

A fixed batch of requests is padded to its longest prompt, prefilled together, then decoded
one token per row per step until its LAST member finishes; rows that finished early keep
computing padding, and no new request may join until the whole batch is done. This is what
a plain `generate(batch)` loop does (Hugging Face `generate`, gpt-fast). Its cost is the
step count: a batch of B requests takes max(output lengths) steps where continuous batching
needs about their mean, so the ceiling of the speed-up is E[max] / E[mean].

Rows use the contiguous cache, each at its own position: a prompt shorter than the longest
leaves padding in slots past its end, but the row's first decode writes its next token into
exactly the first of those slots, and a query at position p reads slots 0..p only, so the
padding is overwritten before anything reads it.

Shapes: B batch, T longest prompt, V vocab.
"""

from __future__ import annotations

import time

import torch

from moe.model.transformer import Transformer
from moe.serving.cache import KVCache
from moe.serving.generation import prefill
from moe.serving.static_decode import DecodeStep
from moe.serving.requests import Request
from moe.serving.sampling import draw_seed, draw_tokens
from moe.serving.stopping import finish_reason


@torch.no_grad()
def run_static_batch(model: Transformer, batch: list[Request], clock=time.perf_counter) -> list[int]:
    """Serve `batch` to completion in place; returns the live rows at each step."""
    cfg = model.cfg
    param = next(model.parameters())
    n = len(batch)
    lengths = torch.tensor([len(r.prompt) for r in batch])  # [B]
    # padding after the shorter prompts: any id does (0 exists in every vocabulary); causal
    # attention keeps it out of the prompt, and decoding overwrites its cache entries
    tokens = torch.zeros(n, int(lengths.max()), dtype=torch.long)  # [B, T]
    for row, request in enumerate(batch):
        tokens[row, :len(request.prompt)] = torch.tensor(request.prompt)
        request.status, request.seed = "running", draw_seed(request.params)
    cache = KVCache(cfg, n, cfg.max_seq_len, param.device, param.dtype)
    logits = prefill(model, tokens.to(param.device), cache)  # [B, T, V]
    step = DecodeStep(model, cache)
    logits = logits[torch.arange(n), (lengths - 1).to(param.device)]  # [B, V]
    live_per_step = []
    while True:
        live = [r for r in batch if r.status == "running"]
        live_per_step.append(len(live))
        next_tokens = draw_tokens(list(logits[:, None]), [r.params for r in batch], [r.seed for r in batch],
                                  [len(r.tokens) for r in batch])  # [B] of [token]
        now = clock()
        for (token,), request in zip(next_tokens, batch):
            if request.status != "running":
                continue
            request.output.append(token)
            request.token_times.append(now)
            if request.first_token_time is None:
                request.first_token_time = now
            reason, _ = finish_reason(len(request.prompt), request.output, request.params,
                                      request.detok, cfg.max_seq_len)
            if reason:
                request.status, request.finish_reason, request.finish_time = "finished", reason, now
        if all(r.status == "finished" for r in batch):
            return live_per_step
        # every row steps, finished ones on padding, at a position kept inside the cache
        last = torch.tensor([r.tokens[-1] for r in batch], device=param.device)  # [B]
        positions = torch.tensor([min(len(r.tokens) - 1, cfg.max_seq_len - 1) for r in batch],
                                 device=param.device)  # [B]
        logits = step(last, positions)  # [B, V]
