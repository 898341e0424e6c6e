"""Prefix caching (moe/serving/blocks.py) is exact: requests that share a prompt prefix reuse
its K/V blocks, and the outputs equal those of the engine without the cache and of
one-request generation, token for token, under preemption and random schedules."""

import pytest
import torch

from moe.serving.blocks import BlockManager
from moe.serving.engine import Engine, EngineConfig
from moe.serving.generation import generate
from moe.serving.sampling import SamplingParams
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def model():
    from moe.model.transformer import Transformer
    torch.manual_seed(5)
    return Transformer(tiny_config()).eval().double()


def shared_prefix_workload(n, prefix_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 256, (prefix_len,), generator=g).tolist()
    prompts = [prefix + torch.randint(0, 256, (int(torch.randint(1, 6, (1,), generator=g)),),
                                      generator=g).tolist() for _ in range(n)]
    params = [SamplingParams(max_new_tokens=int(torch.randint(1, 12, (1,), generator=g)),
                             ignore_eos=True) for _ in range(n)]
    return prompts, params


def run(engine, prompts, params, arrive_every):
    requests, pending, step = [], list(zip(prompts, params)), 0
    while pending or engine.has_unfinished():
        if pending and step % arrive_every == 0:
            requests.append(engine.add_request(*pending.pop(0)))
        engine.step()
        step += 1
    return requests


def test_shared_prefixes_are_computed_once_and_outputs_stay_exact(model):
    prompts, params = shared_prefix_workload(10, 21)
    expected = [generate(model, p, s) for p, s in zip(prompts, params)]
    outputs = {}
    for caching in (False, True):
        engine = Engine(model, EngineConfig(max_num_seqs=3, max_num_batched_tokens=16, block_size=4,
                                            num_blocks=40, prefix_caching=caching))
        requests = run(engine, prompts, params, arrive_every=3)
        outputs[caching] = [r.output for r in requests]
        assert engine.blocks.used_blocks == 0
        if caching:  # 5 full blocks of the prefix, found by every request after the first
            assert engine.blocks.prefix_hits >= 5 * 8
    assert outputs[True] == outputs[False] == expected


@pytest.mark.parametrize("seed", range(12))
def test_random_schedules_with_preemption_stay_exact_with_prefix_caching(model, seed):
    g = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))
    prompts, params = shared_prefix_workload(8, pick(3, 20), seed=seed)
    expected = [generate(model, p, s) for p, s in zip(prompts, params)]
    block_size = pick(1, 6)
    largest = max(len(p) + s.max_new_tokens for p, s in zip(prompts, params))
    engine = Engine(model, EngineConfig(max_num_seqs=pick(1, 6), max_num_batched_tokens=pick(4, 30),
                                        prefill_chunk=pick(1, 10), block_size=block_size,
                                        num_blocks=-(-largest // block_size) + pick(0, 8)))
    requests = run(engine, prompts, params, arrive_every=pick(1, 3))
    assert [r.output for r in requests] == expected
    assert engine.blocks.used_blocks == 0


def test_evictions_take_never_used_blocks_first_then_the_least_recently_used():
    blocks = BlockManager(num_blocks=4, block_size=2, prefix_caching=True)
    for seq, tokens in ((0, [1, 2, 3, 4, 9]), (1, [5, 6, 7])):
        blocks.reserve(seq, len(tokens))
        blocks.commit(seq, tokens, len(tokens) - 1)  # the last token is still to compute
        blocks.release(seq)
    assert blocks.used_blocks == 0 and len(blocks.evictable) == 3 and len(blocks.free_blocks) == 1
    assert blocks.match_prefix(2, [1, 2, 3, 4, 8]) == 4  # [1 2][3 4] found
    blocks.release(2)  # now [5 6] is the least recently used
    blocks.reserve(3, 4)  # the free block, then [5 6] is evicted
    assert blocks.match_prefix(4, [5, 6, 7]) == 0 and blocks.match_prefix(5, [1, 2, 3, 4, 9]) == 4


def test_a_hash_collision_never_shares_a_block(monkeypatch):
    blocks = BlockManager(num_blocks=6, block_size=2, prefix_caching=True)
    monkeypatch.setattr(blocks, "_name", lambda parent, tokens: 7)  # every block the same name
    blocks.reserve(0, 3)
    blocks.commit(0, [1, 2, 3], 2)
    assert blocks.match_prefix(1, [4, 5, 6]) == 0  # same name, other tokens: not shared
    assert blocks.match_prefix(2, [1, 2, 6]) == 2
