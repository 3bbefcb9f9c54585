"""Hostile uploads against the real stack: the embedding model in its worker, a real store file,
over HTTP. Each attack seen before is replayed: base64 that made chunking quadratic, jobs that
ran on after their client hung up, a tiny chunk_capacity that fanned a file out into thousands
of chunks, and file names that injected header parameters or log lines."""

from __future__ import annotations

import argparse
import base64
import random
import re
import socket
import threading
import time
from urllib.parse import quote, unquote

import pytest

from conftest import EMBED_MODEL, EMBED_PATH, ServerProcess, model_config, wait_for
from frontend.config import MIN_CHUNK_CAPACITY, ConfigError, add_server_flags, load_config
from frontend.filenames import MAX_FILENAME_CHARS, clean_filename, content_disposition
from test_chunking import prose

BOUNDARY = "edgellm-test-boundary"
MAX_CHUNKS = 300  # the "limits" server's max_document_chunks


def b64_text(n: int, seed: int = 7) -> str:
    return base64.b64encode(random.Random(seed).randbytes(n)).decode()[:n]


@pytest.fixture(scope="module")
def limits(tmp_path_factory):
    """The embedding model with a small max_document_chunks."""
    config = f"max_file_bytes = 1000000\nmax_document_chunks = {MAX_CHUNKS}\n" \
        + model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", ctx_size=512, parallel=2, threads=2)
    srv = ServerProcess(config, tmp_path_factory.mktemp("limits"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def roomy(tmp_path_factory):
    """Limits high enough for jobs that run for minutes unless cancelled; two slots, so that an
    embedding request can run beside a chunk job."""
    config = "max_body_bytes = 40000000\nmax_file_bytes = 32000000\nmax_document_chunks = 1000000\n" \
        + model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", ctx_size=512, parallel=2, threads=2)
    srv = ServerProcess(config, tmp_path_factory.mktemp("roomy"))
    yield srv
    srv.stop()


def multipart(file_params: str, data: bytes, **fields: str) -> tuple[bytes, dict]:
    """A multipart body whose file part carries ``file_params`` exactly as written (httpx would
    escape a hostile file name; a hostile client does not)."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; {file_params}\r\n'
                 "Content-Type: text/plain\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def upload(srv, file_params: str, data: bytes, endpoint: str = "/v1/files", **fields: str):
    body, headers = multipart(file_params, data, **fields)
    return srv.http.post(endpoint, content=body, headers=headers)


def free_slots(srv) -> int:
    return srv.health()["models"][EMBED_MODEL]["free_slots"]


def post_and_keep_open(srv, path: str, body: bytes, content_type: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def disposition_params(header: str) -> dict[str, str]:
    """A Content-Disposition header's parameters after its type, by RFC 6266's grammar: quoted
    strings unescaped, the RFC 5987 ``filename*`` decoded."""
    kind, _, rest = header.partition(";")
    assert kind == "attachment"
    params = {}
    for key, quoted, token in re.findall(r'\s*([^=\s;]+)=(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))\s*(?:;|$)', rest):
        if key.endswith("*"):
            charset, _, encoded = token.partition("''")
            assert charset == "UTF-8"
            params[key] = unquote(encoded, errors="strict")
        else:
            params[key] = re.sub(r"\\(.)", r"\1", quoted) if quoted else token
    return params


def embeds(srv, timeout: float) -> bool:
    r = srv.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "Paris is in France"},
                      timeout=timeout)
    return r.status_code == 200


# -- chunking: linear, bounded, and inside the capacity ---------------------------------------
def test_base64_is_chunked_fast_and_every_chunk_fits(limits):
    """32 KiB of base64 took 16.6 s (quadratic): 128 KiB would have taken several minutes."""
    text = b64_text(128 << 10)
    file_id = upload(limits, 'filename="blob.txt"', text.encode()).json()["id"]
    started = time.monotonic()
    r = limits.http.post("/v1/chunks", json={"id": file_id, "chunk_capacity": 500}, timeout=60)
    assert r.status_code == 200, r.text
    assert time.monotonic() - started < 60
    chunks = r.json()["chunks"]
    assert "".join(chunks) == text and 100 < len(chunks) <= MAX_CHUNKS
    # Within the capacity by the model's own count: embed the longest chunks one by one.
    for chunk in sorted(chunks, key=len)[-3:]:
        r = limits.http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": chunk})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] <= 500


def test_chunk_capacity_has_a_lower_bound(limits):
    file_id = upload(limits, 'filename="small.md"', b"# Notes\n\nSome text to chunk.").json()["id"]
    for capacity in ("²", "1e3", 5, MIN_CHUNK_CAPACITY - 1):
        r = limits.http.post("/v1/chunks", json={"id": file_id, "chunk_capacity": capacity})
        assert r.status_code == 400, (capacity, r.text)
        assert r.json()["error"]["param"] == "chunk_capacity"
    assert f"between {MIN_CHUNK_CAPACITY} and" in r.json()["error"]["message"]
    for capacity in ("5", "²", "0x20", "-20", "9" * 5000):
        r = upload(limits, 'filename="small.md"', b"Some text.", "/v1/create/rag", collection="bound",
                   chunk_capacity=capacity)
        assert r.status_code == 400, (capacity, r.text)
        assert r.json()["error"]["param"] == "chunk_capacity"
    r = limits.http.post("/v1/chunks", json={"id": file_id, "chunk_capacity": MIN_CHUNK_CAPACITY})
    assert r.status_code == 200 and r.json()["chunks"]
    r = upload(limits, 'filename="small.md"', b"Some text.", "/v1/create/rag", collection="bound",
               chunk_capacity=str(MIN_CHUNK_CAPACITY))
    assert r.status_code == 200 and r.json()["chunks"] == 1


def test_config_refuses_a_tiny_chunk_capacity():
    parser = argparse.ArgumentParser()
    add_server_flags(parser)
    base = ["--model-name", EMBED_MODEL, "--model-path", str(EMBED_PATH), "--model-kind", "embedding"]
    with pytest.raises(ConfigError, match="chunk_capacity"):
        load_config(parser.parse_args(base + ["--chunk-capacity", "5"]))
    with pytest.raises(ConfigError, match="max_document_chunks"):
        load_config(parser.parse_args(base + ["--max-document-chunks", "0"]))
    config = load_config(parser.parse_args(base + ["--chunk-capacity", str(MIN_CHUNK_CAPACITY)]))
    assert config.chunk_capacity == MIN_CHUNK_CAPACITY and config.max_document_chunks == 4096


def test_a_document_with_too_many_chunks_is_refused_before_it_is_stored(limits):
    """40 KiB at chunk_capacity 5 gave 3,205 chunks; at the smallest capacity allowed it is still
    over this server's max_document_chunks: a 400 saying what to change, and nothing stored."""
    data = b64_text(40 << 10).encode()
    files_before = len(limits.http.get("/v1/files").json()["data"])
    r = upload(limits, 'filename="fanout.txt"', data, "/v1/create/rag", collection="fanout",
               chunk_capacity=str(MIN_CHUNK_CAPACITY))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "chunk_capacity"
    assert str(MAX_CHUNKS) in error["message"] and "chunk_capacity" in error["message"] \
        and "split" in error["message"]
    assert len(limits.http.get("/v1/files").json()["data"]) == files_before
    r = limits.http.post("/v1/retrieve", json={"collection": "fanout",
                                               "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"
    file_id = upload(limits, 'filename="fanout.txt"', data).json()["id"]
    r = limits.http.post("/v1/chunks", json={"id": file_id, "chunk_capacity": MIN_CHUNK_CAPACITY})
    assert r.status_code == 400 and str(MAX_CHUNKS) in r.json()["error"]["message"]
    # The refused jobs ended (/health shows the broker's state as of its last loop turn: poll it).
    assert wait_for(lambda: free_slots(limits) == 2, 5), limits.health()


# -- a client that hangs up cancels its job -----------------------------------------------------
def test_hung_up_chunk_job_is_cancelled_and_never_holds_up_embeddings(roomy):
    """16 MiB of base64 takes the worker a minute or more to chunk: while it does, embeddings
    are still answered, and once its client hangs up the worker stops within a step or two."""
    assert wait_for(lambda: free_slots(roomy) == 2, 30)
    file_id = upload(roomy, 'filename="huge.txt"', b64_text(16 << 20).encode()).json()["id"]
    body = f'{{"id": "{file_id}", "chunk_capacity": 512}}'.encode()
    sock = post_and_keep_open(roomy, "/v1/chunks", body, "application/json")
    try:
        assert wait_for(lambda: free_slots(roomy) == 1, 60), "the chunk job never started"
        started = time.monotonic()
        assert embeds(roomy, timeout=60)
        assert time.monotonic() - started < 15, "an embedding waited for the chunk job"
        assert free_slots(roomy) == 1, "the chunk job ended by itself: make it longer"
    finally:
        sock.close()
    assert wait_for(lambda: free_slots(roomy) == 2, 15), roomy.health()


def test_hung_up_ingest_is_cancelled_and_stores_nothing(roomy):
    """/v1/create/rag of 4 MiB of prose (chunking, then minutes of embedding), client gone."""
    assert wait_for(lambda: free_slots(roomy) == 2, 30)
    body, headers = multipart('filename="long.md"', prose(4 << 20).encode(), collection="hangup",
                              chunk_capacity="512")
    sock = post_and_keep_open(roomy, "/v1/create/rag", body, headers["Content-Type"])
    try:
        assert wait_for(lambda: free_slots(roomy) == 1, 60), "the ingest job never started"
        time.sleep(3)  # into the job; its chunking and embedding take far longer
        assert free_slots(roomy) == 1, "the ingest ended by itself: make it longer"
    finally:
        sock.close()
    assert wait_for(lambda: free_slots(roomy) == 2, 15), roomy.health()
    assert embeds(roomy, timeout=10)
    r = roomy.http.post("/v1/retrieve", json={"collection": "hangup",
                                              "messages": [{"role": "user", "content": "alpha"}]})
    assert r.status_code == 404


# -- file names ---------------------------------------------------------------------------------
def test_a_file_name_cannot_inject_content_disposition_parameters(limits):
    r = upload(limits, r'filename="evil.html\"; x=\".txt"', b"harmless")
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == 'evil.html"; x=".txt'
    content = limits.http.get(f"/v1/files/{r.json()['id']}/content")
    assert content.content == b"harmless"
    assert content.headers["content-type"] == "text/plain; charset=utf-8"
    assert content.headers["x-content-type-options"] == "nosniff"
    disposition = content.headers["content-disposition"]
    assert disposition == "attachment; filename=\"evil.html_; x=_.txt\"; " \
                          "filename*=UTF-8''evil.html%22%3B%20x%3D%22.txt"
    params = disposition_params(disposition)
    assert list(params) == ["filename", "filename*"]
    assert params["filename*"] == 'evil.html"; x=".txt'


def test_a_non_ascii_name_comes_back_exactly(limits):
    r = upload(limits, "filename*=UTF-8''caf%C3%A9%20%E2%82%AC%20%E6%97%A5%E6%9C%AC.md", b"# Caf\xc3\xa9")
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == "café € 日本.md"
    params = disposition_params(limits.http.get(f"/v1/files/{r.json()['id']}/content").headers["content-disposition"])
    assert params["filename*"] == "café € 日本.md"
    assert params["filename"] == "cafe  .md"


@pytest.mark.parametrize("params, stored", [
    ("filename*=UTF-8''evil%0D%0A2099-01-01%20forged.txt", "evil2099-01-01 forged.txt"),
    ('filename="../../etc/passwd.txt"', "passwd.txt"),
    ('filename="C:\\\\Users\\\\me\\\\notes.md"', "notes.md"),
    ("filename*=UTF-8''a%E2%80%A8b%E2%80%AEdm.txt", "abdm.txt"),  # U+2028 line separator, U+202E RLO
    ("filename*=UTF-8''%00%1F%7F%C2%85name.md", "name.md"),
    (f'filename="{"n" * 1000}.md"', "n" * (MAX_FILENAME_CHARS - 3) + ".md"),
])
def test_file_names_are_cleaned_on_upload(limits, params, stored):
    r = upload(limits, params, b"text")
    assert r.status_code == 200, r.text
    assert r.json()["filename"] == stored
    assert limits.http.get(f"/v1/files/{r.json()['id']}").json()["filename"] == stored


@pytest.mark.parametrize("params", ['filename="/"', 'filename="dir/.."', "filename*=UTF-8''%0D%0A%E2%80%A8"])
def test_a_name_with_nothing_left_is_refused(limits, params):
    r = upload(limits, params, b"text")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_filename" and r.json()["error"]["param"] == "file"


def test_log_lines_cannot_be_forged(limits):
    forged = "2099-01-01 00:00:00,000 edgellm.server ERROR forged"
    r = upload(limits, "filename*=UTF-8''" + quote(f"notes\r\n{forged}.md", safe=""), b"# Notes\n\nText.",
               "/v1/create/rag", collection="logs")
    assert r.status_code == 200, r.text
    r = upload(limits, 'filename="x.md"', b"text", "/v1/create/rag", collection="bad\r\n" + forged)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_collection_name"
    time.sleep(0.5)  # the log is written by the server process
    lines = limits.log_path.read_text(errors="replace").splitlines()
    assert any("ingested" in line and "forged.md" in line for line in lines)
    assert not any(line.startswith("2099-01-01") for line in lines)


# -- the pure functions behind the above ----------------------------------------------------------
def test_clean_filename_keeps_ordinary_names():
    for name in ("notes.md", "Résumé 2024 (final).txt", "日本語.md", "a'b&c#d.md"):
        assert clean_filename(name) == name


def test_content_disposition_escapes_whatever_is_stored():
    """Names stored before cleaning existed get a safe header too."""
    header = content_disposition('a"\\\r\nb%.txt')
    assert header == "attachment; filename=\"a____b_.txt\"; filename*=UTF-8''a%22%5C%0D%0Ab%25.txt"
    assert content_disposition("日本.md").startswith('attachment; filename=".md"; ')
    assert content_disposition("日本").startswith('attachment; filename="download"; ')


def test_concurrent_hostile_uploads_do_not_hang(limits):
    """A few base64 uploads at once, each chunked while the others wait their turn: all end."""
    results = []

    def one(seed):
        r = upload(limits, f'filename="b{seed}.txt"', b64_text(2 << 10, seed).encode(), "/v1/create/rag",
                   collection="many", chunk_capacity="100")
        results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert results == [200, 200, 200]
