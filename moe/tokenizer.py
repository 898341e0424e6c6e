"""Our tokenizers: bytes, and a byte-level BPE learned on the training split, with one id layout.

Why bytes: no vocabulary file to download or train, every string (and every byte
sequence, valid UTF-8 or not) round-trips exactly, and a draft model for speculative
decoding shares the vocabulary by construction. The price is long sequences: a model
that reads 128 bytes of Python sees two lines, and one that predicts a byte at a time
spends a whole forward on the `f` after `sel`.

Why a learned BPE beside it: merging frequent byte pairs (Sennrich et al., 2016; GPT-2's
byte-level variant, Radford et al., 2019) makes a token about three bytes of Python, so
the same context and the same FLOPs cover three times the text. It is learned on the
training split only (validation text never shapes the vocabulary) with the `tokenizers`
library and saved as `tokenizer.json` beside the data and in every checkpoint.

One id layout for both: ids 0..255 are the 256 bytes, BOS/EOS/PAD are 256/257/258 and a
BPE's merged tokens follow from 259. The byte tokenizer is the BPE with no merges, so
the special ids, the data files (uint16) and everything that stops on EOS or pads with
PAD are the same whichever tokenizer a run uses. Bits per byte (moe/training/loop.py)
is the one measure across them: `token_bytes` says how many bytes each id stands for.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>")  # ids BOS, EOS, PAD in a learned tokenizer
TOKENIZER_FILE = "tokenizer.json"


def encode(text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return ([BOS] if bos else []) + list(data) + ([EOS] if eos else [])


def decode_bytes(ids) -> bytes:
    """The bytes of `ids`, special ids left out."""
    return bytes(i for i in ids if 0 <= i < 256)


def decode(ids) -> str:
    """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (use decode_bytes for exact)."""
    return decode_bytes(ids).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------
# The learned byte-level BPE
# ---------------------------------------------------------------------------------------

def byte_symbols() -> list[str]:
    """The printable character byte-level BPE writes for each byte (GPT-2's convention:
    printable Latin-1 bytes stand for themselves, the others are shifted past 255), so
    merges are between visible symbols and no byte is lost to whitespace handling."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE of `vocab_size` ids learned on `texts`, in our id layout (module
    docstring). Returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= VOCAB_SIZE:
        raise ValueError(f"a BPE needs more than the {VOCAB_SIZE} byte and special ids; got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=byte_symbols(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return _renumbered(tok)


def _renumbered(tok):
    """The same tokenizer with ids laid out as ours: bytes by value, then the specials, then
    the merged tokens in the order they were learned. Merges are stored as pairs of
    strings, so only the id of each token changes."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]  # token -> id as trained
    new = {symbol: byte for byte, symbol in enumerate(byte_symbols())}
    new.update({token: VOCAB_SIZE - len(SPECIAL_TOKENS) + i for i, token in enumerate(SPECIAL_TOKENS)})
    for token in sorted(vocab, key=vocab.get):
        if token not in new:
            new[token] = len(new)
    data["model"]["vocab"] = new
    for added in data["added_tokens"]:
        added["id"] = new[added["content"]]
    return Tokenizer.from_str(json.dumps(data))


def load_bpe(path: str | Path):
    """The `tokenizers.Tokenizer` saved at `path` (a tokenizer.json), checked to follow our layout."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    ids = [tok.token_to_id(token) for token in SPECIAL_TOKENS]
    if ids != [BOS, EOS, PAD]:
        raise ValueError(f"{path} is not one of our tokenizers: its special tokens {SPECIAL_TOKENS} have ids "
                         f"{ids}, not {[BOS, EOS, PAD]}; train it with moe.tokenizer.train_bpe")
    return tok


def token_bytes(tok=None) -> np.ndarray:
    """[V] how many bytes of text each id stands for (0 for the special ids); `tok` a
    tokenizers.Tokenizer from train_bpe, None for the byte tokenizer."""
    if tok is None:
        return np.array([1] * 256 + [0] * (VOCAB_SIZE - 256), dtype=np.int64)
    lengths = np.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if token not in SPECIAL_TOKENS:
            lengths[i] = len(token)  # one symbol per byte (byte_symbols)
    return lengths
