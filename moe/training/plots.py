"""Pictures of a run, drawn from its metrics.jsonl: loss curves, where tokens go.

Why from the metrics file and not from the live run: a picture of a finished, resumed or
running job is then one call away (`python -m moe.training.plots runs/tiny`), and the training loop
keeps no plotting state. matplotlib is an optional extra (`pip install -e ".[plots]"`);
without it this prints one line and draws nothing.

Files: loss.png (train and validation loss per step), expert_load.png (MoE layers x
experts, share of routed slots at the last logged step), task_routing.png (tasks x
experts, synthetic task mix only: which experts each task's tokens go to).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moe.training.data import TASKS


def write_plots(run: str | Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install -e \".[plots]\")")
        return []
    run = Path(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
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
        counts = with_tasks[-1]["eval"]["task_routing"]  # [tasks, E]
        shares = [[c / max(sum(row), 1) for c in row] for row in counts]
        written.append(_heatmap(plt, shares, "expert", "task", "share of each task's slots",
                                run / "task_routing.png", ylabels=TASKS))
    return written


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
