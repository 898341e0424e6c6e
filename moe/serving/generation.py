"""Plain KV-cached generation of one request: prefill the prompt, then one token per step.

Why this exists beside the engine: it is the reference. One request, the contiguous cache,
no scheduling; the engine's continuous batching must reproduce its greedy output token for
token, and it is what `generate.py --prompt` streams from.

    prefill:      prompt [B, T] at positions 0..T-1 -> K/V of all T tokens cached,
                  logits of the last position -> first new token
    decode_step:  one token per row [B, 1] at its own position -> next logits

Shapes: B batch, T prompt length, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from moe.serving.cache import KVCache
from moe.model.transformer import Transformer
from moe.serving.sampling import SamplingParams, check_stop, make_generator, sample, warp_probs


@torch.no_grad()
def prefill(model: Transformer, tokens: Tensor, cache) -> Tensor:
    """tokens [B, T] -> logits [B, T, V]; writes K/V of positions 0..T-1 into `cache`."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # [B, T]
    return model(tokens, positions, cache).logits


@torch.no_grad()
def decode_step(model: Transformer, tokens: Tensor, positions: Tensor, cache) -> Tensor:
    """tokens [B] at positions [B] -> logits [B, V] of the next token."""
    return model(tokens[:, None], positions[:, None], cache).logits[:, -1]


def stream(model: Transformer, prompt: list[int], params: SamplingParams) -> Iterator[int]:
    """Yield the new tokens of one request as they are generated (the finishing one too)."""
    cfg = model.cfg
    problem = params.invalid_reason()
    if problem:
        raise ValueError(problem)
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token")
    if len(prompt) >= cfg.max_seq_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in model.max_seq_len = "
                         f"{cfg.max_seq_len}; shorten it")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = KVCache(cfg, 1, cfg.max_seq_len, device, dtype)
    generator = make_generator(params, device)
    logits = prefill(model, torch.tensor([prompt], device=device), cache)[:, -1]  # [1, V]
    generated: list[int] = []
    while True:
        token = int(sample(warp_probs(logits, params), generator)[0])
        generated.append(token)
        yield token
        reason, _ = check_stop(generated, params)
        position = len(prompt) + len(generated) - 1
        if reason or position + 1 >= cfg.max_seq_len:
            return
        logits = decode_step(model, torch.tensor([token], device=device),
                             torch.tensor([position], device=device), cache)


def generate(model: Transformer, prompt: list[int], params: SamplingParams) -> list[int]:
    """The new tokens of one request (see `stream`)."""
    return list(stream(model, prompt, params))
