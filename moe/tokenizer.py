"""Byte-level tokenizer: a token is a byte of the UTF-8 text, plus three special ids.

Why bytes: no vocabulary file to download or train, every string (and every byte
sequence, valid UTF-8 or not) round-trips exactly, and a draft model for speculative
decoding shares the vocabulary by construction. The price is longer sequences than BPE.
"""

from __future__ import annotations

BOS, EOS, PAD = 256, 257, 258
VOCAB_SIZE = 259


def encode(text: str | bytes, bos: bool = False, eos: bool = False) -> list[int]:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return ([BOS] if bos else []) + list(data) + ([EOS] if eos else [])


def decode_bytes(ids) -> bytes:
    """The bytes of `ids`, special ids left out."""
    return bytes(i for i in ids if 0 <= i < 256)


def decode(ids) -> str:
    """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (use decode_bytes for exact)."""
    return decode_bytes(ids).decode("utf-8", errors="replace")
