"""The worker port is safe to expose: each attack on it reproduced against the real server.

A server with a real local chat worker (ipc) and a remote worker address on loopback tcp with
CURVE, whose authorized key "pi-a" is bound to the model "remote-a". The attackers are rogue
peers from tests/fake_worker.py (the real WorkerLoop with a fake engine, or bare DEALER sockets)
holding that key, a key that is not authorized, or no key at all. Then: the start-up refusals,
and what happens when the broker thread dies (a fault injected into a server process, since no
message can kill it any more). Fast unit tests of the pieces come last.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import zmq
import zmq.auth

from conftest import CHAT_MODEL, CHAT_PATH, ROOT, ServerProcess, broker_limits, free_port, model_config, wait_for
from frontend.broker import Broker, Watchdog
from frontend.config import is_loopback
from frontend.errors import APIError
from frontend.jobs import JobRunner
from frontend.worker_guard import PeerLimiter, ThrottledLog
from worker.keys import KeyFileError, authorized_keys

NO_FILE = ROOT / "no-model-file.gguf"
FAKE = ROOT / "tests" / "fake_worker.py"


def make_keys(folder, name, *extra) -> tuple:
    subprocess.run([sys.executable, str(ROOT / "server.py"), "keys", name, "--dir", str(folder), *extra],
                   capture_output=True, text=True, check=True)
    return folder / f"{name}.key", folder / f"{name}.key_secret"


def chat(srv, model: str = CHAT_MODEL, timeout: float = 120) -> dict:
    r = srv.http.post("/v1/chat/completions", timeout=timeout, json={
        "model": model, "temperature": 0, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] >= 1 and body["model"] == model
    return body


def workers(srv, model: str = CHAT_MODEL) -> list[dict]:
    return srv.health()["models"].get(model, {}).get("workers", [])


def pids(srv, model: str) -> set[int]:
    return {w["pid"] for w in workers(srv, model)}


def vm_kib(pid: int, field: str) -> int:
    """A memory figure of a process from /proc/PID/status, in KiB (VmRSS: now; VmHWM: its peak)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    """The server, with its keys: pi-a (authorized, bound to remote-a) and stranger (not authorized)."""
    tmp = tmp_path_factory.mktemp("worker_port")
    keys, authorized = tmp / "keys", tmp / "authorized"
    server_public, server_secret = make_keys(keys, "server")
    pi_public, pi_secret = make_keys(keys, "pi-a", "--models", "remote-a")
    _, stranger_secret = make_keys(keys, "stranger")
    authorized.mkdir()
    (authorized / "pi-a.key").write_bytes(pi_public.read_bytes())
    remote = f"tcp://127.0.0.1:{free_port()}"
    config = "queue_timeout = 10.0\nrequest_timeout = 30.0\n" \
        + model_config(CHAT_MODEL, CHAT_PATH, parallel=2, threads=1, ctx_size=512) \
        + model_config("remote-a", NO_FILE, workers=0)
    srv = ServerProcess(config, tmp, extra_args=[
        "--remote-worker-addr", remote, "--curve-secret-key-file", str(server_secret),
        "--curve-authorized-keys", str(authorized)])
    srv.remote_addr = remote
    srv.keys = {"pi-a": pi_secret, "stranger": stranger_secret}
    srv.server_public = server_public
    srv.record = tmp / "jobs-the-rogue-got.txt"
    yield srv
    srv.stop()


@pytest.fixture
def rogues(port):
    """start(mode, key, model, *options): a fake worker on the remote address, killed after the test."""
    started = []

    def start(mode: str, key: str | None = "pi-a", model: str = "remote-a", *options: str) -> subprocess.Popen:
        curve = ["--curve-server-key-file", str(port.server_public), "--curve-secret-key-file",
                 str(port.keys[key])] if key else []
        proc = subprocess.Popen([sys.executable, str(FAKE), "--connect", port.remote_addr, "--model-name", model,
                                 "--mode", mode, *curve, *options], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def log_has(srv, text: str, timeout: float = 30.0) -> bool:
    return bool(wait_for(lambda: text in srv.log_path.read_text(errors="replace"), timeout, 0.2))


def test_a_stolen_model_name_is_refused_and_never_gets_a_job(port, rogues):
    """Attack 1: a remote worker registers the name of a served model with 1000 slots."""
    [local] = workers(port)
    rogues("echo", "pi-a", CHAT_MODEL, "--slots", "1000", "--record", str(port.record))
    assert log_has(port, f"its key may serve remote-a, not model '{CHAT_MODEL}'"), port.log_text()
    for _ in range(3):
        chat(port)
    assert [w["pid"] for w in workers(port)] == [local["pid"]]
    assert not port.record.exists(), "the rogue was given a job"


def test_a_remote_worker_may_not_claim_more_slots_than_the_cap(port, rogues):
    rogue = rogues("echo", "pi-a", "remote-a", "--slots", "1000", "--record", str(port.record))
    assert log_has(port, "a remote worker may register at most 64 slots, not 1000"), port.log_text()
    assert rogue.pid not in pids(port, "remote-a")
    assert not port.record.exists()


def test_a_key_bound_to_one_model_cannot_register_another(port, rogues):
    rogues("echo", "pi-a", "remote-b")
    assert log_has(port, "its key may serve remote-a, not model 'remote-b'"), port.log_text()
    good = rogues("echo", "pi-a", "remote-a")
    assert wait_for(lambda: good.pid in pids(port, "remote-a"), 30), port.log_text()
    assert chat(port, "remote-a")["choices"][0]["message"]["content"] == "hello world"
    assert "remote-b" not in [m["id"] for m in port.http.get("/v1/models").json()["data"]]
    assert port.http.post("/v1/chat/completions", json={
        "model": "remote-b", "messages": [{"role": "user", "content": "Hi"}]}).json()["error"]["code"] == \
        "model_not_found"


def test_an_unknown_key_is_refused_and_logged(port, rogues):
    """Attack 2: a worker with a key pair of its own making."""
    stranger_public, _ = zmq.auth.load_certificate(port.keys["stranger"])
    rogue = rogues("echo", "stranger", "remote-a")
    assert log_has(port, f"refused a remote worker: its CURVE public key {stranger_public.decode()}"), \
        port.log_text()
    assert rogue.pid not in pids(port, "remote-a")


def test_a_worker_without_curve_cannot_connect(port, rogues):
    rogue = rogues("echo", None, "remote-a", "--record", str(port.record))
    time.sleep(3)
    assert rogue.pid not in pids(port, "remote-a") and not port.record.exists()


def test_a_ready_nested_100000_deep_is_dropped(port, rogues):
    """Attack 3: it used to kill the broker thread with a RecursionError while /health said ok."""
    rogues("deep-ready")
    assert log_has(port, "nests deeper than 32"), port.log_text()
    assert port.http.get("/health").json()["status"] == "ok"
    chat(port, timeout=60)


def test_a_heartbeat_flood_does_not_drop_the_local_workers(port, rogues):
    """Attack 5: a peer flooding heartbeats used to keep the broker on its socket until the local
    workers' heartbeats went unread and they were dropped."""
    [local] = workers(port)
    flood = rogues("flood", "pi-a", "remote-a", "--seconds", "8")
    assert wait_for(lambda: flood.pid in pids(port, "remote-a"), 30), port.log_text()
    answered = 0
    while flood.poll() is None:
        chat(port, timeout=60)
        assert [w["pid"] for w in workers(port)] == [local["pid"]]
        answered += 1
    sent = int(flood.stdout.read().split()[2])
    assert sent > 200 * 8 * 2, f"the flood was too weak to test anything: {sent} heartbeats"
    assert answered >= 1
    assert log_has(port, "sends more than 200 messages a second"), port.log_text()
    assert f"for model '{CHAT_MODEL}' removed" not in port.log_text()
    assert [w["pid"] for w in workers(port)] == [local["pid"]]


def test_an_oversized_message_is_dropped_without_growing_memory(port, rogues):
    """Attack 6: a 2 GiB frame was read whole into memory; now the socket drops a peer whose frame
    is over worker_max_message_bytes (4 MiB) as soon as the frame's header arrives."""
    size = 128 << 20
    pid = port.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the present
    before = vm_kib(pid, "VmHWM")
    rogue = rogues("oversized", "pi-a", "remote-a", "--size", str(size), "--seconds", "3")
    assert rogue.wait(60) == 0
    assert port.http.get("/health").json()["status"] == "ok"
    chat(port, timeout=60)
    grown = vm_kib(pid, "VmHWM") - before
    assert grown < (size >> 10) // 4, f"the server's peak memory grew by {grown} KiB"


def test_many_idle_connections_do_not_hurt(port, rogues):
    """Attack 4: 1,100 TCP connections to the worker port that never say anything."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    host, tcp_port = port.remote_addr[len("tcp://"):].rsplit(":", 1)
    idle = []
    try:
        for _ in range(1100):
            idle.append(socket.create_connection((host, int(tcp_port)), timeout=5))
        time.sleep(1)
        assert port.http.get("/health").json()["status"] == "ok"
        chat(port, timeout=60)
        good = rogues("echo", "pi-a", "remote-a")  # a real remote worker still gets in beside them
        assert wait_for(lambda: good.pid in pids(port, "remote-a"), 30), port.log_text()
        assert chat(port, "remote-a")["choices"][0]["message"]["content"] == "hello world"
    finally:
        for conn in idle:
            conn.close()
        if soft < 1500:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- start-up refusals -------------------------------------------------------------------------
def refuses(tmp_path, *args: str) -> str:
    """Start the server with these flags; it must exit with status 2 at once. Returns its output."""
    out = subprocess.run([sys.executable, str(ROOT / "server.py"), "--model-name", "m", "--model-path",
                          str(NO_FILE), "--workers", "0", "--port", str(free_port()), "--store-path",
                          str(tmp_path / "store.db"), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    return out.stdout + out.stderr


def test_a_network_address_without_curve_refuses_to_start(tmp_path):
    port = free_port()
    assert "reachable from the network" in refuses(tmp_path, "--remote-worker-addr", f"tcp://0.0.0.0:{port}")
    assert "reachable from the network" in refuses(tmp_path, "--remote-worker-addr", f"tcp://*:{port}")
    assert "reachable from the network" in refuses(tmp_path, "--worker-addr", f"tcp://0.0.0.0:{port}")


def test_curve_without_authorized_keys_refuses_to_start(tmp_path):
    _, secret = make_keys(tmp_path / "keys", "server")
    out = refuses(tmp_path, "--remote-worker-addr", f"tcp://0.0.0.0:{free_port()}", "--curve-secret-key-file",
                  str(secret))
    assert "without curve_authorized_keys would let in any worker" in out


def test_a_key_without_its_models_refuses_to_start(tmp_path):
    _, secret = make_keys(tmp_path / "keys", "server")
    authorized = tmp_path / "authorized"
    make_keys(authorized, "pi-unbound")
    out = refuses(tmp_path, "--remote-worker-addr", f"tcp://0.0.0.0:{free_port()}", "--curve-secret-key-file",
                  str(secret), "--curve-authorized-keys", str(authorized))
    assert "must say which models its worker may serve" in out


# -- the broker thread dies --------------------------------------------------------------------
BREAKING_SERVER = """
import sys
sys.path.insert(0, {root!r})
from frontend.broker import Broker
dispatch = Broker._dispatch
def broken_dispatch(self):
    if "break-the-broker" in self.pools:
        raise RuntimeError("injected fault")
    dispatch(self)
Broker._dispatch = broken_dispatch
import server
sys.exit(server.main(sys.argv[1:]))
"""


def test_a_dead_broker_is_a_503_and_the_server_exits_non_zero(tmp_path):
    """A fault injected into the broker loop of a real server process (its loop runs outside the
    per-message guard, so this is how a bug there would end it)."""
    http_port = free_port()
    config = tmp_path / "edgellm.toml"
    config.write_text("queue_timeout = 60.0\n" + model_config("break-the-broker", NO_FILE, workers=0))
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", BREAKING_SERVER.format(root=str(ROOT)), "--config",
                                 str(config), "--host", "127.0.0.1", "--port", str(http_port), "--store-path",
                                 str(tmp_path / "store.db"), "--worker-addr", f"ipc://{tmp_path}/w.ipc"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30)
    statuses: list[tuple[int, str]] = []

    def watch_health():
        while proc.poll() is None:
            try:
                r = http.get("/health", timeout=2)
                statuses.append((r.status_code, r.json()["status"]))
            except (httpx.TransportError, ValueError):
                pass
            time.sleep(0.05)

    def up() -> bool:
        try:
            return http.get("/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    watcher = threading.Thread(target=watch_health, daemon=True)
    try:
        assert wait_for(up, 30), (tmp_path / "server.log").read_text()
        watcher.start()
        started = time.monotonic()
        r = http.post("/v1/chat/completions", json={"model": "break-the-broker",
                                                    "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "broker_down", r.text
        assert r.headers["Retry-After"]
        assert time.monotonic() - started < 20  # not the 60s queue timeout
        assert proc.wait(30) == 1
        watcher.join(5)
        assert (503, "broker_down") in statuses, statuses
        assert "the broker thread failed: RuntimeError: injected fault" in (tmp_path / "server.log").read_text()
    finally:
        http.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- fast unit tests ---------------------------------------------------------------------------
def test_watchdog_reports_a_problem_once():
    class FakeBroker:
        answers = iter([None, None, "the broker thread failed: boom"])

        def problem(self):
            return next(self.answers, "the broker thread failed: boom")

    seen = []
    watchdog = Watchdog(FakeBroker(), seen.append, interval=0.01).start()
    assert wait_for(lambda: seen, 5, 0.01)
    time.sleep(0.1)
    watchdog.stop()
    assert seen == ["the broker thread failed: boom"]


def test_watchdog_stays_quiet_while_the_broker_is_fine():
    class HealthyBroker:
        def problem(self):
            return None

    seen = []
    watchdog = Watchdog(HealthyBroker(), seen.append, interval=0.01).start()
    time.sleep(0.2)
    watchdog.stop()
    assert seen == []


def test_a_broker_whose_loop_raises_says_so_and_waiting_requests_fail_at_once(monkeypatch):
    context = zmq.Context()
    broker = Broker(f"inproc://workers-{uuid.uuid4().hex}", context=context, limits=broker_limits(4, 60.0),
                    heartbeat_interval=0.05)
    runner = JobRunner(broker.clients_addr, queue_timeout=60, request_timeout=60, context=context,
                       broker_problem=broker.problem)
    try:
        broker.start()
        assert broker.problem() is None

        def broken(now):
            if broker.pools:
                raise RuntimeError("injected fault")
        monkeypatch.setattr(broker, "_expire", broken)
        started = time.monotonic()
        with pytest.raises(APIError) as raised:
            runner.collect("m", {"kind": "chat", "messages": []})
        assert raised.value.code == "broker_down" and raised.value.status == 503
        assert time.monotonic() - started < 10
        assert "RuntimeError: injected fault" in broker.problem()
        with pytest.raises(APIError, match="cannot reach its workers"):
            runner.collect("m", {"kind": "chat", "messages": []})
    finally:
        broker.stop()
        context.destroy(linger=0)


def test_peer_limiter_drops_beyond_the_rate_and_logs_once_per_interval(caplog):
    caplog.set_level(logging.WARNING)
    limiter = PeerLimiter(10, logging.getLogger("test.limiter"), interval=5)
    now = 100.0
    assert all(limiter.allow("a", "a", now) for _ in range(10))  # the burst
    assert not any(limiter.allow("a", "a", now) for _ in range(1000))
    assert limiter.allow("b", "b", now)  # another peer has its own bucket
    assert len(caplog.records) == 1
    assert limiter.allow("a", "a", now + 0.15) and not limiter.allow("a", "a", now + 0.15)  # 10/s refill
    assert len(caplog.records) == 1
    limiter.forget_idle(now + 60)
    assert limiter._buckets == {}


def test_throttled_log_says_how_many_it_held_back(caplog):
    caplog.set_level(logging.WARNING)
    throttled = ThrottledLog(logging.getLogger("test.throttled"), interval=0.2)
    for _ in range(50):
        throttled.warning("key", "bad thing from %s", "peer")
    throttled.warning("other", "another thing")
    time.sleep(0.25)
    throttled.warning("key", "bad thing from %s", "peer")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["bad thing from peer", "another thing"]
    assert messages[2].startswith("bad thing from peer (49 more like it")


@pytest.mark.parametrize("addr, loopback", [
    ("ipc:///run/user/1000/edgellm.ipc", True), ("tcp://127.0.0.1:5555", True), ("tcp://127.1.2.3:5555", True),
    ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True), ("tcp://0.0.0.0:5555", False),
    ("tcp://*:5555", False), ("tcp://192.168.1.10:5555", False), ("tcp://eth0:5555", False),
    ("tcp://[::]:5555", False), ("ws://127.0.0.1:5555", False),
])
def test_is_loopback(addr, loopback):
    assert is_loopback(addr) == loopback


def test_keys_bound_to_models(tmp_path):
    public, _ = make_keys(tmp_path, "pi", "--models", "a, b")
    other, _ = make_keys(tmp_path / "other", "pi2", "--models", "c")
    (tmp_path / "pi2.key").write_bytes(other.read_bytes())
    key, _ = zmq.auth.load_certificate(public)
    bindings = authorized_keys(tmp_path)
    assert bindings[key.decode()] == {"a", "b"} and len(bindings) == 2
    (tmp_path / "copy.key").write_bytes(public.read_bytes())
    with pytest.raises(KeyFileError, match="also in another file"):
        authorized_keys(tmp_path)
    with pytest.raises(KeyFileError, match="does not exist"):
        authorized_keys(tmp_path / "missing")
    assert os.stat(tmp_path / "pi.key_secret").st_mode & 0o777 == 0o600
