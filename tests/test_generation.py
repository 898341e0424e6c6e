import pytest
import torch

from moe.serving.generation import generate
from moe.serving.sampling import SamplingParams


def greedy_by_full_forwards(model, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        logits = model(torch.tensor([tokens])).logits[0, -1]
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


@torch.no_grad()
def test_cached_greedy_equals_greedy_by_repeated_full_forwards(make_model):
    model = make_model(seed=1).double()
    prompt = [5, 17, 200, 3, 42]
    cached = generate(model, prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert cached == greedy_by_full_forwards(model, prompt, 20)


@torch.no_grad()
def test_generation_stops_at_the_context_length(make_model):
    model = make_model(max_seq_len=16)
    out = generate(model, list(range(10)), SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert len(out) == 6


@torch.no_grad()
def test_seeded_sampling_repeats(make_model):
    model = make_model()
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12, seed=3, ignore_eos=True)
    assert generate(model, [1, 2, 3], params) == generate(model, [1, 2, 3], params)


@pytest.mark.parametrize("prompt, params, message", [
    ([], SamplingParams(), "empty"),
    (list(range(64)), SamplingParams(), "max_seq_len"),
    ([1], SamplingParams(temperature=-1.0), "temperature"),
])
def test_bad_requests_are_refused_by_name(make_model, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        generate(make_model(), prompt, params)


def test_the_kv_cache_is_sized_to_the_request_not_the_context(make_model, monkeypatch):
    import moe.serving.generation as generation
    sizes = []
    real = generation.KVCache
    monkeypatch.setattr(generation, "KVCache", lambda cfg, b, n, *a: sizes.append(n) or real(cfg, b, n, *a))
    model = make_model()
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    out = generate(model, [1, 2, 3], params)
    assert sizes == [8] and len(out) == 5  # 3 prompt + 5 new, not max_seq_len = 64
    monkeypatch.setattr(generation, "KVCache", lambda cfg, b, n, *a: real(cfg, b, cfg.max_seq_len, *a))
    assert generate(model, [1, 2, 3], params) == out  # as with a context-sized cache
