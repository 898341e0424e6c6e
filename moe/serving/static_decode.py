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
chunks beside decodes, a batch that changes every step), so `PagedDecodeStep` takes only
its all-decode steps, in one graph padded to the engine's slots and to the longest block
table (vLLM captures one graph per batch-size bucket instead); the rest stay eager, as do
the engine's speculative steps. `VerifyStep` is the target's forward of a speculative
round in `speculative_generate(compile=True)`: every row padded to γ + 1 tokens, finished
rows kept as padding, so one graph serves every round.

Shapes: B rows, V vocab, S max_len slots.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from moe.model.transformer import Transformer
from moe.serving.cache import KVCache, PagedDecodeView, PagedKVCache
from moe.profiling import synchronize


class CompiledStep:
    """torch.compile of a static-shape step fn: on CUDA captured as a CUDA graph; on a CPU
    with the kernels called from generated C++ rather than Python (about 0.1 ms less per
    step for the tiny models here). The first call compiles (`compile_seconds`). After it,
    guard evaluation (about 0.1 ms of checks on every weight per step) is skipped: only
    this step's own graph is ever called, with the shapes it was compiled for; a different
    model or batch is a different step."""

    def __init__(self, fn, device: torch.device):
        # each step is its own graph of the same Python function (a class's `_forward`), and
        # dynamo refuses a ninth graph of one function by default: a process may hold more
        # (a benchmark holds one per batch size and γ)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        settings = dict(mode="reduce-overhead") if device.type == "cuda" else dict(options={"cpp_wrapper": True})
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False, **settings)
        self.compile_seconds: float | None = None

    def __call__(self, *args: Tensor) -> Tensor:
        if self.compile_seconds is not None:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self.fn(*args)
        began = time.perf_counter()
        out = self.fn(*args)
        self.compile_seconds = time.perf_counter() - began
        return out


class DecodeStep:
    """step(tokens [B], positions [B]) -> logits [B, V] over `cache` ([B, S]); the
    positions must lie in 0 .. S - 1 (the caller knows its lengths)."""

    def __init__(self, model: Transformer, cache: KVCache, compile: bool = False):
        self.model, self.cache = model, cache
        self._step = CompiledStep(self._forward, next(model.parameters()).device) if compile else self._forward

    @property
    def compile_seconds(self) -> float | None:
        return self._step.compile_seconds if isinstance(self._step, CompiledStep) else None

    @torch.no_grad()
    def _forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model(tokens[:, None], positions[:, None], self.cache).logits[:, -1]

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self._step(tokens, positions)


def padded_rows(rows: list[list[int]], starts: list[int], width: int,
                device: torch.device) -> tuple[Tensor, Tensor]:
    """Rows of tokens to feed at positions starts[b].. -> tokens and positions [B, width],
    each row padded on the right with token 0 at the following positions (a ragged
    speculative forward, and the verify step's fixed width)."""
    tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)  # [B, W]
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(width, device=device)  # [B, W]
    return tokens, positions


class VerifyStep:
    """The target's forward of a speculative round with static shapes: every row of the
    cache ([B, S]) feeds `width` tokens (γ + 1) at consecutive positions, compiled once.
    step(rows, starts) -> logits [B, width, V]: row b feeds rows[b] (at most `width` tokens)
    at positions starts[b].., padded on the right with token 0 at the following positions,
    which only writes slots past what the row keeps (moe/serving/speculative.py); an empty
    row (a finished sequence) is all padding from `starts[b]`. Positions must stay inside
    the cache: starts[b] + width <= S."""

    def __init__(self, model: Transformer, cache: KVCache, width: int):
        self.model, self.cache, self.width = model, cache, width
        self.device = next(model.parameters()).device
        self._step = CompiledStep(self._forward, self.device)

    @property
    def compile_seconds(self) -> float | None:
        return self._step.compile_seconds

    @torch.no_grad()
    def _forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        return self.model(tokens, positions, self.cache).logits

    def __call__(self, rows: list[list[int]], starts: list[int]) -> Tensor:
        if len(rows) != self.cache.k.shape[1] or max(map(len, rows)) > self.width:
            raise ValueError(f"a verify step runs {self.cache.k.shape[1]} rows of at most {self.width} tokens, "
                             f"got {len(rows)} rows of up to {max(map(len, rows))}")
        return self._step(*padded_rows(rows, starts, self.width, self.device))


class PagedDecodeStep:
    """The engine's all-decode steps (every running request brings one token) through one
    compiled graph: `slots` rows always (the engine's max_num_seqs; the rows past the
    step's requests are padding), block tables padded to the longest sequence the model
    allows. Steps with prompt chunks or speculative proposals stay eager."""

    def __init__(self, model: Transformer, cache: PagedKVCache, slots: int):
        self.model, self.cache, self.slots = model, cache, slots
        self.device = next(model.parameters()).device
        self.width = math.ceil(model.cfg.max_seq_len / cache.block_size)  # MB: blocks of the longest sequence
        self._step = CompiledStep(self._forward, self.device)

    @property
    def compile_seconds(self) -> float | None:
        return self._step.compile_seconds

    @torch.no_grad()
    def _forward(self, tokens: Tensor, positions: Tensor, slot_mapping: Tensor, block_tables: Tensor,
                 seq_lens: Tensor) -> Tensor:
        view = PagedDecodeView(self.cache, slot_mapping, block_tables, seq_lens)
        return self.model(tokens[:, None], positions[:, None], view).logits[:, 0]  # [slots, V]

    def __call__(self, tokens: list[int], positions: list[int], tables: list[list[int]]) -> tuple[Tensor, float]:
        """One token per request at `positions`, each request's block table -> (logits
        [len(tokens), V], seconds of the forward, device synchronised)."""
        n, pad, bs = len(tokens), self.slots - len(tokens), self.cache.block_size
        slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]  # where each new K/V goes
        rows = (tokens + [0] * pad,  # padding rows: token 0 at position 0, writing the scratch slot
                positions + [0] * pad,
                slots + [self.cache.scratch_slot] * pad,
                [t + [0] * (self.width - len(t)) for t in tables] + [[0] * self.width] * pad,  # [slots, MB]
                [p + 1 for p in positions] + [1] * pad)  # sequence lengths after this step
        args = [torch.tensor(row, device=self.device) for row in rows]
        synchronize(self.device)
        began = time.perf_counter()
        logits = self._step(*args)
        synchronize(self.device)
        return logits[:n], time.perf_counter() - began
