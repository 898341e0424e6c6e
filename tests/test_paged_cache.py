import pytest
import torch

from moe.serving.blocks import BlockManager
from moe.serving.cache import PagedKVCache
from tests.conftest import tiny_config


def run_step(model, cache, blocks, seqs):
    """seqs: list of (seq_id, all tokens so far, number of new tokens at the end)."""
    tokens, positions = [], []
    for seq, all_tokens, n_new in seqs:
        blocks.reserve(seq, len(all_tokens))
        tokens += all_tokens[-n_new:]
        positions += range(len(all_tokens) - n_new, len(all_tokens))
    cache.set_layout(blocks, [s for s, _, _ in seqs], [n for _, _, n in seqs],
                     [len(t) for _, t, _ in seqs])
    return model(torch.tensor([tokens]), torch.tensor([positions]), cache).logits[0]  # [N, V]


@torch.no_grad()
def test_ragged_prefill_and_decode_through_pages_equal_full_forwards(make_model):
    model = make_model(seed=2).double()
    cache = PagedKVCache(model.cfg, num_blocks=12, block_size=3, dtype=torch.float64)
    blocks = BlockManager(num_blocks=12, block_size=3)
    a = torch.randint(0, 259, (11,)).tolist()
    b = torch.randint(0, 259, (5,)).tolist()
    c = torch.randint(0, 259, (8,)).tolist()
    full = {name: model(torch.tensor([seq])).logits[0] for name, seq in [("a", a), ("b", b), ("c", c)]}
    # step 1: a in a chunk of 4, b whole; step 2: a 5 more, b decodes one, c whole;
    # step 3: a its last 2, b and c decode one each
    out = run_step(model, cache, blocks, [(0, a[:4], 4), (1, b[:4], 4)])
    torch.testing.assert_close(out[:4], full["a"][:4])
    torch.testing.assert_close(out[4:], full["b"][:4])
    out = run_step(model, cache, blocks, [(0, a[:9], 5), (1, b, 1), (2, c[:7], 7)])
    torch.testing.assert_close(out[:5], full["a"][4:9])
    torch.testing.assert_close(out[5], full["b"][4])
    torch.testing.assert_close(out[6:], full["c"][:7])
    out = run_step(model, cache, blocks, [(0, a, 2), (2, c, 1)])
    torch.testing.assert_close(out[:2], full["a"][9:])
    torch.testing.assert_close(out[2], full["c"][7])


def test_blocks_are_taken_as_sequences_grow_and_returned_on_release():
    blocks = BlockManager(num_blocks=5, block_size=4)
    blocks.reserve(0, 5)
    blocks.reserve(1, 4)
    assert blocks.used_blocks == 3 and blocks.can_hold(1, 12) and not blocks.can_hold(1, 13)
    blocks.reserve(0, 8)
    assert len(blocks.tables[0]) == 2 and blocks.used_blocks == 3
    with pytest.raises(RuntimeError, match="preempt"):
        blocks.reserve(1, 20)
    blocks.release(0)
    assert blocks.used_blocks == 1 and 0 not in blocks.tables


def test_multi_query_blocks_hold_n_heads_times_more_tokens_in_the_same_memory():
    mqa, mha = tiny_config(n_heads=4, n_kv_heads=1), tiny_config(n_heads=4, n_kv_heads=4)
    budget = 1 << 20
    blocks_mqa = PagedKVCache.from_memory(mqa, budget, block_size=8).num_blocks
    blocks_mha = PagedKVCache.from_memory(mha, budget, block_size=8).num_blocks
    assert blocks_mqa == 4 * blocks_mha
    assert blocks_mqa * PagedKVCache.bytes_per_block(mqa, 8, torch.float32) <= budget


def test_batched_paged_attention_equals_causal_attention_per_sequence():
    from kernels.attention import masked_attention, paged_attention_batched
    torch.manual_seed(0)
    n_blocks, bs, G, H, Dh = 9, 3, 2, 4, 8
    k_pool, v_pool = torch.randn(n_blocks, bs, G, Dh), torch.randn(n_blocks, bs, G, Dh)
    tables = torch.tensor([[4, 0, 7], [2, 8, 0], [5, 1, 3]], dtype=torch.int32)
    seq_lens = torch.tensor([7, 4, 9], dtype=torch.int32)
    query_lens = [3, 1, 5]
    query_start = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    q = torch.randn(9, H, Dh)
    out = paged_attention_batched(q, k_pool, v_pool, tables, seq_lens, query_start)
    for b in range(3):
        n, nq = int(seq_lens[b]), query_lens[b]
        keys = k_pool[tables[b].long()].flatten(0, 1)[:n]  # [S, G, Dh]
        values = v_pool[tables[b].long()].flatten(0, 1)[:n]
        mask = torch.arange(n)[None, :] <= torch.arange(n - nq, n)[:, None]  # [T, S]
        qb = q[query_start[b]:query_start[b + 1]]  # [T, H, Dh]
        expected = masked_attention(qb.transpose(0, 1)[None], keys.permute(1, 0, 2)[None],
                                    values.permute(1, 0, 2)[None], mask[None])[0].transpose(0, 1)
        torch.testing.assert_close(out[query_start[b]:query_start[b + 1]], expected)
