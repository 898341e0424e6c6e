"""The Triton attention kernels against their references (kernels/attention.py), compiled
on a CUDA GPU when one is present and otherwise on CPU through TRITON_INTERPRET=1 (both
set up in tests/conftest.py), and the whole model's logits with kernel_backend = "triton"
against "torch"."""

import pytest
import torch

pytest.importorskip("triton", reason="triton does not import here; the kernels cannot run")

import kernels.ops as ops  # noqa: E402
from kernels.attention import (paged_attention_batched, paged_attention_reference,  # noqa: E402
                               paged_attention_triton, paged_decode_triton, paged_layout,
                               paged_prefill_triton, varlen_causal_attention_reference,
                               varlen_causal_attention_triton)
from moe.serving.blocks import BlockManager  # noqa: E402
from moe.serving.cache import PagedKVCache  # noqa: E402
from tests.conftest import DEVICE, needs_compiled_triton, relative_error  # noqa: E402

H = 4


def packed(lens, n_kv_heads, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q = torch.randn(n, H, head_dim, generator=gen)
    k = torch.randn(n, n_kv_heads, head_dim, generator=gen)
    v = torch.randn(n, n_kv_heads, head_dim, generator=gen)
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k, v, cu_seqlens))


@pytest.mark.parametrize("lens", [[1], [33], [222], [33, 5, 1, 0, 17]],
                         ids=["one", "33", "222", "ragged"])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_varlen_causal_kernel_equals_reference(lens, n_kv_heads):
    head_dim = 24 if n_kv_heads == 2 else 16  # 24: not a power of two
    q, k, v, cu_seqlens = packed(lens, n_kv_heads, head_dim)
    out = varlen_causal_attention_triton(q, k, v, cu_seqlens)
    torch.testing.assert_close(out, varlen_causal_attention_reference(q, k, v, cu_seqlens),
                               rtol=1e-5, atol=1e-5)


def test_varlen_sequences_do_not_see_each_other():
    q, k, v, cu_seqlens = packed([9, 7], 2, 16)
    alone = varlen_causal_attention_triton(q[9:], k[9:], v[9:],
                                           torch.tensor([0, 7], dtype=torch.int32, device=DEVICE))
    torch.testing.assert_close(varlen_causal_attention_triton(q, k, v, cu_seqlens)[9:], alone)


def paged_setup(seq_lens, query_lens, n_kv_heads, head_dim, block_size, seed=0):
    """A pool with every sequence's blocks scattered at random, plus spare blocks."""
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-s // block_size) for s in seq_lens) + 1  # one unused column of padding
    n_blocks = len(seq_lens) * width + 3
    k_pool = torch.randn(n_blocks, block_size, n_kv_heads, head_dim, generator=gen)
    v_pool = torch.randn(n_blocks, block_size, n_kv_heads, head_dim, generator=gen)
    tables = torch.randperm(n_blocks, generator=gen)[:len(seq_lens) * width]
    tables = tables.view(len(seq_lens), width).to(torch.int32)  # [B, MB]
    query_start = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    q = torch.randn(sum(query_lens), H, head_dim, generator=gen)
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k_pool, v_pool, tables, seq_lens, query_start))


@pytest.mark.parametrize("seq_lens,query_lens,block_size", [
    ([1], [1], 4),  # a first token
    ([37, 5, 80], [1, 5, 1], 16),  # decode beside a whole prompt
    ([19, 3, 33], [4, 3, 2], 5),  # a few queries each (speculative check), odd block size
    ([600, 70], [1, 3], 16),  # long enough for 64-key steps in the default split
    ([37, 12, 9, 5, 80], [1, 0, 0, 5, 1], 16),  # sequences with no query in the step
], ids=["first-token", "decode", "verify", "long", "idle"])
@pytest.mark.parametrize("n_kv_heads", [1, 2], ids=["MQA", "GQA"])
@pytest.mark.parametrize("split_len", [None, 16], ids=["auto-split", "split16"])
def test_paged_kernel_equals_reference(seq_lens, query_lens, block_size, n_kv_heads, split_len):
    head_dim = 24 if n_kv_heads == 2 else 16
    args = paged_setup(seq_lens, query_lens, n_kv_heads, head_dim, block_size)
    out = paged_decode_triton(*args, split_len=split_len)
    expect = paged_attention_reference(*args)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    # and the serving engine's own reference in moe/serving/cache.py
    torch.testing.assert_close(out, paged_attention_batched(*args),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_lens,query_lens,block_size", [
    ([20], [20], 4),  # a whole prompt in one chunk
    ([100, 9, 61], [37, 1, 18], 5),  # chunks part-way through, beside a decode; odd blocks
    ([64, 40, 0], [16, 40, 0], 16),  # block-aligned chunk, a whole prompt, an idle sequence
], ids=["prompt", "chunks", "aligned"])
@pytest.mark.parametrize("n_kv_heads", [1, 2], ids=["MQA", "GQA"])
@pytest.mark.parametrize("launch", [None, dict(BLOCK_M=16, BLOCK_N=16)], ids=["table", "16x16"])
def test_paged_prefill_kernel_equals_reference(seq_lens, query_lens, block_size, n_kv_heads,
                                               launch):
    head_dim = 24 if n_kv_heads == 2 else 16
    args = paged_setup(seq_lens, query_lens, n_kv_heads, head_dim, block_size, seed=1)
    out = paged_prefill_triton(*args, launch=launch)
    torch.testing.assert_close(out, paged_attention_reference(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("query_lens,kernel", [([1, 15], "decode"), ([1, 16], "prefill")])
def test_paged_entry_point_sends_chunks_to_the_flash_kernel(monkeypatch, query_lens, kernel):
    import kernels.attention as attention
    calls = []
    for name in ("decode", "prefill"):
        original = getattr(attention, f"paged_{name}_triton")
        monkeypatch.setattr(attention, f"paged_{name}_triton",
                            lambda *a, _n=name, _f=original: calls.append(_n) or _f(*a))
    args = paged_setup([30, 40], query_lens, 1, 16, 4)
    out = paged_attention_triton(*args)  # max_query_len read from query_start
    assert calls == [kernel]
    torch.testing.assert_close(out, paged_attention_reference(*args), rtol=1e-5, atol=1e-5)


def test_entry_points_pick_the_kernel_only_when_asked(monkeypatch):
    varlen_calls = count_calls(monkeypatch, ops, "varlen_causal_attention_triton")
    paged_calls = count_calls(monkeypatch, ops, "paged_attention_triton")
    q, k, v, cu_seqlens = packed([5, 3], 1, 16)
    expect = ops.varlen_attention(q, k, v, cu_seqlens, "torch")
    assert not varlen_calls
    torch.testing.assert_close(ops.varlen_attention(q, k, v, cu_seqlens, "triton"), expect)
    assert varlen_calls == [1]
    q, k_pool, v_pool, tables, seq_lens, query_start = paged_setup([7, 12], [2, 1], 1, 16, 4)
    layout = paged_layout([row.tolist() for row in tables.cpu()], [2, 1], [7, 12], 4, DEVICE)
    expect = ops.paged_attention(q, k_pool, v_pool, layout, "torch")
    assert not paged_calls
    torch.testing.assert_close(ops.paged_attention(q, k_pool, v_pool, layout, "triton"), expect)
    assert paged_calls == [1]


def count_calls(monkeypatch, module, name):
    monkeypatch.delenv("MOE_KERNEL_BACKEND", raising=False)  # the tests pick the backend
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_model_logits_with_triton_equal_torch(make_model, monkeypatch, n_kv_heads):
    prefill_calls = count_calls(monkeypatch, ops, "varlen_causal_attention_triton")
    dispatch_calls = count_calls(monkeypatch, ops, "dispatch_and_combine_triton")
    tokens = torch.randint(0, 259, (2, 13), device=DEVICE)
    with torch.no_grad():
        expect = make_model(n_kv_heads=n_kv_heads, kernel_backend="torch").to(DEVICE)(tokens).logits
        assert not prefill_calls and not dispatch_calls
        logits = make_model(n_kv_heads=n_kv_heads, kernel_backend="triton").to(DEVICE)(tokens).logits
    assert prefill_calls and dispatch_calls
    torch.testing.assert_close(logits, expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("first,length", [((9, 6), 11), ((20, 17), 24)],
                         ids=["short-prompts", "chunks-through-flash"])
def test_paged_cache_step_with_triton_equals_full_forward(make_model, monkeypatch, first, length):
    paged_calls = count_calls(monkeypatch, ops, "paged_attention_triton")
    model = make_model(n_kv_heads=2, kernel_backend="triton").to(DEVICE)
    tokens = torch.randint(0, 259, (2, length), device=DEVICE)
    a, b = first
    cache = PagedKVCache(model.cfg, num_blocks=16, block_size=4, device=DEVICE)
    blocks = BlockManager(num_blocks=16, block_size=4)
    for seq in (0, 1):
        blocks.reserve(seq, length)
    with torch.no_grad():
        full = model(tokens).logits  # [2, T, V]
        cache.set_layout(blocks, [0, 1], [a, b], [a, b])  # ragged prefill of a and b tokens
        step = torch.cat([tokens[0, :a], tokens[1, :b]])[None]  # [1, a + b]
        positions = torch.cat([torch.arange(a), torch.arange(b)])[None].to(DEVICE)
        prefill = model(step, positions, cache).logits[0]  # [a + b, V]
        cache.set_layout(blocks, [0, 1], [length - a, length - b], [length, length])  # the rest
        step = torch.cat([tokens[0, a:], tokens[1, b:]])[None]
        positions = torch.cat([torch.arange(a, length), torch.arange(b, length)])[None].to(DEVICE)
        rest = model(step, positions, cache).logits[0]  # [2T - a - b, V]
    assert paged_calls
    torch.testing.assert_close(prefill[:a], full[0, :a], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prefill[a:], full[1, :b], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rest[:length - a], full[0, a:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rest[length - a:], full[1, b:], rtol=1e-4, atol=1e-4)


def test_half_precision_kernels_match_the_float32_reference():
    # float16, not bfloat16: the interpreter's tl.dot multiplies bfloat16 bit patterns
    # (triton-lang/triton#11584), so bfloat16 can only be checked on a GPU.
    q, k, v, cu_seqlens = packed([33, 5], 2, 16)
    out = varlen_causal_attention_triton(q.half(), k.half(), v.half(), cu_seqlens)
    torch.testing.assert_close(out.float(), varlen_causal_attention_reference(q, k, v, cu_seqlens),
                               rtol=1e-2, atol=1e-2)
    q, k_pool, v_pool, *layout = paged_setup([37, 5], [1, 5], 2, 16, 4)
    out = paged_decode_triton(q.half(), k_pool.half(), v_pool.half(), *layout, split_len=16)
    torch.testing.assert_close(out.float(), paged_attention_reference(q, k_pool, v_pool, *layout),
                               rtol=1e-2, atol=1e-2)


@needs_compiled_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_kv_heads", [1, 4], ids=["MQA", "MHA"])
def test_half_precision_kernels_are_within_rounding_of_a_float64_reference(dtype, n_kv_heads):
    q, k, v, cu_seqlens = (t.to(dtype) if t.is_floating_point() else t
                           for t in packed([300, 77, 1], n_kv_heads, 64, seed=3))
    out = varlen_causal_attention_triton(q, k, v, cu_seqlens)
    expect = varlen_causal_attention_reference(q.double(), k.double(), v.double(), cu_seqlens)
    assert out.dtype == dtype and relative_error(out, expect) < 1e-2
    q, k_pool, v_pool, *layout = (t.to(dtype) if t.is_floating_point() else t for t in
                                  paged_setup([700, 37, 5], [1, 1, 5], n_kv_heads, 64, 16, seed=4))
    out = paged_attention_triton(q, k_pool, v_pool, *layout)
    expect = paged_attention_reference(q.double(), k_pool.double(), v_pool.double(), *layout)
    assert out.dtype == dtype and relative_error(out, expect) < 1e-2
    q, k_pool, v_pool, *layout = (t.to(dtype) if t.is_floating_point() else t for t in
                                  paged_setup([700, 300, 5], [200, 1, 5], n_kv_heads, 64, 16, seed=5))
    out = paged_prefill_triton(q, k_pool, v_pool, *layout)
    expect = paged_attention_reference(q.double(), k_pool.double(), v_pool.double(), *layout)
    assert out.dtype == dtype and relative_error(out, expect) < 1e-2
