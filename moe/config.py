"""Configuration: one dataclass per concern, loaded from TOML with command-line overrides.

Why a dataclass and not a dict: every setting has a name, a type and a default in one
place, derived fields (head size, which layers are MoE) are computed once in
`__post_init__`, and a bad value is refused the moment the config is built, with an
error that names the key and says how to fix it, long before a tensor shape goes wrong
deep inside the model.

A setup lives in `configs/NAME.toml`, one table per section:

    [model]
    d_model = 128   # width of the residual stream

and any value can be overridden from the command line with `--set model.n_layers=4`
(the value is read as TOML, so `--set model.capacity_factor=1.25` is a float and
`--set model.capacity_factor=none` clears an optional setting).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BYTE_VOCAB_SIZE = 259  # 256 byte values + BOS, EOS, PAD (see moe/tokenizer.py)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the key and the fix."""


@dataclass
class ModelConfig:
    """The shape of the transformer. Shape letters used across the code:
    B batch, T time, D d_model, H n_heads, G n_kv_heads, E n_experts, K experts_per_token."""

    vocab_size: int = BYTE_VOCAB_SIZE  # token ids are in [0, vocab_size)
    d_model: int = 128  # D, width of the residual stream
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # H, query heads
    n_kv_heads: int = 1  # G: 1 = multi-query, n_heads = multi-head, between = grouped
    head_dim: int | None = None  # per-head width; None = d_model // n_heads
    d_expert: int = 256  # hidden width of each SwiGLU expert
    d_ff: int | None = None  # hidden width of the dense SwiGLU FFN; None = d_expert
    n_experts: int = 16  # E, experts per MoE layer
    experts_per_token: int = 2  # K, experts each token is routed to
    moe_every: int = 1  # layer i is MoE when (i + 1) % moe_every == 0; 1 = all, 0 = none
    capacity_factor: float | None = None  # None = dropless; else slots per expert = cf * N * K / E
    aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss
    z_loss_coef: float = 0.001  # weight of the router z-loss
    router_jitter: float = 0.0  # multiplicative noise on router input while training
    router_score: str = "softmax"  # "softmax" over the E logits | "sigmoid" of each (DeepSeek-V3)
    balance: str = "aux_loss"  # "aux_loss" (Switch loss, aux_loss_coef) | "bias": a per-expert selection bias, no aux loss
    bias_update_rate: float = 0.001  # balance = "bias": each step, bias += rate * sign(mean load - load)
    n_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeekMoE), width d_expert
    routing: str = "token_choice"  # "token_choice" (each token picks K) | "expert_choice" (each expert picks its capacity; not causal)
    short_conv: int = 0  # width W of a causal depthwise convolution on each attention input (Canon layers); 0 = none
    short_conv_ffn: bool = False  # the same convolution on each FFN input too (Canon-C); needs short_conv
    short_conv_init: float = 0.0  # taps drawn uniform in [-a, a] at init (a Conv1d's default is 0.5); 0 = init_std normal
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_base: float = 10000.0  # rotary position base frequency
    max_seq_len: int = 256  # longest sequence (prompt + generation)
    tie_embeddings: bool = False  # share the input embedding with the output head
    dropout: float = 0.0  # dropout on attention probabilities and residual branches
    init_std: float = 0.02  # std of the normal weight init
    kernel_backend: str = "auto"  # "auto" (Triton on CUDA) | "triton" | "torch"; see kernels/backend.py

    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_expert",
                    "n_experts", "experts_per_token", "max_seq_len"):
            _require(getattr(self, key) >= 1, key, f"must be at least 1, got {getattr(self, key)}")
        _require(self.moe_every >= 0, "moe_every", "must be 0 (no MoE layer) or a positive period")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_kv_heads = {self.n_kv_heads} does not divide model.n_heads = {self.n_heads}: "
                "each KV head serves n_heads // n_kv_heads query heads; pick a divisor of n_heads "
                "(1 = multi-query, n_heads = multi-head)")
        if self.experts_per_token > self.n_experts:
            raise ConfigError(
                f"model.experts_per_token = {self.experts_per_token} is above model.n_experts = "
                f"{self.n_experts}: a token cannot be routed to more experts than exist; lower it")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"model.d_model = {self.d_model} is not divisible by model.n_heads = {self.n_heads}: "
                    "set model.head_dim explicitly or pick n_heads that divides d_model")
            self.head_dim = self.d_model // self.n_heads
        _require(self.head_dim >= 2 and self.head_dim % 2 == 0, "head_dim",
                 f"must be even for rotary embeddings, got {self.head_dim}")
        if self.d_ff is None:
            self.d_ff = self.d_expert
        _require(self.d_ff >= 1, "d_ff", f"must be at least 1, got {self.d_ff}")
        if self.capacity_factor is not None:
            _require(self.capacity_factor > 0, "capacity_factor",
                     f"must be positive (or none for dropless), got {self.capacity_factor}")
        for key in ("aux_loss_coef", "z_loss_coef", "router_jitter", "init_std"):
            _require(getattr(self, key) >= 0, key, f"must be non-negative, got {getattr(self, key)}")
        _require(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.norm_eps > 0, "norm_eps", f"must be positive, got {self.norm_eps}")
        _require(self.rope_base > 1, "rope_base", f"must be above 1, got {self.rope_base}")
        _require(self.kernel_backend in ("auto", "triton", "torch"), "kernel_backend",
                 f"must be \"auto\", \"triton\" or \"torch\", got {self.kernel_backend!r}")
        _require(self.router_score in ("softmax", "sigmoid"), "router_score",
                 f"must be \"softmax\" or \"sigmoid\", got {self.router_score!r}")
        _require(self.balance in ("aux_loss", "bias"), "balance",
                 f"must be \"aux_loss\" or \"bias\", got {self.balance!r}")
        _require(self.routing in ("token_choice", "expert_choice"), "routing",
                 f"must be \"token_choice\" or \"expert_choice\", got {self.routing!r}")
        _require(self.bias_update_rate >= 0, "bias_update_rate",
                 f"must be non-negative, got {self.bias_update_rate}")
        _require(self.n_shared_experts >= 0, "n_shared_experts",
                 f"must be 0 or more, got {self.n_shared_experts}")
        _require(self.short_conv >= 0, "short_conv",
                 f"must be 0 (none) or a width of 1 or more, got {self.short_conv}")
        _require(not self.short_conv_ffn or self.short_conv > 0, "short_conv_ffn",
                 "needs model.short_conv, the convolution's width: set short_conv = 4, say")
        _require(self.short_conv_init >= 0, "short_conv_init",
                 f"must be 0 (init_std normal) or a positive bound, got {self.short_conv_init}")
        if self.routing == "expert_choice" and self.balance == "bias":
            raise ConfigError("model.balance = \"bias\" does not go with model.routing = \"expert_choice\": "
                              "expert choice gives every expert exactly its capacity, so there is "
                              "no load to balance; use balance = \"aux_loss\" (its loss is then constant)")

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_every > 0 and (layer + 1) % self.moe_every == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    @property
    def conv_sites(self) -> int:
        """Short convolutions per block: 0, 1 (attention input) or 2 (and FFN input)."""
        return (1 + self.short_conv_ffn) if self.short_conv else 0

    @property
    def kv_group_size(self) -> int:
        """Query heads that share one KV head (H // G)."""
        return self.n_heads // self.n_kv_heads


def _require(ok: bool, key: str, message: str, section: str = "model") -> None:
    if not ok:
        raise ConfigError(f"{section}.{key} {message}")


# ---------------------------------------------------------------------------------------
# Loading: TOML file -> sections -> typed, validated dataclasses
# ---------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, batch, evaluation, checkpoints (see moe/training/loop.py)."""

    max_steps: int = 2000  # optimiser steps
    batch_size: int = 16  # sequences per micro-batch
    seq_len: int = 128  # tokens per training sequence (at most model.max_seq_len)
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # learning rate at the end of the cosine
    warmup_steps: int = 100  # linear warmup from 0 to lr
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_every: int = 200  # steps between evaluations
    eval_batches: int = 0  # validation batches per evaluation; 0 = the whole split
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept
    log_every: int = 10  # steps between metrics.jsonl lines
    seed: int = 0  # seeds the model init and the data order
    device: str = "auto"  # "auto" (cuda if present) | "cpu" | "cuda"
    compile: bool = False  # torch.compile the model
    parallel: str = "ddp"  # under torchrun: "ddp" (replicate) | "fsdp" (FSDP2 fully_shard); moe/parallel/distributed.py
    dist_timeout_s: float = 600.0  # under torchrun: a collective waiting this long on a hung rank ends the job
    distill_from: str | None = None  # target checkpoint or run folder: train on KL to its distribution
    distill_weight: float = 1.0  # weight of the distillation KL against the plain cross-entropy
    distill_temperature: float = 1.0  # softening temperature of both distributions
    unlikelihood_steps: int = 0  # the last this many steps add sequence-level unlikelihood on the model's own greedy continuations (moe/training/unlikelihood.py); 0 = off
    unlikelihood_weight: float = 1.0  # weight of that term beside the cross-entropy
    unlikelihood_prefix: int = 48  # continuations start after the first 4..this many tokens of a training window
    unlikelihood_tokens: int = 96  # greedy tokens decoded per window and scored
    unlikelihood_ngram: int = 4  # a decoded token inside an n-gram of this many tokens seen before it is penalised

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every",
                    "checkpoint_every", "keep_checkpoints", "log_every"):
            _require(getattr(self, key) >= 1, key, f"must be at least 1, got {getattr(self, key)}",
                     "train")
        _require(self.eval_batches >= 0, "eval_batches",
                 f"must be 0 (the whole validation split) or a number of batches, got {self.eval_batches}",
                 "train")
        _require(self.dist_timeout_s > 0, "dist_timeout_s", f"must be positive, got {self.dist_timeout_s}",
                 "train")
        for key in ("lr", "min_lr", "weight_decay", "grad_clip", "warmup_steps", "distill_weight"):
            _require(getattr(self, key) >= 0, key, f"must be non-negative, got {getattr(self, key)}",
                     "train")
        _require(self.min_lr <= self.lr, "min_lr", f"= {self.min_lr} must not exceed train.lr = {self.lr}",
                 "train")
        for key in ("beta1", "beta2"):
            _require(0 <= getattr(self, key) < 1, key, f"must be in [0, 1), got {getattr(self, key)}",
                     "train")
        _require(self.unlikelihood_steps >= 0, "unlikelihood_steps",
                 f"must be 0 (off) or a number of steps, got {self.unlikelihood_steps}", "train")
        _require(self.unlikelihood_weight >= 0, "unlikelihood_weight",
                 f"must be non-negative, got {self.unlikelihood_weight}", "train")
        _require(self.unlikelihood_prefix >= 4, "unlikelihood_prefix",
                 f"must be at least 4 tokens, got {self.unlikelihood_prefix}", "train")
        for key in ("unlikelihood_tokens", "unlikelihood_ngram"):
            _require(getattr(self, key) >= 1, key, f"must be at least 1, got {getattr(self, key)}", "train")
        _require(self.distill_temperature > 0, "distill_temperature",
                 f"must be positive, got {self.distill_temperature}", "train")
        _require(self.device in ("auto", "cpu", "cuda"), "device",
                 f"must be \"auto\", \"cpu\" or \"cuda\", got {self.device!r}", "train")
        _require(self.parallel in ("ddp", "fsdp"), "parallel",
                 f"must be \"ddp\" or \"fsdp\", got {self.parallel!r} (expert parallel is "
                 "train.py --expert-parallel D)", "train")


@dataclass
class DataConfig:
    """What to train on (see moe/training/data.py)."""

    source: str = "stdlib"  # "stdlib" | "tasks" (synthetic mix) | a text file, folder or glob
    val_fraction: float = 0.05  # share of files (or task examples) held out for validation
    cache_dir: str = ".cache"  # where prepared token files live
    task_examples: int = 20000  # examples generated for the synthetic task mix
    task_weights: str = ""  # training share of each task, e.g. "add=3,lookup=2" (others 1); held-out examples stay balanced
    tokenizer: str = "bytes"  # "bytes" | "bpe": a byte-level BPE of model.vocab_size ids learned on the training split

    def __post_init__(self) -> None:
        _require(self.tokenizer in ("bytes", "bpe"), "tokenizer",
                 f"must be \"bytes\" or \"bpe\", got {self.tokenizer!r}", "data")
        if self.tokenizer == "bpe" and self.source == "tasks":
            raise ConfigError("data.tokenizer = \"bpe\" does not go with data.source = \"tasks\": the "
                              "tasks are defined on characters (copy, reverse, sort...); use "
                              "data.tokenizer = \"bytes\"")
        _require(0 < self.val_fraction < 1, "val_fraction", f"must be in (0, 1), got {self.val_fraction}",
                 "data")
        _require(self.task_examples >= 10, "task_examples",
                 f"must be at least 10, got {self.task_examples}", "data")


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def from_dict(cls: type, values: dict[str, Any], section: str):
    """Build dataclass `cls` from `values`, refusing unknown keys and wrong types by name."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = [name for name in fields if name.startswith(key[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{section}.{key} is not a known setting{hint}; "
                              f"known: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field annotation (int, float, bool, str, X | None)."""
    args = typing.get_args(annotation)
    optional = isinstance(annotation, types.UnionType) and type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {annotation!r} for {key}")
    allowed = annotation.__name__ + (" or none" if optional else "")
    raise ConfigError(f"{key} must be {allowed}, got {value!r} ({type(value).__name__}); "
                      f"write e.g. {key.split('.')[-1]} = {_example(annotation)}")


def _example(annotation: type) -> str:
    return {bool: "true", int: "4", float: "0.5", str: '"text"'}[annotation]


def parse_override(text: str) -> tuple[str, str, Any]:
    """'model.n_layers=4' -> ('model', 'n_layers', 4); the value is parsed as TOML."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r} must look like section.key=value, "
                          "e.g. --set model.n_layers=4")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as none, or an unquoted string
    return section, key, value


def load_sections(path: str | Path | None, overrides: list[str] = ()) -> dict[str, dict[str, Any]]:
    """Read a TOML setup and apply `section.key=value` overrides; sections stay raw dicts."""
    data: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pick one of "
                              f"{', '.join(sorted(p.name for p in Path('configs').glob('*.toml')))}"
                              " or give a path")
        with path.open("rb") as f:
            try:
                data = tomllib.load(f)
            except tomllib.TOMLDecodeError as error:
                raise ConfigError(f"{path} is not valid TOML: {error}") from None
    for override in overrides:
        section, key, value = parse_override(override)
        data.setdefault(section, {})[key] = value
    for section, values in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"[{section}] is not a known section; known: {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{section} must be a table ([{section}]), got {values!r}")
    return data


def load_model_config(path: str | Path | None, overrides: list[str] = ()) -> ModelConfig:
    return from_dict(ModelConfig, load_sections(path, overrides).get("model", {}), "model")


def load_setup(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """Every section of a setup as its dataclass: {"model": ModelConfig, "train": ..., ...}."""
    sections = load_sections(path, overrides)
    return {name: from_dict(cls, sections.get(name, {}), name) for name, cls in SECTIONS.items()}
