"""Pictures of a run, drawn from its metrics.jsonl: loss curves, where tokens go.

Why from the metrics file and not from the live run: a picture of a finished, resumed or
running job is then one call away (`python -m moe.training.plots runs/tiny`), and the training loop
keeps no plotting state. matplotlib is an optional extra (`pip install -e ".[plots]"`);
without it this prints one line and draws nothing.

Files: loss.png (train and validation loss per step), expert_load.png (MoE layers x
experts, share of routed slots at the last logged step), task_routing.png (synthetic task
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

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train")
    ax.plot([r["step"] for r in evals], [r["eval"]["val_loss"] for r in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title=run.name)
    ax.legend()
    written.append(_save(fig, run / "loss.png"))

    routed = [r for r in train if r.get("routing")]
    if routed:
        load = [layer["load"] for layer in routed[-1]["routing"]]  # [layers, E]
        written.append(_heatmap(plt, load, "expert", "MoE layer", f"share of routed slots, step "
                                f"{routed[-1]['step']}", run / "expert_load.png"))
    with_tasks = [r for r in evals if "task_routing" in r["eval"]]
    if with_tasks:
        written.append(_task_routing(plt, with_tasks[-1], run / "task_routing.png"))
    return written


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


def _heatmap(plt, values, xlabel, ylabel, title, path, ylabels=None) -> Path:
    fig, ax = plt.subplots(figsize=(8, 1 + 0.5 * len(values)))
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if ylabels:
        ax.set_yticks(range(len(ylabels)), ylabels)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    fig.clf()
    return path


if __name__ == "__main__":
    for written in write_plots(sys.argv[1]):
        print(written)
