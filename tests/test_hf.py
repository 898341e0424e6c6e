"""Hugging Face Mixtral interop: bit-exact round trip through the Mixtral layout, the same
logits and greedy tokens as transformers' MixtralForCausalLM on the same weights (both
directions, single file and sharded), and refusals that name the key or tensor."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.io.checkpoint import load_model
from moe.io.files import CheckpointError
from moe.serving.generation import generate
from moe.io.hf import load_hf, save_hf
from moe.serving.sampling import SamplingParams

VOCAB = 96
NO_TRANSFORMERS = "transformers is not installed (pip install -e '.[dev]')"


def random_mixtral(**overrides):
    """A tiny randomly initialised MixtralForCausalLM (fp32), every weight perturbed so
    norms and routing are not at their trivial init, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers", reason=NO_TRANSFORMERS)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=64, rope_theta=500.0,
                    rms_norm_eps=1e-6)
    settings.update(overrides)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**settings)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0, 0.1) if "norm" in name else param.normal_(0.0, 0.2)
    model.generation_config.eos_token_id = None  # fixed-length greedy runs
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(transformers model, its single-file folder, its sharded folder)."""
    model = random_mixtral()
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    return model, single, sharded


# ---------------------------------------------------------------------------------------
# Ours -> Mixtral layout -> ours
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shard_bytes", [None, 3000])
def test_round_trip_through_mixtral_layout_is_bit_exact(tmp_path, make_model, dtype, tied,
                                                        shard_bytes):
    model = make_model(tie_embeddings=tied, n_kv_heads=2).to(dtype)
    save_hf(model, tmp_path / "hf", max_shard_bytes=shard_bytes)
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == bool(shard_bytes)
    loaded = load_hf(tmp_path / "hf")
    assert loaded.cfg == dataclasses.replace(model.cfg, z_loss_coef=0.0)  # Mixtral has no z-loss
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert restored[name].dtype == dtype, name
        assert torch.equal(original[name], restored[name]), name
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 9))
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    if tied:
        assert loaded.lm_head.weight is loaded.embed.weight


def test_load_model_accepts_a_mixtral_folder(tmp_path, make_model):
    model = make_model()
    save_hf(model, tmp_path / "hf")
    loaded = load_model(tmp_path / "hf", dtype=torch.bfloat16)
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.blocks[1].ffn.w_in, model.blocks[1].ffn.w_in.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------
# Against transformers' MixtralForCausalLM
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_transformers_mixtral_loads_with_the_same_logits(mixtral, layout):
    reference, single, sharded = mixtral
    folder = single if layout == "single" else sharded
    assert (folder / "model.safetensors.index.json").exists() == (layout == "sharded")
    ours = load_model(folder).eval()
    tokens = torch.randint(0, VOCAB, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
        got = ours(tokens).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_transformers_mixtral_with_tied_embeddings_loads_tied(tmp_path):
    reference = random_mixtral(tie_word_embeddings=True, num_key_value_heads=1)
    reference.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    assert ours.cfg.tie_embeddings and ours.cfg.n_kv_heads == 1
    assert ours.lm_head.weight is ours.embed.weight
    tokens = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, reference(tokens).logits,
                                   rtol=1e-5, atol=1e-5)


def test_transformers_mixtral_gives_the_same_greedy_tokens(mixtral):
    reference, single, _ = mixtral
    ours = load_model(single).eval()
    prompt = [5, 17, 33, 2, 80, 41]
    with torch.no_grad():
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    got = generate(ours, prompt, SamplingParams(max_new_tokens=24, ignore_eos=True))
    assert got == expected[0, len(prompt):].tolist()


def test_our_export_loads_into_transformers_with_the_same_logits(tmp_path, make_model):
    transformers = pytest.importorskip("transformers", reason=NO_TRANSFORMERS)
    ours = make_model(seed=3, n_kv_heads=2, vocab_size=VOCAB)
    with torch.no_grad():
        for block in ours.blocks:
            block.ffn.router.weight.normal_(0.0, 1.0)  # varied routing
            block.ffn_norm.weight.normal_(1.0, 0.1)
    save_hf(ours, tmp_path / "hf", max_shard_bytes=4000)
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------
# Refusals name what cannot map
# ---------------------------------------------------------------------------------------

def edit_config(folder, **changes):
    file = folder / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, named", [
    (dict(model_type="llama"), "model_type"),
    (dict(sliding_window=16), "sliding_window"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_parameters"),
    (dict(rope_parameters={"type": "linear", "factor": 2.0}), "rope_parameters"),  # the legacy key
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(num_experts_per_tok=1), "num_experts_per_tok"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
])
def test_unmappable_config_is_refused_by_key(tmp_path, make_model, changes, named):
    save_hf(make_model(), tmp_path / "hf")
    edit_config(tmp_path / "hf", **changes)
    with pytest.raises(CheckpointError, match=named):
        load_model(tmp_path / "hf")


def test_sliding_window_covering_the_context_is_accepted(tmp_path, make_model):
    save_hf(make_model(), tmp_path / "hf")
    edit_config(tmp_path / "hf", sliding_window=64)  # = max_position_embeddings: no effect
    assert load_model(tmp_path / "hf").cfg.max_seq_len == 64


def test_missing_and_misshapen_tensors_are_named(tmp_path, make_model):
    save_hf(make_model(), tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, file)
    with pytest.raises(CheckpointError, match=f"missing tensors.*{name}"):
        load_model(tmp_path / "hf")
    save_file({**tensors, name: tensors[name][:, :-1].contiguous()}, file)
    with pytest.raises(CheckpointError, match=f"tensor {name} .* has shape \\(32, 23\\)"):
        load_model(tmp_path / "hf")


def test_export_refuses_dense_layers(tmp_path, make_model):
    with pytest.raises(CheckpointError, match="moe_every = 2 gives dense layers \\[0\\]"):
        save_hf(make_model(moe_every=2), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_warns_that_capacity_is_dropped(tmp_path, make_model):
    with pytest.warns(UserWarning, match="capacity_factor"):
        save_hf(make_model(capacity_factor=1.25), tmp_path / "hf")
    assert load_model(tmp_path / "hf").cfg.capacity_factor is None
