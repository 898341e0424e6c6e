"""Pictures of a run, drawn from its metrics.jsonl: loss curves, where tokens go.

Why from the metrics file and not from the live run: a picture of a finished, resumed or
running job is then one call away (`python -m moe.training.plots runs/tiny`), and the training loop
keeps no plotting state. matplotlib is an optional extra (`pip install -e ".[plots]"`);
without it this prints one line and draws nothing.

Files: loss.png (train loss raw and smoothed with the validation loss; validation bits
per byte beside gzip -9 and xz -9 on the same bytes; the share of repeats in the model's
own greedy continuations during unlikelihood steps), expert_load.png (per MoE layer,
experts x logged steps: each expert's share of routed slots over the run), task_routing.png (synthetic task
mix only: per MoE layer, tasks x experts, which experts each task's tokens go to, titled
with I(task; expert) and I(task; expert | token) in bits; moe.training.loop.task_report).
"""

from __future__ import annotations

import sys
from pathlib import Path

from moe.training.data import TASKS
from moe.training.run_folder import metrics_rows


def write_plots(run: str | Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e \".[plots]\")")
        return []
    run = Path(run)
    rows = metrics_rows(run)
    train = [r for r in rows if "ce" in r]
    evals = [r for r in rows if "eval" in r]
    written = []

    written.append(_loss(plt, run, train, evals))
    routed = [r for r in train if r.get("routing")]
    if routed:
        written.append(_expert_load(plt, routed, run / "expert_load.png"))
    with_tasks = [r for r in evals if "task_routing" in r["eval"]]
    if with_tasks:
        written.append(_task_routing(plt, with_tasks[-1], run / "task_routing.png"))
    return written


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** (i + 1)))
    return out


def _loss(plt, run: Path, train: list[dict], evals: list[dict]) -> Path:
    """Training loss (raw and smoothed) with the validation loss, in nats per token; the
    validation bits per byte beside the compressors' figures for the same bytes; and, when
    the run had unlikelihood steps, the share of repeats in its own greedy continuations."""
    repeats = [r for r in train if "repeat_share" in r]
    fig, axes = plt.subplots(1, 3 if repeats else 2, figsize=(13 if repeats else 10, 4), squeeze=False)
    ax = axes[0, 0]
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["ce"] for r in train], color="C0", alpha=0.3, linewidth=0.8, label="train")
    ax.plot(steps, smoothed([r["ce"] for r in train]), color="C0", label="train, smoothed")
    ax.plot([r["step"] for r in evals], [r["eval"]["val_loss"] for r in evals], "o-", color="C1",
            label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", title=run.name)
    ax.legend()
    ax = axes[0, 1]
    ax.plot([r["step"] for r in evals], [r["eval"]["val_bpb"] for r in evals], "o-", color="C1", label="model")
    compressors = (evals[-1]["eval"].get("compressors") or {}) if evals else {}
    for i, (name, bpb) in enumerate(sorted(compressors.items())):
        ax.axhline(bpb, linestyle="--", color=f"C{i + 2}", label=name)
    ax.set(xlabel="step", ylabel="validation bits per byte", title="held-out data")
    ax.legend()
    if repeats:
        ax = axes[0, 2]
        ax.plot([r["step"] for r in repeats], [r["repeat_share"] for r in repeats], "o-", color="C4")
        ax.set(xlabel="step", ylabel="share of decoded tokens in a repeated n-gram", ylim=(0, 1),
               title="unlikelihood steps: own greedy repeats")
    return _save(fig, run / "loss.png")


def _expert_load(plt, routed: list[dict], path: Path) -> Path:
    """Per MoE layer, each expert's share of the routed slots at every logged step: load
    over the whole run, where collapse or a dead expert shows as a band."""
    n_layers = len(routed[0]["routing"])
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 0.6 + 1.6 * n_layers), squeeze=False)
    first, last = routed[0]["step"], routed[-1]["step"]
    if first == last:  # one logged step: a column of width one
        first, last = first - 0.5, last + 0.5
    for layer, ax in enumerate(axes[:, 0]):
        load = list(zip(*(r["routing"][layer]["load"] for r in routed)))  # [E, steps]
        image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest",
                          extent=(first, last, len(load) - 0.5, -0.5))
        fig.colorbar(image, ax=ax)
        ax.set(ylabel=f"layer {layer}\nexpert")
    axes[0, 0].set_title("share of routed slots per expert, over the run")
    axes[-1, 0].set_xlabel("step")
    return _save(fig, path)


def _task_routing(plt, row: dict, path: Path) -> Path:
    """One heatmap per MoE layer: each task's share of its routed slots per expert."""
    evaluation = row["eval"]
    layers = evaluation["task_routing"]  # [L, tasks, E]
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 0.3 + 1.9 * len(layers)), squeeze=False)
    for layer, (ax, counts) in enumerate(zip(axes[:, 0], layers)):
        shares = [[c / max(sum(task_row), 1) for c in task_row] for task_row in counts]
        image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
        fig.colorbar(image, ax=ax)
        ax.set_yticks(range(len(TASKS)), TASKS)
        ax.set_title(f"MoE layer {layer}: I(task; expert) {evaluation['task_expert_mi_bits'][layer]:.2f} bits, "
                     f"given the token {evaluation['task_expert_mi_given_token_bits'][layer]:.2f} "
                     f"(shuffled {evaluation['task_expert_mi_given_token_shuffled_bits'][layer]:.2f})",
                     fontsize=9)
    axes[-1, 0].set_xlabel(f"expert (share of each task's routed slots, step {row['step']})")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    return path


if __name__ == "__main__":
    for written in write_plots(sys.argv[1]):
        print(written)
