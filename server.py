"""edgellm's front end: an OpenAI-compatible HTTP API (a Werkzeug WSGI app, served by waitress through
frontend/http_server.py) over ZeroMQ workers.

This process never loads a model. It validates requests, hands jobs to the broker
(frontend/broker.py), which routes them to worker processes (worker/) and streams their
output back, and keeps documents and vectors in the store (store/). One route table, one
dispatcher; handlers raise, and ``error_response`` turns every exception into the JSON
error body.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import zmq
import zmq.auth
from werkzeug.exceptions import NotFound
from werkzeug.routing import Map, Rule
from werkzeug.wrappers import Request, Response

from frontend import validation as v
from frontend.access import AccessPolicy, exposure_warnings
from frontend.broker import Broker, BrokerLimits, RemoteListener, Watchdog
from frontend.chat_api import ChatAnswer, ChatResponder, check_chat_context, parse_chat
from frontend.completions_api import CompletionAnswer, check_completion_context, parse_completion
from frontend.completions_api import with_defaults as completion_defaults
from frontend.config import ConfigError, ServerConfig, add_server_flags, load_config
from frontend.embeddings_api import check_input_context, embeddings_json, parse_embeddings
from frontend.errors import APIError, as_api_error, bad_request, error_response
from frontend.files_api import file_list, file_object
from frontend.filenames import clean_filename, content_disposition
from frontend.http_server import HTTPLimits, HTTPServer
from frontend.jobs import JobClient, JobGroup, JobRunner, disconnect_check, in_order
from frontend.rag import Knowledge, check_text_file, last_user_text, merge_context, parse_chunk_capacity
from frontend.request_body import read_json
from frontend.request_ids import HEADER as REQUEST_ID_HEADER, loggable_path, request_id
from frontend.responses_api import HISTORY_JSON_FACTOR, ResponsesRequest, parse_responses
from frontend.responses_output import ResponseBuilder
from frontend.supervisor import Supervisor
from frontend.web_ui import ICON, PAGE, PUBLIC_PATHS as WEB_UI_PATHS, asset_response
from store import Store, StoredResponse, StoreError
from worker import protocol as ewp
from worker.keys import KeyFileError, authorized_keys
from worker.settings import ModelSettings

log = logging.getLogger("edgellm.server")
access_log = logging.getLogger("edgellm.access")  # one line per request, naming its x-request-id

__version__ = "0.1.0"

BROKER_DOWN_GRACE = 2.0  # seconds between the broker's death and the exit: waiting requests get their 503


def sse(data, event: str | None = None) -> bytes:
    """One server-sent event: its data, and its ``event:`` line when it has a type (Responses' events)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {text}\n\n".encode("utf-8")


def sse_response(events) -> Response:
    """A 200 streaming ``events`` (sse() bytes) as they come: not cached, not buffered by a proxy."""
    return Response(events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache",
                                                                   "X-Accel-Buffering": "no"})


def json_response(body: dict, status: int = 200) -> Response:
    return json_text_response(json.dumps(body, ensure_ascii=False), status)


def json_text_response(text: str, status: int = 200) -> Response:
    """A JSON answer already written (embeddings: see frontend/embeddings_api.py)."""
    return Response(text, status=status, mimetype="application/json")


class EdgeLLM:
    """The WSGI application."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.limits = v.RequestLimits.from_config(config)
        self.created = int(time.time())
        Path(config.store_path).parent.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.store_path)
        context = zmq.Context.instance()  # the process's one ZeroMQ context: inproc needs both ends in it
        self.broker = Broker(config.worker_addr, context=context, remote=remote_listener(config),
                             limits=BrokerLimits.from_config(config))
        self.supervisor = Supervisor(config.models, self.broker.worker_addr,
                                     verbose=config.log_level == "debug", on_exit=self.broker.worker_exited)
        self.jobs = JobRunner(self.broker.clients_addr, config.queue_timeout, config.request_timeout,
                              context=context, broker_problem=self.broker.problem)
        self.watchdog: Watchdog | None = None
        self.knowledge = Knowledge(self.store, self.jobs, chunk_capacity=config.chunk_capacity,
                                   max_chunks=config.max_document_chunks)
        self.access = AccessPolicy(api_keys=config.api_keys, cors_origins=config.cors_origins,
                                   allowed_hosts=config.allowed_hosts, bind_host=config.host,
                                   public_paths=WEB_UI_PATHS if config.web_ui else ())
        self.url_map = Map([
            Rule("/v1/chat/completions", endpoint="chat_completions", methods=["POST"]),
            Rule("/v1/completions", endpoint="completions", methods=["POST"]),
            Rule("/v1/responses", endpoint="create_response", methods=["POST"]),
            Rule("/v1/responses/<response_id>", endpoint="get_response", methods=["GET"]),
            Rule("/v1/responses/<response_id>", endpoint="delete_response", methods=["DELETE"]),
            Rule("/v1/embeddings", endpoint="embeddings", methods=["POST"]),
            Rule("/v1/retrieve", endpoint="retrieve", methods=["POST"]),
            Rule("/v1/models", endpoint="models", methods=["GET", "POST"]),
            Rule("/v1/models/<path:model_id>", endpoint="model", methods=["GET"]),
            Rule("/v1/files", endpoint="upload_file", methods=["POST"]),
            Rule("/v1/files", endpoint="list_files", methods=["GET"]),
            Rule("/v1/files/<file_id>", endpoint="get_file", methods=["GET"]),
            Rule("/v1/files/<file_id>", endpoint="delete_file", methods=["DELETE"]),
            Rule("/v1/files/<file_id>/content", endpoint="file_content", methods=["GET"]),
            Rule("/v1/chunks", endpoint="chunks", methods=["POST"]),
            Rule("/v1/create/rag", endpoint="create_rag", methods=["POST"]),
            Rule("/v1/collections", endpoint="collections", methods=["GET"]),
            Rule("/health", endpoint="health", methods=["GET"]),
            Rule("/", endpoint="web_page", methods=["GET"]),
            Rule("/ui/<name>", endpoint="web_asset", methods=["GET"]),
            Rule("/favicon.ico", endpoint="favicon", methods=["GET"]),
        ])

    # -- lifecycle -----------------------------------------------------------------------
    def start(self, on_broker_down=None) -> "EdgeLLM":
        """Start the broker and the workers; ``on_broker_down(problem)`` is called if the broker dies."""
        self.broker.start()
        if on_broker_down is not None:
            self.watchdog = Watchdog(self.broker, on_broker_down).start()
        self.supervisor.start()
        return self

    def stop(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        self.supervisor.stop()
        self.broker.stop()
        self.store.close()

    # -- WSGI ----------------------------------------------------------------------------
    def dispatch_request(self, request: Request) -> Response:
        try:
            adapter = self.url_map.bind_to_environ(request.environ)  # raises BadHost (400) for a bad Host
            # Access control for every route, before any of them runs (frontend/access.py).
            response = self.access.admit(request, adapter.allowed_methods)
            if response is None:
                endpoint, values = adapter.match()
                response = getattr(self, f"on_{endpoint}")(request, **values)
        except Exception as exc:  # HTTPException, APIError, StoreError and bugs alike
            response = error_response(exc)
        return self.access.add_cors_headers(request, response)

    def wsgi_app(self, environ, start_response):
        started = time.monotonic()
        request = Request(environ)
        request.max_content_length = self.config.max_body_bytes
        request.max_form_memory_size = self.config.max_body_bytes
        rid = request_id(environ)
        response = self.dispatch_request(request)
        response.headers[REQUEST_ID_HEADER] = rid
        # A stream is logged when its status is committed, before its body is sent.
        access_log.info("%s %s %s %d %.0fms", rid, request.method, loggable_path(request.path),
                        response.status_code, (time.monotonic() - started) * 1000)
        return response(environ, start_response)

    def __call__(self, environ, start_response):
        return self.wsgi_app(environ, start_response)

    # -- helpers -------------------------------------------------------------------------
    def json_body(self, request: Request) -> dict:
        return v.json_object(read_json(request, self.config.max_body_bytes, self.config.max_json_depth))

    def context_size(self, model: str) -> int:
        """The tokens one request to ``model`` may use: the n_ctx its workers registered with (the
        limit they enforce; the smallest, as any of them may get the job), else, before one has
        registered, the configured ctx_size, else the default ctx_size."""
        workers = self.broker.snapshot().get(model, {}).get("workers") or []
        sizes = [w["n_ctx"] for w in workers if isinstance(w.get("n_ctx"), int) and w["n_ctx"] > 0]
        if sizes:
            return min(sizes)
        model_config = self.config.model(model)
        return model_config.ctx_size if model_config else ModelSettings.ctx_size

    def uploaded_file(self, request: Request) -> tuple[str, bytes, str]:
        upload = request.files.get("file")
        if upload is None or not upload.filename:
            raise bad_request("send the document as multipart/form-data field 'file' "
                              "(curl -F file=@notes.md ...)", "file")
        filename = clean_filename(upload.filename)
        data = upload.read(self.config.max_file_bytes + 1)
        return filename, data, check_text_file(filename, data, self.config.max_file_bytes)

    def model_names(self) -> dict[str, str]:
        """Every model this server can answer for, configured or registered by hand: name -> kind."""
        names = {m.name: m.kind for m in self.config.models}
        for name, info in self.broker.snapshot().items():
            if info.get("kind"):
                names.setdefault(name, info["kind"])
        return names

    def resolve_model(self, name: str | None, kind: str) -> str:
        """The model a request names (or an alias of it), checked to be of ``kind``; none named: the
        first model of that kind."""
        models = self.model_names()
        name = self.config.model_name(name)
        if name is None:
            default = next((n for n, k in models.items() if k == kind), None)
            if default is None:
                raise bad_request(f"no {kind} model is configured on this server", "model")
            return default
        if name not in models:
            listed = ", ".join(sorted(models)) or "none"
            raise APIError("model_not_found", f"model '{name}' is not served here; available models: {listed}",
                           "model")
        if models[name] != kind:
            raise bad_request(f"model '{name}' is {_a(models[name])} model; this endpoint needs {_a(kind)} model",
                              "model", code="wrong_model_kind")
        return name

    def collection_name(self, body: dict) -> str:
        return v.string(body, "collection", self.config.default_collection)

    def ingest_model(self, body_model: str | None, collection: str) -> str:
        """The embedding model for ingesting into a collection: the one it was built with, by default."""
        existing = self.store.get_collection(collection)
        return self.resolve_model(body_model or (existing.model if existing else None), ewp.JOB_EMBEDDING)

    # -- chat ----------------------------------------------------------------------------
    def on_chat_completions(self, request: Request) -> Response:
        body = self.json_body(request)
        call = parse_chat(body, self.limits)
        model = self.resolve_model(call.model, ewp.JOB_CHAT)
        self.prepare_chat(call, model)
        gone = disconnect_check(request.environ)
        answer = ChatAnswer.for_call(ChatResponder(model), call)
        if call.stream:
            client, first = self.jobs.start(model, call.job, gone)
            try:  # a first chunk the worker got wrong is still an error status, not a 200
                opening = answer.add(first.body) if first.command == ewp.CHUNK else []
            except BaseException:
                client.close()
                raise
            return sse_response(self._stream_chat(client, first, answer, opening, call.include_usage, gone))
        chunks, done = self.jobs.collect(model, call.job, gone)
        for chunk in chunks:
            answer.add(chunk)
        return json_response(answer.completion(done))

    def prepare_chat(self, call, model: str) -> None:
        """What every chat job (chat completions and responses) goes through once its model is known:
        the context and slot checks, the model's sampling defaults, and the model's RAG context merged
        into its messages."""
        check_chat_context(call, self.context_size(model), self.config.chars_per_token)
        self.check_choices(call.n, model)
        call.job = self.with_model_defaults(model, call.job)
        model_config = self.config.model(model)
        if model_config and model_config.rag_collection and call.rag:
            if self.store.get_collection(model_config.rag_collection) is None:
                raise APIError("collection_not_found", f"model '{model}' answers from collection "
                               f"'{model_config.rag_collection}' (the server's rag_collection), which holds no "
                               "documents yet: ingest some with POST /v1/create/rag, or send \"rag\": false",
                               "rag")
            hits = self.knowledge.retrieve(last_user_text(call.job["messages"]), model_config.rag_collection,
                                           model=None, limit=self.config.retrieve_limit,
                                           score_threshold=self.config.score_threshold)
            call.job["messages"] = merge_context(call.job["messages"], hits, model_config)

    def with_model_defaults(self, model: str, job: dict) -> dict:
        """A chat job with the model's configured sampling defaults where its request set none
        (ModelConfig.with_defaults; a model registered by hand has none)."""
        model_config = self.config.model(model)
        return model_config.with_defaults(job) if model_config else job

    def check_choices(self, n: int, model: str) -> None:
        """A request for n choices takes n slots of one worker: of those registered, or else of those
        the config will start. (A model registered by hand with no worker now: the broker refuses
        the job if the worker that registers cannot take it.)"""
        workers = self.broker.snapshot().get(model, {}).get("workers") or []
        model_config = self.config.model(model)
        slots = max((w["slots"] for w in workers), default=model_config.parallel if model_config else None)
        if slots is not None and n > slots:
            raise bad_request(f"'n' is {n}; each choice takes a slot, and a worker of model '{model}' has "
                              f"{slots} slots (its parallel setting): ask for fewer choices", "n")

    def _stream_chat(self, client: JobClient, msg: ewp.Message, answer: ChatAnswer, opening: list[dict],
                     include_usage: bool, gone):
        """Server-sent events; runs after the 200 is committed, so errors become an error event."""
        try:
            for chunk in opening:
                yield sse(chunk)
            while msg.command == ewp.CHUNK:
                msg = self.jobs.next_message(client, gone=gone)
                if msg.command == ewp.CHUNK:
                    for chunk in answer.add(msg.body):
                        yield sse(chunk)
            for chunk in answer.finish(msg.body):
                yield sse(chunk)
            if include_usage:
                yield sse(answer.responder.usage_chunk(msg.body["usage"]))
        except Exception as exc:  # after the 200: the error goes in the stream
            yield sse(as_api_error(exc).body())
        finally:
            client.close()  # also runs when the client disconnects: the job is cancelled
        yield sse("[DONE]")

    # -- completions (a chat job on a raw prompt) ---------------------------------------
    def on_completions(self, request: Request) -> Response:
        call = parse_completion(self.json_body(request))
        model = self.resolve_model(call.model, ewp.JOB_CHAT)
        check_completion_context(call, self.context_size(model), self.config.chars_per_token)
        self.check_choices(call.n, model)
        call.jobs = [completion_defaults(job, lambda j: self.with_model_defaults(model, j)) for job in call.jobs]
        answer = CompletionAnswer(model, call)
        group = JobGroup(self.jobs, model, call.jobs, disconnect_check(request.environ))
        messages = group.messages()
        try:
            if call.stream:  # the first message decides the status: a 200 only once a job answered
                opening = self._completion_chunks(answer, *next(messages))
                return sse_response(self._stream_completion(group, messages, answer, opening, call.include_usage))
            for job, msg in messages:
                self._completion_chunks(answer, job, msg)
            group.close()
            return json_response(answer.completion())
        except BaseException:
            group.close()
            raise

    @staticmethod
    def _completion_chunks(answer: CompletionAnswer, job: int, msg: ewp.Message) -> list[dict]:
        return answer.add(job, msg.body) if msg.command == ewp.CHUNK else answer.finish(job, msg.body)

    def _stream_completion(self, group: JobGroup, messages, answer: CompletionAnswer, opening: list[dict],
                           include_usage: bool):
        """Server-sent events; runs after the 200 is committed, so errors become an error event."""
        try:
            for chunk in opening:
                yield sse(chunk)
            for job, msg in messages:
                for chunk in self._completion_chunks(answer, job, msg):
                    yield sse(chunk)
            if include_usage:
                yield sse(answer.usage_chunk())
        except Exception as exc:  # after the 200: the error goes in the stream
            yield sse(as_api_error(exc).body())
        finally:
            group.close()  # also runs when the client disconnects: the jobs still running are cancelled
        yield sse("[DONE]")

    # -- responses -----------------------------------------------------------------------
    def on_create_response(self, request: Request) -> Response:
        req = parse_responses(self.json_body(request), self.limits)
        model = self.resolve_model(req.model, ewp.JOB_CHAT)
        history = []
        if req.previous_response_id is not None:
            chain = self.store.response_chain(
                req.previous_response_id, max_responses=self.limits.max_messages,
                max_chars=self.context_size(model) * self.config.chars_per_token * HISTORY_JSON_FACTOR)
            history = [item for stored in chain for item in stored.input_items + stored.response["output"]]
        call = req.chat_call(history, self.limits)
        self.prepare_chat(call, model)
        gone = disconnect_check(request.environ)
        builder = ResponseBuilder(ChatAnswer.for_call(ChatResponder(model), call), model, req.echo)
        if req.stream:
            client, first = self.jobs.start(model, call.job, gone)
            try:  # as for chat: the 200 is committed only after the worker's first chunk
                opening = builder.opening() + (builder.add(first.body) if first.command == ewp.CHUNK else [])
            except BaseException:
                client.close()
                raise
            return sse_response(self._stream_response(client, first, builder, req, opening, gone))
        chunks, done = self.jobs.collect(model, call.job, gone)
        for chunk in chunks:
            builder.add(chunk)
        builder.finish(done)
        self.keep_response(req, builder)
        return json_response(builder.body())

    def keep_response(self, req: ResponsesRequest, builder: ResponseBuilder) -> None:
        """Store a finished response unless the request said store: false."""
        if req.store:
            self.store.save_response(StoredResponse(builder.id, req.previous_response_id, builder.model,
                                                    req.input_items, builder.body(), builder.created_at))

    def _stream_response(self, client: JobClient, msg: ewp.Message, builder: ResponseBuilder,
                         req: ResponsesRequest, opening: list[dict], gone):
        """Typed server-sent events; after the 200, a failure is an ``error`` and a ``response.failed``
        event. The response is stored before its last event, so a client that reads it at once finds it."""
        try:
            for event in opening:
                yield sse(event, event["type"])
            while msg.command == ewp.CHUNK:
                msg = self.jobs.next_message(client, gone=gone)
                if msg.command == ewp.CHUNK:
                    for event in builder.add(msg.body):
                        yield sse(event, event["type"])
            closing = builder.finish(msg.body)
            self.keep_response(req, builder)
            for event in closing:
                yield sse(event, event["type"])
        except Exception as exc:  # after the 200: the error goes in the stream
            for event in builder.fail(as_api_error(exc)):
                yield sse(event, event["type"])
        finally:
            client.close()  # also runs when the client disconnects: the job is cancelled

    def on_get_response(self, request: Request, response_id: str) -> Response:
        return json_response(self.store.get_response(response_id).response)

    def on_delete_response(self, request: Request, response_id: str) -> Response:
        self.store.delete_response(response_id)
        return json_response({"id": response_id, "object": "response", "deleted": True})

    # -- embeddings and retrieval --------------------------------------------------------
    def on_embeddings(self, request: Request) -> Response:
        name, inputs, encoding = parse_embeddings(self.json_body(request), self.limits)
        model = self.resolve_model(name, ewp.JOB_EMBEDDING)
        check_input_context(inputs, self.context_size(model), self.config.chars_per_token)
        chunks, done = self.jobs.collect(model, {"kind": ewp.JOB_EMBEDDING, "input": inputs},
                                         disconnect_check(request.environ))
        return json_text_response(embeddings_json(model, in_order(chunks, len(inputs)), done["usage"], encoding))

    def on_retrieve(self, request: Request) -> Response:
        body = self.json_body(request)
        call = parse_chat(body, self.limits, endpoint="retrieve")
        if call.model is not None and self.model_names().get(self.config.model_name(call.model)) == ewp.JOB_CHAT:
            call.model = None  # a chat model named here (as RAG clients do) leaves the collection's own
        elif call.model is not None:
            self.resolve_model(call.model, ewp.JOB_EMBEDDING)
        limit = v.integer(body, "limit", 1, 1000, default=self.config.retrieve_limit)
        threshold = v.number(body, "score_threshold", -1, 1, default=self.config.score_threshold)
        hits = self.knowledge.retrieve(last_user_text(call.job["messages"]), self.collection_name(body),
                                       model=call.model, limit=limit, score_threshold=threshold)
        return json_response({"points": [{"source": h.text, "score": h.score} for h in hits],
                              "limit": limit, "score_threshold": threshold})

    # -- files and ingestion -------------------------------------------------------------
    def on_upload_file(self, request: Request) -> Response:
        filename, data, _ = self.uploaded_file(request)
        purpose = request.form.get("purpose") or "assistants"
        return json_response(file_object(self.store.add_file(filename, data, purpose)))

    def on_list_files(self, request: Request) -> Response:
        return json_response(file_list(self.store.list_files(), request.args.to_dict()))

    def on_get_file(self, request: Request, file_id: str) -> Response:
        return json_response(file_object(self.store.get_file(file_id)))

    def on_file_content(self, request: Request, file_id: str) -> Response:
        record = self.store.get_file(file_id)
        return Response(self.store.get_file_content(file_id), content_type="text/plain; charset=utf-8",
                        headers={"Content-Disposition": content_disposition(record.filename),
                                 "X-Content-Type-Options": "nosniff"})

    def on_delete_file(self, request: Request, file_id: str) -> Response:
        self.store.delete_file(file_id)
        return json_response({"id": file_id, "object": "file", "deleted": True})

    def on_chunks(self, request: Request) -> Response:
        body = self.json_body(request)
        file_id = v.string(body, "id", required=True)
        capacity = parse_chunk_capacity(body.get("chunk_capacity")) or self.config.chunk_capacity
        record = self.store.get_file(file_id)
        text = check_text_file(record.filename, self.store.get_file_content(file_id), self.config.max_file_bytes)
        model = self.resolve_model(v.string(body, "model"), ewp.JOB_EMBEDDING)
        chunks = self.knowledge.chunk(model, text, capacity, disconnect_check(request.environ))
        return json_response({"id": record.id, "filename": v.string(body, "filename", record.filename),
                              "chunks": chunks})

    def on_create_rag(self, request: Request) -> Response:
        filename, data, text = self.uploaded_file(request)
        form = {k: val for k, val in request.form.items() if val != ""}
        collection = self.collection_name(form)
        capacity = parse_chunk_capacity(form.get("chunk_capacity"))
        model = self.ingest_model(form.get("model"), collection)
        result = self.knowledge.ingest(filename, data, text, collection=collection, model=model,
                                       capacity=capacity, gone=disconnect_check(request.environ))
        return json_response({"id": result.file_id, "object": "file", "filename": result.filename,
                              "collection": result.collection, "model": model, "status": result.status,
                              "chunks": result.chunks, "usage": {"prompt_tokens": result.prompt_tokens,
                                                                 "total_tokens": result.prompt_tokens}})

    def on_collections(self, request: Request) -> Response:
        """The document collections (what /v1/create/rag made), for the web page's picker."""
        return json_response({"object": "list", "data": [
            {"name": c.name, "object": "collection", "model": c.model, "dimension": c.dimension,
             "created_at": c.created_at} for c in self.store.list_collections()]})

    # -- listing and health --------------------------------------------------------------
    def model_list(self) -> list[dict]:
        """The model objects of /v1/models: every model, then every alias as an entry of its own
        (with ``alias_of`` naming its model), so that a client which checks a name against the
        list, or retrieves it, finds an alias too. ``kind`` (chat or embedding) is ours: the web
        page offers the chat models."""
        names = self.model_names()
        data = [{"id": name, "created": self.created, "object": "model", "owned_by": "edgellm", "kind": kind}
                for name, kind in names.items()]
        data += [{"id": alias, "created": self.created, "object": "model", "owned_by": "edgellm", "alias_of": name,
                  "kind": names.get(name)} for alias, name in self.config.aliases().items() if alias not in names]
        return data

    def on_models(self, request: Request) -> Response:
        return json_response({"object": "list", "data": self.model_list()})

    def on_model(self, request: Request, model_id: str) -> Response:
        data = self.model_list()
        found = next((m for m in data if m["id"] == model_id), None)
        if found is None:
            listed = ", ".join(sorted(m["id"] for m in data)) or "none"
            raise APIError("unknown_model", f"model '{model_id[:256]}' is not served here; available models: "
                           f"{listed}", "model")
        return json_response(found)

    def on_health(self, request: Request) -> Response:
        problem = self.broker.problem()
        if problem:
            body = {"status": "broker_down"}
            if self.access.authorized(request):  # the exception's text only for callers with a key
                body["problem"] = problem
            return json_response(body, status=503)
        snapshot = self.broker.snapshot()
        waiting = [m.name for m in self.config.models
                   if m.workers > 0 and not snapshot.get(m.name, {}).get("workers")]
        failed = self.supervisor.failed_models()
        status = "failed" if failed else "loading" if waiting else "ok"
        body = {"status": status, "waiting_for": waiting, "failed": failed}
        if self.access.authorized(request):  # pids, worker ids and slots only for callers with a key
            body["models"] = snapshot
        return json_response(body, status=200 if status == "ok" else 503)

    # -- the web chat page (frontend/web_ui.py) ------------------------------------------
    def on_web_page(self, request: Request) -> Response:
        return self.on_web_asset(request, PAGE)

    def on_favicon(self, request: Request) -> Response:
        return self.on_web_asset(request, ICON)

    def on_web_asset(self, request: Request, name: str) -> Response:
        if not self.config.web_ui:
            raise NotFound()
        return asset_response(request, name)


def _a(word: str) -> str:
    return f"an {word}" if word[:1] in "aeiou" else f"a {word}"


def remote_listener(config: ServerConfig) -> RemoteListener | None:
    if not config.remote_worker_addr:
        return None
    public = secret = None
    if config.curve_secret_key_file:
        public, secret = zmq.auth.load_certificate(config.curve_secret_key_file)
        if secret is None:
            raise ConfigError(f"{config.curve_secret_key_file} holds no secret key (use the .key_secret file)")
    bindings = None
    if config.curve_authorized_keys:
        try:
            bindings = authorized_keys(config.curve_authorized_keys)
        except KeyFileError as exc:
            raise ConfigError(str(exc)) from None
        if not bindings:
            log.warning("no worker key (*.key) in %s: no remote worker can connect", config.curve_authorized_keys)
    return RemoteListener(config.remote_worker_addr, public, secret, bindings)


def create_app(config: ServerConfig) -> EdgeLLM:
    return EdgeLLM(config)


def serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edgellm", description="OpenAI-compatible LLM API server. "
                                     "Subcommands: 'edgellm worker --help', 'edgellm ingest --help', "
                                     "'edgellm keys --help'.")
    add_server_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for warning in exposure_warnings(config.host, config.api_keys, config.cors_origins):
        log.warning(warning)
    broker_down: list[str] = []
    servers: list[HTTPServer] = []  # the one HTTP server, once it listens

    def drain() -> None:
        for httpd in servers:
            httpd.request_drain()

    def on_broker_down(problem: str) -> None:
        log.critical("exiting in %gs so that a supervisor restarts the server (the broker is down: %s)",
                     BROKER_DOWN_GRACE, problem)
        broker_down.append(problem)
        timer = threading.Timer(BROKER_DOWN_GRACE, drain)
        timer.daemon = True
        timer.start()

    try:
        app = create_app(config).start(on_broker_down)
    except StoreError as exc:
        log.error("cannot open the store %s: %s", config.store_path, exc)
        return 2
    except (ConfigError, OSError, zmq.ZMQError) as exc:
        log.error("cannot start: %s", exc)
        return 2
    try:
        httpd = HTTPServer(app, config.host, config.port, http_limits(config))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        app.stop()
        return 2
    servers.append(httpd)
    if broker_down:  # it died while the server was starting
        drain()
    signal.signal(signal.SIGTERM, lambda *_: drain())
    signal.signal(signal.SIGINT, lambda *_: drain())
    log.info("edgellm %s listening on http://%s:%d/v1%s (workers connect to %s%s)", __version__, config.host,
             config.port, f", chat page at http://{config.host}:{config.port}/" if config.web_ui else "",
             app.broker.worker_addr, f", remote workers to {app.broker.remote_addr}" if app.broker.remote_addr else "")
    try:
        httpd.serve()  # returns once a SIGTERM's drain is over
    finally:
        app.stop()  # after the last request: workers, broker, then the store
    return 1 if broker_down else 0


def http_limits(config: ServerConfig) -> HTTPLimits:
    return HTTPLimits(**{f.name: getattr(config, f.name) for f in dataclasses.fields(HTTPLimits)})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "worker":
        from worker.__main__ import main as worker_main
        return worker_main(argv[1:])
    if argv and argv[0] == "keys":
        from worker.keys import main as keys_main
        return keys_main(argv[1:])
    if argv and argv[0] == "ingest":
        from frontend.ingest_cli import main as ingest_main
        return ingest_main(argv[1:])
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
