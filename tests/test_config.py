from pathlib import Path

import pytest

from moe.config import ConfigError, ModelConfig, load_model_config, parse_override

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["tiny", "draft", "small", "gpt4"])
def test_every_shipped_config_loads(name):
    cfg = load_model_config(CONFIGS / f"{name}.toml")
    assert cfg.n_heads % cfg.n_kv_heads == 0


def test_defaults_are_top2_of_16_experts():
    cfg = ModelConfig()
    assert (cfg.n_experts, cfg.experts_per_token, cfg.capacity_factor) == (16, 2, None)


def test_derived_fields_are_filled_in():
    cfg = ModelConfig(d_model=96, n_heads=6, d_expert=40)
    assert cfg.head_dim == 16 and cfg.d_ff == 40 and cfg.kv_group_size == 6


def test_moe_every_picks_layers():
    assert ModelConfig(n_layers=4, moe_every=1).moe_layers == [0, 1, 2, 3]
    assert ModelConfig(n_layers=4, moe_every=2).moe_layers == [1, 3]
    assert ModelConfig(n_layers=4, moe_every=0).moe_layers == []


def test_overrides_replace_file_values_with_typed_values():
    cfg = load_model_config(CONFIGS / "tiny.toml",
                            ["model.n_layers=2", "model.capacity_factor=1.25", "model.tie_embeddings=true"])
    assert cfg.n_layers == 2 and cfg.capacity_factor == 1.25 and cfg.tie_embeddings is True
    cleared = load_model_config(None, ["model.capacity_factor=1.0", "model.capacity_factor=none"])
    assert cleared.capacity_factor is None


def test_integer_is_accepted_where_a_float_is_expected():
    assert load_model_config(None, ["model.rope_base=500000"]).rope_base == 500000.0


@pytest.mark.parametrize("overrides, message", [
    (["model.n_layer=4"], "model.n_layer is not a known setting (did you mean n_layers"),
    (["model.n_layers=2.5"], "model.n_layers must be int, got 2.5"),
    (["model.n_layers=true"], "model.n_layers must be int"),
    (["model.tie_embeddings=1"], "model.tie_embeddings must be bool"),
    (["model.capacity_factor=\"big\""], "model.capacity_factor must be float or none"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_kv_heads = 3 does not divide model.n_heads = 4"),
    (["model.n_experts=4", "model.experts_per_token=5"], "experts_per_token = 5 is above model.n_experts = 4"),
    (["model.d_model=100", "model.n_heads=3"], "set model.head_dim explicitly"),
    (["model.head_dim=7"], "model.head_dim must be even"),
    (["model.n_layers=0"], "model.n_layers must be at least 1"),
    (["model.capacity_factor=0"], "model.capacity_factor must be positive"),
    (["model.dropout=1.0"], "model.dropout must be in [0, 1)"),
    (["model.moe_every=-1"], "model.moe_every must be 0"),
    (["optimizer.lr=1"], "[optimizer] is not a known section"),
    (["n_layers=4"], "must look like section.key=value"),
])
def test_bad_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_model_config(None, overrides)
    assert message in str(error.value)


def test_missing_file_and_broken_toml_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\nd_model = 3")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_model_config(broken)


def test_override_values_are_parsed_as_toml():
    assert parse_override("model.d_model=64") == ("model", "d_model", 64)
    assert parse_override("model.capacity_factor=none") == ("model", "capacity_factor", "none")


def test_config_comments_state_the_parameter_counts_count_parameters_gives():
    import re
    from pathlib import Path
    from moe.config import load_model_config
    from moe.model.transformer import count_parameters
    for name in ("tiny", "small"):
        path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.toml"
        first = path.read_text().splitlines()[0]
        total, active = (float(x) for x in re.search(r"about ([\d.]+)M parameters, ([\d.]+)M active",
                                                     first).groups())
        p = count_parameters(load_model_config(path))
        assert abs(total - p.total / 1e6) / total < 0.05, (name, first)
        assert abs(active - p.active / 1e6) / active < 0.05, (name, first)
