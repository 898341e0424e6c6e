"""Gradients of the Triton varlen flash attention (kernels/attention_backward.py) against
the reference's autograd, compiled on a CUDA GPU when one is present and otherwise on CPU
through TRITON_INTERPRET=1 (both set up in tests/conftest.py)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton does not import here; the kernels cannot run")

from kernels.attention import varlen_causal_attention_reference  # noqa: E402
from kernels.attention_backward import (varlen_attention_forward_lse,  # noqa: E402
                                        varlen_causal_attention_trainable)
from tests.conftest import DEVICE, needs_compiled_triton, relative_error  # noqa: E402

H = 4


def packed(lens, n_kv_heads, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    q = torch.randn(n, H, head_dim, generator=gen)
    k = torch.randn(n, n_kv_heads, head_dim, generator=gen)
    v = torch.randn(n, n_kv_heads, head_dim, generator=gen)
    d_out = torch.randn(n, H, head_dim, generator=gen)
    cu_seqlens = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k, v, d_out, cu_seqlens))


def gradients(fn, q, k, v, d_out, cu_seqlens):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu_seqlens)
    (out * d_out).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("lens", [[1], [33, 5, 1, 0, 17], [70]], ids=["one", "ragged", "70"])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4], ids=["MQA", "GQA", "MHA"])
def test_varlen_attention_gradients_equal_reference_autograd(lens, n_kv_heads):
    head_dim = 24 if n_kv_heads == 2 else 16  # 24: not a power of two
    args = packed(lens, n_kv_heads, head_dim)
    got = gradients(varlen_causal_attention_trainable, *args)
    expect = gradients(varlen_causal_attention_reference, *args)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expect):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_saved_log_sum_exp_is_that_of_the_scaled_causal_scores():
    q, k, _, _, cu_seqlens = packed([9], 1, 16)
    _, lse = varlen_attention_forward_lse(q, k, k, cu_seqlens)
    scores = torch.einsum("thd,sd->hts", q, k[:, 0]) / 4.0  # [H, T, S], scale 1/sqrt(16)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool, device=DEVICE).triu(1),
                                float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(dim=-1).t(), rtol=1e-5, atol=1e-5)


def test_gradients_do_not_cross_sequences():
    q, k, v, d_out, cu_seqlens = packed([9, 7], 2, 16)
    d_out[9:] = 0  # only the first sequence's output matters
    _, dq, dk, dv = gradients(varlen_causal_attention_trainable, q, k, v, d_out, cu_seqlens)
    assert dq[9:].abs().max() == 0 and dk[9:].abs().max() == 0 and dv[9:].abs().max() == 0


def test_half_precision_gradients_are_close_to_float32():
    q, k, v, d_out, cu_seqlens = packed([21, 6], 2, 16)
    got = gradients(varlen_causal_attention_trainable, q.half(), k.half(), v.half(), d_out.half(),
                    cu_seqlens)
    expect = gradients(varlen_causal_attention_reference, q, k, v, d_out, cu_seqlens)
    for a, b in zip(got, expect):
        assert a.dtype == torch.float16
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


@needs_compiled_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_kv_heads", [1, 4], ids=["MQA", "MHA"])
def test_half_precision_gradients_are_within_rounding_of_a_float64_reference(dtype, n_kv_heads):
    args = [t.to(dtype) if t.is_floating_point() else t
            for t in packed([300, 77, 1], n_kv_heads, 64, seed=6)]
    got = gradients(varlen_causal_attention_trainable, *args)
    expect = gradients(varlen_causal_attention_reference,
                       *(t.double() if t.is_floating_point() else t for t in args))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, expect):
        assert a.dtype == dtype, name
        assert relative_error(a, b) < 2e-2, name
