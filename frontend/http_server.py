"""The HTTP server: the WSGI app under waitress, with every resource bounded, and a draining stop.

waitress reads each request (headers and body) in one event-loop thread and hands only complete
requests to a fixed pool of request threads, so idle and slow clients cost a socket, never a
thread. On top of waitress this module adds what a server exposed to a network needs:

- a connection bound that answers ``503 server_busy`` (JSON, ``Retry-After``) past it, instead of
  leaving new clients in the kernel's accept queue;
- ``503 server_busy`` when no request thread frees up within a second, instead of an unbounded wait;
- a read deadline for the whole request (headers and body), so a client that drips bytes is cut,
  and an idle timeout between requests;
- waitress's own errors (malformed request, headers or body too large) as the JSON error body;
- a drain: stop accepting, let running requests finish until a deadline, cancel the rest.

Disconnect detection: waitress keeps reading a connection while its request runs
(``channel_request_lookahead``), notices a close at once and says so through
``environ["waitress.client_disconnected"]``; frontend/jobs.py builds each request's check from that.
"""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Callable

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import TcpWSGIServer
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import Error as WaitressError

from frontend.errors import APIError, error_response
from frontend.jobs import STOPPING_KEY
from frontend.request_ids import HEADER as REQUEST_ID_HEADER, new_request_id

log = logging.getLogger("edgellm.http")
access_log = logging.getLogger("edgellm.access")

FD_RESERVE = 256  # file descriptors kept for everything but HTTP connections (workers, store, ZeroMQ)
REFUSAL_LINGER = 2.0  # seconds a refused connection may take to read its 503 before it is closed
MAX_REFUSALS = 256  # refused connections lingering at once; past that they are closed at once
CANCEL_GRACE = 5.0  # seconds cancelled requests get to send their error before connections are cut
THREAD_WAIT = 1.0  # seconds a complete request may wait for a free request thread before its 503
INITIAL_THREADS = 8  # request threads started with the server; more start as requests need them


@dataclass(frozen=True)
class HTTPLimits:
    """The HTTP server's bounds and timeouts (ServerConfig's fields of the same names)."""

    http_threads: int
    max_connections: int
    idle_timeout: float
    read_timeout: float
    max_header_bytes: int
    max_body_bytes: int
    drain_timeout: float


class _Refused(WaitressError):
    """A request answered with an API error instead of being run (``api_code`` names it)."""

    code = 503
    reason = "Service Unavailable"

    def __init__(self, api_code: str, message: str):
        super().__init__(message)
        self.api_code = api_code


# waitress's own errors, by HTTP status, as codes of frontend/errors.py's table
_WAITRESS_CODES = {413: "request_too_large", 431: "header_too_large", 500: "internal_error"}


def api_error_for(error: WaitressError) -> APIError:
    if isinstance(error, _Refused):
        return APIError(error.api_code, error.body)
    code = _WAITRESS_CODES.get(error.code, "http_error")
    return APIError(code, f"{error.reason.lower()}: {error.body}")


def raw_response(exc: APIError) -> bytes:
    """A whole HTTP/1.1 response for ``exc`` that closes the connection (for sockets no channel serves)."""
    response = error_response(exc)
    body = response.get_data()
    rid = new_request_id()
    access_log.info("%s - - %d (refused: %s)", rid, response.status_code, exc.code)
    headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
    headers += [(REQUEST_ID_HEADER, rid), ("Content-Length", str(len(body))), ("Connection", "close")]
    head = f"HTTP/1.1 {response.status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


class _RequestParser(HTTPRequestParser):
    """waitress's parser, remembering when the request's first byte arrived (for the read deadline)."""

    def __init__(self, adj):
        super().__init__(adj)
        self.started = time.monotonic()


class _ErrorTask(ErrorTask):
    """waitress's error responses, as the API's JSON error body (frontend/errors.py)."""

    def execute(self):
        error = api_error_for(self.request.error)
        response = error_response(error)
        body = response.get_data()
        rid = new_request_id()  # the request could not be read: its own X-Request-Id is not trusted
        access_log.info("%s %s - %d (%s)", rid, self.request.command or "-", response.status_code, error.code)
        self.status = response.status
        self.response_headers.extend((k, v) for k, v in response.headers.items() if k.lower() != "content-length")
        self.response_headers.append((REQUEST_ID_HEADER, rid))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class _Channel(HTTPChannel):
    parser_class = _RequestParser
    error_task_class = _ErrorTask
    spoke = False  # whether the client has sent anything yet
    writing = False  # a request thread is in write_soon, sending what it writes itself

    def received(self, data):
        self.spoke = self.spoke or bool(data)
        return super().received(data)

    def write_soon(self, data):
        """A request thread's write. waitress sends it from this thread (send_bytes is 1), under the
        output buffer's lock; meanwhile its event loop, seeing bytes in the buffer, would poll the
        socket for writing, wake at once, fail to take the lock and poll again: a busy loop that holds
        the GIL the writing thread needs, for up to a switch interval on every write. So the loop
        leaves the channel alone while a write runs, and takes over whatever the write could not
        send (a client slower than the output)."""
        self.writing = True
        try:
            return super().write_soon(data)
        finally:
            self.writing = False
            if self.total_outbufs_len:
                self.server.pull_trigger()

    def writable(self):
        if self.writing:
            return self.will_close or self.close_when_flushed
        return super().writable()

    def _flush_outbufs_below_high_watermark(self):
        """waitress's wait, inside a write, for the event loop to send what is over the output
        buffer's high watermark (a client that reads slower than the app writes): the loop must not
        be kept out meanwhile, or it would never send, nor see the client go."""
        writing, self.writing = self.writing, False
        try:
            return super()._flush_outbufs_below_high_watermark()
        finally:
            self.writing = writing


class _Refusal(wasyncore.dispatcher):
    """A connection past the bound: it gets its 503, its request is read and dropped, then it is closed.

    Closing at once with the request unread would make the kernel answer with a reset, which can
    destroy the 503 before the client reads it."""

    def __init__(self, sock: socket.socket, response: bytes, map: dict):
        super().__init__(sock, map=map)
        self.closes_at = time.monotonic() + REFUSAL_LINGER
        try:
            sock.send(response)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close()

    def writable(self):
        return False

    def handle_read(self):
        self.recv(65536)  # closes on end of stream or error

    def handle_close(self):
        self.close()


class _Dispatcher(ThreadedTaskDispatcher):
    """waitress's thread pool with a bounded wait: a request that finds no free thread waits at most
    THREAD_WAIT seconds (and behind at most as many others as there are threads), else it gets a 503.

    The wait absorbs the moment between a thread sending its last byte and taking the next request,
    which a refusal "at once" would turn into spurious 503s."""

    def __init__(self, threads: int, refuse: Callable[[HTTPChannel, str, str], None]):
        super().__init__()
        self.refuse = refuse
        self.draining = False
        self.max_threads = threads
        self.starting = 0  # threads started by add_task that have not run yet
        # Threads start as requests need them (an idle one costs memory), up to max_threads.
        self.set_thread_count(min(threads, INITIAL_THREADS))

    def add_task(self, channel):
        with self.lock:
            accepted = not self.draining and len(self.queue) < self.max_threads
            if accepted:
                channel.queued_at = time.monotonic()
                self.queue.append(channel)
                self.queue_cv.notify()
                # Each waiting request needs a thread that is idle or starting (waitress counts a
                # starting thread as active until it first waits).
                while (len(self.threads) - self.active_count + self.starting < len(self.queue)
                       and len(self.threads) < self.max_threads):
                    self._start_thread()
        if not accepted:
            self._refuse(channel)

    def _start_thread(self) -> None:
        """One more request thread (the caller holds the lock), as waitress's set_thread_count starts them."""
        number = next(n for n in range(len(self.threads) + 1) if n not in self.threads)
        self.threads.add(number)
        self.active_count += 1
        self.starting += 1
        self.start_new_thread(self._started, number)

    def _started(self, number: int) -> None:
        with self.lock:
            self.starting -= 1
        self.handler_thread(number)

    def expire(self) -> None:
        """Refuse the requests that waited too long for a thread (from the event loop)."""
        now = time.monotonic()
        with self.lock:
            expired = [c for c in self.queue if now - c.queued_at > THREAD_WAIT]
            for channel in expired:
                self.queue.remove(channel)
        for channel in expired:
            self._refuse(channel)

    def _refuse(self, channel) -> None:
        if self.draining:
            self.refuse(channel, "shutting_down", "the server is shutting down; retry shortly")
        else:
            self.refuse(channel, "server_busy", f"all {self.max_threads} request threads are busy; retry shortly")

    def busy(self) -> int:
        """Requests running or waiting for a thread."""
        with self.lock:
            return self.active_count + len(self.queue)


class HTTPServer(TcpWSGIServer):
    """One listening socket served by waitress, with edgellm's bounds (HTTPLimits) and drain."""

    channel_class = _Channel

    def __init__(self, app, host: str, port: int, limits: HTTPLimits):
        self.limits = limits
        self.max_connections = _raise_fd_limit(limits.max_connections)
        self.stopping = threading.Event()  # set when running requests must be cancelled
        self.draining = False
        self.refusals: list[_Refusal] = []
        self._drain_requested = threading.Event()
        self._hurry = threading.Event()
        adj = Adjustments(
            host=host, port=port, ident="edgellm", threads=limits.http_threads,
            cleanup_interval=1,  # how often maintenance() runs: connection bound and timeouts are ours
            max_request_header_size=limits.max_header_bytes,
            # An outer bound only: waitress counts a chunked body's framing too. The app reads every body
            # against max_body_bytes exactly (frontend/request_body.py, Werkzeug's form parser).
            max_request_body_size=limits.max_body_bytes + max(64 * 1024, limits.max_body_bytes // 8),
            inbuf_overflow=64 * 1024,
            asyncore_use_poll=True,  # select() fails on file descriptors above 1023
            channel_request_lookahead=1,  # keep reading while a request runs: a close is seen at once
            expose_tracebacks=False, backlog=1024)
        self._refused: SimpleQueue[HTTPChannel | None] = SimpleQueue()
        threading.Thread(target=self._refuse_loop, name="http-refuser", daemon=True).start()
        dispatcher = _Dispatcher(limits.http_threads, self._refuse)
        super().__init__(self._with_stop_flag(app), map={}, dispatcher=dispatcher, adj=adj)

    def _with_stop_flag(self, app):
        stopping = self.stopping

        def application(environ, start_response):
            environ[STOPPING_KEY] = stopping
            return app(environ, start_response)

        return application

    # -- accepting and refusing --------------------------------------------------------------
    def readable(self):
        now = time.time()
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        return self.accepting  # past the bound too: those clients get a 503 (handle_accept)

    def handle_accept(self):
        if len(self.active_channels) < self.max_connections:
            return super().handle_accept()
        try:
            pair = self.accept()
        except OSError:
            return
        if pair is None:
            return
        sock = pair[0]
        if len(self.refusals) >= MAX_REFUSALS:
            sock.close()
            return
        try:
            busy = APIError("server_busy", f"too many open connections (limit {self.max_connections}); "
                            "retry shortly")
            self.refusals.append(_Refusal(sock, raw_response(busy), self._map))
        except OSError:  # the client is gone already
            sock.close()

    def handle_error(self):
        """An exception while accepting: log it and keep listening (wasyncore would close the socket)."""
        log.exception("error while accepting a connection")

    def _refuse(self, channel: HTTPChannel, code: str, message: str) -> None:
        """Answer a channel's next request with a 503, from the refuser thread: not a request thread
        (none is free), and not the event loop, which may hold the channel's lock here."""
        channel.requests[0].error = _Refused(code, message)
        self._refused.put(channel)

    def _refuse_loop(self) -> None:
        while (channel := self._refused.get()) is not None:
            try:
                channel.service()  # an error task: a few hundred bytes, written without blocking
            except Exception:
                log.exception("error while refusing a request")

    # -- timeouts ------------------------------------------------------------------------
    def maintenance(self, now):
        """Close connections whose request is not in read_timeout after it began (or after the
        connection opened, for a client that has sent nothing), and those idle between requests
        past idle_timeout."""
        self.task_dispatcher.expire()
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            if channel.requests or channel.will_close or channel.close_when_flushed:
                continue  # a request is running, or it is closing already
            if self.draining:
                channel.close_when_flushed = True
            elif channel.request is not None:
                if mono - channel.request.started > self.limits.read_timeout:
                    channel.will_close = True
            elif not channel.spoke:
                if now - channel.creation_time > self.limits.read_timeout:
                    channel.will_close = True
            elif now - channel.last_activity > self.limits.idle_timeout:
                channel.will_close = True
        for refusal in [r for r in self.refusals if not r.connected or mono > r.closes_at]:
            refusal.close()
            self.refusals.remove(refusal)

    # -- stopping ------------------------------------------------------------------------
    def serve(self) -> None:
        """Serve until a drain (request_drain) has run its course."""
        log.info("HTTP: %d request threads, at most %d connections", self.limits.http_threads,
                 self.max_connections)
        drainer = threading.Thread(target=self._drain, name="http-drain", daemon=True)
        drainer.start()
        self.run()

    def request_drain(self) -> None:
        """Stop accepting and drain (safe from a signal handler); a second call cancels at once."""
        if self._drain_requested.is_set():
            self._hurry.set()
        self._drain_requested.set()

    def _drain(self) -> None:
        self._drain_requested.wait()
        self.trigger.pull_trigger(self._stop_accepting)
        deadline = time.monotonic() + self.limits.drain_timeout
        log.info("draining: %d request(s) running, up to %gs to finish", self.task_dispatcher.busy(),
                 self.limits.drain_timeout)
        if not self._wait_idle(deadline):
            log.warning("drain deadline passed: cancelling %d request(s)", self.task_dispatcher.busy())
            self.stopping.set()
            if not self._wait_idle(time.monotonic() + CANCEL_GRACE):
                log.warning("%d request(s) still running; closing their connections",
                            self.task_dispatcher.busy())
        self.trigger.pull_trigger(self._close_all)

    def _wait_idle(self, deadline: float) -> bool:
        """Wait until no request runs (True) or the deadline passes (False), closing idle connections
        as they appear: with the listening socket gone, nothing else runs maintenance."""
        next_maintenance = 0.0
        while self.task_dispatcher.busy():
            if time.monotonic() >= deadline or self._hurry.wait(0.05):
                return False
            if time.monotonic() >= next_maintenance:
                next_maintenance = time.monotonic() + 0.5
                self.trigger.pull_trigger(lambda: self.maintenance(time.time()))
        return True

    def _stop_accepting(self) -> None:
        self.draining = True
        self.task_dispatcher.draining = True
        self.accepting = False
        self.del_channel()
        self.socket.close()
        self.maintenance(time.time())

    def _close_all(self) -> None:
        for channel in list(self.active_channels.values()):
            channel.connected = False
            channel.handle_close()
        self.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
        self._refused.put(None)
        wasyncore.close_all(self._map)  # the event loop ends with its map empty


def _raise_fd_limit(max_connections: int) -> int:
    """Raise this process's open-file limit to what max_connections needs (up to the hard limit);
    the connection bound that fits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    fits = max_connections if soft == resource.RLIM_INFINITY else min(max_connections, soft - FD_RESERVE)
    if fits < max_connections:
        log.warning("the open-file limit (%d) allows %d HTTP connections, not max_connections=%d: raise "
                    "LimitNOFILE / ulimit -n", soft, max(fits, 1), max_connections)
    return max(fits, 1)
