"""Continuous batching: many requests share every forward pass, joining and leaving per step.

Why: decoding one sequence reads every active weight to produce one token, so the GPU is
mostly waiting on memory. Batching shares that read. Static batching (moe/serving/static_batching.py)
fixes a batch and waits for its longest member, so slots idle as short requests finish.
Iteration-level scheduling (Orca, vLLM) decides the batch afresh at every step: finished
requests leave at once, their KV blocks go back to the pool, and waiting ones take the slots.

One `step()`:

    schedule   running requests first, in admission order: each brings its pending tokens
               (1 when decoding, a chunk of the prompt when prefilling), within the token
               budget; a request that cannot get the KV blocks it needs preempts the most
               recently admitted one (its blocks are freed, it goes back to the head of the
               queue and is recomputed later: prompt + what it had generated). Then, if
               nothing was preempted, waiting requests are admitted while the token budget,
               the sequence limit and the free blocks allow.
    run        the scheduled tokens flattened into one ragged row tokens [1, N] at positions
               [1, N]; one model forward writes their K/V through the paged cache.
    sample     every request whose pending tokens are now all cached samples its next
               token from the logits of its last token (a prefill chunk that is not the
               last one samples nothing).
    retire     requests that hit EOS, a stop string, max_new_tokens or the context length
               finish and release their blocks before the next step.

Bad requests are refused with a reason at `add_request`; the engine goes on serving others.

Shapes: N tokens in the step, V vocab.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from moe.serving.cache import PagedKVCache
from moe.config import ModelConfig
from moe.model.transformer import Transformer
from moe.serving.sampling import SamplingParams, check_stop, make_generator, sample, visible_text, warp_probs


@dataclass
class EngineConfig:
    max_num_seqs: int = 8  # sequences running at once (the batch slots)
    max_num_batched_tokens: int = 256  # tokens in one forward: decodes + prefill chunks
    prefill_chunk: int | None = None  # longest prompt piece per step; None = the token budget
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV pool size; None = max_num_seqs full-length sequences
    kv_cache_bytes: int | None = None  # size the pool from a memory budget instead of num_blocks

    def __post_init__(self) -> None:
        for key in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"engine.{key} must be at least 1, got {getattr(self, key)}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"engine.prefill_chunk must be at least 1 or None, got {self.prefill_chunk}")


@dataclass
class Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    output: list[int] = field(default_factory=list)
    status: str = "waiting"  # waiting | running | finished | refused
    finish_reason: str | None = None  # eos | stop | length | refused
    refusal: str | None = None  # why a refused request was refused
    num_cached: int = 0  # tokens whose K/V are in the cache
    preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def text(self) -> str:
        return visible_text(self.output, self.params)


def refusal_reason(cfg: ModelConfig, prompt: list[int], params: SamplingParams,
                   pool_tokens: int | None = None) -> str | None:
    """Why a request cannot be served, or None. `pool_tokens`: what the whole KV pool holds."""
    if not prompt:
        return "empty prompt: give at least one token"
    bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
    if bad:
        return f"token ids {bad[:5]} are outside the vocabulary [0, {cfg.vocab_size})"
    problem = params.invalid_reason()
    if problem:
        return problem
    if len(prompt) >= cfg.max_seq_len:
        return (f"prompt of {len(prompt)} tokens leaves no room to generate within "
                f"max_seq_len = {cfg.max_seq_len}; shorten it")
    longest = min(len(prompt) + params.max_new_tokens, cfg.max_seq_len)
    if pool_tokens is not None and longest > pool_tokens:
        return (f"request may grow to {longest} tokens but the whole KV pool holds "
                f"{pool_tokens}; lower max_new_tokens or give the engine more blocks")
    return None


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig | None = None, clock=time.perf_counter):
        self.model, self.cfg = model, model.cfg
        self.config = config or EngineConfig()
        self.clock = clock
        param = next(model.parameters())
        self.device = param.device
        per_seq = -(-self.cfg.max_seq_len // self.config.block_size)
        num_blocks = self.config.num_blocks or self.config.max_num_seqs * per_seq
        if self.config.kv_cache_bytes is not None:
            block_bytes = PagedKVCache.bytes_per_block(self.cfg, self.config.block_size, param.dtype)
            num_blocks = self.config.kv_cache_bytes // block_bytes
            if num_blocks < 1:
                raise ValueError(f"engine.kv_cache_bytes = {self.config.kv_cache_bytes} holds no block "
                                 f"of {block_bytes} bytes; give more memory or smaller blocks")
        self.cache = PagedKVCache(self.cfg, num_blocks, self.config.block_size, self.device, param.dtype)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []
        self.ids = itertools.count()
        self.steps = 0
        self.preemptions = 0
        self.batch_sizes: list[int] = []  # sequences in each step
        self.block_utilisation: list[float] = []  # used / all blocks, each step

    # -- requests ----------------------------------------------------------------------

    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> Request:
        params = params or SamplingParams()
        request = Request(next(self.ids), list(prompt), params,
                          self.clock() if arrival_time is None else arrival_time)
        pool_tokens = self.cache.num_blocks * self.cache.block_size
        request.refusal = refusal_reason(self.cfg, request.prompt, params, pool_tokens)
        if request.refusal:
            request.status, request.finish_reason = "refused", "refused"
            self.finished.append(request)
            return request
        request.generator = make_generator(params, self.device)
        self.waiting.append(request)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def run(self) -> list[Request]:
        """Step until every request added so far has finished; all finished requests."""
        while self.has_unfinished():
            steps = self.steps
            self.step()
            if self.steps == steps:
                raise RuntimeError(f"no request could be scheduled ({len(self.waiting)} waiting, "
                                   f"{len(self.running)} running, {len(self.cache.free_blocks)} free "
                                   "blocks); this is a scheduler bug, please report it")
        return self.finished

    # -- one iteration -----------------------------------------------------------------

    def _pending(self, request: Request, budget: int) -> int:
        chunk = self.config.prefill_chunk or budget
        return min(len(request.tokens) - request.num_cached, budget, chunk)

    def _preempt(self, request: Request) -> None:
        self.cache.release(request.request_id)
        self.running.remove(request)
        request.num_cached, request.status = 0, "waiting"
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)

    def _schedule(self) -> list[tuple[Request, int]]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._pending(request, budget)
            while not self.cache.can_hold(request.request_id, request.num_cached + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status != "running":
                break
            self.cache.reserve(request.request_id, request.num_cached + n)
            scheduled.append((request, n))
            budget -= n
            i += 1
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            n = self._pending(request, budget)
            if not self.cache.can_hold(request.request_id, request.num_cached + n):
                break
            self.waiting.popleft()
            request.status = "running"
            self.running.append(request)
            self.cache.reserve(request.request_id, request.num_cached + n)
            scheduled.append((request, n))
            budget -= n
        return scheduled

    @torch.no_grad()
    def step(self) -> list[tuple[Request, int]]:
        """Run one iteration; returns (request, new token) for every token sampled."""
        scheduled = self._schedule()
        if not scheduled:
            return []
        tokens, positions = [], []
        for request, n in scheduled:
            tokens += request.tokens[request.num_cached: request.num_cached + n]
            positions += range(request.num_cached, request.num_cached + n)
        self.cache.set_layout([r.request_id for r, _ in scheduled], [n for _, n in scheduled],
                              [r.num_cached + n for r, n in scheduled])
        self.batch_sizes.append(len(scheduled))
        self.block_utilisation.append(self.cache.used_blocks / self.cache.num_blocks)
        self.steps += 1
        logits = self.model(torch.tensor([tokens], device=self.device),
                            torch.tensor([positions], device=self.device), self.cache).logits[0]  # [N, V]
        ends = torch.tensor([n for _, n in scheduled]).cumsum(0) - 1  # last token of each sequence
        sampling = []
        for (request, n), end in zip(scheduled, ends.tolist()):
            request.num_cached += n
            if request.num_cached == len(request.tokens):
                sampling.append((request, end))
        new_tokens = self._sample(logits, sampling)
        now = self.clock()
        for (request, _), token in zip(sampling, new_tokens):
            request.output.append(token)
            request.token_times.append(now)
            if request.first_token_time is None:
                request.first_token_time = now
            reason, _ = check_stop(request.output, request.params)
            if reason is None and len(request.tokens) >= self.cfg.max_seq_len:
                reason = "length"
            if reason:
                self._finish(request, reason, now)
        return [(request, token) for (request, _), token in zip(sampling, new_tokens)]

    def _sample(self, logits: torch.Tensor, sampling: list[tuple[Request, int]]) -> list[int]:
        """Greedy rows in one argmax; the others one by one, each with its own generator."""
        if not sampling:
            return []
        rows = logits[torch.tensor([end for _, end in sampling], device=logits.device)]  # [S, V]
        tokens = rows.argmax(dim=-1).tolist()
        for i, (request, _) in enumerate(sampling):
            if not request.params.greedy:
                probs = warp_probs(rows[i:i + 1], request.params)
                tokens[i] = int(sample(probs, request.generator)[0])
        return tokens

    def _finish(self, request: Request, reason: str, now: float) -> None:
        self.cache.release(request.request_id)
        self.running.remove(request)
        request.status, request.finish_reason, request.finish_time = "finished", reason, now
        self.finished.append(request)
