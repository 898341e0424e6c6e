"""Triton, or a stand-in where it does not install (macOS, Windows, some ARM boxes).

Why a stand-in: every kernel module keeps its plain-PyTorch reference beside the Triton
kernel, and the model imports the references everywhere. With the stand-in, `@triton.jit`
and `tl.constexpr` annotations still evaluate, so the module imports; only launching a
kernel needs the real Triton, and `kernels.backend.resolve_backend` refuses that first.
"""

try:
    import triton
    import triton.language as tl
except ImportError:
    class _MissingTriton:
        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _MissingTriton

__all__ = ["triton", "tl"]
