#!/usr/bin/env python3
"""Does the same seeded chat request give the same text alone, again, joined mid-generation, and in a
4-way batch, on this CPU? Runs the chat engine directly (no server); prints the counts.

    .venv/bin/python scripts/determinism.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]

edgellm promises only "same request, same seed, same load -> same text" (README, "Determinism"); this
script measures the rest, which depends on the CPU's llama.cpp kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker import protocol as ewp  # noqa: E402
from worker.chat_engine import ChatEngine  # noqa: E402
from worker.model import quiet_llama_logs  # noqa: E402
from worker.settings import ModelSettings  # noqa: E402

PROMPTS = ["Tell me about cats.", "Write a haiku about rain.", "List three fruits.", "Explain gravity to a child.",
           "What is the capital of France?", "Describe a sunset over the sea."]
BACKGROUND = "Here is a note about the weather. " * 30


class Runner:
    def __init__(self, engine: ChatEngine):
        self.engine = engine
        self.count = 0

    def new_id(self) -> str:
        self.count += 1
        return f"{self.count:032x}"

    def run(self, jobs: dict[str, dict], later: dict[str, dict] | None = None, after_steps: int = 3) -> dict:
        texts = {j: "" for j in [*jobs, *(later or {})]}
        for job_id, request in jobs.items():
            self.engine.submit(job_id, request)
        steps = 0
        while self.engine.busy():
            for event in self.engine.step():
                if event.command == ewp.CHUNK:
                    texts[event.job_id] += event.body["text"]
            steps += 1
            if steps == after_steps and later:
                for job_id, request in later.items():
                    self.engine.submit(job_id, request)
        return texts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = p.parse_args()
    quiet_llama_logs(False)
    runner = Runner(ChatEngine(ModelSettings(name="model", path=args.model, parallel=4, threads=args.threads)))
    cases = again = joined = batched = 0
    for i, prompt in enumerate(PROMPTS):
        for temperature in (0, 0.8):
            request = {"kind": "chat", "messages": [{"role": "user", "content": prompt}], "seed": 100 + i,
                       "temperature": temperature, "max_tokens": 40}
            first, second = runner.new_id(), runner.new_id()
            alone = runner.run({first: request})[first]
            again += alone == runner.run({second: request})[second]
            generating, joining = runner.new_id(), runner.new_id()
            other = {"kind": "chat", "messages": [{"role": "user", "content": BACKGROUND + prompt}], "seed": 7, "max_tokens": 40}
            joined += alone == runner.run({generating: other}, later={joining: request})[joining]
            ids = [runner.new_id() for _ in range(4)]
            neighbours = {job_id: {"kind": "chat", "messages": [{"role": "user", "content": PROMPTS[(i + n + 1) % len(PROMPTS)]}],
                                   "seed": 999 + n, "max_tokens": 40} for n, job_id in enumerate(ids[1:])}
            batched += alone == runner.run({ids[0]: request, **neighbours})[ids[0]]
            cases += 1
    print(f"{cases} seeded requests: same text run again {again}/{cases}, joined mid-generation {joined}/{cases}, "
          f"in a 4-way batch {batched}/{cases}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
