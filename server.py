"""edgellm's front end: an OpenAI-compatible HTTP API (Werkzeug, WSGI) over ZeroMQ workers.

This process never loads a model. It validates requests, hands jobs to the broker
(frontend/broker.py), which routes them to worker processes (worker/) and streams their
output back. One route table, one dispatcher; handlers raise, and ``error_response`` turns
every exception into the JSON error body.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time

from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from frontend.broker import Broker, BrokerLimits, JobClient
from frontend.chat_api import ChatResponder, parse_chat
from frontend.config import ConfigError, ServerConfig, add_server_flags, load_config
from frontend.errors import APIError, bad_request, error_response
from frontend.supervisor import Supervisor
from frontend.validation import json_object
from worker import protocol as ewp

log = logging.getLogger("edgellm.server")

__version__ = "0.1.0"


def sse(data) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode("utf-8")


class EdgeLLM:
    """The WSGI application."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.created = int(time.time())
        self.broker = Broker(config.worker_addr, limits=BrokerLimits(config.queue_size, config.queue_timeout),
                             **_curve_server_keys(config.curve_secret_key_file))
        self.supervisor = Supervisor(config.models, self.broker.worker_addr,
                                     verbose=config.log_level == "debug")
        self.url_map = Map([
            Rule("/v1/chat/completions", endpoint="chat_completions", methods=["POST"]),
            Rule("/v1/models", endpoint="models", methods=["GET", "POST"]),
            Rule("/health", endpoint="health", methods=["GET"]),
        ])

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "EdgeLLM":
        self.broker.start()
        self.supervisor.start()
        return self

    def stop(self) -> None:
        self.supervisor.stop()
        self.broker.stop()

    # -- WSGI ----------------------------------------------------------------------------
    def dispatch_request(self, request: Request) -> Response:
        adapter = self.url_map.bind_to_environ(request.environ)
        try:
            endpoint, values = adapter.match()
            return getattr(self, f"on_{endpoint}")(request, **values)
        except (HTTPException, APIError) as exc:
            return error_response(exc)
        except Exception as exc:
            return error_response(exc)

    def wsgi_app(self, environ, start_response):
        request = Request(environ)
        request.max_content_length = self.config.max_body_bytes
        response = self.dispatch_request(request)
        return response(environ, start_response)

    def __call__(self, environ, start_response):
        return self.wsgi_app(environ, start_response)

    # -- helpers -------------------------------------------------------------------------
    def json_body(self, request: Request) -> dict:
        data = request.get_data(cache=False)  # raises 413 over max_content_length
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        return json_object(body)

    def model_names(self) -> dict[str, str]:
        """Every model this server can answer for, configured or registered by hand: name -> kind."""
        names = {m.name: m.kind for m in self.config.models}
        for name, info in self.broker.snapshot().items():
            if info.get("kind"):
                names.setdefault(name, info["kind"])
        return names

    def resolve_model(self, name: str | None, kind: str) -> str:
        models = self.model_names()
        if name is None:
            default = next((n for n, k in models.items() if k == kind), None)
            if default is None:
                raise bad_request(f"no {kind} model is configured on this server", "model")
            return default
        if name not in models:
            listed = ", ".join(sorted(models)) or "none"
            raise APIError(500, f"model '{name}' is not served here; available models: {listed}",
                           "model_not_found", "model")
        if models[name] != kind:
            raise bad_request(f"model '{name}' is a {models[name]} model; this endpoint needs a {kind} model",
                              "model", code="wrong_model_kind")
        return name

    def next_message(self, client: JobClient, first: bool = False) -> ewp.Message:
        """The job's next CHUNK or DONE; an ERROR or silence becomes an APIError."""
        timeout = self.config.request_timeout + (self.config.queue_timeout if first else 0)
        msg = client.receive(timeout)
        if msg is None:
            raise APIError(503, f"the worker did not answer within {timeout:g}s; the request was cancelled",
                           "worker_timeout")
        if msg.command == ewp.ERROR:
            raise APIError.from_worker(msg.body, msg.body.get("headers"))
        return msg

    # -- endpoints -----------------------------------------------------------------------
    def on_chat_completions(self, request: Request) -> Response:
        call = parse_chat(self.json_body(request))
        model = self.resolve_model(call.model, "chat")
        client = JobClient()
        try:
            client.submit(model, call.job)
            first = self.next_message(client, first=True)
        except BaseException:
            client.close()
            raise
        responder = ChatResponder(model)
        if call.stream:
            return Response(self._stream_chat(client, first, responder, call.include_usage),
                            mimetype="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts, msg = [], first
        try:
            while msg.command == ewp.CHUNK:
                parts.append(msg.body["text"])
                msg = self.next_message(client)
        finally:
            client.close()
        body = responder.completion("".join(parts), msg.body["finish_reason"], msg.body["usage"])
        return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")

    def _stream_chat(self, client: JobClient, msg: ewp.Message, responder: ChatResponder, include_usage: bool):
        """Server-sent events; runs after the 200 is committed, so errors become an error event."""
        try:
            if msg.command != ewp.CHUNK:  # finished before any text: still announce the role
                yield sse(responder.chunk({"role": "assistant", "content": ""}, usage_field=include_usage))
            while msg.command == ewp.CHUNK:
                yield sse(responder.chunk({"role": "assistant", "content": msg.body["text"]},
                                          usage_field=include_usage))
                msg = self.next_message(client)
            yield sse(responder.chunk({}, msg.body["finish_reason"], usage_field=include_usage))
            if include_usage:
                yield sse(responder.usage_chunk(msg.body["usage"]))
        except APIError as exc:
            yield sse(exc.body())
        finally:
            client.close()  # also runs when the client disconnects: the job is cancelled
        yield sse("[DONE]")

    def on_models(self, request: Request) -> Response:
        data = [{"id": name, "created": self.created, "object": "model", "owned_by": "edgellm"}
                for name in self.model_names()]
        return Response(json.dumps({"object": "list", "data": data}), mimetype="application/json")

    def on_health(self, request: Request) -> Response:
        snapshot = self.broker.snapshot()
        waiting = [m.name for m in self.config.models if m.workers > 0 and not snapshot.get(m.name, {}).get("workers")]
        body = {"status": "loading" if waiting else "ok", "waiting_for": waiting, "models": snapshot}
        return Response(json.dumps(body), status=503 if waiting else 200, mimetype="application/json")


def _curve_server_keys(path: str | None) -> dict:
    if not path:
        return {}
    public, secret = open(path, "rb").read().split()[:2]
    return {"curve_public": public, "curve_secret": secret}


def create_app(config: ServerConfig) -> EdgeLLM:
    return EdgeLLM(config)


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgellm", description="OpenAI-compatible LLM API server. "
                                     "Subcommands: 'edgellm worker --help'.")
    add_server_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(config).start()
    httpd = make_server(config.host, config.port, app, threaded=True)
    stop = threading.Event()

    def shutdown(*_):
        if not stop.is_set():
            stop.set()
            threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, shutdown)
    signal.signal(signal.SIGINT, shutdown)
    log.info("edgellm %s listening on http://%s:%d/v1 (workers connect to %s)", __version__, config.host,
             config.port, app.broker.worker_addr)
    try:
        httpd.serve_forever()
    finally:
        app.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        from worker.__main__ import main as worker_main
        return worker_main(argv[1:])
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
