"""A live server for the HTTP tests: the engine over a tiny random model, served by uvicorn
on a free loopback port in a thread of this process (tests/test_server.py,
tests/test_http_bench.py)."""

import contextlib
import socket
import threading
import time

import torch
import uvicorn

from moe.model.transformer import Transformer
from moe.serving.engine import Engine, EngineConfig
from moe.serving.server import EngineLoop, build_app
from moe.serving.text import byte_level
from tests.conftest import tiny_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(num_blocks: int):
    """(model, engine, engine loop, base URL) while the server runs."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    engine = Engine(model, EngineConfig(max_num_seqs=4, block_size=4, num_blocks=num_blocks))
    loop = EngineLoop(engine)
    loop.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(loop, byte_level(), "tiny"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield model, engine, loop, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        loop.stop()
