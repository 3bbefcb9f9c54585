"""Footprint benchmark (``scripts/bench.py --scenario footprint``): what a server costs while it
waits, side by side with llama.cpp's llama-server on the same models.

For edgellm on its default config (``edgellm.toml``: the chat and the embedding model, each one
worker with 4 slots) and for llama-server on the same two models (one process per model, as it
serves one model, with the same slots and context per slot):

- start-up: from launching the process(es) to ``/health`` answering 200 (every model loaded);
- resident memory (VmRSS) of each process after one chat and one embeddings request, and the
  front end's peak (VmHWM);
- CPU time all of them use over ``--idle-seconds`` of doing nothing;
- per-slot memory: the chat process started with 1 and with 4 slots (2048 tokens of context each),
  one request each; the difference over 3.

    .venv/bin/python scripts/bench.py --scenario footprint --out BENCHMARKS.md
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
CHAT_PATH = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDING_PATH = REPO / "models" / "all-MiniLM-L6-v2.gguf"
CTX_PER_SLOT = 2048
SLOTS = 4
# Issue 12's targets
FRONT_END_MIB = 40
START_SECONDS = 3.0


@dataclass
class Footprint:
    server: str
    start_s: float
    rss_kib: dict[str, int] = field(default_factory=dict)  # process role -> VmRSS
    front_peak_kib: int | None = None
    idle_cpu_s: float | None = None
    idle_seconds: float = 0.0
    slot_kib: float | None = None  # chat process memory per extra slot


def post(port: int, path: str, body: dict, timeout: float = 120) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def chat_once(port: int, model: str) -> None:
    status = post(port, "/v1/chat/completions", {"model": model, "max_tokens": 16, "temperature": 0,
                                                 "messages": [{"role": "user", "content": "Say hello."}]})
    if status != 200:
        raise RuntimeError(f"a chat request to port {port} answered {status}")


def embed_once(port: int, model: str) -> None:
    status = post(port, "/v1/embeddings", {"model": model, "input": ["a first text", "a second one"]})
    if status != 200:
        raise RuntimeError(f"an embeddings request to port {port} answered {status}")


def wait_healthy(bench, servers: list, started: float, timeout: float) -> float:
    """Seconds from ``started`` until every server's /health answers 200 (polled every 20 ms)."""
    pending = list(servers)
    while pending:
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{pending[0].name} was not ready within {timeout:.0f}s; see {pending[0].log_path}")
        for srv in list(pending):
            if srv.proc.poll() is not None:
                raise RuntimeError(f"{srv.name} exited while starting; see {srv.log_path}:\n{srv.tail()}")
            try:
                if bench.http_get(srv.port, "/health", timeout=1)[0] == 200:
                    pending.remove(srv)
            except OSError:
                pass
        if pending:
            time.sleep(0.02)
    return time.monotonic() - started


def idle_cpu(bench, pids: list[int], seconds: float) -> float | None:
    before = [bench.cpu_seconds(pid) for pid in pids]
    time.sleep(seconds)
    after = [bench.cpu_seconds(pid) for pid in pids]
    if None in before or None in after:
        return None
    return sum(after) - sum(before)


def worker_pids(bench, port: int) -> dict[str, int]:
    """The edgellm front end's workers by model, from /health (keyless on localhost)."""
    _, body = bench.http_get(port, "/health", timeout=5)
    models = json.loads(body).get("models", {})
    return {name: worker["pid"] for name, info in models.items() for worker in info.get("workers", [])[:1]}


def edgellm_cmd(port: int, *extra: str) -> list[str]:
    exe = Path(sys.executable).parent / "edgellm"
    launcher = [str(exe)] if exe.exists() else [sys.executable, str(REPO / "server.py")]
    return [*launcher, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra]


def measure_edgellm(bench, args) -> Footprint:
    port = bench.free_port()
    started = time.monotonic()
    srv = bench.Server("edgellm", edgellm_cmd(port, "--config", str(REPO / "edgellm.toml"),
                                              "--store-path", str(bench.CACHE / "footprint.db")),
                       port, "/health", bench.logs_dir() / "edgellm-footprint.log")
    try:
        result = Footprint("edgellm", wait_healthy(bench, [srv], started, args.start_timeout))
        chat_once(port, CHAT_MODEL)
        embed_once(port, EMBEDDING_MODEL)
        workers = worker_pids(bench, port)
        pids = {"front end": srv.proc.pid, **{f"{name} worker": pid for name, pid in workers.items()}}
        time.sleep(2)
        result.idle_cpu_s = idle_cpu(bench, list(pids.values()), args.idle_seconds)
        result.idle_seconds = args.idle_seconds
        result.rss_kib = {role: bench.proc_status(pid).get("VmRSS", 0) for role, pid in pids.items()}
        result.front_peak_kib = bench.proc_status(srv.proc.pid).get("VmHWM")
    finally:
        srv.stop()
    result.slot_kib = per_slot(bench, args, edgellm_slot_rss)
    return result


def edgellm_slot_rss(bench, args, slots: int) -> int:
    port = bench.free_port()
    srv = bench.Server("edgellm", edgellm_cmd(port, "--model-name", CHAT_MODEL, "--model-path", str(CHAT_PATH),
                                              "--parallel", str(slots), "--ctx-size", str(CTX_PER_SLOT),
                                              "--store-path", str(bench.CACHE / "footprint.db")),
                       port, "/health", bench.logs_dir() / f"edgellm-footprint-p{slots}.log")
    try:
        wait_healthy(bench, [srv], time.monotonic(), args.start_timeout)
        chat_once(port, CHAT_MODEL)
        return bench.proc_status(worker_pids(bench, port)[CHAT_MODEL]).get("VmRSS", 0)
    finally:
        srv.stop()


def llama_server_cmd(args, port: int, model: Path, slots: int, ctx_per_slot: int, *extra: str) -> list[str]:
    return [args.llama_server, "-m", str(model), "-t", str(args.threads), "-tb", str(args.threads),
            "-np", str(slots), "-c", str(ctx_per_slot * slots), "--host", "127.0.0.1", "--port", str(port),
            "--no-webui", *extra]


def measure_llama_server(bench, args) -> Footprint:
    chat_port, embed_port = bench.free_port(), bench.free_port()
    started = time.monotonic()
    chat = bench.Server("llama-server (chat)", llama_server_cmd(args, chat_port, CHAT_PATH, SLOTS, CTX_PER_SLOT),
                        chat_port, "/health", bench.logs_dir() / "llama-server-footprint-chat.log")
    embed = bench.Server("llama-server (embeddings)",
                         llama_server_cmd(args, embed_port, EMBEDDING_PATH, SLOTS, 512, "--embedding",
                                          "--pooling", "mean"),
                         embed_port, "/health", bench.logs_dir() / "llama-server-footprint-embed.log")
    try:
        result = Footprint("llama-server", wait_healthy(bench, [chat, embed], started, args.start_timeout))
        chat_once(chat_port, CHAT_MODEL)
        embed_once(embed_port, EMBEDDING_MODEL)
        pids = {f"{CHAT_MODEL} process": chat.proc.pid, f"{EMBEDDING_MODEL} process": embed.proc.pid}
        time.sleep(2)
        result.idle_cpu_s = idle_cpu(bench, list(pids.values()), args.idle_seconds)
        result.idle_seconds = args.idle_seconds
        result.rss_kib = {role: bench.proc_status(pid).get("VmRSS", 0) for role, pid in pids.items()}
    finally:
        chat.stop()
        embed.stop()
    result.slot_kib = per_slot(bench, args, llama_server_slot_rss)
    return result


def llama_server_slot_rss(bench, args, slots: int) -> int:
    port = bench.free_port()
    srv = bench.Server("llama-server", llama_server_cmd(args, port, CHAT_PATH, slots, CTX_PER_SLOT), port,
                       "/health", bench.logs_dir() / f"llama-server-footprint-p{slots}.log")
    try:
        wait_healthy(bench, [srv], time.monotonic(), args.start_timeout)
        chat_once(port, CHAT_MODEL)
        return bench.proc_status(srv.proc.pid).get("VmRSS", 0)
    finally:
        srv.stop()


def per_slot(bench, args, rss_with) -> float:
    return (rss_with(bench, args, SLOTS) - rss_with(bench, args, 1)) / (SLOTS - 1)


def report(results: list[Footprint], command: str, machine: str) -> str:
    lines = ["## Footprint (`--scenario footprint`)", "",
             f"`{command}` on {machine}. edgellm on its default config (`edgellm.toml`: {CHAT_MODEL} and "
             f"{EMBEDDING_MODEL}, one worker each with {SLOTS} slots); llama-server on the same two models, one "
             f"process per model with {SLOTS} slots and the same context per slot. Start-up: launch to `/health` "
             "200 with every model loaded. Memory: VmRSS after one chat and one embeddings request. Idle CPU: "
             "the CPU time all the processes used while nothing was asked of them. Per slot: the chat process "
             f"with {SLOTS} slots against 1 ({CTX_PER_SLOT} tokens of context each), over {SLOTS - 1}.", "",
             "| server | start-up s | resident MiB, per process | idle CPU (% of one core) | chat memory per slot MiB |",
             "| --- | --- | --- | --- | --- |"]
    for r in results:
        memory = ", ".join(f"{role} {kib / 1024:.0f}" for role, kib in r.rss_kib.items())
        if r.front_peak_kib:
            memory += f" (front end peak {r.front_peak_kib / 1024:.0f})"
        idle = "-" if r.idle_cpu_s is None else (f"{r.idle_cpu_s:.2f} s in {r.idle_seconds:g} s "
                                                 f"({100 * r.idle_cpu_s / r.idle_seconds:.1f} %)")
        slot = "-" if r.slot_kib is None else f"{r.slot_kib / 1024:.1f}"
        lines.append(f"| {r.server} | {r.start_s:.2f} | {memory} | {idle} | {slot} |")
    ours = next((r for r in results if r.server == "edgellm"), None)
    if ours is not None:
        front = ours.rss_kib.get("front end", 0) / 1024
        lines += ["", f"Targets (issue 12): front end resident ≤ {FRONT_END_MIB} MiB: {front:.1f} MiB, "
                      f"**{'met' if front <= FRONT_END_MIB else 'missed'}**; start-up ≤ {START_SECONDS:g} s: "
                      f"{ours.start_s:.2f} s, **{'met' if ours.start_s <= START_SECONDS else 'missed'}**; "
                      f"idle CPU about 0: {ours.idle_cpu_s if ours.idle_cpu_s is not None else float('nan'):.2f} s "
                      f"in {ours.idle_seconds:g} s."]
    return "\n".join(lines) + "\n"
