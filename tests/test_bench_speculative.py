"""benchmarks/bench_speculative.py's prediction of how many target forwards a batch needs."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speculative", ROOT / "benchmarks" / "bench_speculative.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_when_every_proposal_passes_a_batch_needs_new_tokens_over_gamma_plus_one_forwards(bench):
    for batch in (1, 4):
        assert bench.expected_calls(np.ones(batch), [4], 64, trials=20) == 13  # ceil(64 / 5)


def test_one_row_needs_about_new_tokens_over_expected_tokens_per_round(bench):
    alpha, n, new = 0.6, 3, 200
    calls = bench.expected_calls(np.array([alpha]), [n], new)
    assert calls == pytest.approx(new / bench.expected_tokens(alpha, n), rel=0.03)


def test_a_batch_waits_for_its_slowest_row_and_more_so_when_rows_differ(bench):
    single = bench.expected_calls(np.array([0.5]), [2], 64)
    alike = bench.expected_calls(np.full(8, 0.5), [2], 64)
    unlike = bench.expected_calls(np.array([0.2, 0.8] * 4), [2], 64)
    assert single < alike < unlike


def test_the_engine_table_times_every_proposer_against_plain_engine_decoding(bench, make_model):
    from moe.serving.ngram_draft import build_ngram_draft
    target = make_model(seed=0, vocab_size=24)
    draft = make_model(seed=1, vocab_size=24, n_layers=1, moe_every=0, d_ff=16)
    text = np.random.default_rng(0).integers(0, 24, 512)
    table = build_ngram_draft(target, text, max_order=2, window=32, continuations=4, prompt_len=8, new_tokens=8)
    prompts = [[1, 2, 3, 1, 2], [5, 6, 7], [9, 9, 9, 9]]
    rows = bench.engine_table(target, draft, table, prompts, [1, 2], new_tokens=8, repeats=1, gamma=3, seed=0)
    assert [(r["mode"], r["slots"], r["sampled"]) for r in rows] == (
        [(m, s, False) for s in (1, 2) for m in ("draft_gamma2", "prompt_lookup", "ngram_draft")]
        + [(m, s, True) for s in (1, 2) for m in ("draft_gamma2", "ngram_draft_gamma2")])
    assert all(r["speedup"] > 0 and r["tokens_per_round"] >= 1 for r in rows)
