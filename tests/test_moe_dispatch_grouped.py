"""The grouped-matmul dispatch (kernels/moe_dispatch.py: dispatch_grouped), which CPU
training runs, against the reference's outputs and autograd gradients."""

import pytest
import torch

import kernels.ops
from kernels.moe_dispatch import dispatch_and_combine, dispatch_grouped
from moe.config import ModelConfig
from moe.model.moe_layer import MoELayer
from tests.conftest import dispatch_gradients, dispatch_problem

CPU = torch.device("cpu")  # the grouped form is CPU training's (F.grouped_mm on CUDA wants bf16)


def assert_matches_reference(x, ids, weights, w_in, w_out, dy, capacity=None):
    y, dropped, grads = dispatch_gradients(dispatch_grouped, x, ids, weights, w_in, w_out, dy, capacity)
    y_ref, dropped_ref, grads_ref = dispatch_gradients(dispatch_and_combine, x, ids, weights, w_in, w_out, dy,
                                                       capacity)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    assert dropped.item() == dropped_ref.item()
    for name, grad, grad_ref in zip(("x", "weights", "w_in", "w_out"), grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6, msg=f"d {name}")
    return dropped.item(), grads


@pytest.mark.parametrize("n,k", [(1, 1), (1, 3), (33, 2), (33, 3), (500, 2)])
def test_grouped_dispatch_outputs_and_gradients_equal_the_reference(n, k):
    assert assert_matches_reference(*dispatch_problem(n, k, device=CPU))[0] == 0


def test_experts_that_get_no_tokens_get_zero_gradient():
    x, _, weights, w_in, w_out, dy = dispatch_problem(9, 2, device=CPU)
    ids = torch.tensor([[2, 0]] * 9)  # experts 1, 3, 4, 5 get nothing
    _, (_, _, d_w_in, d_w_out) = assert_matches_reference(x, ids, weights, w_in, w_out, dy)
    assert d_w_in[[1, 3, 4, 5]].abs().max() == 0 and d_w_out[[1, 3, 4, 5]].abs().max() == 0
    assert d_w_in[[0, 2]].abs().max() > 0


@pytest.mark.parametrize("capacity", [1, 5])
def test_capacity_drops_the_same_slots_as_the_reference(capacity):
    x, ids, weights, w_in, w_out, dy = dispatch_problem(33, 2, device=CPU)
    ids[:20] = torch.tensor([0, 1])  # pile slots onto experts 0 and 1 so they overflow
    assert assert_matches_reference(x, ids, weights, w_in, w_out, dy, capacity)[0] > 0


def test_cpu_training_runs_the_grouped_dispatch_and_inference_does_not(monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[3].requires_grad)  # w_in: a weight that trains
        return dispatch_grouped(*args)
    monkeypatch.setattr(kernels.ops, "dispatch_grouped", counted)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_expert=8,
                      n_experts=4, experts_per_token=2, max_seq_len=300, kernel_backend="torch")
    layer = MoELayer(cfg)
    layer.train()
    layer(torch.randn(2, 150, 16))
    assert calls == [True]
    with torch.no_grad():
        layer.eval()
        layer(torch.randn(2, 150, 16))
    assert calls == [True]
