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
    """The i-th prompt of one measurement. salt (concurrency * 10 + attempt) puts a different
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


def stream_chat(port: int, body: dict, timeout: float) -> Result:
    """POST /v1/chat/completions with stream=true and read the SSE stream to [DONE]."""
    r = Result(start=time.monotonic())
    deadline = r.start + timeout
    conn = http.client.HTTPConnection(HOST, port, timeout=min(timeout, 60))
    try:
        data = json.dumps(body).encode()
        conn.request("POST", "/v1/chat/completions", body=data,
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        resp = conn.getresponse()
        if resp.status != 200:
            r.error = f"HTTP {resp.status}: {resp.read(300).decode(errors='replace')}"
            return r
        while True:
            if time.monotonic() > deadline:
                r.error = f"request time limit ({timeout:.0f}s) reached"
                break
            line = resp.readline()
            if not line:
                r.error = r.error or "stream ended without [DONE]"
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
                r.error = f"bad SSE payload: {payload[:100]!r}"
                break
            if "error" in event:
                r.error = f"error event: {json.dumps(event['error'])[:200]}"
                break
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
    except (OSError, http.client.HTTPException) as exc:
        r.error = f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
        r.end = time.monotonic()
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
            body = request_body(args, c * args.rounds + rnd, concurrency * 10 + attempt, model, extra)
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
                          n_threads_batch=args.threads, verbose=False)

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
    cmd = [sys.executable, __file__, "--_inprocess-child", "--salt", str(10 + attempt),
           "--model", args.model, "--threads", str(args.threads),
           "--tokens", str(args.tokens), "--rounds", str(args.rounds), "--quiet-wait", str(args.quiet_wait),
           "--quiet-below", str(args.quiet_below)]
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
    srv = Server("edgellm", cmd, port, "/health", logs_dir() / f"edgellm-p{parallel}.log")
    srv.wait_ready(args.start_timeout)
    workers = [w.get("pid") for w in srv.health.get("models", {}).get("bench", {}).get("workers", [])]
    return srv, [srv.proc.pid] + [p for p in workers if p]


def start_llama_server(args, parallel: int) -> tuple[Server, list[int]]:
    port = free_port()
    cmd = [args.llama_server, "-m", args.model, "-t", str(args.threads), "-tb", str(args.threads),
           "-np", str(parallel), "-c", str(2048 * parallel), "--host", HOST, "--port", str(port),
           "--no-webui"]
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
                    warmup(srv.port, "bench", extra)
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
                for c, srv, pids, parallel in running:
                    log(f"[{c.name}] concurrency {n}: {n} client(s) x {args.rounds} request(s)")
                    if srv.proc.poll() is not None:
                        out.append(Level(c.name, n, parallel, note=f"server had exited ({srv.proc.returncode})"))
                        continue
                    level = retried(args, lambda attempt: run_level(args, srv.port, c.name, n, "bench", extra, pids,
                                                                    attempt))
                    level.parallel = parallel
                    if srv.proc.poll() is not None:
                        level.note = (level.note + "; " if level.note else "") + \
                            f"server exited ({srv.proc.returncode})"
                    out.append(level)
                    log("    " + summary_line(level))
        finally:
            for _, srv, _, _ in running:
                srv.stop()


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
                                      capture_output=True, text=True, timeout=10).stdout.strip() or "?"
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if dirty:
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
             + (", `ignore_eos: true` (honoured by llama-server only; the others may stop at EOS)"
                if args.ignore_eos else "")
             + f". Limits: {args.request_timeout:.0f} s per request, {args.level_timeout:.0f} s per level.")
    L.append(f"- Shared machine: before each level the benchmark waits (up to {args.quiet_wait:.0f} s) until other "
             f"processes use under {args.quiet_below:.0f}% of the CPU; a level during which they used more than "
             f"{args.max_other:.0f}% is measured again (up to {args.retries} more times) and the least disturbed "
             "attempt is kept.")
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
    e8, s8 = find(levels, "edgellm", 8), find(levels, "llama-server", 8)
    L.append(ratio_row("edgellm 1-stream tok/s ÷ in-process tok/s (stream tok/s)",
                       e1 and e1.stream_rate, ip and ip.stream_rate, "≥ 0.95", lambda r: r >= 0.95,
                       (e1, ip), args.max_other))
    L.append(ratio_row("edgellm 8-concurrent total tok/s ÷ llama-server's",
                       e8 and e8.total_rate, s8 and s8.total_rate, "≥ 1.0", lambda r: r >= 1.0,
                       (e8, s8), args.max_other))
    L.append(ratio_row("edgellm 8-concurrent TTFT p50 ÷ llama-server's (seconds)",
                       e8 and e8.ttft(0.5), s8 and s8.ttft(0.5), "≤ 1.5", lambda r: r <= 1.5,
                       (e8, s8), args.max_other))
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
    L.append("- Few requests per level: TTFT p95 over 2 to 32 requests is close to the maximum. Expect a few "
             "percent of run-to-run noise on the throughput columns.")
    L.append("")
    if skipped:
        L.append("## Not run\n")
        L.extend(f"- {s}" for s in skipped)
        L.append("")
    return "\n".join(L) + "\n"


IN_PROCESS = "in-process (llama-cpp-python)"
ORDER = {IN_PROCESS: 0, "edgellm": 1, "llama-server": 2, "llama-cpp-python server": 3}


# ---------------------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128, help="max_tokens of every request")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated concurrency levels")
    p.add_argument("--rounds", type=int, default=2, help="requests each client sends, one after the other")
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
    p.add_argument("--out", help="write the markdown report here (default: print it)")
    p.add_argument("--_inprocess-child", dest="inprocess_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--salt", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = str(Path(args.model).resolve())
    args.concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
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
    only = set(args.only.split(",")) if args.only else {"inprocess", "edgellm", "llama-server", "lcpp-server"}
    skipped: list[str] = []

    if "llama-server" in only and not args.llama_server:
        built = CACHE / "llama-cpp-python-0.3.36" / "build" / "bin" / "llama-server"
        if not built.exists() and args.build_llama_server:
            log("building llama-server (scripts/build_llama_server.sh)...")
            subprocess.run(["bash", str(REPO / "scripts" / "build_llama_server.sh")], check=False, timeout=3600)
        if built.exists():
            args.llama_server = str(built)
        else:
            skipped.append("llama-server: no binary (pass --llama-server PATH, or --build-llama-server)")
    elif "llama-server" not in only:
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
            contenders.append(Contender("edgellm", start_edgellm))
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
    if args.out:
        Path(args.out).write_text(report)
        log(f"wrote {args.out}")
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
