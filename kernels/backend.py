"""Which implementation runs a kernel: the Triton kernel or its plain-PyTorch reference.

Why a switch and not an import-time choice: the same model runs on a laptop CPU (no
Triton, or Triton only through its interpreter), and on a GPU for serving and training
(Triton; a kernel without a backward falls back to the reference when autograd needs
one). The setting comes from `ModelConfig.kernel_backend`; the environment variable
`MOE_KERNEL_BACKEND` overrides it for one run without editing a config:

    MOE_KERNEL_BACKEND=torch python generate.py ...

    "auto"   -> "triton" when the tensors are on CUDA and Triton imports, else "torch"
    "triton" -> the Triton kernels (on CPU only under TRITON_INTERPRET=1, for tests)
    "torch"  -> the references
"""

from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "triton", "torch")
ENV_VAR = "MOE_KERNEL_BACKEND"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend to use for tensors on `device`: "triton" or "torch"."""
    name = os.environ.get(ENV_VAR) or name
    if name not in BACKENDS:
        raise ValueError(f"kernel backend {name!r} is not one of {', '.join(BACKENDS)}; "
                         f"fix model.kernel_backend or the {ENV_VAR} environment variable")
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' was asked for but triton does not import; "
                               "install triton (Linux x86-64) or use kernel_backend = \"torch\"")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"kernel backend 'triton' needs CUDA tensors, got {device}; run on "
                               "a GPU, set TRITON_INTERPRET=1 before importing triton (slow, for "
                               "tests) or use kernel_backend = \"auto\"")
    return name


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels accumulate from


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will record an operation on `tensors`."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def use_triton(name: str, *tensors: torch.Tensor, has_backward: bool = False) -> bool:
    """Whether an operation over `tensors` should run a Triton kernel: the backend says so,
    the tensors are in a kernel dtype (float64, for exactness tests, runs the reference) and
    either no gradient is needed or the caller has a backward kernel (`has_backward`: the
    dispatch and varlen attention in kernels/*_backward.py); otherwise the reference runs."""
    if resolve_backend(name, tensors[0].device) != "triton":
        return False
    if any(t.dtype not in KERNEL_DTYPES for t in tensors):
        return False
    return has_backward or not needs_grad(*tensors)
