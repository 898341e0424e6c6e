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


@torch.no_grad()
def test_the_dense_and_gathered_dispatches_equal_the_sorted_one():
    from kernels.moe_dispatch import dispatch_and_combine, dispatch_dense, dispatch_gathered
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 16, generator=g)
    w_in, w_out = torch.randn(4, 16, 24, generator=g), torch.randn(4, 12, 16, generator=g)  # E = 4, F = 12
    ids = torch.tensor([[0, 3], [3, 0], [1, 2], [2, 1], [0, 1]])
    weights = torch.rand(5, 2, generator=g)
    expected, _ = dispatch_and_combine(x, ids, weights, w_in, w_out, None)
    for dispatch in (dispatch_dense, dispatch_gathered):
        got, dropped = dispatch(x, ids, weights, w_in, w_out)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert dropped == 0


@torch.no_grad()
def test_the_compiled_decode_step_generates_what_eager_does(make_model):
    # fullgraph=True: a graph break (a host sync, a data-dependent branch) fails the compile
    torch._dynamo.reset()
    model = make_model(seed=2, n_kv_heads=2)
    prompt, params = [7, 3, 99, 12], SamplingParams(max_new_tokens=12, ignore_eos=True)
    assert generate(model, prompt, params, compile=True) == generate(model, prompt, params)
