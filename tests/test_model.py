"""The whole model: parameter counts, losses, routing statistics, shapes."""

from pathlib import Path

import pytest
import torch

from moe.config import ModelConfig, load_model_config
from moe.model.transformer import Transformer, count_parameters, model_loss
from tests.conftest import tiny_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_embeddings": True},
    {"moe_every": 2, "d_ff": 40},
    {"moe_every": 0},
    {"n_kv_heads": 2, "head_dim": 10, "n_experts": 3, "experts_per_token": 3},
    {"short_conv": 3},
    {"short_conv": 3, "short_conv_ffn": True},
])
def test_parameter_count_from_config_equals_numel_of_built_model(overrides):
    cfg = tiny_config(**overrides)
    model = Transformer(cfg)
    counted = count_parameters(cfg)
    assert counted.total == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".ffn.w_" in name
                  and cfg.is_moe_layer(int(name.split(".")[1])))
    assert counted.experts == experts
    per_layer_expert = 3 * cfg.d_model * cfg.d_expert
    assert counted.active == counted.total - len(cfg.moe_layers) * (
        cfg.n_experts - cfg.experts_per_token) * per_layer_expert


def test_gpt4_config_has_the_reported_parameter_counts():
    counted = count_parameters(load_model_config(CONFIGS / "gpt4.toml"))
    assert 1.75e12 < counted.total < 1.9e12  # reported: about 1.8T
    assert 2.7e11 < counted.active < 2.9e11  # reported: about 280B active per token
    assert 5.0e10 < counted.shared < 6.0e10  # reported: about 55B shared
    assert 1.05e11 < counted.experts / 16 < 1.15e11  # reported: about 111B per expert
    assert 5.4e11 < 2 * counted.active < 5.8e11  # about 560 GFLOPs per token, forward


def test_forward_returns_logits_and_one_routing_record_per_moe_layer(make_model):
    model = make_model(n_layers=4, moe_every=2)
    out = model(torch.randint(0, 259, (2, 9)))
    assert out.logits.shape == (2, 9, 259)
    assert len(out.routing) == 2
    assert out.routing[0].tokens_per_expert.sum().item() == 2 * 9 * 2


def test_loss_adds_router_losses_with_their_coefficients(make_model):
    model = make_model(aux_loss_coef=0.5, z_loss_coef=0.25)
    tokens = torch.randint(0, 259, (2, 9))
    loss = model_loss(model.cfg, model(tokens), tokens)
    torch.testing.assert_close(loss.total, loss.cross_entropy + 0.5 * loss.aux + 0.25 * loss.z)
    assert loss.aux.item() >= 1.0 - 1e-6  # the load-balancing loss is at least 1
    dense = make_model(moe_every=0)
    assert model_loss(dense.cfg, dense(tokens), tokens).aux.item() == 0.0


def test_loss_ignores_masked_targets(make_model):
    model = make_model()
    tokens = torch.randint(0, 259, (1, 9))
    out = model(tokens)
    masked = tokens.clone()
    masked[:, 4:] = -100
    expect = torch.nn.functional.cross_entropy(out.logits[0, :4], tokens[0, :4])
    torch.testing.assert_close(model_loss(model.cfg, out, masked).cross_entropy, expect)


def test_a_few_steps_of_training_lower_the_loss(make_model):
    model = make_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 259, (4, 24))
    losses = []
    for _ in range(15):
        loss = model_loss(model.cfg, model(tokens[:, :-1]), tokens[:, 1:]).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_tied_embeddings_share_one_tensor():
    model = Transformer(ModelConfig(d_model=32, n_heads=2, d_expert=16, n_experts=2, n_layers=1,
                                    tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight


def test_too_long_input_is_refused_with_the_limit(make_model):
    model = make_model(max_seq_len=8)
    with pytest.raises(ValueError, match="longer than model.max_seq_len = 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
