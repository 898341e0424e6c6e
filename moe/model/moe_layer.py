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
    expert_ids: Tensor  # [N, K] chosen experts per token
    tokens_per_expert: Tensor  # [E] slots routed to each expert (before capacity)
    dropped: Tensor  # [] slots dropped by the capacity limit


def route(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k routing: logits [N, E] -> weights [N, K] (float32), expert ids [N, K]."""
    probs = logits.float().softmax(dim=-1)  # [N, E]
    weights, ids = probs.topk(k, dim=-1)  # [N, K] each, best first
    if k > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def expert_capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    """Slots each expert may take: ceil(capacity_factor * N * K / E); None = dropless."""
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def load_balancing_loss(stats: RoutingStats) -> Tensor:
    """Switch Transformer auxiliary loss: E * sum_e f_e * P_e.

    f_e is the fraction of the N*K slots routed to expert e and P_e the mean router
    probability of e over tokens. Both sum to 1, so the loss is 1.0 at perfect balance and
    also whenever the router is exactly uniform (P_e = 1/E), and it grows as tokens and
    probability pile up on the same experts. Gradients flow through P only.
    """
    n_experts = stats.router_logits.shape[-1]
    fraction = stats.tokens_per_expert.float() / stats.expert_ids.numel()  # f: [E]
    mean_prob = stats.router_logits.softmax(dim=-1).mean(dim=0)  # P: [E]
    return n_experts * (fraction * mean_prob).sum()


def router_z_loss(stats: RoutingStats) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    return stats.router_logits.logsumexp(dim=-1).square().mean()


class MoELayer(nn.Module):
    """Router + E stacked SwiGLU experts: x [B, T, D] -> (y [B, T, D], RoutingStats)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.experts_per_token
        self.capacity_factor = cfg.capacity_factor
        self.jitter = cfg.router_jitter
        self.kernel_backend = cfg.kernel_backend
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_model, 2 * cfg.d_expert))
        self.w_out = nn.Parameter(torch.empty(cfg.n_experts, cfg.d_expert, cfg.d_model))

    def forward(self, x: Tensor) -> tuple[Tensor, RoutingStats]:
        batch_shape = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # [N, D]
        router_in = x
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            router_in = x * noise
        logits = self.router(router_in).float()  # [N, E]
        weights, expert_ids = route(logits, self.k)  # [N, K] each
        # Capacity is a training device (it bounds each expert's work per batch); at inference
        # every layer is dropless, so a token's output never depends on what shares its batch.
        capacity = (expert_capacity(x.shape[0], self.k, logits.shape[-1], self.capacity_factor)
                    if self.training else None)
        y, dropped = expert_dispatch(x, expert_ids, weights, self.w_in, self.w_out, capacity,
                                     self.kernel_backend)  # kernels/ops.py
        tokens_per_expert = expert_counts(expert_ids, logits.shape[-1])
        stats = RoutingStats(logits, expert_ids, tokens_per_expert, dropped)
        return y.reshape(*batch_shape, -1), stats
