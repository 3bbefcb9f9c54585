"""RAG chat (context merged into the prompt by policy) and a server killed mid-ingestion."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from llama_cpp import Llama

from conftest import CHAT_PATH, EMBED_MODEL, EMBED_PATH, ROOT, ServerProcess, model_config
from frontend.config import RAG_PROMPT
from store import db
from test_rag import PARIS, upload

QUESTION = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the location of Paris?"}]


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory):
    config = (model_config("smol-rag", CHAT_PATH, threads=2, rag_collection="paris")
              + model_config("smol-rag-user", CHAT_PATH, threads=2, rag_collection="paris",
                             rag_policy="last-user-message")
              + model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", ctx_size=512, threads=2))
    srv = ServerProcess(config, tmp_path_factory.mktemp("rag"))
    try:
        for path in sorted(PARIS.iterdir()):
            assert upload(srv, path, "/v1/create/rag", collection="paris").status_code == 200
        yield srv
    finally:
        srv.stop()


def ask(srv, model, **extra):
    # What reached the prompt is checked, not the answer: one token is enough.
    r = srv.http.post("/v1/chat/completions", json={"model": model, "messages": QUESTION, "temperature": 0,
                                                     "max_tokens": 1, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def retrieved(srv) -> list[str]:
    """The chunks the server retrieves for QUESTION, with the limit and threshold a RAG chat uses."""
    r = srv.http.post("/v1/retrieve", json={"collection": "paris", "messages": QUESTION})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["limit"] == 5 and body["score_threshold"] == 0.4  # the server's defaults
    return [p["source"] for p in body["points"]]


def chatml_tokens(messages: list[dict]) -> int:
    """Prompt tokens of `messages` in SmolLM2's ChatML template, counted independently of the server."""
    vocab = Llama(model_path=str(CHAT_PATH), vocab_only=True, verbose=False)
    prompt = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return len(vocab.tokenize((prompt + "<|im_start|>assistant\n").encode(), add_bos=False, special=True))


@pytest.mark.parametrize("model", ["smol-rag", "smol-rag-user"])
def test_rag_chat_merges_retrieved_context(rag_server, model):
    sources = retrieved(rag_server)
    assert sources, "nothing retrieved for the question"
    # The merged messages as the model's rag_policy says: the default RAG prompt and the chunks, in
    # retrieval order, appended to the system message or put before the last user message.
    context = RAG_PROMPT + "\n\n".join(sources)
    system, user = QUESTION
    if model == "smol-rag":
        merged = [{"role": "system", "content": f"{system['content']}\n{context}"}, user]
    else:
        merged = [system, {"role": "user", "content": f"{context}\n\n{user['content']}"}]
    with_rag = ask(rag_server, model)
    assert with_rag["model"] == model
    assert with_rag["usage"]["prompt_tokens"] == chatml_tokens(merged)
    without = ask(rag_server, model, rag=False)
    assert without["usage"]["prompt_tokens"] == chatml_tokens(QUESTION)
    assert with_rag["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]


def write_corpus(folder, n_files: int):
    folder.mkdir()
    for i in range(n_files):
        paragraphs = [f"Document {i}, paragraph {j}. " + " ".join(f"word{i}x{j}x{k}" for k in range(20))
                      for j in range(6)]
        (folder / f"doc{i:02d}.md").write_text(f"# Document {i}\n\n" + "\n\n".join(paragraphs))


def consistency(store_path) -> tuple[int, int]:
    """(documents, files) after checking that every document has all its chunks and vectors, and
    every collection a document."""
    conn = db.connect(os.fspath(store_path), busy_timeout_ms=1000)
    try:
        assert conn.execute("PRAGMA integrity_check") == [("ok",)]
        empty_collections = conn.execute("SELECT name FROM collections c WHERE NOT EXISTS "
                                         "(SELECT 1 FROM documents d WHERE d.collection_id = c.id)")
        assert empty_collections == [], "a collection without documents"
        [(collection_id,)] = conn.execute("SELECT id FROM collections")
        chunks = conn.execute("SELECT count(*) FROM chunks")[0][0]
        vectors = conn.execute("SELECT count(*) FROM vectors WHERE collection_id = ?", (collection_id,))[0][0]
        assert chunks == vectors
        empty = conn.execute("SELECT count(*) FROM documents d WHERE NOT EXISTS "
                             "(SELECT 1 FROM chunks c WHERE c.document_id = d.id)")[0][0]
        assert empty == 0
        documents = conn.execute("SELECT count(*) FROM documents")[0][0]
        files = conn.execute("SELECT count(*) FROM files")[0][0]
    finally:
        conn.close()
    return documents, files


def test_killed_mid_ingestion_leaves_a_consistent_store(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus, 16)
    state = tmp_path / "state"
    state.mkdir()
    config = model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", ctx_size=512, threads=2)
    srv = ServerProcess(config, state)
    cmd = [sys.executable, str(ROOT / "server.py"), "ingest", str(corpus), "--collection", "crash",
           "--chunk-capacity", "64", "--server"]
    ingest = subprocess.Popen(cmd + [srv.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(srv.http.get("/v1/files").json()["data"]) < 3:
            time.sleep(0.05)
        os.killpg(srv.proc.pid, signal.SIGKILL)  # the front end and its workers, mid-ingestion
        srv.proc.wait()
        ingest.communicate(timeout=120)
    finally:
        srv.stop()
    documents, files = consistency(state / "store.db")
    assert 3 <= documents < 16, "the kill should land mid-ingestion"
    assert files == documents  # each file was stored in the same transaction as its document

    srv = ServerProcess(config, state)  # same store file
    try:
        rerun = subprocess.run(cmd + [srv.url], capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert f"{documents} unchanged, 0 failed" in rerun.stdout
    finally:
        srv.stop()
    assert consistency(state / "store.db") == (16, 16)


def test_rag_chat_before_anything_was_ingested_says_what_to_do(tmp_path):
    config = (model_config("smol-empty-rag", CHAT_PATH, threads=2, rag_collection="nothing-yet")
              + model_config(EMBED_MODEL, EMBED_PATH, kind="embedding", ctx_size=512, threads=2))
    srv = ServerProcess(config, tmp_path)
    try:
        body = {"model": "smol-empty-rag", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
        r = srv.http.post("/v1/chat/completions", json=body)
        assert r.status_code == 404
        error = r.json()["error"]
        assert error["code"] == "collection_not_found" and error["param"] == "rag"
        assert "/v1/create/rag" in error["message"] and '"rag": false' in error["message"]
        assert srv.http.post("/v1/chat/completions", json={**body, "rag": False}).status_code == 200
    finally:
        srv.stop()
