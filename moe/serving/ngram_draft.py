"""An n-gram draft distilled from the target: speculative proposals that cost no model.

Why: on a CPU at batch 1 a draft model's step costs about a quarter of a target step (both
are bound by per-operator overhead, not by bytes), and a draft that agrees with the target
half the time cannot pay for that (README, "Speculative decoding"). Prompt lookup costs
nothing, but it has nothing to propose where the context does not repeat itself. This
table proposes everywhere, at the price of a few binary searches on the host:

    build    run the target once over training text, in windows; for every context of
             the last n tokens (n = 1 .. max_order) keep the token the target most often
             predicted next there (its argmax), so the table imitates the target, not the
             corpus (the corpus's own most frequent next token agrees with the target's
             greedy output less often)
    propose  prompt lookup first (what followed the latest earlier occurrence of the last
             two or three tokens in this very sequence); then, for the rest of the γ
             tokens, each next token from the longest context the table knows, fed back in
             as context. A one-token match in the sequence is weaker evidence than the
             table's context of up to four, so prompt lookup here needs two

Greedy proposals are checked like any other (moe/serving/speculative.py), so the output
is the target's own, token for token. A sampled request accepts a proposal only where it
equals the target's draw, which a fixed guess does far less often.

Each order n is stored as two sorted arrays: `keys`, the n context tokens read as one
base-V number, and `next`, the target's most frequent argmax after that context (ties go
to the smaller token id). Building a key together with its next token needs V^(n+1) <
2^63, which bounds the order for large vocabularies (`max_order_for`).

Shapes: V vocab, N training tokens, W window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from moe.io.files import write_file_atomically
from moe.model.transformer import Transformer
from moe.serving.speculative import PromptLookupProposer


def max_order_for(vocab_size: int) -> int:
    """The longest context whose key and next token fit one int64: V^(n+1) < 2^63."""
    n = 0
    while vocab_size ** (n + 2) < 2**63:
        n += 1
    return n


@dataclass
class NgramDraft:
    vocab_size: int
    keys: list[np.ndarray]  # keys[n - 1]: sorted int64 contexts of order n
    next: list[np.ndarray]  # next[n - 1]: int32, the target's token after each context

    @property
    def max_order(self) -> int:
        return len(self.keys)

    def next_token(self, seq: list[int]) -> int | None:
        """The target's most frequent next token after the longest known tail of `seq`."""
        for n in range(min(self.max_order, len(seq)), 0, -1):
            key = 0
            for t in seq[-n:]:
                key = key * self.vocab_size + t
            keys = self.keys[n - 1]
            i = int(np.searchsorted(keys, key))
            if i < len(keys) and keys[i] == key:
                return int(self.next[n - 1][i])
        return None

    def continue_(self, seq: list[int], gamma: int) -> list[int]:
        """Up to `gamma` tokens, each the table's next token after what came before."""
        seq, out = list(seq), []
        while len(out) < gamma:
            token = self.next_token(seq)
            if token is None:
                break
            out.append(token)
            seq.append(token)
        return out

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """One safetensors file, written through a temporary file and a rename."""
        tensors = {}
        for n, (keys, nxt) in enumerate(zip(self.keys, self.next), start=1):
            tensors[f"keys_{n}"], tensors[f"next_{n}"] = keys, nxt
        meta = {"vocab_size": str(self.vocab_size), "max_order": str(self.max_order), **(metadata or {})}
        write_file_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> NgramDraft:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: build it with "
                                    f"`python scripts/build_ngram_draft.py RUN` (RUN: the target's run folder)")
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if "vocab_size" not in meta or "max_order" not in meta:
                raise ValueError(f"{path} is not an n-gram draft (no vocab_size / max_order in its "
                                 "metadata); build one with scripts/build_ngram_draft.py")
            order = int(meta["max_order"])
            return cls(int(meta["vocab_size"]), [f.get_tensor(f"keys_{n}") for n in range(1, order + 1)],
                       [f.get_tensor(f"next_{n}") for n in range(1, order + 1)])


@torch.no_grad()
def build_ngram_draft(model: Transformer, tokens: np.ndarray, max_order: int = 4, window: int = 256,
                      batch_size: int = 32, progress: Callable[[int, int], None] | None = None) -> NgramDraft:
    """Run `model` over `tokens` [N] in windows of `window` and tabulate its argmax after
    every context of 1 .. `max_order` tokens inside a window. `progress(done, total)` is
    called after each batch of windows."""
    vocab = model.cfg.vocab_size
    if not 1 <= max_order <= max_order_for(vocab):
        raise ValueError(f"max_order must be between 1 and {max_order_for(vocab)} for a vocabulary "
                         f"of {vocab} (a key and its next token must fit one int64), got {max_order}")
    window = min(window, model.cfg.max_seq_len)
    n_windows = len(tokens) // window
    if n_windows == 0:
        raise ValueError(f"{len(tokens)} tokens do not fill one window of {window}: give more text")
    flat = np.asarray(tokens[:n_windows * window], dtype=np.int64)
    if flat.max() >= vocab:
        raise ValueError(f"token id {int(flat.max())} is outside the model's vocabulary of {vocab}: "
                         "the text was encoded with another tokenizer")
    windows = torch.from_numpy(flat).view(n_windows, window)
    device = next(model.parameters()).device
    argmax = np.empty_like(flat)  # [N]: the model's next-token guess at every position
    for start in range(0, n_windows, batch_size):
        chunk = windows[start:start + batch_size]
        guess = model(chunk.to(device)).logits.argmax(-1)  # [b, W]
        argmax[start * window:(start + len(chunk)) * window] = guess.reshape(-1).cpu().numpy()
        if progress is not None:
            progress(start + len(chunk), n_windows)
    position = np.arange(len(flat)) % window
    keys, nexts = [], []
    for n in range(1, max_order + 1):
        inside = position >= n - 1  # the whole context lies in the position's window
        context = np.zeros(len(flat), dtype=np.int64)
        for back in range(n - 1, -1, -1):  # oldest token first
            context = context * vocab + np.roll(flat, back)
        pairs, counts = np.unique(context[inside] * vocab + argmax[inside], return_counts=True)
        context, guess = pairs // vocab, pairs % vocab
        order = np.lexsort((-counts, context))  # by context, then the most frequent guess first
        context, guess = context[order], guess[order]
        first = np.r_[True, context[1:] != context[:-1]]
        keys.append(context[first])
        nexts.append(guess[first].astype(np.int32))
    return NgramDraft(vocab, keys, nexts)


class NgramProposer(PromptLookupProposer):
    """Prompt lookup, then the n-gram draft for the rest of the γ tokens. Plugs in where
    prompt lookup does: `speculative_generate(proposer=...)` and
    `SpeculativeEngine(lookup=...)`."""

    def __init__(self, draft: NgramDraft, max_ngram: int = 3, min_ngram: int = 2):
        super().__init__(max_ngram, min_ngram)
        self.draft = draft

    def lookup(self, seq: list[int], gamma: int) -> list[int]:
        found = super().lookup(seq, gamma)
        return found + self.draft.continue_(seq + found, gamma - len(found))
