import pytest
import torch

from moe.serving.engine import Engine, EngineConfig
from moe.serving.generation import generate
from moe.serving.sampling import SamplingParams


def workload(n, seed=0):
    """n requests of mixed prompt and output lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 259, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    params = [SamplingParams(max_new_tokens=int(torch.randint(1, 25, (1,), generator=g)), ignore_eos=True)
              for _ in range(n)]
    return prompts, params


def serve(engine, prompts, params, arrive_every=2):
    """Add the requests a few at a time between steps (arrivals mid-run), then drain."""
    requests, pending = [], list(zip(prompts, params))
    step = 0
    while pending or engine.has_unfinished():
        if pending and step % arrive_every == 0:
            for prompt, p in pending[:2]:
                requests.append(engine.add_request(prompt, p))
            pending = pending[2:]
        engine.step()
        step += 1
    return requests


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation, which on a busy 2-core
    machine can cost 30x; the equivalences do not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    from tests.conftest import tiny_config
    from moe.model.transformer import Transformer
    torch.manual_seed(3)
    return Transformer(tiny_config()).eval().double()


@pytest.fixture(scope="module")
def alone(model):
    prompts, params = workload(10)
    return prompts, params, [generate(model, p, s) for p, s in zip(prompts, params)]


@pytest.mark.parametrize("config", [
    EngineConfig(max_num_seqs=4, max_num_batched_tokens=32, block_size=4),
    EngineConfig(max_num_seqs=3, max_num_batched_tokens=9, prefill_chunk=5, block_size=3),
    EngineConfig(max_num_seqs=16, max_num_batched_tokens=512, block_size=16),
], ids=["slots4", "chunked", "wide"])
def test_continuous_batching_equals_each_request_generated_alone(model, alone, config):
    prompts, params, expected = alone
    engine = Engine(model, config)
    requests = serve(engine, prompts, params)
    assert [r.output for r in requests] == expected
    assert all(r.status == "finished" for r in requests)
    assert engine.blocks.used_blocks == 0 and max(engine.batch_sizes) > 1


def test_forced_preemption_recomputes_and_still_equals_generation_alone(model, alone):
    prompts, params, expected = alone
    # 12 blocks of 4 tokens: a few requests fit at once, and growing ones run out of blocks
    engine = Engine(model, EngineConfig(max_num_seqs=6, max_num_batched_tokens=16,
                                        prefill_chunk=6, block_size=4, num_blocks=12))
    requests = serve(engine, prompts, params, arrive_every=1)
    assert engine.preemptions > 0
    assert [r.output for r in requests] == expected
    assert engine.blocks.used_blocks == 0


def test_chunked_prefill_equals_unchunked(model):
    prompts, params = workload(6, seed=1)
    outputs = []
    for chunk in (None, 3):
        engine = Engine(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                            prefill_chunk=chunk, block_size=4))
        requests = [engine.add_request(p, s) for p, s in zip(prompts, params)]
        engine.run()
        outputs.append([r.output for r in requests])
    assert outputs[0] == outputs[1]


def test_seeded_sampling_in_the_engine_equals_sampling_alone(model):
    prompts = [[1, 2, 3], [40, 50], [7] * 9]
    params = [SamplingParams(temperature=0.8, top_k=40, top_p=0.9, max_new_tokens=10, seed=s,
                             ignore_eos=True) for s in range(3)]
    engine = Engine(model, EngineConfig(max_num_seqs=3, block_size=4))
    requests = [engine.add_request(p, s) for p, s in zip(prompts, params)]
    engine.run()
    assert [r.output for r in requests] == [generate(model, p, s) for p, s in zip(prompts, params)]


def test_bad_requests_are_refused_with_a_reason_and_the_others_served(model, alone):
    prompts, params, expected = alone
    engine = Engine(model, EngineConfig(max_num_seqs=4, block_size=4, num_blocks=10))
    bad = [
        ([], SamplingParams(), "empty"),
        ([1] * 64, SamplingParams(), "max_seq_len"),
        ([300, 1], SamplingParams(), "vocabulary"),
        ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
        ([1], SamplingParams(temperature=-1.0), "temperature"),
        ([1], SamplingParams(temperature=1.0, top_p=0.0), "top_p"),
        ([1] * 30, SamplingParams(max_new_tokens=20), "whole KV pool"),
    ]
    refused = [engine.add_request(p, s) for p, s, _ in bad]
    good = [engine.add_request(p, s) for p, s in zip(prompts[:3], params[:3])]
    engine.run()
    for request, (_, _, reason) in zip(refused, bad):
        assert request.status == "refused" and reason in request.refusal
    assert [r.output for r in good] == expected[:3]


def test_stop_strings_and_max_new_tokens_end_requests(model):
    engine = Engine(model, EngineConfig(max_num_seqs=2, block_size=4))
    free = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=12, ignore_eos=True))
    engine.run()
    assert free.finish_reason == "length" and len(free.output) == 12
    ascii_tokens = [t for t in free.output[2:] if t < 128]
    assert ascii_tokens, "the fixed seed gives some ASCII tokens"
    stop = chr(ascii_tokens[0])
    stopped = engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=12, stop=(stop,), ignore_eos=True))
    engine.run()
    assert stopped.finish_reason == "stop"
    assert stopped.output == free.output[:free.output.index(ascii_tokens[0]) + 1]
    assert stop not in stopped.text


def test_metrics_are_recorded_per_step_and_per_token(model, alone):
    prompts, params, _ = alone
    engine = Engine(model, EngineConfig(max_num_seqs=4, block_size=4))
    requests = [engine.add_request(p, s) for p, s in zip(prompts, params)]
    engine.run()
    assert len(engine.batch_sizes) == engine.steps == len(engine.block_utilisation)
    assert all(0 < u <= 1 for u in engine.block_utilisation)
    for r in requests:
        assert len(r.token_times) == len(r.output)
        assert r.arrival_time <= r.first_token_time <= r.finish_time


def test_static_batching_equals_each_request_generated_alone(model, alone):
    from moe.serving.requests import Request
    from moe.serving.static_batching import run_static_batch
    prompts, params, expected = alone
    requests = [Request(i, p, s) for i, (p, s) in enumerate(zip(prompts, params))]
    live = []
    for start in range(0, len(requests), 4):
        live += run_static_batch(model, requests[start:start + 4])
    assert [r.output for r in requests] == expected
    # a batch runs until its longest member is done: steps = sum over batches of max length
    lengths = [s.max_new_tokens for s in params]
    assert len(live) == sum(max(lengths[i:i + 4]) for i in range(0, len(lengths), 4))


def test_the_kv_pool_is_sized_from_a_memory_budget(model):
    from moe.serving.cache import PagedKVCache
    block = PagedKVCache.bytes_per_block(model.cfg, 4, torch.float64)
    engine = Engine(model, EngineConfig(block_size=4, kv_cache_bytes=7 * block + block // 2))
    assert engine.blocks.num_blocks == 7
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        Engine(model, EngineConfig(block_size=4, kv_cache_bytes=block - 1))


@pytest.mark.parametrize("seed", range(4))
def test_random_schedules_equal_generation_alone(model, alone, seed):
    """Random slot counts, token budgets, chunk sizes, block sizes, pool sizes and arrival gaps."""
    prompts, params, expected = alone
    g = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    block_size = pick(1, 8)
    largest = max(len(p) + s.max_new_tokens for p, s in zip(prompts, params))
    config = EngineConfig(max_num_seqs=pick(1, 8), max_num_batched_tokens=pick(4, 40),
                          prefill_chunk=pick(1, 12), block_size=block_size,
                          num_blocks=-(-largest // block_size) + pick(0, 20))
    engine = Engine(model, config)
    requests = serve(engine, prompts, params, arrive_every=pick(1, 4))
    assert [r.output for r in requests] == expected
    assert engine.blocks.used_blocks == 0


def test_malformed_requests_are_refused_and_a_raising_forward_fails_only_its_step(model, alone):
    prompts, params, expected = alone
    engine = Engine(model, EngineConfig(max_num_seqs=4, block_size=4, num_blocks=40))
    bad = [([1, 2], SamplingParams(seed=1180591620717411303424), "seed"),
           ([1, 1.5], SamplingParams(), "integers"),
           ([1], SamplingParams(top_k=2.5), "top_k"),
           ([1], SamplingParams(max_new_tokens=2.5), "max_new_tokens"),
           ([1], SamplingParams(stop=5), "stop")]
    refused = [engine.add_request(p, s) for p, s, _ in bad]
    for request, (_, _, reason) in zip(refused, bad):
        assert request.status == "refused" and reason in request.refusal
    real_forward, calls = model.forward, []

    def broken(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected")
        return real_forward(*args, **kwargs)
    model.forward = broken
    try:
        first = [engine.add_request(p, s) for p, s in zip(prompts[:2], params[:2])]
        engine.step()  # raises inside: both fail, the engine stays consistent
        later = [engine.add_request(p, s) for p, s in zip(prompts[2:4], params[2:4])]
        engine.run()
    finally:
        model.forward = real_forward
    assert [r.status for r in first] == ["failed", "failed"] and "injected" in first[0].refusal
    assert [r.output for r in later] == expected[2:4] and engine.blocks.used_blocks == 0


def test_abort_frees_blocks_and_finished_requests_are_handed_off(model, alone):
    prompts, params, _ = alone
    engine = Engine(model, EngineConfig(max_num_seqs=4, block_size=4, num_blocks=40))
    requests = [engine.add_request(p, s) for p, s in zip(prompts[:3], params[:3])]
    engine.step()
    engine.abort(requests[0])
    assert requests[0].status == "aborted" and requests[0] not in engine.running
    engine.run()
    assert engine.blocks.used_blocks == 0
    assert sorted(r.request_id for r in engine.take_finished()) == [r.request_id for r in requests]
    assert engine.finished == [] and engine.take_finished() == []


@pytest.mark.parametrize("key", ["num_blocks", "prefill_chunk", "kv_cache_bytes", "max_num_seqs"])
def test_engine_settings_below_one_are_refused_not_read_as_the_default(key):
    with pytest.raises(ValueError, match=f"engine.{key} must be at least 1"):
        EngineConfig(**{key: 0})


def test_token_range_reads_the_sequence_without_building_it():
    from moe.serving.requests import Request
    request = Request(0, [1, 2, 3], SamplingParams(), output=[4, 5])
    for start in range(6):
        for stop in range(start, 7):
            assert request.token_range(start, stop) == request.tokens[start:stop]
    assert request.length == len(request.tokens) == 5


def test_a_profiled_engine_step_names_where_its_time_goes(make_model):
    from torch.profiler import profile
    from moe.profiling import label
    engine = Engine(make_model(), EngineConfig(max_num_seqs=2))
    for prompt in ([3, 4, 5], [6, 7]):
        engine.add_request(prompt, SamplingParams(temperature=0.8, max_new_tokens=3, seed=1, ignore_eos=True))
    with profile() as prof:
        engine.step()
    names = {event.key for event in prof.key_averages()}
    assert {"schedule", "layout", "attention", "router", "dispatch", "sampling", "postprocess"} <= names
    assert type(label("x")).__name__ == "nullcontext"  # no profiler: a label costs nothing


def test_the_compiled_all_decode_step_serves_what_the_eager_engine_does(make_model):
    # one graph for every all-decode step: padding rows, padded block tables, the scratch slot;
    # an 8-block pool for 3 slots forces preemptions in between
    torch._dynamo.reset()
    model = make_model(seed=4)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19, 20, 21], [22]]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) if i % 2 else
              SamplingParams(temperature=0.8, max_new_tokens=n, seed=i, ignore_eos=True)
              for i, n in enumerate([12, 5, 14, 9, 11])]
    outputs = []
    for compile in (False, True):
        engine = Engine(model, EngineConfig(max_num_seqs=3, block_size=4, num_blocks=8, compile=compile))
        requests = [engine.add_request(p, q) for p, q in zip(prompts, params)]
        engine.run()
        outputs.append([r.output for r in requests])
    assert outputs[0] == outputs[1] == [generate(model, p, q) for p, q in zip(prompts, params)]
    assert engine.preemptions > 0 and engine.decode_graph.compile_seconds is not None
