"""The transformer: embedding, N pre-norm blocks (attention, then MoE or dense FFN), head.

Data flow, one forward pass:

    tokens [B, T] -> embedding [B, T, D]
      -> N x ( x += Attention(RMSNorm(x));  x += FFN(RMSNorm(x)) )   FFN = MoE or dense
      -> RMSNorm -> LM head -> logits [B, T, V]

With model.short_conv = W each attention input h (and each FFN input, with short_conv_ffn)
first takes in its W - 1 predecessors, h_t + sum_j a_j * h_(t-j) per channel
(moe/model/short_conv.py), so that one attention layer can match on what came just before
a token, the job of a second layer otherwise.

Every MoE layer also returns its routing statistics; `model_loss` turns them into the
load-balancing and z-losses once, outside the layers, so there is no hidden global state.

Parameter counts come from the config alone (`count_parameters`), so the cost estimator
can size GPT-4 (about 1.8T parameters) without building it; a test checks that they equal
`numel` of a built model exactly.

Shapes: B batch, T time, D d_model, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.model.attention import Attention, rope_angles
from moe.config import ConfigError, ModelConfig
from moe.model.moe_layer import DenseFFN, MoELayer, RoutingStats, load_balancing_loss, router_z_loss
from moe.model.short_conv import ShortConv


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.short_conv = ShortConv(cfg.d_model, cfg.short_conv) if cfg.short_conv else None
        self.attention = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn_conv = ShortConv(cfg.d_model, cfg.short_conv) if cfg.short_conv_ffn else None
        self.sites = cfg.conv_sites
        self.ffn = MoELayer(cfg) if cfg.is_moe_layer(layer) else DenseFFN(cfg.d_model, cfg.d_ff)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope, positions: Tensor, cache) -> tuple[Tensor, RoutingStats | None]:
        h = self.attention_norm(x)
        if self.short_conv is not None:
            h = self.mix(self.short_conv, 0, h, positions, cache)
        x = x + self.dropout(self.attention(h, rope, positions, cache))
        h = self.ffn_norm(x)
        if self.ffn_conv is not None:
            h = self.mix(self.ffn_conv, 1, h, positions, cache)
        out = self.ffn(h)
        out, stats = out if isinstance(self.ffn, MoELayer) else (out, None)
        return x + self.dropout(out), stats

    def mix(self, conv: ShortConv, site: int, h: Tensor, positions: Tensor, cache) -> Tensor:
        """conv over h [B, T, D]; over a cache the taps read earlier inputs from it, kept
        at index layer * sites + site."""
        if cache is None:
            return conv(h)
        return cache.mix_inputs(self.layer * self.sites + site, h, positions, conv.weight)


@dataclass
class ModelOutput:
    logits: Tensor  # [B, T, V]
    routing: list[RoutingStats]  # one per MoE layer, in layer order


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) everywhere; projections into the residual stream scaled by
        1/sqrt(2 * n_layers) (GPT-2), so the residual's variance does not grow with depth."""
        residual_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(("wo.weight", "w_out")):
                param.normal_(0.0, residual_std)
            elif name.endswith("conv.weight") and self.cfg.short_conv_init:
                param.uniform_(-self.cfg.short_conv_init, self.cfg.short_conv_init)
            else:
                param.normal_(0.0, self.cfg.init_std)

    def forward(self, tokens: Tensor, positions: Tensor | None = None, cache=None) -> ModelOutput:
        """tokens [B, T]; positions [B, T] (default 0..T-1); cache: see moe/serving/cache.py."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, time], got shape {tuple(tokens.shape)}")
        if cache is not None:
            require_causal(self.cfg)
        if positions is None:
            if cache is not None:
                raise ValueError("with a cache, pass positions: where each new token sits")
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            if tokens.shape[1] > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {tokens.shape[1]} tokens is longer than "
                                 f"model.max_seq_len = {self.cfg.max_seq_len}; shorten it or "
                                 "raise max_seq_len")
        rope = rope_angles(positions, self.cfg.head_dim, self.cfg.rope_base)
        x = self.embed(tokens)  # [B, T, D]
        routing = []
        for block in self.blocks:
            x, stats = block(x, rope, positions, cache)
            if stats is not None:
                routing.append(stats)
        logits = self.lm_head(self.norm(x))  # [B, T, V]
        return ModelOutput(logits, routing)


def require_causal(cfg: ModelConfig) -> None:
    """Refuse generation from a model whose outputs depend on later tokens. Expert choice
    routes each token by comparing it with every token of the batch, so at training time
    token t's experts depend on tokens after t; decoding one token at a time would route it
    among a different set and give a different model. Every cached forward (all generation,
    the engine, speculation, the server) comes through here."""
    if cfg.routing == "expert_choice":
        raise ConfigError("model.routing = \"expert_choice\" is not causal (each expert picks its "
                          "tokens from the whole batch, later tokens included), so this model "
                          "cannot generate token by token; train with routing = \"token_choice\" "
                          "to generate")


# ---------------------------------------------------------------------------------------
# Loss: cross-entropy plus the router losses, computed once from what the layers returned
# ---------------------------------------------------------------------------------------

@dataclass
class Loss:
    total: Tensor  # what to backpropagate
    cross_entropy: Tensor
    aux: Tensor  # load-balancing loss, mean over MoE layers (1.0 = balanced)
    z: Tensor  # router z-loss, mean over MoE layers


def model_loss(cfg: ModelConfig, output: ModelOutput, targets: Tensor,
               ignore_index: int = -100) -> Loss:
    """targets [B, T]; positions equal to `ignore_index` do not count."""
    ce = F.cross_entropy(output.logits.float().flatten(0, 1), targets.flatten(),
                         ignore_index=ignore_index)
    zero = ce.new_zeros(())
    aux = torch.stack([load_balancing_loss(s) for s in output.routing]).mean() if output.routing else zero
    z = torch.stack([router_z_loss(s) for s in output.routing]).mean() if output.routing else zero
    # balance = "bias" balances without a loss: the aux figure is reported, not trained on.
    aux_coef = cfg.aux_loss_coef if cfg.balance == "aux_loss" else 0.0
    total = ce + aux_coef * aux + cfg.z_loss_coef * z
    return Loss(total, ce, aux, z)


# ---------------------------------------------------------------------------------------
# Parameter counts from the config alone
# ---------------------------------------------------------------------------------------

@dataclass
class ParameterCount:
    embedding: int  # input embedding (+ output head when untied)
    attention: int  # q, k, v, o projections, all layers
    dense_ffn: int  # dense SwiGLU layers
    experts: int  # all routed experts of all MoE layers
    shared_experts: int  # always-on experts of all MoE layers (every token runs them)
    router: int
    norms: int  # RMSNorm weights, and the short convolutions' per-channel taps
    active_experts: int  # the K experts per MoE layer that one token runs through

    @property
    def total(self) -> int:
        return (self.embedding + self.attention + self.dense_ffn + self.experts + self.shared_experts
                + self.router + self.norms)

    @property
    def active(self) -> int:
        """Parameters one token touches in a forward pass (counting the full embedding
        tables, as the GPT-4 reporting's 'shared' parameters do)."""
        return self.total - self.experts + self.active_experts

    @property
    def shared(self) -> int:
        """Everything but the routed experts (what the reporting calls shared parameters)."""
        return self.total - self.experts


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    d, hd = cfg.d_model, cfg.head_dim
    n_moe = len(cfg.moe_layers)
    n_dense = cfg.n_layers - n_moe
    per_expert = 3 * d * cfg.d_expert  # gate, up, down
    return ParameterCount(
        embedding=cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2),
        attention=cfg.n_layers * (2 * d * cfg.n_heads * hd + 2 * d * cfg.n_kv_heads * hd),
        dense_ffn=n_dense * 3 * d * cfg.d_ff,
        experts=n_moe * cfg.n_experts * per_expert,
        shared_experts=n_moe * cfg.n_shared_experts * per_expert,
        router=n_moe * d * cfg.n_experts,
        norms=(2 * cfg.n_layers + 1) * d + cfg.n_layers * cfg.conv_sites * cfg.short_conv * d,
        active_experts=n_moe * cfg.experts_per_token * per_expert,
    )
