"""An OpenAI-compatible HTTP server over the continuous-batching engine.

Why this shape: people who benchmark or use a serving stack point standard clients and
load generators at `/v1/completions`; speaking that protocol (as vLLM, SGLang and
nano-vllm do) lets the official `openai` client, curl and any OpenAI-compatible load
generator drive this engine unchanged.

    HTTP handlers (asyncio, FastAPI on uvicorn)      engine thread (EngineLoop)
      parse and check the request  ----submit---->   add_request at the next step
      await its events             <---token----    step(): every emitted token
      client gone: abort           ----abort---->    blocks freed at once
                                   <---done-----     take_finished(): handed off

The engine runs on one thread of its own and is touched only there; handlers talk to
it through a queue, and it answers each handler through that handler's asyncio queue
(`loop.call_soon_threadsafe`), so a request arriving over HTTP joins the running batch at
the next step. Bad requests get HTTP 400 with an OpenAI-style error body naming the
field; a forward that raises fails only the requests of that step.

Endpoints: POST /v1/completions (prompt as text or token ids; max_tokens, temperature,
top_p, top_k, seed, stop, logprobs, echo, stream; ignore_eos as an extension),
GET /v1/models, GET /health, GET /metrics (Prometheus text).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt

from moe.serving.engine import Engine
from moe.serving.requests import Request, refusal_reason
from moe.serving.sampling import SamplingParams
from moe.serving.stopping import Detokenizer, visible_text
from moe.serving.text import TextStream, TextTokenizer

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort",
                  "error": "error"}  # ours -> OpenAI's
API_NAMES = {"max_new_tokens": "max_tokens"}  # SamplingParams field -> request field


# ---------------------------------------------------------------------------------------
# The engine on its own thread
# ---------------------------------------------------------------------------------------

class EngineLoop:
    """Steps the engine while it has work; takes requests and aborts from any thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.sinks: dict[int, Callable[[tuple], None]] = {}  # request id -> its handler's inbox
        self.finished: dict[str, int] = {}  # finish reason -> requests (a running total)
        self.stopping = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=10)

    def submit(self, prompt: list[int], params: SamplingParams, detok: Detokenizer,
               sink: Callable[[tuple], None]) -> dict:
        """Queue a request for the next step; `sink` gets ("token", request, token) and
        ("done", request) from the engine thread. Returns a handle for `abort`."""
        handle: dict = {}
        self.inbox.put(("add", prompt, params, detok, sink, handle))
        self.wake.set()
        return handle

    def abort(self, handle: dict) -> None:
        self.inbox.put(("abort", handle))
        self.wake.set()

    def _drain(self) -> None:
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, prompt, params, detok, sink, handle = item
                request = self.engine.add_request(prompt, params, detok=detok)
                self.sinks[request.request_id] = sink
                handle["request"] = request
            else:  # an abort comes after its add: the inbox keeps their order
                self.engine.abort(item[1]["request"])

    def _run(self) -> None:
        try:
            while not self.stopping:
                self._drain()
                if not self.engine.has_unfinished() and not self.engine.finished:
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                for request, token in self.engine.step():
                    self.sinks[request.request_id](("token", request, token))
                for request in self.engine.take_finished():
                    self.finished[request.finish_reason] = self.finished.get(request.finish_reason, 0) + 1
                    self.sinks.pop(request.request_id)(("done", request))
        except BaseException as error:  # a bug: every waiting handler hears of it
            self.error = error
            for sink in self.sinks.values():
                sink(("crash", error))
            raise


# ---------------------------------------------------------------------------------------
# The HTTP side
# ---------------------------------------------------------------------------------------

class CompletionRequest(BaseModel):
    """The fields of OpenAI's /v1/completions that this server honours."""
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[StrictInt]
    max_tokens: StrictInt = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: StrictInt = 0
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    logprobs: StrictInt | None = None
    echo: StrictBool = False
    stream: StrictBool = False
    n: StrictInt = 1
    ignore_eos: StrictBool = False
    user: str | None = None


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class RequestFailed(Exception):
    """The engine could not finish the request (its forward raised): HTTP 500 with the reason."""


def error_body(message: str, param: str | None, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def api_words(message: str) -> str:
    for ours, theirs in API_NAMES.items():
        message = message.replace(ours, theirs)
    return message


def field_of(message: str) -> str | None:
    """The request field a refusal names (messages start with it), in the API's words."""
    first = message.split(" ", 1)[0]
    if first in API_NAMES:
        return API_NAMES[first]
    if first in CompletionRequest.model_fields:
        return first
    return "prompt" if "prompt" in message or "token ids" in message else None


def build_app(loop: EngineLoop, tokenizer: TextTokenizer, model_name: str, bos: bool = False) -> FastAPI:
    """The FastAPI application serving `loop`'s engine."""
    app = FastAPI(title="gpt4-moe", version="0.1.0")
    engine = loop.engine
    ids = itertools.count()

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = [str(p) for p in first["loc"][1:]]  # ["prompt", "list[int]", "0"]: the field first
        param = where[0] if where else None
        message = f"{param}: {first['msg']}, got {first.get('input')!r}" if param else first["msg"]
        return JSONResponse(error_body(message, param), status_code=400)

    @app.exception_handler(BadRequest)
    async def bad(_, error: BadRequest) -> JSONResponse:
        return JSONResponse(error_body(str(error), error.param), status_code=400)

    @app.exception_handler(RequestFailed)
    async def failed(_, error: RequestFailed) -> JSONResponse:
        return JSONResponse(error_body(str(error), None, "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        if loop.error is not None:
            return JSONResponse({"status": "error", "error": repr(loop.error)}, status_code=500)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "gpt4-moe"}]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(prometheus_text(loop), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        if body.n != 1:
            raise BadRequest("n must be 1: one completion per request", "n")
        if body.model is not None and body.model != model_name:
            raise BadRequest(f"model {body.model!r} is not served here; GET /v1/models lists "
                             f"{model_name!r}", "model")
        if isinstance(body.prompt, str):
            prompt = ([tokenizer.bos_id] if bos else []) + tokenizer.encode(body.prompt)
            prompt_text = body.prompt
        else:
            prompt, prompt_text = list(body.prompt), None
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                                max_new_tokens=body.max_tokens, stop=stop, seed=body.seed,
                                ignore_eos=body.ignore_eos, logprobs=body.logprobs)
        pool = engine.blocks.num_blocks * engine.blocks.block_size
        problem = refusal_reason(engine.cfg, prompt, params, pool)
        if problem:  # in the API's words: max_new_tokens is max_tokens there
            raise BadRequest(api_words(problem), field_of(problem))
        if prompt_text is None:
            prompt_text = tokenizer.decode(prompt)
        detok = tokenizer.detokenizer(prompt)
        events: asyncio.Queue = asyncio.Queue()
        event_loop = asyncio.get_running_loop()
        handle = loop.submit(prompt, params, detok,
                             lambda event: event_loop.call_soon_threadsafe(events.put_nowait, event))
        completion_id, created = f"cmpl-{next(ids)}", int(time.time())
        head = dict(id=completion_id, object="text_completion", created=created, model=model_name)
        if body.stream:
            return StreamingResponse(
                stream_events(loop, handle, events, head, params, detok, tokenizer,
                              prompt_text if body.echo else ""),
                media_type="text/event-stream")
        request = await collect(loop, handle, events, http)
        text = visible_text(request.output, params, detok)
        choice = dict(index=0, text=(prompt_text if body.echo else "") + text,
                      logprobs=logprobs_body(request, tokenizer) if params.logprobs is not None else None,
                      finish_reason=FINISH_REASONS.get(request.finish_reason))
        usage = dict(prompt_tokens=len(prompt), completion_tokens=len(request.output),
                     total_tokens=len(prompt) + len(request.output))
        return {**head, "choices": [choice], "usage": usage}

    return app


async def collect(loop: EngineLoop, handle: dict, events: asyncio.Queue, http: HTTPRequest) -> Request:
    """Wait for the request to finish; abort it if the client goes away first."""
    while True:
        try:
            event = await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                loop.abort(handle)
            continue
        if event[0] == "crash":
            raise RequestFailed(f"the engine stopped: {event[1]!r}")
        if event[0] == "done":
            request = event[1]
            if request.status == "refused":
                raise BadRequest(api_words(request.refusal), field_of(request.refusal))
            if request.status == "failed":
                raise RequestFailed(request.refusal)
            return request


async def stream_events(loop: EngineLoop, handle: dict, events: asyncio.Queue, head: dict,
                        params: SamplingParams, detok: Detokenizer, tokenizer: TextTokenizer,
                        echo: str) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of stable text, then the finish reason, then
    [DONE]. A client that disconnects cancels this generator, which aborts the request."""
    text = TextStream(params, detok)
    finished = False

    def chunk(piece: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        choice = dict(index=0, text=piece, logprobs=logprobs, finish_reason=finish)
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
    try:
        if echo:
            yield chunk(echo)
        while True:
            event = await events.get()
            if event[0] == "crash":
                yield f"data: {json.dumps(error_body(repr(event[1]), None, 'server_error'))}\n\n"
                break
            if event[0] == "token":
                request, token = event[1], event[2]
                logprobs = None
                if params.logprobs is not None:
                    logprob, top = request.logprobs[len(text.generated)]
                    logprobs = dict(tokens=[token_text(tokenizer, token)], token_logprobs=[logprob],
                                    top_logprobs=[{token_text(tokenizer, i): v for i, v in top.items()}])
                piece = text.push(token)
                if piece or logprobs:
                    yield chunk(piece, logprobs=logprobs)
                continue
            request = event[1]
            finished = True
            if request.status == "failed":
                yield f"data: {json.dumps(error_body(request.refusal, None, 'server_error'))}\n\n"
                break
            yield chunk(text.finish(), FINISH_REASONS.get(request.finish_reason))
            break
        yield "data: [DONE]\n\n"
    finally:
        if not finished:  # the client went away (or the loop stopped): free its blocks now
            loop.abort(handle)


def token_text(tokenizer: TextTokenizer, token: int) -> str:
    """A token as the logprobs objects name it: its text, or `token:ID` where it has no text
    of its own (a special token, or a byte that is part of a longer character)."""
    text = tokenizer.decode([token])
    return text if text and "\ufffd" not in text else f"token:{token}"


def logprobs_body(request: Request, tokenizer: TextTokenizer) -> dict[str, Any]:
    """OpenAI's completions `logprobs` object for the request's output tokens."""
    tokens = [token_text(tokenizer, t) for t in request.output]
    offsets = list(itertools.accumulate([0] + [len(t) for t in tokens[:-1]]))
    return dict(tokens=tokens, token_logprobs=[lp for lp, _ in request.logprobs],
                top_logprobs=[{token_text(tokenizer, i): v for i, v in top.items()}
                              for _, top in request.logprobs],
                text_offset=offsets)


def prometheus_text(loop: EngineLoop) -> str:
    """The engine's state and running totals in Prometheus' text format."""
    engine = loop.engine
    hits, lookups = engine.blocks.prefix_hits, engine.blocks.prefix_lookups
    gauges = [
        ("moe_requests_running", "requests in the running batch", "gauge", len(engine.running)),
        ("moe_requests_waiting", "requests waiting to be scheduled", "gauge", len(engine.waiting)),
        ("moe_kv_blocks_used", "KV cache blocks in use", "gauge", engine.blocks.used_blocks),
        ("moe_kv_blocks_total", "KV cache blocks in the pool", "gauge", engine.blocks.num_blocks),
        ("moe_preemptions_total", "requests preempted to free KV blocks", "counter", engine.preemptions),
        ("moe_tokens_generated_total", "tokens generated", "counter", engine.tokens_generated),
        ("moe_engine_steps_total", "engine steps (forwards)", "counter", engine.steps),
        ("moe_prefix_cache_hit_rate", "prompt blocks found in the prefix cache / looked up",
         "gauge", hits / lookups if lookups else 0.0),
    ]
    lines = []
    for name, help_text, kind, value in gauges:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP moe_requests_finished_total requests finished, by reason",
              "# TYPE moe_requests_finished_total counter"]
    for reason, count in sorted(loop.finished.items()):
        lines.append(f'moe_requests_finished_total{{reason="{reason}"}} {count}')
    return "\n".join(lines) + "\n"
