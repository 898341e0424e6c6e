"""train.py under torchrun on CPU (Gloo, 2 processes started by the test): data parallel
and expert parallel equal one process with the same global batch, checkpoints written by
2 ranks (experts gathered) load and generate in one process, and resume under 2 ranks
equals the uninterrupted run. moe/parallel/expert_parallel.py's own layer-level tests are in
tests/test_expert_parallel.py."""

import ast
import json
import os
import re
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch

from moe.parallel import distributed
from moe.io.checkpoint import load_model
from moe.config import ConfigError, TrainConfig, load_setup
from moe.training.data import get_batch, prepare
from moe.model.transformer import Transformer
from moe.serving.text import load_tokenizer
from moe.training.loop import make_optimizer, train_step
from train import greedy_sample

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
VARIANTS = ["model.router_score=\"sigmoid\"", "model.balance=\"bias\"", "model.bias_update_rate=0.05",
            "model.n_shared_experts=1"]


def _settings(tmp: Path, aux_loss_coef: float) -> list[str]:
    return [f"data.source={json.dumps(str(tmp / 'data.txt'))}", f"data.cache_dir={json.dumps(str(tmp / 'cache'))}",
            "data.tokenizer=\"bytes\"", "model.vocab_size=259",
            "model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.d_expert=32", "model.n_experts=4",
            "model.router_jitter=0.0", "model.capacity_factor=none", f"model.aux_loss_coef={aux_loss_coef}",
            f"train.max_steps={STEPS}", "train.batch_size=2", "train.seq_len=16", "train.warmup_steps=1",
            "train.log_every=1", "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2",
            "train.device=\"cpu\"", "train.unlikelihood_steps=0"]


def _train(tmp: Path, run: str, settings: list[str], extra: list[str] = ()) -> str:
    """train.py on 2 Gloo ranks; rank 0's stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "train.py", "--config", "configs/tiny.toml", "--out", str(tmp / run), "--quiet", "--sample", "a",
               *[f"--set={s}" for s in settings], *extra]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-rank runs shared by the tests: DDP with the load-balancing loss off, FSDP2 with
    it on, and expert parallel (2 of the 4 experts per rank) with the routing variants that
    keep state or weights outside the experts: sigmoid scores, the balance bias (its update
    must see the global batch's load) and a shared expert."""
    tmp = tmp_path_factory.mktemp("distributed")
    (tmp / "data.txt").write_text("".join(f"line {i}: the quick brown fox {i * i}\n" for i in range(400)))
    out = {"tmp": tmp}
    for name, extra_settings, aux, extra in (("ddp", [], 0.0, []),
                                             ("fsdp", ["train.parallel=\"fsdp\""], 0.01, []),
                                             ("expert", VARIANTS, 0.01, ["--expert-parallel", "2"])):
        settings = _settings(tmp, aux) + extra_settings
        out[name] = (_train(tmp, name, settings, extra), settings, extra)
    return out


def _reference(tmp: Path, settings: list[str], one_batch: bool, routing: list | None = None) -> Transformer:
    """One process, the same seed and batches: rank r's batch of step s is batch index
    2s + r, either concatenated into one batch of 2B or accumulated as 2 micro-batches
    (each step's routing statistics appended to `routing`)."""
    setup = load_setup(ROOT / "configs/tiny.toml", settings)
    cfg = setup["train"]
    corpus = prepare(setup["data"], seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = Transformer(setup["model"])
    optimizer = make_optimizer(model, cfg)
    for step in range(STEPS):
        micro = [get_batch(corpus.train, cfg.seq_len, cfg.batch_size, cfg.seed, 2 * step + r) for r in range(2)]
        if one_batch:
            micro = [(torch.cat([m[0] for m in micro]), torch.cat([m[1] for m in micro]))]
        stats = train_step(model, optimizer, micro, cfg, step, torch.device("cpu"))
        if routing is not None:
            routing.append(stats["routing"])
    return model


def _assert_same_parameters(trained: Transformer, reference: Transformer) -> None:
    # atol 1e-5 = 1/300 of one step at lr 3e-3: Adam divides by sqrt(v), so where a gradient
    # is near zero (output rows of bytes absent from the batch) float32 rounding of another
    # summation order moves a weight by a small fraction of the learning rate.
    for (name, a), b in zip(trained.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    for (name, a), b in zip(trained.named_buffers(), reference.buffers()):  # the balance biases
        torch.testing.assert_close(a, b, msg=name)


def test_ddp_over_two_ranks_with_batch_b_equals_one_process_with_batch_2b(runs):
    # The Switch load-balancing loss multiplies two means over the batch, so it is not an
    # average of per-sequence losses: two halves of B do not add up to one batch of 2B.
    # That run has it off; the FSDP2 test below keeps it on against accumulation.
    settings = runs["ddp"][1]
    _assert_same_parameters(load_model(runs["tmp"] / "ddp"), _reference(runs["tmp"], settings, one_batch=True))


@pytest.mark.parametrize("mode", ["fsdp", "expert"])
def test_two_ranks_equal_one_process_accumulating_their_two_batches(runs, mode):
    # Each rank's loss (load-balancing term included) is over its own B sequences, exactly
    # like each micro-batch's loss when one process accumulates 2 micro-batches of B.
    settings = runs[mode][1]
    trained = load_model(runs["tmp"] / mode)
    _assert_same_parameters(trained, _reference(runs["tmp"], settings, one_batch=False))
    if mode == "expert":  # the biases moved, by the same global loads in both
        assert all(bias.abs().sum() > 0 for bias in trained.buffers())


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "expert"])
def test_checkpoint_of_two_ranks_generates_the_same_greedy_text_in_one_process(runs, mode):
    stdout = runs[mode][0]
    printed = re.search(r"^sample: 'a' -> (.*)$", stdout, re.MULTILINE)
    assert printed, stdout
    model = load_model(runs["tmp"] / mode).eval()
    text = greedy_sample(model, load_tokenizer(runs["tmp"] / mode), "a")
    assert text == ast.literal_eval(printed.group(1))


def _losses(run: Path) -> list[tuple[int, float, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("mode", ["fsdp", "expert"])
def test_resume_under_two_ranks_gives_the_losses_of_the_uninterrupted_run(runs, mode):
    tmp, (_, settings, extra) = runs["tmp"], runs[mode]
    resumed = f"{mode}-resumed"
    shutil.copytree(tmp / mode, tmp / resumed)
    (tmp / resumed / "ckpt" / "latest").write_text("step_000002\n")  # as if killed after step 2
    _train(tmp, resumed, settings, extra + ["--resume"])
    expected = _losses(tmp / mode)
    assert [s for s, _, _ in expected] == list(range(1, STEPS + 1))
    assert _losses(tmp / resumed) == expected  # identical, not merely close


def test_bad_layouts_are_refused_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="must divide the number of processes"):
        distributed.init(TrainConfig(), expert_parallel=3)
    with pytest.raises(ConfigError, match="cannot be combined with --expert-parallel"):
        distributed.init(TrainConfig(parallel="fsdp"), expert_parallel=2)
    with pytest.raises(ConfigError, match="train.parallel"):
        TrainConfig(parallel="tensor")


def test_distributed_benchmark_counts_the_dispatch_bytes_of_the_formula(tmp_path):
    # Dropless routing sends every (token, expert) slot once: tokens x K x width x 4 bytes per layer.
    out = tmp_path / "distributed.json"
    command = [sys.executable, "benchmarks/bench_distributed.py", "--steps", "2", "--warmup", "1", "--repeats", "1",
               "--set=model.n_layers=1", "--set=train.batch_size=2", "--set=train.seq_len=32", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report["median_tokens_per_s"]) == {"one process", "DDP, 2 ranks", "expert parallel, 2 ranks"}
    exchange = report["all_to_all_per_rank_step"]
    assert exchange["formula_dispatch_bytes"] == 2 * 32 * 2 * 128 * 4 * 1
    assert exchange["sent_bytes"]["dispatch"] == exchange["formula_dispatch_bytes"]


def test_a_two_rank_run_resumed_in_one_process_keeps_its_global_batch_and_losses(runs):
    tmp = runs["tmp"]
    shutil.copytree(tmp / "ddp", tmp / "ddp-one")
    (tmp / "ddp-one" / "ckpt" / "latest").write_text("step_000002\n")  # as if killed after step 2
    done = subprocess.run([sys.executable, "train.py", "--out", str(tmp / "ddp-one"), "--resume",
                           "--quiet", "--sample", "a"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train.grad_accum 1 -> 2" in done.stderr  # 2 ranks x 1 micro-batch = 1 x 2
    expected, resumed = _losses(tmp / "ddp"), _losses(tmp / "ddp-one")
    assert [s for s, _, _ in resumed] == [s for s, _, _ in expected]
    for (_, loss, norm), (_, loss_ref, norm_ref) in zip(resumed, expected):  # summation order only
        assert loss == pytest.approx(loss_ref, rel=1e-5) and norm == pytest.approx(norm_ref, rel=1e-4)


def test_a_resume_on_a_world_size_that_cannot_share_the_batch_is_refused():
    import train
    with pytest.raises(ConfigError, match=r"3 processes cannot share.*\[1, 2, 4\]"):
        train.keep_global_batch(TrainConfig(grad_accum=2), 4, 3)
    assert train.keep_global_batch(TrainConfig(grad_accum=1), 4, 2).grad_accum == 2


@pytest.mark.parametrize("mode", ["fsdp", "expert"])
def test_routing_statistics_cover_the_global_batch_as_one_process_sees_it(runs, mode):
    settings, routing = runs[mode][1], []
    _reference(runs["tmp"], settings, one_batch=False, routing=routing)
    rows = [json.loads(line) for line in (runs["tmp"] / mode / "metrics.jsonl").read_text().splitlines()]
    logged = [r["routing"] for r in rows if "routing" in r]
    assert len(logged) == len(routing) == STEPS
    for ranks_view, one_process in zip(logged, routing):
        for layer, expected in zip(ranks_view, one_process):
            assert layer["dropped"] == expected["dropped"] and layer["dead"] == expected["dead"]
            for key in ("load", "max_over_ideal", "jain", "entropy"):
                assert layer[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def test_the_process_group_waits_on_a_hung_rank_only_train_dist_timeout_s(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, **kwargs: seen.update(backend=backend, **kwargs))
    distributed.init(TrainConfig(device="cpu", dist_timeout_s=42))
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 42
    with pytest.raises(ConfigError, match="dist_timeout_s must be positive"):
        TrainConfig(dist_timeout_s=0)


HANG = """
import os, signal, sys, time
sys.path.insert(0, os.getcwd())
import train
real = train.train_step
def step(model, optimizer, micro, cfg, index, *rest, **options):
    if index == 1 and os.environ.get("RANK") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher may end it
        time.sleep(600)  # hung: never joins this step's all-reduce
    return real(model, optimizer, micro, cfg, index, *rest, **options)
train.train_step = step
train.main(sys.argv[1:])
"""


def test_a_hung_rank_ends_the_job_after_the_timeout_naming_the_waiting_rank(tmp_path):
    (tmp_path / "hang.py").write_text(HANG)
    (tmp_path / "data.txt").write_text("".join(f"line {i}: the quick brown fox\n" for i in range(400)))
    settings = _settings(tmp_path, 0.0) + ["train.dist_timeout_s=3", "train.max_steps=4"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(tmp_path / "hang.py"), "--config", "configs/tiny.toml", "--out", str(tmp_path / "run"),
               "--quiet", *[f"--set={s}" for s in settings]]
    begun = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and time.monotonic() - begun < 60
    assert "rank 0: waited train.dist_timeout_s = 3.0 s in step 2" in done.stderr, done.stderr[-3000:]
