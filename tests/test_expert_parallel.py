"""Expert parallelism over Gloo ranks equals one process holding the whole model.

Worker processes (started once for the whole file: 2 ranks, then 4 ranks in two EP
groups) build the same model, apply expert parallelism, run one training step on their
own batch and save what they saw; the tests compare it here against the single-process
model run on every rank's batch, with the loss (loss(batch 0) + loss(batch 1) + ...) / W
whose gradient reduce_gradients must reproduce.
"""

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe.config import TrainConfig, load_model_config
from moe.parallel.expert_parallel import (apply_expert_parallel, clip_grad_norm, full_optimizer_state_dict,
                                 full_state_dict, gather_expert_tensor, is_expert_parameter,
                                 load_full_optimizer_state_dict, load_full_state_dict,
                                 reduce_gradients)
from moe.model.transformer import Transformer, model_loss
from moe.model.moe_layer import expert_capacity
from moe.training.loop import make_optimizer

BATCH, TIME = 2, 8  # per rank: N = 16 tokens
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
SMALL = ["model.vocab_size=259", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_expert=16",
         "model.n_experts=4", "model.max_seq_len=16", "model.router_jitter=0.0",
         "model.kernel_backend=\"torch\""]
MAX_NORM = 0.05  # below the gradient norm, so clipping acts
TRAIN = TrainConfig(lr=1e-3)
NEVER = -30.0  # a router bias that keeps an expert out of every token's top 2
SCENARIOS = {  # name: (config overrides, world size, ep_size, router bias per MoE layer)
    "dropless": ([], 2, 2, None),
    # layer 0: every token to experts 0 and 1 (rank 0's), so rank 1 receives no row at all;
    # layer 1: expert 0 gets no token
    "empty_experts": ([], 2, 2, [[0.0, 0.0, NEVER, NEVER], [NEVER, 0.0, 0.0, 0.0]]),
    "capacity": (["model.capacity_factor=0.5"], 2, 2, None),
    "ep1_tied": (["model.tie_embeddings=true"], 2, 1, None),  # experts replicated, as data
    "two_groups": ([], 4, 2, None),  # EP groups {0, 1}, {2, 3}; experts reduced 0+2, 1+3
    "triton_kernels": (["model.kernel_backend=\"triton\""], 2, 2, None),  # the GPU path, interpreted
}


def build(overrides: list[str], biases, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(load_model_config(TINY, SMALL + overrides))
    for block, bias in zip(model.blocks, biases or []):
        block.ffn.router.bias = torch.nn.Parameter(torch.tensor(bias))
    return model.train()


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    tokens = torch.randint(0, 259, (2, BATCH, TIME), generator=generator)
    return tokens[0], tokens[1]


def run_expert_parallel(rank: int, overrides, ep_size, biases) -> dict:
    """One training step on this rank's batch, and what it produced."""
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


def refusal(overrides: list[str], ep_size: int, seed: int = 0) -> str:
    try:
        apply_expert_parallel(build(overrides, None, seed), ep_size)
    except ValueError as error:
        return str(error)
    return "accepted"


def worker(rank: int, folder: Path, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}",
                            rank=rank, world_size=world)
    try:
        results = {name: run_expert_parallel(rank, overrides, ep_size, biases)
                   for name, (overrides, size, ep_size, biases) in SCENARIOS.items() if size == world}
        results["refused_world"] = refusal(["model.n_experts=6"], 3)
        results["refused_experts"] = refusal(["model.n_experts=3"], 2)
        results["refused_seeds"] = refusal([], 2, seed=rank)
        torch.save(results, folder / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[int, list[dict]]:
    """What each rank saved, for worlds of 2 and 4 ranks."""
    runs = {}
    for world in sorted({setup[1] for setup in SCENARIOS.values()}):
        folder = tmp_path_factory.mktemp(f"expert_parallel_{world}")
        # fork, not spawn: no worker re-imports torch (seconds each on 2 cores); like
        # DataLoader workers, they run torch with one thread after the fork
        mp.start_processes(worker, args=(folder, world), nprocs=world, start_method="fork")
        runs[world] = [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
    return runs


def ranks_of(worlds: dict, name: str) -> list[dict]:
    return [result[name] for result in worlds[SCENARIOS[name][1]]]


@functools.cache
def reference(name: str) -> dict:
    """The single-process model on every rank's batch: losses per batch, the gradients of
    their mean, then one clipped AdamW step."""
    overrides, world, _, biases = SCENARIOS[name]
    model = build(overrides, biases)
    optimizer = make_optimizer(model, TRAIN)
    start = {key: value.clone() for key, value in model.state_dict().items()}
    per_rank, mean = [], 0.0
    for rank in range(world):
        inputs, targets = batch(rank)
        output = model(inputs)
        loss = model_loss(model.cfg, output, targets)
        per_rank.append({"output": output, "loss": loss})
        mean = mean + loss.total / world
    mean.backward()
    grads = {key: p.grad.clone() for key, p in model.named_parameters()}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    optimizer.step()
    return {"per_rank": per_rank, "grads": grads, "norm": norm, "start": start,
            "stepped": model.state_dict(), "moments": optimizer.state_dict()}


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_forward_and_losses_equal_one_process(worlds, name):
    expected = reference(name)
    for result, single in zip(ranks_of(worlds, name), expected["per_rank"], strict=True):
        output, loss = single["output"], single["loss"]
        close(result["logits"], output.logits.detach())
        for key, value in (("ce", loss.cross_entropy), ("aux", loss.aux), ("z", loss.z)):
            close(result[key], value.detach())
        assert result["dropped"] == [stats.dropped.item() for stats in output.routing]
        for got, stats in zip(result["tokens_per_expert"], output.routing, strict=True):
            assert got.tolist() == stats.tokens_per_expert.tolist()


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_reduced_gradients_are_those_of_the_mean_loss(worlds, name):
    expected = reference(name)
    for result in ranks_of(worlds, name):
        assert result["grads"].keys() == expected["grads"].keys()
        for key, grad in expected["grads"].items():
            close(result["grads"][key], grad)
        close(result["norm"], expected["norm"])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_clipped_adamw_step_equals_one_process(worlds, name):
    expected = reference(name)
    for result in ranks_of(worlds, name):
        for key, value in expected["stepped"].items():
            close(result["stepped"][key], value)
        for index, state in expected["moments"]["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                close(result["moments"]["state"][index][key], state[key])


def test_scenarios_cover_empty_experts_and_drops(worlds):
    layer0, layer1 = ranks_of(worlds, "empty_experts")[1]["tokens_per_expert"]
    assert layer0[2:].sum() == 0 and layer1[0] == 0  # rank 1 receives nothing in layer 0
    assert all(sum(result["dropped"]) > 0 for result in ranks_of(worlds, "capacity"))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_full_state_dict_round_trips_the_single_process_state(worlds, name):
    expected = reference(name)
    for result in ranks_of(worlds, name):
        for saved in ("start", "reloaded"):
            assert result[saved].keys() == expected["start"].keys()
            for key, value in expected["start"].items():
                torch.testing.assert_close(result[saved][key], value, rtol=0, atol=0)
        for index, state in result["moments"]["state"].items():
            for key, value in state.items():
                torch.testing.assert_close(result["moments_reloaded"]["state"][index][key], value,
                                           rtol=0, atol=0)


def rows_between(name: str) -> torch.Tensor:
    """rows[src, dst]: slots of rank src's tokens kept for experts on rank dst, all layers."""
    overrides, world, ep_size, _ = SCENARIOS[name]
    expected, cfg = reference(name), build(overrides, None).cfg
    capacity = expert_capacity(BATCH * TIME, cfg.experts_per_token, cfg.n_experts,
                               cfg.capacity_factor) or BATCH * TIME
    rows = torch.zeros(world, world, dtype=torch.long)
    for src in range(world):
        group = slice(src - src % ep_size, src - src % ep_size + ep_size)  # its EP group
        for stats in expected["per_rank"][src]["output"].routing:
            kept = stats.tokens_per_expert.clamp(max=capacity)  # [E]
            rows[src, group] += kept.view(ep_size, -1).sum(1)  # group rank p owns block p
    return rows


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bytes_counted_are_the_rows_each_rank_sends(worlds, name):
    """Dispatch (and the combine's backward) sends a rank's own kept slots; the combine (and
    the dispatch's backward) sends back the rows its experts served. Dropless, a rank's
    dispatch is its tokens x K x D x 4 bytes per MoE layer, the formula."""
    rows, row_bytes, n_layers = rows_between(name), 32 * 4, 2
    if SCENARIOS[name][0] == []:  # dropless: tokens x K per layer
        assert (rows.sum(1) == n_layers * BATCH * TIME * 2).all()
    for rank, result in enumerate(ranks_of(worlds, name)):
        sent, served = rows[rank], rows[:, rank]
        for kinds, counts in ((("dispatch", "combine_backward"), sent),
                              (("combine", "dispatch_backward"), served)):
            for kind in kinds:
                assert result["bytes"][kind] == counts.sum() * row_bytes
                assert result["remote"][kind] == (counts.sum() - counts[rank]) * row_bytes


def test_refuses_sizes_that_do_not_divide(worlds):
    assert "must divide the world size 2" in worlds[2][0]["refused_world"]
    assert "must divide model.n_experts = 3" in worlds[2][0]["refused_experts"]


def test_refuses_ranks_that_built_different_models(worlds):
    for result in worlds[2]:
        assert "the ranks built different models" in result["refused_seeds"]


def test_refuses_without_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        apply_expert_parallel(build([], None), 2)
