"""A generation request, and whether one can be served: the one place that says so.

Why one place: the engine refuses a bad request with a reason and goes on serving the
others, while one-request generation (moe/serving/generation.py), static batching and
speculative_generate raise; all of them ask `refusal_reason`, so each cause has one
message that names the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field


from moe.config import ModelConfig
from moe.serving.sampling import SamplingParams
from moe.serving.stopping import BYTES, Detokenizer, visible_text


@dataclass
class Request:
    request_id: int
    prompt: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    detok: Detokenizer = BYTES  # the tokenizer's end: EOS id, ids -> text
    output: list[int] = field(default_factory=list)
    status: str = "waiting"  # waiting | running | finished | refused | aborted | failed
    finish_reason: str | None = None  # eos | stop | length | refused | abort | error
    refusal: str | None = None  # why a refused (or failed) request was refused
    logprobs: list[tuple[float, dict[int, float]]] = field(default_factory=list)  # per output token,
    # with params.logprobs: (its log-probability, the top-n ids -> log-probabilities)
    num_cached: int = 0  # tokens whose K/V are in the cache
    preemptions: int = 0
    first_token_time: float | None = None
    finish_time: float | None = None
    token_times: list[float] = field(default_factory=list)
    seed: int = 0  # where its random draws come from (moe/serving/sampling.py: draw_seed, sample_at)

    @property
    def tokens(self) -> list[int]:
        """prompt + output: a new list each time; a step needs `length` or `token_range`."""
        return self.prompt + self.output

    @property
    def length(self) -> int:
        """len(tokens), without building it."""
        return len(self.prompt) + len(self.output)

    def token_range(self, start: int, stop: int) -> list[int]:
        """tokens[start:stop], copying only those (a decode step reads one token, not the
        whole sequence)."""
        n = len(self.prompt)
        if start >= n:
            return self.output[start - n:stop - n]
        return self.prompt[start:stop] + self.output[:max(0, stop - n)]

    @property
    def text(self) -> str:
        return visible_text(self.output, self.params, self.detok)


def refusal_reason(cfg: ModelConfig, prompt: list[int], params: SamplingParams,
                   pool_tokens: int | None = None) -> str | None:
    """Why a request cannot be served, or None. `pool_tokens`: what the whole KV pool holds."""
    if not prompt:
        return "empty prompt: give at least one token"
    not_ids = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool)]
    if not_ids:
        return f"token ids must be integers, got {not_ids[:5]}"
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


def check_request(cfg: ModelConfig, prompt: list[int], params: SamplingParams) -> None:
    """Raise ValueError with `refusal_reason`'s message when the request cannot be served."""
    problem = refusal_reason(cfg, prompt, params)
    if problem:
        raise ValueError(problem)
