"""The short convolution on attention inputs (moe/model/short_conv.py): its in-place
autograd against the padded-shift reference, causality, rows kept apart, cached and
speculative decoding and the engine (chunked, preempted, compiled) against full forwards
or plain decoding, and the refusals (Mixtral export, a negative width)."""

import pytest
import torch

from moe.config import ConfigError
from moe.io.files import CheckpointError
from moe.io.hf import save_hf
from moe.model.short_conv import ShortConv, short_conv_reference
from moe.model.transformer import Transformer
from moe.serving.engine import Engine, EngineConfig
from moe.serving.generation import generate
from moe.serving.sampling import SamplingParams
from moe.serving.speculative import PromptLookupProposer, speculative_generate
from tests.conftest import tiny_config


@pytest.mark.parametrize("length,width", [(7, 4), (3, 4), (1, 2), (5, 1)])
def test_short_conv_output_and_gradients_equal_the_reference(length, width):
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, length, 6, generator=gen)
    grad = torch.randn(2, length, 6, generator=gen)
    conv = ShortConv(6, width)
    with torch.no_grad():
        conv.weight.normal_(generator=gen)
    h_fast, h_ref = h.clone().requires_grad_(), h.clone().requires_grad_()
    weight_ref = conv.weight.detach().clone().requires_grad_()
    fast, ref = conv(h_fast), short_conv_reference(h_ref, weight_ref)
    (fast * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h_fast.grad, h_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(conv.weight.grad, weight_ref.grad, rtol=1e-5, atol=1e-5)


def model_with_taps(width, std=1.0, ffn=False):
    """A tiny model whose short convolutions (on FFN inputs too with `ffn`) have nonzero
    taps (they start near zero)."""
    torch.manual_seed(0)
    model = Transformer(tiny_config(short_conv=width, short_conv_ffn=ffn)).eval()
    with torch.no_grad():
        for block in model.blocks:
            for conv in filter(None, (block.short_conv, block.ffn_conv)):
                conv.weight.normal_(0, std)
    return model


def test_a_token_sees_only_the_tokens_before_it_and_rows_stay_apart():
    model = model_with_taps(4)
    tokens = torch.randint(0, 259, (2, 10))
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 259
    with torch.no_grad():
        before, after = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(after[0, :6], before[0, :6])  # earlier positions: untouched
    assert not torch.allclose(after[0, 6:8], before[0, 6:8])  # the changed token and the next one
    torch.testing.assert_close(after[1], before[1])  # the other row: untouched


def test_the_short_conv_changes_what_attention_sees():
    torch.manual_seed(0)
    model = Transformer(tiny_config(short_conv=4)).eval()
    tokens = torch.randint(0, 259, (1, 10))
    with torch.no_grad():
        plain = model(tokens).logits
        model.blocks[0].short_conv.weight[1].fill_(1.0)  # add each input's predecessor
        mixed = model(tokens).logits
    torch.testing.assert_close(mixed[0, 0], plain[0, 0])  # the first token has no predecessor
    assert not torch.allclose(mixed[0, 1:], plain[0, 1:])


def test_mixtral_export_refuses_a_short_conv_by_name(tmp_path):
    with pytest.raises(CheckpointError, match="short_conv = 4 has no Mixtral form"):
        save_hf(Transformer(tiny_config(short_conv=4)), tmp_path / "hf")


def test_a_negative_width_is_refused_by_name():
    with pytest.raises(ConfigError, match="short_conv"):
        tiny_config(short_conv=-1)


def test_an_ffn_convolution_without_a_width_is_refused_by_name():
    with pytest.raises(ConfigError, match="short_conv_ffn.*needs model.short_conv"):
        tiny_config(short_conv_ffn=True)


def test_short_conv_init_draws_taps_within_its_bound():
    torch.manual_seed(0)
    model = Transformer(tiny_config(short_conv=4, short_conv_ffn=True, short_conv_init=0.5))
    taps = torch.cat([w for n, w in model.named_parameters() if n.endswith("conv.weight")])
    assert taps.shape == (2 * 2 * 4, 32) and taps.abs().max() <= 0.5 and taps.std() > 0.2


@pytest.mark.parametrize("width,compile,ffn", [(4, False, False), (4, True, False), (1, False, False),
                                               (4, False, True), (3, True, True)],
                         ids=["eager", "compiled", "one_tap", "ffn_too", "ffn_too_compiled"])
def test_cached_greedy_decoding_equals_argmax_of_full_forwards(width, compile, ffn):
    model = model_with_taps(width, 0.5, ffn)
    prompt = torch.randint(0, 256, (7,)).tolist()
    new = generate(model, prompt, SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True),
                   compile=compile)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    assert new == sequence[len(prompt):]


def test_speculative_decoding_of_a_short_conv_target_equals_plain_decoding():
    model = model_with_taps(3, 0.5)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 1, 9, 1, 9, 1, 9]]  # repeats, so lookup proposes
    params = SamplingParams(temperature=0.0, max_new_tokens=10, ignore_eos=True)
    outputs, _ = speculative_generate(model, prompts, params, proposer=PromptLookupProposer(), gamma=3)
    assert outputs == [generate(model, p, params) for p in prompts]


@pytest.mark.parametrize("config,ffn", [
    (EngineConfig(max_num_seqs=4, max_num_batched_tokens=16, prefill_chunk=5, block_size=3), False),
    (EngineConfig(max_num_seqs=6, max_num_batched_tokens=16, prefill_chunk=6, block_size=4, num_blocks=12), False),
    (EngineConfig(max_num_seqs=6, max_num_batched_tokens=16, prefill_chunk=6, block_size=4, num_blocks=16), True),
], ids=["chunked", "preempted", "ffn_too_preempted"])
def test_the_engine_equals_each_request_generated_alone(config, ffn):
    model = model_with_taps(4, 0.5, ffn)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in (3, 9, 14, 6, 11, 2)]
    params = SamplingParams(temperature=0.0, max_new_tokens=9, ignore_eos=True)
    engine = Engine(model, config)
    requests = [engine.add_request(p, params) for p in prompts]
    engine.run()
    assert [r.output for r in requests] == [generate(model, p, params) for p in prompts]
    if config.num_blocks:
        assert engine.preemptions > 0


def test_the_compiled_engine_step_equals_generation_alone():
    model = model_with_taps(3, 0.5)
    prompts = [[5, 6, 7, 8], [9, 1], [3, 3, 3, 3, 3, 3]]
    params = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    engine = Engine(model, EngineConfig(max_num_seqs=4, block_size=4, compile=True))
    requests = [engine.add_request(p, params) for p in prompts]
    engine.run()
    assert engine.decode_graph.compile_seconds is not None  # the all-decode steps ran compiled
    assert [r.output for r in requests] == [generate(model, p, params) for p in prompts]


def test_shared_prefix_blocks_serve_the_same_tokens_as_generation_alone():
    model = model_with_taps(4, 0.5)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 256, (13,), generator=gen).tolist()  # 3 full blocks of 4, then a partial one
    prompts = [prefix + torch.randint(0, 256, (int(n),), generator=gen).tolist() for n in (1, 3, 2, 5)]
    params = SamplingParams(temperature=0.0, max_new_tokens=7, ignore_eos=True)
    engine = Engine(model, EngineConfig(max_num_seqs=2, block_size=4, num_blocks=40, prefix_caching=True))
    requests = [engine.add_request(p, params) for p in prompts]
    engine.run()
    assert engine.blocks.prefix_hits > 0  # later requests read the prefix's kept inputs from shared blocks
    assert [r.output for r in requests] == [generate(model, p, params) for p in prompts]
