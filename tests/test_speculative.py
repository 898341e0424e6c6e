import pytest
import torch

from moe.serving.engine import EngineConfig
from moe.serving.generation import generate
from moe.serving.ngram_draft import NgramProposer, build_ngram_draft
from moe.serving.sampling import SamplingParams, draw_tokens, exponential_noise, sample_at, warp_probs
from moe.serving.speculative import PromptLookupProposer, accept, coupled_acceptance, speculative_generate
from moe.serving.speculative_engine import SpeculativeEngine

VOCAB = 24
GREEDY_24 = SamplingParams(max_new_tokens=24, ignore_eos=True)
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)


@pytest.fixture
def models(make_model):
    """A float64 target and a smaller, unrelated (so often wrong) float64 draft."""
    target = make_model(seed=0, vocab_size=VOCAB).double()
    draft = make_model(seed=1, vocab_size=VOCAB, n_layers=1, d_model=16, n_heads=2,
                       moe_every=0, d_ff=16).double()
    return target, draft


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(n)]


class AlwaysWrong:
    """Proposes, at every position, a token the target's greedy choice is not."""

    def __init__(self, target):
        self.target = target

    @torch.no_grad()
    def propose(self, seqs, gammas, params, seeds):
        out = []
        for seq, gamma in zip(seqs, gammas):
            best = int(self.target(torch.tensor([seq])).logits[0, -1].argmax())
            out.append([(best + 1) % VOCAB] * gamma)
        return out

    def accepted(self, row, valid):
        pass

    def keep(self, rows):
        pass


@pytest.mark.parametrize("gamma", range(1, 9))
def test_greedy_speculative_equals_plain_greedy_for_every_gamma(models, gamma):
    target, draft = models
    batch = prompts(3, seed=gamma)
    reference = [generate(target, p, GREEDY) for p in batch]
    one_by_one = [speculative_generate(target, [p], GREEDY, draft=draft, gamma=gamma)[0][0]
                  for p in batch]
    together, stats = speculative_generate(target, batch, GREEDY, draft=draft, gamma=gamma)
    assert one_by_one == reference
    assert together == reference
    assert stats.generated == 3 * GREEDY.max_new_tokens


def test_adaptive_gamma_equals_plain_greedy_and_changes_gamma(models):
    target, draft = models
    batch = prompts(2, seed=11)
    reference = [generate(target, p, GREEDY) for p in batch]
    for p, expected in zip(batch, reference):
        out, stats = speculative_generate(target, [p], GREEDY, draft=draft, gamma=3, adaptive=True)
        assert out[0] == expected
        assert len(set(stats.gammas)) > 1


def test_a_draft_equal_to_the_target_has_every_proposal_accepted(models):
    target, _ = models
    for gamma in (1, 3, 5):
        out, stats = speculative_generate(target, [[3, 1, 4]], GREEDY, draft=target, gamma=gamma)
        assert out[0] == generate(target, [3, 1, 4], GREEDY)
        assert stats.accepted == stats.proposed > 0
        assert stats.target_calls == -(-GREEDY.max_new_tokens // (gamma + 1))
        assert stats.mean_accepted_length == pytest.approx(GREEDY.max_new_tokens / stats.target_calls)


def test_an_always_wrong_draft_still_gives_plain_greedy_one_token_per_call(models):
    target, _ = models
    batch = prompts(3, seed=5)
    out, stats = speculative_generate(target, batch, GREEDY, proposer=AlwaysWrong(target), gamma=4)
    assert out == [generate(target, p, GREEDY) for p in batch]
    assert stats.accepted == 0 and stats.proposed > 0
    assert stats.target_calls == GREEDY.max_new_tokens
    assert stats.per_position_acceptance == [0.0]


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_prompt_lookup_equals_plain_greedy(models, gamma):
    target, _ = models
    batch = [[1, 2, 3, 1, 2, 3, 1, 2], [7, 7, 7, 7], [5]] + prompts(3, seed=9)
    out, stats = speculative_generate(target, batch, GREEDY, proposer=PromptLookupProposer(), gamma=gamma)
    assert out == [generate(target, p, GREEDY) for p in batch]
    assert stats.proposed > 0


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    lookup = PromptLookupProposer(max_ngram=2)
    assert lookup.lookup([1, 2, 9, 9, 1, 2, 5, 6, 7, 1, 2], 3) == [5, 6, 7]
    assert lookup.lookup([4, 8, 3, 8], 4) == [3, 8]  # no bigram match: the unigram 8
    assert lookup.lookup([1, 2, 3], 2) == []


def test_stops_at_eos_and_context_end_like_plain_generation(models):
    target, draft = models
    params = SamplingParams(max_new_tokens=80)
    for p in prompts(2, seed=2):
        out, _ = speculative_generate(target, [p], params, draft=draft, gamma=4)
        assert out[0] == generate(target, p, params)


@torch.no_grad()
def test_the_compiled_verify_step_gives_plain_generation_as_rows_finish_apart(models):
    # one graph of [3, γ + 1] tokens serves every round: rows end at different rounds (the
    # context end of a long prompt, EOS, max_new_tokens) and stay in it as padding
    torch._dynamo.reset()
    target, draft = models
    batch = [[5], prompts(1, seed=7)[0] * 8, [3, 1, 4, 1, 5, 9, 2, 6]]
    greedy, seeded = SamplingParams(max_new_tokens=40), SamplingParams(max_new_tokens=40, temperature=1.0, seed=11)
    assert len(batch[1]) + 40 > target.cfg.max_seq_len  # this row meets the context end first
    accepted, steps = 0, {}
    for params, kwargs, rows in ((greedy, dict(draft=draft, gamma=2, adaptive=True, max_gamma=3), batch),
                                 (seeded, dict(proposer=PromptLookupProposer(), gamma=3), batch),
                                 (greedy, dict(proposer=PromptLookupProposer(), gamma=3), batch[::-1])):
        out, stats = speculative_generate(target, rows, params, compile=True, compiled_steps=steps, **kwargs)
        assert out == [generate(target, p, params) for p in rows]
        assert len({len(o) for o in out}) > 1
        accepted += stats.accepted
    assert accepted > 0  # proposals passed, not only the target's own draws
    assert len(steps) == 1  # one graph, reused over a cache the earlier calls wrote


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, cells expected below 5 pooled."""
    expected = probs * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    return float(((observed - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def chi_square_999(df: int) -> float:
    """99.9% quantile of chi-square(df), Wilson-Hilferty approximation (within 1% here)."""
    z = 3.0902  # 99.9% quantile of the standard normal
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@torch.no_grad()
def test_sampled_tokens_follow_the_target_distribution_with_a_poor_draft(make_model):
    vocab, runs = 8, 6000
    target = make_model(seed=3, vocab_size=vocab, init_std=0.5).double()
    draft = make_model(seed=4, vocab_size=vocab, n_layers=1, init_std=0.5).double()
    params = SamplingParams(temperature=1.0, top_k=6, max_new_tokens=2, ignore_eos=True)  # a seed per row
    prompt = [1, 5, 2]
    p_first = warp_probs(target(torch.tensor([prompt])).logits[0, -1], params).double()  # [V]
    q_first = warp_probs(draft(torch.tensor([prompt])).logits[0, -1], params).double()
    out, stats = speculative_generate(target, [prompt] * runs, params, draft=draft, gamma=3)
    assert 0.05 < stats.acceptance_rate < 0.9  # both outcomes occur: rejections and acceptances
    first = torch.tensor([o[0] for o in out])
    counts = torch.bincount(first, minlength=vocab).double()
    statistic, df = chi_square(counts, p_first)
    assert statistic < chi_square_999(df)
    assert chi_square(counts, q_first)[0] > 10 * chi_square_999(df)  # the draft alone is far off
    # The second token, given the most frequent first token, follows the target as well.
    top = int(counts.argmax())
    p_second = warp_probs(target(torch.tensor([prompt + [top]])).logits[0, -1], params).double()
    seconds = torch.tensor([o[1] for o in out if o[0] == top])
    statistic, df = chi_square(torch.bincount(seconds, minlength=vocab).double(), p_second)
    assert statistic < chi_square_999(df)


def test_bad_arguments_are_refused_by_name(models, make_model):
    target, draft = models
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(target, [[1]], GREEDY, draft=make_model(vocab_size=VOCAB + 1))
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, [[1]], GREEDY, draft=draft, gamma=0)
    with pytest.raises(ValueError, match="exactly one"):
        speculative_generate(target, [[1]], GREEDY)


def test_the_acceptance_rule_with_one_hot_distributions_is_the_greedy_rule():
    g = torch.Generator().manual_seed(0)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=8)
    for _ in range(50):
        gamma = int(torch.randint(1, 6, (1,), generator=g))
        best = torch.randint(0, 3, (gamma + 1,), generator=g).tolist()
        proposals = torch.randint(0, 3, (gamma,), generator=g).tolist()
        one_hot = torch.nn.functional.one_hot(torch.tensor(best), 3).bool()  # [γ + 1, V]
        logits = torch.zeros(gamma + 1, 3).masked_fill(~one_hot, float("-inf"))
        seed = int(torch.randint(0, 1000, (1,), generator=g))
        [draws] = draw_tokens([logits], [sampled], [seed], [5])
        assert draws == best  # every draw from a one-hot distribution is its token
        n_ok = next((i for i, (x, y) in enumerate(zip(proposals, best)) if x != y), gamma)
        assert accept(proposals, draws) == (proposals[:n_ok] + [best[n_ok]], n_ok)


def test_batched_draws_equal_one_request_at_a_time():
    # the engine's step and a verification draw every request's rows in one argmax; each row
    # must be the draw that request would get alone (sample_at), greedy and sampled mixed
    g = torch.Generator().manual_seed(1)
    settings = [SamplingParams(), SamplingParams(temperature=0.8, top_k=5),
                SamplingParams(temperature=1.3, top_p=0.7), SamplingParams(temperature=1.0)]
    blocks = [torch.randn(int(torch.randint(1, 5, (1,), generator=g)), 40, generator=g) for _ in settings]
    seeds, starts = [3, 4, 5, 6], [10, 0, 7, 31]
    drawn = draw_tokens(blocks, settings, seeds, starts)
    for logits, params, seed, start, tokens in zip(blocks, settings, seeds, starts, drawn):
        alone = [sample_at(warp_probs(row, params), seed, start + i) for i, row in enumerate(logits)]
        assert tokens == alone


@pytest.mark.parametrize("gamma, num_blocks", [(1, None), (3, None), (6, None), (4, 12)])
def test_speculative_engine_equals_plain_greedy_for_several_sequences(models, gamma, num_blocks):
    target, draft = models
    batch = prompts(5, seed=20 + gamma)
    lengths = [16, 5, 23, 9, 30]
    engine = SpeculativeEngine(target, draft, gamma,
                               EngineConfig(max_num_seqs=3, block_size=4, num_blocks=num_blocks))
    requests = [engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
                for p, n in zip(batch, lengths)]
    engine.run()
    for request, p, n in zip(requests, batch, lengths):
        assert request.output == generate(target, p, SamplingParams(max_new_tokens=n, ignore_eos=True))
    assert engine.stats.proposed > 0
    if num_blocks:
        assert engine.preemptions > 0


def test_speculative_engine_with_the_target_as_draft_accepts_everything(models):
    target, _ = models
    engine = SpeculativeEngine(target, target, 4, EngineConfig(max_num_seqs=4))
    requests = [engine.add_request(p, GREEDY) for p in prompts(3, seed=3)]
    engine.run()
    assert engine.stats.accepted == engine.stats.proposed > 0
    assert [r.output for r in requests] == [generate(target, r.prompt, GREEDY) for r in requests]


SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=24, seed=11, ignore_eos=True)


@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_a_seeded_request_samples_the_same_tokens_with_or_without_speculation(models, gamma):
    target, draft = models
    batch = prompts(3, seed=40)
    plain = [generate(target, p, SAMPLED) for p in batch]
    assert len({tuple(x) for x in plain}) == 3 and plain[0] != generate(target, batch[0], GREEDY_24)
    alone = [speculative_generate(target, [p], SAMPLED, draft=draft, gamma=gamma)[0][0] for p in batch]
    together, stats = speculative_generate(target, batch, SAMPLED, draft=draft, gamma=gamma)
    looked_up, _ = speculative_generate(target, batch, SAMPLED, proposer=PromptLookupProposer(), gamma=gamma)
    assert alone == together == looked_up == plain
    assert 0 < stats.accepted < stats.proposed  # the draft's coupled guesses pass and fail


@pytest.mark.parametrize("num_blocks", [None, 12])
def test_seeded_requests_in_the_speculative_engine_sample_as_plain_generation_whatever_the_pool(models,
                                                                                              num_blocks):
    target, draft = models
    batch = prompts(5, seed=41)
    params = [SamplingParams(temperature=0.8, top_k=20, max_new_tokens=n, seed=100 + i, ignore_eos=True)
              for i, n in enumerate([16, 5, 23, 9, 30])]
    engine = SpeculativeEngine(target, draft, 4, EngineConfig(max_num_seqs=3, block_size=4, num_blocks=num_blocks))
    requests = [engine.add_request(p, q) for p, q in zip(batch, params)]
    engine.run()
    assert [r.output for r in requests] == [generate(target, p, q) for p, q in zip(batch, params)]
    if num_blocks:
        assert engine.preemptions > 0


@torch.no_grad()
def test_sampled_tokens_follow_the_target_at_the_second_and_third_positions_after_accepts_and_rejects(make_model):
    vocab, runs = 6, 4000
    target = make_model(seed=3, vocab_size=vocab, init_std=0.5).double()
    draft = make_model(seed=4, vocab_size=vocab, n_layers=1, init_std=0.5).double()
    params = SamplingParams(temperature=1.0, max_new_tokens=3, ignore_eos=True)
    prompt = [1, 5, 2]
    out, stats = speculative_generate(target, [prompt] * runs, params, draft=draft, gamma=3)
    assert 0.05 < stats.acceptance_rate < 0.95 and stats.rounds > runs  # both outcomes, several rounds
    first_two = max({tuple(o[:2]) for o in out}, key=lambda pair: sum(tuple(o[:2]) == pair for o in out))
    for prefix in ([out[0][0]], list(first_two)):  # the second token after some first, the third after a pair
        rows = [o[len(prefix)] for o in out if o[:len(prefix)] == prefix]
        p = warp_probs(target(torch.tensor([prompt + prefix])).logits[0, -1], params).double()
        statistic, df = chi_square(torch.bincount(torch.tensor(rows), minlength=vocab).double(), p)
        assert len(rows) > 200 and statistic < chi_square_999(df)


@pytest.mark.parametrize("proposer", ["prompt_lookup", "ngram_draft"])
@pytest.mark.parametrize("num_blocks", [None, 12])
def test_model_free_proposers_in_the_engine_equal_plain_generation_whatever_the_pool(models, proposer,
                                                                                     num_blocks):
    target, _ = models
    batch = [p[:4] * 3 for p in prompts(5, seed=43)]  # prompts that repeat themselves: lookups find matches
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, max_new_tokens=n, seed=i, ignore_eos=True)
              for i, n in enumerate([16, 5, 23, 9, 30])]
    if proposer == "prompt_lookup":
        lookup = PromptLookupProposer()
    else:  # prompt lookup, then a table of the target's guesses after random text
        text = torch.randint(0, VOCAB, (512,), generator=torch.Generator().manual_seed(0)).numpy()
        lookup = NgramProposer(build_ngram_draft(target, text, max_order=3, window=32, continuations=6,
                                                 prompt_len=8, new_tokens=24))
    engine = SpeculativeEngine(target, gamma=4, lookup=lookup, adaptive=True,
                               config=EngineConfig(max_num_seqs=3, block_size=4, num_blocks=num_blocks))
    requests = [engine.add_request(p, q) for p, q in zip(batch, params)]
    engine.run()
    assert [r.output for r in requests] == [generate(target, p, q) for p, q in zip(batch, params)]
    assert 0 < engine.stats.accepted < engine.stats.proposed
    if num_blocks:
        assert engine.preemptions > 0


def test_per_request_adaptive_gamma_in_the_engine_keeps_every_output_and_moves_gamma(models):
    target, draft = models
    batch = prompts(4, seed=42)
    params = [SamplingParams(max_new_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.9, max_new_tokens=20, seed=7, ignore_eos=True)] * 2
    engine = SpeculativeEngine(target, draft, 2, EngineConfig(max_num_seqs=4), adaptive=True, max_gamma=6)
    requests = [engine.add_request(p, q) for p, q in zip(batch, params)]
    engine.run()
    assert [r.output for r in requests] == [generate(target, p, q) for p, q in zip(batch, params)]
    assert len(set(engine.stats.gammas)) > 1 and max(engine.stats.gammas) <= 6
    assert not engine.wanted  # forgotten with the requests


def test_the_coupled_acceptance_formula_matches_shared_noise_draws_and_sits_between_its_bounds():
    g = torch.Generator().manual_seed(0)
    v = 12
    p = torch.softmax(1.5 * torch.randn(3, v, generator=g), -1)
    q = torch.softmax(1.5 * torch.randn(3, v, generator=g), -1)
    q[2, :5] = 0  # a draft that never draws five of the tokens
    q[2] /= q[2].sum()
    alpha = coupled_acceptance(p, q)
    noise = torch.stack([exponential_noise(7, i, v) for i in range(20000)])  # [n, V]
    for row in range(3):
        drawn = ((p[row].double() / noise).argmax(-1) == (q[row].double() / noise).argmax(-1)).double().mean()
        assert float(alpha[row]) == pytest.approx(float(drawn), abs=0.01)  # about 3 standard errors (seeded noise)
        d = 0.5 * (p[row] - q[row]).abs().sum()
        assert (1 - d) / (1 + d) - 1e-6 <= alpha[row] <= 1 - d + 1e-6
    assert torch.allclose(coupled_acceptance(p, p), torch.ones(3, dtype=torch.float64))
    one_hot = torch.eye(v)[[5, 6, 7]]  # a fixed guess is the target's draw with probability p(guess)
    assert torch.allclose(coupled_acceptance(p, one_hot), p[[0, 1, 2], [5, 6, 7]].double())
    # the formula itself, summed over every pair of tokens (x, y)
    pairs = torch.maximum(p[:, None, :] / p[:, :, None], q[:, None, :] / q[:, :, None]).double()  # [3, x, y]
    by_pairs = torch.where(q > 0, 1 / pairs.sum(-1), 0.0).sum(-1)
    assert torch.allclose(coupled_acceptance(p, q), by_pairs)
