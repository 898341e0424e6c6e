"""The client-side benchmark (moe/serving/http_bench.py) against the OpenAI-compatible
server started on a free loopback port: every request completes with exactly max_tokens
counted (chunks are not tokens: a byte that completes no character sends no text), the
server's token counter agrees, percentiles are ordered, and bad flags are refused by name."""

import json

import pytest

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import generate as cli  # noqa: E402
from moe.cli import run_main  # noqa: E402
from moe.serving import http_bench  # noqa: E402
from tests.serving_helpers import live_server  # noqa: E402


@pytest.fixture(scope="module")
def url():
    with live_server(num_blocks=80) as (_, _, _, base):
        yield base


def check_record(record: dict) -> None:
    summary = record["summary"]
    assert summary["completed"] == summary["n_requests"] and summary["failures"]["count"] == 0
    for request in record["requests"]:
        assert request["output_tokens"] == request["max_tokens"], request
        assert 0 < request["ttft_s"] <= request["e2e_s"]
    for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
        d = summary[metric]
        assert 0 <= d["p50"] <= d["p90"] <= d["p99"], (metric, d)
    assert summary["ttft_s"]["p99"] <= summary["e2e_s"]["p99"]
    assert summary["output_tokens_per_s"] > 0 and summary["requests_per_s"] > 0
    generated = (record["metrics_after"]["moe_tokens_generated_total"]
                 - record["metrics_before"]["moe_tokens_generated_total"])
    assert generated == summary["output_tokens"]  # the server counted what the client counted


def test_a_random_poisson_workload_completes_exactly(url, tmp_path):
    out = tmp_path / "random.json"
    record = http_bench.main(["--url", url, "--n-requests", "8", "--rate", "50", "--prompt-len-min", "4",
                              "--prompt-len-max", "16", "--mean-output", "6", "--max-output", "12",
                              "--out", str(out)])
    check_record(record)
    assert record["model"] == "tiny"  # asked GET /v1/models
    assert {r["prompt_tokens"] for r in record["requests"]} <= set(range(4, 17))
    assert json.loads(out.read_text())["workload"]["rate_per_s"] == 50


def test_a_shared_prefix_workload_through_the_cli(url, tmp_path):
    out = tmp_path / "shared.json"
    run_main(cli.main_bench, ["--url", url, "--workload", "shared-prefix", "--n-requests", "8",
                              "--prefix-len", "24", "--suffix-len", "4", "--output-len", "5",
                              "--out", str(out)])
    record = json.loads(out.read_text())
    check_record(record)
    assert [r["prompt_tokens"] for r in record["requests"]] == [28] * 8
    assert record["workload"] == dict(name="shared-prefix", n_requests=8, rate_per_s=None, seed=0,
                                      temperature=0.0, ignore_eos=True, prefix_len=24, suffix_len=4,
                                      output_len=5)


def test_shared_prefix_prompts_share_the_prefix_only():
    workload = http_bench.shared_prefix_workload(16, 24, 4, 5, float("inf"), seed=3)
    assert all(p[:24] == workload.prompts[0][:24] and len(p) == 28 for p in workload.prompts)
    assert len({tuple(p[24:]) for p in workload.prompts}) == 16
    assert workload.output_lens == [5] * 16 and workload.arrivals == [0.0] * 16


def test_the_prometheus_text_parses_with_labels_and_timestamps():
    text = '# HELP x a help\n# TYPE x gauge\nx 3\ny{reason="eos"} 2.5 1700000000\nz NaN\n'
    samples = http_bench.parse_prometheus(text)
    assert samples["x"] == 3 and samples['y{reason="eos"}'] == 2.5 and samples["z"] != samples["z"]


@pytest.mark.parametrize("flags,message", [
    (["--rate", "0"], "--rate must be positive"),
    (["--rate", "-2"], "--rate must be positive"),
    (["--rate", "nan"], "--rate must be positive"),
    (["--n-requests", "0"], "--n-requests must be at least 1"),
    (["--prompt-len-min", "9", "--prompt-len-max", "8"], "--prompt-len-max 8 is below --prompt-len-min 9"),
    (["--timeout", "0"], "--timeout must be"),
])
def test_bad_flags_are_refused_by_name(flags, message, capsys):
    with pytest.raises(ValueError, match=message):
        cli.main_bench(["--url", "http://127.0.0.1:9", *flags])
    with pytest.raises(SystemExit) as exit_:
        run_main(cli.main_bench, ["--url", "http://127.0.0.1:9", *flags])
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith(f"error: {message}")


def test_a_url_that_is_not_http_is_refused():
    with pytest.raises(ValueError, match="--url must be an http"):
        cli.main_bench(["--url", "127.0.0.1:8000"])
