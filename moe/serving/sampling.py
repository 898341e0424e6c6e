"""Sampling: turn the logits of the last position into the next token, and decide when to stop.

Why split into `warp_probs` and `sample`: the warped distribution is a value of its own.
Speculative decoding needs the target's and the draft's probabilities to accept or reject
a proposal exactly, and tests can compare distributions; `sample` then only draws.

Warping order (as in Hugging Face and vLLM): temperature, then top-k, then top-p (nucleus).
Temperature 0 means greedy: the distribution is one-hot on the argmax (the first index on
ties), so greedy decoding and speculative verification share one code path.

Randomness is per request: each request may carry a `seed`, and the engine gives it its own
`torch.Generator`, so a request samples the same tokens whatever else is in the batch.

Stopping: on the tokenizer's EOS id (unless `ignore_eos`), on a stop string in the generated
text, or after `max_new_tokens`. With our byte-level tokenizer (`decode` None) a stop string
can only complete on the token just appended, and the check is exact on bytes; with another
tokenizer (`decode` given, see moe/serving/text.py) a token may complete one mid-token, so the text
of all generated tokens is searched. `check_stop` looks at every token appended in a step,
so it also serves speculative decoding, which appends several at once.

Shapes: N rows (requests), V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from moe.tokenizer import EOS, decode_bytes


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    max_new_tokens: int = 64  # generated tokens, EOS included
    stop: tuple[str, ...] = ()  # generation ends once the text holds one of these
    seed: int | None = None  # per-request generator seed; None = the global generator
    ignore_eos: bool = False  # keep going past EOS (benchmarks with controlled lengths)
    eos_id: int | None = EOS  # the tokenizer's end-of-sequence id; None = it has none
    decode: Callable[[list[int]], str] | None = None  # the tokenizer's ids -> text; None = bytes

    def invalid_reason(self) -> str | None:
        """Why these settings cannot be used, or None when they can."""
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


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """probs [N, V] -> token ids [N] int64, one draw per row (a one-hot row gives its argmax)."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator of the request's own, when it asked for a seed."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


# ---------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------

def check_stop(generated: list[int], params: SamplingParams, n_new: int = 1) -> tuple[str | None, int]:
    """Look at the last `n_new` tokens of `generated` in order; return (finish reason, number
    of tokens to keep). Reasons: "eos", "stop" (a stop string completed), "length";
    None = keep going (and keep all). The token that finished a request is kept."""
    for i in range(len(generated) - n_new, len(generated)):
        if generated[i] == params.eos_id and not params.ignore_eos:
            return "eos", i + 1
        if params.stop and completes_stop(generated[: i + 1], params):
            return "stop", i + 1
        if i + 1 >= params.max_new_tokens:
            return "length", i + 1
    return None, len(generated)


def completes_stop(generated: list[int], params: SamplingParams) -> bool:
    """Whether the text of `generated` holds a stop string (that of generated[:-1] did not)."""
    if params.decode is None:  # bytes: the stop string ends on the last token
        longest_stop = max(len(s.encode("utf-8")) for s in params.stop)
        window = decode_bytes(generated[-2 * longest_stop:])  # room for special ids
        return any(window.endswith(s.encode("utf-8")) for s in params.stop)
    text = params.decode(generated)
    return any(s in text for s in params.stop)


def visible_bytes(generated: list[int], params: SamplingParams) -> bytes:
    """The bytes a user sees with our byte-level tokenizer: special tokens left out, a final
    stop string cut off."""
    data = decode_bytes(generated)
    for s in params.stop:
        if data.endswith(s.encode("utf-8")):
            return data[: len(data) - len(s.encode("utf-8"))]
    return data


def visible_text(generated: list[int], params: SamplingParams) -> str:
    """The text a user sees: special tokens left out, cut before the first stop string."""
    if params.decode is None:
        return visible_bytes(generated, params).decode("utf-8", errors="replace")
    text = params.decode(generated)
    return text[:min((text.find(s) for s in params.stop if s in text), default=len(text))]
