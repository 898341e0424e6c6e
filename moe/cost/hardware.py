"""Hardware for the cost arithmetic: datasheet presets and a measurement of this machine.

Why efficiencies beside the peaks: no kernel reaches a datasheet's numbers, and serving
cost estimates (the LLaMA-2-70B analysis in docs/inference-arithmetic.md) are quoted at
reached rates: 200 TFLOP/s and 1.3 TB/s on an A100 whose peaks are 312 TFLOP/s and
2.04 TB/s, i.e. 0.64 of each. `measure_hardware` reads what this machine reaches (a large
tensor copy for bandwidth, a square matmul for FLOP/s), so its efficiencies are 1.
Prices are assumptions (rent varies by provider and year); `--price` overrides them.
Units are decimal (1 TB/s = 1e12 bytes/s) except GiB = 2**30.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

GiB = 2**30


@dataclass
class Hardware:
    """One device. Peak numbers are the datasheet's; the efficiencies turn them into what a
    well-tuned kernel reaches (0.64 of an A100's 312 TFLOP/s and 2.04 TB/s is the 200 TFLOP/s
    and 1.3 TB/s of the LLaMA-2 cost analysis)."""

    name: str
    peak_flops: float  # dense 16-bit matmul FLOP/s
    bandwidth: float  # memory bytes/s
    memory_bytes: float
    price_per_hour: float  # $ per device-hour (an assumption: rent varies; --price overrides)
    flops_efficiency: float = 0.64
    bandwidth_efficiency: float = 0.64
    reserve_bytes: float = 2e9  # CUDA context, workspaces, activations: not for weights or KV

    @property
    def flops(self) -> float:
        return self.peak_flops * self.flops_efficiency

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth * self.bandwidth_efficiency


PRESETS = {
    "A100-40GB": Hardware("A100-40GB", 312e12, 1.555e12, 40 * GiB, 1.00),  # $1/h: GPT-4 training estimate
    "A100-80GB": Hardware("A100-80GB", 312e12, 2.039e12, 80 * GiB, 2.21),  # $4.42/h for two
    "H100": Hardware("H100", 989e12, 3.35e12, 80 * GiB, 2.00),  # SXM; $2/h: GPT-4 H100 estimate
    "H200": Hardware("H200", 989e12, 4.8e12, 140 * GiB, 3.50),
}


def measure_hardware(device: str | None = None, seconds: float = 0.3) -> Hardware:
    """This machine's copy bandwidth (bytes read + written per second by a large tensor copy)
    and matmul FLOP/s (float32 on CPU, bfloat16 on GPU); efficiencies are 1: these are reached."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def rate(work, amount: float) -> float:
        work()
        sync()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or count < 3:
            work()
            count += 1
        sync()
        return amount * count / (time.perf_counter() - start)

    # 256 MiB on a GPU; 1 GiB on a CPU, above any last-level cache (this machine's: 300 MiB),
    # so the copy measures memory rather than cache
    src = torch.empty(2**28 if cuda else 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bandwidth = rate(lambda: dst.copy_(src), 2 * src.numel())
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = rate(lambda: a @ b, 2 * n**3)
    if cuda:
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, props.total_memory
    else:
        name, memory = "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(f"measured {name}", flops, bandwidth, memory, 0.0, 1.0, 1.0, 0.0)


def hardware_for(name: str) -> Hardware:
    if name == "measure":
        return measure_hardware()
    if name not in PRESETS:
        raise ValueError(f"unknown hardware {name!r}; pick one of {', '.join(PRESETS)} or 'measure'")
    return PRESETS[name]


def preset_for_device(device_name: str) -> Hardware | None:
    """Match a device name as torch reports it ('NVIDIA A100-SXM4-80GB') to a preset."""
    name = device_name.upper()
    for key in ("H200", "H100"):
        if key in name:
            return PRESETS[key]
    if "A100" in name:
        return PRESETS["A100-40GB" if "40GB" in name else "A100-80GB"]
    return None
