"""Test set-up: Triton's interpreter on machines without a GPU, two CPU threads, and a
small model factory shared by the tests."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first `import triton`
torch.set_num_threads(min(2, torch.get_num_threads()))

import pytest  # noqa: E402

from moe.config import ModelConfig  # noqa: E402
from moe.model import Transformer  # noqa: E402


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
