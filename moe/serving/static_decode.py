"""A decode step with static shapes, compiled once: gpt-fast's recipe for a lean decode.

Why: decoding a small model one token at a time is all overhead. Each step is a few
hundred tiny operations, and eager PyTorch pays Python dispatch for every one of them;
the arithmetic is microseconds. torch.compile can fuse the step into a handful of kernels
and call them from C++, but only if the step is the same graph every time:

    shapes           B rows, one token each, over a KV cache of fixed max_len slots
                     (KVCache.attend reads all of them, masked, while compiling)
    positions        a tensor argument, not a Python int: a new position is new data,
                     not a new graph
    no host syncs    no `.item()`, no `.tolist()`: the MoE layer's experts run in the
                     gathered form (kernels/moe_dispatch.py, dispatch_gathered), not the
                     sorted one whose Python loop needs the counts on the host
    no data branches the step is the same code whatever the tokens

On CUDA the compiled step is also captured as a CUDA graph (mode "reduce-overhead"), which
removes the launch cost of each kernel as well. The first call compiles (seconds on a CPU);
`compile_seconds` reports it, and eager stays the default wherever that does not pay.

Used by plain generation (`moe.serving.generation.stream`, `generate.py --prompt
--compile`) and `benchmarks/bench_hf_decode.py`. The engine's steps are ragged (prefill
chunks beside decodes, a batch that changes every step) and stay eager; capturing one
graph per batch size there is how vLLM does it and is not done here.

Shapes: B rows, V vocab, S max_len slots.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from moe.model.transformer import Transformer
from moe.serving.cache import KVCache


class DecodeStep:
    """step(tokens [B], positions [B]) -> logits [B, V] over `cache` ([B, S]); the
    positions must lie in 0 .. S - 1 (the caller knows its lengths)."""

    def __init__(self, model: Transformer, cache: KVCache, compile: bool = False):
        self.model, self.cache, self.compiled = model, cache, compile
        self.compile_seconds: float | None = None
        self._step = self._forward
        if compile:
            # CUDA: captured as a CUDA graph; CPU: the kernels called from generated C++
            # rather than Python (about 0.1 ms less per step for the tiny models here)
            cuda = next(model.parameters()).device.type == "cuda"
            settings = dict(mode="reduce-overhead") if cuda else dict(options={"cpp_wrapper": True})
            self._step = torch.compile(self._forward, fullgraph=True, dynamic=False, **settings)

    @torch.no_grad()
    def _forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model(tokens[:, None], positions[:, None], self.cache).logits[:, -1]

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        if not self.compiled:
            return self._step(tokens, positions)
        if self.compile_seconds is not None:
            # Only this step's own graph is ever called here, with the shapes it was
            # compiled for, so its guards (about 0.1 ms of checks on every weight per
            # step) need not run; a different model or batch is a different DecodeStep.
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._step(tokens, positions)
        began = time.perf_counter()
        logits = self._step(tokens, positions)  # the first call compiles
        self.compile_seconds = time.perf_counter() - began
        return logits
