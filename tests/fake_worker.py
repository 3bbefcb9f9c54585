"""A worker for fault injection: the real WorkerLoop with an engine that misbehaves, or a rogue peer.

    python tests/fake_worker.py --connect ADDR --model-name NAME --mode MODE [--slots N] [--record FILE]
        [--curve-server-key-file server.key --curve-secret-key-file NAME.key_secret]

Modes of the real WorkerLoop:
    echo     answers "hello world" in two chunks (a well-behaved fake, for sanity); with --record, it
             appends each job id it is given to FILE (a rogue that registers a stolen name)
    die      sends one chunk, then the process exits abruptly (os._exit)
    die0     exits abruptly as soon as it has a job, before answering anything
    stall    accepts jobs and never answers, but keeps heartbeating
    garbage  answers with a CHUNK whose body lacks the fields the front end needs
    misfit   answers a chat job with a well-formed embedding CHUNK (the wrong shape for the job)
    busy     answers every job with ERROR worker_busy, however many slots it claims
    stuck    its step never returns (as a grammar too ambiguous for llama.cpp would make it); run
             with a step_timeout of 2 s, the loop fails its jobs and the process exits
    text     answers --text, a few characters per chunk, 20 chunks a second (a model that says
             whatever a test needs, hostile markup included)
    trickle  answers "tick " five times a second and never finishes on its own: only a cancel ends it

Rogue peers, a bare DEALER socket each (they exit by themselves):
    flood       registers, then sends HEARTBEATs as fast as it can for --seconds
    deep-ready  sends one READY whose JSON body nests 100,000 deep (200 KB), then waits --seconds
    oversized   sends one READY of --size bytes, then waits --seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zmq  # noqa: E402
import zmq.auth  # noqa: E402

from worker import protocol as ewp  # noqa: E402
from worker.loop import CurveKeys, Event, JobError, WorkerLoop  # noqa: E402

ROGUES = ("flood", "deep-ready", "oversized")


class FaultyEngine:
    kind = "chat"

    def __init__(self, mode: str, slots: int = 2, record: str | None = None, text: str = ""):
        self.mode = mode
        self.slots = slots
        self.record = record
        self.pieces = [text[i:i + 4] for i in range(0, len(text), 4)]
        self.jobs: dict[str, int] = {}

    def describe(self) -> dict:
        return {"n_ctx": 512}

    def submit(self, job_id: str, request: dict) -> None:
        if self.mode == "busy":
            raise JobError(ewp.WORKER_BUSY, "always busy")
        if self.record:
            with open(self.record, "a") as f:
                f.write(job_id + "\n")
        self.jobs[job_id] = 0

    def cancel(self, job_id: str) -> None:
        if job_id in self.jobs:
            self.jobs[job_id] = -1

    def abort(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def busy(self) -> bool:
        return self.mode != "stall" and bool(self.jobs)

    def step(self) -> list[Event]:
        if self.mode == "stuck":
            time.sleep(3600)
        events = []
        for job_id, state in list(self.jobs.items()):
            if self.mode == "die0":
                os._exit(3)
            if state == -1:
                del self.jobs[job_id]
                events.append(Event(job_id, ewp.DONE, {"finish_reason": "cancelled",
                                                        "usage": {"prompt_tokens": 0, "total_tokens": 0}}))
            elif self.mode == "garbage":
                del self.jobs[job_id]
                events.append(Event(job_id, ewp.CHUNK, {"nonsense": True}))
            elif self.mode == "misfit":
                del self.jobs[job_id]
                events.append(Event(job_id, ewp.CHUNK, {"index": 0, "embedding": ewp.pack_vector([1.0])}))
            elif self.mode == "trickle":
                time.sleep(0.2)
                events.append(Event(job_id, ewp.CHUNK, {"index": 0, "text": "tick "}))
            elif self.mode == "text" and state < len(self.pieces):
                time.sleep(0.05)
                self.jobs[job_id] = state + 1
                events.append(Event(job_id, ewp.CHUNK, {"index": 0, "text": self.pieces[state]}))
            elif self.mode == "text":
                del self.jobs[job_id]
                events.append(Event(job_id, ewp.DONE, {"finish_reason": "stop", "usage": {
                    "prompt_tokens": 1, "completion_tokens": state, "total_tokens": state + 1}}))
            elif state == 0:
                self.jobs[job_id] = 1
                events.append(Event(job_id, ewp.CHUNK, {"index": 0, "text": "hello"}))
            elif self.mode == "die":
                time.sleep(0.3)  # let ZeroMQ's I/O thread send the first chunk
                os._exit(3)
            else:
                del self.jobs[job_id]
                events.append(Event(job_id, ewp.CHUNK, {"index": 0, "text": " world"}))
                events.append(Event(job_id, ewp.DONE, {"finish_reason": "stop", "usage": {
                    "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}))
        return events


def rogue(args, curve: CurveKeys | None) -> None:
    """A bare DEALER that misbehaves as ``args.mode`` says, then exits."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 1000)  # a send that finds the queue full gives up (zmq.Again) in 1s
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve.server_public, curve.public, \
            curve.secret
    sock.connect(args.connect)
    ready = {"model": args.model_name, "kind": "chat", "slots": args.slots, "n_ctx": 512, "pid": os.getpid(),
             "worker_id": f"rogue-{args.mode}"}
    if args.mode == "flood":
        sock.send_multipart(ewp.encode(ewp.READY, body=ready))
        heartbeat = ewp.encode(ewp.HEARTBEAT)
        sent, end = 0, time.monotonic() + args.seconds
        while time.monotonic() < end:
            try:
                for _ in range(1000):
                    sock.send_multipart(heartbeat)
                    sent += 1
            except zmq.Again:
                pass
            while sock.poll(0):
                sock.recv_multipart()
        print(f"flood: sent {sent} heartbeats in {args.seconds:g}s", flush=True)
        return
    if args.mode == "deep-ready":
        body = b"[" * 100_000 + b"]" * 100_000
    else:
        body = b" " * args.size
    sock.send_multipart([ewp.PROTOCOL, ewp.READY, body], copy=False)
    print(f"{args.mode}: sent a READY of {len(body)} bytes", flush=True)
    time.sleep(args.seconds)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--connect", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--mode", required=True,
                   choices=["echo", "die", "die0", "stall", "garbage", "misfit", "busy", "stuck", "text", "trickle",
                            *ROGUES])
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--record", help="echo: append the id of every job it is given to this file")
    p.add_argument("--text", default="", help="text: what to answer")
    p.add_argument("--seconds", type=float, default=5.0, help="rogues: how long to flood, or to stay connected")
    p.add_argument("--size", type=int, default=64 << 20, help="oversized: bytes in the READY's body frame")
    p.add_argument("--curve-server-key-file")
    p.add_argument("--curve-secret-key-file")
    args = p.parse_args()
    curve = None
    if args.curve_secret_key_file:
        server_public, _ = zmq.auth.load_certificate(args.curve_server_key_file)
        public, secret = zmq.auth.load_certificate(args.curve_secret_key_file)
        curve = CurveKeys(server_public=server_public, public=public, secret=secret)
    if args.mode in ROGUES:
        rogue(args, curve)
        return
    WorkerLoop(FaultyEngine(args.mode, args.slots, args.record, args.text), args.connect, args.model_name, curve=curve,
               step_timeout=2.0).run()


if __name__ == "__main__":
    main()
