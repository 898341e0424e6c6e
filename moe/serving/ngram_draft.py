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
             greedy output less often); then let the target continue a few thousand
             prompts greedily and, where a context occurs in those continuations, keep
             what the target wrote after it there instead: decoding meets the target's own
             text, with its own habits, more than the corpus's
    propose  the longer evidence first: if this very sequence repeats a longer stretch of
             its tail (up to 8 tokens) than the longest context the table knows, what
             followed that stretch (prompt lookup); else the table's next token. Then,
             for the rest of the γ tokens, each next token from the longest context the
             table knows, fed back in as context. A short match in the sequence is weaker
             evidence than the table's context of the same length, which sums every
             occurrence in the target's own text: letting a 2-token repeat win over the
             table kept 2.77 tokens per round at batch 1 and γ 6, this rule 2.99
             (benchmarks/results/speculative.json at commit 5848081, and now)

Greedy proposals are checked like any other (moe/serving/speculative.py), so the output
is the target's own, token for token. A sampled request accepts a proposal only where it
equals the target's draw. A fixed guess x does so with probability p(x), one time in five
on the main job at T = 1 (alpha 0.21 in benchmarks/results/speculative.json at 016a6f2).
So the table also keeps, per context, the target's mean distribution over the next
token (its top `dist_size` tokens, averaged over every place the context occurs in the
training text), and a sampled request draws its proposals from that distribution with
its own noise for those positions, as a draft model does: the Gumbel-max coupling then
accepts a proposal wherever the table's distribution and the target's overlap, not just
where one guess hits. Only contexts seen at least `dist_min_count` times keep one (those
seen once are most of the order-3 and order-4 contexts, and would triple the space the
distributions take).

Each order n is stored as two sorted arrays: `keys`, the n context tokens read as one
base-V number, and `next`, the target's most frequent argmax after that context (ties go
to the smaller token id); the distributions as `dist_keys` (sorted contexts) beside
`dist_tokens` and `dist_probs` [C, M], each row's tokens by falling probability, padded
with probability 0. Building a key together with its next token needs V^(n+1) <
2^63, which bounds the order for large vocabularies (`max_order_for`).

Shapes: V vocab, N training tokens, W window, C contexts, M tokens kept per distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import Tensor

from moe.io.files import write_file_atomically
from moe.model.transformer import Transformer
from moe.serving.sampling import SamplingParams, exponential_noise, warp_probs
from moe.serving.speculative import PromptLookupProposer, repeat_continuation, speculative_generate


def max_order_for(vocab_size: int) -> int:
    """The longest context whose key and next token fit one int64: V^(n+1) < 2^63."""
    n = 0
    while n < 62 and vocab_size ** (n + 2) < 2**63:  # (a vocabulary of one would never stop)
        n += 1
    return n


@dataclass
class NgramDraft:
    vocab_size: int
    keys: list[np.ndarray]  # keys[n - 1]: sorted int64 contexts of order n
    next: list[np.ndarray]  # next[n - 1]: int32, the target's token after each context
    dist_keys: list[np.ndarray] = field(default_factory=list)  # [n - 1]: sorted int64 contexts
    dist_tokens: list[np.ndarray] = field(default_factory=list)  # [n - 1]: [C, M] int32
    dist_probs: list[np.ndarray] = field(default_factory=list)  # [n - 1]: [C, M] float32, 0 = padding

    @property
    def max_order(self) -> int:
        return len(self.keys)

    def _find(self, keys: list[np.ndarray], seq: list[int]) -> tuple[int, int] | None:
        """(order, index) of the longest tail of `seq` that `keys` holds."""
        for n in range(min(len(keys), len(seq)), 0, -1):
            key = 0
            for t in seq[-n:]:
                key = key * self.vocab_size + t
            i = int(np.searchsorted(keys[n - 1], key))
            if i < len(keys[n - 1]) and keys[n - 1][i] == key:
                return n, i
        return None

    def known_order(self, seq: list[int]) -> int:
        """How many of the last tokens of `seq` the longest context the table holds covers (0: none)."""
        found = self._find(self.keys, seq)
        return 0 if found is None else found[0]

    def next_token(self, seq: list[int]) -> int | None:
        """The target's most frequent next token after the longest known tail of `seq`."""
        found = self._find(self.keys, seq)
        return None if found is None else int(self.next[found[0] - 1][found[1]])

    def kept_distribution(self, seq: list[int]) -> tuple[Tensor, Tensor] | None:
        """The tokens the table kept after the longest tail of `seq` that has a distribution
        and their log-probabilities (int64 and float32, [M'] each), or None."""
        found = self._find(self.dist_keys, seq)
        if found is None:
            return None
        n, i = found
        probs = self.dist_probs[n - 1][i]
        kept = probs > 0
        return (torch.from_numpy(self.dist_tokens[n - 1][i][kept].astype(np.int64)),
                torch.from_numpy(np.log(probs[kept].astype(np.float32))))

    def distribution(self, seq: list[int]) -> Tensor | None:
        """[V] float32 log-probabilities: the target's mean distribution after the longest
        tail of `seq` that has one (-inf outside its kept tokens), or None."""
        kept = self.kept_distribution(seq)
        if kept is None:
            return None
        logits = torch.full((self.vocab_size,), -math.inf)
        logits[kept[0]] = kept[1]
        return logits

    def sampled_continuation(self, seq: list[int], gamma: int, params: SamplingParams,
                             seed: int) -> list[int]:
        """Up to `gamma` tokens, each drawn from the table's distribution after what came
        before, warped like the request, with the request's own noise for its position:
        the token sample_at would draw from `distribution` (the target's draw there
        whenever the two distributions agree), computed over the kept tokens alone, since
        the rest have probability 0: a sampled round's proposals are host time, and
        warping the whole vocabulary for each cost more than the draws."""
        seq, out = list(seq), []
        while len(out) < gamma:
            kept = self.kept_distribution(seq)
            if kept is None:
                break
            tokens, logprobs = kept  # [M'] each
            probs = warp_probs(logprobs[None], params)[0]  # [M']
            noise = exponential_noise(seed, len(seq), self.vocab_size)[tokens]  # [M']
            token = int(tokens[int((probs.double() / noise).argmax())])
            out.append(token)
            seq.append(token)
        return out

    def continuation(self, seq: list[int], gamma: int) -> list[int]:
        """Up to `gamma` tokens, each the table's next token after what came before."""
        seq, out = list(seq), []
        while len(out) < gamma:
            token = self.next_token(seq)
            if token is None:
                break
            out.append(token)
            seq.append(token)
        return out

    def check_vocab(self, vocab_size: int, source: str) -> None:
        """Refuse a table built for another vocabulary than the model's (`source` names the table)."""
        if self.vocab_size != vocab_size:
            raise ValueError(f"{source} was built for a vocabulary of {self.vocab_size}, the model has "
                             f"{vocab_size}: build it from this model's run (scripts/build_ngram_draft.py)")

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """One safetensors file, written through a temporary file and a rename."""
        tensors = {}
        for n, (keys, nxt) in enumerate(zip(self.keys, self.next), start=1):
            tensors[f"keys_{n}"], tensors[f"next_{n}"] = keys, nxt
        for n, (keys, tokens, probs) in enumerate(zip(self.dist_keys, self.dist_tokens, self.dist_probs), start=1):
            tensors[f"dist_keys_{n}"], tensors[f"dist_tokens_{n}"] = keys, tokens
            tensors[f"dist_probs_{n}"] = probs.astype(np.float16)  # a proposal needs no more precision
        meta = {"vocab_size": str(self.vocab_size), "max_order": str(self.max_order),
                "dist_order": str(len(self.dist_keys)), **(metadata or {})}
        write_file_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> NgramDraft:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: build it with "
                                    f"`python scripts/build_ngram_draft.py RUN` (RUN: the target's run folder)")
        rebuild = "build it again with scripts/build_ngram_draft.py"
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if "vocab_size" not in meta or "max_order" not in meta:
                    raise ValueError(f"{path} is not an n-gram draft (no vocab_size / max_order in its "
                                     f"metadata); {rebuild}")
                orders = range(1, int(meta["max_order"]) + 1)
                dists = range(1, int(meta.get("dist_order", 0)) + 1)  # tables built before 2026-11-27 have none
                return cls(int(meta["vocab_size"]), [f.get_tensor(f"keys_{n}") for n in orders],
                           [f.get_tensor(f"next_{n}") for n in orders],
                           [f.get_tensor(f"dist_keys_{n}") for n in dists],
                           [f.get_tensor(f"dist_tokens_{n}") for n in dists],
                           [f.get_tensor(f"dist_probs_{n}").astype(np.float32) for n in dists])
        except SafetensorError as error:
            raise ValueError(f"{path} is corrupt or truncated ({error}); {rebuild}") from None


def contexts(seq: np.ndarray, n: int, vocab: int) -> np.ndarray:
    """[L] int64: the n tokens ending at each position of `seq` [L] as one base-V number,
    oldest first (the first n - 1 positions wrap around: callers skip them)."""
    key = np.zeros(len(seq), dtype=np.int64)
    for back in range(n - 1, -1, -1):
        key = key * vocab + np.roll(seq, back)
    return key


def most_frequent(context: np.ndarray, guess: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct context, its most frequent guess (ties: the smaller id): (keys, next)."""
    pairs, counts = np.unique(context * vocab + guess, return_counts=True)
    context, guess = pairs // vocab, pairs % vocab
    order = np.lexsort((-counts, context))  # by context, then the most frequent guess first
    context, guess = context[order], guess[order]
    first = np.r_[True, context[1:] != context[:-1]]
    return context[first], guess[first]


def mean_distributions(context: np.ndarray, tokens: np.ndarray, probs: np.ndarray, vocab: int, size: int,
                       min_count: int, chunk: int = 1 << 18) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per context [P] seen at least `min_count` times: the mean over its occurrences of the
    target's top-K distributions (tokens and probs [P, K]; a token outside an occurrence's
    top K counts as 0 there), cut to its `size` most probable tokens:
    (keys [C], tokens [C, size] int32, probs [C, size] float32, padded with 0).
    Positions go through in runs of about `chunk`, whole contexts at a time, so the
    (context, token) pairs in memory at once stay near chunk x K (the main job's table would
    otherwise hold 50M of them, several GB)."""
    keys, inverse, counts = np.unique(context, return_inverse=True, return_counts=True)
    kept = np.flatnonzero(counts >= min_count)
    row = np.full(len(keys), -1)
    row[kept] = np.arange(len(kept))
    out_tokens = np.zeros((len(kept), size), dtype=np.int32)
    out_probs = np.zeros((len(kept), size), dtype=np.float32)
    often = np.flatnonzero(counts[inverse] >= min_count)
    by_context = often[np.argsort(inverse[often], kind="stable")]  # positions, grouped by context
    sorted_ctx = inverse[by_context]
    start = 0
    while start < len(by_context):
        stop = min(start + chunk, len(by_context))
        stop = int(np.searchsorted(sorted_ctx, sorted_ctx[stop - 1], side="right"))  # whole contexts
        at = by_context[start:stop]
        pairs = (inverse[at][:, None] * vocab + tokens[at]).ravel()  # (context index, token)
        pairs, where = np.unique(pairs, return_inverse=True)
        mass = np.bincount(where.ravel(), weights=probs[at].ravel())
        ctx, token = pairs // vocab, pairs % vocab
        mean = mass / counts[ctx]
        order = np.lexsort((-mean, ctx))  # by context, the most probable token first
        ctx, token, mean = ctx[order], token[order], mean[order]
        first = np.r_[True, ctx[1:] != ctx[:-1]]
        rank = np.arange(len(ctx)) - np.maximum.accumulate(np.where(first, np.arange(len(ctx)), 0))
        top = rank < size
        out_tokens[row[ctx[top]], rank[top]] = token[top]
        out_probs[row[ctx[top]], rank[top]] = mean[top]
        start = stop
    return keys[kept], out_tokens, out_probs


def prefer(first: tuple[np.ndarray, np.ndarray], then: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every context of either table; `first`'s guess where both have one."""
    keys = np.concatenate([first[0], then[0]])
    guesses = np.concatenate([first[1], then[1]])
    order = np.lexsort((np.r_[np.zeros(len(first[0])), np.ones(len(then[0]))], keys))
    keys, guesses = keys[order], guesses[order]
    kept = np.r_[True, keys[1:] != keys[:-1]]
    return keys[kept], guesses[kept]


@torch.no_grad()
def own_continuations(model: Transformer, tokens: np.ndarray, table: NgramDraft, n: int, prompt_len: int,
                      new_tokens: int, seed: int, progress: Callable[[str, int, int], None] | None = None
                      ) -> list[list[int]]:
    """The target's greedy continuations of `n` prompts of `prompt_len` tokens cut from
    `tokens` at seeded places, prompt included: decoded speculatively with `table` (the
    same tokens as plain greedy, a few times faster)."""
    starts = np.random.default_rng(seed).integers(0, len(tokens) - prompt_len, n)
    prompts = [np.asarray(tokens[s:s + prompt_len], dtype=np.int64).tolist() for s in starts]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    out = []
    for i in range(0, n, 8):
        batch = prompts[i:i + 8]
        new, _ = speculative_generate(model, batch, params, proposer=NgramProposer(table), gamma=6)
        out += [p + x for p, x in zip(batch, new)]
        if progress is not None:
            progress("continuations", len(out), n)
    return out


@torch.no_grad()
def build_ngram_draft(model: Transformer, tokens: np.ndarray, max_order: int = 4, window: int = 256,
                      batch_size: int = 32, continuations: int = 2000, prompt_len: int = 64,
                      new_tokens: int = 96, seed: int = 0, dist_size: int = 16, dist_min_count: int = 2,
                      progress: Callable[[str, int, int], None] | None = None) -> NgramDraft:
    """Two passes of the target:
    1. over `tokens` [N] in windows of `window`, tabulating its argmax after every context
       of 1 .. `max_order` tokens inside a window, and (`dist_size` > 0) its mean
       distribution after every context seen `dist_min_count` times or more, its
       `dist_size` most probable tokens (for sampled requests);
    2. its own greedy continuations (`new_tokens` each) of `continuations` prompts cut from
       `tokens`, decoded with the first table; a context seen there takes the token the
       target wrote after it, since decoding meets the target's own text, not the corpus
       (on the main job the tokens kept per round at batch 1 rose from 2.72 to 3.16:
       benchmarks/results/speculative_ngram_trials.json, speculative.json).
    `progress(stage, done, total)` is called as each pass goes."""
    vocab = model.cfg.vocab_size
    if not 1 <= max_order <= max_order_for(vocab):
        raise ValueError(f"max_order must be between 1 and {max_order_for(vocab)} for a vocabulary "
                         f"of {vocab} (a key and its next token must fit one int64), got {max_order}")
    if dist_size < 0 or dist_min_count < 1:
        raise ValueError(f"dist_size must be at least 0 and dist_min_count at least 1, got {dist_size} "
                         f"and {dist_min_count}")
    dist_size = min(dist_size, vocab)
    window = min(window, model.cfg.max_seq_len)
    n_windows = len(tokens) // window
    if n_windows == 0:
        raise ValueError(f"{len(tokens)} tokens do not fill one window of {window}: give more text")
    flat = np.asarray(tokens[:n_windows * window], dtype=np.int64)
    if flat.max() >= vocab:
        raise ValueError(f"token id {int(flat.max())} is outside the model's vocabulary of {vocab}: "
                         "the text was encoded with another tokenizer")
    if continuations and not (max_order <= prompt_len < len(flat) and prompt_len + new_tokens <= model.cfg.max_seq_len):
        raise ValueError(f"prompt_len {prompt_len} and new_tokens {new_tokens}: the prompt must hold a context of "
                         f"max_order = {max_order} tokens, fit in the {len(flat)} tokens given, and leave room "
                         f"for the continuation in the model's {model.cfg.max_seq_len} positions")
    windows = torch.from_numpy(flat).view(n_windows, window)
    device = next(model.parameters()).device
    argmax = np.empty_like(flat)  # [N]: the model's next-token guess at every position
    token_type = np.uint16 if vocab <= 1 << 16 else np.int32
    top_tokens = np.empty((len(flat), dist_size), dtype=token_type)  # [N, M]: its most probable tokens
    top_probs = np.empty((len(flat), dist_size), dtype=np.float32)  # [N, M]: their probabilities
    for start in range(0, n_windows, batch_size):
        chunk = windows[start:start + batch_size]
        logits = model(chunk.to(device)).logits  # [b, W, V]
        rows = slice(start * window, (start + len(chunk)) * window)
        argmax[rows] = logits.argmax(-1).reshape(-1).cpu().numpy()
        if dist_size:
            probs, ids = logits.float().softmax(-1).topk(dist_size, dim=-1)  # [b, W, M]
            top_tokens[rows] = ids.reshape(-1, dist_size).cpu().numpy()
            top_probs[rows] = probs.reshape(-1, dist_size).cpu().numpy()
        if progress is not None:
            progress("windows", start + len(chunk), n_windows)
    position = np.arange(len(flat)) % window
    corpus, dists = [], []
    for n in range(1, max_order + 1):
        inside = position >= n - 1  # the whole context lies in the position's window
        context = contexts(flat, n, vocab)[inside]
        corpus.append(most_frequent(context, argmax[inside], vocab))
        if dist_size:
            dists.append(mean_distributions(context, top_tokens[inside], top_probs[inside], vocab, dist_size,
                                            dist_min_count))
    del top_tokens, top_probs
    dist_arrays = [list(column) for column in zip(*dists)] or [[], [], []]
    table = NgramDraft(vocab, [k for k, _ in corpus], [g.astype(np.int32) for _, g in corpus], *dist_arrays)
    if not continuations:
        return table
    seqs = own_continuations(model, flat, table, continuations, prompt_len, new_tokens, seed, progress)
    keys, nexts = [], []
    for n, fallback in enumerate(corpus, start=1):
        seen = [(contexts(np.array(s), n, vocab)[prompt_len - 1:-1], np.array(s[prompt_len:])) for s in seqs]
        own = most_frequent(np.concatenate([c for c, _ in seen]), np.concatenate([g for _, g in seen]), vocab)
        k, g = prefer(own, fallback)
        keys.append(k)
        nexts.append(g.astype(np.int32))
    return NgramDraft(vocab, keys, nexts, *dist_arrays)


class NgramProposer(PromptLookupProposer):
    """The longer evidence proposes: prompt lookup where the sequence repeats a longer
    stretch of its tail (up to `max_ngram` tokens) than the longest context the table holds,
    else the table; the table then goes on for the rest of the γ tokens. Plugs in where
    prompt lookup does: `speculative_generate(proposer=...)` and
    `SpeculativeEngine(lookup=...)`."""

    def __init__(self, draft: NgramDraft, max_ngram: int = 8):
        super().__init__(max_ngram, 1)
        self.draft = draft

    def lookup(self, seq: list[int], gamma: int) -> list[int]:
        found = repeat_continuation(seq, gamma, self.max_ngram, self.draft.known_order(seq) + 1)
        return found + self.draft.continuation(seq + found, gamma - len(found))

    def propose_row(self, seq: list[int], gamma: int, params: SamplingParams, seed: int) -> list[int]:
        """Greedy: `lookup`. Sampled, from a table with distributions: draws from them with
        the request's noise (`NgramDraft.sampled_continuation`), no prompt lookup (a copied
        token is one fixed guess)."""
        if params.greedy or not self.draft.dist_keys:
            return self.lookup(seq, gamma)
        return self.draft.sampled_continuation(seq, gamma, params, seed)
