"""The inference arithmetic reproduces the public GPT-4 and LLaMA-2-70B figures (FACTS.md),
and the roofline and the measured-run reader behave as the formulas say."""

import json
import math
from dataclasses import replace

import pytest
import torch

from moe.config import load_model_config
from moe.cost.estimate import (Layout, decode_flops_per_token, estimate, expected_experts_hit,
                      kv_bytes_per_token, main, roofline_output_tokens_per_s, roofline_shares)
from moe.cost.hardware import PRESETS, measure_hardware

GPT4 = load_model_config("configs/gpt4.toml")
LLAMA = load_model_config("configs/llama2-70b.toml")
A100 = PRESETS["A100-80GB"]
TWO_GPUS = Layout(tensor=2)


def test_gpt4_parameters_match_the_reported_totals():
    e = estimate(GPT4, PRESETS["H100"], Layout(tensor=8, pipeline=16))
    assert e.total_params == pytest.approx(1.8e12, rel=0.03)
    assert e.active_params == pytest.approx(280e9, rel=0.03)
    assert e.shared_params == pytest.approx(55e9, rel=0.03)


def test_gpt4_flops_per_generated_token_are_560_giga_not_tera():
    flops = decode_flops_per_token(GPT4, context=0)  # weights only: 2 FLOPs per active weight
    assert flops == pytest.approx(560e9, rel=0.02)
    assert flops < 1e12  # the reporting's "560 TFLOPs" is a unit slip


def test_llama2_70b_weights_take_140_gb_in_fp16():
    e = estimate(LLAMA, A100, TWO_GPUS, bytes_per_value=2)
    assert e.weight_bytes == pytest.approx(140e9, rel=0.02)  # 69.0B x 2 bytes = 138 GB
    assert e.weight_bytes_per_device == pytest.approx(e.weight_bytes / 2)


def test_llama2_70b_kv_cache_is_320_kib_per_token_and_1_3_gb_per_4096_tokens():
    assert kv_bytes_per_token(LLAMA, 2) == 320 * 2**10  # binary KiB: 327,680 bytes
    e = estimate(LLAMA, A100, TWO_GPUS, prompt_len=4096, output_len=0)
    assert e.kv_bytes_per_sequence == pytest.approx(1.3e9, rel=0.04)  # 1.342 GB decimal


def test_llama2_70b_25_gb_of_kv_holds_about_19_full_sequences():
    e = estimate(LLAMA, A100, TWO_GPUS, prompt_len=4096, output_len=0, kv_budget_bytes=25e9)
    assert e.max_sequences == pytest.approx(25e9 / 1.342e9, rel=0.01)
    assert 18 <= e.max_sequences < 19.5 and math.floor(e.max_sequences) == 18
    assert 25e9 / 1.3e9 == pytest.approx(19, abs=0.5)  # the article rounds to 1.3 GB first


def test_llama2_70b_prompt_tokens_cost_about_0_00042_dollars_per_1k():
    assert A100.flops == pytest.approx(200e12, rel=0.01)
    e = estimate(LLAMA, A100, TWO_GPUS, batch=1, prompt_len=512, output_len=128)
    assert e.prefill_bound == "compute"
    assert e.dollars_per_1k_prompt == pytest.approx(0.00042, rel=0.05)


def test_llama2_70b_generated_tokens_at_batch_1_cost_about_0_066_dollars_per_1k():
    assert A100.bytes_per_s == pytest.approx(1.3e12, rel=0.01)
    e = estimate(LLAMA, A100, TWO_GPUS, batch=1, prompt_len=512, output_len=128)
    assert e.decode_bound == "memory"
    assert e.decode_tokens_per_s == pytest.approx(18.6, rel=0.03)
    assert e.dollars_per_1k_generated == pytest.approx(0.066, rel=0.03)


def test_multi_query_attention_shrinks_kv_per_token_by_the_number_of_query_heads():
    for cfg in (LLAMA, GPT4):
        mha = replace(cfg, n_kv_heads=cfg.n_heads)
        mqa = replace(cfg, n_kv_heads=1)
        assert kv_bytes_per_token(mha) == cfg.n_heads * kv_bytes_per_token(mqa)


def test_expected_experts_hit_matches_simulated_uniform_top_k_routing():
    torch.manual_seed(0)
    E, K = 16, 2
    for tokens in (1, 3, 8, 40):
        scores = torch.rand(4000, tokens, E)  # uniform routing: a random top-k per token
        chosen = torch.zeros(4000, E, dtype=torch.bool)
        chosen.scatter_(1, scores.topk(K, dim=-1).indices.flatten(1), True)
        simulated = chosen.sum(1).float().mean().item()
        assert expected_experts_hit(E, K, tokens) == pytest.approx(simulated, rel=0.02)
    assert expected_experts_hit(E, K, 1) == pytest.approx(K)
    assert expected_experts_hit(E, K, 10_000) == pytest.approx(E)


def test_decode_at_batch_1_reads_only_the_k_routed_experts():
    hw = replace(A100, flops_efficiency=1.0, bandwidth_efficiency=1.0)
    e = estimate(GPT4, hw, batch=1, prompt_len=1, output_len=0, check=False)  # one device: the formula only
    per_expert = 3 * GPT4.d_model * GPT4.d_expert * GPT4.n_layers
    weights_read = (e.shared_params + GPT4.experts_per_token * per_expert) * 2
    kv_read = kv_bytes_per_token(GPT4) * 1
    assert e.decode_step_s == pytest.approx((weights_read + kv_read) / hw.bandwidth, rel=1e-9)


def test_decode_turns_compute_bound_once_the_batch_is_large_enough():
    small = estimate(LLAMA, A100, TWO_GPUS, batch=1)
    large = estimate(LLAMA, A100, TWO_GPUS, batch=4096, kv_budget_bytes=float("inf"))
    assert small.decode_bound == "memory" and large.decode_bound == "compute"
    assert large.decode_tokens_per_s > 50 * small.decode_tokens_per_s
    assert large.dollars_per_1k_generated < small.dollars_per_1k_generated / 50


def test_tensor_parallel_replicates_a_single_kv_head_but_splits_grouped_ones():
    mqa = estimate(GPT4, A100, Layout(tensor=8), prompt_len=100, output_len=0, check=False)
    gqa = estimate(LLAMA, A100, Layout(tensor=8), prompt_len=100, output_len=0)
    assert mqa.kv_bytes_per_device == pytest.approx(mqa.kv_bytes_per_sequence)
    assert gqa.kv_bytes_per_device == pytest.approx(gqa.kv_bytes_per_sequence / 8)


def _bench_report(tmp_path, cfg, device):
    run = dict(mode="continuous", n_requests=16, mean_prompt_len=32.0, mean_output_len=64.0,
               mean_batch=8.0, output_tokens_per_s=1000.0, requests_per_s=2.0,
               ttft_s={}, tpot_s={}, e2e_s=dict(mean=1.0, p50=1.0, p90=1.0, p99=1.0))
    report = dict(model=cfg.__dict__, device=device, dtype="bfloat16", runs=[run])
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    return report, path


def test_measured_run_is_reported_as_a_share_of_its_roofline(tmp_path, capsys):
    cfg = load_model_config("configs/small.toml")
    report, path = _bench_report(tmp_path, cfg, "NVIDIA H100 80GB HBM3")
    (row,) = roofline_shares(report)  # the device name picks the H100 preset
    roof = roofline_output_tokens_per_s(cfg, PRESETS["H100"], 16, 32.0, 64.0, 8.0, 2)
    assert row["roofline"] == pytest.approx(roof)
    assert row["share"] == pytest.approx(1000.0 / roof)
    main(["--measured", str(path)])
    assert f"{100 * row['share']:6.2f}%" in capsys.readouterr().out


def test_measured_reader_names_a_missing_key(tmp_path):
    with pytest.raises(ValueError, match="'runs'"):
        roofline_shares(dict(model={}, device="cpu", dtype="float32"))


def test_cli_prints_the_llama2_article_figures(capsys):
    main(["configs/llama2-70b.toml", "--hardware", "A100-80GB", "--tensor", "2",
          "--prompt", "4096", "--output", "0", "--kv-budget-gb", "25"])
    out = capsys.readouterr().out
    assert "327.7 KB/token (320.0 KiB)" in out
    assert "1.342 GB/sequence" in out
    assert "largest batch   18 sequences (18.6)" in out


def test_measure_reads_this_machines_copy_bandwidth_and_matmul_flops():
    hw = measure_hardware("cpu", seconds=0.05)
    assert 1e8 < hw.bandwidth < 1e13 and 1e8 < hw.peak_flops < 1e14
    assert hw.bytes_per_s == hw.bandwidth and hw.flops == hw.peak_flops  # measured: reached


def test_training_flops_count_attention_and_leave_out_the_embedding_lookup():
    from moe.cost.estimate import training_flops_per_token
    from tests.conftest import tiny_config
    cfg = tiny_config()  # d 32, 2 MoE layers, 4 heads of 8, 1 KV head, 4 experts of 24, top-2
    attention_weights = 32 * 32 + 32 * 8 + 32 * 8 + 32 * 32  # wq, wk, wv, wo
    moe_weights = 32 * 4 + 2 * 3 * 32 * 24  # router, two active SwiGLU experts
    matmul = 2 * (attention_weights + moe_weights) + 259 * 32  # + lm_head; the lookup is free
    scores = 4 * 2 * 4 * 8 * (16 + 1) / 2  # q.k and p.v over the mean causal context
    assert training_flops_per_token(cfg, 16) == 3 * (2 * matmul + scores) == 143808


def test_a_layout_whose_weights_do_not_fit_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"weights need 3.7 TB per device.*at least 44x more devices"):
        estimate(GPT4, PRESETS["A100-80GB"])


def test_a_batch_whose_kv_cache_does_not_fit_is_refused_with_the_largest_that_does():
    layout = Layout(tensor=8, pipeline=16)
    with pytest.raises(ValueError, match="the largest batch that fits is 24"):
        estimate(GPT4, PRESETS["A100-40GB"], layout, batch=512, prompt_len=8192, output_len=128)
    estimate(GPT4, PRESETS["A100-40GB"], layout, batch=24, prompt_len=8192, output_len=128)  # fits


DAVINCI = load_model_config("configs/davinci.toml")
CLUSTER = Layout(tensor=8, pipeline=16)  # the reported 128-GPU inference cluster


def _request_cost(cfg, hardware: str, layout: Layout, context: int, generated: int):
    """A full batch (the largest whose KV fits) of requests of `context` tokens, `generated` of them output."""
    from moe.cost.estimate import largest_batch
    hw = PRESETS[hardware]
    batch = largest_batch(cfg, hw, layout, context - generated, generated)
    return estimate(cfg, hw, layout, batch, context - generated, generated), batch


def test_gpt4_costs_the_reported_0_0049_dollars_per_1k_tokens_on_128_a100s_with_a_tenth_generated():
    e, batch = _request_cost(GPT4, "A100-40GB", CLUSTER, 8192, 819)
    assert batch == 24  # the KV cache of 8k-token sequences caps it (MQA or not)
    assert e.dollars_per_1k_tokens == pytest.approx(0.0049, rel=0.02)
    assert e.dollars_per_1k_generated == pytest.approx(0.042, rel=0.02)  # decode alone is 8.6x that


def test_gpt4_costs_the_reported_0_0021_dollars_per_1k_tokens_on_128_h100s_with_a_sixth_generated():
    e, batch = _request_cost(GPT4, "H100", CLUSTER, 8192, 1475)
    assert batch == 109  # twice the memory: 4.5x the batch beside the same 28.6 GB of weights
    assert e.dollars_per_1k_tokens == pytest.approx(0.0021, rel=0.03)


def test_one_output_share_for_both_lands_within_a_quarter_of_each_reported_figure():
    a100, _ = _request_cost(GPT4, "A100-40GB", CLUSTER, 8192, 1024)
    h100, _ = _request_cost(GPT4, "H100", CLUSTER, 8192, 1024)
    assert 1.0 < a100.dollars_per_1k_tokens / 0.0049 < 1.25 and 0.75 < h100.dollars_per_1k_tokens / 0.0021 < 1.0


def test_gpt4_costs_about_3x_davinci_though_a_token_needs_only_1_6x_its_flops():
    from moe.model.transformer import count_parameters
    assert count_parameters(GPT4).active / count_parameters(DAVINCI).total == pytest.approx(1.6, rel=0.02)
    gpt4, _ = _request_cost(GPT4, "A100-40GB", CLUSTER, 8192, 819)
    davinci, batch = _request_cost(DAVINCI, "A100-40GB", Layout(tensor=8, pipeline=2), 2048, 205)
    assert batch == 15
    assert gpt4.dollars_per_1k_prompt / davinci.dollars_per_1k_prompt == pytest.approx(1.65, rel=0.03)
    assert 3.0 < gpt4.dollars_per_1k_tokens / davinci.dollars_per_1k_tokens < 4.0  # 3.6x
    h100_gpt4, _ = _request_cost(GPT4, "H100", CLUSTER, 8192, 819)
    h100_davinci, _ = _request_cost(DAVINCI, "H100", Layout(tensor=8, pipeline=2), 2048, 205)
    assert 1.8 < h100_gpt4.dollars_per_1k_tokens / h100_davinci.dollars_per_1k_tokens < 2.2  # 2.0x


def test_davinci_has_gpt3s_175b_parameters():
    from moe.model.transformer import count_parameters
    assert count_parameters(DAVINCI).total == pytest.approx(175e9, rel=0.01)


def test_cli_batch_max_prices_the_largest_batch_that_fits(capsys):
    main(["configs/gpt4.toml", "--hardware", "A100-40GB", "--tensor", "8", "--pipeline", "16",
          "--batch", "max", "--prompt", "7373", "--output", "819"])
    out = capsys.readouterr().out
    assert "batch           24 sequences per pipeline stage, 384 in flight" in out
    assert "$0.00492 per 1K tokens of a request" in out
    with pytest.raises(ValueError, match="--batch 'many'"):
        main(["configs/gpt4.toml", "--hardware", "H100", "--tensor", "8", "--pipeline", "16", "--batch", "many"])
