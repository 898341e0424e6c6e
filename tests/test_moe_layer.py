"""Router, dispatch, capacity, losses and gradients of the MoE layer."""

import pytest
import torch

from kernels.moe_dispatch import dispatch_and_combine
from moe.model.moe_layer import (DenseFFN, MoELayer, RoutingStats, expert_capacity, load_balancing_loss,
                           route, router_z_loss, swiglu)
from tests.conftest import tiny_config


def make_layer(seed=0, **overrides) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(tiny_config(**overrides))
    for param in layer.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return layer


def per_token_reference(x, expert_ids, weights, w_in, w_out):
    """The definition, one token and one choice at a time (slow, obviously right)."""
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(expert_ids.shape[1]):
            e = expert_ids[n, j]
            y[n] += weights[n, j] * swiglu(x[n:n + 1], w_in[e], w_out[e])[0]
    return y


def test_route_picks_top_k_and_renormalises_their_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    weights, ids = route(logits, 2)
    assert ids.tolist() == [[1, 2], [2, 3]]
    e = torch.exp(torch.tensor([3.0, 2.0]))
    torch.testing.assert_close(weights[0], e / e.sum())
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))


def test_top1_weight_is_the_raw_probability_not_a_constant_one():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    weights, ids = route(logits, 1)
    assert ids.item() == 1
    torch.testing.assert_close(weights[0, 0], logits.softmax(-1)[0, 1])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispatch_equals_per_token_definition(k):
    layer = make_layer(n_experts=5, experts_per_token=k)
    x = torch.randn(33, 32)
    weights, ids = route(layer.router(x), k)
    y, dropped = dispatch_and_combine(x, ids, weights, layer.w_in, layer.w_out, None)
    expect = per_token_reference(x, ids, weights, layer.w_in, layer.w_out)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    assert dropped.item() == 0


def test_dispatch_handles_all_tokens_on_one_expert_and_empty_experts():
    layer = make_layer(n_experts=4)
    x = torch.randn(7, 32)
    ids = torch.tensor([[2, 0]] * 7)
    weights = torch.full((7, 2), 0.5)
    y, _ = dispatch_and_combine(x, ids, weights, layer.w_in, layer.w_out, None)
    torch.testing.assert_close(y, per_token_reference(x, ids, weights, layer.w_in, layer.w_out))


def test_aux_loss_is_one_under_uniform_routing_and_larger_under_imbalance():
    n, e = 64, 8
    uniform = torch.zeros(n, e)  # every expert equally likely
    ids = torch.arange(n * 2).reshape(n, 2) % e
    stats = RoutingStats(uniform, uniform.softmax(-1), ids, torch.bincount(ids.flatten(), minlength=e), torch.tensor(0))
    assert load_balancing_loss(stats).item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.zeros(n, e)
    skewed[:, 0] = 4.0
    skewed[:, 1] = 3.0
    _, ids = route(skewed, 2)
    stats = RoutingStats(skewed, skewed.softmax(-1), ids, torch.bincount(ids.flatten(), minlength=e), torch.tensor(0))
    assert load_balancing_loss(stats).item() > 3.0


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    stats = RoutingStats(logits, logits.softmax(-1), torch.zeros(2, 1, dtype=torch.long), torch.tensor([2, 0]), torch.tensor(0))
    expect = (logits.logsumexp(-1) ** 2).mean()
    torch.testing.assert_close(router_z_loss(stats), expect)


def test_capacity_drops_the_overflow_and_keeps_first_choices():
    # 8 tokens, top-2, 4 experts, factor 1.0 -> capacity ceil(8 * 2 / 4) = 4 slots each.
    assert expert_capacity(8, 2, 4, 1.0) == 4
    layer = make_layer(n_experts=4)
    x = torch.randn(8, 32)
    ids = torch.tensor([[0, 1]] * 6 + [[1, 0]] * 2)  # expert 0: 8 slots, expert 1: 8 slots
    weights = torch.full((8, 2), 0.5)
    y, dropped = dispatch_and_combine(x, ids, weights, layer.w_in, layer.w_out, capacity=4)
    assert dropped.item() == 8
    # Expert 0 keeps its first choices (tokens 0..3); expert 1 keeps first choices 6, 7 and
    # then the earliest second choices 0, 1.
    kept = torch.zeros(8, 2)
    kept[0:4, 0] = 1
    kept[6:8, 0] = 1
    kept[0:2, 1] = 1
    expect = per_token_reference(x, ids, weights * kept, layer.w_in, layer.w_out)
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)


def test_layer_reports_routing_statistics():
    layer = make_layer(n_experts=4, capacity_factor=0.5)
    y, stats = layer(torch.randn(2, 10, 32))
    assert y.shape == (2, 10, 32)
    assert stats.router_logits.shape == (20, 4) and stats.expert_ids.shape == (20, 2)
    assert stats.tokens_per_expert.sum().item() == 40
    assert stats.dropped.item() == 40 - 4 * expert_capacity(20, 2, 4, 0.5)


@pytest.mark.parametrize("k", [1, 2])
def test_gradients_reach_the_router_and_every_expert_that_got_tokens(k):
    layer = make_layer(n_experts=6, experts_per_token=k)
    x = torch.randn(40, 32)
    y, stats = layer(x)
    y.square().sum().backward()  # task loss only: no aux or z-loss
    assert layer.router.weight.grad.abs().sum() > 0
    used = stats.tokens_per_expert > 0
    for grad in (layer.w_in.grad, layer.w_out.grad):
        per_expert = grad.abs().flatten(1).sum(1)
        assert (per_expert[used] > 0).all()
        assert (per_expert[~used] == 0).all()


def test_one_expert_top1_equals_the_dense_swiglu_ffn():
    layer = make_layer(n_experts=1, experts_per_token=1)
    dense = DenseFFN(32, 24)
    with torch.no_grad():
        dense.w_in.copy_(layer.w_in[0])
        dense.w_out.copy_(layer.w_out[0])
    x = torch.randn(3, 11, 32)
    y, _ = layer(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-6, atol=1e-6)


def test_router_jitter_only_acts_in_training():
    layer = make_layer(router_jitter=0.5)
    x = torch.randn(16, 32)
    layer.eval()
    assert torch.equal(layer(x)[1].router_logits, layer(x)[1].router_logits)
    layer.train()
    assert not torch.equal(layer(x)[1].router_logits, layer(x)[1].router_logits)
