"""moe.training.loop and train.py: the schedule, accumulation, learning, routing health,
checkpoints that survive a kill, and resume equal to a run never stopped."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.io.checkpoint import load_model, save_model
from moe.io.files import CheckpointError
from moe.config import TrainConfig
from moe.model.transformer import Transformer
from moe.training.loop import (distillation_loss, lr_at, make_optimizer, routing_counts, routing_metrics,
                               save_checkpoint, train_step)
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_accumulating_two_batches_equals_one_batch_of_twice_the_size():
    torch.manual_seed(0)
    cfg = TrainConfig(warmup_steps=0, grad_clip=0.0, lr=0.0, min_lr=0.0)  # lr 0: keep the gradients to compare
    tokens = torch.randint(0, 256, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    models = []
    for micro in ([(inputs, targets)], [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])]):
        torch.manual_seed(1)
        model = Transformer(tiny_config(aux_loss_coef=0.0))  # the balance loss is per batch, not per token
        train_step(model, make_optimizer(model, cfg), micro, cfg, 0, torch.device("cpu"))
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_loss_falls_on_a_small_batch():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    cfg = TrainConfig(warmup_steps=0, lr=3e-3, max_steps=40)
    optimizer = make_optimizer(model, cfg)
    tokens = torch.randint(0, 256, (2, 33))
    losses = [train_step(model, optimizer, [(tokens[:, :-1], tokens[:, 1:])], cfg, step,
                         torch.device("cpu"))["ce"] for step in range(40)]
    assert losses[-1] < 0.6 * losses[0]


def test_routing_metrics_see_collapse_and_balance():
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_experts=4))
    output = model(torch.randint(0, 256, (2, 16)))
    healthy = routing_metrics(routing_counts(output.routing, n_layers=2))
    assert len(healthy) == 2 and sum(healthy[0]["load"]) == pytest.approx(1.0)
    assert 0.25 <= healthy[0]["jain"] <= 1.0 and healthy[0]["max_over_ideal"] >= 1.0
    stats = output.routing[0]
    stats.tokens_per_expert = torch.tensor([64, 0, 0, 0])  # every slot on expert 0
    collapsed = routing_metrics(routing_counts([stats], n_layers=1))[0]
    assert collapsed["dead"] == 3 and collapsed["jain"] == pytest.approx(0.25)
    assert collapsed["max_over_ideal"] == pytest.approx(4.0)


def test_distillation_loss_is_zero_only_at_the_target():
    logits = torch.randn(2, 3, 11)
    assert distillation_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(logits, torch.randn(2, 3, 11), 2.0).item() > 0.01


def test_corrupt_latest_checkpoint_is_refused_and_the_previous_loads(tmp_path):
    model = Transformer(tiny_config())
    optimizer = make_optimizer(model, TrainConfig())
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, model, optimizer, step, keep=2)
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == ["step_000002", "step_000003"]
    weights = tmp_path / "ckpt" / "step_000003" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path)
    previous = load_model(tmp_path / "ckpt" / "step_000002")
    torch.testing.assert_close(previous.embed.weight, model.embed.weight)


KILLER = """
import os, signal, sys
import moe.training.loop, train
mode, at = sys.argv[1], int(sys.argv[2])
real_step, real_write = train.train_step, moe.training.loop.write_model
def step(model, optimizer, micro, cfg, index, *rest, **options):
    if mode == "step" and index == at:
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "sigterm" and index == at:  # arrives mid-step: acted on at its end
        os.kill(os.getpid(), signal.SIGTERM)
    return real_step(model, optimizer, micro, cfg, index, *rest, **options)
def write(model, folder, metadata):
    real_write(model, folder, metadata)
    if mode == "save" and int(metadata["step"]) == at:
        os.kill(os.getpid(), signal.SIGKILL)  # weights written, directory not yet renamed
train.train_step, moe.training.loop.write_model = step, write
train.main(sys.argv[3:])
"""


def _train(args: list[str], killer: tuple[str, int] | None = None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", KILLER, *map(str, killer)] if killer else [sys.executable, "train.py"]
    return subprocess.run(command + args, cwd=ROOT, env=env, capture_output=True, timeout=120).returncode


def _losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


def test_run_killed_mid_run_mid_save_or_by_sigterm_resumes_to_the_same_losses_unlikelihood_steps_too(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("".join(f"line {i}: the quick brown fox {i * i}\n" for i in range(400)))
    def args(run):
        return ["--config", "configs/tiny.toml", "--out", str(tmp_path / run), "--quiet", "--sample", "a",
                *[f"--set={s}" for s in (f"data.source={json.dumps(str(data))}",
                                         f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
                                         "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                                         "model.d_expert=32", "model.n_experts=4", "model.router_jitter=0.1",
                                         "train.max_steps=8", "train.batch_size=2", "train.seq_len=16",
                                         "train.grad_accum=2", "train.warmup_steps=2", "train.log_every=1",
                                         "train.eval_every=4", "train.eval_batches=1",
                                         "train.checkpoint_every=2", "train.keep_checkpoints=2",
                                         # steps 5..8 decode greedily for unlikelihood: resumed too
                                         "train.unlikelihood_steps=4", "train.unlikelihood_prefix=8",
                                         "train.unlikelihood_tokens=8")]]
    assert _train(args("whole")) == 0
    expected = _losses(tmp_path / "whole")
    assert [s for s, _, _ in expected] == list(range(1, 9))
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "repeat_share" in r] == [5, 6, 7, 8]
    for mode, at, code, saved in (("step", 5, -9, 4), ("save", 6, -9, 4), ("sigterm", 4, 143, 5)):
        run = tmp_path / mode
        assert _train(args(mode), killer=(mode, at)) == code
        latest = (run / "ckpt" / "latest").read_text().strip()
        assert latest == f"step_{saved:06d}"  # an interrupted save never becomes latest; SIGTERM saves
        load_model(run)
        # the README's recipe: only the folder; the setup comes from the run's setup.json
        assert _train(["--out", str(run), "--resume", "--quiet", "--sample", "a"]) == 0
        assert _losses(run) == expected  # identical, not merely close
        assert not list((run / "ckpt").glob(".step_*"))  # the interrupted save's leftovers swept


def test_a_diverging_run_stops_and_leaves_only_finite_checkpoints(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("".join(f"{i}\n" for i in range(3000)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "train.py", "--out", str(tmp_path / "run"), "--quiet",
         *[f"--set={s}" for s in (f"data.source={json.dumps(str(data))}",
                                  f"data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
                                  "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
                                  "model.d_expert=32", "model.n_experts=4", "train.max_steps=30",
                                  "train.batch_size=2", "train.seq_len=16", "train.lr=1e4",
                                  "train.warmup_steps=1", "train.checkpoint_every=2",
                                  "train.eval_every=10", "train.eval_batches=1", "train.unlikelihood_steps=0")]],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not finite for 5 steps in a row" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    model = load_model(tmp_path / "run")  # latest loads, and holds finite weights only
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_distillation_pulls_the_draft_towards_the_target():
    torch.manual_seed(0)
    target = Transformer(tiny_config()).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(100)  # a confident target, far from the draft's near-uniform start
    tokens = torch.randint(0, 256, (2, 17))
    final_kl = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(1)
        draft = Transformer(tiny_config(moe_every=0))
        cfg = TrainConfig(warmup_steps=0, lr=1e-2, distill_weight=weight)
        optimizer = make_optimizer(draft, cfg)
        for step in range(8):
            kl = train_step(draft, optimizer, [(tokens[:, :-1], tokens[:, 1:])], cfg, step,
                            torch.device("cpu"), teacher=target)["kl"]
        final_kl[weight] = kl
    assert final_kl[1.0] < 0.7 * final_kl[0.0]


def test_resume_without_a_checkpoint_says_so(tmp_path):
    from moe.training.loop import read_checkpoint
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        read_checkpoint(tmp_path, Transformer(tiny_config()), torch.device("cpu"))


def test_user_errors_print_the_fix_and_exit_2_without_a_traceback(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(400)))
    short = save_model(Transformer(tiny_config(max_seq_len=64)), tmp_path / "short")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "metrics.jsonl").write_text("")
    def small(run):
        return [f"--set=data.source={json.dumps(str(data))}", "--set=data.tokenizer=\"bytes\"",
                "--set=train.unlikelihood_steps=0",
                "--set=model.vocab_size=259", f"--set=data.cache_dir={json.dumps(str(tmp_path / 'cache'))}",
                "--out", tmp_path / run]
    cases = {  # a piece of the message -> the command line
        "model.n_kv_heads = 3 does not divide": ["--set", "model.n_kv_heads=3", "--out", tmp_path / "heads"],
        "config file nope.toml does not exist": ["--config", "nope.toml", "--out", tmp_path / "nope"],
        "holds no run to resume": [*small("resume"), "--resume"],
        "already holds a run": [*small("used"), "--set=train.max_steps=1"],
        "every file it names is empty": [*small("empty")[4:], f"--set=data.source={json.dumps(str(empty))}",
                                         f"--set=data.cache_dir={json.dumps(str(tmp_path / 'cache'))}"],
        "fewer than one window": [*small("window"), "--set=train.seq_len=64",
                                  "--set=data.val_fraction=0.001"],
        "is below the 259 ids": [*small("vocab"), "--set=model.vocab_size=100"],
        "reads at most 64 tokens": [*small("distill"), f"--set=train.distill_from={json.dumps(str(short))}"],
        "does not go with data.source = \"tasks\"": ["--set=data.source=\"tasks\"", "--out", tmp_path / "tasks"],
        "at most 65536": ["--set=model.vocab_size=70000", "--out", tmp_path / "huge"],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {message: subprocess.Popen([sys.executable, "train.py", *map(str, args)], cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for message, args in cases.items()}  # at the same time: each start imports torch
    for message, process in running.items():
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2, err
        assert err.startswith("error:") and message in err and "Traceback" not in err, err


def _uniform_model(vocab_size: int) -> Transformer:
    """A model whose every prediction is uniform over the vocabulary: ln V nats per token."""
    model = Transformer(tiny_config(vocab_size=vocab_size, max_seq_len=16))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_whole_split_bits_per_byte_scores_every_token_once_per_byte_it_stands_for():
    import math
    import numpy as np
    from moe.training.data import Corpus
    from moe.training.loop import evaluate
    lengths = np.array([1] * 256 + [0] * 3 + [2, 3, 5], dtype=np.int64)  # 262 ids: bytes, specials, 3 merges
    val = np.random.default_rng(0).integers(0, 262, 101).astype(np.uint16)
    val[5] = 261  # a 5-byte token in the first window
    corpus = Corpus(np.zeros(0, np.uint16), val, Path("."), token_bytes=lengths, compressors={})
    result = evaluate(_uniform_model(262), corpus, TrainConfig(seq_len=16, batch_size=2, eval_batches=0),
                      torch.device("cpu"))
    predicted = val[1:].astype(np.int64)  # every token but the first, once (7 windows, the last short)
    assert result["val_bytes"] == lengths[predicted].sum() and result["val_share"] == 1.0
    assert result["val_bpb"] == pytest.approx(100 * math.log2(262) / lengths[predicted].sum(), rel=1e-5)
    assert result["val_loss"] == pytest.approx(math.log(262), rel=1e-5) and "val_bpb_ci95" not in result
    sampled = evaluate(_uniform_model(262), corpus, TrainConfig(seq_len=16, batch_size=2, eval_batches=1),
                       torch.device("cpu"))
    assert sampled["val_share"] == pytest.approx(2 / 7) and sampled["val_bpb_ci95"] > 0


def test_routing_information_tells_a_task_router_from_a_token_router():
    from moe.training.loop import routing_information
    by_task = torch.zeros(1, 2, 2, 2, dtype=torch.float64)  # [L, token, task, expert]
    by_token = torch.zeros_like(by_task)
    for token in range(2):
        for task in range(2):
            by_task[0, token, task, task] = 50  # the expert is the task, whatever the token
    by_token[0, 0, 0, 0] = by_token[0, 1, 1, 1] = 100  # each task has its own token, the expert follows it
    task_router, token_router = routing_information(by_task), routing_information(by_token)
    assert task_router["task_expert_mi_bits"][0] == pytest.approx(1.0)
    assert task_router["task_expert_mi_given_token_bits"][0] == pytest.approx(1.0)
    assert task_router["task_expert_mi_given_token_shuffled_bits"][0] < 0.05
    assert token_router["task_expert_mi_bits"][0] == pytest.approx(1.0)
    assert token_router["task_expert_mi_given_token_bits"][0] == pytest.approx(0.0)


def test_keep_freed_memory_tunes_glibc_and_nothing_else():
    # in a child, so this test process keeps glibc's defaults
    code = ("import torch; from moe.training.loop import keep_freed_memory; "
            "print(keep_freed_memory()); x = torch.ones(1 << 20); del x; print(torch.ones(3).sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.split()
    assert out == [str(platform.libc_ver()[0] == "glibc"), "3.0"]
