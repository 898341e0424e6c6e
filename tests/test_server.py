"""The OpenAI-compatible server (moe/serving/server.py), started on a free loopback port and
driven by the official `openai` client: completions equal one-request generation, streams
join to the same text, concurrent clients are token-exact, a disconnect frees the blocks,
bad fields get a 400 naming them, /metrics parses, and a forward that raises fails only
its own requests."""

import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai", reason="the server tests drive it with the openai client")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from moe.serving.generation import generate  # noqa: E402
from moe.serving.sampling import SamplingParams  # noqa: E402
from moe.serving.stopping import visible_text  # noqa: E402
from moe.tokenizer import encode  # noqa: E402
from tests.serving_helpers import live_server  # noqa: E402


@pytest.fixture(scope="module")
def served():
    with live_server(num_blocks=40) as (model, engine, loop, url):
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        yield model, engine, loop, client, url


def expected_text(model, prompt: str, max_tokens: int, **settings) -> str:
    params = SamplingParams(max_new_tokens=max_tokens, **settings)
    return visible_text(generate(model, encode(prompt), params), params)


def test_a_completion_equals_one_request_generation(served):
    model, _, _, client, _ = served
    done = client.completions.create(model="tiny", prompt="def ", max_tokens=12, temperature=0)
    assert done.choices[0].text == expected_text(model, "def ", 12)
    assert done.usage.prompt_tokens == 4 and done.choices[0].finish_reason in ("stop", "length")


def test_a_streamed_completion_joins_to_the_same_text(served):
    model, _, _, client, _ = served
    pieces = [c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="class ", max_tokens=15, temperature=0, stream=True)]
    assert len(pieces) > 1 and "".join(pieces) == expected_text(model, "class ", 15)


def test_many_concurrent_clients_are_token_exact(served):
    model, engine, _, client, _ = served
    prompts = [f"x{i} = " for i in range(10)]

    def ask(prompt):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=9, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text
    with ThreadPoolExecutor(10) as pool:
        texts = list(pool.map(ask, prompts))
    assert texts == [expected_text(model, p, 9, ignore_eos=True) for p in prompts]
    assert max(engine.batch_sizes) > 1  # they shared forwards
    assert engine.blocks.used_blocks == 0


def test_logprobs_are_reported_per_token(served):
    _, _, _, client, _ = served
    done = client.completions.create(model="tiny", prompt="for ", max_tokens=5, temperature=0,
                                     logprobs=2, extra_body={"ignore_eos": True})
    lp = done.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == 5 and all(v <= 0 for v in lp.token_logprobs)
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and max(top.values()) == pytest.approx(value)  # greedy took the best


def test_a_client_that_disconnects_frees_its_blocks(served):
    _, engine, _, _, url = served
    body = {"model": "tiny", "prompt": "while ", "max_tokens": 50, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                break  # one token arrived: the request is running; go away
    for _ in range(100):
        if engine.blocks.used_blocks == 0 and not engine.running:
            break
        time.sleep(0.05)
    assert engine.blocks.used_blocks == 0 and not engine.running


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 2.5), ("top_k", 2.5), ("seed", 2**70), ("prompt", [1.5, 2]), ("stop", 5),
    ("temperature", -1.0), ("top_p", 0.0), ("n", 2), ("max_tokens", 0), ("logprobs", 50),
    ("prompt", [300]), ("prompt", ""),
])
def test_each_bad_field_gets_a_400_naming_it(served, field, value):
    _, _, _, _, url = served
    body = {"model": "tiny", "prompt": "a", "max_tokens": 3, field: value}
    response = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["type"] == "invalid_request_error", error
    assert field in error["message"] or field == "prompt", error  # named in the API's words


def test_models_health_and_metrics(served):
    _, _, _, client, url = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line).groups()
            samples[name] = float(value)
    for name in ("moe_requests_running", "moe_requests_waiting", "moe_kv_blocks_used",
                 "moe_preemptions_total", "moe_tokens_generated_total", "moe_prefix_cache_hit_rate"):
        assert name in samples
    assert samples["moe_tokens_generated_total"] > 0


def test_a_forward_that_raises_fails_only_its_own_request(served):
    model, engine, _, client, _ = served
    real_forward = engine.model.forward
    calls = []

    def broken(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected failure")
        return real_forward(*args, **kwargs)
    engine.model.forward = broken
    try:
        with pytest.raises(openai.InternalServerError):
            client.completions.create(model="tiny", prompt="if ", max_tokens=4, temperature=0)
    finally:
        engine.model.forward = real_forward
    done = client.completions.create(model="tiny", prompt="if ", max_tokens=4, temperature=0)
    assert done.choices[0].text == expected_text(model, "if ", 4)
    assert engine.blocks.used_blocks == 0
