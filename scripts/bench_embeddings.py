"""Embeddings benchmark (``scripts/bench.py --scenario embeddings``): texts embedded per second by
edgellm and by llama.cpp's llama-server on the same model (all-MiniLM-L6-v2, mean pooling), side by
side in one run, in two loads:

- batch 32: 2 clients, each sending requests of 32 texts one after the other;
- batch 1: 8 clients, each sending requests of one text one after the other.

Every client keeps one HTTP/1.1 connection open for all its requests (as OpenAI's SDK does); a
server that closes it makes the client reconnect, which the figures then include. Each server
runs with 4 slots and the same threads; texts are distinct sentences of 8 to 20 words.

    .venv/bin/python scripts/bench.py --scenario embeddings --out BENCHMARKS.md
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = "all-MiniLM-L6-v2"
MODEL_PATH = REPO / "models" / "all-MiniLM-L6-v2.gguf"
SLOTS = 4
LOADS = {"batch 32": (2, 32), "batch 1": (8, 1)}  # name -> (clients, texts per request)
WORDS = ("edge server model token river cloud garden window music paper light stone market winter "
         "signal table kernel forest letter number engine bridge planet coffee memory story").split()


@dataclass
class Rate:
    server: str
    load: str
    texts: int
    seconds: float
    failed: int
    reconnects: int

    @property
    def per_second(self) -> float:
        return self.texts / self.seconds if self.seconds else 0.0


def texts_for(client: int, request: int, count: int) -> list[str]:
    rng = random.Random(client * 100_003 + request)
    return [f"{client}-{request}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            for i in range(count)]


def client_loop(port: int, client: int, per_request: int, requests: int, out: dict) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    done = failed = reconnects = 0
    for request in range(requests):
        body = json.dumps({"model": MODEL, "input": texts_for(client, request, per_request)})
        try:
            conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            if response.status == 200 and len(json.loads(payload)["data"]) == per_request:
                done += per_request
            else:
                failed += 1
            if response.getheader("Connection", "").lower() == "close":
                conn.close()
                reconnects += 1
        except (OSError, http.client.HTTPException, ValueError):
            failed += 1
            conn.close()
            reconnects += 1
    conn.close()
    out[client] = (done, failed, reconnects)


def measure_load(server: str, port: int, load: str, requests_per_client: int) -> Rate:
    clients, per_request = LOADS[load]
    for warm in range(2):  # the model's first decodes and the connections' set-up are not measured
        client_loop(port, 1000 + warm, per_request, 2, {})
    out: dict = {}
    threads = [threading.Thread(target=client_loop, args=(port, c, per_request, requests_per_client, out))
               for c in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - started
    return Rate(server, load, sum(v[0] for v in out.values()), seconds, sum(v[1] for v in out.values()),
                sum(v[2] for v in out.values()))


def start_edgellm(bench, args):
    port = bench.free_port()
    exe = Path(bench.sys.executable).parent / "edgellm"
    launcher = [str(exe)] if exe.exists() else [bench.sys.executable, str(REPO / "server.py")]
    cmd = [*launcher, "--model-name", MODEL, "--model-path", str(MODEL_PATH), "--model-kind", "embedding",
           "--parallel", str(SLOTS), "--threads", str(args.threads), "--ctx-size", "512", "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", "--store-path", str(bench.CACHE / "embeddings.db")]
    srv = bench.Server("edgellm", cmd, port, "/health", bench.logs_dir() / "edgellm-embeddings.log")
    srv.wait_ready(args.start_timeout)
    return srv


def start_llama_server(bench, args):
    port = bench.free_port()
    cmd = [args.llama_server, "-m", str(MODEL_PATH), "-t", str(args.threads), "-tb", str(args.threads),
           "-np", str(SLOTS), "-c", str(512 * SLOTS), "--embedding", "--pooling", "mean", "--host", "127.0.0.1",
           "--port", str(port), "--no-webui"]
    srv = bench.Server("llama-server", cmd, port, "/health", bench.logs_dir() / "llama-server-embeddings.log")
    srv.wait_ready(args.start_timeout)
    return srv


def report(rates: list[Rate], command: str, machine: str, repeat: int = 1) -> str:
    median = (f" Both servers run side by side; each load was measured {repeat} times, the servers in turn, "
              "and the row shown is the run with the median texts/s.") if repeat > 1 else ""
    lines = ["## Embeddings (`--scenario embeddings`)", "",
             f"`{command}` on {machine}. {MODEL} (mean pooling), {SLOTS} slots in each server. batch 32: "
             "2 clients each sending requests of 32 texts; batch 1: 8 clients each sending one text per "
             "request; each client keeps one HTTP/1.1 connection (reconnects: how often a server closed it). "
             f"Texts: distinct sentences of 8 to 20 words (scripts/bench_embeddings.py).{median}", "",
             "| load | server | texts | seconds | texts/s | failed requests | reconnects | ÷ llama-server (target ≥ 1.0) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for load in LOADS:
        peer = next((r for r in rates if r.load == load and r.server == "llama-server"), None)
        for r in (r for r in rates if r.load == load):
            ratio = "-"
            if r.server == "edgellm" and peer is not None and peer.per_second:
                value = r.per_second / peer.per_second
                ratio = f"{value:.2f}: **{'met' if value >= 1.0 else 'missed'}**"
            lines.append(f"| {load} | {r.server} | {r.texts} | {r.seconds:.1f} | {r.per_second:.1f} | {r.failed} "
                         f"| {r.reconnects} | {ratio} |")
    return "\n".join(lines) + "\n"
