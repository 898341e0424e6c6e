"""Causality and the KV cache: cached decoding must reproduce a full forward exactly."""

import pytest
import torch

from moe.model.attention import apply_rope, apply_rope_reference, rope_angles
from moe.serving.cache import KVCache
from tests.conftest import DEVICE


def test_changing_a_future_token_never_changes_past_logits(make_model):
    model = make_model()
    tokens = torch.randint(0, 259, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 259, (2, 8))
    with torch.no_grad():
        before, after = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_prefill_then_decode_with_cache_equals_full_forward(make_model, n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads, moe_every=2)
    tokens = torch.randint(0, 259, (3, 17))
    prompt = 9
    cache = KVCache(model.cfg, batch_size=3)
    positions = torch.arange(17).expand(3, 17)
    with torch.no_grad():
        full = model(tokens).logits
        steps = [model(tokens[:, :prompt], positions[:, :prompt], cache).logits]
        for t in range(prompt, 17):
            steps.append(model(tokens[:, t:t + 1], positions[:, t:t + 1], cache).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_rows_at_different_positions_decode_independently(make_model):
    """Each row of a cached batch may sit at its own length (what batched serving needs)."""
    model = make_model(n_kv_heads=2)
    short, long = torch.randint(0, 259, (1, 5)), torch.randint(0, 259, (1, 11))
    with torch.no_grad():
        expect_short, expect_long = model(short).logits[:, -1], model(long).logits[:, -1]
        cache = KVCache(model.cfg, batch_size=2)
        padded = torch.cat([torch.cat([short[:, :4], short[:, :1].expand(1, 6)], 1), long[:, :10]])
        model(padded, torch.arange(10).expand(2, 10), cache)  # row 0's tail is padding
        last = torch.tensor([[short[0, 4]], [long[0, 10]]])
        out = model(last, torch.tensor([[4], [10]]), cache).logits[:, 0]
    torch.testing.assert_close(out, torch.cat([expect_short, expect_long]), rtol=1e-4, atol=1e-5)


def test_rolling_the_cache_back_forgets_rejected_tokens(make_model):
    model = make_model()
    tokens = torch.randint(0, 259, (1, 12))
    with torch.no_grad():
        expect = model(tokens).logits[:, -1]
        cache = KVCache(model.cfg, batch_size=1)
        model(torch.randint(0, 259, (1, 12)), torch.arange(12)[None], cache)  # wrong guesses
        model(tokens[:, :11], torch.arange(11)[None], cache)  # overwrite from position 0
        got = model(tokens[:, 11:], torch.tensor([[11]]), cache).logits[:, -1]
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_cache_refuses_positions_past_its_end(make_model):
    model = make_model()
    cache = KVCache(model.cfg, batch_size=1, max_len=8)
    with pytest.raises(ValueError, match="outside this cache of 8 slots"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[8]]), cache)


def test_rope_is_a_rotation_whose_dot_products_depend_on_offset_only():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        rq = apply_rope(q, *rope_angles(torch.tensor([[pq]]), 16, 10000.0))
        rk = apply_rope(k, *rope_angles(torch.tensor([[pk]]), 16, 10000.0))
        return (rq * rk).sum()

    rotated = apply_rope(q, *rope_angles(torch.tensor([[7]]), 16, 10000.0))
    torch.testing.assert_close(rotated.norm(), q.norm())
    torch.testing.assert_close(score(5, 2), score(13, 10), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_its_gradient_equal_the_chunk_and_cat_reference(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 7, 16, generator=gen).to(dtype)
    grad = torch.randn(3, 2, 7, 16, generator=gen).to(dtype)
    cos, sin = rope_angles(torch.randint(0, 50, (3, 7), generator=gen), 16, 10000.0)
    x, grad, cos, sin = (t.to(DEVICE) for t in (x, grad, cos, sin))  # on the GPU in gpu_check.sh
    outs, grads = [], []
    for fn in (apply_rope, apply_rope_reference):
        leaf = x.clone().requires_grad_()
        out = fn(leaf, cos, sin)
        out.backward(grad)
        outs.append(out)
        grads.append(leaf.grad)
    assert outs[0].dtype == dtype and grads[0].dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    torch.testing.assert_close(grads[0], grads[1], **tol)
