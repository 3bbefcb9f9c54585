"""Workers started by hand connecting over tcp (loopback here), with and without CURVE.

Plain tcp is allowed on loopback only (a test set-up: any local process may then register any
model name, and the server warns); CURVE keys are bound to the model names they may serve.
The attacks on this port are in tests/test_worker_port.py."""

from __future__ import annotations

import subprocess
import sys

from conftest import CHAT_PATH, ROOT, ServerProcess, free_port, model_config, wait_for


def start_worker(addr: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / "server.py"), "worker", "--connect", addr,
                             "--model-name", "remote-smol", "--model-path", str(CHAT_PATH), "--threads", "1",
                             *extra])


def registered(srv) -> int:
    return len(srv.health()["models"].get("remote-smol", {}).get("workers", []))


def wait_registered(srv, timeout=60) -> bool:
    return bool(wait_for(lambda: registered(srv), timeout, interval=0.2))


def make_keys(folder, name, *extra):
    out = subprocess.run([sys.executable, str(ROOT / "server.py"), "keys", name, "--dir", str(folder), *extra],
                         capture_output=True, text=True, check=True)
    assert "secret key" in out.stdout
    return folder / f"{name}.key", folder / f"{name}.key_secret"


def chat_works(srv) -> bool:
    """A chat served by the remote worker: 200, an answer of at least one token, the model echoed."""
    r = srv.http.post("/v1/chat/completions", json={
        "model": "remote-smol", "temperature": 0, "max_tokens": 40, "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "remote-smol"
    assert body["usage"]["completion_tokens"] > 0, body
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    return True


def test_remote_worker_over_tcp(tmp_path):
    addr = f"tcp://127.0.0.1:{free_port()}"
    srv = ServerProcess(model_config("remote-smol", CHAT_PATH, workers=0), tmp_path,
                        extra_args=["--remote-worker-addr", addr])
    worker = start_worker(addr)
    try:
        assert wait_registered(srv), srv.log_text()
        assert "remote-smol" in [m["id"] for m in srv.http.get("/v1/models").json()["data"]]
        assert chat_works(srv)
        assert f"remote workers on {addr} connect WITHOUT authentication" in srv.log_text()
    finally:
        worker.terminate()
        worker.wait(10)
        srv.stop()


def test_remote_worker_with_curve(tmp_path):
    keys, authorized, stranger_keys = tmp_path / "keys", tmp_path / "authorized", tmp_path / "stranger"
    server_public, server_secret = make_keys(keys, "server")
    worker_public, worker_secret = make_keys(keys, "pi-kitchen", "--models", "remote-smol")
    _, stranger_secret = make_keys(stranger_keys, "stranger")
    authorized.mkdir()
    (authorized / "pi-kitchen.key").write_bytes(worker_public.read_bytes())

    addr = f"tcp://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    state.mkdir()
    srv = ServerProcess(model_config("remote-smol", CHAT_PATH, workers=0), state, extra_args=[
        "--remote-worker-addr", addr, "--curve-secret-key-file", str(server_secret),
        "--curve-authorized-keys", str(authorized)])
    workers = []
    try:
        # A worker whose key is not authorized never gets to register.
        workers.append(start_worker(addr, "--curve-server-key-file", str(server_public),
                                    "--curve-secret-key-file", str(stranger_secret)))
        # Nor does one that speaks plain tcp to a CURVE socket.
        workers.append(start_worker(addr))
        assert not wait_registered(srv, timeout=8)
        workers.append(start_worker(addr, "--curve-server-key-file", str(server_public),
                                    "--curve-secret-key-file", str(worker_secret)))
        assert wait_registered(srv), srv.log_text()
        assert registered(srv) == 1
        assert chat_works(srv)
    finally:
        for w in workers:
            w.terminate()
            w.wait(10)
        srv.stop()
