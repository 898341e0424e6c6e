"""Training data: text prepared once into memory-mapped token files, and a synthetic task mix.

Why prepare once: reading and tokenising a few thousand files every run is slow and,
worse, a source that changes under a run would silently change what "step 1000" saw.
A source is turned into `train.bin` / `val.bin` (uint16 token ids) in a cache folder
named after a hash of the file list (paths, sizes, modification times), the split and
the tokenizer, written atomically; later runs memory-map the same ids. With
`data.tokenizer = "bpe"` the BPE is learned on the training files there and saved as
`tokenizer.json` beside the ids (moe/tokenizer.py). The folder's meta.json also keeps
what gzip -9 and xz -9 make of the validation bytes: the bar a model has to clear
before it can be said to have learned more than repetition.

Why split by file: neighbouring lines of one file are near copies of each other, so a
validation set cut from the same files as training measures memorisation. Each file goes
to validation when a hash of its relative path falls below `val_fraction`, so the split
does not depend on the order files are listed in or on which other files exist.

The default corpus is the Python standard library of the interpreter that runs (real
code, about 12 MB without its test suite), present on every machine without a download.

The synthetic mix (copy, reverse, sort, addition, key-value lookup) is where expert
specialisation becomes visible: each example is `BOS task-prompt | answer EOS`, each
token carries its task id, and accuracy is exact match of the whole answer. Greedy
decoding reproduces an answer exactly iff the model's argmax is right at every answer
position given the right prefix, so teacher-forced argmax scores it in one forward pass.
Training on the mix scores the answer tokens only (the prompts are random strings, which
no model can predict and which would drown the signal) and starts every window at an
example's BOS, so no window opens in the middle of a prompt it cannot see.

Batches are drawn by index: batch i of a run is a pure function of (seed, i), so the
data position a checkpoint stores is one integer and a resumed run sees the same batches.

Shapes: B batch, T sequence length.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import random
import sysconfig
import zlib
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moe.io.files import write_directory_atomically
from moe.config import ConfigError, DataConfig
from moe.tokenizer import EOS, PAD, TOKENIZER_FILE, encode, load_bpe, token_bytes, train_bpe

FORMAT_VERSION = 2
TASKS = ("copy", "reverse", "sort", "add", "lookup")


@dataclass
class Corpus:
    """A prepared source: token arrays (memory-mapped) and, for the task mix, per-token task ids."""

    train: np.ndarray  # [N_train] uint16
    val: np.ndarray  # [N_val] uint16
    folder: Path
    token_bytes: np.ndarray  # [V] bytes of text each id stands for (moe/tokenizer.py)
    compressors: dict  # {"gzip -9": bits/byte, "xz -9": bits/byte} of the validation bytes
    val_examples: np.ndarray | None = None  # [M, 3] (start, prompt_len, length) into `val`; task mix only
    val_example_tasks: np.ndarray | None = None  # [M] task index
    train_task_ids: np.ndarray | None = None  # [N_train] uint8 task of each token; task mix only
    train_examples: np.ndarray | None = None  # [M_train] start of each training example; task mix only
    train_answer: np.ndarray | None = None  # [N_train] uint8, 1 on answer tokens; task mix only

    @property
    def is_tasks(self) -> bool:
        return self.val_examples is not None

    @property
    def tokenizer_file(self) -> Path | None:
        """The learned BPE the ids were made with, or None for bytes."""
        file = self.folder / TOKENIZER_FILE
        return file if file.is_file() else None


# ---------------------------------------------------------------------------------------
# Sources: which files, split how
# ---------------------------------------------------------------------------------------

def source_files(source: str) -> tuple[Path, list[Path]]:
    """(root, files) for "stdlib", a file, a folder (every file below it) or a glob."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
        files = [f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts)]
    elif Path(source).is_file():
        root, files = Path(source).parent, [Path(source)]
    elif Path(source).is_dir():
        root, files = Path(source), [f for f in Path(source).rglob("*") if f.is_file()]
    else:
        root = Path("/")
        files = [Path(f).resolve() for f in glob(source, recursive=True) if Path(f).is_file()]
    if not files:
        raise ConfigError(f"data.source = {source!r} names no file: give \"stdlib\", \"tasks\", "
                          "a text file, a folder or a glob such as 'docs/**/*.md'")
    return root, sorted(files)


def is_validation_file(relative_path: str, val_fraction: float) -> bool:
    digest = hashlib.sha1(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _key(parts: list) -> str:
    return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, seed: int = 0, vocab_size: int | None = None) -> Corpus:
    """Prepare `cfg.source` under `cfg.cache_dir` (once) and memory-map it; with
    `cfg.tokenizer = "bpe"` a BPE of `vocab_size` ids (the model's) is learned first."""
    if cfg.tokenizer == "bpe" and not vocab_size:
        raise ConfigError("data.tokenizer = \"bpe\" needs the vocabulary size: set model.vocab_size")
    tokenizer = ["bpe", vocab_size] if cfg.tokenizer == "bpe" else "bytes"
    if cfg.source == "tasks":
        weights = task_weights(cfg.task_weights)
        key = _key([FORMAT_VERSION, "tasks", cfg.task_examples, cfg.val_fraction, seed, weights])
        folder = Path(cfg.cache_dir) / f"tasks-{key}"
        if not (folder / "meta.json").is_file():
            write_directory_atomically(folder, lambda tmp: _write_tasks(tmp, cfg, seed))
    else:
        root, files = source_files(cfg.source)
        listing = [[str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        key = _key([FORMAT_VERSION, str(root.resolve()), listing, cfg.val_fraction, tokenizer])
        if not any(size for _, size, _ in listing):
            raise ConfigError(f"data.source = {cfg.source!r}: every file it names is empty "
                              f"({', '.join(str(f) for f in files[:3])}); give files with text")
        name = "stdlib" if cfg.source == "stdlib" else "text"
        folder = Path(cfg.cache_dir) / f"{name}-{key}"
        if not (folder / "meta.json").is_file():
            print(f"preparing {cfg.source} ({len(files)} files, tokenizer {cfg.tokenizer}) in {folder}", flush=True)
            write_directory_atomically(folder, lambda tmp: _write_text(tmp, root, files, cfg.val_fraction,
                                                                      vocab_size if cfg.tokenizer == "bpe" else None))
    return load_corpus(folder)


def _write_text(tmp: Path, root: Path, files: list[Path], val_fraction: float, bpe_vocab: int | None) -> None:
    """Each file becomes its tokens followed by EOS; files go whole to train or to
    validation. With `bpe_vocab` a BPE is learned on the training files first (their text
    read as UTF-8, a bad byte becoming U+FFFD, so bytes and tokens stay in step)."""
    texts = {"train": [], "val": []}
    for f in files:
        split = "val" if is_validation_file(str(f.relative_to(root)), val_fraction) else "train"
        data = f.read_bytes()
        texts[split].append(data if bpe_vocab is None else data.decode("utf-8", errors="replace").encode())
    if len(files) == 1 or not texts["val"] or not texts["train"]:
        # one file (or an unlucky split): hold out its tail instead, cut at a line
        everything = b"".join(texts["train"] + texts["val"])
        cut = int(len(everything) * (1 - val_fraction))
        line = everything.rfind(b"\n", 0, cut)
        cut = line + 1 if line > 0 else cut
        texts = {"train": [everything[:cut]], "val": [everything[cut:]]}
    if bpe_vocab is None:
        encoded = {split: [list(blob) for blob in blobs] for split, blobs in texts.items()}
    else:
        tok = train_bpe((blob.decode() for blob in texts["train"]), bpe_vocab)
        tok.save(str(tmp / TOKENIZER_FILE))
        encoded = {split: [e.ids for e in tok.encode_batch([blob.decode() for blob in blobs],
                                                            add_special_tokens=False)]
                   for split, blobs in texts.items()}
    for split, rows in encoded.items():
        np.array([i for row in rows for i in [*row, EOS]], dtype=np.uint16).tofile(tmp / f"{split}.bin")
    val_bytes = b"".join(texts["val"])
    meta = {"files": len(files), "root": str(root), "tokenizer": "bpe" if bpe_vocab else "bytes",
            "val_bytes": len(val_bytes), "compressors": compressor_bpb(val_bytes)}
    (tmp / "meta.json").write_text(json.dumps(meta) + "\n")


def compressor_bpb(data: bytes) -> dict:
    """Bits per byte of `data` under gzip -9 (zlib, level 9) and xz -9 (lzma, preset 9): what
    a model has to beat to have learned more than the repetition a dictionary coder finds."""
    if not data:
        return {}
    return {"gzip -9": 8 * len(zlib.compress(data, 9)) / len(data),
            "xz -9": 8 * len(lzma.compress(data, preset=9)) / len(data)}


def load_corpus(folder: Path) -> Corpus:
    def mapped(name: str, dtype) -> np.ndarray:  # an empty split maps to no tokens
        if (folder / name).stat().st_size == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(folder / name, dtype=dtype, mode="r")
    meta = json.loads((folder / "meta.json").read_text())
    tok = load_bpe(folder / TOKENIZER_FILE) if (folder / TOKENIZER_FILE).is_file() else None
    corpus = Corpus(mapped("train.bin", np.uint16), mapped("val.bin", np.uint16), folder,
                    token_bytes=token_bytes(tok), compressors=meta.get("compressors", {}))
    if (folder / "val_examples.npy").is_file():
        examples = np.load(folder / "val_examples.npy")
        corpus.val_examples, corpus.val_example_tasks = examples[:, :3], examples[:, 3]
        corpus.train_task_ids = mapped("train_tasks.bin", np.uint8)
        corpus.train_examples = np.load(folder / "train_examples.npy")
        corpus.train_answer = mapped("train_answer.bin", np.uint8)
    return corpus


# ---------------------------------------------------------------------------------------
# The synthetic task mix
# ---------------------------------------------------------------------------------------

def make_example(task: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, answer) for one example of `task`; the prompt ends with '|'."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    if task == "copy":
        s = "".join(rng.choices(letters, k=rng.randint(3, 12)))
        return f"copy {s}|", s
    if task == "reverse":
        s = "".join(rng.choices(letters, k=rng.randint(3, 12)))
        return f"reverse {s}|", s[::-1]
    if task == "sort":
        s = "".join(rng.choices("0123456789", k=rng.randint(3, 12)))
        return f"sort {s}|", "".join(sorted(s))
    if task == "add":
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        return f"add {a}+{b}|", str(a + b)
    if task == "lookup":
        keys = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(2, 6))
        values = {k: str(rng.randint(0, 99)) for k in keys}
        pairs = ",".join(f"{k}={v}" for k, v in values.items())
        query = rng.choice(keys)
        return f"lookup {query} in {pairs}|", values[query]
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def task_weights(text: str) -> list[float]:
    """data.task_weights ("add=3,lookup=2": unnamed tasks weigh 1) as one weight per task."""
    weights = dict.fromkeys(TASKS, 1.0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if name.strip() not in weights or not weight > 0:
            raise ConfigError(f"data.task_weights: {part!r} must be TASK=WEIGHT with TASK one of "
                              f"{', '.join(TASKS)} and WEIGHT a positive number, e.g. \"add=3,lookup=2\"")
        weights[name.strip()] = weight
    return [weights[t] for t in TASKS]


def _write_tasks(tmp: Path, cfg: DataConfig, seed: int) -> None:
    """Training examples draw their task with data.task_weights; the held-out ones cycle
    through the tasks, so every task is scored on as many examples."""
    rng = random.Random(seed)
    weights = task_weights(cfg.task_weights)
    n_val = max(len(TASKS), int(cfg.task_examples * cfg.val_fraction))
    train_tokens, train_tasks, train_answer, train_starts, val_tokens, val_examples = [], [], [], [], [], []
    start = 0
    for i in range(cfg.task_examples):
        is_train = i < cfg.task_examples - n_val
        if is_train:
            task_index = rng.choices(range(len(TASKS)), weights)[0]
        else:
            task_index = (i - cfg.task_examples + n_val) % len(TASKS)
        prompt, answer = make_example(TASKS[task_index], rng)
        prompt_ids = encode(prompt, bos=True)
        ids = prompt_ids + encode(answer, eos=True)
        if is_train:
            train_starts.append(len(train_tokens))
            train_tokens += ids
            train_tasks += [task_index] * len(ids)
            train_answer += [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
        else:
            val_examples.append([start, len(prompt_ids), len(ids), task_index])
            val_tokens += ids
            start += len(ids)
    np.array(train_tokens, dtype=np.uint16).tofile(tmp / "train.bin")
    np.array(train_tasks, dtype=np.uint8).tofile(tmp / "train_tasks.bin")
    np.array(train_answer, dtype=np.uint8).tofile(tmp / "train_answer.bin")
    np.save(tmp / "train_examples.npy", np.array(train_starts, dtype=np.int64))
    np.array(val_tokens, dtype=np.uint16).tofile(tmp / "val.bin")
    np.save(tmp / "val_examples.npy", np.array(val_examples, dtype=np.int64))
    (tmp / "meta.json").write_text(json.dumps({"tasks": TASKS, "examples": cfg.task_examples}) + "\n")


def task_batch(corpus: Corpus, indices: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
    """Validation examples `indices` as a padded batch: inputs [B, T], targets [B, T] with
    -100 outside the answer (so only answer positions are scored), task [B]."""
    rows = [corpus.val[s:s + n].astype(np.int64) for s, _, n in corpus.val_examples[indices]]
    width = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), width), PAD, dtype=torch.long)
    targets = torch.full((len(rows), width), -100, dtype=torch.long)
    for b, (row, (_, prompt_len, _)) in enumerate(zip(rows, corpus.val_examples[indices])):
        row = torch.from_numpy(row)
        inputs[b, :len(row) - 1] = row[:-1]
        targets[b, prompt_len - 1:len(row) - 1] = row[prompt_len:]
    return inputs, targets, torch.from_numpy(corpus.val_example_tasks[indices].astype(np.int64))


# ---------------------------------------------------------------------------------------
# Batches: batch i is a function of (seed, i)
# ---------------------------------------------------------------------------------------

def batch_offsets(n_tokens: int, seq_len: int, batch_size: int, seed: int, index: int) -> np.ndarray:
    """Start offsets [B] of the windows of batch `index`."""
    if n_tokens < seq_len + 2:
        raise ConfigError(f"the data has {n_tokens} tokens, fewer than train.seq_len + 2 = "
                          f"{seq_len + 2}; lower train.seq_len or use a larger data.source")
    rng = np.random.default_rng([seed, index])
    return rng.integers(0, n_tokens - seq_len - 1, size=batch_size)


def get_batch(tokens: np.ndarray, seq_len: int, batch_size: int, seed: int,
              index: int) -> tuple[Tensor, Tensor]:
    """inputs [B, T] and targets [B, T] (inputs shifted by one) of batch `index`."""
    offsets = batch_offsets(len(tokens), seq_len, batch_size, seed, index)
    windows = np.stack([tokens[o:o + seq_len + 1] for o in offsets]).astype(np.int64)  # [B, T+1]
    windows = torch.from_numpy(windows)
    return windows[:, :-1], windows[:, 1:]


def training_batch(corpus: Corpus, seq_len: int, batch_size: int, seed: int,
                   index: int) -> tuple[Tensor, Tensor]:
    """Batch `index` of the training split: windows anywhere in text; for the task mix,
    windows that start at an example's BOS with targets -100 outside the answers."""
    if not corpus.is_tasks:
        return get_batch(corpus.train, seq_len, batch_size, seed, index)
    starts = corpus.train_examples[corpus.train_examples + seq_len + 1 <= len(corpus.train)]
    if not len(starts):
        raise ConfigError(f"the task mix has {len(corpus.train)} training tokens, fewer than one window of "
                          f"train.seq_len + 1 = {seq_len + 1}; raise data.task_examples or lower train.seq_len")
    rng = np.random.default_rng([seed, index])
    offsets = starts[rng.integers(0, len(starts), size=batch_size)]
    windows = torch.from_numpy(np.stack([corpus.train[o:o + seq_len + 1] for o in offsets]).astype(np.int64))
    answer = torch.from_numpy(np.stack([corpus.train_answer[o + 1:o + seq_len + 1] for o in offsets]))
    return windows[:, :-1], windows[:, 1:].masked_fill(answer == 0, -100)
