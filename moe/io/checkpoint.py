"""Checkpoints: a directory holding `config.json` and `model.safetensors`.

Why this format: safetensors holds tensors only (no pickled code runs on load) and can be
memory-mapped; the config beside it in plain JSON says how to rebuild the model before
the weights arrive, so a checkpoint is readable without this codebase. Saving goes
through moe/io/files.py, atomically: a kill leaves the old checkpoint or the new one.

Loading checks every tensor name and shape against the model the config builds and says
which tensor is missing, unexpected or the wrong shape.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moe.config import ModelConfig, from_dict
from moe.io.files import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, write_directory_atomically
from moe.io.hf import STORED_DTYPES, is_hf_folder, load_hf, weight_files
from moe.model.transformer import Transformer
from moe.tokenizer import TOKENIZER_FILE


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """The tensors to store: the state dict without the tied output head (it is the embedding)."""
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    return {name: tensor.contiguous() for name, tensor in state.items()}


def write_model(model: Transformer, folder: Path, metadata: dict[str, str] | None = None) -> None:
    """Write config and weights into `folder` (not atomic: call inside write_directory_atomically)."""
    (folder / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(model.cfg), indent=2) + "\n")
    save_file(model_state(model), str(folder / WEIGHTS_FILE), metadata=metadata)


def save_model(model: Transformer, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Save config and weights to directory `path`, atomically."""
    return write_directory_atomically(path, lambda tmp: write_model(model, tmp, metadata))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as given, or for a training run folder (`runs/NAME`, with
    `ckpt/latest` naming its newest checkpoint) that newest checkpoint."""
    path = Path(path)
    latest = path / "ckpt" / "latest"
    if (path / CONFIG_FILE).is_file() or not latest.is_file():
        return path
    step_dir = path / "ckpt" / latest.read_text().strip()
    if not step_dir.is_dir():
        raise CheckpointError(f"{latest} names {step_dir.name}, which does not exist; "
                              f"pick a checkpoint under {path / 'ckpt'} directly")
    return step_dir


def load_config(path: str | Path) -> ModelConfig:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: a checkpoint is a directory with "
                              f"{CONFIG_FILE} and {WEIGHTS_FILE} (written by save_model)")
    try:
        values = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON: {error}") from None
    return from_dict(ModelConfig, values, "model")


def stored_dtype(path: str | Path) -> torch.dtype:
    """The dtype a checkpoint (ours, a run folder or a Hugging Face folder) stores its
    embedding in, read from the safetensors header without loading a tensor."""
    path = resolve_checkpoint(path)
    if is_hf_folder(path):
        file, name = weight_files(path)["model.embed_tokens.weight"], "model.embed_tokens.weight"
    else:
        load_config(path)  # a missing or broken config.json says so first
        file, name = Path(path) / WEIGHTS_FILE, "embed.weight"
    try:
        with safe_open(str(file), framework="pt") as handle:
            stored = handle.get_slice(name).get_dtype()
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"cannot read {file} ({error}); the checkpoint is incomplete") from None
    if stored not in STORED_DTYPES:
        raise CheckpointError(f"{name} in {file} is stored as {stored}: only "
                              f"{', '.join(STORED_DTYPES)} checkpoints load here")
    return STORED_DTYPES[stored]


def load_model(path: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """Build the model from `path/config.json` and fill it from `path/model.safetensors`,
    refusing any tensor whose name or shape does not match. `path` may also be a training
    run folder (its latest checkpoint loads). A Hugging Face Mixtral folder
    (its config.json names a model_type) loads through moe.io.hf.load_hf."""
    path = resolve_checkpoint(path)
    if is_hf_folder(path):
        return load_hf(path, device, dtype)
    cfg = load_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {name: tuple(t.shape) for name, t in model_state(model).items()}
    file = Path(path) / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found; the checkpoint is incomplete")
    try:
        tensors = _read_tensors(file, expected, device, dtype)
    except SafetensorError as error:
        raise CheckpointError(f"{file} is corrupt or truncated ({error}); load an older "
                              "checkpoint of the run instead (its ckpt/step_* folders)") from None
    model.load_state_dict(tensors, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    if (Path(path) / TOKENIZER_FILE).is_file():
        model.hf_origin = Path(path)  # save_hf carries the learned BPE over (moe/tokenizer.py)
    return model


def _read_tensors(file: Path, expected: dict[str, tuple], device, dtype) -> dict[str, torch.Tensor]:
    tensors = {}
    with safe_open(str(file), framework="pt", device=str(device)) as f:
        names = set(f.keys())
        missing = sorted(set(expected) - names)
        unexpected = sorted(names - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{file} does not match its config: missing tensors {missing}, "
                                  f"unexpected tensors {unexpected}")
        for name, shape in expected.items():
            tensor = f.get_tensor(name)
            if tuple(tensor.shape) != shape:
                raise CheckpointError(f"tensor {name} in {file} has shape {tuple(tensor.shape)}, "
                                      f"the config needs {shape}")
            tensors[name] = tensor if dtype is None else tensor.to(dtype)
    return tensors
