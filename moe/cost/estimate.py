"""Inference arithmetic: what a model costs to serve, from its config and the hardware alone.

Why: before building (or buying) anything, a few multiplications say whether serving is
bound by memory bandwidth or by compute, how many sequences fit beside the weights, and
what a thousand tokens cost. Decode reads every touched weight once per step and does
2 FLOPs per weight per token, so at small batch it waits on memory; prefill pushes many
tokens through one weight read, so it waits on compute. A sparse MoE reads only the
experts its batch touches: with top-K of E under uniform routing, T tokens hit
E(1 - (1 - K/E)^T) experts per layer on average (exact: each expert is missed by one
token with probability 1 - K/E). The roofline takes the slower of the two limits.

    python -m moe.cost.estimate configs/llama2-70b.toml --hardware A100-80GB --tensor 2
    python -m moe.cost.estimate configs/gpt4.toml --hardware H100 --tensor 8 --pipeline 16 --batch 64
    python -m moe.cost.estimate configs/tiny.toml --hardware measure          # this machine
    python -m moe.cost.estimate --measured benchmarks/results/generation_all.json

Units are decimal (1 GB = 1e9 bytes, 1 KB = 1e3 bytes, 1 TFLOP/s = 1e12 FLOP/s); a name
that says GiB or KiB is binary. Parallel layout (our model of it): tensor parallel splits
every weight and the KV heads (a KV head is replicated when there are fewer KV heads than
tensor ranks); pipeline parallel splits the layers, which run one stage after another, so
a step takes as long as without it, but each stage works on a different batch, so
`pipeline` batches are in flight and throughput (and the KV cache held) grows by that
factor; expert parallel splits the experts, and each expert group runs attention on its
own share of the batch.

Shape letters: B sequences in the batch, P prompt length, O output length, C context (keys
attended), T tokens in one step, L layers, H query heads, G KV heads, Dh head width,
E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from moe.config import ModelConfig, from_dict, load_model_config
from moe.cost.hardware import PRESETS, Hardware, hardware_for, measure_hardware, preset_for_device
from moe.model.transformer import count_parameters

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2,
               "int8": 1, "fp8": 1}


@dataclass
class Layout:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1

    def __post_init__(self) -> None:
        for key in ("tensor", "pipeline", "expert"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} = {getattr(self, key)}: a parallel degree is at least 1 "
                                 "(1 = not split that way)")

    @property
    def devices(self) -> int:
        return self.tensor * self.pipeline * self.expert


# ---------------------------------------------------------------------------------------
# Per-token arithmetic
# ---------------------------------------------------------------------------------------

def expected_experts_hit(n_experts: int, k: int, tokens: float) -> float:
    """Expected distinct experts one MoE layer runs for `tokens` tokens under uniform top-k."""
    return n_experts * (1 - (1 - k / n_experts) ** tokens)


def matmul_params(cfg: ModelConfig) -> int:
    """Active parameters that are matmul weights (the input embedding is a lookup and norms
    are elementwise); 2 FLOPs each per token."""
    p = count_parameters(cfg)
    lookup = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    return p.active - p.norms - lookup


def attention_flops_per_token(cfg: ModelConfig, context: float) -> float:
    """Scores q.k and the weighted sum of v over `context` keys: 2 x 2 x L x H x Dh x C."""
    return 4 * cfg.n_layers * cfg.n_heads * cfg.head_dim * context


def decode_flops_per_token(cfg: ModelConfig, context: float) -> float:
    return 2 * matmul_params(cfg) + attention_flops_per_token(cfg, context)


def prefill_flops_per_token(cfg: ModelConfig, prompt_len: int) -> float:
    """Causal: token t attends to t keys, so the mean context is (P + 1) / 2."""
    return decode_flops_per_token(cfg, (prompt_len + 1) / 2)


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """One training token: the forward of a causal window of `seq_len` (the matmul weights
    at 2 FLOPs each, attention over (seq_len + 1) / 2 keys on average) and a backward of
    twice that: 3 x (2 x matmul_params + 4 x L x H x Dh x (seq_len + 1) / 2). MFU is this
    times tokens/s over the device's peak."""
    return 3 * prefill_flops_per_token(cfg, seq_len)


def kv_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> int:
    """K and V for every layer and KV head: 2 x L x G x Dh x bytes."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bytes_per_value


def kv_share_per_device(cfg: ModelConfig, layout: Layout) -> float:
    """Share of one sequence's KV cache that one device holds: its pipeline stage's layers
    and ceil(G / tensor) of the G KV heads (with MQA every tensor rank keeps the one head)."""
    return math.ceil(cfg.n_kv_heads / layout.tensor) / cfg.n_kv_heads / layout.pipeline


# ---------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------

@dataclass
class Estimate:
    total_params: int
    active_params: int
    shared_params: int
    prefill_flops_per_token: float
    decode_flops_per_token: float
    kv_bytes_per_token: int
    kv_bytes_per_sequence: int  # at prompt + output tokens
    weight_bytes: float  # all devices together
    weight_bytes_per_device: float
    kv_bytes_per_device: float  # the batches in flight at full length
    kv_budget_bytes: float  # all devices together
    max_sequences: float  # the KV budget over one full sequence (floor it for a batch)
    experts_hit_decode: float  # per MoE layer, one decode step of the batch
    decode_step_s: float
    decode_bound: str  # "memory" or "compute"
    decode_tokens_per_s: float
    prefill_s: float
    prefill_bound: str
    prefill_tokens_per_s: float
    dollars_per_1k_prompt: float
    dollars_per_1k_generated: float
    dollars_per_1k_tokens: float  # prompt and generated tokens together, as a request has them


def _roofline(cfg: ModelConfig, hw: Hardware, layout: Layout, tokens: float, flops: float,
              kv_bytes: float, bytes_per_value: int) -> tuple[float, str]:
    """Time for one step that runs `tokens` tokens through all layers,
    doing `flops` in all and reading `kv_bytes` of cache in all; per device, stages in series."""
    p = count_parameters(cfg)
    per_expert = 3 * cfg.d_model * cfg.d_expert
    hit = expected_experts_hit(cfg.n_experts, cfg.experts_per_token, tokens) if cfg.moe_layers else 0
    touched_experts = len(cfg.moe_layers) * hit * per_expert
    weight_bytes = ((p.total - p.experts) / layout.tensor
                    + touched_experts / (layout.tensor * layout.expert)) * bytes_per_value
    kv = kv_bytes * kv_share_per_device(cfg, layout) * layout.pipeline / layout.expert
    memory_s = (weight_bytes + kv) / hw.bytes_per_s
    compute_s = flops / (layout.tensor * layout.expert) / hw.flops
    return max(memory_s, compute_s), "memory" if memory_s >= compute_s else "compute"


def check_fits(hw: Hardware, layout: Layout, weights_device: float, max_sequences: float,
               batch: float) -> None:
    """Refuse, with the shortfall and the fix, a layout whose weights do not fit its devices
    and a batch whose KV cache does not fit beside them: a price for either would be for
    a machine that cannot run."""
    usable = hw.memory_bytes - hw.reserve_bytes
    if weights_device > usable:
        raise ValueError(f"the weights need {si(weights_device, 'B')} per device, but a {hw.name} "
                         f"has {si(usable, 'B')} for them (memory less its reserve): spread them "
                         f"over at least {math.ceil(weights_device / usable)}x more devices "
                         "(--tensor, --pipeline, --expert)")
    in_flight = layout.pipeline  # one batch per pipeline stage
    if batch * in_flight > max_sequences:
        largest = math.floor(max_sequences / in_flight)
        raise ValueError(f"batch {batch:g} ({batch * in_flight:g} sequences in flight over "
                         f"{layout.pipeline} pipeline stages) needs more KV cache than fits beside "
                         f"the weights ({max_sequences:.1f} full sequences); the largest batch that "
                         f"fits is {largest}: lower --batch or the context, or add devices")


def estimate(cfg: ModelConfig, hw: Hardware, layout: Layout | None = None, batch: float = 1,
             prompt_len: int = 512, output_len: int = 128, bytes_per_value: int = 2,
             kv_budget_bytes: float | None = None, check: bool = True) -> Estimate:
    """The whole arithmetic for `batch` sequences of `prompt_len` + `output_len` tokens.
    Decode is costed at the mean context of generation, P + O / 2. A layout or batch that
    does not fit the devices is refused (`check_fits`); `check=False` computes the formulas
    anyway (for teaching one term on a machine that could not run the rest)."""
    layout = layout or Layout()
    p = count_parameters(cfg)
    seq_len = prompt_len + output_len
    kv_token = kv_bytes_per_token(cfg, bytes_per_value)
    weights_device = ((p.total - p.experts) / (layout.tensor * layout.pipeline)
                      + p.experts / layout.devices) * bytes_per_value
    kv_seq_device = kv_token * seq_len * kv_share_per_device(cfg, layout)
    if kv_budget_bytes is None:  # what each device has left beside its weights
        kv_budget_bytes = max(hw.memory_bytes - hw.reserve_bytes - weights_device, 0.0) * layout.devices
    max_sequences = kv_budget_bytes / layout.devices / kv_seq_device * layout.expert
    if check:
        check_fits(hw, layout, weights_device, max_sequences, batch)
    context = prompt_len + output_len / 2
    decode_flops = decode_flops_per_token(cfg, context)
    step, step_bound = _roofline(cfg, hw, layout, batch, batch * decode_flops,
                                 batch * context * kv_token, bytes_per_value)
    prefill_flops = prefill_flops_per_token(cfg, prompt_len)
    prompt_tokens = batch * prompt_len
    prefill, prefill_bound = _roofline(cfg, hw, layout, prompt_tokens, prompt_tokens * prefill_flops,
                                       prompt_tokens * kv_token, bytes_per_value)
    dollars_per_s = layout.devices * hw.price_per_hour / 3600
    in_flight = layout.pipeline  # batches, one per pipeline stage
    per_1k_prompt = 1000 * prefill / (prompt_tokens * in_flight) * dollars_per_s
    per_1k_generated = 1000 * step / (batch * in_flight) * dollars_per_s
    return Estimate(
        total_params=p.total, active_params=p.active, shared_params=p.shared,
        prefill_flops_per_token=prefill_flops, decode_flops_per_token=decode_flops,
        kv_bytes_per_token=kv_token, kv_bytes_per_sequence=kv_token * seq_len,
        weight_bytes=p.total * bytes_per_value, weight_bytes_per_device=weights_device,
        kv_bytes_per_device=kv_seq_device * batch * in_flight / layout.expert,
        kv_budget_bytes=kv_budget_bytes, max_sequences=max_sequences,
        experts_hit_decode=(expected_experts_hit(cfg.n_experts, cfg.experts_per_token, batch)
                            if cfg.moe_layers else 0.0),
        decode_step_s=step, decode_bound=step_bound, decode_tokens_per_s=batch * in_flight / step,
        prefill_s=prefill, prefill_bound=prefill_bound,
        prefill_tokens_per_s=prompt_tokens * in_flight / prefill,
        dollars_per_1k_prompt=per_1k_prompt, dollars_per_1k_generated=per_1k_generated,
        dollars_per_1k_tokens=(prompt_len * per_1k_prompt + output_len * per_1k_generated) / seq_len)


def largest_batch(cfg: ModelConfig, hw: Hardware, layout: Layout, prompt_len: int, output_len: int,
                  bytes_per_value: int = 2) -> int:
    """The largest batch whose KV cache fits beside the weights (one batch per pipeline
    stage in flight); the weights themselves must fit (else check_fits says why)."""
    e = estimate(cfg, hw, layout, 1, prompt_len, output_len, bytes_per_value, check=False)
    check_fits(hw, layout, e.weight_bytes_per_device, e.max_sequences, 0)
    return math.floor(e.max_sequences / layout.pipeline)


def si(value: float, unit: str) -> str:
    """4.2e11 -> '420.0 G' + unit: decimal prefixes, so small and large models both read."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def format_estimate(e: Estimate, hw: Hardware, layout: Layout) -> str:
    return "\n".join([
        f"hardware        {layout.devices} x {hw.name}: {si(hw.flops, 'FLOP/s')}, {si(hw.bytes_per_s, 'B/s')}, "
        f"{si(hw.memory_bytes, 'B')}, ${hw.price_per_hour:.2f}/h each "
        f"(tensor {layout.tensor}, pipeline {layout.pipeline}, expert {layout.expert})",
        f"parameters      {si(e.total_params, '')} total, {si(e.active_params, '')} active, "
        f"{si(e.shared_params, '')} shared (not in experts; G = 1e9)",
        f"FLOPs/token     prefill {si(e.prefill_flops_per_token, 'FLOPs')}, "
        f"decode {si(e.decode_flops_per_token, 'FLOPs')} (attention included)",
        f"KV cache        {si(e.kv_bytes_per_token, 'B')}/token ({e.kv_bytes_per_token / 2**10:.1f} KiB), "
        f"{e.kv_bytes_per_sequence / 1e9:.3f} GB/sequence",
        f"weights         {si(e.weight_bytes, 'B')} in all, {si(e.weight_bytes_per_device, 'B')}/device",
        f"KV per device   {si(e.kv_bytes_per_device, 'B')} for the batches in flight at full length",
        f"largest batch   {math.floor(e.max_sequences)} sequences ({e.max_sequences:.1f}) "
        f"in {si(e.kv_budget_bytes, 'B')} of KV budget",
        f"experts hit     {e.experts_hit_decode:.2f} per MoE layer per decode step",
        f"decode          {e.decode_step_s * 1e3:.3f} ms/step ({e.decode_bound}-bound), "
        f"{e.decode_tokens_per_s:.1f} tokens/s",
        f"prefill         {e.prefill_s * 1e3:.3f} ms ({e.prefill_bound}-bound), "
        f"{e.prefill_tokens_per_s:.0f} tokens/s",
        f"cost            ${e.dollars_per_1k_prompt:.3g} per 1K prompt tokens, "
        f"${e.dollars_per_1k_generated:.3g} per 1K generated tokens, "
        f"${e.dollars_per_1k_tokens:.3g} per 1K tokens of a request (prompt and output)",
    ])


# ---------------------------------------------------------------------------------------
# Measured runs against the roofline
# ---------------------------------------------------------------------------------------

def roofline_output_tokens_per_s(cfg: ModelConfig, hw: Hardware, n_requests: int, prompt_len: float,
                                 output_len: float, mean_batch: float, bytes_per_value: int) -> float:
    """Best output tokens/s for a run: prefill every prompt (mean_batch at a time), then
    n x O / mean_batch decode steps of mean_batch sequences at the mean context."""
    batch = max(mean_batch, 1.0)
    prompt = max(round(prompt_len), 1)
    e = estimate(cfg, hw, Layout(), batch=batch, prompt_len=prompt, output_len=round(output_len),
                 bytes_per_value=bytes_per_value, kv_budget_bytes=float("inf"))
    total_s = n_requests / batch * e.prefill_s + n_requests * output_len / batch * e.decode_step_s
    return n_requests * output_len / total_s


def roofline_shares(report: dict, hw: Hardware | None = None) -> list[dict]:
    """For each run of a `generate.py bench` JSON: measured and roofline output tokens/s."""
    for key in ("model", "device", "dtype", "runs"):
        if key not in report:
            raise ValueError(f"benchmark JSON has no {key!r}; expected the output of "
                             "`python generate.py bench` (keys model, device, dtype, runs)")
    cfg = from_dict(ModelConfig, report["model"], "model")
    if report["dtype"] not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {report['dtype']!r}; known: {', '.join(DTYPE_BYTES)}")
    hw = hw or preset_for_device(report["device"]) or measure_hardware("cpu")
    rows = []
    for run in report["runs"]:
        roof = roofline_output_tokens_per_s(cfg, hw, run["n_requests"], run["mean_prompt_len"],
                                            run["mean_output_len"], run["mean_batch"],
                                            DTYPE_BYTES[report["dtype"]])
        rows.append(dict(mode=run["mode"], mean_batch=run["mean_batch"],
                         measured=run["output_tokens_per_s"], roofline=roof,
                         share=run["output_tokens_per_s"] / roof))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moe.cost.estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="configs/NAME.toml (need not be buildable)")
    parser.add_argument("--set", action="append", default=[], help="override, e.g. model.n_kv_heads=64")
    parser.add_argument("--hardware", help=f"{', '.join(PRESETS)} or measure (default A100-80GB; "
                        "with --measured, the preset matching the file's device)")
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--pipeline", type=int, default=1, help="pipeline-parallel degree")
    parser.add_argument("--expert", type=int, default=1, help="expert-parallel degree")
    parser.add_argument("--batch", default="1", help="sequences decoded together, or max: the "
                        "largest batch whose KV cache fits")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    parser.add_argument("--output", type=int, default=128, help="generated tokens per sequence")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES), help="weights and KV")
    parser.add_argument("--flops-efficiency", type=float, help="share of peak FLOP/s reached")
    parser.add_argument("--bandwidth-efficiency", type=float, help="share of peak bandwidth reached")
    parser.add_argument("--price", type=float, help="$ per device-hour")
    parser.add_argument("--kv-budget-gb", type=float, help="KV memory in all devices (default: what is left)")
    parser.add_argument("--measured", metavar="FILE", help="a `generate.py bench` JSON to compare")
    args = parser.parse_args(argv)
    if args.measured:
        hw = hardware_for(args.hardware) if args.hardware else None
        report = json.loads(Path(args.measured).read_text())
        hw = hw or preset_for_device(report.get("device", "")) or measure_hardware("cpu")
        print(f"roofline on {hw.name}: {si(hw.flops, 'FLOP/s')}, {si(hw.bytes_per_s, 'B/s')}")
        rows = roofline_shares(report, hw)
        for row in rows:
            print(f"{row['mode']:>10}  batch {row['mean_batch']:6.2f}  measured {row['measured']:10.1f} tok/s  "
                  f"roofline {row['roofline']:12.1f} tok/s  share {100 * row['share']:6.2f}%")
        return
    if args.config is None:
        parser.error("give a config (e.g. configs/gpt4.toml) or --measured FILE")
    hw = hardware_for(args.hardware or "A100-80GB")
    changes = {k: v for k, v in dict(flops_efficiency=args.flops_efficiency,
                                     bandwidth_efficiency=args.bandwidth_efficiency,
                                     price_per_hour=args.price).items() if v is not None}
    hw = replace(hw, **changes)
    layout = Layout(args.tensor, args.pipeline, args.expert)
    cfg = load_model_config(args.config, args.set)
    budget = None if args.kv_budget_gb is None else args.kv_budget_gb * 1e9
    if args.batch == "max":
        if budget is not None:
            raise ValueError("--batch max takes the KV budget from the devices' memory; drop --kv-budget-gb")
        batch = largest_batch(cfg, hw, layout, args.prompt, args.output, DTYPE_BYTES[args.dtype])
    elif args.batch.isdigit() and int(args.batch) >= 1:
        batch = int(args.batch)
    else:
        raise ValueError(f"--batch {args.batch!r}: give a number of sequences (1 or more) or max")
    e = estimate(cfg, hw, layout, batch, args.prompt, args.output, DTYPE_BYTES[args.dtype], budget)
    print(f"batch           {batch} sequences per pipeline stage, {batch * layout.pipeline} in flight")
    print(format_estimate(e, hw, layout))


if __name__ == "__main__":
    from moe.cli import run_main
    run_main(main, sys.argv[1:])
