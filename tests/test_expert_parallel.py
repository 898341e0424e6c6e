"""Expert parallelism over 2 Gloo ranks equals one process holding the whole model.

Two worker processes (spawned once for the whole file) build the same model, apply
expert parallelism, run one training step on their own batch and save what they saw; the
tests compare it here against the single-process model run on both batches, with the loss
(loss(batch 0) + loss(batch 1)) / 2 whose gradient reduce_gradients must reproduce.
"""

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.config import TrainConfig, load_model_config
from moe.expert_parallel import (apply_expert_parallel, clip_grad_norm, full_optimizer_state_dict,
                                 full_state_dict, gather_expert_tensor, is_expert_parameter,
                                 load_full_optimizer_state_dict, load_full_state_dict,
                                 reduce_gradients)
from moe.model import Transformer, model_loss
from moe.moe_layer import expert_capacity
from moe.training import make_optimizer

WORLD = 2
BATCH, TIME = 2, 8  # per rank: N = 16 tokens
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_expert=16",
         "model.n_experts=4", "model.max_seq_len=16", "model.router_jitter=0.0",
         "model.kernel_backend=\"torch\""]
MAX_NORM = 0.05  # below the gradient norm, so clipping acts
TRAIN = TrainConfig(lr=1e-3)
NEVER = -30.0  # a router bias that keeps an expert out of every token's top 2
SCENARIOS = {  # name: (config overrides, ep_size, router bias per MoE layer or None)
    "dropless": ([], 2, None),
    # layer 0: every token to experts 0 and 1 (rank 0's), so rank 1 receives no row at all;
    # layer 1: expert 0 gets no token
    "empty_experts": ([], 2, [[0.0, 0.0, NEVER, NEVER], [NEVER, 0.0, 0.0, 0.0]]),
    "capacity": (["model.capacity_factor=0.5"], 2, None),
    "ep1_tied": (["model.tie_embeddings=true"], 1, None),  # experts replicated, reduced as data
}


def build(overrides: list[str], biases) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(load_model_config(TINY, SMALL + overrides))
    for block, bias in zip(model.blocks, biases or []):
        block.ffn.router.bias = torch.nn.Parameter(torch.tensor(bias))
    return model.train()


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, 259, (2, BATCH, TIME), generator=generator)
    return tokens[0], tokens[1]


def run_expert_parallel(rank: int, overrides, ep_size, biases) -> dict:
    model = build(overrides, biases)
    plan = apply_expert_parallel(model, ep_size)
    optimizer = make_optimizer(model, TRAIN)
    start = full_state_dict(model, plan)
    inputs, targets = batch(rank)
    output = model(inputs)
    loss = model_loss(model.cfg, output, targets)
    loss.total.backward()
    reduce_gradients(model, plan)
    grads = {name: gather_expert_tensor(p.grad, plan) if is_expert_parameter(name, p) else p.grad.clone()
             for name, p in model.named_parameters()}
    norm = clip_grad_norm(model, plan, MAX_NORM)
    optimizer.step()
    stepped = full_state_dict(model, plan)
    moments = full_optimizer_state_dict(optimizer, plan)
    load_full_optimizer_state_dict(optimizer, plan, moments)
    load_full_state_dict(model, plan, start)
    return {
        "logits": output.logits.detach(), "ce": loss.cross_entropy.detach(),
        "aux": loss.aux.detach(), "z": loss.z.detach(),
        "dropped": [s.dropped.item() for s in output.routing],
        "tokens_per_expert": [s.tokens_per_expert for s in output.routing],
        "grads": grads, "norm": norm, "start": start, "stepped": stepped, "moments": moments,
        "moments_reloaded": full_optimizer_state_dict(optimizer, plan),
        "reloaded": full_state_dict(model, plan),
        "bytes": dict(plan.bytes_moved.total), "remote": dict(plan.bytes_moved.remote),
    }


def refusal(overrides: list[str], ep_size: int) -> str:
    try:
        apply_expert_parallel(build(overrides, None), ep_size)
    except ValueError as error:
        return str(error)
    return "accepted"


def worker(rank: int, folder: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}",
                            rank=rank, world_size=WORLD)
    try:
        results = {name: run_expert_parallel(rank, *setup) for name, setup in SCENARIOS.items()}
        results["refused_world"] = refusal(["model.n_experts=6"], 3)
        results["refused_experts"] = refusal(["model.n_experts=3"], 2)
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("expert_parallel")
    mp.spawn(worker, args=(folder,), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@functools.cache
def reference(name: str) -> dict:
    """The single-process model on both batches: losses per batch, the mean's gradients,
    then one clipped AdamW step."""
    overrides, _, biases = SCENARIOS[name]
    model = build(overrides, biases)
    optimizer = make_optimizer(model, TRAIN)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    per_rank, mean = [], 0.0
    for rank in range(WORLD):
        inputs, targets = batch(rank)
        output = model(inputs)
        loss = model_loss(model.cfg, output, targets)
        per_rank.append({"output": output, "loss": loss})
        mean = mean + loss.total / WORLD
    mean.backward()
    grads = {key: p.grad.clone() for key, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()
    return {"per_rank": per_rank, "grads": grads, "norm": norm, "start": start,
            "stepped": model.state_dict(), "moments": optimizer.state_dict()}


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_forward_and_losses_equal_one_process(ranks, name):
    expected = reference(name)
    for rank, result in enumerate(ranks):
        result = result[name]
        output, loss = expected["per_rank"][rank]["output"], expected["per_rank"][rank]["loss"]
        close(result["logits"], output.logits.detach())
        for key, value in (("ce", loss.cross_entropy), ("aux", loss.aux), ("z", loss.z)):
            close(result[key], value.detach())
        assert result["dropped"] == [s.dropped.item() for s in output.routing]
        for got, stats in zip(result["tokens_per_expert"], output.routing):
            assert got.tolist() == stats.tokens_per_expert.tolist()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_reduced_gradients_are_those_of_the_mean_loss(ranks, name):
    expected = reference(name)
    for result in ranks:
        assert result[name]["grads"].keys() == expected["grads"].keys()
        for key, grad in expected["grads"].items():
            close(result[name]["grads"][key], grad)
        close(result[name]["norm"], expected["norm"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_clipped_adamw_step_equals_one_process(ranks, name):
    expected = reference(name)
    for result in ranks:
        for key, value in expected["stepped"].items():
            close(result[name]["stepped"][key], value)
        for index, state in expected["moments"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                close(result[name]["moments"]["state"][index][key], state[key])


def test_scenarios_cover_empty_experts_and_drops(ranks):
    layer0, layer1 = ranks[1]["empty_experts"]["tokens_per_expert"]
    assert layer0[2:].sum() == 0 and layer1[0] == 0  # rank 1 receives nothing in layer 0
    assert all(sum(result["capacity"]["dropped"]) > 0 for result in ranks)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_full_state_dict_round_trips_the_single_process_state(ranks, name):
    expected = reference(name)
    for result in ranks:
        for saved in ("start", "reloaded"):
            assert result[name][saved].keys() == expected["start"].keys()
            for key, value in expected["start"].items():
                torch.testing.assert_close(result[name][saved][key], value, rtol=0, atol=0)
        for index, state in result[name]["moments"]["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(result[name]["moments_reloaded"]["state"][index][key], value,
                                           rtol=0, atol=0)


def rows_between(name: str) -> torch.Tensor:
    """rows[src, dst]: slots of rank src's tokens kept for experts on rank dst, all layers."""
    expected, cfg = reference(name), build(SCENARIOS[name][0], None).cfg
    capacity = expert_capacity(BATCH * TIME, cfg.experts_per_token, cfg.n_experts,
                               cfg.capacity_factor) or BATCH * TIME
    rows = torch.zeros(WORLD, WORLD, dtype=torch.long)
    for src in range(WORLD):
        for stats in expected["per_rank"][src]["output"].routing:
            kept = stats.tokens_per_expert.clamp(max=capacity)  # [E]
            rows[src] += kept.view(WORLD, -1).sum(1)  # experts of rank dst are block dst
    return rows


@pytest.mark.parametrize("name", ["dropless", "empty_experts", "capacity"])
def test_bytes_counted_are_the_rows_each_rank_sends(ranks, name):
    """Dispatch (and the combine's backward) sends a rank's own kept slots; the combine (and
    the dispatch's backward) sends back the rows its experts served. Dropless, a rank's
    dispatch is its tokens x K x D x 4 bytes per MoE layer, the formula."""
    rows, row_bytes, n_layers = rows_between(name), 32 * 4, 2
    if name != "capacity":
        assert (rows.sum(1) == n_layers * BATCH * TIME * 2).all()  # tokens x K per layer
    for rank, result in enumerate(ranks):
        sent, served = rows[rank], rows[:, rank]
        for kinds, counts in ((("dispatch", "combine_backward"), sent),
                              (("combine", "dispatch_backward"), served)):
            for kind in kinds:
                assert result[name]["bytes"][kind] == counts.sum() * row_bytes
                assert result[name]["remote"][kind] == (counts.sum() - counts[rank]) * row_bytes


def test_refuses_sizes_that_do_not_divide(ranks):
    assert "must divide the world size 2" in ranks[0]["refused_world"]
    assert "must divide model.n_experts = 3" in ranks[0]["refused_experts"]


def test_refuses_without_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        apply_expert_parallel(build([], None), 2)
