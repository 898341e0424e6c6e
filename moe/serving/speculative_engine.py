"""Speculative decoding inside continuous batching: every decoding request gets its own γ
proposals from the draft (or from prompt lookup, which needs no model, alone or followed by
the n-gram draft of moe/serving/ngram_draft.py), the target verifies
all of them in the engine's one ragged forward, and each request keeps its own number of
accepted tokens.

Why a subclass of the engine: scheduling, preemption, prefill chunks, the forward and
retiring are the same; only two hooks of a step change (moe/serving/engine.py):

    schedule   as the plain engine
    propose    a request that is decoding (one pending token) may take γ_b more tokens,
               when its KV blocks and length limits allow; the draft, with its own K/V pool
               under the target's block tables (one block manager for both), catches up on
               the tokens it has not seen and samples γ_b tokens per request; each of its
               forwards is one ragged row of just the requests still proposing. Prompt
               lookup instead copies what followed the request's last n-gram earlier on
    run        one target forward over all scheduled tokens: prefill chunks, plain decodes,
               and (last token + proposals) of speculating requests
    verify     the target's draws for every request's γ_b + 1 rows at once, then each
               speculating request runs the acceptance rule of moe/serving/speculative.py
    roll back  a request's cached length grows by 1 + accepted only; its rejected slots are
               simply overwritten later (paged slots are written by position too)

The speculative tokens ride on top of `max_num_batched_tokens` (the budget counts one per
decode, as in the plain engine). Every request's output equals its plain decoding, greedy
or seeded, whatever γ the free blocks allow in each step.

Shapes: N tokens in the step, V vocab, γ proposals.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from moe.model.transformer import Transformer
from moe.serving.cache import PagedKVCache
from moe.serving.engine import Engine, EngineConfig, Scheduled
from moe.serving.generation import timed_forward
from moe.serving.requests import Request
from moe.serving.sampling import draw_tokens
from moe.serving.speculative import PromptLookupProposer, SpeculativeStats, accept


class SpeculativeEngine(Engine):
    def __init__(self, model: Transformer, draft: Transformer | None = None, gamma: int = 4,
                 config: EngineConfig | None = None, clock=time.perf_counter,
                 adaptive: bool = False, max_gamma: int = 16,
                 lookup: PromptLookupProposer | None = None):
        """Proposals from a `draft` model or, without one, from `lookup` (prompt lookup:
        what followed the latest earlier occurrence of the request's last tokens). With
        `adaptive`, each request keeps its own γ: one more after a step where all its
        proposals passed, one fewer after a rejection, between 1 and `max_gamma`."""
        super().__init__(model, config, clock)
        if not 1 <= gamma <= max_gamma:
            raise ValueError(f"gamma (tokens proposed per step) must be between 1 and max_gamma = "
                             f"{max_gamma}, got {gamma}")
        if (draft is None) == (lookup is None):
            raise ValueError("give exactly one of draft= (a model) or lookup= (a PromptLookupProposer)")
        if draft is not None and draft.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"draft vocab_size {draft.cfg.vocab_size} differs from the target's "
                             f"{model.cfg.vocab_size}; the draft must share the tokenizer")
        self.draft, self.lookup, self.gamma = draft, lookup, gamma
        self.adaptive, self.max_gamma = adaptive, max_gamma
        self.wanted: dict[int, int] = {}  # request id -> its own γ (adaptive)
        self.draft_cached: dict[int, int] = {}  # request id -> draft cache slots that agree
        self.stats = SpeculativeStats()
        if draft is not None:
            # The draft catches up on a request from its first token, writing its K/V into the
            # request's blocks: blocks shared through the prefix cache must not be written.
            self.blocks.prefix_caching = False
            param = next(draft.parameters())
            self.draft_cache = PagedKVCache(draft.cfg, self.blocks.num_blocks, self.blocks.block_size,
                                            param.device, param.dtype)  # the target's block tables

    def forget(self, request: Request) -> None:
        self.draft_cached.pop(request.request_id, None)
        self.wanted.pop(request.request_id, None)

    # -- propose -------------------------------------------------------------------------

    def _room(self, request: Request) -> int:
        """γ for a decoding request: within the context, max_new_tokens and free blocks.
        The draft writes positions up to len(tokens) + γ - 2, inside what the target holds."""
        wanted = self.wanted.get(request.request_id, self.gamma)
        self.stats.gammas.append(wanted)
        gamma = min(wanted, self.cfg.max_seq_len - request.length - 1,
                    request.params.max_new_tokens - len(request.output) - 1)
        while gamma > 0 and not self.blocks.can_hold(request.request_id, request.num_cached + 1 + gamma):
            gamma -= 1
        return max(gamma, 0)

    def _draft_forward(self, rows: list[tuple[Request, list[int], int]]) -> Tensor:
        """rows: (request, new tokens, their first position) -> logits [len(rows), V] of
        each row's last token."""
        ids = [r.request_id for r, _, _ in rows]
        self.draft_cache.set_layout(self.blocks, ids, [len(n) for _, n, _ in rows],
                                    [s + len(n) for _, n, s in rows])
        tokens = [t for _, new, _ in rows for t in new]
        positions = [p for _, new, s in rows for p in range(s, s + len(new))]
        logits, seconds = timed_forward(self.draft, tokens, positions, self.draft_cache)
        self.stats.draft_forwards += 1
        self.stats.draft_time_s += seconds
        ends = torch.tensor([len(n) for _, n, _ in rows]).cumsum(0) - 1
        return logits[ends.to(logits.device)]  # [len(rows), V]

    def propose(self, scheduled: list[Scheduled]) -> None:
        """γ_b tokens per decoding request, each the draft's draw for its position with the
        request's own noise (draw_tokens), so it matches the target's draw wherever the two
        distributions allow."""
        gammas: dict[int, int] = {}
        for s in scheduled:
            request = s.request
            if request.output and s.n == 1 and s.completes:
                gamma = self._room(request)
                if gamma:  # reserve now, so the next request's room sees what is left
                    gammas[request.request_id] = gamma
                    self.blocks.reserve(request.request_id, request.num_cached + 1 + gamma)
        speculating = {s.request.request_id: s for s in scheduled if s.request.request_id in gammas}
        if self.lookup is not None:  # no model: up to γ_b tokens each, often fewer or none
            for rid, s in speculating.items():
                s.proposals.extend(self.lookup.propose_row(s.request.tokens, gammas[rid], s.request.params,
                                                           s.request.seed))
            return
        rows = [(s.request, s.request.token_range(self.draft_cached.get(rid, 0), s.request.length),
                 self.draft_cached.get(rid, 0)) for rid, s in speculating.items()]
        for i in range(max(gammas.values(), default=0)):
            logits = self._draft_forward(rows)  # [R, V]
            requests = [request for request, _, _ in rows]
            drawn = draw_tokens(list(logits[:, None]), [r.params for r in requests], [r.seed for r in requests],
                                [r.length + i for r in requests])  # one host transfer per draft step
            for request, (token,) in zip(requests, drawn):
                speculating[request.request_id].proposals.append(token)
            rows = [(r, [speculating[r.request_id].proposals[-1]], r.length + i)
                    for r, _, _ in rows if gammas[r.request_id] > i + 1]
        for s in speculating.values():
            rid = s.request.request_id
            self.draft_cached[rid] = s.request.length + gammas[rid] - 1

    # -- run and verify ------------------------------------------------------------------

    def run_model(self, scheduled: list[Scheduled]) -> Tensor:
        before = self.forward_time_s
        logits = super().run_model(scheduled)
        self.stats.target_time_s += self.forward_time_s - before
        self.stats.target_calls += 1
        return logits

    def verify(self, completing: list[tuple[Scheduled, Tensor]]) -> list[tuple[list[int], int]]:
        """The acceptance rule per request on its [γ + 1, V] rows (one token when it
        proposed nothing); the target's draws for every request in one host transfer."""
        requests = [s.request for s, _ in completing]
        draws = draw_tokens([scores for _, scores in completing], [r.params for r in requests],
                            [r.seed for r in requests], [r.length for r in requests])
        return [accept(s.proposals, d) for (s, _), d in zip(completing, draws)]

    def accepted(self, scheduled: Scheduled, n_ok: int, n_kept: int) -> None:
        rid = scheduled.request.request_id
        if rid in self.draft_cached:  # the draft's slots past the accepted ones are stale
            self.draft_cached[rid] = min(self.draft_cached[rid], scheduled.request.num_cached)
        self.stats.record_round(len(scheduled.proposals), n_ok)
        self.stats.generated += n_kept
        if self.adaptive and scheduled.proposals:
            wanted = self.wanted.get(rid, self.gamma)
            passed = n_ok == len(scheduled.proposals)
            self.wanted[rid] = min(wanted + 1, self.max_gamma) if passed else max(wanted - 1, 1)
