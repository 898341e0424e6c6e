"""Measuring: profiler labels that cost nothing unless a profiler is recording, and the
device synchronisation every timed forward needs.

Why: `benchmarks/bench_decode.py` splits a decode step's time into schedule, layout,
attention, router, dispatch, sampling and postprocess with `torch.profiler`, which needs
those regions labelled in the code. A `record_function` costs about 10 us even when no
profiler runs, and a tiny model's decode step has a few dozen of them against a few
milliseconds of work; so a label is only opened while the profiler is on.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.profiler import record_function


def label(name: str):
    """A context that names its region in a running torch.profiler trace; else a no-op
    (always inside a compiled graph, which has no regions of its own to name)."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return nullcontext()
    return record_function(name)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; CPU needs nothing), so
    a timer around a forward measures the forward and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
