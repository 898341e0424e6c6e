"""Train a model from a config; resumable after a kill.

    .venv/bin/python train.py                                   # tiny.toml on the stdlib corpus, CPU
    .venv/bin/python train.py --config configs/tiny.toml --out runs/tiny --set train.max_steps=200
    .venv/bin/python train.py --config configs/tiny.toml --set data.source=tasks   # synthetic task mix
    .venv/bin/python train.py --config configs/draft.toml --set train.distill_from=runs/tiny
    .venv/bin/python train.py --out runs/tiny --resume          # continue where it stopped
    .venv/bin/python train.py --out runs/tiny --resume-from 200 # continue from an older checkpoint

On several processes (docs/distributed.md; rank 0 logs and writes, checkpoints load in one process):

    .venv/bin/torchrun --nproc-per-node 2 train.py --out runs/dp                 # DDP
    .venv/bin/torchrun --nproc-per-node 2 train.py --set train.parallel=fsdp     # FSDP2
    .venv/bin/torchrun --nproc-per-node 2 train.py --expert-parallel 2           # experts split

Writes RUN/setup.json (what --resume continues), RUN/metrics.jsonl (one line per log step
and per evaluation), RUN/ckpt/step_*/ and RUN/ckpt/latest (load with
moe.io.checkpoint.load_model(RUN)), and PNGs when matplotlib is installed (the `plots`
extra). A fresh run into a folder that holds one is refused unless --overwrite. SIGTERM or
Ctrl-C saves a checkpoint at the next step boundary and exits; a step whose loss or
gradient is not finite is skipped, and the run stops after a few in a row. The loop's
pieces live in moe/training/loop.py, the run folder's rules in
moe/training/run_folder.py, the distributed plumbing in moe/parallel/distributed.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import time
from pathlib import Path

import torch

from moe.cli import run_main
from moe.parallel import distributed
from moe.io.checkpoint import load_model
from moe.config import BYTE_VOCAB_SIZE, ConfigError, DataConfig, ModelConfig, TrainConfig, load_setup
from moe.cost.estimate import training_flops_per_token
from moe.cost.hardware import preset_for_device
from moe.model.transformer import Transformer, count_parameters
from moe.serving.generation import generate
from moe.serving.sampling import SamplingParams
from moe.serving.text import TextTokenizer, load_tokenizer
from moe.training.data import Corpus, prepare, training_batch
from moe.training.loop import (evaluate, keep_freed_memory, make_optimizer, read_checkpoint,
                               set_rng_state, sweep_leftovers, train_step)
from moe.io.files import write_text_atomically
from moe.training.run_folder import (METRICS_FILE, metrics_up_to, refuse_used, resumed_setup,
                                     start_fresh)

DEFAULT_CONFIG = "configs/tiny.toml"
MAX_SKIPPED_IN_A_ROW = 5  # steps with a non-finite loss or gradient before the run stops


class Diverged(ValueError):
    """The loss stayed non-finite: the run stops (a user's setting, printed as error:)."""


def check_fits(model_cfg: ModelConfig, cfg: TrainConfig, data_cfg: DataConfig) -> None:
    """Refuse settings that are valid alone but not together, before any data is prepared."""
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len = {cfg.seq_len} exceeds model.max_seq_len = "
                          f"{model_cfg.max_seq_len}; lower train.seq_len or raise model.max_seq_len")
    if model_cfg.vocab_size < BYTE_VOCAB_SIZE:
        raise ConfigError(f"model.vocab_size = {model_cfg.vocab_size} is below the {BYTE_VOCAB_SIZE} ids "
                          "of the byte tokenizer the data is encoded with (moe/tokenizer.py); set it to "
                          f"at least {BYTE_VOCAB_SIZE}")
    if data_cfg.tokenizer == "bpe" and not BYTE_VOCAB_SIZE < model_cfg.vocab_size <= 2**16:
        raise ConfigError(f"data.tokenizer = \"bpe\" learns a vocabulary of model.vocab_size ids, which must be "
                          f"above the {BYTE_VOCAB_SIZE} byte and special ids and at most 65536 (ids are "
                          f"stored as uint16); got {model_cfg.vocab_size}, e.g. set model.vocab_size = 4096")
    if cfg.unlikelihood_steps > cfg.max_steps:
        raise ConfigError(f"train.unlikelihood_steps = {cfg.unlikelihood_steps} (the last steps that add "
                          f"unlikelihood) exceeds train.max_steps = {cfg.max_steps}; lower it, e.g. "
                          f"--set train.unlikelihood_steps={cfg.max_steps // 9}, or set it to 0")
    if cfg.unlikelihood_steps and cfg.unlikelihood_prefix > cfg.seq_len:
        raise ConfigError(f"train.unlikelihood_prefix = {cfg.unlikelihood_prefix} exceeds train.seq_len = "
                          f"{cfg.seq_len} (prefixes are cut from training windows); lower it, or set "
                          "train.unlikelihood_steps = 0")
    if cfg.unlikelihood_steps and data_cfg.source == "tasks":
        raise ConfigError("train.unlikelihood_steps penalises repeats in free text; the task mix is scored by "
                          "exact match and its answers repeat by design (copy, sort): set it to 0")
    if cfg.unlikelihood_steps and cfg.unlikelihood_prefix + cfg.unlikelihood_tokens > model_cfg.max_seq_len:
        raise ConfigError(f"train.unlikelihood_prefix + unlikelihood_tokens = "
                          f"{cfg.unlikelihood_prefix + cfg.unlikelihood_tokens} exceeds model.max_seq_len = "
                          f"{model_cfg.max_seq_len}; lower one of them")


def check_corpus(corpus: Corpus, cfg: TrainConfig, source: str) -> None:
    """Both splits must hold at least one training window, or the first evaluation fails
    after a checkpoint was already written."""
    need = cfg.seq_len + 1
    for split, tokens in (("train", corpus.train), ("validation", corpus.val)):
        if len(tokens) < need:
            raise ConfigError(f"data.source = {source!r} gives {len(tokens)} {split} tokens, fewer than "
                              f"one window of train.seq_len + 1 = {need}; give more text, lower "
                              "train.seq_len or change data.val_fraction")


def keep_global_batch(cfg: TrainConfig, saved: int | None, world_size: int) -> TrainConfig:
    """A run resumed on another number of processes keeps its global batch: step s always
    takes micro-batches s*M .. s*M + M - 1 of the data (M = grad_accum x processes), so with
    train.grad_accum rescaled to M / processes it continues on the same data, the same
    batches, the same schedule. Refused, with the numbers that work, when M does not divide."""
    if saved is None or saved == cfg.grad_accum * world_size:
        return cfg
    if saved % world_size:
        divisors = [d for d in range(1, saved + 1) if saved % d == 0]
        raise ConfigError(f"this run took {saved} micro-batches of train.batch_size = {cfg.batch_size} "
                          f"per step, which {world_size} processes cannot share; resume on a number "
                          f"of processes in {divisors}")
    print(f"warning: resumed on {world_size} process(es): train.grad_accum {cfg.grad_accum} -> "
          f"{saved // world_size}, keeping the global batch of {saved} micro-batches per step",
          file=sys.stderr)
    return dataclasses.replace(cfg, grad_accum=saved // world_size)


def check_teacher(teacher: ModelConfig, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """Refuse a distillation target whose logits cannot be compared with the model's."""
    if teacher.vocab_size != model_cfg.vocab_size:
        raise ConfigError(f"train.distill_from = {cfg.distill_from} has vocab_size = {teacher.vocab_size} "
                          f"but model.vocab_size = {model_cfg.vocab_size}; distillation compares the two "
                          f"distributions id by id, so set model.vocab_size = {teacher.vocab_size}")
    if teacher.max_seq_len < cfg.seq_len:
        raise ConfigError(f"train.distill_from = {cfg.distill_from} reads at most {teacher.max_seq_len} "
                          f"tokens, fewer than train.seq_len = {cfg.seq_len}; lower train.seq_len")


def describe_evaluation(result: dict, corpus: Corpus) -> str:
    """One line: the figure, how sure it is, and the bars beside it."""
    if corpus.is_tasks:
        tasks = " ".join(f"{key[4:]} {value:.1%}" for key, value in result.items()
                         if key.startswith("acc_") and key != "acc_mean")
        return (f"answer loss {result['val_loss']:.4f}, exact match {result['acc_mean']:.1%} "
                f"({tasks})")
    sure = (f" ± {result['val_bpb_ci95']:.3f} (95%, {result['val_share']:.0%} of the split)"
            if "val_bpb_ci95" in result else f" (whole split, {result['val_bytes']:,} bytes)")
    bars = ", ".join(f"{name} {bpb:.3f}" for name, bpb in corpus.compressors.items())
    return f"val {result['val_bpb']:.3f} bits/byte{sure}" + (f"; {bars}" if bars else "")


SAMPLE_BYTES = 300  # greedy sample length the end of a run reports on
SAMPLE_PROMPTS = ("def ", "import os\n", "class Parser:\n", "    for ")  # fixed, so runs compare


def greedy_sample(model: Transformer, tokenizer: TextTokenizer, prompt: str) -> str:
    """The first SAMPLE_BYTES bytes (or fewer, when it ends) of the model's greedy
    continuation of `prompt` (no BOS: text windows never start with one; generate.py
    prompts the same way)."""
    ids = tokenizer.encode(prompt)
    new = generate(model, ids, SamplingParams(max_new_tokens=min(SAMPLE_BYTES, model.cfg.max_seq_len - len(ids))))
    return tokenizer.decode(new).encode()[:SAMPLE_BYTES].decode(errors="ignore")


def distinct_4grams(data: bytes) -> float:
    """Share of the 4-byte windows of `data` that are distinct: near 1 for prose or code,
    near 0 for a loop of one word."""
    grams = [data[i:i + 4] for i in range(len(data) - 3)]
    return len(set(grams)) / max(len(grams), 1)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help=f"setup TOML (default {DEFAULT_CONFIG}; a "
                        "resumed run keeps the setup it was started with)")
    parser.add_argument("--out", help="run folder (default runs/<config name>)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from RUN/ckpt/latest, with its own setup")
    parser.add_argument("--resume-from", type=int, default=None, metavar="STEP",
                        help="continue from the checkpoint of this step (implies --resume)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a folder that already holds a run, replacing it")
    parser.add_argument("--sample", action="append", default=None, metavar="PROMPT",
                        help="prompt of a greedy sample printed at the end (repeatable; default: "
                             f"{', '.join(map(repr, SAMPLE_PROMPTS))})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--expert-parallel", type=int, default=1, metavar="D",
                        help="split each MoE layer's experts over D ranks (under torchrun)")
    args = parser.parse_args(argv)

    args.resume = args.resume or args.resume_from is not None
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; give one")
    run = Path(args.out or f"runs/{Path(args.config or DEFAULT_CONFIG).stem}")
    if args.resume:
        setup = resumed_setup(run, args.config, args.set)
    else:
        refuse_used(run, args.overwrite)
        setup = load_setup(args.config or DEFAULT_CONFIG, args.set)
    model_cfg, cfg, data_cfg = setup["model"], setup["train"], setup["data"]
    check_fits(model_cfg, cfg, data_cfg)
    ranks = distributed.init(cfg, args.expert_parallel)  # one process unless launched by torchrun
    device, main = ranks.device, ranks.is_main
    if ranks.distributed and cfg.unlikelihood_steps:
        raise ConfigError("train.unlikelihood_steps runs in one process only for now (its greedy decoding is "
                          "not sharded); set it to 0 under torchrun")

    corpus = prepare(data_cfg, cfg.seed, model_cfg.vocab_size) if main else None
    distributed.barrier(ranks)  # rank 0 prepares the token files once; the others then map them
    corpus = corpus or prepare(data_cfg, cfg.seed, model_cfg.vocab_size)
    check_corpus(corpus, cfg, data_cfg.source)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = Transformer(model_cfg).to(device)
    teacher = load_model(cfg.distill_from, device=device).eval() if cfg.distill_from else None
    if teacher is not None:
        check_teacher(teacher.cfg, model_cfg, cfg)
    metrics_file = run / METRICS_FILE
    start = 0
    if args.resume:
        if main:
            for path in sweep_leftovers(run):
                print(f"removed {path}, left by an interrupted save", file=sys.stderr)
        state = read_checkpoint(run, model, device, args.resume_from)  # full weights, before any split
        start = state["step"]
        cfg = keep_global_batch(cfg, state.get("micro_batches_per_step"), ranks.world_size)
        if main:  # drop what the stopped run logged after its checkpoint, and torn lines
            write_text_atomically(metrics_file, metrics_up_to(run, start))
    elif main:
        start_fresh(run, setup, args.overwrite)
    tokenizer_files = [corpus.tokenizer_file] if corpus.tokenizer_file else []  # into every checkpoint
    trained = distributed.parallelize(model, ranks)  # model itself, or a DDP wrapper around it
    optimizer = make_optimizer(model, cfg)
    if args.resume:
        distributed.load_optimizer_state(trained, optimizer, state["optimizer"], ranks)
        set_rng_state(state["rng"])
    compiled = torch.compile(trained) if cfg.compile else trained
    clip_gradients = distributed.gradient_clipper(model, ranks)
    sum_over_ranks = distributed.summer(ranks)  # routing statistics of the global batch

    params = count_parameters(model_cfg)
    flops_per_token = training_flops_per_token(model_cfg, cfg.seq_len)
    hardware = preset_for_device(torch.cuda.get_device_name()) if device.type == "cuda" else None
    micro_per_step = cfg.grad_accum * ranks.world_size  # micro-batches of batch_size in a step
    tokens_per_step = cfg.batch_size * cfg.seq_len * micro_per_step
    if main:
        layout = f", {ranks.world_size} ranks ({ranks.parallel})" if ranks.distributed else ""
        print(f"{run}: {params.total / 1e6:.2f}M parameters ({params.active / 1e6:.2f}M active), "
              f"{len(corpus.train) / 1e6:.1f}M train tokens from {data_cfg.source}, device {device}{layout}, "
              f"steps {start}..{cfg.max_steps}", flush=True)

    def log(row: dict) -> None:
        if main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")

    stop = {"signal": 0}  # set by SIGTERM / Ctrl-C, acted on at the next step boundary

    def on_signal(signum, frame) -> None:
        stop["signal"] = signum
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        began = time.perf_counter()
        training_s = 0.0  # time in training steps only: evaluation and checkpoints left out
        skipped_in_a_row = 0
        result = {}
        first_unlikelihood = cfg.max_steps - cfg.unlikelihood_steps
        phase_s, phase_steps = [0.0, 0.0], [0, 0]  # training seconds and steps: plain, with unlikelihood
        for step in range(start, cfg.max_steps):
            step_began = time.perf_counter()
            unlikelihood = step >= first_unlikelihood
            if main and cfg.unlikelihood_steps and step == first_unlikelihood:
                print(f"\nsteps {step + 1}..{cfg.max_steps} add unlikelihood on the repeats of the model's own "
                      f"greedy continuations (train.unlikelihood_steps; slower steps)", flush=True)
            micro = [training_batch(corpus, cfg.seq_len, cfg.batch_size, cfg.seed,
                                    distributed.batch_index(step, i, cfg.grad_accum, ranks))
                     for i in range(cfg.grad_accum)]
            try:
                stats = train_step(compiled, optimizer, micro, cfg, step, device, teacher,
                                   clip_gradients, sum_over_ranks,
                                   unlikelihood=unlikelihood)
            except RuntimeError as error:
                if ranks.distributed and "timed out" in str(error).lower():
                    raise RuntimeError(
                        f"rank {ranks.rank}: waited train.dist_timeout_s = {cfg.dist_timeout_s} s in "
                        f"step {step + 1} for a rank that never joined (hung or died: see the other "
                        f"ranks' logs); resume the run with --resume once they are healthy") from error
                raise
            stats["stop"] = float(stop["signal"])  # any rank stopping stops them all, at this step
            stats = distributed.mean_over_ranks(stats, ("loss", "ce", "aux", "z", "kl", "stop"), ranks)
            phase_s[unlikelihood] += time.perf_counter() - step_began
            phase_steps[unlikelihood] += 1
            training_s += time.perf_counter() - step_began
            done = step + 1
            elapsed = time.perf_counter() - began
            tokens_per_s = (done - start) * tokens_per_step / training_s
            row = {"step": done, **{k: v for k, v in stats.items() if k not in ("routing", "stop")},
                   "tokens_per_s": tokens_per_s, "elapsed_s": elapsed}
            if hardware is not None:
                row["mfu"] = flops_per_token * tokens_per_s / (hardware.peak_flops * ranks.world_size)
            skipped_in_a_row = skipped_in_a_row + 1 if stats["skipped"] else 0
            if stats["skipped"] and main:
                print(f"\nwarning: step {done} skipped: loss {stats['loss']} / gradient norm "
                      f"{stats['grad_norm']} not finite", file=sys.stderr, flush=True)
            if skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise Diverged(f"the loss or gradient was not finite for {skipped_in_a_row} steps in a row "
                               f"(steps {done - skipped_in_a_row + 1}..{done}); skipped steps change "
                               f"no weight and no checkpoint holds a non-finite one; lower train.lr "
                               f"(now {cfg.lr}) or raise train.warmup_steps and start again, or "
                               f"resume an earlier checkpoint with --resume-from")
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                log({**row, "routing": stats["routing"]})
            if main and not args.quiet:
                # each phase's steps at that phase's pace (unlikelihood steps decode: slower),
                # stretched by the share of time spent outside steps (evaluations, saves)
                pace = [phase_s[i] / phase_steps[i] if phase_steps[i] else phase_s[1 - i] / phase_steps[1 - i]
                        for i in (0, 1)]
                left = (max(0, first_unlikelihood - done), min(cfg.unlikelihood_steps, cfg.max_steps - done))
                eta = (left[0] * pace[0] + left[1] * pace[1]) * elapsed / training_s
                repeats = f"repeats {stats['repeat_share']:.0%} " if "repeat_share" in stats else ""
                print(f"\rstep {done}/{cfg.max_steps} loss {stats['ce']:.3f} {repeats}{tokens_per_s:,.0f} tok/s "
                      f"ETA {eta:.0f}s ", end="", file=sys.stderr, flush=True)
            if done % cfg.eval_every == 0 or done == cfg.max_steps:
                result = {"step": done, **evaluate(model, corpus, cfg, device)}  # every rank, same windows
                log({"step": done, "eval": {**result, "compressors": corpus.compressors}})
                if main:
                    print(f"\nstep {done}: {describe_evaluation(result, corpus)}, {tokens_per_s:,.0f} tokens/s",
                          flush=True)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or stats["stop"]:
                distributed.save_checkpoint_once(run, trained, optimizer, done, cfg.keep_checkpoints, ranks,
                                                 extra=dict(micro_batches_per_step=micro_per_step),
                                                 files=tokenizer_files)
            if stats["stop"] and done < cfg.max_steps:
                name = signal.Signals(stop["signal"]).name if stop["signal"] else "a signal"
                if main:
                    print(f"\nstopped by {name} after step {done}; checkpoint saved in {run / 'ckpt'}; "
                          f"continue with: train.py --out {run} --resume", file=sys.stderr, flush=True)
                distributed.shutdown(ranks)
                sys.exit(128 + (stop["signal"] or signal.SIGTERM))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    whole = distributed.full_model(trained, ranks)  # rank 0: the plain model; gathered if split
    if main:
        from moe.training.plots import write_plots
        write_plots(run)
        tokenizer, samples = load_tokenizer(run), []
        for prompt in args.sample or (() if corpus.is_tasks else SAMPLE_PROMPTS):  # tasks: exact match says it
            text = greedy_sample(whole.eval(), tokenizer, prompt)
            samples.append({"prompt": prompt, "text": text, "distinct_4grams": distinct_4grams(text.encode())})
            print(f"sample: {prompt!r} -> {text!r}", flush=True)
        if samples:
            shares = ", ".join(f"{s['distinct_4grams']:.0%}" for s in samples)
            print(f"distinct 4-grams in each sample's first {SAMPLE_BYTES} bytes: {shares} (a loop of one short "
                  "word gives a few percent)", flush=True)
            log({"step": cfg.max_steps, "samples": samples})
    distributed.shutdown(ranks)
    return result


if __name__ == "__main__":
    keep_freed_memory()  # a training process reuses its step buffers (moe/training/loop.py)
    run_main(main, sys.argv[1:])
