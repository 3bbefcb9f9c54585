"""Starting the configured worker processes and restarting any that die."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from frontend.config import ModelConfig
from worker.settings import EXIT_CANNOT_START, WorkerSettings

log = logging.getLogger("edgellm.supervisor")

RESTART_INITIAL = 1.0  # seconds before the first restart of a crashed worker
RESTART_MAX = 30.0


def auto_cores(workers: int, available: list[int]) -> list[str]:
    """Split the cores this process may use into one contiguous group per worker, or none
    when there are fewer cores than workers (then the OS schedules them)."""
    if workers < 2 or len(available) < workers:
        return []
    size = len(available) // workers
    return [",".join(str(c) for c in available[i * size:(i + 1) * size]) for i in range(workers)]


def worker_command(model: ModelConfig, connect: str, replica: int, *, verbose: bool = False,
                   cores: list[str] | None = None) -> list[str]:
    """The command line of one local worker process for ``model``."""
    settings = WorkerSettings(**vars(model.model_settings()), connect=connect,
                              cores=cores[replica] if cores else None,
                              gpu=model.gpus[replica] if model.gpus else None, verbose=verbose)
    return [sys.executable, "-m", "worker", *settings.argv()]


@dataclass
class ManagedWorker:
    model: ModelConfig
    replica: int
    process: subprocess.Popen | None = None
    restart_at: float = 0.0
    backoff: float = RESTART_INITIAL
    started_at: float = 0.0
    given_up: bool = False  # it exited with EXIT_CANNOT_START: restarting would fail the same way


class Supervisor:
    def __init__(self, models: list[ModelConfig], connect: str, *, verbose: bool = False,
                 on_exit: Callable[[int], None] | None = None):
        self.connect = connect
        self.on_exit = on_exit
        self.verbose = verbose
        self.workers = [ManagedWorker(m, i) for m in models for i in range(m.workers)]
        available = sorted(os.sched_getaffinity(0))
        self.cores = {m.name: m.cores or auto_cores(m.workers, available) for m in models}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def start(self) -> None:
        for w in self.workers:
            self._spawn(w)
        self._thread.start()

    def _spawn(self, w: ManagedWorker) -> None:
        cmd = worker_command(w.model, self.connect, w.replica, verbose=self.verbose, cores=self.cores[w.model.name])
        w.started_at = time.monotonic()
        try:
            w.process = subprocess.Popen(cmd)
        except OSError as exc:  # out of memory or processes: try again later
            log.error("cannot start worker %d for model %r: %s; retrying in %.0fs", w.replica, w.model.name,
                      exc, w.backoff)
            self._schedule_restart(w, w.started_at)
            return
        log.info("started worker %d for model %r (pid %d)", w.replica, w.model.name, w.process.pid)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            for w in self.workers:
                if w.process is not None and w.process.poll() is not None:
                    self._exited(w, now)
                elif w.process is None and not w.given_up and now >= w.restart_at and not self._stop.is_set():
                    self._spawn(w)

    def _exited(self, w: ManagedWorker, now: float) -> None:
        code = w.process.returncode
        if self.on_exit is not None:
            self.on_exit(w.process.pid)
        w.process = None
        if code == EXIT_CANNOT_START:
            w.given_up = True
            log.error("worker %d for model %r cannot start with its settings (see its log above); not restarting "
                      "it: fix the configuration and restart the server", w.replica, w.model.name)
            return
        if now - w.started_at > 60:
            w.backoff = RESTART_INITIAL  # it ran fine for a while: not a crash loop
        log.error("worker %d for model %r exited with code %s; restarting in %.0fs", w.replica, w.model.name, code,
                  w.backoff)
        self._schedule_restart(w, now)

    @staticmethod
    def _schedule_restart(w: ManagedWorker, now: float) -> None:
        w.restart_at = now + w.backoff
        w.backoff = min(w.backoff * 2, RESTART_MAX)

    def failed_models(self) -> list[str]:
        """Models with a worker that cannot start with its settings (and is not restarted)."""
        return sorted({w.model.name for w in self.workers if w.given_up})

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for w in self.workers:
            if w.process is not None and w.process.poll() is None:
                w.process.terminate()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.process is not None:
                try:
                    w.process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    w.process.kill()
