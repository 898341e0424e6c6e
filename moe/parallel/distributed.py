"""Training on several processes: torch.distributed plumbing for train.py.

Why PyTorch's own engine and nothing home-made: `torchrun` starts one process per
device and tells each who it is (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), `init_process_group` connects them (NCCL between GPUs, Gloo on CPU), and
DistributedDataParallel, FSDP2 and the collectives do the rest. This module only picks
and wires those pieces; one process (plain `python train.py`) skips all of it.

Three ways to split the work (train.parallel, train.py --expert-parallel):

- "ddp" (default): every rank holds the whole model and optimiser; DDP all-reduces
  (averages) the gradients during backward, so every rank takes the same step.
- "fsdp": FSDP2 `fully_shard` per block, then the root: parameters, gradients and
  optimiser moments are sharded over the ranks and gathered block by block for the
  forward and backward. For models whose weights and moments do not fit one device.
- expert parallel (moe/parallel/expert_parallel.py): the experts of each MoE layer are split
  over groups of D ranks and tokens travel to their experts with all_to_all; everything
  else is replicated as in DDP.

Batches: rank r's micro-batch i at step s is batch index (s * grad_accum + i) * W + r
of moe.training.data.get_batch (W ranks), so a step consumes W * grad_accum batches of
train.batch_size sequences, every rank a different one, and one process (W = 1) reads
exactly the batches it always did. Two ranks with batch B each therefore see the same
data as one process with grad_accum = 2 and batch B.

Checkpoints are written once, by rank 0, in the one-process format: the full model
(moe.io.checkpoint.load_model and generate.py read it in one process) and the optimiser
state keyed by parameter index as a plain optimizer.state_dict() would hold it, with
full (unsharded) moments. So a run saved at one world size resumes at any other, with
any of the three modes. Every rank resumes from the same files (on several nodes the
run folder must be on a shared filesystem). The random generators are the same on
every rank (same seed, same draws), so rank 0's state is the state of all.

Shapes: none here; this module moves whole models and state dicts.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from moe.config import ConfigError, TrainConfig
from moe.model.transformer import Transformer
from moe.training.loop import save_checkpoint

FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class Ranks:
    """Who this process is among the W processes of a run (W = 1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    parallel: str = "none"  # "none" (one process) | "ddp" | "fsdp" | "expert"
    expert_parallel: int = 1  # D, ranks that share one MoE layer's experts
    plan: object | None = None  # moe.parallel.expert_parallel's plan, once the model is split

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(cfg: TrainConfig, expert_parallel: int = 1) -> Ranks:
    """Read torchrun's environment and join the process group (NCCL on CUDA, Gloo on CPU).
    Without torchrun (no WORLD_SIZE, or 1) nothing is initialised and the run is one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = \"cuda\" but no CUDA device is visible; use \"auto\" or \"cpu\"")
    if expert_parallel < 1 or world_size % expert_parallel:
        raise ConfigError(f"--expert-parallel {expert_parallel} must divide the number of processes "
                          f"({world_size}): launch torchrun with --nproc-per-node (x --nnodes) a "
                          "multiple of it")
    if expert_parallel > 1 and cfg.parallel == "fsdp":
        raise ConfigError("train.parallel = \"fsdp\" cannot be combined with --expert-parallel: "
                          "expert parallel replicates the non-expert weights as DDP does; drop one")
    if world_size > 1 and cfg.compile and (cfg.parallel == "fsdp" or expert_parallel > 1):
        raise ConfigError("train.compile = true is supported with one process or DDP only; "
                          "set train.compile=false for fsdp or expert parallel")
    if world_size == 1:
        return Ranks(device=torch.device("cuda" if cuda else "cpu"))
    # a rank that hangs (or dies without the launcher noticing) ends the others' wait here,
    # not after the backend's default of 30 minutes or more
    timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=timeout)
    parallel = "expert" if expert_parallel > 1 else cfg.parallel
    return Ranks(rank, world_size, local_rank, device, parallel, expert_parallel)


def shutdown(ranks: Ranks) -> None:
    """Leave together: a rank that tears its group down while another still works (rank 0
    writing plots and the sample) can abort at exit."""
    if ranks.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.distributed:
        dist.barrier()


def batch_index(step: int, micro: int, grad_accum: int, ranks: Ranks) -> int:
    """Index (for moe.training.data.get_batch) of this rank's micro-batch `micro` of step `step`."""
    return (step * grad_accum + micro) * ranks.world_size + ranks.rank


# ---------------------------------------------------------------------------------------
# Wrapping the model
# ---------------------------------------------------------------------------------------

def parallelize(model: Transformer, ranks: Ranks) -> nn.Module:
    """The module to train: `model` itself (one process; FSDP2 and expert parallel change it
    in place) or a DDP wrapper around it. Build the optimiser after this, over `model`."""
    if not ranks.distributed:
        return model
    if ranks.parallel == "fsdp":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    if ranks.parallel == "expert":
        from moe.parallel.expert_parallel import apply_expert_parallel
        ranks.plan = apply_expert_parallel(model, ranks.expert_parallel)
        return model
    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def gradient_clipper(model: Transformer, ranks: Ranks):
    """For train_step's `clip_gradients`: None (the plain clip_grad_norm_ is right for one
    process, DDP and FSDP2, whose DTensor norm is global), or for expert parallel a
    function that reduces the gradients inside their groups, then clips by the global norm."""
    if ranks.parallel != "expert":
        return None
    from moe.parallel.expert_parallel import clip_grad_norm, reduce_gradients

    def clip(max_norm: float) -> torch.Tensor:
        reduce_gradients(model, ranks.plan)
        return clip_grad_norm(model, ranks.plan, max_norm)
    return clip


def summer(ranks: Ranks):
    """A function that sums a float64 tensor over the ranks (None in one process)."""
    if not ranks.distributed:
        return None

    def summed(values: torch.Tensor) -> torch.Tensor:
        values = values.to(ranks.device) if ranks.device.type == "cuda" else values.clone()
        dist.all_reduce(values)
        return values.cpu()
    return summed


def mean_over_ranks(stats: dict, keys: tuple[str, ...], ranks: Ranks) -> dict:
    """`stats` with `keys` averaged over the ranks (the loss of the whole global batch)."""
    if not ranks.distributed:
        return stats
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    if ranks.device.type == "cuda":
        values = values.to(ranks.device)
    dist.all_reduce(values)
    return {**stats, **{k: v / ranks.world_size for k, v in zip(keys, values.tolist())}}


# ---------------------------------------------------------------------------------------
# Full state: what rank 0 writes, in the one-process format
# ---------------------------------------------------------------------------------------

def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter name of each optimiser index (groups in order, as state_dict numbers them)."""
    names = {id(p): name for name, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _keyed_by_index(state: dict, names: list[str]) -> dict:
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: s for name, s in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def _keyed_by_name(state: dict, names: list[str]) -> dict:
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, ranks: Ranks) -> tuple[dict, dict]:
    """(model state dict, optimiser state dict) as one process would hold them (optimizer
    None: the model's only). A collective: every rank must call it; rank 0's is complete."""
    plain = model.module if isinstance(model, DistributedDataParallel) else model
    if ranks.parallel == "fsdp":
        plain.reshard()  # the root stays unsharded after a forward without backward (evaluation)
        model_state = get_model_state_dict(plain, options=FULL_ON_CPU)
        if optimizer is None:
            return model_state, {}
        names = _optimizer_names(plain, optimizer)
        optimizer_state = get_optimizer_state_dict(plain, optimizer, options=FULL_ON_CPU)
        return model_state, (_keyed_by_index(optimizer_state, names) if ranks.is_main else {})
    if ranks.parallel == "expert":
        from moe.parallel.expert_parallel import full_optimizer_state_dict, full_state_dict
        optimizer_state = full_optimizer_state_dict(optimizer, ranks.plan) if optimizer is not None else {}
        return full_state_dict(plain, ranks.plan), optimizer_state
    return plain.state_dict(), optimizer.state_dict() if optimizer is not None else {}


def full_model(model: nn.Module, ranks: Ranks) -> Transformer | None:
    """A plain one-process Transformer with the trained weights, on rank 0 (None elsewhere).
    A collective under fsdp and expert parallel: every rank must call it."""
    plain = model.module if isinstance(model, DistributedDataParallel) else model
    if ranks.parallel in ("none", "ddp"):
        return plain if ranks.is_main else None
    state, _ = full_state(model, None, ranks)
    if not ranks.is_main:
        return None
    copy = Transformer(plain.cfg).to(ranks.device)
    copy.load_state_dict(state)
    return copy


def save_checkpoint_once(run: Path, model: nn.Module, optimizer, step: int, keep: int, ranks: Ranks,
                         extra: dict | None = None, files: list[Path] = ()) -> None:
    """moe.training.loop.save_checkpoint, written by rank 0 only from the full state; the other
    ranks wait at a barrier, so none goes on (or reads it) before it is complete."""
    if not ranks.distributed:
        save_checkpoint(run, model, optimizer, step, keep, extra=extra, files=files)
        return
    model_state, optimizer_state = full_state(model, optimizer, ranks)
    if ranks.is_main:
        plain = model.module if isinstance(model, DistributedDataParallel) else model
        if ranks.parallel == "ddp":
            save_checkpoint(run, plain, optimizer, step, keep, extra=extra, files=files)
        else:
            copy = Transformer(plain.cfg)
            copy.load_state_dict(model_state)
            save_checkpoint(run, copy, None, step, keep, optimizer_state=optimizer_state, extra=extra,
                            files=files)
    barrier(ranks)


def load_optimizer_state(model: nn.Module, optimizer, state: dict, ranks: Ranks) -> None:
    """Fill an optimiser built over the parallelized model from a one-process state dict."""
    plain = model.module if isinstance(model, DistributedDataParallel) else model
    if ranks.parallel == "fsdp":
        named = _keyed_by_name(state, _optimizer_names(plain, optimizer))
        set_optimizer_state_dict(plain, optimizer, named, options=StateDictOptions(full_state_dict=True))
    elif ranks.parallel == "expert":
        from moe.parallel.expert_parallel import load_full_optimizer_state_dict
        load_full_optimizer_state_dict(optimizer, ranks.plan, state)
    else:
        optimizer.load_state_dict(state)
