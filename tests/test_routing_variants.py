"""The routing variants (model.router_score, balance, n_shared_experts, routing): what each
promises, its Triton path against its reference, the bias through training and
checkpoints, and the refusals."""

import pytest
import torch

from moe.config import ConfigError, TrainConfig
from moe.cost.estimate import estimate
from moe.cost.hardware import PRESETS
from moe.io.checkpoint import load_model, save_model
from moe.io.files import CheckpointError
from moe.io.hf import save_hf
from moe.model.moe_layer import expert_choice, route, router_scores, swiglu, update_balance_bias
from moe.model.transformer import Transformer, count_parameters, model_loss
from moe.serving.engine import Engine
from moe.training.loop import make_optimizer, routing_counts, routing_metrics, train_step
from tests.conftest import DEVICE, tiny_config
from tests.test_moe_layer import make_layer

VARIANTS = {
    "softmax": {},
    "sigmoid": dict(router_score="sigmoid"),
    "bias": dict(balance="bias"),
    "shared": dict(n_shared_experts=2),
    "expert_choice": dict(routing="expert_choice"),
    "deepseek": dict(router_score="sigmoid", balance="bias", n_shared_experts=1),
}


def test_sigmoid_scores_pick_the_top_k_and_normalise_the_chosen_scores():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    weights, ids = route(logits, 2, "sigmoid")
    assert ids.tolist() == [[1, 2]]
    chosen = torch.tensor([3.0, 2.0]).sigmoid()
    torch.testing.assert_close(weights[0], chosen / chosen.sum())
    # independent scores: raising one logit leaves the others' scores where they were
    raised = logits.clone()
    raised[0, 0] = 9.0
    torch.testing.assert_close(router_scores(raised, "sigmoid")[0, 1:], router_scores(logits, "sigmoid")[0, 1:])


def test_the_bias_changes_which_experts_are_chosen_but_not_their_weights():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 2.0])  # lifts expert 3 into the top 2
    weights, ids = route(logits, 2, "sigmoid", bias)
    assert ids.tolist() == [[3, 1]]
    chosen = torch.tensor([0.0, 3.0]).sigmoid()  # unbiased scores of the chosen experts
    torch.testing.assert_close(weights[0], chosen / chosen.sum())


def test_the_bias_does_not_touch_the_gradient():
    layer = make_layer(balance="bias")
    assert "balance_bias" not in dict(layer.named_parameters()) and not layer.balance_bias.requires_grad
    x = torch.randn(20, 32)
    grads = []
    for bias in (torch.zeros(4), torch.full((4,), 1e-6)):  # a bias too small to change any choice
        layer.balance_bias.copy_(bias)
        layer.zero_grad()
        y, stats = layer(x)
        y.square().sum().backward()
        grads.append((y.detach(), stats.expert_ids, layer.router.weight.grad.clone()))
    (y0, ids0, g0), (y1, ids1, g1) = grads
    assert torch.equal(ids0, ids1)
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    torch.testing.assert_close(g0, g1, rtol=0, atol=0)


def test_the_bias_update_moves_load_toward_balance_on_a_skewed_router():
    layer = make_layer(balance="bias", bias_update_rate=0.01).eval()
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(1)) + 0.5
    with torch.no_grad():
        layer.router.weight[0] += 0.2  # expert 0 about 3 above the others

    def busiest_over_ideal() -> float:
        with torch.no_grad():
            _, stats = layer(x)
        update_balance_bias(layer, stats.tokens_per_expert)
        return routing_metrics(routing_counts([stats], 1))[0]["max_over_ideal"]

    before = busiest_over_ideal()
    for _ in range(300):
        after = busiest_over_ideal()
    assert before > 1.8 and after < 1.2, (before, after)  # 2.0 = expert 0 in every top 2
    assert layer.balance_bias[0] < 0  # the favoured expert was pushed down


def test_the_bias_update_under_accumulation_equals_one_batch():
    cfg, train = tiny_config(balance="bias", bias_update_rate=0.01), TrainConfig(lr=1e-3, warmup_steps=1)
    tokens = torch.randint(0, 259, (4, 17), generator=torch.Generator().manual_seed(0))
    biases = []
    for micro in ([(tokens[:, :-1], tokens[:, 1:])],
                  [(tokens[:2, :-1], tokens[:2, 1:]), (tokens[2:, :-1], tokens[2:, 1:])]):
        torch.manual_seed(0)
        model = Transformer(cfg)
        train_step(model, make_optimizer(model, train), micro, train, 0, torch.device("cpu"))
        biases.append(torch.stack(list(model.buffers())))
    assert biases[0].abs().sum() > 0
    torch.testing.assert_close(biases[0], biases[1], rtol=0, atol=0)


def test_shared_experts_see_every_token():
    # capacity so small that most routed slots drop: the shared experts still run for all
    layer = make_layer(n_shared_experts=2, capacity_factor=0.1).train()
    x = torch.randn(12, 32)
    y, stats = layer(x)
    assert stats.dropped > 0
    shared = sum(swiglu(x, layer.shared_w_in[s], layer.shared_w_out[s]) for s in range(2))
    routed, _ = layer.run_experts(x, stats.expert_ids, route(stats.router_logits, 2)[0], 1)
    torch.testing.assert_close(y, routed + shared, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert (layer.shared_w_in.grad.abs().sum((1, 2)) > 0).all()


def test_expert_choice_gives_each_expert_exactly_its_capacity():
    layer = make_layer(routing="expert_choice", capacity_factor=1.5)
    x = torch.randn(10, 32)
    y, stats = layer(x)
    capacity = 8  # ceil(1.5 * 10 tokens * K=2 / 4 experts)
    assert stats.tokens_per_expert.tolist() == [capacity] * 4
    taken = stats.expert_ids >= 0  # [N, E]
    assert taken.sum(0).tolist() == [capacity] * 4
    assert stats.dropped == (~taken.any(-1)).sum()
    scores = router_scores(stats.router_logits, "softmax")
    expect = torch.zeros_like(x)
    for e in range(4):  # each expert's top-C tokens by its score, weighted by that score
        for n in scores[:, e].topk(capacity).indices:
            expect[n] += scores[n, e] * swiglu(x[n:n + 1], layer.w_in[e], layer.w_out[e])[0]
    torch.testing.assert_close(y, expect, rtol=1e-5, atol=1e-5)
    tokens, weights = expert_choice(scores, capacity)
    assert tokens.shape == weights.shape == (4 * capacity,)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_each_variant_through_triton_equals_its_reference(name, monkeypatch):
    monkeypatch.delenv("MOE_KERNEL_BACKEND", raising=False)
    results = []
    for backend in ("torch", "triton"):
        layer = make_layer(kernel_backend=backend, **VARIANTS[name]).to(DEVICE)
        if layer.balance_bias is not None:
            layer.balance_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1]))
        x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_()
        y, stats = layer(x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad] + [p.grad for p in layer.parameters()])
    for reference, kernel in zip(*results):
        torch.testing.assert_close(kernel, reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_equal_the_built_model(name):
    cfg = tiny_config(**VARIANTS[name])
    counted = count_parameters(cfg)
    assert counted.total == sum(p.numel() for p in Transformer(cfg).parameters())
    plain = count_parameters(tiny_config())
    per_expert = 3 * cfg.d_model * cfg.d_expert
    shared = cfg.n_shared_experts * per_expert * len(cfg.moe_layers)
    assert counted.active - plain.active == shared == counted.shared_experts


def test_the_cost_model_reads_shared_experts_for_every_token():
    plain, shared = tiny_config(), tiny_config(n_shared_experts=2)
    hw = PRESETS["H100"]
    a, b = estimate(plain, hw, check=False), estimate(shared, hw, check=False)
    per_expert = 3 * plain.d_model * plain.d_expert * len(plain.moe_layers)
    assert b.active_params - a.active_params == 2 * per_expert
    assert b.decode_flops_per_token - a.decode_flops_per_token == 2 * 2 * per_expert


def test_a_checkpoint_round_trips_the_balance_bias(tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny_config(balance="bias", n_shared_experts=1))
    for block in model.blocks:
        block.ffn.balance_bias.copy_(torch.randn(4))
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    for a, b in zip(model.buffers(), loaded.buffers()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    tokens = torch.randint(0, 259, (1, 12))
    torch.testing.assert_close(model.eval()(tokens).logits, loaded.eval()(tokens).logits)


@pytest.mark.parametrize("setting, message", [
    (dict(router_score="relu"), "model.router_score"),
    (dict(balance="loss"), "model.balance"),
    (dict(routing="hash"), "model.routing"),
    (dict(n_shared_experts=-1), "model.n_shared_experts"),
    (dict(bias_update_rate=-0.1), "model.bias_update_rate"),
    (dict(routing="expert_choice", balance="bias"), "model.balance"),
])
def test_bad_routing_settings_are_refused_by_name(setting, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**setting)


def test_generation_refuses_expert_choice_by_name():
    model = Transformer(tiny_config(routing="expert_choice")).eval()
    model(torch.randint(0, 259, (2, 8)))  # a whole-sequence forward (training, evaluation) runs
    with pytest.raises(ConfigError, match="expert_choice.*not causal"):
        Engine(model)
    from moe.serving.cache import KVCache
    with pytest.raises(ConfigError, match="not causal"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
              KVCache(model.cfg, 1))


@pytest.mark.parametrize("name", ["sigmoid", "bias", "shared", "expert_choice"])
def test_mixtral_export_refuses_the_variants_it_cannot_hold(name, tmp_path):
    model = Transformer(tiny_config(**VARIANTS[name]))
    with pytest.raises(CheckpointError, match="no Mixtral form"):
        save_hf(model, tmp_path / "hf")


def test_the_aux_loss_is_reported_but_not_trained_on_under_bias_balancing():
    torch.manual_seed(0)
    tokens = torch.randint(0, 259, (2, 12))
    losses = {}
    for balance in ("aux_loss", "bias"):
        torch.manual_seed(0)
        cfg = tiny_config(balance=balance, z_loss_coef=0.0, aux_loss_coef=0.5)
        loss = model_loss(cfg, Transformer(cfg)(tokens), tokens)
        losses[balance] = loss
    assert losses["bias"].aux > 0
    torch.testing.assert_close(losses["bias"].total, losses["bias"].cross_entropy)
    torch.testing.assert_close(losses["aux_loss"].total,
                               losses["aux_loss"].cross_entropy + 0.5 * losses["aux_loss"].aux)
