"""Speculative decoding: a cheap proposer guesses γ tokens, the target checks them in one forward.

Why: at small batch a decode step is memory-bound, so scoring γ + 1 tokens in one target
forward costs about as much as scoring one. If a cheap draft guesses the target's next
tokens well, each target forward yields several tokens instead of one.

One round, per sequence of length n (Leviathan et al. 2023; Chen et al. 2023), where
G_t is the request's own Gumbel noise for position t (moe/serving/sampling.py: it depends
on the request's seed and t only):

    draft:   x_1..x_γ, x_i = argmax(log q_i + G_{n+i-1}) with q_i = warp(draft logits)
    target:  one forward over [tokens not yet in its cache] + x_1..x_γ
             -> p_1..p_{γ+1} = warp(target logits) at positions n .. n+γ
    check:   y_i = argmax(log p_i + G_{n+i-1}), the target's own draw; accept x_i while
             x_i = y_i, left to right; at the first x_i != y_i keep y_i and stop
    bonus:   when all γ pass, keep y_{γ+1}

Every kept token is the target's draw y for its position, which is exactly what plain
sampling draws there (`sample_at` with the same noise): so the output follows the
target's distribution, and a seeded request gets the same tokens with or without
speculation, whatever γ, the batch or the engine's pool. The draft shares the noise, so
its proposal is the target's draw whenever the two distributions are close (the
Gumbel-max coupling: accepted with probability at least (1 - d) / (1 + d) for total
variation distance d, Daliri, Musco and Suresh 2024, against 1 - d for the rejection rule
of Leviathan et al., which keeps the distribution but not the tokens). Greedy is the
same rule without noise: a proposal passes while the argmaxes agree. A proposer without
probabilities (prompt lookup) is checked the same way.

Rolling back costs nothing: moe.serving.cache.KVCache is written by position and a query at
position p reads slots 0..p only, so both caches just remember how many of their slots
agree with the sequence and overwrite the rest on the next forward. The same fact lets a
batch of sequences of different lengths run as one padded forward: row b feeds its own
new tokens at its own positions, padded on the right, and the padding only writes slots
past the row's valid length.

Shapes: B sequences, W tokens fed per row in one forward, γ proposals, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moe.model.transformer import Transformer
from moe.profiling import synchronize
from moe.serving.cache import KVCache
from moe.serving.requests import check_request
from moe.serving.sampling import SamplingParams, draw_seed, draw_tokens
from moe.serving.static_decode import VerifyStep, padded_rows
from moe.serving.stopping import BYTES, Detokenizer, finish_reason


@dataclass
class SpeculativeStats:
    target_calls: int = 0  # target forwards (each verifies a whole batch)
    draft_forwards: int = 0  # draft forwards (prefill included)
    rounds: int = 0  # (sequence, target call) pairs
    generated: int = 0  # tokens kept, over all sequences
    proposed: int = 0
    accepted: int = 0
    reached: list[int] = field(default_factory=list)  # [i]: proposals verified at position i
    accepted_at: list[int] = field(default_factory=list)  # [i]: of those, accepted
    gammas: list[int] = field(default_factory=list)  # γ asked for in each target call (adaptive), before clipping
    proposal_lengths: list[int] = field(default_factory=list)  # tokens each round actually proposed
    target_time_s: float = 0.0
    draft_time_s: float = 0.0

    def record_round(self, n_proposed: int, n_accepted: int) -> None:
        """One sequence's verification: proposals 0..n_accepted-1 passed, the next (if any) failed."""
        self.rounds += 1
        self.proposal_lengths.append(n_proposed)
        self.proposed += n_proposed
        self.accepted += n_accepted
        for i in range(min(n_accepted + 1, n_proposed)):
            if i == len(self.reached):
                self.reached.append(0)
                self.accepted_at.append(0)
            self.reached[i] += 1
            self.accepted_at[i] += i < n_accepted

    @property
    def mean_accepted_length(self) -> float:
        """Tokens gained per sequence per target call, the correction or bonus token included."""
        return self.generated / max(self.rounds, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposed, 1)

    @property
    def verified_acceptance(self) -> float:
        """α of the theory: accepted over proposals the target actually judged (those after
        a rejection in the same round are never looked at)."""
        return self.accepted / max(sum(self.reached), 1)

    @property
    def per_position_acceptance(self) -> list[float]:
        """P(proposal i accepted | proposals before it accepted)."""
        return [a / r for a, r in zip(self.accepted_at, self.reached) if r]

    @property
    def cost_ratio(self) -> float:
        """c: time of one draft forward over time of one target forward, as measured."""
        if not self.draft_forwards or not self.target_calls:
            return 0.0
        return (self.draft_time_s / self.draft_forwards) / (self.target_time_s / self.target_calls)

    def as_dict(self) -> dict:
        return dict(target_calls=self.target_calls, draft_forwards=self.draft_forwards,
                    rounds=self.rounds, generated=self.generated, proposed=self.proposed,
                    accepted=self.accepted, mean_accepted_length=self.mean_accepted_length,
                    acceptance_rate=self.acceptance_rate, verified_acceptance=self.verified_acceptance,
                    per_position_acceptance=self.per_position_acceptance,
                    mean_gamma=sum(self.gammas) / max(len(self.gammas), 1),
                    mean_proposal_length=self.proposed / max(self.rounds, 1),
                    cost_ratio=self.cost_ratio, target_time_s=self.target_time_s,
                    draft_time_s=self.draft_time_s)


@torch.no_grad()
def ragged_forward(model: Transformer, cache: KVCache, rows: list[list[int]],
                   starts: list[int]) -> Tensor:
    """Row b feeds tokens rows[b] at positions starts[b].. (padded on the right with
    token 0 at the following positions) -> logits [B, W, V]. Only the first len(rows[b])
    outputs of a row mean anything."""
    tokens, positions = padded_rows(rows, starts, max(map(len, rows)), cache.k.device)  # [B, W] each
    return model(tokens, positions, cache).logits


# ---------------------------------------------------------------------------------------
# Proposers: `propose(seqs, gammas, params, seeds) -> tokens per row`
# ---------------------------------------------------------------------------------------

class DraftProposer:
    """A smaller model with the same vocabulary draws γ tokens from its own warped
    distribution with each row's noise for those positions, keeping its own KV cache
    between rounds."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int):
        self.model = model
        param = next(model.parameters())
        self.cache = KVCache(model.cfg, batch_size, max_len, param.device, param.dtype)
        self.valid = [0] * batch_size  # cache slots that agree with each sequence
        self.stats: SpeculativeStats | None = None

    def _forward(self, rows: list[list[int]], starts: list[int]) -> Tensor:
        synchronize(self.cache.k.device)
        start = time.perf_counter()
        logits = ragged_forward(self.model, self.cache, rows, starts)
        synchronize(self.cache.k.device)
        if self.stats is not None:
            self.stats.draft_forwards += 1
            self.stats.draft_time_s += time.perf_counter() - start
        return logits

    def propose(self, seqs: list[list[int]], gammas: list[int], params: SamplingParams,
                seeds: list[int]) -> list[list[int]]:
        if max(gammas) == 0:
            return [[] for _ in seqs]
        rows = [s[v:] for s, v in zip(seqs, self.valid)]
        logits = self._forward(rows, self.valid)  # [B, W, V]
        last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
        logits = logits[torch.arange(len(rows), device=logits.device), last]  # [B, V]
        tokens: list[list[int]] = [[] for _ in seqs]
        for i in range(max(gammas)):
            drawn = [block[0] for block in draw_tokens(list(logits[:, None]), [params] * len(seqs), seeds,
                                                       [len(seq) + i for seq in seqs])]  # [B]
            for b, g in enumerate(gammas):
                if i < g:
                    tokens[b].append(drawn[b])
            if i + 1 < max(gammas):
                positions = [len(s) + i for s in seqs]
                logits = self._forward([[t] for t in drawn], positions)[:, 0]  # [B, V]
        self.valid = [len(s) + max(g - 1, 0) for s, g in zip(seqs, gammas)]
        return tokens

    def accepted(self, row: int, valid: int) -> None:
        """Row `row` now agrees with the sequence up to `valid` tokens."""
        self.valid[row] = min(self.valid[row], valid)

    def keep(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)
        self.valid = [self.valid[r] for r in rows]


def repeat_continuation(seq: list[int], gamma: int, max_ngram: int, min_ngram: int) -> list[int]:
    """Up to `gamma` tokens that followed the latest earlier occurrence of the longest tail
    of `seq` (between `min_ngram` and `max_ngram` tokens) that occurs earlier; [] if none.
    One backward pass: every earlier place of the last token, extended leftwards."""
    best, best_len = -1, min_ngram - 1
    last = len(seq) - 1
    for end in range(last - 1, -1, -1):  # latest first; `end` is where the match ends
        if seq[end] != seq[last]:
            continue
        n = 1
        while n < max_ngram and n <= end and seq[end - n] == seq[last - n]:
            n += 1
        if n > best_len:
            best, best_len = end, n
            if n == max_ngram:
                break
    return seq[best + 1:best + 1 + gamma] if best >= 0 else []


class PromptLookupProposer:
    """Draft-free: find the latest earlier occurrence of the last n tokens (n from
    `max_ngram` down to `min_ngram`) and propose what followed it. Costs no model; pays off
    on text that repeats itself (code, quoting the prompt)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.stats: SpeculativeStats | None = None

    def lookup(self, seq: list[int], gamma: int) -> list[int]:
        return repeat_continuation(seq, gamma, self.max_ngram, self.min_ngram)

    def propose_row(self, seq: list[int], gamma: int, params: SamplingParams, seed: int) -> list[int]:
        """One request's proposals (the n-gram draft's sampled ones use params and seed)."""
        return self.lookup(seq, gamma)

    def propose(self, seqs, gammas, params, seeds):
        return [self.propose_row(s, g, params, seed) for s, g, seed in zip(seqs, gammas, seeds)]

    def accepted(self, row: int, valid: int) -> None:
        pass

    def keep(self, rows: list[int]) -> None:
        pass


# ---------------------------------------------------------------------------------------
# Verification: the accept / reject rule for one sequence
# ---------------------------------------------------------------------------------------

def accept(proposals: list[int], draws: list[int]) -> tuple[list[int], int]:
    """proposals (γ) and the target's own draws (γ + 1) for the same positions
    (moe.serving.sampling.draw_tokens, all rows of a step at once) -> (new tokens, number
    of proposals accepted): proposals pass while they equal the target's draw; the first
    one that does not is replaced by the draw, and when all pass the draw after them is
    added. Greedy and sampled requests alike: a greedy draw is the argmax."""
    n_ok = 0
    while n_ok < len(proposals) and proposals[n_ok] == draws[n_ok]:
        n_ok += 1
    return proposals[:n_ok] + [draws[n_ok]], n_ok


def coupled_acceptance(p: Tensor, q: Tensor) -> Tensor:
    """p, q [N, V] (target and draft distributions at N positions) -> [N]: the chance that
    the draft's draw equals the target's when both draw with the same noise, the rule
    above. Both draw x (argmax p / E and argmax q / E, E exponential) when every other E_y
    exceeds E_x max(p_y / p_x, q_y / q_x); integrated over E_x that is
    1 / sum_y max(p_y / p_x, q_y / q_x). The larger ratio is p's where p_y / q_y >= p_x / q_x,
    so with the tokens sorted by p / q the sum is (p's mass ranked at or above x) / p_x +
    (q's mass ranked below x) / q_x: two cumulative sums instead of V x V ratios. (The
    rejection rule of Leviathan et al. accepts with probability sum_x min(p_x, q_x), which
    bounds this from above.)"""
    p, q = p.double(), q.double()
    ratio = torch.where(q > 0, p / q.clamp(min=1e-300), torch.where(p > 0, torch.inf, 0.0))  # [N, V]
    order = ratio.argsort(dim=-1, descending=True)
    ps, qs = p.gather(-1, order), q.gather(-1, order)  # [N, V], by falling p / q
    p_above = ps.cumsum(-1)  # p_y summed over y ranked at or above x
    q_below = qs.sum(-1, keepdim=True) - qs.cumsum(-1)  # q_y summed over y ranked below x
    both = (ps > 0) & (qs > 0)  # a token one side never draws adds 0
    total = p_above / ps.where(both, 1.0) + q_below / qs.where(both, 1.0)
    return (both / total).sum(-1)


# ---------------------------------------------------------------------------------------
# The decoding loop
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def speculative_generate(target: Transformer, prompts: list[list[int]], params: SamplingParams,
                         proposer=None, draft: Transformer | None = None, gamma: int = 4,
                         adaptive: bool = False, max_gamma: int = 16,
                         stats: SpeculativeStats | None = None, detok: Detokenizer = BYTES,
                         on_tokens: Callable[[int, list[int]], None] | None = None,
                         compile: bool = False, compiled_steps: dict | None = None
                         ) -> tuple[list[list[int]], SpeculativeStats]:
    """The new tokens of each prompt, decoded speculatively, and the run's statistics.
    Give a `draft` model or a `proposer` (e.g. PromptLookupProposer()). With `adaptive`, γ
    grows by one after a round where every proposal passed and shrinks by one after a
    rejection (between 1 and `max_gamma`). `on_tokens(row, tokens)` is called with each
    round's kept tokens as soon as they are known (generate.py streams them). With
    `compile`, the target's verify forward is one compiled graph (moe/serving/static_decode.py,
    VerifyStep): the prompts are prefilled eagerly but for their last token, then every
    round feeds each row γ + 1 tokens (max_gamma + 1 when adaptive), finished rows as
    padding; a draft model's own steps stay eager. A graph takes seconds to compile: pass
    the same `compiled_steps` dict (one per target) to later calls of the same batch size,
    γ and length (prompt + max_new_tokens) to reuse it."""
    cfg = target.cfg
    if gamma < 1:
        raise ValueError(f"gamma (tokens proposed per round) must be at least 1, got {gamma}")
    if not prompts:
        raise ValueError("no prompts: give at least one")
    for prompt in prompts:
        check_request(cfg, prompt, params)
    if (draft is None) == (proposer is None):
        raise ValueError("give exactly one of draft= (a model) or proposer= (e.g. PromptLookupProposer())")
    slack = max(max_gamma, gamma) + max(len(p) for p in prompts) + 1  # room for right padding
    if draft is not None:
        if draft.cfg.vocab_size != cfg.vocab_size:
            raise ValueError(f"draft vocab_size {draft.cfg.vocab_size} differs from the target's "
                             f"{cfg.vocab_size}; the draft must share the tokenizer")
        proposer = DraftProposer(draft, len(prompts), cfg.max_seq_len + slack)
    stats = stats or SpeculativeStats()
    proposer.stats = stats
    param = next(target.parameters())
    verify = None
    if compile:  # the cache keeps every row (one graph, one batch size); finished rows feed padding
        width = 1 + (max(max_gamma, gamma) if adaptive else gamma)
        # a row's sequence stays under `longest` tokens, so its positions under longest - 1 + width
        longest = min(cfg.max_seq_len, max(map(len, prompts)) + params.max_new_tokens)
        key = (len(prompts), width, longest + width)
        steps = {} if compiled_steps is None else compiled_steps
        if key not in steps:  # the compiled attention reads every slot: size the cache to the calls
            steps[key] = VerifyStep(target, KVCache(cfg, len(prompts), longest + width, param.device, param.dtype),
                                    width)
        verify = steps[key]
        cache = verify.cache
    else:
        cache = KVCache(cfg, len(prompts), cfg.max_seq_len + slack, param.device, param.dtype)
    seeds = [draw_seed(params) for _ in prompts]  # each row its own draws (the same seed: the same draws)

    seqs = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # original index of each live row
    valid = [0] * len(prompts)  # by original index: target cache slots that agree with the sequence
    if verify is not None:
        if max(map(len, prompts)) > 1:
            ragged_forward(target, cache, [p[:-1] for p in prompts], valid)
            valid = [len(p) - 1 for p in prompts]
    while active:
        rows = [seqs[i] for i in active]
        room = [min(cfg.max_seq_len - len(s) - 1, params.max_new_tokens - len(outputs[i]) - 1)
                for s, i in zip(rows, active)]
        gammas = [max(0, min(gamma, r)) for r in room]
        stats.gammas.append(gamma)
        proposals = proposer.propose(rows, gammas, params, [seeds[i] for i in active])

        fed = [s[valid[i]:] + x for s, i, x in zip(rows, active, proposals)]
        synchronize(param.device)
        start = time.perf_counter()
        if verify is not None:
            full, starts = [[] for _ in prompts], [0] * len(prompts)  # finished rows: padding at 0
            for i, tokens in zip(active, fed):
                full[i], starts[i] = tokens, valid[i]
            logits = verify(full, starts)[active]  # [B, W, V]
        else:
            logits = ragged_forward(target, cache, fed, [valid[i] for i in active])  # [B, W, V]
        synchronize(param.device)
        stats.target_time_s += time.perf_counter() - start
        stats.target_calls += 1

        firsts = [len(f) - len(x) - 1 for f, x in zip(fed, proposals)]  # output index predicting the first proposal
        draws = draw_tokens([logits[b, f:f + len(x) + 1] for b, (f, x) in enumerate(zip(firsts, proposals))],
                            [params] * len(active), [seeds[i] for i in active],
                            [len(r) for r in rows])  # [γ_b + 1] per row, one host transfer
        finished, all_passed = [], True
        for b, i in enumerate(active):
            new, n_ok = accept(proposals[b], draws[b])
            stats.record_round(len(proposals[b]), n_ok)
            all_passed &= n_ok == len(proposals[b])
            valid[i] = len(rows[b]) + n_ok
            proposer.accepted(b, len(rows[b]) + n_ok)
            before = len(outputs[i])
            outputs[i] += new
            reason, keep = finish_reason(len(prompts[i]), outputs[i], params, detok,
                                         cfg.max_seq_len, len(new))
            del outputs[i][keep:]
            if on_tokens is not None and len(outputs[i]) > before:
                on_tokens(i, outputs[i][before:])
            seqs[i] = list(prompts[i]) + outputs[i]
            if reason:
                finished.append(b)
        if adaptive:
            gamma = min(gamma + 1, max_gamma) if all_passed else max(gamma - 1, 1)
        if finished:
            kept = [b for b in range(len(active)) if b not in finished]
            if kept:
                if verify is None:
                    cache.keep_rows(kept)
                proposer.keep(kept)
            active = [active[b] for b in kept]
    stats.generated += sum(len(o) for o in outputs)
    return outputs, stats
