"""Record a finished training run's figures as JSON under benchmarks/results/, for the README.

Why: the README quotes a run's figures (bits per byte beside the compressors, exact match
per task, routing information, greedy samples), and a figure must come from a file that
says which command made it. This reads RUN/setup.json and RUN/metrics.jsonl, written by
train.py, and keeps what a reader needs to check the claim.

    .venv/bin/python scripts/record_run.py runs/tiny --command "python train.py" \
        --wall-s 505 --out benchmarks/results/train_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe.training.run_folder import metrics_rows, newest  # noqa: E402


def validation_variety(setup: dict, windows: int = 2000, size: int = 300) -> dict:
    """What the samples' distinct-4-gram share is to be read against: the same share in
    random `size`-byte windows of the run's own validation text (mean, 5th percentile)."""
    import numpy as np

    from moe.config import SECTIONS, from_dict
    from moe.training.data import is_validation_file, source_files
    from train import distinct_4grams

    data = from_dict(SECTIONS["data"], setup["data"], "data")
    root, files = source_files(data.source)
    text = b"".join(f.read_bytes() for f in files if is_validation_file(str(f.relative_to(root)), data.val_fraction))
    starts = np.random.default_rng(0).integers(0, len(text) - size, windows)
    shares = [distinct_4grams(text[s:s + size]) for s in starts]
    return {"windows": windows, "bytes": size, "mean": float(np.mean(shares)),
            "p5": float(np.percentile(shares, 5))}


def record(run: Path, command: str, wall_s: float | None) -> dict:
    rows = metrics_rows(run)
    setup = json.loads((run / "setup.json").read_text())
    train = [r for r in rows if "ce" in r]
    evals = [r["eval"] for r in rows if "eval" in r]
    samples = newest(rows, "samples", [])
    final = evals[-1] if evals else {}
    keep = [k for k in final if k != "task_routing"]
    return {
        "command": command,
        "run": str(run),
        "device": "cpu",
        "wall_s": wall_s,
        "setup": setup,
        "train_tokens_per_s": train[-1]["tokens_per_s"] if train else None,
        "train_elapsed_s": train[-1]["elapsed_s"] if train else None,
        "evals": [{k: e[k] for k in keep if k in e} for e in evals],
        "unlikelihood_steps": [{k: r[k] for k in ("step", "unlikelihood", "repeat_share")}
                               for r in train if "repeat_share" in r],
        "final": final,
        "samples": samples,
        "validation_distinct_4grams": (validation_variety(setup) if samples and setup["data"].get("source") != "tasks"
                                       else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--command", required=True, help="the command that made the run, as typed")
    parser.add_argument("--wall-s", type=float, default=None, help="its whole wall-clock time (e.g. from /usr/bin/time)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = record(Path(args.run), args.command, args.wall_s)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
