"""Text for generation: which tokenizer turns it into ids and back, and how to stream it.

Why a module of its own: the model only sees ids, but a user types and reads text, and a
checkpoint may bring its own tokenizer. Ours are bytes and a BPE learned by train.py
(moe/tokenizer.py, saved as `tokenizer.json` in every checkpoint); a Hugging Face folder
may hold its own `tokenizer.json`; both are read through the `tokenizers` package.
`TextTokenizer` is what generation needs of any of them: encode,
decode, the special ids, the vocabulary size, and `detokenizer`: what a request carries to
stop on its EOS and check stop strings on its text (moe/serving/stopping.py).

Streaming a general tokenizer: a token is not a fixed piece of text (a byte-level BPE token
may be half of a UTF-8 character, a SentencePiece token may carry the space before a word),
so `text_pieces` decodes everything generated after each token and prints what became
stable: the visible text (stop string cut off) less a trailing U+FFFD (an unfinished
character) and less len(longest stop) - 1 characters that may yet start a stop string.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from moe import tokenizer as byte_tokenizer
from moe.io.checkpoint import resolve_checkpoint
from moe.io.files import CONFIG_FILE
from moe.serving.sampling import SamplingParams
from moe.serving.stopping import BYTES as BYTE_DETOKENIZER
from moe.serving.stopping import Detokenizer, visible_text
from moe.tokenizer import TOKENIZER_FILE

BYTES = "bytes"  # the source of our byte-level tokenizer
CONTEXT_TOKENS = 4  # prompt tokens decoded before the generated ones (see detokenizer)


@dataclass
class TextTokenizer:
    """What generation needs of a tokenizer: text <-> ids, the special ids, the size."""

    encode: Callable[[str], list[int]]  # no special tokens added
    decode: Callable[[list[int]], str]  # special tokens left out
    bos_id: int | None
    eos_id: int | tuple[int, ...] | None  # several: any of them ends generation
    vocab_size: int  # ids are in [0, vocab_size)
    source: str  # BYTES or the tokenizer.json it was read from

    def detokenizer(self, prompt: Sequence[int] = ()) -> Detokenizer:
        """What a request of `prompt` carries to stop on this tokenizer's EOS and check stop
        strings on its text (ours keeps the exact byte check of moe/serving/stopping.py). The
        generated ids are decoded after the prompt's last few tokens: a SentencePiece
        decoder drops the space that starts a text, so "▁sat" alone reads "sat" but reads
        " sat" after "the cat"."""
        if self.source == BYTES:
            return Detokenizer(eos_id=self.eos_id)
        context = list(prompt[-CONTEXT_TOKENS:])
        return Detokenizer(eos_id=self.eos_id, decode=functools.partial(self.decode_after, context))

    def decode_after(self, context: list[int], ids: Sequence[int]) -> str:
        """The text `ids` add after `context`, as it reads inside the whole text."""
        head = self.decode(context)
        whole = self.decode(context + list(ids))
        return whole[len(head):] if whole.startswith(head) else self.decode(list(ids))

    def vocab_problem(self, model_vocab_size: int) -> str | None:
        """Why this tokenizer cannot drive a model with `model_vocab_size` ids, or None."""
        if self.vocab_size <= model_vocab_size:
            return None
        return (f"the tokenizer ({self.source}) has {self.vocab_size} ids but the model's "
                f"vocab_size is {model_vocab_size}, so its ids would index past the embedding; "
                "use the tokenizer the model was trained with (a Mixtral folder's tokenizer.json "
                "is read when the `tokenizers` package is installed: pip install -e .)")


def byte_level() -> TextTokenizer:
    return TextTokenizer(encode=byte_tokenizer.encode, decode=byte_tokenizer.decode,
                         bos_id=byte_tokenizer.BOS, eos_id=byte_tokenizer.EOS,
                         vocab_size=byte_tokenizer.VOCAB_SIZE, source=BYTES)


def load_tokenizer(path: str | Path | None) -> TextTokenizer:
    """The checkpoint's tokenizer.json through the `tokenizers` package when both exist
    (BOS and EOS ids from its config.json, or ours when it names none: a BPE that train.py
    learned, moe/tokenizer.py), else our byte-level tokenizer. `path` may be a run folder."""
    if path is not None:
        path = resolve_checkpoint(path)
    file = Path(path) / TOKENIZER_FILE if path is not None else None
    if file is None or not file.is_file():
        return byte_level()
    try:
        from tokenizers import Tokenizer
    except ImportError:
        warnings.warn(f"{file} is ignored because the `tokenizers` package is missing "
                      "(pip install -e .); using the byte-level tokenizer", stacklevel=2)
        return byte_level()
    tok = Tokenizer.from_file(str(file))
    config_file = Path(path) / CONFIG_FILE
    hf = json.loads(config_file.read_text()) if config_file.is_file() else {}
    ours = [tok.token_to_id(token) for token in byte_tokenizer.SPECIAL_TOKENS] == [
        byte_tokenizer.BOS, byte_tokenizer.EOS, byte_tokenizer.PAD]
    eos = hf.get("eos_token_id", byte_tokenizer.EOS if ours else None)
    return TextTokenizer(
        encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: tok.decode(list(ids), skip_special_tokens=True),
        bos_id=hf.get("bos_token_id", byte_tokenizer.BOS if ours else None), eos_id=one_or_several(eos),
        vocab_size=tok.get_vocab_size(with_added_tokens=True), source=str(file))


class TextStream:
    """The visible text of tokens pushed one at a time, handed out in pieces as it becomes
    stable (see the module docstring); the pieces join to visible_text of all of them.
    Assumes that more tokens never change text already stable, as holds for byte-level and
    SentencePiece-style decoders."""

    def __init__(self, params: SamplingParams, detok: Detokenizer = BYTE_DETOKENIZER):
        self.params, self.detok = params, detok
        self.hold = max((len(s) for s in params.stop), default=1) - 1
        self.generated: list[int] = []
        self.shown = 0

    def push(self, token: int) -> str:
        """The new stable text after `token` ('' when nothing became stable)."""
        self.generated.append(token)
        text = visible_text(self.generated, self.params, self.detok)
        stable = len(text.rstrip("\ufffd")) - self.hold
        if stable <= self.shown:
            return ""
        piece, self.shown = text[self.shown:stable], stable
        return piece

    def finish(self) -> str:
        """The rest of the text, once no token will follow."""
        text = visible_text(self.generated, self.params, self.detok)
        piece, self.shown = text[self.shown:], len(text)
        return piece


def one_or_several(ids: int | list[int] | None) -> int | tuple[int, ...] | None:
    """config.json's eos_token_id: an id, or a list of them (any one ends generation)."""
    if isinstance(ids, list):
        return ids[0] if len(ids) == 1 else (tuple(ids) or None)
    return ids


def text_pieces(tokens: Iterable[int], params: SamplingParams,
                detok: Detokenizer = BYTE_DETOKENIZER) -> Iterator[str]:
    """The visible text of `tokens` (as generated, one at a time), in pieces (TextStream)."""
    stream = TextStream(params, detok)
    for token in tokens:
        piece = stream.push(token)
        if piece:
            yield piece
    yield stream.finish()
