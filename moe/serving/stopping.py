"""When a request is finished, and what text it shows: the one place for both.

Why apart from sampling: `SamplingParams` is what a user sets (temperature, stop strings,
max_new_tokens), while ending on EOS, finding a stop string and turning ids into text
depend on the tokenizer. A request carries a `Detokenizer` (the tokenizer's EOS id and, for
a tokenizer other than ours, its ids -> text), and every generation path (the engine,
the speculative engine, static batching, one-request streaming, speculative_generate)
asks `finish_reason` whether it is done.

Stopping: on the tokenizer's EOS id (unless `ignore_eos`), on a stop string in the
generated text, after `max_new_tokens`, or when the sequence fills the context. With our
byte-level tokenizer (`decode` None) a stop string can only complete on the token just
appended, and the check is exact on bytes; with another tokenizer (`decode` given, see
moe/serving/text.py) a token may complete one mid-token, so the text of all generated
tokens is searched. The checks look at every token appended in a step, so they also serve
speculative decoding, which appends several at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moe.serving.sampling import SamplingParams
from moe.tokenizer import EOS, decode_bytes


@dataclass(frozen=True)
class Detokenizer:
    """What a request needs of its tokenizer to end and to show text."""

    eos_id: int | tuple[int, ...] | None = EOS  # the end-of-sequence id, or several (any ends)
    decode: Callable[[list[int]], str] | None = None  # ids -> text; None = our bytes

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_id is None:
            return ()
        return self.eos_id if isinstance(self.eos_id, tuple) else (self.eos_id,)


BYTES = Detokenizer()  # our byte-level tokenizer


def check_stop(generated: list[int], params: SamplingParams, n_new: int = 1,
               detok: Detokenizer = BYTES) -> tuple[str | None, int]:
    """Look at the last `n_new` tokens of `generated` in order; return (finish reason, number
    of tokens to keep). Reasons: "eos", "stop" (a stop string completed), "length";
    None = keep going (and keep all). The token that finished a request is kept."""
    eos_ids = detok.eos_ids
    for i in range(len(generated) - n_new, len(generated)):
        if generated[i] in eos_ids and not params.ignore_eos:
            return "eos", i + 1
        if params.stop and completes_stop(generated[: i + 1], params, detok):
            return "stop", i + 1
        if i + 1 >= params.max_new_tokens:
            return "length", i + 1
    return None, len(generated)


def finish_reason(prompt_len: int, generated: list[int], params: SamplingParams,
                  detok: Detokenizer, max_seq_len: int, n_new: int = 1) -> tuple[str | None, int]:
    """`check_stop`, and "length" once prompt + kept tokens fill the context window."""
    reason, keep = check_stop(generated, params, n_new, detok)
    if reason is None and prompt_len + keep >= max_seq_len:
        reason = "length"
    return reason, keep


def completes_stop(generated: list[int], params: SamplingParams, detok: Detokenizer = BYTES) -> bool:
    """Whether the text of `generated` holds a stop string (that of generated[:-1] did not)."""
    if detok.decode is None:  # bytes: the stop string ends on the last token
        longest_stop = max(len(s.encode("utf-8")) for s in params.stop)
        window = decode_bytes(generated[-2 * longest_stop:])  # room for special ids
        return any(window.endswith(s.encode("utf-8")) for s in params.stop)
    text = detok.decode(generated)
    return any(s in text for s in params.stop)


def visible_bytes(generated: list[int], params: SamplingParams) -> bytes:
    """The bytes a user sees with our byte-level tokenizer: special tokens left out, a final
    stop string cut off."""
    data = decode_bytes(generated)
    for s in params.stop:
        if data.endswith(s.encode("utf-8")):
            return data[: len(data) - len(s.encode("utf-8"))]
    return data


def visible_text(generated: list[int], params: SamplingParams, detok: Detokenizer = BYTES) -> str:
    """The text a user sees: special tokens left out, cut before the first stop string."""
    if detok.decode is None:
        return visible_bytes(generated, params).decode("utf-8", errors="replace")
    text = detok.decode(generated)
    return text[:min((text.find(s) for s in params.stop if s in text), default=len(text))]
