"""A worker for fault injection: the real WorkerLoop with an engine that misbehaves.

    python tests/fake_worker.py --connect ADDR --model-name NAME --mode MODE

Modes:
    echo     answers "hello world" in two chunks (a well-behaved fake, for sanity)
    die      sends one chunk, then the process exits abruptly (os._exit)
    die0     exits abruptly as soon as it has a job, before answering anything
    stall    accepts jobs and never answers, but keeps heartbeating
    garbage  answers with a CHUNK whose body lacks the fields the front end needs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker import protocol as ewp  # noqa: E402
from worker.loop import Event, WorkerLoop  # noqa: E402


class FaultyEngine:
    kind = "chat"
    slots = 2

    def __init__(self, mode: str):
        self.mode = mode
        self.jobs: dict[str, int] = {}

    def describe(self) -> dict:
        return {"n_ctx": 512}

    def submit(self, job_id: str, request: dict) -> None:
        self.jobs[job_id] = 0

    def cancel(self, job_id: str) -> None:
        if job_id in self.jobs:
            self.jobs[job_id] = -1

    def abort(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def busy(self) -> bool:
        return self.mode != "stall" and bool(self.jobs)

    def step(self) -> list[Event]:
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
            elif state == 0:
                self.jobs[job_id] = 1
                events.append(Event(job_id, ewp.CHUNK, {"text": "hello"}))
            elif self.mode == "die":
                time.sleep(0.3)  # let ZeroMQ's I/O thread send the first chunk
                os._exit(3)
            else:
                del self.jobs[job_id]
                events.append(Event(job_id, ewp.CHUNK, {"text": " world"}))
                events.append(Event(job_id, ewp.DONE, {"finish_reason": "stop", "usage": {
                    "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}))
        return events


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--connect", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--mode", choices=["echo", "die", "die0", "stall", "garbage"], required=True)
    args = p.parse_args()
    WorkerLoop(FaultyEngine(args.mode), args.connect, args.model_name).run()


if __name__ == "__main__":
    main()
