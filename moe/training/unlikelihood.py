"""Sequence-level unlikelihood: train the model away from the loops its own greedy decoding falls into.

Why: maximum likelihood alone left the main job's greedy continuations looping (a line or
a word over and over) after about a third of validation prompts, and more steps, lower
bits per byte, token-level unlikelihood and DITTO's repeated-sentence data did not change
that. Welleck et al. (2019, "Neural text generation with unlikelihood training", section
5.2) fine-tune on the model's own continuations instead: decode greedily from a prefix of
real text, find the tokens that repeat an n-gram already present in the sequence, and
push their probability down with -log(1 - p). Because the penalty lands exactly where the
model's own decoding goes wrong, it reaches the loops that teacher-forced training never
sees. Here it is a term added to the ordinary loss in the last `train.unlikelihood_steps`
steps of a run (moe/training/loop.py: train_step), so the cross-entropy keeps training on
real text beside it.

One unlikelihood term, per micro-batch:
    prefix:   the first P tokens of each training window, P drawn in 4..train.unlikelihood_prefix
              from the step (so a resumed run draws the same)
    decode:   train.unlikelihood_tokens greedy tokens per row, KV-cached, no gradient
    mask:     the decoded tokens that belong to an n-gram (train.unlikelihood_ngram tokens)
              seen earlier in the row, prefix included
    loss:     -sum over masked tokens of log(1 - p(token | before)) / decoded tokens

Shapes: B rows, P prefix length, N decoded tokens, S = P + N, V vocab.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moe.config import TrainConfig
from moe.model.transformer import Transformer
from moe.serving.cache import KVCache
from moe.serving.generation import prefill
from moe.serving.static_decode import DecodeStep

MIN_PREFIX = 4


def prefix_length(cfg: TrainConfig, step: int) -> int:
    """The prefix length P of `step`'s continuations, drawn in MIN_PREFIX..unlikelihood_prefix:
    short prefixes (a file's first line) loop as much as long ones."""
    rng = np.random.default_rng([cfg.seed, step, 7])
    return int(rng.integers(MIN_PREFIX, cfg.unlikelihood_prefix + 1))


@torch.no_grad()
def greedy_continuations(model: Transformer, prefix: Tensor, n: int) -> Tensor:
    """prefix [B, P] -> the model's n greedy tokens after each row [B, n] (eval mode; the
    model's train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    B, P = prefix.shape
    param = next(model.parameters())
    cache = KVCache(model.cfg, B, P + n, param.device, param.dtype)
    logits = prefill(model, prefix, cache)[:, -1]  # [B, V]
    step = DecodeStep(model, cache)
    tokens = []
    for i in range(n):
        tokens.append(logits.argmax(-1))  # [B]
        if i + 1 < n:
            logits = step(tokens[-1], torch.full((B,), P + i, device=prefix.device))
    model.train(was_training)
    return torch.stack(tokens, 1)


def repeated_ngrams(seq: Tensor, start: int, n: int) -> Tensor:
    """seq [B, S] -> mask [B, S]: True at the positions from `start` on that belong to an
    n-gram that already ended earlier in the row (the first occurrence is not marked)."""
    mask = np.zeros(seq.shape, dtype=bool)
    for b, row in enumerate(seq.tolist()):
        seen = set()
        for end in range(n - 1, len(row)):
            gram = tuple(row[end - n + 1:end + 1])
            if gram in seen and end >= start:
                mask[b, max(start, end - n + 1):end + 1] = True
            seen.add(gram)
    return torch.from_numpy(mask).to(seq.device)


def unlikelihood_loss(logits: Tensor, seq: Tensor, mask: Tensor, start: int) -> Tensor:
    """-sum log(1 - p) over the masked tokens, divided by the tokens from `start` on.
    logits [B, S-1, V] predict seq[:, 1:]; seq and mask [B, S]."""
    log_p = F.log_softmax(logits.float(), -1).gather(-1, seq[:, 1:, None])[..., 0]  # [B, S-1]
    log_not = torch.log1p(-log_p.exp().clamp_max(1 - 1e-5))  # log(1 - p), finite at p = 1
    terms = -log_not * mask[:, 1:]
    return terms.sum() / (seq.shape[0] * (seq.shape[1] - start))


def unlikelihood_term(model, decoder: Transformer, inputs: Tensor, cfg: TrainConfig,
                      step: int) -> tuple[Tensor, float]:
    """The unlikelihood loss of one micro-batch `inputs` [B, T]: their prefixes continued
    greedily by `decoder` (the plain Transformer), then scored by `model` (it, or a compiled
    wrapper of it); and the share of decoded tokens inside a repeated n-gram."""
    P = prefix_length(cfg, step)
    prefix = inputs[:, :P]
    seq = torch.cat([prefix, greedy_continuations(decoder, prefix, cfg.unlikelihood_tokens)], 1)  # [B, S]
    mask = repeated_ngrams(seq, P, cfg.unlikelihood_ngram)
    loss = unlikelihood_loss(model(seq[:, :-1]).logits, seq, mask, P)
    return loss, float(mask[:, P:].float().mean())
