"""Speculative decoding inside continuous batching: every decoding request gets its own γ
proposals from the draft, the target verifies all of them in the engine's one ragged forward,
and each request keeps its own number of accepted tokens.

Why a subclass of the engine: scheduling, preemption, prefill chunks and retiring are the
same; only a step changes. One step:

    schedule   as the plain engine (moe/serving/engine.py); a request that is decoding (one pending
               token) may take γ_b more tokens, when its KV blocks and length limits allow
    propose    the draft, with its own paged cache under the same request ids, catches up on
               the tokens it has not seen and samples γ_b tokens per request; each of its
               forwards is one ragged row of just the requests still proposing
    verify     one target forward over all scheduled tokens: prefill chunks, plain decodes,
               and (last token + proposals) of speculating requests; each speculating
               request runs the accept/reject rule of moe/serving/speculative.py on its γ_b + 1 rows
    roll back  a request's cached length grows by 1 + accepted only; its rejected slots are
               simply overwritten later (paged slots are written by position too)

The speculative tokens ride on top of `max_num_batched_tokens` (the budget counts one per
decode, as in the plain engine). Greedy output equals plain greedy decoding per request.

Shapes: N tokens in the step, V vocab, γ proposals.
"""

from __future__ import annotations

import time

import torch

from moe.serving.cache import PagedKVCache
from moe.serving.engine import Engine, EngineConfig, Request
from moe.model.transformer import Transformer
from moe.serving.sampling import check_stop, sample, warp_probs
from moe.serving.speculative import SpeculativeStats, verify, verify_greedy


class SpeculativeEngine(Engine):
    def __init__(self, model: Transformer, draft: Transformer, gamma: int = 4,
                 config: EngineConfig | None = None, clock=time.perf_counter):
        super().__init__(model, config, clock)
        if gamma < 1:
            raise ValueError(f"gamma (tokens proposed per step) must be at least 1, got {gamma}")
        if draft.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"draft vocab_size {draft.cfg.vocab_size} differs from the target's "
                             f"{model.cfg.vocab_size}; the draft must share the tokenizer")
        self.draft, self.gamma = draft, gamma
        param = next(draft.parameters())
        extra = self.config.max_num_seqs * self.cache.blocks_for(gamma + 1)
        self.draft_cache = PagedKVCache(draft.cfg, self.cache.num_blocks + extra,
                                        self.config.block_size, param.device, param.dtype)
        self.draft_cached: dict[int, int] = {}  # request id -> draft cache slots that agree
        self.stats = SpeculativeStats()

    def _preempt(self, request: Request) -> None:
        self._forget_draft(request)
        super()._preempt(request)

    def _finish(self, request: Request, reason: str, now: float) -> None:
        self._forget_draft(request)
        super()._finish(request, reason, now)

    def _forget_draft(self, request: Request) -> None:
        self.draft_cache.release(request.request_id)
        self.draft_cached.pop(request.request_id, None)

    # -- proposing ---------------------------------------------------------------------

    def _room(self, request: Request) -> int:
        """γ for a decoding request: within the context, max_new_tokens and free blocks."""
        gamma = min(self.gamma, self.cfg.max_seq_len - len(request.tokens) - 1,
                    request.params.max_new_tokens - len(request.output) - 1)
        rid = request.request_id
        while gamma > 0 and not (self.cache.can_hold(rid, request.num_cached + 1 + gamma)
                                 and self.draft_cache.can_hold(rid, len(request.tokens) + gamma - 1)):
            gamma -= 1
        return max(gamma, 0)

    def _draft_forward(self, rows: list[tuple[Request, list[int], int]]) -> torch.Tensor:
        """rows: (request, new tokens, their first position) -> logits [len(rows), V] of
        each row's last token."""
        ids = [r.request_id for r, _, _ in rows]
        for rid, (_, new, start) in zip(ids, rows):
            self.draft_cache.reserve(rid, start + len(new))
        self.draft_cache.set_layout(ids, [len(n) for _, n, _ in rows], [s + len(n) for _, n, s in rows])
        tokens = [t for _, new, _ in rows for t in new]
        positions = [p for _, new, s in rows for p in range(s, s + len(new))]
        start = time.perf_counter()
        logits = self.draft(torch.tensor([tokens], device=self.device),
                            torch.tensor([positions], device=self.device), self.draft_cache).logits[0]
        self.stats.draft_forwards += 1
        self.stats.draft_time_s += time.perf_counter() - start
        ends = torch.tensor([len(n) for _, n, _ in rows]).cumsum(0) - 1
        return logits[ends.to(logits.device)]  # [len(rows), V]

    def _propose(self, speculating: dict[int, int], requests: list[Request]):
        """γ_b tokens (and their draft probabilities, None when greedy) per request."""
        proposals = {r.request_id: [] for r in requests}
        probs = {r.request_id: [] for r in requests}
        rows = [(r, r.tokens[self.draft_cached.get(r.request_id, 0):], self.draft_cached.get(r.request_id, 0))
                for r in requests]
        for i in range(max(speculating.values(), default=0)):
            logits = self._draft_forward(rows)  # [R, V]
            for b, (request, _, _) in enumerate(rows):
                rid = request.request_id
                if request.params.greedy:
                    token = int(logits[b].argmax())
                else:
                    q = warp_probs(logits[b:b + 1], request.params)  # [1, V]
                    token = int(sample(q, request.generator)[0])
                    probs[rid].append(q[0])
                proposals[rid].append(token)
            rows = [(r, [proposals[r.request_id][-1]], len(r.tokens) + i) for r, _, _ in rows
                    if speculating[r.request_id] > i + 1]
        for request in requests:
            self.draft_cached[request.request_id] = len(request.tokens) + speculating[request.request_id] - 1
        return proposals, {rid: torch.stack(p) if p else None for rid, p in probs.items()}

    # -- one iteration -----------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[tuple[Request, int]]:
        """Run one iteration; returns (request, new token) for every token kept."""
        scheduled = self._schedule()
        if not scheduled:
            return []
        speculating = {}
        for request, n in scheduled:
            if request.output and n == 1 and request.num_cached + 1 == len(request.tokens):
                gamma = self._room(request)
                if gamma:  # reserve now, so the next request's room sees what is left
                    speculating[request.request_id] = gamma
                    self.cache.reserve(request.request_id, request.num_cached + 1 + gamma)
                    self.draft_cache.reserve(request.request_id, len(request.tokens) + gamma - 1)
        proposals, probs = self._propose(speculating, [r for r, _ in scheduled
                                                       if r.request_id in speculating])
        tokens, positions, query_lens = [], [], []
        for request, n in scheduled:
            new = request.tokens[request.num_cached: request.num_cached + n] + proposals.get(request.request_id, [])
            self.cache.reserve(request.request_id, request.num_cached + len(new))
            tokens += new
            positions += range(request.num_cached, request.num_cached + len(new))
            query_lens.append(len(new))
        self.cache.set_layout([r.request_id for r, _ in scheduled], query_lens,
                              [r.num_cached + q for (r, _), q in zip(scheduled, query_lens)])
        self.batch_sizes.append(len(scheduled))
        self.block_utilisation.append(self.cache.used_blocks / self.cache.num_blocks)
        self.steps += 1
        start = time.perf_counter()
        logits = self.model(torch.tensor([tokens], device=self.device),
                            torch.tensor([positions], device=self.device), self.cache).logits[0]  # [N, V]
        self.stats.target_time_s += time.perf_counter() - start
        self.stats.target_calls += 1
        now, emitted, offset = self.clock(), [], 0
        for (request, n), width in zip(scheduled, query_lens):
            rows, offset = logits[offset:offset + width], offset + width  # [width, V]
            if request.num_cached + n < len(request.tokens):  # a prefill chunk that is not the last
                request.num_cached += n
                continue
            rid = request.request_id
            proposed = proposals.get(rid, [])
            scores = rows[n - 1:]  # [γ + 1, V]: from the last known token on
            if request.params.greedy:
                new, n_ok = verify_greedy(proposed, scores.argmax(dim=-1).tolist())
            else:
                new, n_ok = verify(proposed, probs.get(rid), warp_probs(scores, request.params),
                                   request.generator)
            known = len(request.tokens)
            request.num_cached += n + n_ok
            if rid in self.draft_cached:
                self.draft_cached[rid] = min(self.draft_cached[rid], known + n_ok)
            self.stats.record_round(len(proposed), n_ok)
            request.output += new
            reason, keep = check_stop(request.output, request.params, len(new))
            del request.output[keep:]
            self.stats.generated += len(request.output) - (known - len(request.prompt))
            if request.first_token_time is None:
                request.first_token_time = now
            for token in request.output[known - len(request.prompt):]:
                request.token_times.append(now)
                emitted.append((request, token))
            if reason is None and len(request.tokens) >= self.cfg.max_seq_len:
                reason = "length"
            if reason:
                self._finish(request, reason, now)
        return emitted
