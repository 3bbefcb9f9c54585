#!/usr/bin/env python3
"""Benchmark edgellm against llama.cpp on one machine, in one run, on the same model.

    .venv/bin/python scripts/bench.py --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --threads 2 --tokens 128 --concurrency 1,4,8,16 --out BENCHMARKS.md

Contenders (same GGUF, same threads, same prompts, same max_tokens, temperature 0, streaming):

* ``in-process``: llama-cpp-python's ``Llama.create_chat_completion(stream=True)`` in a
  child process, one request at a time. No HTTP, no IPC: the ceiling for one stream.
* ``edgellm``: this repository's server (``edgellm --parallel N``), started as a subprocess.
* ``llama-server``: llama.cpp's own server, built from the llama.cpp that llama-cpp-python
  vendors (``scripts/build_llama_server.sh``), or any binary given with ``--llama-server``.
* ``llama-cpp-python server``: ``python -m llama_cpp.server`` from a separate venv
  (``--lcpp-venv``), skipped when that venv has no ``llama_cpp.server`` extras. It serves
  one request at a time, so its rows show queueing. To make that venv without compiling
  llama.cpp again, install the wheel pip already built for .venv:
  ``python3 -m venv ~/.cache/edgellm-bench/venv-lcpp && ~/.cache/edgellm-bench/venv-lcpp/bin/pip
  install "llama_cpp_python[server] @ file://$(find ~/.cache/pip/wheels -name 'llama_cpp_python-0.3.36-*.whl')"``

For every server and concurrency level N, N client threads each send ``--rounds`` streaming
requests with distinct short prompts (raw http.client, to keep the client's own CPU cost
small on a small machine). Per request: TTFT (request sent -> first non-empty content
chunk) and generated tokens (the ``usage`` chunk when the server sends it for
``stream_options.include_usage``, else the number of content chunks). Per level: TTFT
p50/p95, total tok/s (all tokens / wall time of the level), per-stream tok/s (median over
requests of (tokens - 1) / (last chunk - first chunk)), errors, and the peak RSS (VmHWM)
of the front end and of each worker process.

``--scenario structured`` (issue 9, point 7) measures instead, on edgellm with 4 slots, how
grammar-constrained sampling changes decoding, and what ``n`` gives:

    .venv/bin/python scripts/bench.py --scenario structured --threads 2 --tokens 128 \\
        --rounds 3 --per-round 3 --out BENCHMARKS.md

In each of ``--rounds`` rounds, for each mode (plain; ``response_format`` json_schema;
``tools`` with ``tool_choice: "required"``, ``parallel_tool_calls: false``), with the same
prompts, a ``max_tokens: 1`` request times the prompt's prefill, then ``--per-round`` streaming
requests go one after the other; then ``n: 4`` in one request against 4 concurrent requests of
n=1. Per mode: tokens per request (usage; a finished schema stops early), decode tok/s per
stream ((tokens - 1) / (last visible chunk - first), tool-call deltas counting as chunks),
tok/s without the prefill, total tok/s, each as a ratio to plain, and whether the answers
validate against their schemas; medians over all rounds. With ``--llama-server`` the same modes
run on llama-server (``--jinja``) too. It writes (or replaces) its own section of ``--out`` and
keeps the others; the default scenario keeps that section in turn.

``--scenario retrieval`` (issue 12, point 3) measures ``store.Store.search`` at 10k, 100k and 1M
chunks of clustered 384-dim vectors: ingest rate, file size, p50/p95 latency and recall@5 against
an exact search (scripts/bench_retrieval.py); it writes its own section of ``--out`` too:

    .venv/bin/python scripts/bench.py --scenario retrieval --sizes 10000,100000,1000000 --out BENCHMARKS.md

``--n-gpu-layers N`` (issue 12, point 6) puts N layers on the GPU for edgellm's chat workers
(``--n-gpu-layers``), llama-server (``-ngl``) and the in-process run; with N > 0 the run writes (or
replaces) its own ``## Chat on a GPU`` section of ``--out`` and keeps the CPU sections. It needs
llama.cpp built with CUDA: ``scripts/bench_gpu.sh`` builds it and runs this with the GPU options.

Every load loop is bounded (requests per client, a per-request and a per-level time
limit); everything talks to 127.0.0.1 only; every server runs in its own process group
and is killed in a ``finally`` even when the benchmark fails or is interrupted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import http.client
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("EDGELLM_BENCH_CACHE", Path.home() / ".cache" / "edgellm-bench"))
HOST = "127.0.0.1"

TOPICS = [
    "a lighthouse keeper", "a robot learning to paint", "the history of bread", "a city under the sea",
    "a dragon who hates gold", "the first day of school", "a journey across a desert", "how rivers form",
    "a detective cat", "a village in the mountains", "the life of a honeybee", "a ship lost in fog",
    "a garden on the moon", "a clockmaker's apprentice", "why the sky is blue", "a winter festival",
    "an old library", "a train that never stops", "a forest after rain", "a young inventor",
    "the planets of the solar system", "a market at dawn", "a knight without a horse", "a storm at sea",
    "a baker who bakes at night", "a map with no names", "the migration of birds", "a tiny island",
    "a musician in the subway", "an abandoned castle", "how volcanoes erupt", "a letter from the future",
]


def prompt_for(i: int, salt: int) -> list[dict]:
    """The i-th prompt of one measurement. salt (concurrency * 1000 + attempt) puts a different
    request number at the front for every level and attempt, so no server answers a prompt it
    has already cached (a re-measured level would otherwise show prompt-cache TTFTs)."""
    return [{"role": "user", "content": f"Request {salt}-{i}: write a long, detailed story about "
                                        f"{TOPICS[i % len(TOPICS)]}. Use many paragraphs."}]


# ---------------------------------------------------------------------------------------
# process helpers
# ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in KiB, {} when the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_jiffies(pids: list[int]) -> tuple[int, int, int]:
    """(machine busy, machine total, busy of these processes) in clock ticks, to tell how much
    of the machine other work took during a measurement (the benchmark's own clients count as ours)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    total = busy + v[3] + v[4]
    ours = 0
    for pid in {os.getpid(), *pids}:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ours += int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return busy, total, ours


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of one process (all its threads), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def foreign_share(before: tuple[int, int, int], after: tuple[int, int, int]) -> float | None:
    """Percent of the machine's CPU time used by processes other than ours in between."""
    busy, total, ours = (a - b for a, b in zip(after, before))
    return max(0.0, (busy - ours) / total * 100) if total > 0 else None


def wait_for_quiet(args, pids: list[int]) -> float | None:
    """Wait (at most --quiet-wait seconds) until other processes use under --quiet-below percent of
    the machine for one second; returns the last share seen. Keeps a shared machine's other work
    from landing in one contender's numbers only, as far as it can."""
    if args.quiet_wait <= 0:
        return None
    deadline = time.monotonic() + args.quiet_wait
    share = None
    while True:
        before = cpu_jiffies(pids)
        time.sleep(1.0)
        share = foreign_share(before, cpu_jiffies(pids))
        if share is None or share < args.quiet_below or time.monotonic() > deadline:
            if share is not None and share >= args.quiet_below:
                log(f"    (machine still busy: other processes use {share:.0f}% of it; going on)")
            return share
        log(f"    waiting for other work to calm down (other processes use {share:.0f}% of the machine)")


def mib(kib: int | None) -> str:
    return "-" if not kib else f"{kib / 1024:.0f}"


class Server:
    """A server subprocess in its own process group, killed (group and all) by stop()."""

    def __init__(self, name: str, cmd: list[str], port: int, health_path: str, log_path: Path,
                 env: dict | None = None):
        self.name, self.cmd, self.port, self.health_path = name, cmd, port, health_path
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=REPO, env=env)
        self.health: dict = {}

    def wait_ready(self, timeout: float) -> None:
        """Poll the health path until 200; on failure the server is stopped before raising."""
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; "
                                   f"see {self.log_path}:\n{self.tail()}")
            try:
                status, body = http_get(self.port, self.health_path, timeout=2)
                if status == 200:
                    try:
                        self.health = json.loads(body)
                    except ValueError:
                        self.health = {}
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready within {timeout:.0f}s; see {self.log_path}:\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group may outlive its leader (workers)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.log.close()


def http_get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------
# one streaming request
# ---------------------------------------------------------------------------------------
@dataclass
class Result:
    ttft: float | None = None  # seconds
    tokens: int = 0
    chunks: int = 0  # content chunks seen
    first: float | None = None  # monotonic time of the first content chunk
    last: float | None = None  # ... of the last one
    start: float = 0.0
    end: float = 0.0
    usage: bool = False  # tokens come from the server's usage chunk
    finish_reason: str | None = None
    error: str | None = None

    @property
    def stream_rate(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)


def sse_stream(port: int, body: dict, timeout: float, r) -> Iterator[tuple[float, dict]]:
    """POST a streaming /v1/chat/completions request and yield (arrival time, event) for each SSE
    data event up to [DONE]. ``r`` (a Result or a Reply) gets the failure, if any, in ``error``
    (an HTTP status keeps the start of its body) and the end time in ``end``."""
    deadline = r.start + timeout
    conn = http.client.HTTPConnection(HOST, port, timeout=min(timeout, 60))
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {resp.read(600).decode(errors='replace')}"
            return
        while True:
            if time.monotonic() > deadline:
                r.error = f"request time limit ({timeout:.0f}s) reached"
                break
            line = resp.readline()
            if not line:
                r.error = "stream ended without [DONE]"
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            now = time.monotonic()
            try:
                event = json.loads(payload)
            except ValueError:
                r.error = f"bad SSE payload: {payload[:200]!r}"
                break
            if "error" in event:
                r.error = f"error event: {json.dumps(event['error'])[:400]}"
                break
            yield now, event
    except (OSError, http.client.HTTPException) as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        r.end = time.monotonic()


def stream_chat(port: int, body: dict, timeout: float) -> Result:
    """POST /v1/chat/completions with stream=true and read the SSE stream to [DONE]."""
    r = Result(start=time.monotonic())
    for now, event in sse_stream(port, body, timeout, r):
        for choice in event.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            if content:
                r.chunks += 1
                if r.first is None:
                    r.first, r.ttft = now, now - r.start
                r.last = now
            if choice.get("finish_reason"):
                r.finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            r.tokens, r.usage = int(usage["completion_tokens"]), True
    if not r.usage:
        r.tokens = r.chunks
    return r


# ---------------------------------------------------------------------------------------
# a load level
# ---------------------------------------------------------------------------------------
@dataclass
class Level:
    server: str
    concurrency: int
    parallel: int | None = None
    results: list[Result] = field(default_factory=list)
    wall: float = 0.0
    rss_front: int | None = None  # VmHWM KiB
    rss_workers: list[int] = field(default_factory=list)
    note: str = ""
    skipped_requests: int = 0  # not sent: the level's time limit was reached
    foreign_cpu: float | None = None  # % of the machine other processes used during the level
    attempts: int = 1
    cpu_front: float | None = None  # CPU seconds the front-end / server process used during the level
    cpu_workers: float | None = None  # ... and its worker processes together (edgellm)

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.results if r.error is None]

    @property
    def errors(self) -> list[Result]:
        return [r for r in self.results if r.error is not None]

    def ttft(self, q: float) -> float | None:
        values = sorted(r.ttft for r in self.ok if r.ttft is not None)
        return percentile(values, q)

    @property
    def total_tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def total_rate(self) -> float | None:
        return self.total_tokens / self.wall if self.wall > 0 else None

    @property
    def stream_rate(self) -> float | None:
        rates = [r.stream_rate for r in self.ok if r.stream_rate is not None]
        return statistics.median(rates) if rates else None

    @property
    def mean_tokens(self) -> float | None:
        ok = self.ok
        return sum(r.tokens for r in ok) / len(ok) if ok else None


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def request_body(args, i: int, salt: int, model: str, extra: dict) -> dict:
    body = {"model": model, "messages": prompt_for(i, salt), "max_tokens": args.tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    body.update(extra)
    return body


def run_level(args, port: int, server: str, concurrency: int, model: str, extra: dict,
              pids: list[int], attempt: int = 0) -> Level:
    level = Level(server, concurrency)
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    deadline_box = [0.0]

    def client(c: int) -> None:
        barrier.wait()
        for rnd in range(args.rounds):
            if time.monotonic() > deadline_box[0]:
                with lock:
                    level.skipped_requests += args.rounds - rnd
                return
            remaining = max(1.0, min(args.request_timeout, deadline_box[0] - time.monotonic() + 5))
            body = request_body(args, c * args.rounds + rnd, concurrency * 1000 + attempt, model, extra)
            res = stream_chat(port, body, remaining)
            with lock:
                level.results.append(res)

    wait_for_quiet(args, pids)
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    cpu_before = cpu_jiffies(pids)
    proc_cpu_before = [cpu_seconds(p) for p in pids]
    start = time.monotonic()
    deadline_box[0] = start + args.level_timeout
    barrier.wait()
    for t in threads:
        t.join(max(0.1, deadline_box[0] + args.request_timeout + 10 - time.monotonic()))
    ends = [r.end for r in level.results]
    level.wall = (max(ends) if ends else time.monotonic()) - start
    level.foreign_cpu = foreign_share(cpu_before, cpu_jiffies(pids))
    used = [(a - b) if a is not None and b is not None else None
            for a, b in zip((cpu_seconds(p) for p in pids), proc_cpu_before)]
    if used:
        level.cpu_front = used[0]
        workers = [u for u in used[1:] if u is not None]
        level.cpu_workers = sum(workers) if workers else None
    if any(t.is_alive() for t in threads):
        level.note = "some clients did not finish in time"
    if pids:
        level.rss_front = proc_status(pids[0]).get("VmHWM")
        level.rss_workers = [proc_status(p).get("VmHWM", 0) for p in pids[1:]]
    return level


def warmup(port: int, model: str, extra: dict) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    body.update(extra)
    stream_chat(port, body, 120)


# ---------------------------------------------------------------------------------------
# the contenders
# ---------------------------------------------------------------------------------------
def inprocess_child(args) -> None:
    """Runs in a child process: prints one JSON object with per-request results."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=args.model, n_ctx=2048, n_threads=args.threads,
                          n_threads_batch=args.threads, n_gpu_layers=args.n_gpu_layers or 0, verbose=False)

    def one(i: int | None, max_tokens: int) -> dict:
        messages = prompt_for(i, args.salt) if i is not None else [{"role": "user", "content": "Hello"}]
        start = time.monotonic()
        first = last = None
        chunks = 0
        finish = None
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0,
                                                stream=True):
            choice = chunk["choices"][0]
            if choice["delta"].get("content"):
                now = time.monotonic()
                chunks += 1
                first = first or now
                last = now
            finish = choice.get("finish_reason") or finish
        end = time.monotonic()
        return {"start": start, "first": first, "last": last, "end": end, "chunks": chunks,
                "finish_reason": finish}

    one(None, 8)  # warm-up
    wait_for_quiet(args, [])
    out = []
    cpu_before, own_before = cpu_jiffies([]), cpu_seconds(os.getpid())
    t0 = time.monotonic()
    for rnd in range(args.rounds):
        out.append(one(rnd, args.tokens))  # the prompts client 0 sends to the servers at concurrency 1
    wall = time.monotonic() - t0
    print(json.dumps({"results": out, "wall": wall, "vmhwm": proc_status(os.getpid()).get("VmHWM"),
                      "foreign_cpu": foreign_share(cpu_before, cpu_jiffies([])),
                      "cpu": cpu_seconds(os.getpid()) - own_before}))


def run_inprocess(args, attempt: int = 0) -> Level:
    cmd = [sys.executable, __file__, "--_inprocess-child", "--salt", str(1000 + attempt),
           "--model", args.model, "--threads", str(args.threads),
           "--tokens", str(args.tokens), "--rounds", str(args.rounds), "--quiet-wait", str(args.quiet_wait),
           "--quiet-below", str(args.quiet_below)]
    if args.n_gpu_layers is not None:
        cmd += ["--n-gpu-layers", str(args.n_gpu_layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.level_timeout + 120, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"in-process run failed:\n{proc.stderr[-2000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    level = Level(IN_PROCESS, 1, wall=data["wall"], rss_front=data["vmhwm"], foreign_cpu=data["foreign_cpu"],
                  cpu_front=data["cpu"])
    for d in data["results"]:
        r = Result(start=d["start"], end=d["end"], first=d["first"], last=d["last"], chunks=d["chunks"],
                   tokens=d["chunks"], finish_reason=d["finish_reason"])
        r.ttft = (d["first"] - d["start"]) if d["first"] else None
        level.results.append(r)
    return level


def logs_dir() -> Path:
    d = CACHE / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def start_edgellm(args, parallel: int) -> tuple[Server, list[int]]:
    port = free_port()
    exe = Path(sys.executable).parent / "edgellm"
    cmd = [str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else [str(REPO / "server.py")]),
           "--model-name", "bench", "--model-path", args.model, "--parallel", str(parallel),
           "--threads", str(args.threads), "--ctx-size", "2048", "--host", HOST, "--port", str(port),
           "--log-level", "warning"]
    if args.n_gpu_layers is not None:
        cmd += ["--n-gpu-layers", str(args.n_gpu_layers)]
    srv = Server("edgellm", cmd, port, "/health", logs_dir() / f"edgellm-p{parallel}.log")
    srv.wait_ready(args.start_timeout)
    workers = [w.get("pid") for w in srv.health.get("models", {}).get("bench", {}).get("workers", [])]
    return srv, [srv.proc.pid] + [p for p in workers if p]


def start_llama_server(args, parallel: int) -> tuple[Server, list[int]]:
    port = free_port()
    cmd = [args.llama_server, "-m", args.model, "-t", str(args.threads), "-tb", str(args.threads),
           "-np", str(parallel), "-c", str(2048 * parallel), "--host", HOST, "--port", str(port),
           "--no-webui"]
    if args.n_gpu_layers is not None:  # a CUDA build of llama-server offloads by default
        cmd += ["-ngl", str(args.n_gpu_layers)]
    srv = Server("llama-server", cmd, port, "/health", logs_dir() / f"llama-server-p{parallel}.log")
    srv.wait_ready(args.start_timeout)
    return srv, [srv.proc.pid]


def start_lcpp_server(args, parallel: int) -> tuple[Server, list[int]]:
    port = free_port()
    cmd = [str(Path(args.lcpp_venv) / "bin" / "python"), "-m", "llama_cpp.server", "--model", args.model,
           "--model_alias", "bench", "--n_ctx", "2048", "--n_threads", str(args.threads),
           "--n_threads_batch", str(args.threads), "--host", HOST, "--port", str(port), "--verbose", "False",
           # by default a new request cuts the streaming one short; queue instead, like the others
           "--interrupt_requests", "False"]
    srv = Server("llama-cpp-python server", cmd, port, "/v1/models", logs_dir() / "llama-cpp-python-server.log")
    srv.wait_ready(args.start_timeout)
    return srv, [srv.proc.pid]


@dataclass
class Contender:
    name: str
    start: object  # (args, parallel) -> (Server, pids)
    fixed_parallel: int | None = None  # slots whatever the level (llama-cpp-python's server: 1)
    # edgellm answers a field it does not implement (llama.cpp's ignore_eos) with a 400, so the
    # extra fields go only to the servers that take them
    takes_extra: bool = True


def run_contenders(args, contenders: list[Contender], with_inprocess: bool, extra: dict,
                   out: list[Level]) -> None:
    """For each group of levels (one group per level, or one for all): start every server, warm
    it up, then run each level on each server in turn, so the contenders of one level are measured
    minutes apart, not a whole run apart, on a machine whose other load drifts. Idle servers
    sleep. Every server is killed at the end of its group, whatever happens. Appends to out, so an
    interrupted run keeps what it measured."""
    per_level = args.parallel_mode == "level"
    groups = [[n] for n in args.concurrency] if per_level else [args.concurrency]
    for group in groups:
        running: list[tuple[Contender, Server, list[int], int]] = []
        try:
            for c in contenders:
                parallel = c.fixed_parallel or max(group)
                log(f"[{c.name}] starting with {parallel} slot(s)")
                try:
                    srv, pids = c.start(args, parallel)
                    running.append((c, srv, pids, parallel))
                    warmup(srv.port, "bench", extra if c.takes_extra else {})
                except Exception as exc:  # one contender failing must not lose the others' results
                    log(f"[{c.name}] failed to start: {exc}")
                    out.extend(Level(c.name, n, parallel, note=f"failed: {str(exc).splitlines()[0][:200]}")
                               for n in group)
            for n in group:
                if n == 1 and with_inprocess:
                    log("[in-process] llama-cpp-python, concurrency 1")
                    try:
                        out.append(retried(args, lambda attempt: run_inprocess(args, attempt)))
                        log("    " + summary_line(out[-1]))
                    except Exception as exc:
                        log(f"[in-process] failed: {exc}")
                        out.append(Level(IN_PROCESS, 1, note=f"failed: {str(exc).splitlines()[0][:200]}"))
                runs: dict[str, list[Level]] = {}
                for repeat in range(args.repeat):  # the contenders in turn, so that drift hits each alike
                    for c, srv, pids, parallel in running:
                        log(f"[{c.name}] concurrency {n}: {n} client(s) x {args.rounds} request(s)"
                            + (f", run {repeat + 1} of {args.repeat}" if args.repeat > 1 else ""))
                        if srv.proc.poll() is not None:
                            runs.setdefault(c.name, []).append(
                                Level(c.name, n, parallel, note=f"server had exited ({srv.proc.returncode})"))
                            continue
                        sent = extra if c.takes_extra else {}
                        first = repeat * (args.retries + 1)  # every run and attempt sends prompts of its own
                        level = retried(args, lambda attempt: run_level(args, srv.port, c.name, n, "bench", sent,
                                                                        pids, first + attempt))
                        level.parallel = parallel
                        if srv.proc.poll() is not None:
                            level.note = (level.note + "; " if level.note else "") + \
                                f"server exited ({srv.proc.returncode})"
                        runs.setdefault(c.name, []).append(level)
                        log("    " + summary_line(level))
                out.extend(median_run(levels) for levels in runs.values())
        finally:
            for _, srv, _, _ in running:
                srv.stop()


def median_run(levels: list[Level]) -> Level:
    """Of one contender's runs of one level, the one with the median total tokens/s (the lower middle
    of an even count), noting the spread of the others."""
    if len(levels) == 1:
        return levels[0]
    ranked = sorted(levels, key=lambda lv: lv.total_rate or 0.0)
    median = ranked[(len(ranked) - 1) // 2]
    spread = f"median of {len(levels)} runs ({fmt(ranked[0].total_rate)} to {fmt(ranked[-1].total_rate)} tok/s)"
    median.note = (median.note + "; " if median.note else "") + spread
    return median


def retried(args, measure) -> "Level":
    """Measure; while other processes took over --max-other percent of the machine during the
    measurement, measure again (at most --retries times) and keep the least disturbed attempt."""
    best = None
    for attempt in range(args.retries + 1):
        level = measure(attempt)
        level.attempts = attempt + 1
        if best is None or (level.foreign_cpu or 0) < (best.foreign_cpu or 0):
            best = level
        if level.foreign_cpu is None or level.foreign_cpu <= args.max_other or attempt == args.retries:
            break
        log(f"    disturbed (other processes used {level.foreign_cpu:.0f}% of the machine): measuring again")
        log("    " + summary_line(level))
    best.attempts = level.attempts
    return best


def summary_line(level: Level) -> str:
    return (f"ok {len(level.ok)}/{len(level.results)}  tokens {level.total_tokens}  wall {level.wall:.1f}s  "
            f"total {fmt(level.total_rate, 1)} tok/s  stream {fmt(level.stream_rate, 1)} tok/s  "
            f"TTFT p50 {fmt_ms(level.ttft(0.5))} p95 {fmt_ms(level.ttft(0.95))}  "
            f"other CPU {fmt(level.foreign_cpu, 0)}%  CPU s front {fmt(level.cpu_front)} "
            f"workers {fmt(level.cpu_workers)}"
            + (f"  errors: {level.errors[0].error}" if level.errors else ""))


def fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------
def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
            "mem_gib": mem_kib / 1024 / 1024, "kernel": platform.release(), "load": os.getloadavg()}


def versions(args) -> dict:
    v = {"python": platform.python_version()}
    try:
        import llama_cpp
        v["llama-cpp-python"] = llama_cpp.__version__
    except Exception:
        v["llama-cpp-python"] = "not importable"
    try:
        v["edgellm"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                      capture_output=True, text=True, timeout=10).stdout.strip() \
            or os.environ.get("EDGELLM_COMMIT") or "?"  # a copy of the tree without .git (scripts/bench_gpu.sh)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
        out = os.path.relpath(Path(args.out).resolve(), REPO) if getattr(args, "out", None) else None
        if [line for line in dirty if line[3:].strip() != out]:  # the report being rewritten does not count
            v["edgellm"] += " (with uncommitted changes)"
    except Exception:
        v["edgellm"] = "?"
    if args.llama_server:
        try:
            p = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True, timeout=30)
            line = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.startswith("version")]
            v["llama-server"] = line[0].split(":", 1)[1].strip() if line else "?"
        except Exception:
            v["llama-server"] = "?"
    return v


def ratio_row(name: str, num: float | None, den: float | None, target: str, ok,
              rows: tuple = (), max_other: float = 100.0) -> str:
    if num is None or den is None or den == 0:
        return f"| {name} | - | - | - | {target} | not measured |"
    r = num / den
    verdict = "met" if ok(r) else "missed"
    disturbed = [lv for lv in rows if lv is not None and (lv.foreign_cpu or 0) > max_other]
    if disturbed:
        verdict += " (unreliable: other work used " + ", ".join(
            f"{lv.foreign_cpu:.0f}%" for lv in disturbed) + " of the CPU during a measured row)"
    return f"| {name} | {num:.3g} | {den:.3g} | {r:.2f} | {target} | {verdict} |"


def find(levels: list[Level], server: str, n: int) -> Level | None:
    return next((lv for lv in levels if lv.server == server and lv.concurrency == n and lv.results), None)


def render(args, levels: list[Level], skipped: list[str], started: str, elapsed: float, mach: dict,
           vers: dict) -> str:
    cmdline = " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/bench.py", *sys.argv[1:]])
    L = []
    L.append("# Benchmarks\n")
    L.append("Generated by `scripts/bench.py`; re-run it to refresh this file. All numbers below come from "
             "one run on one machine, so compare rows with each other, not with other machines.\n")
    L.append("## Setup\n")
    L.append(f"- Date: {started} (run took {elapsed / 60:.1f} min)")
    L.append(f"- Machine: {mach['cpu']}, {mach['cores']} logical cores ({mach['affinity']} usable), "
             f"{mach['mem_gib']:.1f} GiB RAM, Linux {mach['kernel']}; load average before the run "
             f"{mach['load'][0]:.2f}")
    L.append(f"- Command: `{cmdline}`")
    L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    L.append(f"- Model: `{os.path.relpath(args.model, REPO) if args.model.startswith(str(REPO)) else args.model}`"
             f" ({os.path.getsize(args.model) / 1e6:.0f} MB), context 2048 tokens per slot, "
             f"{args.threads} thread(s) for every contender (generation and batch)")
    L.append(f"- Load: at concurrency N, N client threads each send {args.rounds} streaming chat requests one "
             f"after the other (distinct short prompts \"Request S-I: write a long, detailed story about ...\", "
             "numbered per level and attempt so that no server sees a prompt twice), "
             f"`max_tokens` {args.tokens}, `temperature` 0"
             + (", `ignore_eos: true` to llama-server and llama-cpp-python's server (honoured by llama-server only; "
                "edgellm refuses fields it does not implement, so it is not sent there; the others may stop at EOS)"
                if args.ignore_eos else "")
             + f". Limits: {args.request_timeout:.0f} s per request, {args.level_timeout:.0f} s per level.")
    L.append(f"- Shared machine: before each level the benchmark waits (up to {args.quiet_wait:.0f} s) until other "
             f"processes use under {args.quiet_below:.0f}% of the CPU; a level during which they used more than "
             f"{args.max_other:.0f}% is measured again (up to {args.retries} more times) and the least disturbed "
             "attempt is kept."
             + (f" Each level was measured {args.repeat} times, the contenders in turn; the row shown is the "
                "run with the median total tok/s, and its notes give the range of all runs." if args.repeat > 1
                else ""))
    mode = ("restarted for every level with `--parallel`/`-np` = that level's concurrency"
            if args.parallel_mode == "level" else
            f"started once with `--parallel`/`-np` = {max(args.concurrency)} (the largest level)")
    L.append(f"- Servers: {mode}; llama-server gets `-c 2048*N` so every slot has 2048 tokens, as in edgellm. "
             "One warm-up request (8 tokens) after every start. The in-process run uses the prompts that "
             "client 0 sends at concurrency 1.")
    L.append("- Columns: TTFT = request sent until the first non-empty content chunk; tokens = the server's "
             "`usage.completion_tokens` where it streams one, else content chunks; total tok/s = all tokens "
             "of the level / its wall time; stream tok/s = median over requests of (tokens - 1) / (last chunk "
             "- first chunk), i.e. decode speed seen by one client; RSS = peak resident memory (VmHWM) of the "
             "front-end / server process and of each worker process (edgellm only), in MiB; CPU s = CPU seconds that process (or the workers together) used during the level, "
             "the client's work excluded; other CPU = share of "
             "the machine's CPU time that processes other than the benchmark and the server under test used "
             "during the level (this machine is shared: a high value means that row is disturbed).\n")

    L.append("## Results\n")
    L.append("| contender | conc. | slots | ok/sent | tokens/req | TTFT p50 | TTFT p95 | total tok/s | "
             "stream tok/s | RSS front (MiB) | RSS workers (MiB) | CPU s front | CPU s workers | other CPU | notes |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for lv in sorted(levels, key=lambda lv: (lv.concurrency, ORDER.get(lv.server, 9))):
        notes = []
        if lv.note:
            notes.append(lv.note)
        if lv.errors:
            kinds = sorted({e.error.split(":")[0] for e in lv.errors})
            notes.append(f"{len(lv.errors)} error(s): {'; '.join(kinds)[:120]}")
        empty = [r for r in lv.ok if r.tokens == 0]
        if empty:
            notes.append(f"{len(empty)} request(s) ended without any token")
        short = [r for r in lv.ok if 0 < r.tokens < args.tokens]
        if short:
            notes.append(f"{len(short)} request(s) stopped before max_tokens")
        if lv.attempts > 1:
            notes.append(f"least disturbed of {lv.attempts} attempts")
        if lv.skipped_requests:
            notes.append(f"{lv.skipped_requests} request(s) not sent (level time limit)")
        if lv.results and not any(r.usage for r in lv.results):
            notes.append("tokens counted from chunks")
        sent = len(lv.results)
        L.append(f"| {lv.server} | {lv.concurrency} | {lv.parallel or '-'} | {len(lv.ok)}/{sent} | "
                 f"{fmt(lv.mean_tokens, 0)} | {fmt_ms(lv.ttft(0.5))} | {fmt_ms(lv.ttft(0.95))} | "
                 f"{fmt(lv.total_rate)} | {fmt(lv.stream_rate)} | {mib(lv.rss_front)} | "
                 f"{' + '.join(mib(w) for w in lv.rss_workers) or '-'} | {fmt(lv.cpu_front)} | "
                 f"{fmt(lv.cpu_workers)} | {fmt(lv.foreign_cpu, 0)}% | "
                 f"{'; '.join(notes)} |")
    L.append("")

    L.append("## Targets\n")
    L.append("| ratio | edgellm | reference | ratio | target | verdict |")
    L.append("|---|---:|---:|---:|---:|---|")
    e1, ip = find(levels, "edgellm", 1), find(levels, IN_PROCESS, 1)
    L.append(ratio_row("edgellm 1-stream tok/s ÷ in-process tok/s (stream tok/s)",
                       e1 and e1.stream_rate, ip and ip.stream_rate, "≥ 0.95", lambda r: r >= 0.95,
                       (e1, ip), args.max_other))
    for n in args.concurrency:  # issue 12: at least llama-server's total tokens/s at every level
        en, sn = find(levels, "edgellm", n), find(levels, "llama-server", n)
        L.append(ratio_row(f"edgellm {n}-concurrent total tok/s ÷ llama-server's",
                           en and en.total_rate, sn and sn.total_rate, "≥ 1.0", lambda r: r >= 1.0,
                           (en, sn), args.max_other))
    s1 = find(levels, "llama-server", 1)
    L.append(ratio_row("edgellm 1-stream TTFT p50 ÷ llama-server's (seconds)",
                       e1 and e1.ttft(0.5), s1 and s1.ttft(0.5), "≤ 1.0", lambda r: r <= 1.0,
                       (e1, s1), args.max_other))
    L.append("")
    L.append("## Caveats\n")
    L.append(f"- The clients, the server(s) and the model's {args.threads} thread(s) share this machine's "
             f"{mach['cores']} cores. Where threads = cores, every bit of CPU a front end or the client uses is "
             "taken from the model; llama.cpp's threads wait for each other at every step, so a busy core "
             "slows a whole step down. A row whose 'other CPU' is high was disturbed by other work.")
    L.append("- The in-process row is llama-cpp-python's high-level `create_chat_completion` loop in Python "
             "(per-token detokenizing, stop-string checks and chunk building), so it is the ceiling for "
             "\"llama-cpp-python without a server\", not for llama.cpp itself; a server with a leaner "
             "decode loop can beat it.")
    L.append("- Where a server streams no `usage` (in-process, llama-cpp-python server), tokens are counted "
             "from content chunks, which is one per token except where a chunk holds back partial UTF-8 or a "
             "possible stop string.")
    L.append("- At temperature 0 every contender decodes greedily, so the same prompt gives the same text and "
             "length everywhere unless a server honours `ignore_eos` (llama-server) and the others stop at "
             "EOS; the tokens/req column shows it.")
    L.append("- Few requests per level: TTFT p95 over 2 to 32 requests is close to the maximum. On a shared "
             "machine one level's total tok/s can differ by 10 to 25% between two runs minutes apart (seen "
             "for both servers on 2026-11-27): compare contenders within one run, and use `--repeat` to "
             "report the median of several runs.")
    L.append("")
    if skipped:
        L.append("## Not run\n")
        L.extend(f"- {s}" for s in skipped)
        L.append("")
    return "\n".join(L) + "\n"


IN_PROCESS = "in-process (llama-cpp-python)"
# A section written by hand from profiling (where the chat time goes); a new run keeps it.
CHAT_ANALYSIS_HEADING = "## Where the chat gap comes from (written by hand)"
ORDER = {IN_PROCESS: 0, "edgellm": 1, "llama-server": 2, "llama-cpp-python server": 3}

# --n-gpu-layers > 0 writes this section instead of the CPU chat sections; a CPU run keeps it
GPU_HEADING = "## Chat on a GPU (`--n-gpu-layers`)"


def gpu_name() -> str:
    """The GPUs as nvidia-smi names them (name, memory, driver), or why not."""
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip()]
        return "; ".join(lines) if p.returncode == 0 and lines else f"unknown (nvidia-smi exited {p.returncode})"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown (nvidia-smi: {exc})"


def gpu_section(args, report: str) -> str:
    """The chat report of a --n-gpu-layers run as one `## ` section: its own heading and GPU lines, then
    render()'s sections one level down."""
    lines = report.splitlines()
    body = lines[next(i for i, ln in enumerate(lines) if ln.startswith("## ")):]
    L = [GPU_HEADING, "",
         f"Generated by `scripts/bench_gpu.sh` (`scripts/bench.py --n-gpu-layers {args.n_gpu_layers}`); a CPU run of "
         "`scripts/bench.py` keeps this section and a GPU run replaces only this one.", "",
         f"- GPU: {gpu_name()}",
         f"- Offload: `--n-gpu-layers {args.n_gpu_layers}` to edgellm's chat workers and `-ngl {args.n_gpu_layers}` "
         "to llama-server (all layers where N is at least the model's layer count)"]
    if args.gpu_build:
        L.append(f"- Build: {args.gpu_build}")
    L.append("- With every layer on the GPU the CPU threads do little (sampling, detokenizing, HTTP), and a "
             "small model cannot keep a large GPU busy: expect these rows to show each server's per-token work "
             "around the GPU more than the GPU's speed.")
    L.append("")
    L += [("#" + ln) if ln.startswith("## ") else ln for ln in body]
    return "\n".join(L).rstrip("\n") + "\n"


# ---------------------------------------------------------------------------------------
# scenario "structured": json_schema, tools and n (issue 9, point 7)
# ---------------------------------------------------------------------------------------
STRUCTURED_HEADING = "## Structured output, tool calls and n (`--scenario structured`)"

CHARACTER_SCHEMA = {  # bounded where edgellm's converter can bound (it refuses minimum/maximum: 400)
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "mood": {"enum": ["happy", "sad", "calm", "angry", "curious"]},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["name", "mood", "age", "tags"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {
        "name": "save_character", "description": "Save a story character",
        "parameters": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 24},
            "mood": {"enum": ["happy", "sad", "calm", "angry", "curious"]},
            "age": {"type": "integer"}},
            "required": ["name", "mood", "age"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "search_topic", "description": "Look a topic up before writing about it",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 40},
            "limit": {"type": "integer"},
            "sources": {"type": "array", "items": {"enum": ["books", "web", "news"]}, "maxItems": 2}},
            "required": ["query"], "additionalProperties": False}}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
# the three compared modes: the same prompts, only these fields differ
MODES = {
    "plain": {},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "character", "schema": CHARACTER_SCHEMA}}},
    "tools": {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False},
}


def character_prompt(i: int, salt: int) -> list[dict]:
    """The i-th prompt of modes plain/json_schema/tools; salt (round and purpose) keeps every
    request's prompt new to the server's cache."""
    return [{"role": "user", "content": f"Request {salt}-{i}: invent a character for a story about "
                                        f"{TOPICS[i % len(TOPICS)]}. Give a name, a mood, an age and a few "
                                        "tags, then describe them."}]


@dataclass
class Stream:
    """One choice of one streamed request: its visible chunks (content or tool-call deltas)."""
    chunks: int = 0
    first: float | None = None
    last: float | None = None
    text: str = ""  # content, or the tool call's arguments
    tool_name: str | None = None
    finish_reason: str | None = None
    tokens: float = 0.0  # its share of usage.completion_tokens (chunks where the server streams no usage)

    @property
    def rate(self) -> float | None:
        if self.first is None or self.last is None or self.tokens < 2 or self.last <= self.first:
            return None
        return (self.tokens - 1) / (self.last - self.first)

    @property
    def delta_rate(self) -> float | None:
        """(visible chunks - 1) / their span: tokens decoded but held back (a tool call's opening
        before its first delta, its closing after the last) count neither in time nor in tokens."""
        if self.first is None or self.last is None or self.chunks < 2 or self.last <= self.first:
            return None
        return (min(self.chunks, self.tokens) - 1) / (self.last - self.first)


@dataclass
class Reply:
    start: float = 0.0
    end: float = 0.0
    streams: dict[int, Stream] = field(default_factory=dict)
    usage_tokens: int | None = None
    error: str | None = None

    @property
    def tokens(self) -> float:
        return self.usage_tokens if self.usage_tokens is not None else sum(s.chunks for s in self.streams.values())

    @property
    def ttft(self) -> float | None:
        firsts = [s.first for s in self.streams.values() if s.first is not None]
        return min(firsts) - self.start if firsts else None


def stream_choices(port: int, body: dict, timeout: float) -> Reply:
    """POST a streaming chat request and read it to [DONE], per choice index; tool-call deltas
    count as visible chunks like content does. An HTTP error keeps the status and the body."""
    r = Reply(start=time.monotonic())
    for now, event in sse_stream(port, body, timeout, r):
        for choice in event.get("choices") or []:
            s = r.streams.setdefault(int(choice.get("index") or 0), Stream())
            delta = choice.get("delta") or {}
            visible = False
            if delta.get("content"):
                s.text += delta["content"]
                visible = True
            for call in delta.get("tool_calls") or []:
                fn = call.get("function") or {}
                if fn.get("name"):
                    s.tool_name = (s.tool_name or "") + fn["name"]
                    visible = True
                if fn.get("arguments"):
                    s.text += fn["arguments"]
                    visible = True
            if visible:
                s.chunks += 1
                s.first = s.first or now
                s.last = now
            if choice.get("finish_reason"):
                s.finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if usage and usage.get("completion_tokens") is not None:
            r.usage_tokens = int(usage["completion_tokens"])
    chunks = sum(s.chunks for s in r.streams.values())
    for s in r.streams.values():  # n choices share one usage: split it by visible chunks
        s.tokens = (r.usage_tokens * s.chunks / chunks if chunks else 0.0) if r.usage_tokens is not None \
            else float(s.chunks)
    return r


def schema_problem(value, schema: dict, path: str = "") -> str | None:
    """Why value does not validate against the small schemas above (None: it does)."""
    if "enum" in schema:
        return None if value in schema["enum"] else f"{path or '/'}: {value!r} not in the enum"
    t = schema.get("type")
    if t == "object":
        if not isinstance(value, dict):
            return f"{path or '/'}: not an object"
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            return f"{path or '/'}: missing {missing}"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False and set(value) - set(props):
            return f"{path or '/'}: extra keys {sorted(set(value) - set(props))}"
        for k, v in value.items():
            if k in props and (p := schema_problem(v, props[k], f"{path}/{k}")):
                return p
    elif t == "string":
        if not isinstance(value, str):
            return f"{path}: not a string"
        if len(value) > schema.get("maxLength", len(value)):
            return f"{path}: longer than maxLength"
    elif t == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{path}: not an integer"
    elif t == "array":
        if not isinstance(value, list):
            return f"{path}: not an array"
        if len(value) > schema.get("maxItems", len(value)):
            return f"{path}: more than maxItems"
        for j, item in enumerate(value):
            if p := schema_problem(item, schema.get("items", {}), f"{path}/{j}"):
                return p
    return None


def check_answer(mode: str, s: Stream) -> str | None:
    """None when a json_schema answer / tool call parses and validates, else why not."""
    if mode == "json_schema":
        schema = CHARACTER_SCHEMA
    elif mode == "tools":
        if s.tool_name not in TOOL_SCHEMAS:
            return f"no call of a known tool (name {s.tool_name!r}, text {s.text[:80]!r})"
        schema = TOOL_SCHEMAS[s.tool_name]
    else:
        return None
    try:
        value = json.loads(s.text)
    except ValueError:
        return f"not JSON (finish_reason {s.finish_reason}): {s.text[:80]!r}"
    return schema_problem(value, schema)


@dataclass
class Batch:
    """The requests of one mode in one round, and the request(s) timing its prefill."""
    server: str
    mode: str
    round: int
    replies: list[Reply] = field(default_factory=list)
    bodies: list[dict] = field(default_factory=list)
    wall: float = 0.0
    foreign_cpu: float | None = None
    prefill: float | None = None  # duration of a max_tokens=1 request with a prompt of the same shape

    @property
    def ok(self) -> list[Reply]:
        return [r for r in self.replies if r.error is None]

    @property
    def total_rate(self) -> float | None:
        return sum(r.tokens for r in self.ok) / self.wall if self.wall > 0 and self.ok else None


def run_batch(args, port: int, batch: Batch, bodies: list[dict], concurrency: int, pids: list[int]) -> Batch:
    """Send bodies from `concurrency` client threads (all at once, each thread its share in turn)."""
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)
    batch.bodies = bodies
    deadline = [0.0]

    def client(c: int) -> None:
        barrier.wait()
        for body in bodies[c::concurrency]:
            left = deadline[0] - time.monotonic()
            if left <= 0:
                return
            res = stream_choices(port, body, min(args.request_timeout, left + 5))
            with lock:
                batch.replies.append(res)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    before = cpu_jiffies(pids)
    start = time.monotonic()
    deadline[0] = start + args.level_timeout
    barrier.wait()
    for t in threads:
        t.join(max(0.1, deadline[0] + args.request_timeout + 10 - time.monotonic()))
    batch.wall = (max((r.end for r in batch.replies), default=time.monotonic())) - start
    batch.foreign_cpu = foreign_share(before, cpu_jiffies(pids))
    return batch


def structured_body(args, mode: str, i: int, salt: int, max_tokens: int | None = None) -> dict:
    body = {"model": "bench", "messages": character_prompt(i, salt), "temperature": 0,
            "max_tokens": max_tokens or args.tokens, "stream": True, "stream_options": {"include_usage": True}}
    body.update(json.loads(json.dumps(MODES[mode])))
    return body


def story_body(args, salt: int, n: int) -> dict:
    body = {"model": "bench", "messages": prompt_for(0, salt), "temperature": 0, "max_tokens": args.tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    if n != 1:
        body["n"] = n
    return body


def run_structured_server(args, name: str, start, pids_out: list, batches: list[Batch], deadline: float,
                          with_n: bool) -> None:
    """Start one server with 4 slots, then for each round: every mode (one max_tokens=1 request to
    time its prefill, then --per-round requests one after the other), and n=4 against 4 concurrent
    requests of n=1. The order rotates from round to round. The server is killed at the end."""
    srv = None
    try:
        log(f"[{name}] starting with 4 slots")
        srv, pids = start(args, 4)
        pids_out.extend(pids)
        warmup(srv.port, "bench", {})
        for rnd in range(args.rounds):
            if time.monotonic() > deadline:
                log(f"[{name}] time budget (--budget) spent: no more rounds")
                break
            wait_for_quiet(args, pids)
            modes = list(MODES)
            modes = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
            for mode in modes:
                if srv.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({srv.proc.returncode}); see {srv.log_path}")
                salt = 1000 * (rnd + 1)
                probe = stream_choices(srv.port, structured_body(args, mode, 99, salt + 500, max_tokens=1),
                                       args.request_timeout)
                b = Batch(name, mode, rnd, prefill=None if probe.error else probe.end - probe.start)
                if probe.error:
                    log(f"    [{mode}] prefill probe failed: {probe.error}")
                bodies = [structured_body(args, mode, i, salt) for i in range(args.per_round)]
                batches.append(run_batch(args, srv.port, b, bodies, 1, pids))
                log(f"    round {rnd + 1} {structured_line(b)}")
            if not with_n:
                continue
            for how in (("n4", "4x1") if rnd % 2 == 0 else ("4x1", "n4")):
                salt = 1000 * (rnd + 1) + 700
                bodies = [story_body(args, salt, 4)] if how == "n4" else [story_body(args, salt, 1)] * 4
                b = run_batch(args, srv.port, Batch(name, how, rnd), bodies, len(bodies), pids)
                batches.append(b)
                log(f"    round {rnd + 1} {structured_line(b)}")
    finally:
        if srv is not None:
            srv.stop()


def structured_line(b: Batch) -> str:
    streams = [s for r in b.ok for s in r.streams.values()]
    rates = [s.rate for s in streams if s.rate is not None]
    err = next((r.error for r in b.replies if r.error), None)
    return (f"{b.mode}: ok {len(b.ok)}/{len(b.replies)}  tokens {sum(r.tokens for r in b.ok):.0f}  "
            f"wall {b.wall:.1f}s  total {fmt(b.total_rate)} tok/s  stream {fmt(median(rates))} tok/s  "
            f"prefill {fmt_ms(b.prefill)}  other CPU {fmt(b.foreign_cpu, 0)}%"
            + (f"  error: {err}" if err else ""))


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


@dataclass
class ModeStats:
    server: str
    mode: str
    sent: int = 0
    ok: int = 0
    tokens: list[float] = field(default_factory=list)  # per stream
    rates: list[float] = field(default_factory=list)  # per stream, (tokens - 1) / (last - first)
    delta_rates: list[float] = field(default_factory=list)  # per stream, (chunks - 1) / (last - first)
    gen_rates: list[float] = field(default_factory=list)  # per request, (tokens - 1) / (duration - prefill)
    totals: list[float] = field(default_factory=list)  # per round
    ttfts: list[float] = field(default_factory=list)
    prefills: list[float] = field(default_factory=list)
    finish: dict[str, int] = field(default_factory=dict)
    valid: int = 0
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    other_cpu: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    rounds: int = 0  # measured
    kept: int = 0  # not left out as disturbed


def mode_stats(batches: list[Batch], server: str, mode: str, max_other: float) -> ModeStats | None:
    """A mode's figures over its rounds, leaving out rounds during which other processes used more
    than max_other percent of the machine (unless every round was so disturbed)."""
    mine = [b for b in batches if b.server == server and b.mode == mode]
    if not mine:
        return None
    clean = [b for b in mine if b.foreign_cpu is None or b.foreign_cpu <= max_other]
    st = ModeStats(server, mode, rounds=len(mine))
    mine = clean or mine
    st.kept = len(mine)
    for b in mine:
        st.sent += len(b.replies)
        st.ok += len(b.ok)
        st.walls.append(b.wall)
        if b.total_rate is not None:
            st.totals.append(b.total_rate)
        if b.prefill is not None:
            st.prefills.append(b.prefill)
        if b.foreign_cpu is not None:
            st.other_cpu.append(b.foreign_cpu)
        for r, body in zip(sorted(b.replies, key=lambda r: r.start), b.bodies):
            if r.error:
                st.errors.append(f"{r.error} (request: {json.dumps(body)[:300]}...)")
                continue
            if r.ttft is not None:
                st.ttfts.append(r.ttft)
            if b.prefill is not None and len(r.streams) == 1 and r.tokens >= 2 and r.end - r.start > b.prefill:
                st.gen_rates.append((r.tokens - 1) / (r.end - r.start - b.prefill))
            for s in r.streams.values():
                st.tokens.append(s.tokens)
                if s.rate is not None:
                    st.rates.append(s.rate)
                if s.delta_rate is not None:
                    st.delta_rates.append(s.delta_rate)
                st.finish[s.finish_reason or "none"] = st.finish.get(s.finish_reason or "none", 0) + 1
                if mode in ("json_schema", "tools"):
                    st.checked += 1
                    problem = check_answer(mode, s)
                    if problem is None:
                        st.valid += 1
                    else:
                        st.problems.append(problem)
    return st


def render_structured(args, batches: list[Batch], notes: list[str], started: str, elapsed: float, mach: dict,
                      vers: dict) -> str:
    cmdline = " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/bench.py", *sys.argv[1:]])
    servers = [s for s in ("edgellm", "llama-server") if any(b.server == s for b in batches)]
    L = [STRUCTURED_HEADING, ""]
    L.append("Issue 9, point 7: does grammar-constrained sampling (a `json_schema` response format, "
             "`tool_choice: \"required\"`) keep decoding fast, and what does `n: 4` give against four "
             "requests? Generated by `scripts/bench.py --scenario structured` (the section is replaced on "
             "every such run; the other sections are kept).\n")
    L.append(f"- Date: {started} (run took {elapsed / 60:.1f} min)")
    L.append(f"- Machine: {mach['cpu']}, {mach['cores']} logical cores ({mach['affinity']} usable), "
             f"{mach['mem_gib']:.1f} GiB RAM, Linux {mach['kernel']}; load average before the run "
             f"{mach['load'][0]:.2f} / {mach['load'][1]:.2f} / {mach['load'][2]:.2f} (1 / 5 / 15 min), "
             f"after it {os.getloadavg()[0]:.2f}")
    L.append(f"- Command: `{cmdline}`")
    L.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    L.append(f"- Model: `{os.path.relpath(args.model, REPO) if args.model.startswith(str(REPO)) else args.model}`"
             f", {args.threads} thread(s); every server started once with 4 slots (`--parallel 4` / `-np 4`).")
    L.append(f"- Load: {args.rounds} round(s); in each, for each mode (plain, json_schema, tools; the order "
             f"rotates per round), {args.per_round} streaming request(s) one after the other (concurrency 1) "
             "with the same prompts in every mode (\"Request S-I: invent a character for a story about "
             f"... Give a name, a mood, an age and a few tags, then describe them.\"), `max_tokens` {args.tokens}, "
             "`temperature` 0, `stream_options.include_usage`. json_schema: `response_format` "
             "`{\"type\": \"json_schema\", ...}` with a schema of a string (maxLength 24), an enum of 5, an "
             "integer (unbounded: edgellm refuses `minimum`/`maximum` with a 400) and an array of at most 3 "
             "strings (maxLength 16), all required, no other keys. tools: two function tools "
             "(`save_character`: string, enum, integer; `search_topic`: string, integer, array of enum), "
             "`tool_choice: \"required\"`, `parallel_tool_calls: false`. Then `n: 4` in one request against "
             f"4 concurrent requests of n=1 (a story prompt, `max_tokens` {args.tokens}); order alternating "
             "per round.")
    L.append("- Figures: tokens = `usage.completion_tokens` (grammar-constrained answers stop when the JSON is "
             "complete, so they are shorter than plain ones: rates are per token actually generated). "
             "**decode tok/s** (the main figure) = median over all streams of (tokens − 1) / (last visible "
             "chunk − first visible chunk), a visible chunk being content or a tool-call delta; "
             "**gen tok/s** = median over requests of (tokens − 1) / (request duration − prefill), prefill "
             "being the duration of a `max_tokens: 1` request with a prompt of the same mode and shape in "
             "the same round; it counts tokens the server decodes but does not stream at once (a tool call's "
             "`<tool_call>{\"name\": ...` opening and closing), which the decode figure leaves out of its "
             "time span but not out of its token count; **total tok/s** = median over rounds of a batch's "
             "tokens / its wall time (prefill included); TTFT = first visible chunk; valid = the answer (or "
             "the call's arguments) parses and validates against its schema (checked by the benchmark); "
             "other CPU = the share of the machine other processes used (median over the rounds kept). A "
             f"round of a mode during which other processes used more than {args.max_other:.0f}% of the "
             "machine (`--max-other`) is left out of that mode's figures (rounds kept), unless all were.")
    L.append("")
    L.append("| server | mode | rounds kept | ok/sent | tokens/req (median, min–max) | finish reasons | valid | "
             "TTFT p50 | "
             "prefill | decode tok/s | × plain | gen tok/s | × plain | total tok/s | × plain | other CPU |")
    L.append("|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    stats: dict[tuple[str, str], ModeStats] = {}
    for server in servers:
        for mode in MODES:
            st = mode_stats(batches, server, mode, args.max_other)
            if st is None:
                continue
            stats[(server, mode)] = st
            plain = stats.get((server, "plain"))

            def x(values, base):
                a, b = median(values), base and median(base)
                return "-" if a is None or not b else f"{a / b:.2f}"
            toks = (f"{median(st.tokens):.0f} ({min(st.tokens):.0f}–{max(st.tokens):.0f})" if st.tokens else "-")
            L.append(f"| {server} | {mode} | {st.kept}/{st.rounds} | {st.ok}/{st.sent} | {toks} | "
                     f"{', '.join(f'{k} {v}' for k, v in sorted(st.finish.items())) or '-'} | "
                     f"{f'{st.valid}/{st.checked}' if st.checked else '-'} | {fmt_ms(median(st.ttfts))} | "
                     f"{fmt_ms(median(st.prefills))} | {fmt(median(st.rates))} | "
                     f"{x(st.rates, plain and plain.rates) if mode != 'plain' else '1'} | "
                     f"{fmt(median(st.gen_rates))} | "
                     f"{x(st.gen_rates, plain and plain.gen_rates) if mode != 'plain' else '1'} | "
                     f"{fmt(median(st.totals))} | "
                     f"{x(st.totals, plain and plain.totals) if mode != 'plain' else '1'} | "
                     f"{fmt(median(st.other_cpu), 0)}% |")
    L.append("")
    n4 = mode_stats(batches, "edgellm", "n4", args.max_other)
    sep = mode_stats(batches, "edgellm", "4x1", args.max_other)
    if n4 or sep:
        L.append("| edgellm, 4 slots | rounds kept | ok/sent | tokens (all choices, median) | wall (median) | "
                 "TTFT p50 | "
                 "decode tok/s per stream | total tok/s | other CPU |")
        L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for label, st in (("`n: 4`, one request", n4), ("4 concurrent requests, n=1", sep)):
            if st is None:
                continue
            per_round = [b for b in batches if b.server == "edgellm" and b.mode == st.mode]
            tokens = median(sum(r.tokens for r in b.ok) for b in per_round)
            L.append(f"| {label} | {st.kept}/{st.rounds} | {st.ok}/{st.sent} | {fmt(tokens, 0)} | "
                     f"{fmt_ms(median(st.walls))} | "
                     f"{fmt_ms(median(st.ttfts))} | {fmt(median(st.rates))} | {fmt(median(st.totals))} | "
                     f"{fmt(median(st.other_cpu), 0)}% |")
        L.append("")
    L.append("| ratio (edgellm) | value | target | verdict |")
    L.append("|---|---:|---:|---|")
    for mode in ("json_schema", "tools"):
        st, plain = stats.get(("edgellm", mode)), stats.get(("edgellm", "plain"))
        rows = [("decode tok/s", "rates"), ("gen tok/s", "gen_rates")]
        if mode == "tools":
            rows.insert(1, ("decode tok/s over visible deltas only ((deltas − 1) / their span)", "delta_rates"))
        for what, attr in rows:
            a = st and median(getattr(st, attr))
            b = plain and median(getattr(plain, attr))
            if a is None or not b:
                L.append(f"| {mode} ÷ plain, {what} | - | ≥ 0.8 | not measured |")
                continue
            verdict = f"{'met' if a / b >= 0.8 else 'missed'}{disturbed(args, st, plain)}"
            if mode == "tools" and attr == "rates":
                verdict += (" on paper only" if a / b >= 0.8 else " (and overstated)") + (
                    ": the tokens of the call's opening and closing, decoded before the first delta and "
                    "after the last, are counted but their time is not")
            L.append(f"| {mode} ÷ plain, {what} | {a / b:.2f} | ≥ 0.8 | {verdict} |")
    a, b = n4 and median(n4.totals), sep and median(sep.totals)
    L.append(f"| `n: 4` ÷ 4 requests of n=1, total tok/s | {fmt(a / b, 2) if a and b else '-'} | - | "
             f"{'n=4 faster' if a and b and a > b else 'n=4 not faster' if a and b else 'not measured'}"
             f"{disturbed(args, n4, sep) if a and b else ''} |")
    L.append("")
    problems = [(k, st) for k, st in stats.items() if st.errors or st.problems]
    for extra in ("n4", "4x1"):
        st = mode_stats(batches, "edgellm", extra, args.max_other)
        if st and st.errors:
            problems.append((("edgellm", extra), st))
    if problems or notes:
        L.append("Notes:\n")
        for (server, mode), st in problems:
            for e in st.errors[:3]:
                L.append(f"- {server} {mode}: error {e}")
            for p in st.problems[:3]:
                L.append(f"- {server} {mode}: answer does not validate: {p}")
        L.extend(f"- {n}" for n in notes)
        L.append("")
    return "\n".join(L) + "\n"


def disturbed(args, *stats: ModeStats | None) -> str:
    """' (unreliable: ...)' when other processes used more than --max-other percent of the machine
    (median over a mode's batches) while one of these modes was measured."""
    busy = [m for st in stats if st is not None and (m := median(st.other_cpu)) is not None and m > args.max_other]
    return f" (unreliable: other processes used {max(busy):.0f}% of the CPU)" if busy else ""


def replace_section(text: str, heading: str, section: str) -> str:
    """text with the `## heading` section (up to the next `## ` heading) replaced by section, or
    with section appended where there is none."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n") == heading), None)
    if start is None:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + section
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    rest = "".join(lines[end:])
    return "".join(lines[:start]) + section + ("\n" + rest if rest else "")


def old_section(text: str, heading: str) -> str | None:
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip("\n") == heading), None)
    if start is None:
        return None
    end = next((j for j in range(start + 1, len(lines)) if lines[j].startswith("## ")), len(lines))
    return "".join(lines[start:end]).rstrip("\n") + "\n"


def run_structured(args) -> int:
    notes: list[str] = []
    if not find_llama_server(args):
        notes.append("llama-server was not run: no binary on this machine (none was built here: "
                     "`scripts/build_llama_server.sh` takes a long llama.cpp compile); pass "
                     "`--llama-server PATH` for a side-by-side row with the same json_schema and tools.")
    mach, vers = machine_info(), versions(args)
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.monotonic()
    deadline = t0 + args.budget
    batches: list[Batch] = []
    servers = [("edgellm", start_edgellm, True)]
    if args.llama_server:
        servers.append(("llama-server", start_llama_server_jinja, False))
    try:
        for name, start, with_n in servers:
            try:
                run_structured_server(args, name, start, [], batches, deadline, with_n)
            except Exception as exc:  # one server failing must not lose the other's results
                log(f"[{name}] failed: {exc}")
                notes.append(f"{name} failed: {str(exc).splitlines()[0][:300]}")
        if args.llama_server:
            notes.append("llama-server: `n: 4` not measured (its chat endpoint serves one choice per request).")
    except KeyboardInterrupt:
        log("interrupted: servers stopped; writing what was measured")
        notes.append("the run was interrupted before it finished")
    write_section(args, STRUCTURED_HEADING,
                  render_structured(args, batches, notes, started, time.monotonic() - t0, mach, vers))
    return 0


def write_section(args, heading: str, section: str) -> None:
    """A scenario's section into --out, replacing its old one and keeping the rest; printed without --out."""
    if args.out:
        path = Path(args.out)
        path.write_text(replace_section(path.read_text() if path.exists() else "", heading, section))
        log(f"wrote the section '{heading}' of {args.out}")
    else:
        print(section)


RETRIEVAL_HEADING = "## Retrieval (`--scenario retrieval`)"


def run_retrieval(args) -> int:
    sys.path.insert(0, str(REPO))  # the store package
    from bench_retrieval import measure, report

    mach = machine_info()
    results = []
    for size in sorted({int(s) for s in args.sizes.split(",") if s.strip()}):
        log(f"[retrieval] {size:,} chunks...")
        results.append(measure(size, args.queries, args.chunks_per_doc))
        log(f"[retrieval] {results[-1]}")
    section = report(results, command_line(), machine_line(mach))
    assert section.startswith(RETRIEVAL_HEADING)
    write_section(args, RETRIEVAL_HEADING, section)
    return 0


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "scripts/bench.py", *sys.argv[1:]])


def machine_line(before: dict) -> str:
    """The machine, its load average before (from machine_info) and now, and the time."""
    return (f"{before['cpu']}, {before['cores']} logical cores, {before['mem_gib']:.1f} GiB RAM, load average "
            f"before {before['load'][0]:.2f}, after {os.getloadavg()[0]:.2f}, "
            f"{dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}")


FOOTPRINT_HEADING = "## Footprint (`--scenario footprint`)"


EMBEDDINGS_HEADING = "## Embeddings (`--scenario embeddings`)"


def run_embeddings(args) -> int:
    from bench_embeddings import LOADS, measure_load, report, start_edgellm, start_llama_server

    bench = sys.modules[__name__]
    mach = machine_info()
    rates = []
    starters = [("edgellm", start_edgellm)]
    if find_llama_server(args):
        starters.append(("llama-server", start_llama_server))
    else:
        log("[embeddings] llama-server: no binary (pass --llama-server PATH, or --build-llama-server); skipped")
    servers = []
    try:
        for name, start in starters:
            log(f"[embeddings] starting {name}")
            servers.append((name, start(bench, args)))
        for load in LOADS:  # the servers in turn, each load --repeat times, so that drift hits both alike
            runs: dict[str, list] = {}
            for _ in range(args.repeat):
                for name, srv in servers:
                    runs.setdefault(name, []).append(measure_load(name, srv.port, load, args.embedding_requests))
                    log(f"[embeddings] {runs[name][-1]} -> {runs[name][-1].per_second:.1f} texts/s")
            rates.extend(sorted(measured, key=lambda r: r.per_second)[(len(measured) - 1) // 2]
                         for measured in runs.values())
    finally:
        for _, srv in servers:
            srv.stop()
    section = report(rates, command_line(), machine_line(mach), args.repeat)
    assert section.startswith(EMBEDDINGS_HEADING)
    write_section(args, EMBEDDINGS_HEADING, section)
    return 0


def find_llama_server(args) -> str | None:
    """--llama-server, else the binary scripts/build_llama_server.sh built (building it first with
    --build-llama-server); None when there is none."""
    if not args.llama_server:
        built = CACHE / "llama-cpp-python-0.3.36" / "build" / "bin" / "llama-server"
        if not built.exists() and args.build_llama_server:
            log("building llama-server (scripts/build_llama_server.sh)...")
            subprocess.run(["bash", str(REPO / "scripts" / "build_llama_server.sh")], check=False, timeout=3600)
        if built.exists():
            args.llama_server = str(built)
    return args.llama_server


def run_footprint(args) -> int:
    from bench_footprint import measure_edgellm, measure_llama_server, report

    bench = sys.modules[__name__]
    mach = machine_info()
    results = []
    for name, measure in [("edgellm", measure_edgellm), ("llama-server", measure_llama_server)]:
        if name == "llama-server" and not find_llama_server(args):
            log("[footprint] llama-server: no binary (pass --llama-server PATH, or --build-llama-server); skipped")
            continue
        log(f"[footprint] {name}...")
        results.append(measure(bench, args))
        log(f"[footprint] {results[-1]}")
    section = report(results, command_line(), machine_line(mach))
    assert section.startswith(FOOTPRINT_HEADING)
    write_section(args, FOOTPRINT_HEADING, section)
    return 0


def start_llama_server_jinja(args, parallel: int) -> tuple[Server, list[int]]:
    """llama-server as start_llama_server starts it, plus --jinja, which its tools support needs."""
    port = free_port()
    cmd = [args.llama_server, "-m", args.model, "-t", str(args.threads), "-tb", str(args.threads),
           "-np", str(parallel), "-c", str(2048 * parallel), "--host", HOST, "--port", str(port),
           "--no-webui", "--jinja"]
    srv = Server("llama-server", cmd, port, "/health", logs_dir() / f"llama-server-jinja-p{parallel}.log")
    srv.wait_ready(args.start_timeout)
    return srv, [srv.proc.pid]


# ---------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrency levels")
    p.add_argument("--scenario", choices=["servers", "structured", "retrieval", "footprint", "embeddings"],
                   default="servers",
                   help="servers (default): edgellm against llama.cpp's servers at each concurrency; "
                        "structured: plain / json_schema / tool_choice=required decode speed and n=4 against "
                        "4 requests; retrieval: Store.search at --sizes chunks; footprint: start-up, memory and "
                        "idle CPU on the default config (scripts/bench_footprint.py); embeddings: texts/s at "
                        "32 and 1 texts per request (scripts/bench_embeddings.py); each of the last four is "
                        "written as its own section of --out")
    p.add_argument("--sizes", default="10000,100000,1000000", help="retrieval: collection sizes, in chunks")
    p.add_argument("--queries", type=int, default=200, help="retrieval: queries per size")
    p.add_argument("--chunks-per-doc", type=int, default=1000, help="retrieval: chunks per ingested document")
    p.add_argument("--idle-seconds", type=float, default=30.0, help="footprint: seconds of idle CPU measured")
    p.add_argument("--embedding-requests", type=int, default=40, help="embeddings: requests each client sends")
    p.add_argument("--rounds", type=int, default=None,
                   help="servers: requests each client sends, one after the other (default 2); "
                        "structured: rounds (default 3)")
    p.add_argument("--per-round", type=int, default=3,
                   help="structured: requests per mode in each round, one after the other")
    p.add_argument("--budget", type=float, default=900.0,
                   help="structured: no new round starts after this many seconds")
    p.add_argument("--parallel-mode", choices=["level", "max"], default="level",
                   help="level: restart each server per level with slots = concurrency; max: start once "
                        "with slots = the largest level")
    p.add_argument("--llama-server", help="llama-server binary; default: the one scripts/build_llama_server.sh "
                                          "built, if any")
    p.add_argument("--build-llama-server", action="store_true",
                   help="run scripts/build_llama_server.sh first when no binary is found")
    p.add_argument("--lcpp-venv", default=str(CACHE / "venv-lcpp"),
                   help="venv with llama-cpp-python[server] for `python -m llama_cpp.server`")
    p.add_argument("--only", help="comma-separated subset of: inprocess,edgellm,llama-server,lcpp-server")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="do not send ignore_eos: true")
    p.add_argument("--request-timeout", type=float, default=180.0)
    p.add_argument("--level-timeout", type=float, default=300.0)
    p.add_argument("--start-timeout", type=float, default=120.0)
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="before each level, wait up to this many seconds for other processes to go below "
                        "--quiet-below percent of the machine's CPU (0: do not wait)")
    p.add_argument("--quiet-below", type=float, default=10.0)
    p.add_argument("--max-other", type=float, default=15.0,
                   help="measure a level again when other processes used more than this percent of the "
                        "machine's CPU during it")
    p.add_argument("--retries", type=int, default=2, help="most re-measurements per level")
    p.add_argument("--repeat", type=int, default=1,
                   help="servers: measure each level this many times, the contenders in turn, and report the "
                        "run with the median total tok/s (a shared machine's speed drifts by 10%% and more "
                        "between runs); embeddings: the same for each load")
    p.add_argument("--n-gpu-layers", type=int, default=None,
                   help="layers on the GPU: edgellm's --n-gpu-layers, llama-server's -ngl, the in-process run's "
                        "n_gpu_layers (needs CUDA builds: scripts/bench_gpu.sh); > 0 writes the '## Chat on a GPU' "
                        "section of --out and keeps the others; unset: no such flag is passed (0 forces a CUDA "
                        "build of llama-server onto the CPU)")
    p.add_argument("--gpu-build", default=os.environ.get("EDGELLM_GPU_BUILD"),
                   help="how llama.cpp was built, for the GPU section (default: $EDGELLM_GPU_BUILD, which "
                        "scripts/bench_gpu.sh sets)")
    p.add_argument("--out", help="write the markdown report here (default: print it)")
    p.add_argument("--_inprocess-child", dest="inprocess_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--salt", type=int, default=1000, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = str(Path(args.model).resolve())
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.rounds is None:
        args.rounds = 3 if args.scenario == "structured" else 2
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.inprocess_child:
        inprocess_child(args)
        return 0
    if not os.path.exists(args.model):
        sys.exit(f"model not found: {args.model}")
    # SIGTERM -> KeyboardInterrupt, so the finally blocks kill every server we started
    def on_sigterm(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    if args.scenario == "structured":
        return run_structured(args)
    if args.scenario == "retrieval":
        return run_retrieval(args)
    if args.scenario == "footprint":
        return run_footprint(args)
    if args.scenario == "embeddings":
        return run_embeddings(args)
    only = set(args.only.split(",")) if args.only else {"inprocess", "edgellm", "llama-server", "lcpp-server"}
    skipped: list[str] = []

    if "llama-server" in only:
        if not find_llama_server(args):
            skipped.append("llama-server: no binary (pass --llama-server PATH, or --build-llama-server)")
    else:
        args.llama_server = None
    lcpp_python = Path(args.lcpp_venv) / "bin" / "python"
    if "lcpp-server" in only:
        probe = subprocess.run([str(lcpp_python), "-c", "import llama_cpp.server.app"], capture_output=True) \
            if lcpp_python.exists() else None
        if probe is None or probe.returncode != 0:
            skipped.append(f"llama-cpp-python server: no venv with llama-cpp-python[server] at {args.lcpp_venv}")
            only.discard("lcpp-server")

    mach, vers = machine_info(), versions(args)
    started = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.monotonic()
    levels: list[Level] = []
    extra = {"ignore_eos": True} if args.ignore_eos else {}
    try:
        contenders = []
        if "edgellm" in only:
            contenders.append(Contender("edgellm", start_edgellm, takes_extra=False))
        if args.llama_server:
            contenders.append(Contender("llama-server", start_llama_server))
        if "lcpp-server" in only:  # it serves one request at a time whatever the level
            contenders.append(Contender("llama-cpp-python server", start_lcpp_server, fixed_parallel=1))
        with_inprocess = "inprocess" in only and 1 in args.concurrency
        if "inprocess" in only and not with_inprocess:
            skipped.append("in-process: it runs at concurrency 1 only, which --concurrency leaves out")
        run_contenders(args, contenders, with_inprocess, extra, levels)
    except KeyboardInterrupt:
        log("interrupted: servers stopped; writing what was measured")
        skipped.append("the run was interrupted before it finished")
    report = render(args, levels, skipped, started, time.monotonic() - t0, mach, vers)
    if (args.n_gpu_layers or 0) > 0:  # its own section; the CPU chat report and the other sections stay
        write_section(args, GPU_HEADING, gpu_section(args, report))
        return 0
    if args.out:
        old = Path(args.out).read_text() if Path(args.out).exists() else ""
        # the other scenarios' sections stay, and so does the analysis written by hand
        for heading in (CHAT_ANALYSIS_HEADING, GPU_HEADING, STRUCTURED_HEADING, RETRIEVAL_HEADING,
                        FOOTPRINT_HEADING, EMBEDDINGS_HEADING):
            kept = old_section(old, heading)
            if kept:
                report = report.rstrip("\n") + "\n\n" + kept
        Path(args.out).write_text(report)
        log(f"wrote {args.out}")
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
