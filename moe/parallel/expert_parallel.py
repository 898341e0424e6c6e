"""Expert parallelism: the experts of each MoE layer split over P ranks, tokens sent to them.

Why: the experts hold almost all of an MoE model's parameters (GPT-4 is reported at about
1.8T), far more than one device holds, while each token needs only K of them. So each rank
keeps L = E / P experts of every MoE layer and the shared weights (attention, router,
norms, embedding) whole; a token travels to the ranks owning its experts and its outputs
travel back. This module changes a model that every rank has built in full with the same
seed (the model file knows nothing of it):

    plan = apply_expert_parallel(model, ep_size)      # MoELayer -> ExpertParallelMoE
    optimizer = make_optimizer(model, train_cfg)      # after: it must see the shards
    loss = model_loss(cfg, model(inputs), targets).total;  loss.backward()
    reduce_gradients(model, plan);  clip_grad_norm(model, plan, max_norm);  optimizer.step()

One MoE layer on one rank of an EP group (P ranks, rank p owning experts p*L .. p*L+L-1):

    route this rank's N tokens                       # the replicated router, as MoELayer
    slots choice-major, stable-sorted by expert      # rank 0's experts first, then rank 1's ...
    capacity applied here, per rank                  # = one process running this rank's batch
    counts [P, L] -> all_to_all -> rows each rank sends to each of my experts   [P, L]
    rows [kept, D] -> all_to_all (variable splits) -> received [R, D]
    received -> my L experts (kernels/moe_dispatch, K = 1, weight 1) -> out [R, D]
    out -> all_to_all (the splits reversed) -> returned [kept, D], in the sorted slot order
    y[token] += routing weight * returned row        # token order, as MoELayer

The exchanges are an autograd Function whose backward is the reverse exchange, so the
gradient of every rank's loss reaches the experts that served its tokens. Gradient scaling
(`reduce_gradients`): after backward a rank holds, for a shared weight, the gradient of
its own loss l_r, and for an expert weight the sum over its EP group of the ranks' losses.
The step wants the gradient of the mean loss (1 / W) sum_r l_r over all W ranks, so shared
gradients are averaged over the world, and expert gradients summed over the ranks that
hold the same experts (one per EP group: together they cover every rank) and divided by W.

Byte accounting (`plan.bytes_moved`): every exchange adds what this rank SENT, rows x D
x element size, in total (the share a rank sends to itself included: all_to_all copies
it) and to other ranks only. A rank's dispatch sends its kept slots, N x K rows when
dropless: the formula tokens x K x width x bytes, per layer and direction. Its combine
sends back the R rows its experts served (over the ranks, the same sum as the dispatches),
and the backward repeats both, reversed.

Collectives must line up: every rank of a group runs the same layers in the same order
(forward, and backward for all or none). Experts that receive no rows still run (on zero
rows), so their gradients are zeros and every rank's backward makes the same exchanges.

Shapes: N tokens on this rank, D d_model, E experts, K experts per token, P ranks per EP
group (ep_size), L = E / P experts per rank, R rows received by this rank, W world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kernels.moe_dispatch import expert_counts
from kernels.ops import expert_dispatch
from moe.model.moe_layer import MoELayer, copy_routing, swiglu
from moe.model.transformer import Transformer

EXPERT_FLAG = "is_expert_shard"  # attribute set on the w_in / w_out parameters we slice


# ---------------------------------------------------------------------------------------
# The plan and its byte counter
# ---------------------------------------------------------------------------------------

@dataclass
class ExchangeBytes:
    """Bytes this rank sent through all_to_all since the last `reset()`, by exchange.

    Keys: "dispatch" (token rows to the ranks of their experts), "combine" (expert outputs
    back), each again with "_backward" (the gradients sent back the same way reversed in
    the backward pass), and "counts" (the E row counts sent before each dispatch).
    `total` counts every row sent, `remote` only rows going to another rank.
    """

    total: dict[str, int] = field(default_factory=dict)
    remote: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, total: int, remote: int) -> None:
        self.total[kind] = self.total.get(kind, 0) + total
        self.remote[kind] = self.remote.get(kind, 0) + remote

    def reset(self) -> None:
        self.total.clear()
        self.remote.clear()


@dataclass
class ExpertParallelPlan:
    ep_size: int  # P: ranks that split one layer's experts
    ep_group: dist.ProcessGroup  # this rank's EP group: ranks [g*P, (g+1)*P)
    expert_dp_group: dist.ProcessGroup  # ranks holding the same experts (rank % P equal)
    local_experts: range  # global ids of the experts owned here
    n_experts: int  # E, experts per MoE layer in the full model
    expert_parameter_names: frozenset[str]  # e.g. "blocks.3.ffn.w_in", shape [L, ...]
    bytes_moved: ExchangeBytes = field(default_factory=ExchangeBytes)


# ---------------------------------------------------------------------------------------
# The exchange: all_to_all_single with variable splits, its backward the reverse
# ---------------------------------------------------------------------------------------

def _exchange(rows: Tensor, send_splits: list[int], recv_splits: list[int],
              group: dist.ProcessGroup, counter: ExchangeBytes, kind: str) -> Tensor:
    """rows [sum(send_splits), ...] -> [sum(recv_splits), ...]: chunk i goes to group rank i."""
    rows = rows.contiguous()
    received = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
    dist.all_to_all_single(received, rows, output_split_sizes=recv_splits,
                           input_split_sizes=send_splits, group=group)
    row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
    own = send_splits[dist.get_rank(group)]
    counter.add(kind, sum(send_splits) * row_bytes, (sum(send_splits) - own) * row_bytes)
    return received


class _AllToAll(torch.autograd.Function):
    """The token exchange; backward sends the gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, rows, send_splits, recv_splits, group, counter, kind):
        ctx.exchange = (send_splits, recv_splits, group, counter, kind)
        return _exchange(rows, send_splits, recv_splits, group, counter, kind)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits, group, counter, kind = ctx.exchange
        return (_exchange(grad, recv_splits, send_splits, group, counter, kind + "_backward"),
                None, None, None, None, None)


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------

class ExpertParallelMoE(MoELayer):
    """An MoELayer whose experts are spread over an EP group: x [B, T, D] -> (y, RoutingStats).

    Keeps the layer's router (replicated) and the slice `plan.local_experts` of its experts,
    under the same parameter names. A subclass, so the model treats it as its MoE layer.
    """

    def __init__(self, layer: MoELayer, plan: ExpertParallelPlan):
        nn.Module.__init__(self)  # not MoELayer's: it would allocate all E experts again
        copy_routing(layer, self)
        mine = slice(plan.local_experts.start, plan.local_experts.stop)
        self.w_in = nn.Parameter(layer.w_in.detach()[mine].clone())  # [L, D, 2F]
        self.w_out = nn.Parameter(layer.w_out.detach()[mine].clone())  # [L, F, D]
        for param in (self.w_in, self.w_out):
            setattr(param, EXPERT_FLAG, True)
        # Shared experts stay whole on every rank, like the router: each rank runs its own
        # tokens through them, so their gradients are averaged like any shared weight's.
        self.shared_w_in, self.shared_w_out = layer.shared_w_in, layer.shared_w_out
        self.plan = plan

    def extra_repr(self) -> str:
        experts = self.plan.local_experts
        return f"experts {experts.start}..{experts.stop - 1} of {self.plan.n_experts} on this rank"

    def run_experts(self, x: Tensor, expert_ids: Tensor, weights: Tensor,
                    capacity: int | None) -> tuple[Tensor, Tensor]:
        """MoELayer's routing (whatever the variant) has chosen expert_ids [N, K] with
        weights [N, K] for this rank's rows x [N, D]; send the rows to the ranks owning
        those experts and combine what comes back -> (y [N, D], dropped slots)."""
        plan = self.plan
        n_tokens, n_experts, n_local = x.shape[0], plan.n_experts, len(plan.local_experts)
        # ---- sort the slots by expert (so by owning rank), capacity on this rank's slots --
        slot_expert = expert_ids.t().reshape(-1)  # [S], slot s = choice * N + token
        slot_weight = weights.to(x.dtype).t().reshape(-1)  # [S]
        order = torch.argsort(slot_expert, stable=True)  # [S]
        counts = expert_counts(slot_expert, n_experts)  # [E]
        if capacity is not None:
            starts = counts.cumsum(0) - counts
            rank_in_run = torch.arange(order.numel(), device=x.device) - starts[slot_expert[order]]
            order = order[rank_in_run < capacity]
            counts = counts.clamp(max=capacity)
        dropped = slot_expert.new_tensor(slot_expert.numel()) - order.numel()
        tokens = order % n_tokens  # [kept]
        # ---- exchange counts, then rows --------------------------------------------------
        send_counts = counts.view(plan.ep_size, n_local)  # [P, L] by owning rank
        recv_counts = _exchange(send_counts, [1] * plan.ep_size, [1] * plan.ep_size,
                                plan.ep_group, plan.bytes_moved, "counts")  # [P, L] by source
        send_splits = send_counts.sum(1).tolist()
        recv_splits = recv_counts.sum(1).tolist()
        received = _AllToAll.apply(x[tokens], send_splits, recv_splits, plan.ep_group,
                                   plan.bytes_moved, "dispatch")  # [R, D]
        local_ids = torch.arange(n_local, device=x.device).repeat(plan.ep_size)
        local_ids = local_ids.repeat_interleave(recv_counts.reshape(-1))  # [R] expert per row
        out = self._run_local_experts(received, local_ids)  # [R, D]
        returned = _AllToAll.apply(out, recv_splits, send_splits, plan.ep_group,
                                   plan.bytes_moved, "combine")  # [kept, D]
        # ---- combine in token order ------------------------------------------------------
        y = torch.zeros_like(x).index_add_(0, tokens, returned * slot_weight[order, None])
        return y, dropped

    def _run_local_experts(self, rows: Tensor, local_ids: Tensor) -> Tensor:
        """rows [R, D] through expert local_ids [R] each, as MoELayer's dispatch with K = 1."""
        if rows.shape[0] == 0:  # still in the graph: zero grads, and the backward exchanges run
            return swiglu(rows, self.w_in[0], self.w_out[0])  # [0, D]
        unit = torch.ones(rows.shape[0], 1, device=rows.device, dtype=rows.dtype)  # [R, 1]
        out, _ = expert_dispatch(rows, local_ids[:, None], unit, self.w_in, self.w_out, None,
                                 self.kernel_backend)
        return out.to(rows.dtype)  # the exchange and combine stay in the rows' dtype


# ---------------------------------------------------------------------------------------
# Applying the plan
# ---------------------------------------------------------------------------------------

def _new_groups(blocks: list[list[int]]) -> dist.ProcessGroup:
    """Create every group (all ranks must, in the same order); return this rank's."""
    rank = dist.get_rank()
    mine = None
    for ranks in blocks:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def check_same_model(model: nn.Module, what: str, group: dist.ProcessGroup | None = None) -> None:
    """Refuse (on every rank alike) when the ranks of `group` built different weights: the
    sums of each parameter, as float64, must agree everywhere. `what` names the split."""
    sums = torch.stack([param.detach().double().sum() for param in model.parameters()])  # [params]
    low, high = sums.clone(), sums.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise ValueError("the ranks built different models: seed every rank the same "
                         "(torch.manual_seed) before building the model, or load the same "
                         f"checkpoint on every rank, then apply {what}")


def apply_expert_parallel(model: Transformer, ep_size: int) -> ExpertParallelPlan:
    """Split the experts of every MoE layer of `model` (built in full, the same on every
    rank: checked) over EP groups of `ep_size` consecutive ranks; returns the plan. In place."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert parallelism needs torch.distributed: launch with torchrun and "
                           "call torch.distributed.init_process_group() before "
                           "apply_expert_parallel")
    world, rank = dist.get_world_size(), dist.get_rank()
    n_experts = model.cfg.n_experts
    if ep_size < 1:
        raise ValueError(f"expert-parallel size must be at least 1, got {ep_size}")
    if world % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} must divide the world size {world}; "
                         f"launch a multiple of {ep_size} processes or pick a divisor of {world}")
    if n_experts % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} must divide model.n_experts = "
                         f"{n_experts}; pick a divisor of {n_experts}")
    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, MoELayer)]
    if not layers:
        raise ValueError("the model has no MoE layer: nothing for expert parallelism to split")
    if any(isinstance(module, ExpertParallelMoE) for _, module in layers):
        raise ValueError("expert parallelism is already applied to this model")
    check_same_model(model, "expert parallelism")
    ep_group = _new_groups([list(range(g, g + ep_size)) for g in range(0, world, ep_size)])
    expert_dp_group = _new_groups([list(range(r, world, ep_size)) for r in range(ep_size)])
    n_local = n_experts // ep_size
    ep_rank = rank % ep_size
    names = frozenset(f"{name}.{weight}" for name, _ in layers for weight in ("w_in", "w_out"))
    plan = ExpertParallelPlan(ep_size, ep_group, expert_dp_group,
                              range(ep_rank * n_local, (ep_rank + 1) * n_local), n_experts, names)
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ExpertParallelMoE(layer, plan))
    return plan


def is_expert_parameter(name: str, param: Tensor) -> bool:
    """Whether `param` is an expert shard (w_in / w_out of an ExpertParallelMoE); `name`
    only documents the call: the flag on the parameter survives wrappers' name prefixes."""
    return getattr(param, EXPERT_FLAG, False)


# ---------------------------------------------------------------------------------------
# Gradients: reduce, norm, clip
# ---------------------------------------------------------------------------------------

def _all_reduce_mean(grads: list[Tensor], group: dist.ProcessGroup | None, divisor: int) -> None:
    """Sum `grads` over `group` and divide by `divisor`, one flat collective per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for grad in grads:
        by_dtype.setdefault(grad.dtype, []).append(grad)
    for dtype in sorted(by_dtype, key=str):
        bucket = by_dtype[dtype]
        flat = torch.cat([grad.reshape(-1) for grad in bucket])
        dist.all_reduce(flat, group=group)
        flat /= divisor
        for grad, reduced in zip(bucket, flat.split([grad.numel() for grad in bucket])):
            grad.copy_(reduced.view_as(grad))


def reduce_gradients(model: nn.Module, plan: ExpertParallelPlan) -> None:
    """After backward, before clipping: make the gradients those of the mean of the W ranks'
    losses. Shared gradients: mean over the world. Expert gradients, which already sum the
    losses of this EP group (the backward exchange brought them): summed over the ranks
    with the same experts (one per EP group), divided by W. A missing gradient counts as
    zeros and is stored, so every rank reduces the same tensors and steps every weight."""
    shared, experts = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        (experts if is_expert_parameter(name, param) else shared).append(param.grad)
    world = dist.get_world_size()
    _all_reduce_mean(shared, None, world)
    _all_reduce_mean(experts, plan.expert_dp_group, world)


def grad_norm(model: nn.Module, plan: ExpertParallelPlan) -> Tensor:
    """The global L2 norm of the gradient, each expert shard counted once (call after
    reduce_gradients, when shared gradients agree on every rank): what one process
    holding the whole model would compute."""
    device = next(model.parameters()).device
    shared = torch.zeros((), device=device, dtype=torch.float32)
    experts = torch.zeros((), device=device, dtype=torch.float32)
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        square = param.grad.float().square().sum()
        if is_expert_parameter(name, param):
            experts += square
        else:
            shared += square
    dist.all_reduce(experts, group=plan.ep_group)  # the EP group holds every expert once
    return (shared + experts).sqrt()


def clip_grad_norm(model: nn.Module, plan: ExpertParallelPlan, max_norm: float) -> Tensor:
    """Scale gradients so their global norm is at most `max_norm`, as
    torch.nn.utils.clip_grad_norm_ on one process; returns the norm before clipping."""
    norm = grad_norm(model, plan)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for param in model.parameters():
        if param.grad is not None:
            param.grad.mul_(scale.to(param.grad.dtype))
    return norm


# ---------------------------------------------------------------------------------------
# Whole tensors and state dicts, as one process would hold them
# ---------------------------------------------------------------------------------------

def gather_expert_tensor(shard: Tensor, plan: ExpertParallelPlan) -> Tensor:
    """[L, ...] on each rank of the EP group -> [E, ...], the same on all of them."""
    shard = shard.detach().contiguous()
    pieces = [torch.empty_like(shard) for _ in range(plan.ep_size)]
    dist.all_gather(pieces, shard, group=plan.ep_group)
    return torch.cat(pieces)


def shard_expert_tensor(full: Tensor, plan: ExpertParallelPlan) -> Tensor:
    """[E, ...] -> this rank's experts [L, ...] (a copy)."""
    if full.shape[0] != plan.n_experts:
        raise ValueError(f"an expert tensor has {plan.n_experts} rows (one per expert), "
                         f"got shape {tuple(full.shape)}")
    return full[plan.local_experts.start:plan.local_experts.stop].clone()


def full_state_dict(model: nn.Module, plan: ExpertParallelPlan) -> dict[str, Tensor]:
    """The state dict of the single-process model: same names and shapes, experts gathered
    over the EP group; identical on every rank (a collective: all ranks must call it)."""
    full = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        full[name] = (gather_expert_tensor(tensor, plan) if is_expert_parameter(name, tensor)
                      else tensor.detach().clone())
    return full


def load_full_state_dict(model: nn.Module, plan: ExpertParallelPlan, state: dict[str, Tensor]) -> None:
    """Load a single-process state dict (e.g. full_state_dict's): experts sliced to this rank."""
    params = model.state_dict(keep_vars=True)
    model.load_state_dict({name: shard_expert_tensor(tensor, plan)
                           if name in params and is_expert_parameter(name, params[name]) else tensor
                           for name, tensor in state.items()})


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Parameters in the order of optimizer.state_dict()'s integer ids."""
    return [param for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer, plan: ExpertParallelPlan) -> dict:
    """optimizer.state_dict() with each expert parameter's per-element state (AdamW's
    exp_avg, exp_avg_sq) gathered to [E, ...]: what the optimizer of the single-process
    model (make_optimizer, same parameter order) loads. A collective."""
    state = optimizer.state_dict()
    for index, param in enumerate(_optimizer_params(optimizer)):
        if is_expert_parameter("", param) and index in state["state"]:
            state["state"][index] = {key: gather_expert_tensor(value, plan)
                                     if torch.is_tensor(value) and value.shape == param.shape else value
                                     for key, value in state["state"][index].items()}
    return state


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, plan: ExpertParallelPlan,
                                   state: dict) -> None:
    """Load a single-process optimizer state dict: expert moments sliced to this rank."""
    state = {**state, "state": dict(state["state"])}
    for index, param in enumerate(_optimizer_params(optimizer)):
        if is_expert_parameter("", param) and index in state["state"]:
            full_shape = (plan.n_experts, *param.shape[1:])
            state["state"][index] = {key: shard_expert_tensor(value, plan)
                                     if torch.is_tensor(value) and value.shape == full_shape else value
                                     for key, value in state["state"][index].items()}
    optimizer.load_state_dict(state)
