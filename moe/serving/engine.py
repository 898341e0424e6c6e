"""Continuous batching: many requests share every forward pass, joining and leaving per step.

Why: decoding one sequence reads every active weight to produce one token, so the GPU is
mostly waiting on memory. Batching shares that read. Static batching (moe/serving/static_batching.py)
fixes a batch and waits for its longest member, so slots idle as short requests finish.
Iteration-level scheduling (Orca, vLLM) decides the batch afresh at every step: finished
requests leave at once, their KV blocks go back to the pool, and waiting ones take the slots.

One `step()` is schedule -> run -> postprocess, as in nano-vllm:

    schedule     running requests first, in admission order: each brings its pending tokens
                 (1 when decoding, a chunk of the prompt when prefilling), within the token
                 budget; a request that cannot get the KV blocks it needs preempts the most
                 recently admitted one (its blocks are freed, it goes back to the head of the
                 queue and is recomputed later: prompt + what it had generated). Then, if
                 nothing was preempted, waiting requests are admitted while the token budget,
                 the sequence limit and the free blocks allow. The block manager
                 (moe/serving/blocks.py) says who owns which blocks; a request admitted
                 with a prompt prefix already in its prefix cache starts past it.
      propose    (a hook) tokens to check beside each decode: none here; the speculative
                 engine (moe/serving/speculative_engine.py) asks its draft
    run          the scheduled tokens flattened into one ragged row tokens [1, N] at positions
                 [1, N]; one model forward writes their K/V through the paged cache (which
                 only stores K/V) and returns logits.
    postprocess  every request whose pending tokens are now all cached takes its new tokens
                 (`verify`, a hook: here one sampled token; a prefill chunk that is not the
                 last takes none), and requests that are finished (moe/serving/stopping.py:
                 EOS, a stop string, max_new_tokens, the context length) release their
                 blocks before the next step.

Bad requests are refused with a reason at `add_request` (moe/serving/requests.py); the
engine goes on serving others. `abort` ends a request at once and frees its blocks; a
forward that raises fails only the requests of that step. Finished requests wait in
`finished` until `take_finished` hands them off, and per-step statistics keep the last
STATS_WINDOW steps, so a long-running server does not grow.

Shapes: N tokens in the step, V vocab.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

STATS_WINDOW = 10_000  # steps of batch size and block use kept (a server runs for days)

import torch
from torch import Tensor

from moe.model.transformer import Transformer, require_causal
from moe.profiling import label
from moe.serving.blocks import BlockManager
from moe.serving.cache import PagedKVCache
from moe.serving.generation import timed_forward
from moe.serving.requests import Request, refusal_reason
from moe.serving.sampling import SamplingParams, draw_seed, draw_tokens
from moe.serving.static_decode import PagedDecodeStep
from moe.serving.stopping import BYTES, Detokenizer, finish_reason


@dataclass
class EngineConfig:
    max_num_seqs: int = 8  # sequences running at once (the batch slots)
    max_num_batched_tokens: int = 256  # tokens in one forward: decodes + prefill chunks
    prefill_chunk: int | None = None  # longest prompt piece per step; None = the token budget
    block_size: int = 16  # tokens per KV block
    num_blocks: int | None = None  # KV pool size; None = max_num_seqs full-length sequences
    kv_cache_bytes: int | None = None  # size the pool from a memory budget instead of num_blocks
    prefix_caching: bool = True  # reuse the K/V of full blocks of a prompt prefix seen before
    compile: bool = False  # run all-decode steps through one compiled static-shape step (static_decode.py)

    def __post_init__(self) -> None:
        for key in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"engine.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("prefill_chunk", "num_blocks", "kv_cache_bytes"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"engine.{key} must be at least 1 or None (the default), got "
                                 f"{getattr(self, key)}")


@dataclass
class Scheduled:
    """One request's part of a step: `n` pending tokens (prompt chunk or the last sampled
    token), then any `proposals` to check (speculative decoding)."""
    request: Request
    n: int
    proposals: list[int] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        start = self.request.num_cached
        return self.request.token_range(start, start + self.n) + self.proposals

    @property
    def completes(self) -> bool:
        """Whether this step caches the request's last pending token (so it takes new ones)."""
        return self.request.num_cached + self.n == self.request.length


class Engine:
    def __init__(self, model: Transformer, config: EngineConfig | None = None, clock=time.perf_counter):
        self.model, self.cfg = model, model.cfg
        require_causal(self.cfg)  # refused when built, not at the first request
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
        self.blocks = BlockManager(num_blocks, self.config.block_size, self.config.prefix_caching)
        self.cache = PagedKVCache(self.cfg, num_blocks, self.config.block_size, self.device, param.dtype)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []  # until take_finished hands them off
        self.ids = itertools.count()
        self.steps = 0
        self.preemptions = 0
        self.tokens_generated = 0
        self.batch_sizes: deque[int] = deque(maxlen=STATS_WINDOW)  # sequences in each step
        self.block_utilisation: deque[float] = deque(maxlen=STATS_WINDOW)  # used / all blocks
        self.forward_time_s = 0.0  # model forwards, device synchronised
        self.decode_graph = (PagedDecodeStep(model, self.cache, self.config.max_num_seqs)
                             if self.config.compile else None)  # all-decode steps, compiled

    # -- requests ----------------------------------------------------------------------

    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, detok: Detokenizer = BYTES) -> Request:
        params = params or SamplingParams()
        request = Request(next(self.ids), list(prompt), params,
                          self.clock() if arrival_time is None else arrival_time, detok)
        pool_tokens = self.blocks.num_blocks * self.blocks.block_size
        request.refusal = refusal_reason(self.cfg, request.prompt, params, pool_tokens)
        if request.refusal:
            request.status, request.finish_reason = "refused", "refused"
            self.finished.append(request)
            return request
        request.seed = draw_seed(params)
        self.waiting.append(request)
        return request

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request: Request) -> None:
        """End `request` now (its client went away); its blocks go back at once."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.running:
            self.blocks.release(request.request_id)
            self.running.remove(request)
        else:
            return  # already finished
        self.forget(request)
        request.status, request.finish_reason, request.finish_time = "aborted", "abort", self.clock()
        self.finished.append(request)

    def take_finished(self) -> list[Request]:
        """The requests finished since the last call (the engine keeps no reference)."""
        done, self.finished = self.finished, []
        return done

    def run(self) -> list[Request]:
        """Step until every request added so far has finished; all finished requests."""
        while self.has_unfinished():
            steps = self.steps
            self.step()
            if self.steps == steps:
                raise RuntimeError(f"no request could be scheduled ({len(self.waiting)} waiting, "
                                   f"{len(self.running)} running, {len(self.blocks.free_blocks)} "
                                   "free blocks); this is a scheduler bug, please report it")
        return self.finished

    # -- one step: schedule -> run -> postprocess ----------------------------------------

    @torch.no_grad()
    def step(self) -> list[tuple[Request, int]]:
        """Run one iteration; returns (request, new token) for every token emitted."""
        with label("schedule"):  # profiler labels (benchmarks/bench_decode.py)
            scheduled = self.schedule()
        if not scheduled:
            return []
        try:
            self.propose(scheduled)
            logits = self.run_model(scheduled)  # [N, V]
        except Exception as error:  # noqa: BLE001: one bad step must not stop the server
            self.fail(scheduled, error)
            return []
        with label("postprocess"):
            return self.postprocess(scheduled, logits)

    def fail(self, scheduled: list[Scheduled], error: Exception) -> None:
        """A forward raised: the requests of this step fail with the reason, their blocks go
        back, and the engine serves the rest."""
        now = self.clock()
        for s in scheduled:
            request = s.request
            if request in self.running:
                self.blocks.release(request.request_id)
                self.running.remove(request)
            self.forget(request)
            request.status, request.finish_reason, request.finish_time = "failed", "error", now
            request.refusal = f"the forward failed: {type(error).__name__}: {error}"
            self.finished.append(request)

    # -- schedule ------------------------------------------------------------------------

    def _pending(self, request: Request, budget: int) -> int:
        chunk = self.config.prefill_chunk or budget
        return min(request.length - request.num_cached, budget, chunk)

    def preempt(self, request: Request) -> None:
        self.forget(request)
        self.blocks.release(request.request_id)
        self.running.remove(request)
        request.num_cached, request.status = 0, "waiting"
        request.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> list[Scheduled]:
        budget = self.config.max_num_batched_tokens
        scheduled: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._pending(request, budget)
            while not self.blocks.can_hold(request.request_id, request.num_cached + n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status != "running":
                break
            self.blocks.reserve(request.request_id, request.num_cached + n)
            scheduled.append(Scheduled(request, n))
            budget -= n
            i += 1
        while (not preempted and self.waiting and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting[0]
            if request.num_cached == 0:  # start past the prefix blocks already in the cache
                request.num_cached = self.blocks.match_prefix(request.request_id, request.tokens)
            n = self._pending(request, budget)
            if not self.blocks.can_hold(request.request_id, request.num_cached + n):
                self.blocks.release(request.request_id)  # the matched blocks, until next time
                request.num_cached = 0
                break
            self.waiting.popleft()
            request.status = "running"
            self.running.append(request)
            self.blocks.reserve(request.request_id, request.num_cached + n)
            scheduled.append(Scheduled(request, n))
            budget -= n
        return scheduled

    def propose(self, scheduled: list[Scheduled]) -> None:
        """Fill in `proposals` (blocks reserved for them); the plain engine proposes none."""

    # -- run -----------------------------------------------------------------------------

    def run_model(self, scheduled: list[Scheduled]) -> Tensor:
        """One forward over the step's ragged row -> logits [N, V]."""
        with label("layout"):
            tokens, positions, query_lens = [], [], []
            for s in scheduled:
                new = s.tokens
                tokens += new
                positions += range(s.request.num_cached, s.request.num_cached + len(new))
                query_lens.append(len(new))
            all_decode = self.decode_graph is not None and len(tokens) == len(scheduled)  # one token each
            if not all_decode:
                self.cache.set_layout(self.blocks, [s.request.request_id for s in scheduled], query_lens,
                                      [s.request.num_cached + q for s, q in zip(scheduled, query_lens)])
        self.batch_sizes.append(len(scheduled))
        self.block_utilisation.append(self.blocks.used_blocks / self.blocks.num_blocks)
        self.steps += 1
        if all_decode:  # the compiled static-shape step builds its own padded layout
            logits, seconds = self.decode_graph(tokens, positions, [self.blocks.tables[s.request.request_id]
                                                                    for s in scheduled])
        else:
            logits, seconds = timed_forward(self.model, tokens, positions, self.cache)
        self.forward_time_s += seconds
        return logits

    # -- postprocess ---------------------------------------------------------------------

    def postprocess(self, scheduled: list[Scheduled], logits: Tensor) -> list[tuple[Request, int]]:
        """Cache what ran, take each finishing request's new tokens, retire the finished."""
        ends = torch.tensor([s.n + len(s.proposals) for s in scheduled]).cumsum(0).tolist()
        completing = [(s, logits[end - len(s.proposals) - 1:end])  # [1 + γ, V] from the last known token
                      for s, end in zip(scheduled, ends) if s.completes]
        for s in scheduled:
            if not s.completes:  # a prefill chunk that is not the last
                s.request.num_cached += s.n
                self.name_full_blocks(s.request)
        now, emitted = self.clock(), []
        for (s, scores), (new, n_ok) in zip(completing, self.verify(completing)):
            request = s.request
            known = request.length
            request.num_cached += s.n + n_ok
            request.output += new
            self.name_full_blocks(request)
            reason, keep = finish_reason(len(request.prompt), request.output, request.params,
                                         request.detok, self.cfg.max_seq_len, len(new))
            del request.output[keep:]
            if request.params.logprobs is not None:
                request.logprobs += token_logprobs(scores, request.output[known - len(request.prompt):],
                                                   request.params.logprobs)
            if request.first_token_time is None:
                request.first_token_time = now
            kept = request.output[known - len(request.prompt):]
            self.tokens_generated += len(kept)
            for token in kept:
                request.token_times.append(now)
                emitted.append((request, token))
            self.accepted(s, n_ok, len(kept))
            if reason:
                self.finish(request, reason, now)
        return emitted

    def name_full_blocks(self, request: Request) -> None:
        """Give the prefix cache the blocks this step filled (most steps fill none: the
        request's tokens are gathered only when one did)."""
        if self.blocks.fills_a_block(request.request_id, request.num_cached):
            self.blocks.commit(request.request_id, request.tokens, request.num_cached)

    def verify(self, completing: list[tuple[Scheduled, Tensor]]) -> list[tuple[list[int], int]]:
        """(new tokens, proposals accepted) per completing request, from its rows of logits.
        No proposals here: one token each, the request's own draw for its position
        (argmax when greedy), all requests in one argmax and one host transfer."""
        requests = [s.request for s, _ in completing]
        drawn = draw_tokens([scores[-1:] for _, scores in completing], [r.params for r in requests],
                            [r.seed for r in requests], [r.length for r in requests])
        return [(tokens, 0) for tokens in drawn]

    def accepted(self, scheduled: Scheduled, n_ok: int, n_kept: int) -> None:
        """A hook after a request took its new tokens: `n_ok` proposals accepted, `n_kept`
        tokens kept (the speculative engine's bookkeeping)."""

    def forget(self, request: Request) -> None:
        """A hook when a request leaves the running set (finished, aborted, failed or
        preempted): the speculative engine drops its draft's state for it."""

    def finish(self, request: Request, reason: str, now: float) -> None:
        self.forget(request)
        self.blocks.release(request.request_id)
        self.running.remove(request)
        request.status, request.finish_reason, request.finish_time = "finished", reason, now
        self.finished.append(request)


def token_logprobs(scores: Tensor, tokens: list[int], top_n: int) -> list[tuple[float, dict[int, float]]]:
    """For token j of `tokens`, predicted by row j of scores [>= len(tokens), V]: its
    log-probability under the model (before temperature and truncation, as OpenAI reports
    it) and the `top_n` most likely ids with theirs."""
    logp = torch.log_softmax(scores[:len(tokens)].float(), dim=-1)  # [T, V]
    top = logp.topk(top_n, dim=-1) if top_n else None
    out = []
    for j, token in enumerate(tokens):
        best = {} if top is None else dict(zip(top.indices[j].tolist(), top.values[j].tolist()))
        out.append((float(logp[j, token]), best))
    return out
