"""The HTTP server under hostile load: idle floods, the connection and thread bounds, slow and
oversized requests, disconnect detection at any file descriptor, and the SIGTERM drain."""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from conftest import CHAT_MODEL, CHAT_PATH, EMBED_MODEL, EMBED_PATH, ServerProcess, model_config, wait_for
from frontend.config import ConfigError, add_server_flags, load_config
from frontend.errors import APIError
from frontend.jobs import STOPPING_KEY, client_gone, disconnect_check
from server import http_limits
from store import Store

IDLE_CONNECTIONS = 1100  # past select()'s 1023 file descriptors, in the server and in this process
CHAT = {"model": CHAT_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]}
EMBED = {"model": EMBED_MODEL, "input": "Paris is the capital of France."}


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {needed} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def closed_by_server(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the server closes the connection (reading and dropping what it sends), or None."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < timeout:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except ConnectionResetError:
            return time.monotonic() - start
    return None


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP response with a Content-Length: (status line and headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536) or pytest.fail(f"connection closed after {data!r}")
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536) or pytest.fail("connection closed mid-body")
    return head, body


def assert_api_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code", "param"} and err["code"] == code and err["message"]
    return err


# -- settings and disconnect detection, without a server -----------------------------------

def test_serving_settings_come_from_flags_and_config_and_are_checked(tmp_path):
    def parse(*argv):
        parser = argparse.ArgumentParser()
        add_server_flags(parser)
        return load_config(parser.parse_args(["--model-name", "m", "--model-path", str(CHAT_PATH), *argv]))

    config_file = tmp_path / "edgellm.toml"
    config_file.write_text("max_connections = 100\nread_timeout = 5.0\n" + model_config("m", CHAT_PATH))
    limits = http_limits(parse("--config", str(config_file), "--http-threads", "7", "--drain-timeout", "0"))
    assert (limits.max_connections, limits.read_timeout, limits.http_threads, limits.drain_timeout) == (100, 5, 7, 0)
    assert limits.idle_timeout == 30 and limits.max_header_bytes == 65536
    for flag in ("--http-threads", "--max-connections", "--read-timeout", "--idle-timeout", "--max-header-bytes"):
        with pytest.raises(ConfigError, match="must be at least"):
            parse(flag, "0")
    with pytest.raises(ConfigError):
        parse("--drain-timeout", "-1")


def test_client_gone_works_above_file_descriptor_1023():
    """select() raises for a descriptor above 1023; a live client there must not read as gone."""
    raise_fd_limit(2100)
    server_end, client_end = socket.socketpair()
    high = socket.socket(fileno=os.dup2(server_end.fileno(), 2000))
    server_end.close()
    try:
        assert high.fileno() > 1023
        assert not client_gone(high)
        client_end.sendall(b"more")  # readable with data: the client is still there
        assert not client_gone(high)
        gone = disconnect_check({"werkzeug.socket": high})
        assert not gone()
        client_end.close()
        assert client_gone(high) and gone()
    finally:
        high.close()
        client_end.close()


def test_disconnect_check_uses_waitress_flag_and_stops_on_drain():
    left, stopping = [False], threading.Event()
    gone = disconnect_check({"waitress.client_disconnected": lambda: left[0], STOPPING_KEY: stopping})
    assert not gone()
    left[0] = True
    assert gone()
    stopping.set()
    with pytest.raises(APIError) as err:
        gone()
    assert err.value.code == "shutting_down" and err.value.status == 503


# -- request threads' writes, on an HTTPServer serving a plain WSGI app -------------------------

@pytest.fixture
def plain_server():
    """An HTTPServer (frontend/http_server.py) running ``apps[0]``, on a free port."""
    from frontend.config import ServerConfig
    from frontend.http_server import HTTPServer
    apps = []
    server = HTTPServer(lambda environ, start_response: apps[0](environ, start_response), "127.0.0.1", 0,
                        http_limits(ServerConfig(models=[])))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield server.socket.getsockname()[1], apps
    server.request_drain()
    server.request_drain()
    thread.join(10)


def get(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return sock


def test_each_write_of_a_streaming_response_reaches_the_client_before_the_next(plain_server):
    """A request thread sends what it writes itself (the event loop keeps out of a running write):
    the app writes its next piece only once the client has seen the last one."""
    port, apps = plain_server
    seen = [threading.Event() for _ in range(3)]

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        for i, event in enumerate(seen):
            yield f"data: piece {i}\n\n".encode()
            if not event.wait(15):
                return

    apps.append(app)
    sock, data = get(port), b""
    for i, event in enumerate(seen):
        while f"piece {i}".encode() not in data:
            data += sock.recv(65536) or pytest.fail(f"closed before piece {i}: {data!r}")
        event.set()
    sock.close()


def test_a_slow_reader_gets_every_byte_of_writes_bigger_than_the_socket_buffers(plain_server):
    """What a write cannot send at once (the client reads slower than the app writes) the event loop
    sends as the client reads, while the app still runs: the app waits for the client to have it all.
    The third write finds more than waitress's high watermark (16 MiB) unsent, and waits in it for
    the loop to send."""
    port, apps = plain_server
    piece, pieces = 12 * 1024 * 1024, 3
    received, gave_up = threading.Event(), threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(piece * pieces))])
        for i in range(pieces):
            yield bytes([65 + i]) * piece
        if not received.wait(10):  # still running: the loop, not the end of the request, flushes the rest
            gave_up.set()

    apps.append(app)
    sock = get(port)
    time.sleep(0.5)  # the writes fill the socket buffers and leave the rest in the channel
    head, body = read_response(sock)
    received.set()
    assert not gave_up.is_set(), "the rest of the response came only once the app had ended"
    assert head.startswith(b"HTTP/1.1 200")
    assert body == b"".join(bytes([65 + i]) * piece for i in range(pieces))
    sock.close()


def test_a_client_that_stops_reading_and_leaves_ends_a_long_stream(plain_server):
    """A client that reads nothing of a stream, then closes: the app's next write fails and the
    request ends (its thread is free again), also while that write waits for the buffer to drain."""
    port, apps = plain_server
    ended = threading.Event()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/event-stream")])
        try:
            for _ in range(200):
                yield b"x" * (1024 * 1024)
        finally:
            ended.set()

    apps.append(app)
    sock = get(port)
    time.sleep(1.0)  # the app has written past the high watermark and waits
    sock.close()
    assert ended.wait(10), "the request went on after its client had left"


# -- many idle connections, on the shared server with the real models ------------------------

def test_idle_flood_past_fd_1023_does_not_stop_chat_or_embeddings(server):
    """1,100 idle connections: chats and embeddings still get 200 (not 499), and a stream still
    arrives chunk by chunk."""
    raise_fd_limit(IDLE_CONNECTIONS + 200)
    with ExitStack() as stack:
        for _ in range(IDLE_CONNECTIONS):
            stack.enter_context(socket.create_connection(("127.0.0.1", server.port), timeout=30))
        with httpx.Client(base_url=server.url, timeout=120) as client:
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200, r.text
            r = client.post("/v1/embeddings", json=EMBED)
            assert r.status_code == 200, r.text
            assert len(r.json()["data"][0]["embedding"]) == 384
            arrivals, payload = [], b""
            with client.stream("POST", "/v1/chat/completions", json={
                    **CHAT, "max_tokens": 24, "stream": True, "temperature": 0,
                    "messages": [{"role": "user", "content": "Write a story about a dragon."}]}) as r:
                assert r.status_code == 200
                for piece in r.iter_raw():
                    arrivals.append(time.monotonic())
                    payload += piece
    events = [line[6:] for line in payload.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "error" not in json.loads(events[-2])
    # Each chunk is sent as it is generated, not held back: a buffering server sends them in one go.
    assert len(arrivals) >= 3, arrivals
    assert server.health()["status"] == "ok"


# -- bounds and timeouts, on a small server ----------------------------------------------------

BOUNDS = """http_threads = 3
max_connections = 8
idle_timeout = 60.0
read_timeout = 2.0
max_header_bytes = 8192
queue_timeout = 120.0
""" + model_config("no-worker-chat", CHAT_PATH, workers=0) \
    + model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", ctx_size=512, threads=2)


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    """max_connections 8, 3 request threads, read_timeout 2 s; a chat model without workers (its
    requests wait in the queue, holding a request thread) and the real embedding model."""
    srv = ServerProcess(BOUNDS, tmp_path_factory.mktemp("bounded"))
    yield srv
    srv.stop()


def test_past_the_connection_bound_a_new_client_gets_503_and_others_are_served(bounded):
    with httpx.Client(base_url=bounded.url, timeout=60) as healthy, ExitStack() as stack:
        assert healthy.post("/v1/embeddings", json=EMBED).status_code == 200  # its connection stays open
        refused = None
        for _ in range(20):  # keep-alive connections, each after one request, until the bound refuses one
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", bounded.port), timeout=30))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = sock.recv(65536)
            if b" 503 " in answer.split(b"\r\n", 1)[0]:
                refused = answer
                break
            assert answer.startswith(b"HTTP/1.1 200"), answer
        assert refused is not None, "no connection was refused past max_connections = 8"
        started = time.monotonic()
        with httpx.Client(base_url=bounded.url, timeout=30) as newcomer:
            r = newcomer.get("/v1/models")
        assert time.monotonic() - started < 10
        err = assert_api_error(r, 503, "server_busy")
        assert "8" in err["message"] and r.headers["Retry-After"] == "1"
        r = healthy.post("/v1/embeddings", json=EMBED)
        assert r.status_code == 200, r.text
    # The bound is on open connections: once they close, new clients are served again.
    assert wait_for(lambda: httpx.get(f"{bounded.url}/v1/models", timeout=30).status_code == 200, 30)


def test_past_the_thread_bound_requests_get_503_until_threads_free_up(bounded):
    """Requests for a model with no worker wait in its queue, each holding one of the 3 request
    threads; a fourth request is refused (after waiting a second for a thread). Closing the waiting
    clients cancels their jobs."""
    body = json.dumps({"model": "no-worker-chat", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def queued() -> int:
        return bounded.health()["models"].get("no-worker-chat", {}).get("queued", 0)

    with ExitStack() as stack:
        for expected in (1, 2):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", bounded.port), timeout=30))
            sock.sendall(request)
            assert wait_for(lambda: queued() == expected, 30), bounded.health()
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", bounded.port), timeout=30))
        sock.sendall(request)  # the third thread: none is left for anything else
        r = wait_for(lambda: (r := httpx.get(f"{bounded.url}/v1/models", timeout=30)).status_code == 503 and r, 30)
        assert r, "no request was refused with every request thread taken"
        err = assert_api_error(r, 503, "server_busy")
        assert "thread" in err["message"] and r.headers["Retry-After"] == "1"
    # The clients left: their jobs leave the queue and the threads serve again.
    assert wait_for(lambda: httpx.get(f"{bounded.url}/health", timeout=30).status_code == 200, 30)
    assert wait_for(lambda: queued() == 0, 30), bounded.health()


def test_a_client_that_sends_nothing_or_drips_headers_is_cut_after_the_read_timeout(bounded):
    with socket.create_connection(("127.0.0.1", bounded.port), timeout=30) as silent:
        took = closed_by_server(silent, timeout=20)
        assert took is not None, "a silent connection was not closed"
        assert took >= 1.0  # the read timeout (2 s), not at once
    with socket.create_connection(("127.0.0.1", bounded.port), timeout=30) as dripping:
        dripping.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started, cut = time.monotonic(), False
        for i in range(200):  # 200 headers, one every 0.1 s: 20 s for a request that never completes
            try:
                dripping.sendall(f"X-Drip-{i}: y\r\n".encode())
            except OSError:
                cut = True
                break
            if closed_by_server(dripping, timeout=0.1) is not None:
                cut = True
                break
        assert cut, "a client dripping its headers was never cut"
        assert 1.0 <= time.monotonic() - started < 15
    assert httpx.get(f"{bounded.url}/health", timeout=30).status_code == 200


def test_keep_alive_connections_stay_open_between_requests_past_the_read_timeout(bounded):
    """Between requests idle_timeout (60 s here) applies, not read_timeout (2 s)."""
    with socket.create_connection(("127.0.0.1", bounded.port), timeout=30) as sock:
        for _ in range(2):
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head, body = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower(), head
            assert json.loads(body)["object"] == "list"
            time.sleep(3)


def test_oversized_headers_are_431(bounded):
    r = httpx.get(f"{bounded.url}/v1/models", headers={"X-Big": "a" * 10_000}, timeout=30)
    assert_api_error(r, 431, "header_too_large")
    r = httpx.get(f"{bounded.url}/v1/models", headers={f"X-H{i}": "a" * 100 for i in range(100)}, timeout=30)
    assert_api_error(r, 431, "header_too_large")
    assert httpx.get(f"{bounded.url}/v1/models", timeout=30).status_code == 200


def test_request_threads_start_as_requests_need_them_up_to_the_bound(tmp_path):
    """Idle request threads cost memory, so only a few start with the server: 11 requests waiting
    in a queue (each holding a thread) start the rest, the twelfth thread still serves, and past
    http_threads = 12 a request is refused."""
    srv = ServerProcess("http_threads = 12\nqueue_timeout = 120.0\n" + model_config("no-worker-chat", CHAT_PATH, workers=0),
                        tmp_path)
    body = json.dumps({"model": "no-worker-chat", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)

    def threads() -> int:
        return int(Path(f"/proc/{srv.proc.pid}/status").read_text().split("Threads:")[1].split()[0])

    def queued() -> int:
        return srv.health()["models"].get("no-worker-chat", {}).get("queued", 0)

    try:
        at_start = threads()
        with ExitStack() as stack:
            for expected in range(1, 12):
                sock = stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), timeout=30))
                sock.sendall(request)
                assert wait_for(lambda: queued() == expected, 30), srv.health()
            assert httpx.get(f"{srv.url}/v1/models", timeout=30).status_code == 200  # the twelfth thread
            assert threads() >= at_start + 3  # started as the requests came (8 at start, 12 now)
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", srv.port), timeout=30))
            sock.sendall(request)  # the twelfth thread: none is left for anything else
            r = wait_for(lambda: (r := httpx.get(f"{srv.url}/v1/models", timeout=30)).status_code == 503 and r, 30)
            assert r, "no request was refused with all 12 request threads taken"
            assert "12 request threads" in assert_api_error(r, 503, "server_busy")["message"]
    finally:
        srv.stop()


# -- SIGTERM drains ----------------------------------------------------------------------------

def drain_server(tmp_path, drain_timeout: float) -> ServerProcess:
    config = f"drain_timeout = {drain_timeout}\n" + model_config(CHAT_MODEL, CHAT_PATH, parallel=2, threads=2)
    return ServerProcess(config, tmp_path)


def refused_soon(port: int, timeout: float = 10) -> bool:
    """True once connecting is refused. A connection that lands in the backlog just as the listener closes is
    reset instead (the server is closing, not refusing yet): that attempt is simply made again."""
    def refused():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        except ConnectionResetError:
            return False
        return False
    return bool(wait_for(refused, timeout, interval=0.05))


def test_sigterm_lets_a_running_stream_finish_then_exits_0(tmp_path):
    srv = drain_server(tmp_path, drain_timeout=120)
    try:
        upload = srv.http.post("/v1/files", files={"file": ("notes.md", b"# Notes\n\nParis is in France.\n")})
        assert upload.status_code == 200, upload.text
        with srv.http.stream("POST", "/v1/chat/completions", json={
                **CHAT, "stream": True, "max_tokens": 60, "temperature": 0,
                "messages": [{"role": "user", "content": "Write a story about a dragon."}]}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            os.kill(srv.proc.pid, signal.SIGTERM)  # the server only: its workers must finish the stream
            assert refused_soon(srv.port), "the server still accepts connections while draining"
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        assert "error" not in last and last["choices"][0]["finish_reason"] in ("stop", "length")
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
    with Store(str(tmp_path / "store.db")) as store:  # closed cleanly; nothing lost
        assert [f.filename for f in store.list_files()] == ["notes.md"]


def test_sigterm_cancels_streams_still_running_at_the_drain_deadline(tmp_path):
    srv = drain_server(tmp_path, drain_timeout=1)
    try:
        # Greedy counting goes on for far longer than the deadline (minutes to 1500 tokens here).
        with srv.http.stream("POST", "/v1/chat/completions", json={
                **CHAT, "stream": True, "max_tokens": 1500, "temperature": 0,
                "messages": [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            signalled = time.monotonic()
            os.kill(srv.proc.pid, signal.SIGTERM)
            rest = [line[6:] for line in lines if line.startswith("data: ")]
        # Cancelled at the deadline: an error event, then [DONE].
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["error"]["code"] == "shutting_down"
        assert time.monotonic() - signalled < 60
        assert srv.proc.wait(60) == 0
    finally:
        srv.stop()
