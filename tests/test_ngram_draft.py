import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from moe.serving.generation import generate
from moe.serving.ngram_draft import (NgramDraft, NgramProposer, build_ngram_draft, max_order_for,
                                     mean_distributions, own_continuations)
from moe.serving.sampling import SamplingParams, sample_at, warp_probs
from moe.serving.speculative import SpeculativeStats, repeat_continuation, speculative_generate
from tests.conftest import ONE_THREAD, ROOT, train_tiny_run

VOCAB = 24
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)
SMALL = dict(continuations=6, prompt_len=8, new_tokens=24)  # a few continuations of the target's own


@pytest.fixture
def target(make_model):
    return make_model(seed=0, vocab_size=VOCAB).double()


def training_text(n: int = 2000, seed: int = 0) -> np.ndarray:
    """Tokens with structure (a repeated motif with noise), so contexts recur."""
    g = np.random.default_rng(seed)
    motif = g.integers(0, VOCAB, 7)
    return np.where(g.random(n) < 0.7, np.resize(motif, n), g.integers(0, VOCAB, n)).astype(np.uint16)


@torch.no_grad()
def test_the_table_holds_the_models_most_frequent_guess_after_each_context(target):
    tokens, window = training_text(), 16
    draft = build_ngram_draft(target, tokens, max_order=2, window=window, batch_size=7, continuations=0)
    windows = torch.from_numpy(tokens[:len(tokens) // window * window].astype(np.int64)).view(-1, window)
    guesses = target(windows).logits.argmax(-1)
    counts = {1: {}, 2: {}}
    for row, guess in zip(windows.tolist(), guesses.tolist()):
        for p in range(window):
            for n in (1, 2):
                if p >= n - 1:
                    counts[n].setdefault(tuple(row[p - n + 1:p + 1]), Counter())[guess[p]] += 1
    for n in (1, 2):
        expected = {ctx: min(c, key=lambda t: (-c[t], t)) for ctx, c in counts[n].items()}  # ties: smaller id
        keys = draft.keys[n - 1].tolist()
        assert len(keys) == len(expected) and keys == sorted(keys)
        for ctx, token in expected.items():
            key = ctx[0] if n == 1 else ctx[0] * VOCAB + ctx[1]
            assert draft.next[n - 1][keys.index(key)] == token


def test_contexts_of_the_targets_own_continuations_take_what_it_wrote_after_them(target):
    tokens = training_text()
    corpus_only = build_ngram_draft(target, tokens, max_order=3, window=32, continuations=0)
    flat = tokens[:len(tokens) // 32 * 32].astype(np.int64)  # what the build reads
    seqs = own_continuations(target, flat, corpus_only, 6, prompt_len=8, new_tokens=24, seed=1)
    for seq in seqs:  # speculative with the table, yet plain greedy
        assert seq[8:] == generate(target, seq[:8], SamplingParams(max_new_tokens=24, ignore_eos=True))
    table = build_ngram_draft(target, tokens, max_order=3, window=32, seed=1, **SMALL)
    followers = defaultdict(set)
    for seq in seqs:
        for i in range(8, len(seq)):
            followers[tuple(seq[i - 3:i])].add(seq[i])
    changed = 0
    for seq in seqs:
        for i in range(8, len(seq)):
            assert table.next_token(seq[:i]) in followers[tuple(seq[i - 3:i])]
            changed += table.next_token(seq[:i]) != corpus_only.next_token(seq[:i])
    assert changed > 0


def test_the_next_token_comes_from_the_longest_context_the_table_knows():
    v = 10
    draft = NgramDraft(v, keys=[np.array([1, 2, 3, 5]), np.array([1 * v + 2])],
                       next=[np.array([7, 8, 9, 3]), np.array([5])])
    assert draft.next_token([4, 1, 2]) == 5  # the bigram (1, 2)
    assert draft.next_token([4, 3, 2]) == 8  # no bigram (3, 2): the unigram 2
    assert draft.next_token([6]) is None
    assert draft.continuation([1, 2], 3) == [5, 3, 9]  # each guess is fed back in as context
    assert draft.continuation([6], 3) == []
    assert draft.known_order([4, 1, 2]) == 2 and draft.known_order([4, 3, 2]) == 1 and draft.known_order([6]) == 0


def test_the_ngram_proposer_copies_the_sequence_only_where_it_repeats_more_than_the_table_knows():
    v = 10
    draft = NgramDraft(v, keys=[np.array([1, 2, 3, 5]), np.array([1 * v + 2])],
                       next=[np.array([7, 8, 9, 3]), np.array([5])])
    proposer = NgramProposer(draft)
    # the tail (7, 1, 2) recurs: three tokens beat the table's bigram (1, 2); then the table
    assert proposer.lookup([7, 1, 2, 6, 7, 1, 2], 6) == [6, 7, 1, 2, 5, 3]
    # the tail (1, 2) recurs, but the table knows that bigram too: the table's guess, not the copy
    assert proposer.lookup([1, 2, 3, 1, 2], 4) == [5, 3, 9]
    # the tail (3, 2) recurs and the table knows only the unigram (2): the copy
    assert proposer.lookup([3, 2, 8, 4, 3, 2], 2) == [8, 4]
    assert NgramProposer(draft, max_ngram=1).lookup([3, 2, 8, 4, 3, 2], 2) == [8]  # no copy of one token: the table


def test_prompt_lookup_copies_after_the_latest_occurrence_of_the_longest_repeated_tail():
    seq = [5, 1, 2, 3, 9, 2, 3, 7, 1, 2, 3]
    assert repeat_continuation(seq, 2, 8, 1) == [9, 2]  # (1, 2, 3) at 1..3 beats the later (2, 3)
    assert repeat_continuation(seq, 2, 2, 1) == [7, 1]  # capped at two tokens: the latest (2, 3)
    assert repeat_continuation(seq, 2, 8, 4) == []  # nothing repeats four tokens
    assert repeat_continuation([4, 4, 4], 3, 8, 1) == [4]  # a match may overlap the tail itself


def test_a_contexts_distribution_is_the_mean_of_the_targets_top_k_over_its_occurrences():
    context = np.array([5, 5, 7, 9])
    tokens = np.array([[1, 2], [2, 3], [1, 2], [4, 0]])
    probs = np.array([[0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.7, 0.3]])
    keys, top, mean = mean_distributions(context, tokens, probs, vocab=10, size=2, min_count=1)
    assert keys.tolist() == [5, 7, 9]
    # context 5: token 1 (0.6 + 0) / 2, token 2 (0.4 + 0.5) / 2, token 3 (0 + 0.5) / 2; the two largest
    assert top.tolist() == [[2, 1], [1, 2], [4, 0]]
    assert np.allclose(mean, [[0.45, 0.3], [0.9, 0.1], [0.7, 0.3]])
    chunked = mean_distributions(context, tokens, probs, vocab=10, size=2, min_count=1, chunk=1)
    assert all(np.array_equal(a, b) for a, b in zip(chunked, (keys, top, mean)))  # one context at a time
    keys, top, mean = mean_distributions(context, tokens, probs, vocab=10, size=4, min_count=2)
    assert keys.tolist() == [5]  # seen once: no distribution
    assert top.tolist() == [[2, 1, 3, 0]] and np.allclose(mean, [[0.45, 0.3, 0.25, 0.0]])  # padded with 0


def test_sampled_proposals_are_draws_from_the_tables_distribution_with_the_requests_noise():
    v = 10
    draft = NgramDraft(v, keys=[np.array([1])], next=[np.array([2])],
                       dist_keys=[np.array([1, 2, 3]), np.array([1 * v + 2])],
                       dist_tokens=[np.array([[2, 4, 0], [3, 0, 0], [1, 9, 0]], dtype=np.int32),
                                    np.array([[6, 7, 0]], dtype=np.int32)],
                       dist_probs=[np.array([[0.7, 0.2, 0], [1, 0, 0], [0.5, 0.5, 0]], dtype=np.float32),
                                   np.array([[0.6, 0.4, 0]], dtype=np.float32)])
    params = SamplingParams(temperature=0.7, top_k=5, max_new_tokens=8)
    after_3 = torch.full((v,), -torch.inf)
    after_3[[1, 9]] = torch.tensor([0.5, 0.5]).log()
    assert torch.equal(draft.distribution([5, 3]), after_3)  # log-probabilities, -inf off the kept tokens
    seq, seed, expected = [5, 3], 11, []
    for _ in range(4):  # after (3): {1, 9}; then whatever was drawn decides
        q = draft.distribution(seq + expected)
        if q is None:
            break
        expected.append(sample_at(warp_probs(q[None], params)[0], seed, len(seq) + len(expected)))
    assert draft.sampled_continuation(seq, 4, params, seed) == expected
    assert draft.sampled_continuation([1, 2], 1, params, seed) in ([6], [7])  # the bigram's distribution
    assert draft.sampled_continuation([8], 3, params, seed) == []  # nothing known after 8
    assert draft.sampled_continuation([2], 1, params, seed) == [3]  # one token with all the mass
    assert draft.sampled_continuation([2], 3, params, seed)[:2] in ([3, 1], [3, 9])  # then (3)'s
    proposer = NgramProposer(draft)
    assert proposer.propose_row([5, 3], 4, params, seed) == expected
    assert proposer.propose_row([5, 1], 2, SamplingParams(max_new_tokens=8), seed) == [2]  # greedy: the argmax table
    no_dists = NgramProposer(NgramDraft(v, keys=[np.array([1])], next=[np.array([2])]))
    assert no_dists.propose_row([5, 1], 2, params, seed) == [2]  # a table without them: its fixed guesses


def test_a_sampled_proposal_is_the_draw_sample_at_makes_from_the_whole_vocabulary():
    v = 64
    rng = np.random.default_rng(0)
    tokens = rng.permutation(v)[:6].astype(np.int32)
    probs = np.sort(rng.dirichlet(np.ones(6)))[::-1].astype(np.float32)
    draft = NgramDraft(v, keys=[np.array([1])], next=[np.array([2])], dist_keys=[np.array([1])],
                       dist_tokens=[np.r_[tokens, [0, 0]][None].astype(np.int32)],
                       dist_probs=[np.r_[probs, [0, 0]][None].astype(np.float32)])
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.6, top_k=3),
                   SamplingParams(temperature=1.3, top_p=0.7)):
        drawn = Counter()
        for seed in range(200):
            expected = sample_at(warp_probs(draft.distribution([1])[None], params)[0], seed, 1)
            assert draft.sampled_continuation([1], 1, params, seed) == [expected]
            drawn[expected] += 1
        assert len(drawn) > 1  # the noise decides, not one fixed guess


def test_sampled_proposals_from_distributions_are_accepted_far_more_often_than_fixed_guesses(target):
    text = training_text()
    with_dists = build_ngram_draft(target, text, max_order=3, window=32, **SMALL)
    without = build_ngram_draft(target, text, max_order=3, window=32, dist_size=0, **SMALL)
    assert not without.dist_keys and len(with_dists.dist_keys) == 3
    g = torch.Generator().manual_seed(3)
    batch = [torch.randint(0, VOCAB, (8,), generator=g).tolist() for _ in range(4)]
    sampled = SamplingParams(temperature=1.0, max_new_tokens=40, seed=2, ignore_eos=True)
    acceptance = []
    for table in (with_dists, without):
        stats = SpeculativeStats()
        out, _ = speculative_generate(target, batch, sampled, proposer=NgramProposer(table), gamma=3, stats=stats)
        assert out == [generate(target, p, sampled) for p in batch]
        acceptance.append(stats.verified_acceptance)
    assert acceptance[0] > 2 * acceptance[1]


def test_the_largest_order_keeps_a_key_and_its_token_inside_an_int64():
    for vocab in (24, 259, 4096, 32000):
        n = max_order_for(vocab)
        assert vocab ** (n + 1) < 2**63 <= vocab ** (n + 2)
    assert max_order_for(4096) == 4


def test_a_saved_table_loads_back_equal_and_leaves_no_temporary_file(target, tmp_path):
    draft = build_ngram_draft(target, training_text(), max_order=3, window=32, **SMALL)
    path = tmp_path / "ngram_draft.safetensors"
    draft.save(path, {"checkpoint": "runs/x"})
    back = NgramDraft.load(path)
    assert back.vocab_size == VOCAB and back.max_order == 3
    for a, b in zip(draft.keys + draft.next + draft.dist_keys + draft.dist_tokens,
                    back.keys + back.next + back.dist_keys + back.dist_tokens):
        assert np.array_equal(a, b)
    assert len(back.dist_probs) == 3
    for a, b in zip(draft.dist_probs, back.dist_probs):  # stored in float16
        assert np.allclose(a, b, atol=1e-3)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    old = tmp_path / "before_distributions.safetensors"  # a table saved before they existed
    save_file({"keys_1": draft.keys[0], "next_1": draft.next[0]}, str(old),
              metadata={"vocab_size": str(VOCAB), "max_order": "1"})
    assert NgramDraft.load(old).dist_keys == []


def test_loading_refuses_a_missing_file_a_cut_one_and_one_that_is_not_a_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_ngram_draft.py"):
        NgramDraft.load(tmp_path / "nope.safetensors")
    other = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(other))
    with pytest.raises(ValueError, match="not an n-gram draft"):
        NgramDraft.load(other)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(other.read_bytes()[:20])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        NgramDraft.load(cut)


def test_building_refuses_what_it_cannot_tabulate(target):
    with pytest.raises(ValueError, match="max_order must be between 1 and"):
        build_ngram_draft(target, training_text(), max_order=max_order_for(VOCAB) + 1)
    with pytest.raises(ValueError, match="do not fill one window"):
        build_ngram_draft(target, training_text(10), window=16)
    with pytest.raises(ValueError, match="another tokenizer"):
        build_ngram_draft(target, np.full(64, VOCAB, dtype=np.uint16), window=16)
    with pytest.raises(ValueError, match="dist_min_count at least 1"):
        build_ngram_draft(target, training_text(), window=16, dist_min_count=0)
    with pytest.raises(ValueError, match="leave room"):
        build_ngram_draft(target, training_text(), window=16, prompt_len=64, new_tokens=target.cfg.max_seq_len)


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_speculation_with_the_ngram_draft_equals_plain_decoding_greedy_and_seeded(target, gamma):
    draft = build_ngram_draft(target, training_text(), max_order=3, window=32, **SMALL)
    g = torch.Generator().manual_seed(gamma)
    batch = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist() for n in (1, 5, 11)]
    out, stats = speculative_generate(target, batch, GREEDY, proposer=NgramProposer(draft), gamma=gamma)
    assert out == [generate(target, p, GREEDY) for p in batch]
    assert stats.accepted > 0
    sampled = SamplingParams(temperature=0.9, max_new_tokens=16, seed=5, ignore_eos=True)
    out, _ = speculative_generate(target, batch, sampled, proposer=NgramProposer(draft), gamma=gamma)
    assert out == [generate(target, p, sampled) for p in batch]


def test_the_build_script_writes_a_table_for_a_run_and_refuses_a_folder_that_is_not_one(tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("".join(f"line {i}: the quick brown fox {i * i}\n" for i in range(400)))
    run = tmp_path / "run"
    train_tiny_run(run, data, tmp_path / "cache")

    def build(folder):
        return subprocess.run([sys.executable, "scripts/build_ngram_draft.py", str(folder), "--continuations", "4",
                               "--threads", "1"], cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True,
                              timeout=120)
    done = build(run)
    assert done.returncode == 0, done.stderr
    table = NgramDraft.load(run / "ngram_draft.safetensors")
    assert table.vocab_size == 259 and table.max_order == 4 and len(table.keys[3]) > 0
    refused = build(tmp_path)
    assert refused.returncode != 0 and refused.stderr.startswith("error:") and "setup.json" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_table_built_for_another_vocabulary_is_refused():
    draft = NgramDraft(VOCAB, keys=[np.array([1])], next=[np.array([2])])
    draft.check_vocab(VOCAB, "t.safetensors")
    with pytest.raises(ValueError, match="built for a vocabulary of 24, the model has 259"):
        draft.check_vocab(259, "t.safetensors")
