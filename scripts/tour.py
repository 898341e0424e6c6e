"""The tour: train, sample, serve, speculate and price, in one command and one page.

Why: each piece of this project has its own command and its own figure, but a newcomer
wants the story end to end: a sparse model trained on this machine, how well it learned,
what its experts do, what batching and speculation buy when serving it, and what the same
design costs at GPT-4's scale. This runs the project's own commands one after another (each
printed before it runs, so any step can be rerun alone) and writes RUN/report.md with the
pictures beside it:

    .venv/bin/python scripts/tour.py                  # about 13 minutes on 2 CPU cores
    .venv/bin/python scripts/tour.py --quick          # a toy-sized pass in about a minute (CI)

Steps: train.py (the tiny MoE target, configs/tiny.toml), train.py again (the draft,
configs/draft.toml, distilled from the target), generate.py bench (continuous against
static batching), benchmarks/bench_speculative.py (draft-model and prompt-lookup
speculation against plain decoding) and moe.cost.estimate (the trained model's measured
runs against its roofline; GPT-4 on the reported 128-GPU cluster). A step that fails
stops the tour with its command and output, so the report never quotes a missing figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe.config import load_model_config  # noqa: E402
from moe.cost.estimate import Layout, estimate, largest_batch  # noqa: E402
from moe.cost.hardware import PRESETS  # noqa: E402
from moe.io.checkpoint import load_config, resolve_checkpoint  # noqa: E402
from moe.model.transformer import count_parameters  # noqa: E402
from moe.training.run_folder import metrics_rows, newest  # noqa: E402

# toy sizes for --quick: the same steps, each a few seconds
QUICK_MODEL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_expert=32",
               "model.n_experts=4", "model.vocab_size=512"]
QUICK_TRAIN = ["train.max_steps=30", "train.batch_size=4", "train.seq_len=64", "train.eval_every=30",
               "train.eval_batches=2", "train.checkpoint_every=30", "train.warmup_steps=5",
               "train.unlikelihood_steps=0"]


class Failed(RuntimeError):
    """A step of the tour did not finish; the message holds its command and output."""


def run(command: list[str], log: Path) -> float:
    """Run one step from the repository root, its output to `log`; seconds it took."""
    print(f"$ {shlex.join(command)}", flush=True)
    began = time.perf_counter()
    with log.open("w") as out:  # "python" is this interpreter
        done = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise Failed(f"{shlex.join(command)} exited with {done.returncode}; its output is in {log}:\n"
                     + log.read_text()[-2000:])
    return time.perf_counter() - began


def commands(out: Path, quick: bool, threads: int) -> dict[str, list[str]]:
    python = "python"  # run() starts this interpreter; the report shows the command as a reader types it
    model = [f"--set={s}" for s in QUICK_MODEL] if quick else []
    train = [f"--set={s}" for s in QUICK_TRAIN] if quick else []
    draft_model = ["--set=model.vocab_size=512", "--set=model.d_model=32"] if quick else []
    bench = ["--n-requests", "16", "--slots", "4", "--repeats", "1"] if quick else ["--n-requests", "64",
                                                                                   "--slots", "8", "--repeats", "2"]
    speculative = ["--batches", "1", "--grid-batches"] + (  # batch 1, no batch grid
        ["--n-prompts", "2", "--prompt-len", "24", "--new-tokens", "16", "--repeats", "1", "--gammas", "2"]
        if quick else ["--n-prompts", "4", "--repeats", "2", "--gammas", "2", "4"])
    return {
        "target": [python, "train.py", "--config", "configs/tiny.toml", "--out", str(out / "target"),
                   "--overwrite", "--quiet", *model, *train],
        "draft": [python, "train.py", "--config", "configs/draft.toml", "--out", str(out / "draft"),
                  "--overwrite", "--quiet", f"--set=train.distill_from={json.dumps(str(out / 'target'))}",
                  *draft_model, *train, *([] if quick else ["--set=train.max_steps=200"])],
        "serving": [python, "generate.py", "bench", "--ckpt", str(out / "target"), "--threads", str(threads),
                    "--out", str(out / "serving.json"), *bench],
        "speculative": [python, "benchmarks/bench_speculative.py", "--target", str(out / "target"),
                        "--draft", str(out / "draft"), "--out", str(out / "speculative.json"), *speculative],
        "roofline": [python, "-m", "moe.cost.estimate", "--measured", str(out / "serving.json")],
    }


def report(out: Path, steps: dict[str, list[str]], seconds: dict[str, float], roofline_text: str) -> str:
    """report.md: every figure read from the files the steps wrote."""
    target_setup = json.loads((out / "target" / "setup.json").read_text())
    counts = count_parameters(load_config(resolve_checkpoint(out / "target")))
    target_rows = metrics_rows(out / "target")
    target, draft = newest(target_rows, "eval"), newest(metrics_rows(out / "draft"), "eval")
    serving = json.loads((out / "serving.json").read_text())
    speculative = json.loads((out / "speculative.json").read_text())
    layers = newest(target_rows, "routing", [])
    gpt4 = load_model_config(ROOT / "configs/gpt4.toml")
    cluster = Layout(tensor=8, pipeline=16)
    lines = [
        "# The tour", "",
        f"Made by `scripts/tour.py` in {sum(seconds.values()) / 60:.1f} minutes on this machine "
        f"({', '.join(f'{name} {s:.0f} s' for name, s in seconds.items())}). Every figure below "
        "comes from a file the tour wrote under this folder; each step's command is given, "
        "so any of them can be rerun alone.", "",
        "## 1. What was trained", "",
        f"A sparse transformer of {counts.total / 1e6:.2f}M parameters, {counts.active / 1e6:.2f}M of them "
        f"active per token: {target_setup['model']['n_layers']} layers, each with "
        f"{target_setup['model']['n_experts']} SwiGLU experts of which a router picks "
        f"{target_setup['model']['experts_per_token']} per token (GPT-4's reported top-2 of 16), multi-query "
        f"attention, rotary positions; a byte-level BPE of {target_setup['model']['vocab_size']} tokens "
        "learned on the training files. Data: the Python standard library's own source, split by file.", "",
        f"    {shlex.join(steps['target'])}", "",
        "## 2. How well it learned", "",
        f"Validation: **{target['val_bpb']:.3f} bits per byte** "
        + (f"± {target['val_bpb_ci95']:.3f} (95%, from {target['val_share']:.1%} of the held-out files)"
           if "val_bpb_ci95" in target else "over every token of the held-out files")
        + "; on the same bytes "
        + ", ".join(f"{name} gets {bpb:.3f}" for name, bpb in target.get("compressors", {}).items())
        + ". Below a compressor's figure, the model predicts the code better than the repetition "
        "a dictionary coder finds.", "",
        "Greedy samples (first 300 bytes; the share of distinct 4-byte windows is about 0.6 for "
        "the validation files' own text and a few percent for a loop):", "",
    ]
    for sample in newest(target_rows, "samples", []):
        lines += [f"- `{sample['prompt']!r}` ({sample['distinct_4grams']:.0%} distinct):", "",
                  "  ```python", *("  " + line for line in (sample["prompt"] + sample["text"]).splitlines()),
                  "  ```", ""]
    lines += ["![loss](target/loss.png)", "",
              "## 3. How the experts are used", ""]
    if layers:
        n_experts = target_setup["model"]["n_experts"]
        lines += ["Per MoE layer at the last logged step: the busiest expert's load over an even "
                  "share, Jain's fairness (1 = even) and the router's entropy (ln "
                  f"{n_experts} = {math.log(n_experts):.2f} is uniform):", "",
                  "| layer | busiest / even | Jain | entropy (nats) | dead experts |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {i} | {layer['max_over_ideal']:.2f} | {layer['jain']:.3f} | {layer['entropy']:.2f} | "
                  f"{layer['dead']} |" for i, layer in enumerate(layers)]
        lines += ["", "![expert load](target/expert_load.png)", "",
                  "Which experts each kind of input goes to is measured on the synthetic task mix "
                  "(`train.py --config configs/tasks.toml`: per-layer task × expert tables and the "
                  "information the expert choice carries about the task, beyond the token itself; "
                  "README, Train).", ""]
    lines += ["## 4. Serving it: continuous against static batching", "",
              f"    {shlex.join(steps['serving'])}", "",
              "| slots | mode | repeat | output tokens/s | TTFT p50 (s) | mean running batch |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in serving["runs"]:
        lines.append(f"| {r['slots']} | {r['mode']} | {r['repeat'] + 1} | {r['output_tokens_per_s']:.0f} | "
                     f"{r['ttft_s']['p50']:.3f} | {r['mean_batch']:.1f} |")
    for c in serving["comparisons"]:
        lines += ["", f"At {c['slots']} slots continuous batching gives **{c['throughput_ratio']:.2f}x** the "
                      f"output tokens/s of static batching and {c['e2e_p50_ratio']:.2f}x lower median latency."]
    lines += ["", "Against the roofline of this machine (its measured copy bandwidth and matmul rate; "
              "a toy model's step is mostly overhead, so the share is small):", "",
              "```", roofline_text.strip(), "```", "",
              "## 5. Speculative decoding", "",
              f"    {shlex.join(steps['draft'])}",
              f"    {shlex.join(steps['speculative'])}", "",
              f"The draft ({draft['val_bpb']:.3f} bits per byte) proposes γ tokens, the target checks them "
              "in one forward; greedy and seeded sampled output is identical to plain decoding (checked "
              "on every prompt).", "",
              "| mode | decoding | target forwards per token | tokens/s | speedup | predicted |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in speculative["runs"]:
        lines.append(f"| {r['mode']} | {'T = 1' if r['sampled'] else 'greedy'} | "
                     f"{r['target_forwards_per_token']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r.get('speedup', 1.0):.2f}x | "
                     + (f"{r['predicted']:.2f}x" if "predicted" in r else "") + " |")
    rows = []
    for hardware, generated in (("A100-40GB", 819), ("H100", 1475)):
        hw = PRESETS[hardware]
        batch = largest_batch(gpt4, hw, cluster, 8192 - generated, generated)
        e = estimate(gpt4, hw, cluster, batch, 8192 - generated, generated)
        rows.append(f"| 128 × {hardware} | {batch} | ${e.dollars_per_1k_prompt:.5f} | "
                    f"${e.dollars_per_1k_generated:.4f} | ${e.dollars_per_1k_tokens:.4f} ({generated} of 8,192 "
                    "generated) |")
    lines += ["", "## 6. The same design at GPT-4's scale", "",
              "`configs/gpt4.toml` is the reported shape (1.8T parameters, 280B active, 120 layers, top-2 "
              "of 16, MQA). On the reported cluster (8-way tensor × 16-way pipeline), at the largest "
              "batch whose 8k-token KV caches fit:", "",
              "| cluster | batch per stage | per 1K prompt | per 1K generated | per 1K tokens of a request |",
              "| --- | --- | --- | --- | --- |", *rows, "",
              "The reporting's $0.0049 (A100) and $0.0021 (H100) per 1K tokens; why these assumptions "
              "give them, and the 3x-Davinci comparison: docs/inference-arithmetic.md.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/tour", help="folder for the runs, results and report.md")
    parser.add_argument("--quick", action="store_true", help="toy sizes: the whole tour in about a minute")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the benchmarks")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    os.chdir(ROOT)  # every step runs from the repository root
    if out.is_relative_to(ROOT):
        out = out.relative_to(ROOT)  # the report names runs/tour/..., not this machine's path
    (out / "logs").mkdir(parents=True, exist_ok=True)
    steps = commands(out, args.quick, args.threads)
    seconds = {}
    try:
        for name in ("target", "draft", "serving", "speculative", "roofline"):
            seconds[name] = run(steps[name], out / "logs" / f"{name}.log")
    except Failed as error:
        sys.exit(f"error: {error}")
    text = report(out, steps, seconds, (out / "logs" / "roofline.log").read_text())
    (out / "report.md").write_text(text)
    print(f"wrote {out / 'report.md'} ({sum(seconds.values()) / 60:.1f} minutes)")


if __name__ == "__main__":
    main()
