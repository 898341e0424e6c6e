"""Tensor parallelism for inference: each layer's heads and hidden columns split over P ranks.

Why: GPT-4 is reported to serve each copy of the model from one node, its layers split
8-way tensor-parallel: every GPU holds 1/P of every attention and FFN matrix, so a
model too big for one device runs with all P working on every token, and the ranks meet
in two all_reduces per block (Megatron-LM). This module changes a model that every rank
has built in full with the same weights (checked) in place; the model file knows
nothing of it:

    dist.init_process_group(...)                  # P ranks, one per device
    plan = apply_tensor_parallel(model)           # the same call on every rank
    generate(model, prompt, SamplingParams(...))  # on every rank: the same tokens everywhere

One block on rank p (x replicated, the same on every rank):

    attention:  q = x @ wq[heads of p]              column-parallel: H / P query heads
                k, v = x @ wk, wv[KV heads of p]    see below
                out = attend(q, k, v) @ wo[rows of p's heads]   row-parallel: a partial sum
                x += all_reduce(out)                # sum over ranks: the full projection
    MoE:        router(x) replicated -> the same routing, capacity and drops on every rank
                each expert keeps its hidden columns p*F/P .. (p+1)*F/P: w_in [E, D, 2F/P]
                (gate and up columns of the same hidden units, so SwiGLU pairs stay
                together), w_out [E, F/P, D]; the weighted combine is linear, so
                x += all_reduce(combine)           # sum over ranks: the full MoE output
    dense FFN:  the same split of w_in [D, 2F] / w_out [F, D] and one all_reduce

KV heads: with G % P == 0 rank p keeps its G / P heads, and each of its query heads
still reads KV head h // (H / G). With fewer KV heads than ranks (P % G == 0) the ranks
cannot split them: rank p keeps the one KV head its H / P query heads share, so each KV
head is computed and cached on P / G ranks. Multi-query attention (G = 1, GPT-4) is the
extreme: K, V and the whole KV cache are replicated on every rank, which is why
tensor parallelism does not shrink GPT-4's per-GPU cache, only its weights. Other G
(neither divides the other) would leave a rank's query heads straddling KV heads:
refused.

The embedding, the norms, the routers and the LM head are replicated (small next to the
attention and expert matrices; the logits come out whole on every rank with no gather).

The KV cache: moe/serving/cache.py sizes a cache from the model's config, so `model.cfg` becomes
this rank's config (n_heads = H / P, n_kv_heads the KV heads kept, d_expert = F / P,
d_ff / P; the full one is `plan.full_cfg`). Every cache built from `model.cfg` (generate,
the engine's paged cache) then holds only this rank's heads, without a change to the
cache, and `count_parameters(model.cfg)` counts exactly the parameters on this rank.

Inference only: the all_reduce is not an autograd operation (Megatron's backward needs a
second, transposed collective), so `apply_tensor_parallel` freezes every parameter and
puts the model in eval mode, and a forward that would record gradients, or runs in train
mode (router jitter and dropout draw random numbers per rank), is refused.

Byte accounting (`plan.bytes_reduced`): each all_reduce adds the size of the tensor it
sums, rows x D x element size with rows = B x T of the forward. Per forward pass that is
2 x n_layers x B x T x D x element bytes ("attention" and "ffn" halves); a ring
all_reduce puts 2 (P - 1) / P times that on each rank's link.

Shapes: B batch, T time, D d_model, H query heads, G KV heads, Dh head_dim, E experts,
F expert (or dense) hidden width, P tensor-parallel ranks; a trailing l marks this
rank's share (Hl = H / P).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe.model.attention import Attention
from moe.config import ModelConfig
from moe.parallel.expert_parallel import ExpertParallelMoE, check_same_model
from moe.model.transformer import Transformer
from moe.model.moe_layer import DenseFFN, MoELayer, RoutingStats, copy_routing


# ---------------------------------------------------------------------------------------
# The plan and its byte counter
# ---------------------------------------------------------------------------------------

@dataclass
class ReducedBytes:
    """Bytes this rank summed through all_reduce since the last `reset()`, by kind:
    "attention" (after the output projection) and "ffn" (after the MoE combine or the
    dense FFN)."""

    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, n_bytes: int) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + n_bytes

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def reset(self) -> None:
        self.by_kind.clear()


@dataclass
class TensorParallelPlan:
    tp_size: int  # P: ranks that split every layer
    tp_rank: int  # p: this rank's index in the group
    group: dist.ProcessGroup | None  # None = the default (world) group
    full_cfg: ModelConfig  # the model as one process builds it
    local_cfg: ModelConfig  # this rank's share; also set as model.cfg
    query_heads: range  # global query heads computed here
    kv_heads: range  # global KV heads computed (and cached) here
    bytes_reduced: ReducedBytes = field(default_factory=ReducedBytes)


def _all_reduce(partial: Tensor, plan: TensorParallelPlan, kind: str, training: bool) -> Tensor:
    """Sum this rank's partial output [B, T, D] over the group, in place, and count it."""
    if training or (torch.is_grad_enabled() and partial.requires_grad):
        raise RuntimeError("tensor parallelism is for inference only (its all_reduce has no "
                           "backward): call model.eval() and run under torch.no_grad(), and "
                           "train with data or expert parallelism instead")
    dist.all_reduce(partial, group=plan.group)
    plan.bytes_reduced.add(kind, partial.numel() * partial.element_size())
    return partial


def _frozen(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=False)


def _linear(weight: Tensor) -> nn.Linear:
    """A bias-free Linear holding `weight` [out, in] (built on meta: no throwaway init)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = _frozen(weight)
    return layer


def _hidden_columns(w_in: Tensor, plan: TensorParallelPlan) -> Tensor:
    """[..., D, 2F] laid out (gate | up) -> [..., D, 2F/P]: this rank's gate columns, then
    the up columns of the same hidden units."""
    gate, up = w_in.chunk(2, dim=-1)  # 2 x [..., D, F]
    width = gate.shape[-1] // plan.tp_size
    mine = slice(plan.tp_rank * width, (plan.tp_rank + 1) * width)
    return torch.cat([gate[..., mine], up[..., mine]], dim=-1)


def _hidden_rows(w_out: Tensor, plan: TensorParallelPlan) -> Tensor:
    """[..., F, D] -> [..., F/P, D]: the rows of this rank's hidden units."""
    width = w_out.shape[-2] // plan.tp_size
    return w_out[..., plan.tp_rank * width:(plan.tp_rank + 1) * width, :]


def _units_repr(plan: TensorParallelPlan, width: int) -> str:
    share = width // plan.tp_size
    first = plan.tp_rank * share
    return f"hidden units {first}..{first + share - 1} of {width} on this rank"


# ---------------------------------------------------------------------------------------
# The layers: subclasses, so the model treats them as what they replace
# ---------------------------------------------------------------------------------------

class TensorParallelAttention(Attention):
    """Attention over this rank's query and KV heads; output summed over the group."""

    def __init__(self, attention: Attention, plan: TensorParallelPlan):
        nn.Module.__init__(self)  # not Attention's: it would allocate all H heads again
        self.layer, self.head_dim = attention.layer, attention.head_dim
        self.dropout, self.kernel_backend = attention.dropout, attention.kernel_backend
        self.n_heads, self.n_kv_heads = len(plan.query_heads), len(plan.kv_heads)
        dh, q, kv = self.head_dim, plan.query_heads, plan.kv_heads
        self.wq = _linear(attention.wq.weight[q.start * dh:q.stop * dh])  # [Hl*Dh, D]
        self.wk = _linear(attention.wk.weight[kv.start * dh:kv.stop * dh])  # [Gl*Dh, D]
        self.wv = _linear(attention.wv.weight[kv.start * dh:kv.stop * dh])  # [Gl*Dh, D]
        self.wo = _linear(attention.wo.weight[:, q.start * dh:q.stop * dh])  # [D, Hl*Dh]
        self.plan = plan

    def extra_repr(self) -> str:
        q, kv = self.plan.query_heads, self.plan.kv_heads
        return (f"query heads {q.start}..{q.stop - 1}, KV heads {kv.start}..{kv.stop - 1} "
                f"of {self.plan.full_cfg.n_heads} / {self.plan.full_cfg.n_kv_heads} on this rank")

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], positions: Tensor,
                cache=None) -> Tensor:
        partial = super().forward(x, rope, positions, cache)  # [B, T, D], this rank's heads
        return _all_reduce(partial, self.plan, "attention", self.training)


class TensorParallelMoE(MoELayer):
    """An MoELayer whose experts keep F/P hidden units each; the router is replicated."""

    def __init__(self, layer: MoELayer, plan: TensorParallelPlan):
        nn.Module.__init__(self)  # not MoELayer's: it would allocate the full experts again
        copy_routing(layer, self)
        self.w_in = _frozen(_hidden_columns(layer.w_in, plan))  # [E, D, 2F/P]
        self.w_out = _frozen(_hidden_rows(layer.w_out, plan))  # [E, F/P, D]
        self.shared_w_in = self.shared_w_out = None  # shared experts split the same way
        if layer.shared_w_in is not None:
            self.shared_w_in = _frozen(_hidden_columns(layer.shared_w_in, plan))  # [S, D, 2F/P]
            self.shared_w_out = _frozen(_hidden_rows(layer.shared_w_out, plan))  # [S, F/P, D]
        self.plan = plan

    def extra_repr(self) -> str:
        return _units_repr(self.plan, self.plan.full_cfg.d_expert) + ", in every expert"

    def forward(self, x: Tensor) -> tuple[Tensor, RoutingStats]:
        partial, stats = super().forward(x)  # [B, T, D]: every expert's share of p's units
        return _all_reduce(partial, self.plan, "ffn", self.training), stats


class TensorParallelDenseFFN(DenseFFN):
    """The dense SwiGLU FFN with F/P hidden units; output summed over the group."""

    def __init__(self, ffn: DenseFFN, plan: TensorParallelPlan):
        nn.Module.__init__(self)
        self.w_in = _frozen(_hidden_columns(ffn.w_in, plan))  # [D, 2F/P]
        self.w_out = _frozen(_hidden_rows(ffn.w_out, plan))  # [F/P, D]
        self.plan = plan

    def extra_repr(self) -> str:
        return _units_repr(self.plan, self.plan.full_cfg.d_ff)

    def forward(self, x: Tensor) -> Tensor:
        return _all_reduce(super().forward(x), self.plan, "ffn", self.training)


# ---------------------------------------------------------------------------------------
# Applying it
# ---------------------------------------------------------------------------------------

def _check_sizes(cfg: ModelConfig, size: int) -> None:
    """Refuse, with the fix, shapes that do not split evenly over `size` ranks."""
    if cfg.n_heads % size:
        raise ValueError(f"tensor-parallel size {size} must divide model.n_heads = {cfg.n_heads}; "
                         f"run a divisor of {cfg.n_heads} ranks or pick n_heads divisible by {size}")
    if cfg.n_kv_heads % size and size % cfg.n_kv_heads:
        raise ValueError(f"model.n_kv_heads = {cfg.n_kv_heads} and the tensor-parallel size {size} "
                         "must divide one another (split the KV heads, or share one per rank); "
                         f"pick n_kv_heads = 1 (multi-query) or a multiple of {size}")
    if cfg.moe_layers and cfg.d_expert % size:
        raise ValueError(f"tensor-parallel size {size} must divide model.d_expert = {cfg.d_expert} "
                         f"(each expert's hidden units are split); pick d_expert divisible by {size}")
    if len(cfg.moe_layers) < cfg.n_layers and cfg.d_ff % size:
        raise ValueError(f"tensor-parallel size {size} must divide model.d_ff = {cfg.d_ff} (the "
                         f"dense layers' hidden units are split); pick d_ff divisible by {size}")


def apply_tensor_parallel(model: Transformer, group: dist.ProcessGroup | None = None) -> TensorParallelPlan:
    """Split every attention and FFN layer of `model` (built in full, the same on every
    rank of `group`: checked) over the ranks of `group` (None = all ranks). In place: the
    layers are swapped for their tensor-parallel versions, `model.cfg` becomes this rank's
    config, every parameter is frozen and the model is put in eval mode (inference only)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tensor parallelism needs torch.distributed: launch with torchrun and "
                           "call torch.distributed.init_process_group() before "
                           "apply_tensor_parallel")
    modules = list(model.modules())
    if any(isinstance(m, (TensorParallelAttention, TensorParallelMoE, TensorParallelDenseFFN))
           for m in modules):
        raise ValueError("tensor parallelism is already applied to this model")
    if any(isinstance(m, ExpertParallelMoE) for m in modules):
        raise ValueError("this model's experts are already split by expert parallelism; "
                         "tensor parallelism applies to a model built in full")
    cfg, size, rank = model.cfg, dist.get_world_size(group), dist.get_rank(group)
    _check_sizes(cfg, size)
    check_same_model(model, "tensor parallelism", group)
    heads = cfg.n_heads // size  # Hl
    query_heads = range(rank * heads, (rank + 1) * heads)
    group_size = cfg.kv_group_size  # query heads per KV head, H / G
    kv_heads = range(query_heads.start // group_size, (query_heads.stop - 1) // group_size + 1)
    local_cfg = dataclasses.replace(
        cfg, n_heads=heads, n_kv_heads=len(kv_heads),
        d_expert=cfg.d_expert // size if cfg.moe_layers else cfg.d_expert,
        d_ff=cfg.d_ff // size if len(cfg.moe_layers) < cfg.n_layers else cfg.d_ff)
    plan = TensorParallelPlan(size, rank, group, cfg, local_cfg, query_heads, kv_heads)
    with torch.no_grad():
        for block in model.blocks:
            block.attention = TensorParallelAttention(block.attention, plan)
            block.ffn = (TensorParallelMoE(block.ffn, plan) if isinstance(block.ffn, MoELayer)
                         else TensorParallelDenseFFN(block.ffn, plan))
    model.cfg = local_cfg
    model.tensor_parallel = plan  # generation refuses unseeded sampling on it (every rank must draw alike)
    model.requires_grad_(False)
    model.eval()
    return plan
