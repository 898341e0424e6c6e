"""The run folder: what a training run keeps on disk besides its checkpoints, and the rules
that keep it trustworthy across kills, resumes and mistakes.

    RUN/setup.json     the model, train and data settings the run was started with
    RUN/metrics.jsonl  one JSON line per log step and per evaluation
    RUN/ckpt/          checkpoints (moe/training/loop.py)

Why rules: `--resume` must continue the run that was started, not whatever today's config
and flags say, so the setup is read back from setup.json and an override that would change
it is refused by name (a few that only change logging or checkpoint cadence are applied
with a warning). A fresh run into a folder that holds one is refused unless the user says
--overwrite, so a typo never truncates a week of metrics. Every rewrite goes through a
temporary file and a rename, and a line torn by a power cut is dropped on resume.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from moe.config import SECTIONS, ConfigError, from_dict, load_setup, parse_override
from moe.io.files import write_text_atomically

SETUP_FILE = "setup.json"
METRICS_FILE = "metrics.jsonl"
# Settings a resumed run may change: they decide when to log, evaluate and save, not what
# the run computes.
HARMLESS = {("train", key) for key in ("log_every", "eval_every", "eval_batches",
                                        "checkpoint_every", "keep_checkpoints", "compile")}


def holds_a_run(run: Path) -> bool:
    return any((run / name).exists() for name in (SETUP_FILE, METRICS_FILE, "ckpt"))


def setup_as_dict(setup: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(section) for name, section in setup.items()}


def refuse_used(run: Path, overwrite: bool) -> None:
    """A fresh run goes only into a folder that holds none, unless `overwrite`."""
    if holds_a_run(run) and not overwrite:
        raise ConfigError(f"{run} already holds a run ({SETUP_FILE}, {METRICS_FILE} or ckpt/); "
                          "continue it with --resume, replace it with --overwrite, or pick "
                          "another --out")


def start_fresh(run: Path, setup: dict[str, Any], overwrite: bool) -> None:
    """Make `run` hold a new run: refused if it holds one, unless `overwrite` (then the old
    setup, metrics, checkpoints and plots go)."""
    refuse_used(run, overwrite)
    if holds_a_run(run):
        shutil.rmtree(run / "ckpt", ignore_errors=True)
        for path in [run / SETUP_FILE, run / METRICS_FILE, *run.glob("*.png")]:
            path.unlink(missing_ok=True)
    run.mkdir(parents=True, exist_ok=True)
    write_text_atomically(run / SETUP_FILE, json.dumps(setup_as_dict(setup), indent=2) + "\n")
    write_text_atomically(run / METRICS_FILE, "")


def resumed_setup(run: Path, config: str | None, overrides: list[str]) -> dict[str, Any]:
    """The setup `run` was started with, and any harmless overrides. A `config` file or an
    override that would change anything else is refused, naming the key."""
    file = run / SETUP_FILE
    if not file.is_file():
        raise ConfigError(f"{run} holds no run to resume ({file} is missing); start without "
                          "--resume, or give the run folder with --out")
    try:
        saved = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(f"{file} is not valid JSON ({error}); it was not written by train.py") from None
    setup = {name: from_dict(cls, saved.get(name, {}), name) for name, cls in SECTIONS.items()}
    if config is not None:  # what the command line asks for, whole
        requested, source = load_setup(config, overrides), f"--config {config} with its --set"
    else:  # the run's own setup with the overrides on top
        requested, source = dict(setup), "--set"
        for text in overrides:
            name, key, value = parse_override(text)
            if name not in SECTIONS:
                raise ConfigError(f"[{name}] is not a known section; known: {', '.join(SECTIONS)}")
            requested[name] = from_dict(SECTIONS[name], {**dataclasses.asdict(requested[name]),
                                                         key: value}, name)
    for name in SECTIONS:
        for key, new in dataclasses.asdict(requested[name]).items():
            old = getattr(setup[name], key)
            if new == old:
                continue
            if (name, key) not in HARMLESS:
                raise ConfigError(f"{source} gives {name}.{key} = {new!r}, but the run in {run} was "
                                  f"started with {old!r} ({file}); a resumed run continues the run "
                                  "that was started: drop that setting (or --config), or start a "
                                  "new run with another --out")
            print(f"warning: {name}.{key} changed from {old!r} to {new!r} for the rest of the run",
                  file=sys.stderr)
            setup[name] = dataclasses.replace(setup[name], **{key: new})
    return setup


def metrics_rows(run: Path) -> list[dict]:
    """RUN/metrics.jsonl as rows, oldest first (plots, scripts/tour.py, scripts/record_run.py)."""
    return [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines() if line]


def newest(rows: list[dict], key: str, default: Any = None) -> Any:
    """The value of `key` in the newest row that has it (non-empty), else `default`."""
    return next((row[key] for row in reversed(rows) if row.get(key)), default)


def metrics_up_to(run: Path, step: int) -> str:
    """RUN/metrics.jsonl's lines of steps up to `step` (what the resumed run keeps); lines that
    do not parse (torn by a kill or a power cut) are dropped with a warning."""
    file = run / METRICS_FILE
    if not file.exists():
        return ""
    kept, torn = [], 0
    for line in file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if row["step"] <= step:
            kept.append(line)
    if torn:
        print(f"warning: dropped {torn} unreadable line(s) of {file}", file=sys.stderr)
    return "".join(line + "\n" for line in kept)
