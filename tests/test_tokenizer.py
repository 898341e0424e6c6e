import os

from moe.tokenizer import BOS, EOS, VOCAB_SIZE, decode, decode_bytes, encode
from moe.config import ModelConfig


def test_any_text_round_trips_exactly():
    text = "héllo, wörld — 你好 🙂\n\tdef f(x): return x"
    ids = encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS
    assert decode(ids) == text


def test_any_bytes_round_trip_exactly():
    data = os.urandom(512) + b"\xff\xfe\x80"
    assert decode_bytes(encode(data)) == data


def test_vocab_matches_the_default_model_config():
    assert ModelConfig().vocab_size == VOCAB_SIZE
