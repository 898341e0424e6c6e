"""The Mixture-of-Experts feed-forward layer: router, stacked SwiGLU experts, dispatch.

Why sparse: a token passes through K of E expert MLPs, so the layer holds E times the
parameters of one MLP but spends the FLOPs of K. GPT-4 is reported to use E = 16, K = 2.

The router is a linear map to E logits. Weights of the chosen experts follow Mixtral:
softmax over all E logits, keep the top K, renormalise the K probabilities to sum to 1.
With K = 1 we keep the raw top probability instead (Switch Transformer): renormalising a
single weight makes it the constant 1.0, and then the task loss sends no gradient to the
router at all.

Dispatch (kernels/moe_dispatch.py: the reference and a Triton kernel, picked by
`kernel_backend` in kernels/ops.py) groups the N x K (token, expert) slots by expert with one stable sort,
so each expert sees its tokens as one contiguous run and runs one batched matmul; the outputs,
scaled by their routing weights, are added back in token order. Slots are ordered
choice-major (every token's first choice before any second choice) before the sort, so
when a capacity limit is set, first choices win the places and later slots are dropped;
a token whose slots are all dropped passes through the layer unchanged on the residual.
The limit applies in training only: in eval mode (generation, serving) the layer is
dropless, so batched outputs equal one-request outputs.

Losses are not computed here: the layer returns its router logits and statistics and
`load_balancing_loss` / `router_z_loss` are applied once, outside, by the model's loss.

The variants that came after GPT-4's plain top-2 router are settings (moe/config.py), so
they can be compared on the same runs (benchmarks/routing_variants.py):

    router_score = "sigmoid"        one independent score per expert (DeepSeek-V3)
    balance = "bias"                no auxiliary loss: a per-expert bias, moved after each
                                    step toward even load, shifts which experts are chosen
                                    but not their weights (DeepSeek-V3, "auxiliary-loss-free")
    n_shared_experts = S            S experts every token runs through beside its K routed
                                    ones (DeepSeekMoE): common knowledge learned once
    routing = "expert_choice"       each expert takes its C best-scoring tokens (Zhou et al.
                                    2022): perfect balance, but a token's experts depend on
                                    the rest of the batch, later tokens included, so it is
                                    not causal and generation refuses it (transformer.py)

Shapes: N tokens, D d_model, F expert hidden width, E experts, K experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.moe_dispatch import expert_counts
from kernels.ops import expert_dispatch
from moe.config import ModelConfig
from moe.profiling import label


def swiglu(x: Tensor, w_in: Tensor, w_out: Tensor) -> Tensor:
    """SwiGLU MLP: x [N, D], w_in [D, 2F] (gate | up), w_out [F, D] -> [N, D]."""
    gate, up = (x @ w_in).chunk(2, dim=-1)  # 2 x [N, F]
    return (F.silu(gate) * up) @ w_out


class DenseFFN(nn.Module):
    """The dense SwiGLU feed-forward used by non-MoE layers (the same math as one expert)."""

    def __init__(self, d_model: int, d_hidden: int):
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(d_model, 2 * d_hidden))
        self.w_out = nn.Parameter(torch.empty(d_hidden, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return swiglu(x, self.w_in, self.w_out)


# ---------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------

@dataclass
class RoutingStats:
    """What one MoE layer reports for one forward pass (all tensors, no host sync)."""

    router_logits: Tensor  # [N, E] float32
    router_probs: Tensor  # [N, E] float32, each row sums to 1: softmax, or sigmoid scores normalised
    expert_ids: Tensor  # [N, K] chosen experts per token; expert choice: [N, E], -1 = not chosen
    tokens_per_expert: Tensor  # [E] slots routed to each expert (before capacity)
    dropped: Tensor  # [] slots dropped by capacity; expert choice: tokens no expert chose


def router_scores(logits: Tensor, score: str) -> Tensor:
    """logits [N, E] -> affinity scores [N, E] float32: a softmax over the experts, or
    DeepSeek-V3's sigmoid, one independent score per expert (experts do not compete for
    probability mass, so adding one does not shrink the others' scores)."""
    logits = logits.float()
    return logits.softmax(dim=-1) if score == "softmax" else logits.sigmoid()


def route(logits: Tensor, k: int, score: str = "softmax",
          bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Top-k token choice: logits [N, E] -> weights [N, K] (float32), expert ids [N, K].

    `bias` [E] (balance = "bias") shifts which experts are selected and nothing else: the
    weights are the unbiased scores of the chosen experts, so no gradient ever sees it."""
    return top_k(router_scores(logits, score), k, bias)


def top_k(scores: Tensor, k: int, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`route` from the scores [N, E] already computed (the layer keeps them for its losses)."""
    ids = (scores if bias is None else scores + bias).topk(k, dim=-1).indices  # [N, K], best first
    weights = scores.gather(-1, ids)
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_choice(scores: Tensor, capacity: int) -> tuple[Tensor, Tensor]:
    """Expert choice (Zhou et al., 2022): each expert takes the `capacity` tokens that score
    it highest. scores [N, E] -> tokens [E * C], weights [E * C] (expert e's rows at
    e*C .. e*C + C - 1, its score of each token). A token may be taken by several experts or
    by none; every expert is exactly full. Not causal: whether a token is taken depends on
    the scores of every other token in the batch, later ones included."""
    weights, tokens = scores.t().topk(capacity, dim=-1)  # [E, C] each
    return tokens.reshape(-1), weights.reshape(-1)


def expert_capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    """Slots each expert may take: ceil(capacity_factor * N * K / E); None = dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def load_balancing_loss(stats: RoutingStats) -> Tensor:
    """Switch Transformer auxiliary loss: E * sum_e f_e * P_e.

    f_e is the fraction of the routed slots that went to expert e and P_e the mean router
    probability of e over tokens (sigmoid scores normalised per token). Both sum to 1, so
    the loss is 1.0 at perfect balance and also whenever the router is exactly uniform
    (P_e = 1/E), and it grows as tokens and probability pile up on the same experts.
    Gradients flow through P only.
    """
    n_experts = stats.router_probs.shape[-1]
    fraction = stats.tokens_per_expert.float() / stats.tokens_per_expert.sum().clamp_min(1)  # f: [E]
    mean_prob = stats.router_probs.mean(dim=0)  # P: [E]
    return n_experts * (fraction * mean_prob).sum()


def router_z_loss(stats: RoutingStats) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return stats.router_logits.logsumexp(dim=-1).square().mean()


@torch.no_grad()
def update_balance_bias(layer: "MoELayer", load: Tensor) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing, once per optimiser step: raise the
    selection bias of each expert below the mean load and lower it for each above, by a
    fixed step: bias += rate * sign(mean(load) - load). `load` [E] is the step's slots per
    expert over every micro-batch and rank, so accumulation and data or expert parallelism
    give the update one process with the whole batch would make."""
    load = load.to(layer.balance_bias.device, torch.float32)
    layer.balance_bias += layer.bias_update_rate * torch.sign(load.mean() - load)


class MoELayer(nn.Module):
    """Router + E stacked SwiGLU experts (+ always-on shared experts): x [B, T, D] ->
    (y [B, T, D], RoutingStats)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.experts_per_token
        self.capacity_factor = cfg.capacity_factor
        self.jitter = cfg.router_jitter
        self.kernel_backend = cfg.kernel_backend
        self.score = cfg.router_score
        self.routing = cfg.routing
        self.bias_update_rate = cfg.bias_update_rate
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, 2 * cfg.d_expert))
        self.w_out = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert, cfg.d_model))
        # A buffer, not a parameter: saved with the weights, never given a gradient.
        self.register_buffer("balance_bias", torch.zeros(cfg.n_experts) if cfg.balance == "bias" else None)
        shared = cfg.n_shared_experts
        self.shared_w_in = nn.Parameter(torch.empty(shared, cfg.d_model, 2 * cfg.d_expert)) if shared else None
        self.shared_w_out = nn.Parameter(torch.empty(shared, cfg.d_expert, cfg.d_model)) if shared else None

    def extra_repr(self) -> str:
        variant = [f"{self.routing}, {self.score} scores"]
        if self.balance_bias is not None:
            variant.append("bias balancing")
        if self.shared_w_in is not None:
            variant.append(f"{self.shared_w_in.shape[0]} shared experts")
        return ", ".join(variant)

    def router_logits(self, x: Tensor) -> Tensor:
        """x [N, D] -> [N, E] float32. The matmul runs in float32 even under bf16 autocast
        (ST-MoE: the exponentials of a softmax router amplify bf16's rounding)."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        bias = self.router.bias  # None in our models; a test may set one to steer routing
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.router.weight.float(), None if bias is None else bias.float())

    def forward(self, x: Tensor) -> tuple[Tensor, RoutingStats]:
        batch_shape = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [N, D]
        n_tokens = x.shape[0]
        with label("router"):  # profiler labels (benchmarks/bench_decode.py)
            logits = self.router_logits(x)  # [N, E]
            n_experts = logits.shape[-1]
            scores = router_scores(logits, self.score)  # [N, E]
            if self.routing == "token_choice":
                weights, expert_ids = top_k(scores, self.k, self.balance_bias)  # [N, K] each
        if self.routing == "expert_choice":
            # Every expert is full by construction, in training and at inference alike.
            capacity = min(n_tokens, expert_capacity(n_tokens, self.k, n_experts, self.capacity_factor or 1.0))
            tokens, weights = expert_choice(scores, capacity)  # [E * C] each
            experts = torch.arange(n_experts, device=x.device).repeat_interleave(capacity)  # [E * C]
            with label("dispatch"):
                rows, _ = self.run_experts(x[tokens], experts[:, None], weights[:, None], None)  # [E * C, D]
            y = torch.zeros_like(x).index_add_(0, tokens, rows.to(x.dtype))
            expert_ids = torch.full_like(logits, -1, dtype=torch.int64).index_put_((tokens, experts), experts)
            tokens_per_expert = torch.full((n_experts,), capacity, dtype=torch.int64, device=x.device)
            dropped = (expert_ids < 0).all(-1).sum()  # tokens no expert took: residual only
        else:
            # Capacity is a training device (it bounds each expert's work per batch); at inference
            # every layer is dropless, so a token's output never depends on what shares its batch.
            capacity = (expert_capacity(n_tokens, self.k, n_experts, self.capacity_factor)
                        if self.training else None)
            with label("dispatch"):
                y, dropped = self.run_experts(x, expert_ids, weights, capacity)
            tokens_per_expert = expert_counts(expert_ids, n_experts)
        if self.shared_w_in is not None:
            with label("dispatch"):
                y = y + self.run_shared_experts(x)
        probs = scores if self.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        stats = RoutingStats(logits, probs, expert_ids, tokens_per_expert, dropped)
        return y.reshape(*batch_shape, -1), stats

    def run_experts(self, x: Tensor, expert_ids: Tensor, weights: Tensor,
                    capacity: int | None) -> tuple[Tensor, Tensor]:
        """Rows x [N, D] through their routed experts expert_ids [N, K] (kernels/ops.py picks
        the kernel) -> (y [N, D], dropped slots). Expert parallelism overrides this alone."""
        return expert_dispatch(x, expert_ids, weights, self.w_in, self.w_out, capacity,
                               self.kernel_backend)

    def run_shared_experts(self, x: Tensor) -> Tensor:
        """Every token through every shared expert, weight 1: the same dispatch with K = S."""
        n_shared = self.shared_w_in.shape[0]
        ids = torch.arange(n_shared, device=x.device).expand(x.shape[0], n_shared)  # [N, S]
        y, _ = expert_dispatch(x, ids, torch.ones(ids.shape, device=x.device), self.shared_w_in,
                               self.shared_w_out, None, self.kernel_backend)
        return y.to(x.dtype)


def copy_routing(source: MoELayer, target: nn.Module) -> None:
    """Give `target` (an expert- or tensor-parallel layer built without MoELayer.__init__)
    the routing of `source`: its settings, its router and its balance bias, shared, not copied."""
    for name in ("k", "capacity_factor", "jitter", "kernel_backend", "score", "routing", "bias_update_rate"):
        setattr(target, name, getattr(source, name))
    target.router = source.router
    target.register_buffer("balance_bias", source.balance_bias)
