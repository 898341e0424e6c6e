"""Training loop pieces: schedule, optimiser step, evaluation, routing health, checkpoints.

Why resumable to the bit: a run that is killed (SIGKILL, a preempted machine) and resumed
should be the run that was never stopped, or every comparison between runs carries an
invisible asterisk. Everything a step depends on is saved with the weights: optimiser
moments, the step (which fixes the learning rate and, through moe.training.data, the batches) and
the random generators. On CPU in float32 a resumed run's losses equal the uninterrupted
run's exactly (tests/test_training.py kills a real subprocess to check it).

Why routing statistics every few steps: router collapse (a few experts take everything,
the rest die) starts quietly and is expensive to notice late. Per MoE layer we log the
load of each expert, the busiest expert's load over the ideal N*K/E, Jain's fairness
index (1 = even, 1/E = one expert takes all), experts that got no token, the router's
mean entropy, dropped slots and the two router losses.

Checkpoint layout: `RUN/ckpt/step_000100/` holds config.json + model.safetensors (what
moe.io.checkpoint.load_model reads) and train_state.pt; `RUN/ckpt/latest` names the newest
complete one. Each directory is written atomically, then `latest` is replaced
atomically, then checkpoints beyond the newest K (by step number) are deleted, never the
one `latest` names, so a kill at any instant leaves `latest` pointing at a complete
checkpoint; what an interrupted save left behind is swept at the next start. Weights
that are not all finite are never saved. RUN's other files: moe/training/run_folder.py.

Shapes: B batch, T time, V vocab, E experts, K experts per token, N tokens (B*T).
"""

from __future__ import annotations

import ctypes
import math
import random
import re
import shutil
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from moe.io.checkpoint import load_model, write_model
from moe.io.files import CheckpointError, write_directory_atomically, write_text_atomically
from moe.config import TrainConfig
from moe.training.data import TASKS, Corpus, task_batch
from moe.training.unlikelihood import unlikelihood_term
from moe.model.moe_layer import MoELayer, update_balance_bias
from moe.model.transformer import Transformer, model_loss
from moe.tokenizer import PAD

STATE_FILE = "train_state.pt"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine down to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of handing it back to the system.

    Why: by default glibc serves each buffer above 128 KB-32 MB (a batch's logits, a
    layer's activations) with its own mmap and unmaps it when freed, so every training step
    faults the same pages in again, and much of the main job's CPU time went to the kernel
    (benchmarks/bench_train_step.py). Raising the mmap and trim thresholds keeps freed
    buffers in the heap for the next step; the process then holds its peak memory.
    Returns whether it applied (glibc only)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 30))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, which are vectors). Fused on
    every device: on CPU the default is a Python loop over the tensors."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def autocast(device: torch.device):
    """bf16 autocast on GPU; plain fp32 on CPU (so CPU runs are exactly reproducible)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def distillation_loss(logits: Tensor, target_logits: Tensor, temperature: float) -> Tensor:
    """KL(target || model) per token, mean over tokens, scaled by T^2 (Hinton et al.)."""
    log_p = F.log_softmax(logits.float().flatten(0, 1) / temperature, dim=-1)  # [N, V]
    log_q = F.log_softmax(target_logits.float().flatten(0, 1) / temperature, dim=-1)  # [N, V]
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


def unwrap(model) -> Transformer:
    """The Transformer inside a torch.compile and/or DistributedDataParallel wrapper."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = model._orig_mod if hasattr(model, "_orig_mod") else model.module
    return model


def train_step(model, optimizer, micro_batches, cfg: TrainConfig, step: int, device: torch.device,
               teacher: Transformer | None = None,
               clip_gradients: Callable[[float], Tensor] | None = None,
               sum_over_ranks: Callable[[Tensor], Tensor] | None = None,
               unlikelihood: bool = False) -> dict:
    """One optimiser step over `micro_batches` [(inputs [B, T], targets [B, T])], gradients
    averaged over them (so 2 micro-batches of B equal one batch of 2B); a step whose loss
or gradient norm is not finite changes nothing ("skipped": True). Under DDP the
    gradients are all-reduced once, in the last micro-batch's backward. `clip_gradients`
    (max_norm -> global norm) replaces clip_grad_norm_ where gradients need more than that
    (expert parallel: moe.parallel.distributed.gradient_clipper); `sum_over_ranks` makes the
    routing statistics those of the global batch (moe.parallel.distributed.summer).
    `unlikelihood` adds, per micro-batch, cfg.unlikelihood_weight times the unlikelihood
    of the repeats in the model's greedy continuations of its windows
    (moe/training/unlikelihood.py; "unlikelihood" and "repeat_share" in the result)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "ce": 0.0, "aux": 0.0, "z": 0.0, "kl": 0.0}
    if unlikelihood:
        totals.update(unlikelihood=0.0, repeat_share=0.0)
    routing = []
    model_cfg = unwrap(model).cfg
    for index, (inputs, targets) in enumerate(micro_batches):
        inputs, targets = inputs.to(device), targets.to(device)
        last = index == len(micro_batches) - 1
        with nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(device):
                output = model(inputs)
                loss = model_loss(model_cfg, output, targets)
                total = loss.total
                if teacher is not None:
                    with torch.no_grad():
                        target_logits = teacher(inputs).logits
                    kl = distillation_loss(output.logits, target_logits, cfg.distill_temperature)
                    total = total + cfg.distill_weight * kl
                    totals["kl"] += kl.item() / len(micro_batches)
                if unlikelihood:
                    penalty, share = unlikelihood_term(model, unwrap(model), inputs, cfg, step)
                    total = total + cfg.unlikelihood_weight * penalty
                    totals["unlikelihood"] += penalty.item() / len(micro_batches)
                    totals["repeat_share"] += share / len(micro_batches)
            (total / len(micro_batches)).backward()
        for key, value in (("loss", total), ("ce", loss.cross_entropy), ("aux", loss.aux), ("z", loss.z)):
            totals[key] += value.item() / len(micro_batches)
        routing.append(output.routing)
    max_norm = cfg.grad_clip or float("inf")
    grad_norm = (clip_gradients(max_norm) if clip_gradients is not None
                 else torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    # A non-finite loss or gradient never reaches the weights: the step is skipped (the
    # norm is global, so under DDP every rank skips together).
    totals["skipped"] = not (math.isfinite(totals["loss"]) and bool(torch.isfinite(grad_norm)))
    if totals["skipped"]:
        optimizer.zero_grad(set_to_none=True)
    else:
        optimizer.step()
    totals["grad_norm"] = grad_norm.item()
    totals["lr"] = optimizer.param_groups[0]["lr"]
    counts = routing_counts([stats for r in routing for stats in r], len(routing[0]), sum_over_ranks)
    if not totals["skipped"]:
        balance_experts(unwrap(model), counts)
    totals["routing"] = routing_metrics(counts)
    return totals


def balance_experts(model: Transformer, counts: Tensor | None) -> None:
    """balance = "bias": move each MoE layer's selection bias toward even load, from the
    step's loads `counts` [L, E + 3] (routing_counts: every micro-batch and rank)."""
    if counts is None or model.cfg.balance != "bias":
        return
    layers = [block.ffn for block in model.blocks if isinstance(block.ffn, MoELayer)]
    for layer, row in zip(layers, counts):
        update_balance_bias(layer, row[:-3])


# ---------------------------------------------------------------------------------------
# Routing health
# ---------------------------------------------------------------------------------------

def routing_counts(stats: list, n_layers: int,
                   sum_over_ranks: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
    """Per MoE layer, from the RoutingStats of one step (micro-batches summed, and with
    `sum_over_ranks` the ranks too: the whole global batch's routing, as one process
    accumulating the same micro-batches would see it): [L, E + 3] float64 of expert loads,
    router entropy summed over tokens, tokens, dropped slots; None for a dense model."""
    rows = []
    for layer in range(n_layers):
        mine = stats[layer::n_layers]
        load = torch.stack([s.tokens_per_expert.double().cpu() for s in mine]).sum(0)  # [E]
        probs = torch.cat([s.router_probs.detach().float() for s in mine])  # [N, E]
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # [N]
        rows.append(torch.cat([load, torch.tensor([float(entropy.sum()), entropy.numel(),
                                                   float(sum(s.dropped for s in mine))],
                                                  dtype=torch.float64)]))
    if not rows:  # a dense model
        return None
    raw = torch.stack(rows)  # [L, E + 3]
    return sum_over_ranks(raw) if sum_over_ranks is not None else raw


def routing_metrics(raw: Tensor | None) -> list[dict]:
    """Per MoE layer, from routing_counts: each expert's share of the load, the busiest over
    the ideal, Jain's fairness, dead experts, the router's mean entropy, dropped slots."""
    if raw is None:
        return []
    layers = []
    for row in raw:
        load, (entropy_sum, tokens, dropped) = row[:-3], row[-3:].tolist()
        n_experts = load.numel()
        ideal = load.sum() / n_experts
        layers.append({
            "load": (load / load.sum().clamp_min(1)).tolist(),
            "max_over_ideal": (load.max() / ideal.clamp_min(1e-9)).item(),
            "jain": (load.sum() ** 2 / (n_experts * load.square().sum()).clamp_min(1e-9)).item(),
            "dead": int((load == 0).sum()),
            "entropy": entropy_sum / max(tokens, 1),
            "dropped": int(dropped),
        })
    return layers


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: Transformer, corpus: Corpus, cfg: TrainConfig, device: torch.device) -> dict:
    """Validation loss and bits per byte; for the task mix, exact-match accuracy per task,
    the loss on answer tokens and where each task's tokens were routed (task_report)."""
    model.eval()
    if corpus.is_tasks:
        return task_report(model, corpus, device)
    return text_bits_per_byte(model, corpus, cfg, device)


def text_bits_per_byte(model: Transformer, corpus: Corpus, cfg: TrainConfig, device: torch.device) -> dict:
    """Every token of the validation split predicted once, in consecutive windows of
    train.seq_len (train.eval_batches = 0), or the windows of that many batches spread
    evenly over it. Bits per byte = total nats / ln 2 / bytes those tokens stand for, so it
    compares across tokenizers; with a sample of windows a 95% interval (ratio estimator
    over windows) says how far the whole split may be."""
    tokens, T = corpus.val, cfg.seq_len
    n_windows = max(1, math.ceil((len(tokens) - 1) / T))
    windows = np.arange(n_windows)
    if cfg.eval_batches and cfg.eval_batches * cfg.batch_size < n_windows:
        windows = np.linspace(0, n_windows - 1, cfg.eval_batches * cfg.batch_size).round().astype(np.int64)
    nats = np.zeros(len(windows))
    nbytes = np.zeros(len(windows))
    ntokens = np.zeros(len(windows))
    fits = [w * T + T + 1 <= len(tokens) for w in windows]  # only the split's last window is short
    full = [i for i, ok in enumerate(fits) if ok]
    batch = 4 * cfg.batch_size
    groups = [full[i:i + batch] for i in range(0, len(full), batch)] + [[i] for i, ok in enumerate(fits) if not ok]
    for group in groups:
        rows = [np.asarray(tokens[windows[i] * T:windows[i] * T + T + 1], dtype=np.int64) for i in group]
        window = torch.from_numpy(np.stack(rows))  # [b, t+1]; t = T except the split's last window
        with autocast(device):
            logits = model(window[:, :-1].to(device)).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].to(device).flatten(),
                               reduction="none").view(len(group), -1)  # [b, t]
        nats[group] = loss.sum(-1).double().cpu().numpy()
        ntokens[group] = loss.shape[1]
        nbytes[group] = corpus.token_bytes[window[:, 1:].numpy()].sum(-1)
    bpb = nats.sum() / math.log(2) / max(nbytes.sum(), 1)
    result = {"val_loss": float(nats.sum() / ntokens.sum()),
              "val_bpb": float(bpb), "val_bytes": int(nbytes.sum()),
              "val_share": float(len(windows) / n_windows)}
    if len(windows) < n_windows:
        residual = nats / math.log(2) - bpb * nbytes
        result["val_bpb_ci95"] = float(1.96 * residual.std(ddof=1) / (nbytes.mean() * math.sqrt(len(windows))))
    return result


@torch.no_grad()
def task_report(model: Transformer, corpus: Corpus, device: torch.device, batch: int = 64) -> dict:
    """On every held-out example: exact match per task (teacher-forced argmax, see
    moe.training.data), the loss on answer tokens, and per MoE layer the routing counts
    task x expert and token x task x expert, from which routing_information finds how much
    the expert choice says about the task, beyond what the token itself says."""
    correct = np.zeros(len(TASKS))
    count = np.zeros(len(TASKS))
    nats, answer_tokens = 0.0, 0
    layers, V, E = len(model.cfg.moe_layers), model.cfg.vocab_size, model.cfg.n_experts
    routing = torch.zeros(layers, V, len(TASKS), E, dtype=torch.float64)  # [L, V, tasks, E]
    for start in range(0, len(corpus.val_examples), batch):
        indices = np.arange(start, min(start + batch, len(corpus.val_examples)))
        inputs, targets, tasks = task_batch(corpus, indices)
        with autocast(device):
            output = model(inputs.to(device))
        targets = targets.to(device)
        answer = targets != -100
        hit = ((output.logits.argmax(-1) == targets) | ~answer).all(-1).cpu()  # [B]
        nats += F.cross_entropy(output.logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
        answer_tokens += int(answer.sum())
        np.add.at(correct, tasks.numpy(), hit.numpy())
        np.add.at(count, tasks.numpy(), 1)
        token_task = tasks[:, None].expand_as(inputs).flatten()  # [N]
        real = inputs.flatten() != PAD
        token, task = inputs.flatten()[real], token_task[real]
        for layer, stats in enumerate(output.routing):
            ids = stats.expert_ids.cpu()[real]  # [n, K]; expert choice: [n, E], -1 = not taken
            for k in range(ids.shape[1]):
                taken = ids[:, k] >= 0
                routing[layer].index_put_((token[taken], task[taken], ids[taken, k]),
                                          torch.ones(int(taken.sum()), dtype=torch.float64), accumulate=True)
    result = {f"acc_{task}": float(c / max(n, 1)) for task, c, n in zip(TASKS, correct, count)}
    result["acc_mean"] = float(np.mean(correct / np.maximum(count, 1)))  # each task counts the same
    result["val_loss"] = nats / max(answer_tokens, 1)  # answer tokens: one byte each, or EOS
    result["val_bpb"] = result["val_loss"] / math.log(2)
    if layers:
        result["task_routing"] = routing.sum(1).tolist()  # [L, tasks, E]
        result.update(routing_information(routing))
    return result


def routing_information(counts: Tensor) -> dict:
    """From counts [L, V, tasks, E] of (token, task, expert) routing slots, per layer in bits:
    I(task; expert), and I(task; expert | token) = sum_v p(v) I(task; expert | token = v),
    which leaves out what the expert choice says about the task only because tokens differ
    by task (digits are sorted and added, letters copied). Plug-in estimates: with few
    slots per (token, task) cell they read high, so `shuffled` gives the same conditional
    figure with the task labels permuted among each token's slots (what no routing could
    know; its value is the estimator's bias)."""
    def mutual_information(joint: Tensor) -> Tensor:  # [..., A, B] counts -> [...] bits
        total = joint.sum((-1, -2), keepdim=True).clamp_min(1e-12)
        p = joint / total
        outer = p.sum(-1, keepdim=True) * p.sum(-2, keepdim=True)
        terms = torch.where(p > 0, p * (p / outer.clamp_min(1e-30)).log2(), torch.zeros_like(p))
        return terms.sum((-1, -2))

    def conditional(c: Tensor) -> Tensor:  # [L, V, tasks, E] -> [L]
        weight = c.sum((-1, -2)) / c.sum((-1, -2, -3)).clamp_min(1e-12)[:, None]  # [L, V] p(token)
        return (weight * mutual_information(c)).sum(-1)

    generator = torch.Generator().manual_seed(0)
    shuffled = torch.zeros_like(counts)
    for layer, token in zip(*torch.nonzero(counts.sum((-1, -2)), as_tuple=True)):
        cell = counts[layer, token]  # [tasks, E]: expand to slots, permute the task labels
        tasks, experts = torch.nonzero(cell, as_tuple=True)
        repeats = cell[tasks, experts].long()
        tasks, experts = tasks.repeat_interleave(repeats), experts.repeat_interleave(repeats)
        tasks = tasks[torch.randperm(len(tasks), generator=generator)]
        shuffled[layer, token].index_put_((tasks, experts), torch.ones(len(tasks), dtype=counts.dtype),
                                          accumulate=True)
    return {"task_expert_mi_bits": mutual_information(counts.sum(1)).tolist(),
            "task_expert_mi_given_token_bits": conditional(counts).tolist(),
            "task_expert_mi_given_token_shuffled_bits": conditional(shuffled).tolist()}


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_NAME = re.compile(r"step_(\d+)")


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """RUN's complete checkpoints as (step, folder), oldest first, ordered by the step number
    (a text sort would put step_1000000 before step_999999)."""
    found = []
    for path in (run / "ckpt").glob("step_*"):
        match = CHECKPOINT_NAME.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_name(run: Path) -> str | None:
    pointer = run / "ckpt" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def sweep_leftovers(run: Path) -> list[Path]:
    """Remove what interrupted saves left in RUN/ckpt (partial `.step_*.tmp-*` folders, old
    copies `.step_*.old-*`, `.latest.tmp-*` pointers); the paths removed."""
    leftovers = [p for pattern in (".step_*.tmp-*", ".step_*.old-*", ".latest.tmp-*")
                 for p in (run / "ckpt").glob(pattern)]
    for path in leftovers:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return leftovers


def non_finite_weights(model: Transformer) -> int:
    """How many weights are NaN or infinite."""
    return sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())


def save_checkpoint(run: Path, model: Transformer, optimizer, step: int, keep: int,
                    optimizer_state: dict | None = None, extra: dict | None = None,
                    files: list[Path] = ()) -> Path:
    """Write RUN/ckpt/step_XXXXXX atomically, point `latest` at it, keep the newest `keep`
    by step number (never the one `latest` names). Weights that are not all finite are
    refused: a bad checkpoint must never replace or rotate away good ones.
    `optimizer_state` replaces optimizer.state_dict() (moe.parallel.distributed passes the full one);
    `extra` is stored beside it (train.py: the micro-batches per step, for a resume at
    another world size); `files` are copied in (the run's tokenizer.json, so a checkpoint
    is all that generation needs)."""
    bad = non_finite_weights(model)
    if bad:
        raise CheckpointError(f"step {step}: {bad} weights are NaN or infinite, so no checkpoint "
                              f"was written; the last good one is {run / 'ckpt' / str(latest_name(run))}; "
                              "lower train.lr or raise train.warmup_steps and resume from it")
    ckpt = run / "ckpt"
    name = f"step_{step:06d}"
    state = {"step": step, "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
             "rng": rng_state(), **(extra or {})}

    def write(tmp: Path) -> None:
        write_model(model, tmp, metadata={"step": str(step)})
        torch.save(state, tmp / STATE_FILE)
        for file in files:
            shutil.copyfile(file, tmp / Path(file).name)
    path = write_directory_atomically(ckpt / name, write)
    write_text_atomically(ckpt / "latest", name + "\n")
    for _, old in checkpoints(run)[:-keep]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _read_state(step_dir: Path, model: Transformer, device: torch.device) -> dict:
    loaded = load_model(step_dir, device=device)  # refuses broken tensors
    try:
        state = torch.load(step_dir / STATE_FILE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as error:
        raise CheckpointError(f"{step_dir / STATE_FILE} cannot be read ({error})") from None
    model.load_state_dict(loaded.state_dict())
    return state


def read_checkpoint(run: Path, model: Transformer, device: torch.device,
                    step: int | None = None) -> dict:
    """Fill `model` with the weights of one of RUN's checkpoints; its train state (step,
    optimizer state dict, rng) for the caller to apply. `step` picks a checkpoint; without
    it the one `latest` names, or, when that one is missing or broken, the newest good one
    (with a warning)."""
    found = dict(checkpoints(run))
    if step is not None:
        if step not in found:
            steps = ", ".join(str(s) for s in found) or "none"
            raise CheckpointError(f"{run} has no checkpoint of step {step} (it has: {steps}); "
                                  "pick one of those with --resume-from")
        return _read_state(found[step], model, device)
    latest = latest_name(run)
    if latest is None and not found:
        raise CheckpointError(f"{run} has no checkpoint to resume ({run / 'ckpt' / 'latest'} is "
                              "missing); start without --resume or give the run folder with --out")
    order = sorted(found.items(), key=lambda item: (item[1].name != latest, -item[0]))
    problems = []
    for _, step_dir in order:
        try:
            state = _read_state(step_dir, model, device)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        if problems or step_dir.name != latest:
            print(f"warning: ckpt/latest ({latest}) cannot be loaded ({'; '.join(problems) or 'missing'}); "
                  f"resuming from {step_dir.name} instead", file=sys.stderr)
        return state
    raise CheckpointError(f"no checkpoint of {run} can be loaded: {'; '.join(problems)}")
