"""A short causal convolution on each attention input, and with model.short_conv_ffn on
each FFN input too (Allen-Zhu's "Canon layers" A and C, the short convolutions of H3 and
Mamba): h_t <- h_t + sum_{j < W} a_j * h_(t-j), per channel.

Why: to find "the value after key c", attention must match on what came one or two
tokens before a position; with plain attention one layer first copies each position's
predecessors into it (a previous-token head) and only a second layer can match on them,
and a small model spends most of a short run on the plateau before that pair forms. The
convolution hands every position its W - 1 predecessors at once, for W * D weights. On
the task mix (configs/tasks.toml) lookup was learned within ten minutes only with it, and
only when its taps start random (short_conv_init, as nn.Conv1d draws them), most often
with both sites and no weight decay: four GPU seeds of six by step 2,000, five CPU
seeds of five by step 3,000. Likely taps near zero leave each token blind to its
neighbours at first (README, "The task mix").

Over a cache a forward sees only the new tokens, so the taps that reach back read the
earlier attention inputs from the cache: each cache keeps them beside K/V, written by
position or slot (`mix_inputs` of KVCache, PagedKVCache and PagedDecodeView; one row
per layer and site, layer * sites + site), so rollback, preemption and shared prefix
blocks need nothing more.

Shapes: B batch, T time, D channels, W width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def short_conv_reference(h: Tensor, weight: Tensor) -> Tensor:
    """h [B, T, D], taps weight [W, D] -> h + sum_j weight[j] * h shifted j later (the
    specification: zeros before the start, so position t sees t - W + 1 .. t)."""
    width, length = weight.shape[0], h.shape[1]
    padded = F.pad(h, (0, 0, width - 1, 0))  # [B, W - 1 + T, D]
    return h + sum(padded[:, width - 1 - j:width - 1 - j + length] * weight[j] for j in range(width))


class _ShortConv(torch.autograd.Function):
    """The reference in place: one multiply-add per tap into slices of one output, and the
    same for the gradient, where autograd through the padded slices zero-fills a
    [B, W - 1 + T, D] gradient per tap, more work than the taps themselves."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor) -> Tensor:
        y = h * (1 + weight[0])
        for j in range(1, weight.shape[0]):
            y[:, j:].addcmul_(h[:, :-j], weight[j])
        ctx.save_for_backward(h, weight)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        h, weight = ctx.saved_tensors
        grad_h = grad * (1 + weight[0])
        grad_weight = torch.empty_like(weight)
        grad_weight[0] = (grad * h).sum((0, 1))
        for j in range(1, weight.shape[0]):
            grad_h[:, :-j].addcmul_(grad[:, j:], weight[j])
            grad_weight[j] = (grad[:, j:] * h[:, :-j]).sum((0, 1))
        return grad_h, grad_weight


class ShortConv(nn.Module):
    def __init__(self, dim: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width, dim))  # [W, D]: tap j weighs h_(t-j)

    def forward(self, h: Tensor) -> Tensor:
        """h [B, T, D] -> [B, T, D], each row on its own."""
        return _ShortConv.apply(h, self.weight)
