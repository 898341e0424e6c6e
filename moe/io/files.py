"""Files on disk that a kill never leaves half-written, and the names of a checkpoint's files.

Why atomic: a run killed halfway through a save must never leave a folder that looks
complete but is not. Everything is written into a temporary sibling directory, each file
is flushed to disk (fsync), and only then is the directory renamed into place; a rename
within one filesystem is atomic, so a reader sees the old folder or the new one, never
half of one. Used for checkpoints (moe/io/checkpoint.py, moe/io/hf.py), prepared data
(moe/training/data.py), a run's small files (`latest`, setup.json, metrics.jsonl) and
the n-gram draft (moe/serving/ngram_draft.py); imports no model code, so preparing data
does not load the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file or tensor."""


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, write) -> None:
    """Call `write(tmp_path)` to fill a temporary sibling of `path`, fsync it and rename it
    over `path`: a reader sees the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text`: a reader sees the old file or the new one, never half."""
    write_file_atomically(path, lambda tmp: tmp.write_text(text))


def write_directory_atomically(path: str | Path, write) -> Path:
    """Call `write(tmp_dir)` to fill a fresh temporary directory, fsync it, rename it to
    `path`. An existing `path` is replaced: moved aside first, deleted after the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write(tmp)
        for file in tmp.iterdir():
            fsync(file)
        fsync(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
