"""Plain KV-cached generation of one request: prefill the prompt, then one token per step.

Why this exists beside the engine: it is the reference. One request, the contiguous cache,
no scheduling; the engine's continuous batching must reproduce its greedy output token for
token, and it is what `generate.py --prompt` streams from.

    prefill:      prompt [B, T] at positions 0..T-1 -> K/V of all T tokens cached,
                  logits of the last position -> first new token
    decode step:  one token per row [B, 1] at its own position -> next logits
                  (moe/serving/static_decode.py: eager, or compiled with --compile)

`timed_forward` is the one forward whose time is recorded (the engines' and the
speculative loops' draft/target times): it synchronises the device before and after, so
on a GPU it measures the forward, not the launch.

Shapes: B batch, T prompt length, N tokens of a ragged row, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import Tensor

from moe.model.transformer import Transformer
from moe.profiling import synchronize
from moe.serving.cache import KVCache
from moe.serving.requests import check_request
from moe.serving.sampling import SamplingParams, draw_seed, sample_at, warp_probs
from moe.serving.static_decode import DecodeStep
from moe.serving.stopping import BYTES, Detokenizer, finish_reason


@torch.no_grad()
def prefill(model: Transformer, tokens: Tensor, cache) -> Tensor:
    """tokens [B, T] -> logits [B, T, V]; writes K/V of positions 0..T-1 into `cache`."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)  # [B, T]
    return model(tokens, positions, cache).logits


@torch.no_grad()
def timed_forward(model: Transformer, tokens: list[int], positions: list[int], cache
                  ) -> tuple[Tensor, float]:
    """One ragged row tokens [1, N] at positions [1, N] through `model` with `cache` ->
    (logits [N, V], seconds), the device synchronised around the forward."""
    device = next(model.parameters()).device
    tokens_t = torch.tensor([tokens], device=device)
    positions_t = torch.tensor([positions], device=device)
    synchronize(device)
    start = time.perf_counter()
    logits = model(tokens_t, positions_t, cache).logits[0]
    synchronize(device)
    return logits, time.perf_counter() - start


def stream(model: Transformer, prompt: list[int], params: SamplingParams,
           detok: Detokenizer = BYTES, compile: bool = False) -> Iterator[int]:
    """Yield the new tokens of one request as they are generated (the finishing one too);
    with `compile`, the decode step is compiled first (moe/serving/static_decode.py)."""
    cfg = model.cfg
    check_request(cfg, prompt, params)
    if getattr(model, "tensor_parallel", None) is not None and not params.greedy and params.seed is None:
        raise ValueError("sampling under tensor parallelism needs a seed: each rank draws its own "
                         "token, and without one the ranks' sequences diverge; set seed (the same "
                         "on every rank) or temperature = 0")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    # sized to the request, not the context (32k slots per layer for Mixtral)
    cache = KVCache(cfg, 1, min(cfg.max_seq_len, len(prompt) + params.max_new_tokens), device, dtype)
    seed = draw_seed(params)
    logits = prefill(model, torch.tensor([prompt], device=device), cache)[:, -1]  # [1, V]
    step = DecodeStep(model, cache, compile)
    generated: list[int] = []
    while True:
        token = (int(logits[0].argmax()) if params.greedy
                 else sample_at(warp_probs(logits, params)[0], seed, len(prompt) + len(generated)))
        generated.append(token)
        yield token
        reason, _ = finish_reason(len(prompt), generated, params, detok, cfg.max_seq_len)
        if reason:
            return
        position = len(prompt) + len(generated) - 1
        logits = step(torch.tensor([token], device=device), torch.tensor([position], device=device))


def generate(model: Transformer, prompt: list[int], params: SamplingParams,
             detok: Detokenizer = BYTES, compile: bool = False) -> list[int]:
    """The new tokens of one request (see `stream`)."""
    return list(stream(model, prompt, params, detok, compile))
