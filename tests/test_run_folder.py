"""A run folder stays trustworthy: checkpoints rotate by step number and never lose the one
`latest` names, interrupted saves leave nothing behind, non-finite weights are never saved,
a broken `latest` falls back to the newest good checkpoint, and a resumed run keeps the
setup it was started with (moe/training/loop.py, moe/training/run_folder.py)."""

import json
import os

import pytest
import torch

from moe.config import ConfigError, TrainConfig, load_setup
from moe.io.files import CheckpointError
from moe.model.transformer import Transformer
from moe.training.loop import (checkpoints, latest_name, make_optimizer, read_checkpoint,
                               save_checkpoint, sweep_leftovers, train_step)
from moe.training.run_folder import metrics_up_to, resumed_setup, start_fresh
from tests.conftest import tiny_config


def saved_run(tmp_path, steps, keep=10):
    model = Transformer(tiny_config())
    optimizer = make_optimizer(model, TrainConfig())
    for step in steps:
        save_checkpoint(tmp_path, model, optimizer, step, keep=keep)
    return model, optimizer


def test_rotation_goes_by_step_number_past_step_999999(tmp_path):
    saved_run(tmp_path, [999_998, 999_999, 1_000_000, 1_000_001], keep=2)
    assert [s for s, _ in checkpoints(tmp_path)] == [1_000_000, 1_000_001]
    assert latest_name(tmp_path) == "step_1000001"


def test_the_checkpoint_latest_names_is_never_rotated_away(tmp_path):
    model, optimizer = saved_run(tmp_path, [10, 20], keep=2)
    save_checkpoint(tmp_path, model, optimizer, 15, keep=1)  # resumed from an older one
    assert latest_name(tmp_path) == "step_000015"
    assert [s for s, _ in checkpoints(tmp_path)] == [15, 20]


def test_leftovers_of_interrupted_saves_are_swept(tmp_path):
    saved_run(tmp_path, [1])
    ckpt = tmp_path / "ckpt"
    (ckpt / ".step_000002.tmp-abc").mkdir()
    (ckpt / ".step_000002.tmp-abc" / "model.safetensors").write_bytes(b"partial")
    (ckpt / ".step_000001.old-7").mkdir()
    (ckpt / ".latest.tmp-9").write_text("step_000002\n")
    assert len(sweep_leftovers(tmp_path)) == 3
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_000001"]


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model, optimizer = saved_run(tmp_path, [1])
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or infinite.*step_000001"):
        save_checkpoint(tmp_path, model, optimizer, 2, keep=1)
    assert latest_name(tmp_path) == "step_000001" and [s for s, _ in checkpoints(tmp_path)] == [1]


def test_a_broken_latest_falls_back_to_the_newest_good_checkpoint(tmp_path, capsys):
    saved_run(tmp_path, [1, 2, 3])
    weights = tmp_path / "ckpt" / "step_000003" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    state = read_checkpoint(tmp_path, Transformer(tiny_config()), torch.device("cpu"))
    assert state["step"] == 2
    assert "resuming from step_000002" in capsys.readouterr().err


def test_resume_from_picks_the_checkpoint_asked_for(tmp_path):
    saved_run(tmp_path, [1, 2, 3])
    model = Transformer(tiny_config())
    assert read_checkpoint(tmp_path, model, torch.device("cpu"), step=1)["step"] == 1
    with pytest.raises(CheckpointError, match="no checkpoint of step 7 .*1, 2, 3"):
        read_checkpoint(tmp_path, model, torch.device("cpu"), step=7)


def test_a_step_with_a_non_finite_loss_changes_nothing():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("inf")
    before = {name: p.clone() for name, p in model.named_parameters()}
    optimizer = make_optimizer(model, TrainConfig())
    tokens = torch.randint(0, 256, (2, 9))
    stats = train_step(model, optimizer, [(tokens[:, :-1], tokens[:, 1:])], TrainConfig(), 0,
                       torch.device("cpu"))
    assert stats["skipped"] and not optimizer.state
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], equal_nan=True, msg=name)


def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwritten(tmp_path):
    setup = load_setup("configs/tiny.toml")
    start_fresh(tmp_path, setup, overwrite=False)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        start_fresh(tmp_path, setup, overwrite=False)
    start_fresh(tmp_path, setup, overwrite=True)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_resuming_keeps_the_setup_the_run_was_started_with(tmp_path, capsys):
    start_fresh(tmp_path, load_setup("configs/tiny.toml", ["train.max_steps=40", "data.source=tasks",
                                                     "data.tokenizer=bytes", "model.vocab_size=259"]),
                overwrite=False)
    setup = resumed_setup(tmp_path, None, [])
    assert setup["train"].max_steps == 40 and setup["data"].source == "tasks"
    with pytest.raises(ConfigError, match="train.max_steps = 200.*started with 40"):
        resumed_setup(tmp_path, None, ["train.max_steps=200"])
    with pytest.raises(ConfigError, match="data.source = 'stdlib'.*started with 'tasks'"):
        resumed_setup(tmp_path, "configs/tiny.toml", ["train.max_steps=40", "data.tokenizer=bytes",
                                                      "model.vocab_size=259"])
    setup = resumed_setup(tmp_path, None, ["train.log_every=5"])  # harmless: applied
    assert setup["train"].log_every == 5 and "log_every changed" in capsys.readouterr().err


def test_torn_metrics_lines_are_dropped_on_resume(tmp_path, capsys):
    rows = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + '\n{"step": 4, "lo')
    assert metrics_up_to(tmp_path, 2) == rows[0] + "\n" + rows[1] + "\n"
    assert "dropped 1 unreadable line" in capsys.readouterr().err
