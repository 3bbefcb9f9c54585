"""What the broker lets in from the worker sockets: authorized keys and their models, message
rates, and logs that a peer cannot flood.

- ``KeyGate`` is the ZAP credentials provider for the remote worker socket: a CURVE key gets in
  only if it is in the authorized-keys folder (worker/keys.py), and says which model names its
  worker may register. ZeroMQ then stamps every message of that connection with the key
  (``User-Id``), which the broker checks on READY.
- ``PeerLimiter`` gives every peer a token bucket: messages beyond its rate are dropped before
  they are even parsed, so one flooding peer costs a receive each and cannot starve the others.
- ``ThrottledLog`` logs a peer's repeated problem once per interval, with a count.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

LOG_INTERVAL = 10.0  # seconds between two log lines about the same peer and problem
MAX_TRACKED = 4096  # peers and problems remembered at once (idle ones are forgotten first)


class ThrottledLog:
    """A log line at most once per ``interval`` per key; the next line says how many were held back.
    Thread-safe (the ZAP thread logs through one too)."""

    def __init__(self, log: logging.Logger, interval: float = LOG_INTERVAL):
        self.log = log
        self.interval = interval
        self._last: dict[object, tuple[float, int]] = {}  # key -> (when last logged, held back since)
        self._lock = threading.Lock()

    def warning(self, key: object, message: str, *args, exc_info: bool = False) -> None:
        self._log(logging.WARNING, key, message, args, exc_info)

    def info(self, key: object, message: str, *args) -> None:
        self._log(logging.INFO, key, message, args, False)

    def _log(self, level: int, key: object, message: str, args: tuple, exc_info: bool) -> None:
        now = time.monotonic()
        with self._lock:
            logged_at, held = self._last.get(key, (-self.interval, 0))
            if now - logged_at < self.interval:
                self._last[key] = (logged_at, held + 1)
                return
            if len(self._last) >= MAX_TRACKED:
                self._last = {k: v for k, v in self._last.items() if now - v[0] < self.interval}
                if len(self._last) >= MAX_TRACKED:
                    self._last.clear()
            self._last[key] = (now, 0)
        suffix = f" ({held} more like it in the last {now - logged_at:.0f}s)" if held else ""
        self.log.log(level, message + suffix, *args, exc_info=exc_info, stacklevel=3)


@dataclass
class _Bucket:
    tokens: float
    stamp: float  # monotonic time tokens was computed at
    dropped: int = 0  # messages dropped since the last log line about this peer
    logged_at: float = float("-inf")


class PeerLimiter:
    """A token bucket per peer: ``rate`` messages a second, bursts of up to ``rate`` (one second's worth).
    Used by the broker thread only."""

    def __init__(self, rate: float, log: logging.Logger, interval: float = LOG_INTERVAL):
        self.rate = rate
        self.burst = max(1.0, rate)
        self.log = log
        self.interval = interval
        self._buckets: dict[object, _Bucket] = {}

    def allow(self, peer: object, label: str, now: float) -> bool:
        """Take a token for one message from ``peer``; False (and a log line once per interval) if it has none."""
        bucket = self._buckets.get(peer)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED:
                self.forget_idle(now)
                if len(self._buckets) >= MAX_TRACKED:  # thousands of busy peers: start afresh
                    self._buckets.clear()
            bucket = self._buckets[peer] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        bucket.dropped += 1
        if now - bucket.logged_at >= self.interval:
            self.log.warning("worker %s sends more than %g messages a second: dropped %d message(s)", label,
                             self.rate, bucket.dropped)
            bucket.logged_at, bucket.dropped = now, 0
        return False

    def forget_idle(self, now: float) -> None:
        """Forget the peers whose bucket has filled up again: they are as good as new (bounds the table)."""
        self._buckets = {peer: b for peer, b in self._buckets.items()
                         if b.tokens + (now - b.stamp) * self.rate < self.burst
                         or now - b.logged_at < self.interval}


class KeyGate:
    """The ZAP credentials provider of the remote worker socket (``configure_curve_callback``):
    ``bindings`` maps each authorized public key (Z85 text) to the model names it may serve."""

    def __init__(self, bindings: dict[str, frozenset[str]], log: logging.Logger):
        self.bindings = dict(bindings)  # read by the ZAP thread and the broker thread; never changed
        self.refusals = ThrottledLog(log)

    def callback(self, domain: str, key: bytes) -> bool:
        text = key.decode("ascii", "replace")
        if text in self.bindings:
            return True
        self.refusals.warning(("key", text), "refused a remote worker: its CURVE public key %s is not among "
                              "the authorized keys", text)
        return False

    def models(self, key: str | None) -> frozenset[str]:
        """The model names the worker with this key (the message's User-Id) may register."""
        return self.bindings.get(key or "", frozenset())
