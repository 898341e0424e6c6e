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


CORPUS = ["def add(a, b):\n    return a + b\n", "class Point:\n    def __init__(self, x):\n        self.x = x\n",
          "for i in range(10):\n    print(i)\n"] * 20


def test_a_learned_bpe_keeps_our_ids_and_round_trips_any_text():
    from moe.tokenizer import PAD, SPECIAL_TOKENS, token_bytes, train_bpe
    tok = train_bpe(CORPUS, 300)
    assert tok.get_vocab_size() == 300
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [BOS, EOS, PAD]
    assert [tok.encode(chr(b)).ids for b in (0, 10, 32, 65, 127)] == [[0], [10], [32], [65], [127]]
    text = "héllo, wörld — 你好 🙂\n\tdef f(x):\r\n    return x\x00"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert int(token_bytes(tok)[ids].sum()) == len(text.encode())  # the bytes each id stands for
    merged = tok.encode("    return self.x\n").ids
    assert max(merged) >= VOCAB_SIZE and len(merged) < len("    return self.x\n")  # merges do merge


def test_the_byte_tokenizer_is_the_bpe_without_merges():
    from moe.tokenizer import token_bytes
    lengths = token_bytes()
    assert len(lengths) == VOCAB_SIZE and lengths[:256].tolist() == [1] * 256 and lengths[256:].sum() == 0


def test_a_foreign_tokenizer_json_is_refused_by_name(tmp_path):
    import pytest
    from tokenizers import Tokenizer, models
    from moe.tokenizer import load_bpe
    Tokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not one of our tokenizers"):
        load_bpe(tmp_path / "tokenizer.json")
