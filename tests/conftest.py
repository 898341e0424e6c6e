"""Test set-up: Triton's interpreter on machines without a GPU, two CPU threads, and a
small model factory shared by the tests.

The kernel tests build their tensors on `DEVICE`: compiled on a CUDA GPU when one is
present (benchmarks/gpu_check.sh runs them there), through the interpreter otherwise, so
the same test files serve both. `COMPILED` says which; bfloat16 dots are checked only
when compiled (the interpreter multiplies bfloat16 bit patterns wrongly, Triton 3.8).
`train_tiny_run` trains a two-step byte-level run folder for the scripts that read one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where kernel tests run
COMPILED = DEVICE.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402

from moe.config import ModelConfig  # noqa: E402
from moe.model.transformer import Transformer  # noqa: E402

needs_compiled_triton = pytest.mark.skipif(
    not COMPILED, reason="bfloat16 dots run only compiled on a CUDA GPU (benchmarks/gpu_check.sh); "
                         "the interpreter multiplies bfloat16 bit patterns wrongly")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, in float64; NaN anywhere fails every bound."""
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm())


DISPATCH_D, DISPATCH_F, DISPATCH_E = 40, 24, 6  # dispatch test widths that are not powers of two


def dispatch_problem(n: int, k: int, seed: int = 0, device: torch.device = DEVICE) -> tuple:
    """An expert-dispatch case on `device`: x [N, D], expert ids [N, K] (distinct per
    token), routing weights [N, K], w_in [E, D, 2F], w_out [E, F, D], an output gradient dy [N, D]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DISPATCH_D, generator=gen)
    ids = torch.stack([torch.randperm(DISPATCH_E, generator=gen)[:k] for _ in range(n)])  # [N, K]
    weights = torch.rand(n, k, generator=gen)
    w_in = torch.randn(DISPATCH_E, DISPATCH_D, 2 * DISPATCH_F, generator=gen) * 0.2
    w_out = torch.randn(DISPATCH_E, DISPATCH_F, DISPATCH_D, generator=gen) * 0.2
    dy = torch.randn(n, DISPATCH_D, generator=gen)
    return tuple(t.to(device) for t in (x, ids, weights, w_in, w_out, dy))


def dispatch_gradients(fn, x, ids, weights, w_in, w_out, dy, capacity) -> tuple:
    """(y, dropped slots, gradients of x, weights, w_in and w_out) of dispatch `fn`."""
    leaves = [t.clone().requires_grad_() for t in (x, weights, w_in, w_out)]
    y, dropped = fn(leaves[0], ids, *leaves[1:], capacity)
    (y * dy).sum().backward()
    return y.detach(), dropped, [t.grad for t in leaves]


def tiny_config(**overrides) -> ModelConfig:
    """A model small enough to run dozens of times per test file."""
    settings = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_expert=24, n_experts=4,
                    experts_per_token=2, max_seq_len=64)
    settings.update(overrides)
    return ModelConfig(**settings)


@pytest.fixture
def make_model():
    def make(seed: int = 0, **overrides) -> Transformer:
        torch.manual_seed(seed)
        return Transformer(tiny_config(**overrides)).eval()
    return make


ROOT = Path(__file__).resolve().parents[1]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # for the subprocesses of the script tests


def train_tiny_run(run: Path, source: Path, cache: Path, *settings: str) -> None:
    """train.py, two steps of a byte-level one-layer MoE on `source`, into `run` (a folder
    with setup.json and a checkpoint, what scripts/ take); `settings` are more --set values."""
    base = [f"data.source={json.dumps(str(source))}", f"data.cache_dir={json.dumps(str(cache))}",
            'data.tokenizer="bytes"', "model.vocab_size=259", "model.n_layers=1", "model.d_model=32",
            "model.n_heads=2", "model.d_expert=32", "model.n_experts=4", "train.max_steps=2",
            "train.batch_size=2", "train.seq_len=16", "train.eval_every=2", "train.eval_batches=1",
            "train.unlikelihood_steps=0"]
    trained = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.toml", "--out", str(run),
                              "--quiet", *[f"--set={s}" for s in [*base, *settings]]],
                             cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=120)
    assert trained.returncode == 0, trained.stderr
