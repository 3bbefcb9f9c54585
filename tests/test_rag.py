"""Embeddings, files, chunks, ingestion, /v1/retrieve and RAG chat on the real stack:
the real embedding model in its own worker, a real sqlite-vec store file, over HTTP."""

from __future__ import annotations

import base64
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from conftest import CHAT_MODEL, EMBED_MODEL, ROOT

DATA = Path(__file__).resolve().parent / "data"
PARIS = DATA / "paris"


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def embed(server, **body):
    body.setdefault("model", EMBED_MODEL)
    return server.http.post("/v1/embeddings", json=body)


def upload(server, path: Path, endpoint="/v1/files", **form):
    with open(path, "rb") as f:
        return server.http.post(endpoint, files={"file": (path.name, f, "text/plain")}, data=form)


@pytest.fixture(scope="module")
def paris(server):
    """The Paris notes ingested into collection 'paris'."""
    for path in sorted(PARIS.iterdir()):
        r = upload(server, path, "/v1/create/rag", collection="paris")
        assert r.status_code == 200, r.text
    return "paris"


# -- embeddings -----------------------------------------------------------------------------
def test_embeddings_match_sentence_transformers(server):
    reference = json.loads((DATA / "minilm_reference.json").read_text())
    r = embed(server, input=reference["sentences"])
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["model"] == EMBED_MODEL
    assert [d["index"] for d in body["data"]] == list(range(len(reference["sentences"])))
    for item, expected in zip(body["data"], reference["embeddings"]):
        assert item["object"] == "embedding"
        assert len(item["embedding"]) == 384
        assert cosine(item["embedding"], expected) >= 0.999
        assert abs(math.sqrt(sum(x * x for x in item["embedding"])) - 1) < 1e-4  # L2-normalised
    assert body["usage"]["prompt_tokens"] == sum(reference["token_counts"])
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"]


def test_embedding_input_forms(server):
    single = embed(server, input="Paris is in France").json()
    assert len(single["data"]) == 1
    reference = json.loads((DATA / "minilm_reference.json").read_text())
    tokens = embed(server, input=reference["token_ids"][0]).json()
    by_text = embed(server, input=reference["sentences"][0]).json()
    assert cosine(tokens["data"][0]["embedding"], by_text["data"][0]["embedding"]) > 0.9999
    many_tokens = embed(server, input=reference["token_ids"][:2]).json()
    assert len(many_tokens["data"]) == 2


def test_embedding_base64(server):
    floats = embed(server, input="Paris").json()["data"][0]["embedding"]
    encoded = embed(server, input="Paris", encoding_format="base64").json()["data"][0]["embedding"]
    decoded = struct.unpack("<384f", base64.b64decode(encoded))
    assert struct.unpack("<384f", struct.pack("<384f", *floats)) == decoded  # the same float32 numbers


def test_embeddings_with_openai_client(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    result = client.embeddings.create(model=EMBED_MODEL, input=["Paris is in France", "The Métro opened in 1900"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 384
    assert result.usage.prompt_tokens > 0


@pytest.mark.parametrize("body, status, code", [
    ({"input": ""}, 400, None),
    ({"input": []}, 400, None),
    ({"input": ["ok", ""]}, 400, None),
    ({"input": 5}, 400, None),
    ({"input": [["a"]]}, 400, None),
    ({"input": "x", "encoding_format": "hex"}, 400, None),
    ({"input": "word " * 700}, 400, "context_length_exceeded"),
    ({"input": "x", "model": CHAT_MODEL}, 400, "wrong_model_kind"),
    ({"input": "x", "model": "nope"}, 500, "model_not_found"),
])
def test_embedding_errors(server, body, status, code):
    r = server.http.post("/v1/embeddings", json={"model": EMBED_MODEL, **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    if code:
        assert err["code"] == code
    if code == "context_length_exceeded":
        assert "512" in err["message"]


# -- files and chunks -----------------------------------------------------------------------
def test_files_lifecycle(server):
    r = upload(server, PARIS / "metro.txt")
    assert r.status_code == 200
    record = r.json()
    assert record["object"] == "file" and record["id"].startswith("file")
    assert record["filename"] == "metro.txt" and record["bytes"] == (PARIS / "metro.txt").stat().st_size
    assert record["id"] in [f["id"] for f in server.http.get("/v1/files").json()["data"]]
    assert server.http.get(f"/v1/files/{record['id']}").json() == record
    assert server.http.get(f"/v1/files/{record['id']}/content").content == (PARIS / "metro.txt").read_bytes()
    chunks = server.http.post("/v1/chunks", json={"id": record["id"], "filename": "metro.txt",
                                                  "chunk_capacity": 20}).json()
    assert chunks["id"] == record["id"] and len(chunks["chunks"]) >= 2
    assert " ".join(chunks["chunks"]).split() == (PARIS / "metro.txt").read_text().split()
    deleted = server.http.delete(f"/v1/files/{record['id']}").json()
    assert deleted == {"id": record["id"], "object": "file", "deleted": True}
    assert server.http.get(f"/v1/files/{record['id']}").status_code == 404


def test_file_errors(server, tmp_path):
    assert server.http.get("/v1/files/file-nope").json()["error"]["code"] == "file_not_found"
    assert server.http.delete("/v1/files/file-nope").status_code == 404
    assert server.http.post("/v1/chunks", json={"id": "file-nope"}).status_code == 404
    r = server.http.post("/v1/files", data={"x": "1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(b"%PDF-1.4")
    assert upload(server, pdf).json()["error"]["code"] == "unsupported_file_type"
    big = tmp_path / "big.txt"
    big.write_text("word " * 50_000)  # 250 kB, over the fixture's 200 kB file limit
    r = upload(server, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    binary = tmp_path / "bad.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert upload(server, binary).status_code == 400


# -- ingestion and retrieval ----------------------------------------------------------------
def test_retrieve_finds_the_location_chunk_first(server, paris):
    r = server.http.post("/v1/retrieve", json={
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the location of Paris?"}],
        "model": EMBED_MODEL, "collection": paris})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["limit"] == 5 and body["score_threshold"] == 0.4
    points = body["points"]
    assert points, "nothing retrieved"
    assert "Seine" in points[0]["source"]
    assert all(p["score"] >= 0.4 for p in points)
    assert [p["score"] for p in points] == sorted((p["score"] for p in points), reverse=True)


def test_retrieve_overrides(server, paris):
    body = {"messages": [{"role": "user", "content": "What is the location of Paris?"}], "collection": paris}
    assert len(server.http.post("/v1/retrieve", json={**body, "limit": 1}).json()["points"]) == 1
    assert server.http.post("/v1/retrieve", json={**body, "score_threshold": 0.99}).json()["points"] == []


def test_reingest_unchanged_adds_nothing_and_changed_replaces(server, paris, tmp_path):
    r = upload(server, PARIS / "location.md", "/v1/create/rag", collection=paris)
    assert r.json()["status"] == "unchanged"
    doc = tmp_path / "notes.md"
    doc.write_text("# Notes\n\nThe Eiffel Tower was finished in 1889.")
    assert upload(server, doc, "/v1/create/rag", collection="changing").json()["status"] == "added"
    doc.write_text("# Notes\n\nThe Pompidou Centre opened in 1977.")
    assert upload(server, doc, "/v1/create/rag", collection="changing").json()["status"] == "replaced"
    points = server.http.post("/v1/retrieve", json={"collection": "changing", "score_threshold": 0, "messages": [
        {"role": "user", "content": "When was the Eiffel Tower finished?"}]}).json()["points"]
    assert [p["source"] for p in points] == ["# Notes\n\nThe Pompidou Centre opened in 1977."]


def test_retrieve_errors(server, paris):
    ask = {"messages": [{"role": "user", "content": "Paris?"}]}
    r = server.http.post("/v1/retrieve", json={**ask, "collection": "no-such-collection"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"
    r = server.http.post("/v1/retrieve", json={"collection": paris, "messages": []})
    assert r.status_code == 400
    r = server.http.post("/v1/retrieve", json={**ask, "collection": paris, "limit": "five"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"
    r = server.http.post("/v1/retrieve", json={**ask, "collection": paris, "model": "nope"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_not_found"


def test_ingest_cli(server, tmp_path):
    cmd = [sys.executable, str(ROOT / "server.py"), "ingest", str(PARIS), "--collection", "cli",
           "--server", server.url]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "4 files into collection 'cli': 4 added" in first.stdout
    assert "4/4" in first.stderr  # the progress bar
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert "0 added, 0 replaced, 4 unchanged, 0 failed" in again.stdout


def test_file_list_pages_as_openai_clients_expect(server, paris):
    """The official client pages through GET /v1/files with after/limit until has_more is false."""
    listed = server.http.get("/v1/files").json()
    assert listed["has_more"] is False and listed["first_id"] == listed["data"][0]["id"]
    ids = [f["id"] for f in listed["data"]]
    assert len(ids) >= 4
    created = [f["created_at"] for f in listed["data"]]
    assert created == sorted(created, reverse=True)  # newest first, as OpenAI's default order
    first = server.http.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == ids[:2] and first["has_more"] is True
    rest = server.http.get("/v1/files", params={"limit": 10_000, "after": first["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == ids[2:] and rest["has_more"] is False
    assert [f["id"] for f in server.http.get("/v1/files", params={"order": "asc"}).json()["data"]] == ids[::-1]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30)
    assert [f.id for f in client.files.list(limit=1)] == ids  # auto-paging ends
    for bad in ({"limit": "0"}, {"order": "sideways"}, {"after": "file_none"}, {"page": "2"}):
        r = server.http.get("/v1/files", params=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad))
