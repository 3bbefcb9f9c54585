"""A small pool of connections to one database file.

Why a pool rather than one connection per thread or one shared connection:
the web server may start a fresh thread per request, so thread-local
connections would be opened (and sqlite-vec loaded) per request and only
closed whenever the thread object is collected. One connection behind a lock
would serialise every vector search (tens of milliseconds each). A pool lends
each operation a connection of its own, reuses idle ones, and caps how many
are open; SQLite's WAL mode then lets readers run alongside one writer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from .db import Connection, connect
from .errors import StoreClosed


class ConnectionPool:
    def __init__(self, path: str, *, size: int, busy_timeout_ms: int):
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._binding: str | None = None
        self._closed = False

    @property
    def binding(self) -> str | None:
        """The binding in use ("sqlite3" or "apsw"), once a connection was opened."""
        return self._binding

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """Lend a connection to the caller's block; blocks while all are lent."""
        self._slots.acquire()
        try:
            conn = self._take()
            try:
                yield conn
            finally:
                self._give_back(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close idle connections now and lent ones when they come back."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _take(self) -> Connection:
        with self._lock:
            if self._closed:
                raise StoreClosed("the store is closed")
            if self._idle:
                return self._idle.pop()
            binding = self._binding
        conn = connect(self._path, busy_timeout_ms=self._busy_timeout_ms, binding=binding)
        with self._lock:
            self._binding = conn.binding
        return conn

    def _give_back(self, conn: Connection) -> None:
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        conn.close()
