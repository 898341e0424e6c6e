"""Sampling: turn the logits of the last position into the next token.

Why split into `warp_probs` and `sample_at`: the warped distribution is a value of its
own. Tests compare distributions with it, and speculative decoding draws the target's and
the draft's tokens from it with shared noise; `sample_at` then only draws. `draw_tokens`
is the batched form every decoding loop uses: all the requests of a step (and all the
positions a verification checks) in one argmax and one transfer to the host.

Warping order (as in Hugging Face and vLLM): temperature, then top-k, then top-p (nucleus).
Temperature 0 means greedy: the distribution is one-hot on the argmax (the first index on
ties), so greedy decoding and speculative verification share one code path.

Randomness is per request and per position: the token drawn for position t of a request
with seed s is `sample_at(probs, s, t)`, the Gumbel-max trick (argmax of log p plus Gumbel
noise; Gumbel, 1954) with noise that depends on (s, t) alone, computed in its
multiplicative form, the exponential race: with E = -log U standard exponential and
G = -log E, argmax(log p + G) = argmax(p / E), the same token for one logarithm where the
additive form takes three (this matters when a verification draws every row of a batch).
So a seeded request samples the same tokens whatever else is in the batch, whatever the
engine's pool and schedule, and under speculative decoding too: there the draft proposes
with the same noise and the target keeps its own draw for each position
(moe/serving/speculative.py). A request without a seed gets a fresh one from torch's
global generator (`draw_seed`).

`SamplingParams` holds what a user sets; when a request ends and what text it shows depend
on the tokenizer too, and live in moe/serving/stopping.py.

Shapes: N rows (requests), V vocab.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from moe.profiling import label



@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    max_new_tokens: int = 64  # generated tokens, EOS included
    stop: tuple[str, ...] = ()  # generation ends once the text holds one of these
    seed: int | None = None  # the request's random draws (sample_at); None = a fresh seed (draw_seed)
    ignore_eos: bool = False  # keep going past EOS (benchmarks with controlled lengths)
    logprobs: int | None = None  # also report each token's log-probability and the top n

    def invalid_reason(self) -> str | None:
        """Why these settings cannot be used, or None when they can. Types are checked too:
        the values may come straight from a JSON request."""
        for key in ("top_k", "max_new_tokens"):
            if not _is_int(getattr(self, key)):
                return f"{key} must be an integer, got {getattr(self, key)!r}"
        for key in ("temperature", "top_p"):
            if isinstance(getattr(self, key), bool) or not isinstance(getattr(self, key), (int, float)):
                return f"{key} must be a number, got {getattr(self, key)!r}"
        if self.seed is not None and not (_is_int(self.seed) and 0 <= self.seed < 2**63):
            return f"seed must be an integer in [0, 2^63), got {self.seed!r}"
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            return f"stop must be a string or a list of strings, got {self.stop!r}"
        if not isinstance(self.ignore_eos, bool):
            return f"ignore_eos must be true or false, got {self.ignore_eos!r}"
        if self.logprobs is not None and not (_is_int(self.logprobs) and 0 <= self.logprobs <= 20):
            return f"logprobs must be an integer in [0, 20] or null, got {self.logprobs!r}"
        if not self.temperature >= 0:
            return f"temperature must be >= 0 (0 = greedy), got {self.temperature}"
        if self.top_k < 0:
            return f"top_k must be >= 0 (0 = off), got {self.top_k}"
        if not 0 < self.top_p <= 1:
            return f"top_p must be in (0, 1] (1 = off), got {self.top_p}"
        if self.max_new_tokens < 1:
            return f"max_new_tokens must be at least 1, got {self.max_new_tokens}"
        if any(not s for s in self.stop):
            return "stop strings must not be empty"
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def warp_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits [..., V] -> float32 probabilities [..., V] after temperature, top-k, top-p."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]  # [..., 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)  # [..., V]
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., V]
        drop_sorted = mass_before >= params.top_p  # the most likely token is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def draw_seed(params: SamplingParams) -> int:
    """The request's seed, or a fresh one from torch's global generator when it set none."""
    if params.seed is not None:
        return params.seed
    return int(torch.randint(0, 2**62, (1,)))


MASK64 = 2**64 - 1


def stream_seed(seed: int, position: int) -> int:
    """A 64-bit seed for (seed, position): splitmix64's finaliser (Steele et al., 2014) over
    seed * golden ratio + position, so neighbouring positions and seeds get unrelated streams."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


@functools.lru_cache(maxsize=256)
def exponential_noise(seed: int, position: int, vocab_size: int) -> Tensor:
    """[V] float64 standard exponential noise E = -log U that depends on (seed, position) only.
    Kept for the last 256 (seed, position) pairs (8 MB at V = 4096), since speculative
    decoding draws each position twice, proposing and verifying: callers must not write
    into it."""
    generator = torch.Generator().manual_seed(stream_seed(seed, position))
    return torch.rand(vocab_size, generator=generator, dtype=torch.float64).clamp_(min=1e-300).log_().neg_()


def sample_at(probs: Tensor, seed: int, position: int) -> int:
    """The token drawn from probs [V] for `position` of the request seeded `seed`:
    argmax(p / E) with E = exponential_noise(seed, position), the Gumbel-max draw
    argmax(log p + G) for G = -log E, which is distributed as p (a one-hot p gives its
    argmax; a zero-probability token is never drawn)."""
    noise = exponential_noise(seed, position, probs.shape[-1]).to(probs.device)
    return int((probs.double() / noise).argmax())


def draw_tokens(scores: list[Tensor], params: list[SamplingParams], seeds: list[int],
                starts: list[int]) -> list[list[int]]:
    """Many requests' draws at once: block b holds logits scores[b] [W_b, V] for positions
    starts[b] .. starts[b] + W_b - 1 of a request with `params[b]` and seed `seeds[b]`;
    its row i becomes that request's token for its position: the argmax when greedy, else
    sample_at's draw from the warped distribution, argmax(p / E(seed, position)). Blocks
    with the same warping are warped and drawn together (one softmax, one division, one
    argmax), and one transfer to the host serves every block, whatever mix of settings the
    requests have (an engine step, a verification, a draft step)."""
    if not scores:
        return []
    with label("sampling"):  # a profiler label (benchmarks/bench_decode.py)
        groups: dict[tuple | None, list[int]] = {}  # warping (None: greedy) -> its blocks
        for b, p in enumerate(params):
            groups.setdefault(None if p.greedy else (p.temperature, p.top_k, p.top_p), []).append(b)
        order, picks = [], []  # blocks in the order their rows enter `picks`; [R_g] argmaxes per group
        for key, blocks in groups.items():
            logits = torch.cat([scores[b] for b in blocks])  # [R_g, V]
            if key is not None:
                noise = torch.stack([exponential_noise(seeds[b], starts[b] + i, logits.shape[-1])
                                     for b in blocks for i in range(len(scores[b]))])  # [R_g, V]
                logits = warp_probs(logits, params[blocks[0]]).double() / noise.to(logits.device)
            order += blocks
            picks.append(logits.argmax(dim=-1))
        flat = torch.cat(picks).tolist()
    drawn, at = [None] * len(scores), 0
    for b in order:
        drawn[b], at = flat[at:at + len(scores[b])], at + len(scores[b])
    return drawn
