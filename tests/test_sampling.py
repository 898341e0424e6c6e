import pytest
import torch

from moe.serving.sampling import SamplingParams, draw_seed, sample_at, warp_probs
from moe.serving.stopping import Detokenizer, check_stop, visible_text
from moe.tokenizer import EOS, encode


def test_greedy_is_one_hot_on_the_first_argmax():
    logits = torch.tensor([[1.0, 3.0, 3.0, -2.0], [0.0, 0.0, 0.0, 5.0]])
    probs = warp_probs(logits, SamplingParams())
    assert probs.dtype == torch.float32
    assert probs.tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]
    assert [sample_at(row, 0, 0) for row in probs] == [1, 3]


def test_temperature_one_is_softmax_and_low_temperature_sharpens():
    logits = torch.randn(3, 11, dtype=torch.float64)
    torch.testing.assert_close(warp_probs(logits, SamplingParams(temperature=1.0)),
                               torch.softmax(logits.float(), -1))
    sharp = warp_probs(logits, SamplingParams(temperature=0.1))
    assert (sharp.max(-1).values > torch.softmax(logits.float(), -1).max(-1).values).all()


def test_top_k_keeps_exactly_the_k_most_likely_renormalised():
    logits = torch.tensor([[0.0, 4.0, 1.0, 3.0, 2.0]])
    probs = warp_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    expected = torch.softmax(torch.tensor([4.0, 3.0]), -1)
    torch.testing.assert_close(probs[0, [1, 3]], expected)
    assert probs[0, [0, 2, 4]].tolist() == [0, 0, 0]


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs_in = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs_in.log()
    # 0.5 alone < 0.7; 0.5 + 0.3 reaches it: keep {0, 2}
    probs = warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(probs[0], torch.tensor([0.5, 0.0, 0.3, 0.0]) / 0.8)
    # a tiny p still keeps the most likely token
    probs = warp_probs(logits, SamplingParams(temperature=1.0, top_p=0.01))
    assert probs[0].tolist() == [1, 0, 0, 0]


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.2, 0.5, 0.3, 0.0])
    draws = torch.tensor([sample_at(probs, seed, 7) for seed in range(20000)])
    counts = torch.bincount(draws, minlength=4)
    torch.testing.assert_close(counts / 20000, probs, atol=0.015, rtol=0)
    assert counts[3] == 0  # a token of probability 0 is never drawn
    along = torch.tensor([sample_at(probs, 1, position) for position in range(20000)])  # one request
    torch.testing.assert_close(torch.bincount(along, minlength=4) / 20000, probs, atol=0.015, rtol=0)


def test_a_draw_depends_on_the_seed_and_the_position_only():
    probs = torch.softmax(torch.randn(50, generator=torch.Generator().manual_seed(0)), -1)
    first = [sample_at(probs, 7, t) for t in range(10)]
    assert first == [sample_at(probs, 7, t) for t in range(10)] and len(set(first)) > 1
    assert first != [sample_at(probs, 8, t) for t in range(10)]
    assert sample_at(torch.nn.functional.one_hot(torch.tensor(3), 50).float(), 7, 0) == 3  # one-hot: its argmax
    assert draw_seed(SamplingParams(seed=5)) == 5
    torch.manual_seed(0)
    unseeded = draw_seed(SamplingParams())
    torch.manual_seed(0)
    assert draw_seed(SamplingParams()) == unseeded != draw_seed(SamplingParams())  # from the global generator


@pytest.mark.parametrize("params, reason", [
    (SamplingParams(temperature=-0.5), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_p=1.5), "top_p"),
    (SamplingParams(top_k=-1), "top_k"),
    (SamplingParams(max_new_tokens=0), "max_new_tokens"),
    (SamplingParams(stop=("",)), "stop"),
])
def test_bad_settings_are_named(params, reason):
    assert reason in params.invalid_reason()


def test_good_settings_pass():
    assert SamplingParams(temperature=0.7, top_k=5, top_p=0.9, stop=("\n",)).invalid_reason() is None


def test_stop_on_eos_unless_ignored():
    generated = encode("ab") + [EOS]
    assert check_stop(generated, SamplingParams()) == ("eos", 3)
    assert check_stop(generated, SamplingParams(ignore_eos=True)) == (None, 3)


def test_stop_after_max_new_tokens():
    assert check_stop(encode("abc"), SamplingParams(max_new_tokens=3)) == ("length", 3)
    assert check_stop(encode("ab"), SamplingParams(max_new_tokens=3)) == (None, 2)


def test_stop_string_completing_anywhere_in_the_new_tokens():
    params = SamplingParams(stop=("END", "\n\n"))
    assert check_stop(encode("xxEN"), params) == (None, 4)
    assert check_stop(encode("xxEND"), params) == ("stop", 5)
    # several tokens appended at once (speculative decoding): keep up to the stop
    assert check_stop(encode("ab\n\ncd"), params, n_new=5) == ("stop", 4)
    assert visible_text(encode("xxEND"), params) == "xx"
    assert visible_text(encode("xx") + [EOS], params) == "xx"


def test_stop_on_the_tokenizers_own_eos_id():
    params, detok = SamplingParams(), Detokenizer(eos_id=7)
    assert check_stop([5, 7, 9], params, n_new=3, detok=detok) == ("eos", 2)
    assert check_stop([EOS], params, detok=detok) == (None, 1)  # our byte EOS is an ordinary id here
    assert check_stop([EOS], params, detok=Detokenizer(eos_id=None)) == (None, 1)


def test_stop_string_completing_inside_a_token_of_another_tokenizer():
    words = ["ab", "c\n\nd", "e"]  # a tokenizer whose tokens are these strings
    params = SamplingParams(stop=("\n\n",))
    detok = Detokenizer(decode=lambda ids: "".join(words[i] for i in ids))
    assert check_stop([0], params, detok=detok) == (None, 1)
    assert check_stop([0, 1, 2], params, n_new=3, detok=detok) == ("stop", 2)
    assert visible_text([0, 1], params, detok) == "abc"


def test_any_of_several_eos_ids_ends_generation():
    detok = Detokenizer(eos_id=(7, 11))
    assert check_stop([5, 11, 9], SamplingParams(), n_new=3, detok=detok) == ("eos", 2)
    assert check_stop([5, 7], SamplingParams(), n_new=2, detok=detok) == ("eos", 2)
    assert check_stop([5, 9], SamplingParams(), n_new=2, detok=detok) == (None, 2)
