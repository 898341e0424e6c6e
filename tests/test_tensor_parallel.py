"""Tensor parallelism (moe/parallel/tensor_parallel.py) on 2 Gloo ranks equals one process.

Each scenario builds the same model on both ranks, splits it, and saves what it produced:
the logits of one forward pass, greedy and seeded sampled generations through the KV cache
(moe.serving.generation.generate), the bytes all-reduced and the shapes this rank holds. The
single-process model, built from the same seed, must give the same logits within fp32
tolerance and the same tokens exactly.
"""

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.serving.cache import KVCache
from moe.config import load_model_config
from moe.serving.generation import generate
from moe.model.transformer import Transformer, count_parameters
from moe.serving.sampling import SamplingParams
from moe.parallel.tensor_parallel import apply_tensor_parallel

WORLD, BATCH, TIME, D_MODEL = 2, 2, 8, 32
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_expert=16",
         "model.n_experts=4", "model.max_seq_len=32", "model.router_jitter=0.0",
         "model.kernel_backend=\"torch\""]
SCENARIOS = {  # name: config overrides
    "multi_query": ["model.n_kv_heads=1"],  # K/V replicated on both ranks
    "kv_heads_split": ["model.n_kv_heads=2"],  # one KV head per rank
    "dense_layer_and_capacity": ["model.n_kv_heads=4", "model.moe_every=2", "model.d_ff=24",
                                 "model.capacity_factor=0.5"],  # layer 0 dense; dropless at inference
    "triton_kernels": ["model.kernel_backend=\"triton\""],  # the GPU path, interpreted
    "short_conv": ["model.n_kv_heads=2", "model.short_conv=3"],  # replicated taps, kept inputs
}
PROMPT = [5, 17, 101, 3, 250, 42]
GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=7)
REFUSALS = {  # name: (config overrides, seed)
    "heads": (["model.n_heads=3", "model.head_dim=8"], 0),
    "kv_heads": (["model.n_heads=6", "model.n_kv_heads=3", "model.head_dim=8"], 0),
    "d_expert": (["model.d_expert=15"], 0),
    "d_ff": (["model.moe_every=2", "model.d_ff=15"], 0),
    "seeds": ([], "rank"),
}


def build(overrides: list[str], seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(load_model_config(TINY, SMALL + overrides)).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, 259, (BATCH, TIME), generator=torch.Generator().manual_seed(1))


def run_tensor_parallel(overrides: list[str]) -> dict:
    model = build(overrides)
    plan = apply_tensor_parallel(model)
    with torch.no_grad():
        logits = model(tokens()).logits
    reduced = dict(plan.bytes_reduced.by_kind)
    cfg = model.cfg
    return {
        "logits": logits, "bytes": reduced,
        "greedy": generate(model, PROMPT, GREEDY), "sampled": generate(model, PROMPT, SAMPLED),
        "cache_shape": tuple(KVCache(cfg, 1).k.shape),
        "heads": (cfg.n_heads, cfg.n_kv_heads),
        "parameters": (count_parameters(cfg).total, sum(p.numel() for p in model.parameters())),
    }


def refusal_of(call) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    return "accepted"


def worker(rank: int, folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}",
                            rank=rank, world_size=WORLD)
    try:
        results = {name: run_tensor_parallel(overrides) for name, overrides in SCENARIOS.items()}
        results["refused"] = {
            name: refusal_of(lambda: apply_tensor_parallel(build(overrides, rank if seed == "rank" else seed)))
            for name, (overrides, seed) in REFUSALS.items()}
        model = build([])
        apply_tensor_parallel(model)
        results["refused"]["twice"] = refusal_of(lambda: apply_tensor_parallel(model))
        results["refused"]["unseeded"] = refusal_of(
            lambda: generate(model, PROMPT, SamplingParams(temperature=1.0, max_new_tokens=2)))
        try:
            model(tokens())  # grad mode, but the parameters are frozen: allowed
            model.train()
            model(tokens())
            results["train_mode"] = "accepted"
        except RuntimeError as error:
            results["train_mode"] = str(error)
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("tensor_parallel")
    # fork, not spawn: no worker re-imports torch (seconds each on 2 cores)
    mp.start_processes(worker, args=(folder,), nprocs=WORLD, start_method="fork")
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@functools.cache
def reference(name: str) -> dict:
    model = build(SCENARIOS[name])
    with torch.no_grad():
        output = model(tokens())
    return {"logits": output.logits, "greedy": generate(model, PROMPT, GREEDY),
            "sampled": generate(model, PROMPT, SAMPLED), "cfg": model.cfg,
            "dropped": sum(stats.dropped.item() for stats in output.routing)}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_logits_equal_one_process(ranks, name):
    expected = reference(name)["logits"]
    for result in ranks:
        torch.testing.assert_close(result[name]["logits"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_cached_generation_equals_one_process_token_for_token(ranks, name):
    expected = reference(name)
    assert len(expected["greedy"]) == GREEDY.max_new_tokens
    for result in ranks:
        assert result[name]["greedy"] == expected["greedy"]
        assert result[name]["sampled"] == expected["sampled"]


def test_inference_is_dropless_even_with_a_capacity_factor():
    # capacity bounds experts in training only (moe/model/moe_layer.py); tensor parallelism
    # is inference, so the capacity scenario drops nothing on one process or on the ranks
    assert reference("dense_layer_and_capacity")["dropped"] == 0


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_each_rank_holds_its_share_of_heads_cache_and_parameters(ranks, name):
    full = reference(name)["cfg"]
    kv_local = max(1, full.n_kv_heads // WORLD)  # split, or the one shared KV head
    for result in ranks:
        assert result[name]["heads"] == (full.n_heads // WORLD, kv_local)
        assert result[name]["cache_shape"] == (full.n_layers, 1, kv_local, full.max_seq_len,
                                               full.head_dim)
        counted, held = result[name]["parameters"]
        assert counted == held < count_parameters(full).total


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bytes_all_reduced_are_two_per_block_rows_by_width(ranks, name):
    """Per forward: 2 x n_layers x B x T x D x 4 bytes (fp32), half after attention."""
    per_layer = BATCH * TIME * D_MODEL * 4
    for result in ranks:
        assert result[name]["bytes"] == {"attention": 2 * per_layer, "ffn": 2 * per_layer}


def test_refuses_sizes_that_do_not_split(ranks):
    refused = ranks[0]["refused"]
    assert "must divide model.n_heads = 3" in refused["heads"]
    assert "model.n_kv_heads = 3 and the tensor-parallel size 2" in refused["kv_heads"]
    assert "must divide model.d_expert = 15" in refused["d_expert"]
    assert "must divide model.d_ff = 15" in refused["d_ff"]


def test_refuses_different_models_and_applying_twice(ranks):
    for result in ranks:
        assert "the ranks built different models" in result["refused"]["seeds"]
        assert "already applied" in result["refused"]["twice"]


def test_refuses_unseeded_sampling_on_a_tensor_parallel_model(ranks):
    for result in ranks:
        assert "needs a seed" in result["refused"]["unseeded"]


def test_refuses_train_mode(ranks):
    for result in ranks:
        assert "inference only" in result["train_mode"]


def test_refuses_without_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        apply_tensor_parallel(build([]))
