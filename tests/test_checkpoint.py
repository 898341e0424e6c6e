"""Checkpoints: bit-exact round trip, atomic replacement, errors that name the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.io.checkpoint import load_model, save_model
from moe.io.files import CheckpointError, write_directory_atomically


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_bit_exact(tmp_path, make_model, dtype, tied):
    model = make_model(tie_embeddings=tied, moe_every=2).to(dtype)
    save_model(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert restored[name].dtype == dtype
        assert torch.equal(original[name], restored[name]), name
    tokens = torch.randint(0, 259, (1, 7))
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    if tied:
        assert loaded.lm_head.weight is loaded.embed.weight


def test_wrong_shape_is_named(tmp_path, make_model):
    save_model(make_model(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(weights)
    tensors["blocks.1.ffn.router.weight"] = torch.zeros(3, 32)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.ffn\.router\.weight .* shape \(3, 32\)"):
        load_model(tmp_path / "ckpt")


def test_missing_tensor_is_named(tmp_path, make_model):
    save_model(make_model(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["norm.weight"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"missing tensors \['norm.weight'\]"):
        load_model(tmp_path / "ckpt")


def test_missing_files_and_bad_config_are_explained(tmp_path, make_model):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_model(tmp_path)
    save_model(make_model(), tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "n_kv_heads": 3}))
    with pytest.raises(ValueError, match="n_kv_heads = 3 does not divide"):
        load_model(tmp_path / "ckpt")


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint_intact(tmp_path, make_model):
    model = make_model()
    save_model(model, tmp_path / "ckpt")

    def dies(tmp):
        (tmp / "config.json").write_text("{half")
        raise KeyboardInterrupt  # killed while writing

    with pytest.raises(KeyboardInterrupt):
        write_directory_atomically(tmp_path / "ckpt", dies)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary left behind
    loaded = load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.embed.weight, model.embed.weight)


def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path, make_model):
    save_model(make_model(seed=0), tmp_path / "ckpt")
    newer = make_model(seed=1)
    save_model(newer, tmp_path / "ckpt")
    assert torch.equal(load_model(tmp_path / "ckpt").embed.weight, newer.embed.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
