"""Shared fixtures: real edgellm servers on free ports, with real worker processes."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from llama_cpp import Llama

from frontend.broker import BrokerLimits
from frontend.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
CHAT_MODEL = "SmolLM2-135M-Instruct"
CHAT_PATH = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_MODEL = "gemma-3-270m"
GEMMA_PATH = MODELS / "gemma-3-270m-q4_k_m.gguf"
EMBED_MODEL = "all-MiniLM-L6-v2"
EMBED_PATH = MODELS / "all-MiniLM-L6-v2.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python server.py --config FILE` on a free port, stopped with SIGTERM."""

    def __init__(self, config_text: str, tmp: Path, *, wait_healthy: bool = True, extra_args=()):
        self.port = free_port()
        self.tmp = tmp
        self.worker_addr = f"ipc://{tmp}/workers.ipc"
        config = tmp / "edgellm.toml"
        config.write_text(config_text)
        self.log_path = tmp / "server.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "server.py"), "--config", str(config), "--host", "127.0.0.1",
             "--port", str(self.port), "--worker-addr", self.worker_addr, "--store-path",
             str(tmp / "store.db"), *extra_args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=120)
        if wait_healthy:
            try:
                self.wait_healthy()
            except BaseException:
                self.stop()
                raise

    def wait_healthy(self, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log_text()}")
            try:
                r = self.http.get("/health", timeout=2)
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log_text()}")

    def health(self) -> dict:
        return self.http.get("/health").json()

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def start_fake_worker(srv: ServerProcess, mode: str, model: str, *extra: str, count: int = 1) -> subprocess.Popen:
    """A tests/fake_worker.py process in ``mode`` serving ``model`` on ``srv``, once registered
    (``count``: the model's registered workers to wait for). The caller kills it."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_worker.py"), "--connect",
                             srv.worker_addr, "--model-name", model, "--mode", mode, *extra])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if len(srv.health()["models"].get(model, {}).get("workers", [])) >= count:
            return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"fake worker {mode} did not register")


def model_config(name: str, path: Path, **settings) -> str:
    lines = ["[[models]]", f'name = "{name}"', f'path = "{path}"']
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The default chat model (4 slots), Gemma 3 270M as a second chat model, and the embedding model."""
    for path in (CHAT_PATH, GEMMA_PATH, EMBED_PATH):
        if not path.exists():
            pytest.fail(f"{path} is missing: run scripts/setup.sh --test-models first")
    config = "max_body_bytes = 1000000\nmax_file_bytes = 200000\n" \
        + model_config(CHAT_MODEL, CHAT_PATH, parallel=4, threads=2) \
        + model_config(GEMMA_MODEL, GEMMA_PATH, parallel=1, threads=2, ctx_size=1024) \
        + model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", ctx_size=512, parallel=4, threads=2)
    srv = ServerProcess(config, tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.1):
    """Poll ``predicate`` until it returns something truthy, and return that; None after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    return None


def broker_limits(queue_size: int, queue_timeout: float, **overrides):
    """A Broker's limits with the server's defaults (ServerConfig) for what a test does not set."""
    defaults = BrokerLimits.from_config(ServerConfig(models=[]))
    return dataclasses.replace(defaults, queue_size=queue_size, queue_timeout=queue_timeout, **overrides)


def sse_events(response: httpx.Response) -> list:
    """The data payloads of a server-sent event stream ('[DONE]' kept as a string)."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


@pytest.fixture()
def client(server):
    """The official openai client on the session server."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vocab():
    """SmolLM2's tokenizer alone, to count and find tokens independently of the server."""
    return Llama(model_path=str(CHAT_PATH), vocab_only=True, verbose=False)
