"""moe.training.unlikelihood: which decoded tokens count as repeats, the loss they get,
the batched greedy decoding against the one-request reference, and that a step of it
makes the model's own repeats less likely."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch

from moe.config import ConfigError, DataConfig, TrainConfig
from moe.model.transformer import Transformer
from moe.serving.generation import generate
from moe.serving.sampling import SamplingParams
from moe.training.loop import make_optimizer, train_step
from moe.training.unlikelihood import (greedy_continuations, prefix_length, repeated_ngrams,
                                       unlikelihood_loss, unlikelihood_term)
from tests.conftest import tiny_config
from train import check_fits


def test_repeated_ngrams_marks_every_token_of_a_repeat_after_the_prefix_only():
    seq = torch.tensor([[1, 2, 1, 2, 1, 3, 1, 2],
                        [5, 6, 7, 8, 9, 1, 2, 3]])
    mask = repeated_ngrams(seq, start=2, n=2)
    # row 0: bigrams (1,2) end at 1, 3, 7; (2,1) at 2, 4; (1,3) at 5; (3,1) at 6
    # repeats end at 3 (1,2), 4 (2,1), 7 (1,2): tokens 2..4 and 6..7, all from start on
    assert mask.tolist()[0] == [False, False, True, True, True, False, True, True]
    assert not mask[1].any()  # no bigram twice
    # a repeat reaching back into the prefix marks only its tokens from `start` on
    assert repeated_ngrams(torch.tensor([[4, 4, 4]]), start=2, n=2).tolist() == [[False, False, True]]


def test_unlikelihood_loss_is_minus_log_one_minus_p_of_the_marked_tokens():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]]))  # [1, 2, 3]
    seq = torch.tensor([[0, 0, 2]])  # predicts 0 (p 0.7) then 2 (p 0.8)
    mask = torch.tensor([[False, True, False]])  # only the first prediction is a repeat
    loss = unlikelihood_loss(logits, seq, mask, start=1)
    assert loss.item() == pytest.approx(-math.log(1 - 0.7) / 2, rel=1e-5)  # 2 tokens from start on
    certain = torch.tensor([[[0.0, -1e4, -1e4], [0.0, 0.0, 0.0]]])
    assert torch.isfinite(unlikelihood_loss(certain, seq, mask, start=1))  # p = 1 stays finite


def test_greedy_continuations_equal_one_request_greedy_decoding():
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    prefix = torch.randint(0, 256, (3, 5))
    model.train()
    out = greedy_continuations(model, prefix, 7)
    assert model.training  # the caller's mode comes back
    for row in range(3):
        expected = generate(model.eval(), prefix[row].tolist(), SamplingParams(max_new_tokens=7))
        assert out[row].tolist() == expected


def test_prefix_lengths_vary_within_bounds_and_repeat_with_the_step():
    cfg = TrainConfig(unlikelihood_steps=1, unlikelihood_prefix=12, seq_len=16)
    lengths = [prefix_length(cfg, step) for step in range(200)]
    assert min(lengths) == 4 and max(lengths) == 12
    assert lengths == [prefix_length(cfg, step) for step in range(200)]


def test_unlikelihood_steps_make_the_models_own_repeats_less_likely_than_plain_steps():
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    cycle = torch.arange(8).repeat(6)[None].expand(4, -1)  # a loop to learn: 0 1 ... 7 0 1 ...
    batch = [(cycle[:, :32], cycle[:, 1:33])]
    plain = TrainConfig(warmup_steps=0, lr=3e-3, max_steps=60, seq_len=32)
    optimizer = make_optimizer(model, plain)
    for step in range(60):
        train_step(model, optimizer, batch, plain, step, torch.device("cpu"))
    cfg = TrainConfig(warmup_steps=0, lr=3e-3, min_lr=3e-3, max_steps=20, seq_len=32, unlikelihood_steps=20,
                      unlikelihood_prefix=8, unlikelihood_tokens=16, unlikelihood_ngram=4, unlikelihood_weight=4.0)
    _, start_share = unlikelihood_term(model, model, cycle[:, :32], cfg, 0)
    assert start_share > 0.5  # the learnt loop: greedy decoding repeats the cycle
    penalties = []
    for unlikelihood in (False, True):  # the same 20 steps on the loop, without and with the term
        trained = copy.deepcopy(model)
        optimizer = make_optimizer(trained, cfg)
        for step in range(20):
            stats = train_step(trained, optimizer, batch, cfg, step, torch.device("cpu"), unlikelihood=unlikelihood)
            assert ("repeat_share" in stats) == unlikelihood
        penalties.append(unlikelihood_term(trained, trained, cycle[:, :32], cfg, 0)[0].item())
    assert penalties[1] < 0.6 * penalties[0]


def test_train_refuses_unlikelihood_on_the_task_mix_and_past_the_context():
    model_cfg = tiny_config()
    with pytest.raises(ConfigError, match="task mix"):
        check_fits(model_cfg, TrainConfig(unlikelihood_steps=5, seq_len=64), DataConfig(source="tasks"))
    with pytest.raises(ConfigError, match="exceeds model.max_seq_len"):
        check_fits(model_cfg, TrainConfig(unlikelihood_steps=5, seq_len=32, unlikelihood_prefix=32,
                                          unlikelihood_tokens=model_cfg.max_seq_len), DataConfig(source="stdlib"))
    with pytest.raises(ConfigError, match="unlikelihood_prefix = 64 exceeds train.seq_len"):
        check_fits(model_cfg, TrainConfig(seq_len=32, unlikelihood_steps=5, unlikelihood_prefix=64),
                   DataConfig(source="stdlib"))
    with pytest.raises(ConfigError, match="unlikelihood_steps = 11 .* exceeds train.max_steps = 10"):
        check_fits(model_cfg, TrainConfig(max_steps=10, seq_len=32, unlikelihood_steps=11), DataConfig())
    check_fits(model_cfg, TrainConfig(max_steps=10, seq_len=32, unlikelihood_steps=0), DataConfig())  # off: fine
    with pytest.raises(ConfigError, match="unlikelihood_prefix must be at least 4"):
        TrainConfig(unlikelihood_prefix=3)


def test_train_refuses_unlikelihood_under_torchrun_before_touching_the_run(tmp_path, monkeypatch):
    import train
    launched = SimpleNamespace(distributed=True, device=torch.device("cpu"), is_main=True)
    monkeypatch.setattr(train.distributed, "init", lambda cfg, expert_parallel: launched)
    with pytest.raises(ConfigError, match="one process only"):
        train.main(["--out", str(tmp_path / "run"), "--quiet"])  # the main job: its last 100 steps
    assert not (tmp_path / "run").exists()
