"""Training through the Triton kernels (their backwards in kernels/*_backward.py) gives
the same losses and weights as training through the PyTorch references; compiled on a
CUDA GPU when one is present, otherwise on CPU through TRITON_INTERPRET=1 (both set up in
tests/conftest.py)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton does not import here; the kernels cannot run")

import kernels.attention_backward  # noqa: E402
import kernels.moe_dispatch_backward  # noqa: E402
import kernels.ops  # noqa: E402
from moe.model.transformer import model_loss  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or original(*a, **kw))
    return calls


def train(make_model, backend, steps, n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads, kernel_backend=backend,
                       capacity_factor=1.0).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    losses = []
    for _ in range(steps):  # one batch again and again: the loss must fall
        loss = model_loss(model.cfg, model(tokens[:, :-1]), tokens[:, 1:]).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model


@pytest.mark.parametrize("n_kv_heads", [1, 2], ids=["MQA", "GQA"])
def test_training_steps_with_triton_match_torch(make_model, monkeypatch, n_kv_heads):
    monkeypatch.delenv("MOE_KERNEL_BACKEND", raising=False)  # the test picks the backend
    attention_calls = count_calls(monkeypatch, kernels.ops, "varlen_causal_attention_trainable")
    dispatch_calls = count_calls(monkeypatch, kernels.ops, "dispatch_and_combine_trainable")
    backward_calls = count_calls(monkeypatch, kernels.attention_backward,
                                 "varlen_attention_backward")
    dispatch_backward_calls = count_calls(monkeypatch, kernels.moe_dispatch_backward,
                                          "dispatch_backward_triton")
    expect, reference = train(make_model, "torch", 3, n_kv_heads)
    assert not (attention_calls or dispatch_calls or backward_calls or dispatch_backward_calls)
    losses, trained = train(make_model, "triton", 3, n_kv_heads)
    assert attention_calls and dispatch_calls and backward_calls and dispatch_backward_calls
    assert expect[-1] < expect[0]  # the steps do train
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expect), rtol=1e-4, atol=1e-5)
    for (name, param), param_ref in zip(trained.named_parameters(), reference.parameters()):
        torch.testing.assert_close(param, param_ref, rtol=1e-3, atol=1e-4, msg=name)
