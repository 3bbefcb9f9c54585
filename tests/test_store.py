"""Store tests against a real SQLite file with the real sqlite-vec extension."""

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from store import (
    Collection,
    CollectionConflict,
    CollectionNotFound,
    DatabaseError,
    DimensionMismatch,
    FileNotFound,
    FileRecord,
    InvalidCollectionName,
    SchemaTooNew,
    SqliteVecUnavailable,
    Store,
    StoreClosed,
    StoreError,
    content_hash,
)
from store import db, vector_table
from store.migrations import MIGRATIONS, Migration, apply_migrations

REPO_ROOT = Path(__file__).resolve().parent.parent
DIM = 4
MODEL = "test-model"


def basis(i, dim=DIM):
    return [1.0 if j == i else 0.0 for j in range(dim)]


def ingest(store, source, chunks, vectors, *, collection="docs", model=MODEL, data=None):
    """``ingest_document`` as the front end calls it; ``data`` defaults to the chunks' text."""
    data = "\n".join(chunks).encode() if data is None else data
    return store.ingest_document(collection, model, source, data, content_hash(data), chunks, vectors)


def query(path, sql, params=()):
    """Rows from a separate connection, to look at the file as another process would."""
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        return conn.execute(sql, params)
    finally:
        conn.close()


def vector_count(path, collection):
    return query(path, "SELECT count(*) FROM vectors v JOIN collections c ON c.id = v.collection_id"
                       " WHERE c.name = ?", (collection,))[0][0]


def chunk_count(path):
    return query(path, "SELECT count(*) FROM chunks")[0][0]


def sources(path, collection):
    return [
        source
        for (source,) in query(
            path,
            "SELECT d.source FROM documents d JOIN collections c ON c.id = d.collection_id"
            " WHERE c.name = ? ORDER BY d.id",
            (collection,),
        )
    ]


def all_vectors(path):
    return query(path, "SELECT count(*) FROM vectors")[0][0]


def integrity_ok(path):
    return query(path, "PRAGMA integrity_check") == [("ok",)]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "edgellm.db"


@pytest.fixture
def store(path):
    with Store(path) as opened:
        yield opened


@pytest.fixture
def docs(store):
    """A store whose collection "docs" (MODEL, DIM) holds one document, "seed"."""
    ingest(store, "seed", ["seed"], [basis(3)])
    return store


# Opening and migrations


def test_opens_with_a_binding_that_loads_sqlite_vec(store, path):
    assert store.binding in ("sqlite3", "apsw")
    assert query(path, "SELECT vec_version()")[0][0].startswith("v")
    assert query(path, "PRAGMA journal_mode")[0][0] == "wal"


def test_migrations_are_recorded_and_applied_once(path):
    with Store(path) as first:
        assert first.applied_migrations == [m.version for m in MIGRATIONS]
    recorded = query(path, "SELECT version, name FROM schema_migrations ORDER BY version")
    assert recorded == [(m.version, m.name) for m in MIGRATIONS]
    with Store(path) as again:
        assert again.applied_migrations == []
    assert query(path, "SELECT version, name FROM schema_migrations ORDER BY version") == recorded


def test_new_migration_is_applied_to_an_existing_file(path):
    Store(path).close()
    extra = MIGRATIONS + (Migration(MIGRATIONS[-1].version + 1, "extra", ("CREATE TABLE extra (x)",)),)
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        assert apply_migrations(conn, extra) == [extra[-1].version]
        assert apply_migrations(conn, extra) == []
    finally:
        conn.close()
    assert query(path, "SELECT count(*) FROM extra") == [(0,)]


def test_failed_migration_leaves_the_file_unchanged(path):
    Store(path).close()
    broken = MIGRATIONS + (Migration(MIGRATIONS[-1].version + 1, "broken", ("CREATE TABLE t (x)", "NOT SQL")),)
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        with pytest.raises(StoreError):
            apply_migrations(conn, broken)
    finally:
        conn.close()
    assert query(path, "SELECT name FROM sqlite_master WHERE name = 't'") == []
    assert [v for (v,) in query(path, "SELECT version FROM schema_migrations")] == [m.version for m in MIGRATIONS]


def test_migrations_must_be_in_order(path):
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        with pytest.raises(ValueError):
            apply_migrations(conn, (Migration(2, "b", ()), Migration(1, "a", ())))
    finally:
        conn.close()


def test_file_from_a_newer_version_is_refused(path):
    Store(path).close()
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        conn.execute("INSERT INTO schema_migrations VALUES (9999, 'future', 0)")
    finally:
        conn.close()
    with pytest.raises(SchemaTooNew) as raised:
        Store(path)
    assert raised.value.code == "schema_too_new"


def test_missing_binding_says_what_to_install(path, monkeypatch):
    no_extensions = types.SimpleNamespace(Connection=object, Error=sqlite3.Error)
    monkeypatch.setattr(db, "sqlite3", no_extensions)
    monkeypatch.setitem(sys.modules, "apsw", None)
    with pytest.raises(SqliteVecUnavailable) as raised:
        Store(path)
    assert raised.value.code == "sqlite_vec_unavailable"
    assert "pip install apsw" in str(raised.value)


def test_memory_path_is_refused():
    with pytest.raises(ValueError):
        Store(":memory:")


def test_closed_store_refuses_calls(path):
    opened = Store(path)
    opened.close()
    with pytest.raises(StoreClosed):
        opened.list_collections()


# Rows by column name


def _raw_connections():
    """Plain connections of each installed binding (sqlite-vec is not needed to name columns)."""
    yield db.Connection(sqlite3.connect(":memory:", isolation_level=None), "sqlite3", (sqlite3.Error,))
    try:
        import apsw
    except ImportError:
        return
    yield db.Connection(apsw.Connection(":memory:"), "apsw", (apsw.Error,))


@pytest.mark.parametrize("conn", list(_raw_connections()), ids=lambda conn: conn.binding)
def test_rows_map_by_column_name_in_either_binding(conn):
    try:
        conn.execute("CREATE TABLE t (a, b)")
        conn.execute("INSERT INTO t VALUES (1, 'one'), (2, 'two')")
        assert conn.mappings("SELECT b, a FROM t ORDER BY a") == [{"b": "one", "a": 1}, {"b": "two", "a": 2}]
        assert conn.mapping("SELECT a AS x, t.b AS y FROM t WHERE a = 2") == {"x": 2, "y": "two"}
        assert conn.mappings("SELECT a FROM t WHERE a > 5") == []
        assert conn.mapping("SELECT a FROM t WHERE a > 5") is None
        with pytest.raises(ValueError):
            conn.mappings("SELECT a, a FROM t")
        with pytest.raises(DatabaseError):
            conn.mappings("SELECT nope FROM t")
    finally:
        conn.close()


def test_records_do_not_depend_on_the_order_of_the_columns(store, path):
    record = store.add_file("notes.md", b"# Hello\n")
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        row = conn.mapping(
            "SELECT created_at, content_hash, size, purpose, filename, id FROM files WHERE id = ?", (record.id,)
        )
    finally:
        conn.close()
    assert FileRecord(**row) == record == store.get_file(record.id)


# Collections


def test_first_document_creates_the_collection(store, path):
    assert store.get_collection("docs") is None
    assert store.list_collections() == []
    ingest(store, "a.md", ["x"], [basis(0)])
    created = store.get_collection("docs")
    assert created == Collection("docs", MODEL, DIM, created.created_at)
    ingest(store, "b.md", ["y"], [basis(1)])
    assert store.get_collection("docs") == created
    assert store.list_collections() == [created]
    assert store.get_collection("other") is None
    assert vector_count(path, "docs") == 2


def test_collection_of_another_model_or_dimension_is_refused(docs, path):
    with pytest.raises(CollectionConflict) as raised:
        ingest(docs, "a.md", ["x"], [basis(0)], model="other-model")
    assert raised.value.code == "collection_conflict"
    with pytest.raises(DimensionMismatch) as raised:
        ingest(docs, "a.md", ["x"], [basis(0, DIM + 1)])
    assert raised.value.code == "dimension_mismatch"
    assert sources(path, "docs") == ["seed"]
    assert [f.filename for f in docs.list_files()] == ["seed"]
    assert docs.get_collection("docs").dimension == DIM


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "semi;colon", 'quo"te', "dot.ted", "ünï"])
def test_collection_names_are_restricted(store, name):
    with pytest.raises(InvalidCollectionName) as raised:
        ingest(store, "a.md", ["x"], [basis(0)], collection=name)
    assert raised.value.code == "invalid_collection_name"
    assert store.list_collections() == []
    assert store.list_files() == []


def test_collection_names_may_differ_only_in_case(store):
    ingest(store, "s", ["upper"], [[1, 0]], collection="Docs-1")
    ingest(store, "s", ["lower"], [[1, 0, 0]], collection="docs-1")
    assert [(c.name, c.dimension) for c in store.list_collections()] == [("Docs-1", 2), ("docs-1", 3)]
    assert store.search("Docs-1", [1, 0])[0].text == "upper"
    assert store.search("docs-1", [1, 0, 0])[0].text == "lower"


def test_unknown_collection(store):
    with pytest.raises(CollectionNotFound) as raised:
        store.search("nope", basis(0))
    assert raised.value.code == "collection_not_found"
    assert store.get_document("nope", "a") is None


def test_errors_name_the_request_field_to_blame():
    assert StoreError.param is None
    assert InvalidCollectionName.param == CollectionNotFound.param == CollectionConflict.param == "collection"
    assert FileNotFound.param == "id"
    assert DimensionMismatch.param is None
    assert DatabaseError.param is None


# Documents


def test_add_unchanged_and_replace(store, path):
    first, status = ingest(store, "a.md", ["one", "two"], [basis(0), basis(1)], data=b"v1")
    assert status == "added"
    doc_id = store.get_document("docs", "a.md").id
    assert (chunk_count(path), vector_count(path, "docs")) == (2, 2)

    second, status = ingest(store, "a.md", ["ignored"], [basis(2)], data=b"v1")
    assert status == "unchanged"
    assert (chunk_count(path), vector_count(path, "docs")) == (2, 2)
    assert [hit.text for hit in store.search("docs", basis(0))] == ["one", "two"]

    third, status = ingest(store, "a.md", ["three"], [basis(2)], data=b"v2")
    assert status == "replaced"
    assert (chunk_count(path), vector_count(path, "docs")) == (1, 1)
    assert [hit.text for hit in store.search("docs", basis(0))] == ["three"]

    record = store.get_document("docs", "a.md")
    assert (record.id, record.collection, record.source) == (doc_id, "docs", "a.md")
    assert (record.content_hash, record.chunk_count, record.file_id) == (content_hash(b"v2"), 1, third.id)
    assert store.get_document("docs", "missing") is None
    assert len({first.id, second.id, third.id}) == 3


def test_ingest_stores_the_file_with_the_given_hash(store):
    record, _ = store.ingest_document("docs", MODEL, "a.md", b"alpha", "the-callers-hash", ["alpha"], [basis(0)])
    assert record.id.startswith("file_")
    assert (record.filename, record.purpose, record.size, record.content_hash) == (
        "a.md", "assistants", 5, "the-callers-hash")
    assert store.get_file(record.id) == record
    assert store.get_file_content(record.id) == b"alpha"
    assert store.get_document("docs", "a.md").content_hash == "the-callers-hash"


def test_same_source_in_two_collections_is_two_documents(docs):
    ingest(docs, "a", ["x"], [basis(0)])
    _, status = ingest(docs, "a", ["x"], [basis(0)], collection="other")
    assert status == "added"
    assert docs.get_document("docs", "a").id != docs.get_document("other", "a").id


@pytest.mark.parametrize("chunks, vectors", [(["x", "y"], [basis(0)]), ([], []), (["x"], [[]])])
def test_chunks_and_vectors_are_checked(store, chunks, vectors):
    with pytest.raises(ValueError):
        ingest(store, "a", chunks, vectors, data=b"a")
    assert store.list_collections() == []
    assert store.list_files() == []


def test_dimension_mismatch(docs, path):
    with pytest.raises(DimensionMismatch) as raised:
        docs.search("docs", [1.0, 0.0])
    assert raised.value.code == "dimension_mismatch"
    with pytest.raises(DimensionMismatch):
        ingest(docs, "a", ["x", "y"], [basis(0), [1.0] * (DIM + 1)])
    assert sources(path, "docs") == ["seed"]
    assert chunk_count(path) == 1
    assert [f.filename for f in docs.list_files()] == ["seed"]


def test_failed_first_document_leaves_no_collection(store, path):
    with pytest.raises(DimensionMismatch):
        ingest(store, "a", ["x", "y"], [basis(0), [1.0] * (DIM + 1)])
    assert store.get_collection("docs") is None
    assert store.list_collections() == []
    assert store.list_files() == []
    assert all_vectors(path) == 0
    assert integrity_ok(path)


# Search


def test_search_ranks_nearest_first(store):
    ingest(store, "axes", ["x", "y", "z"], [basis(0), basis(1), basis(2)])
    ingest(store, "diag", ["xy"], [[1.0, 1.0, 0.0, 0.0]])
    hits = store.search("docs", basis(1), limit=10)
    assert [hit.text for hit in hits] == ["y", "xy", "x", "z"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)
    assert hits[1].score == pytest.approx(2 ** -0.5, abs=1e-6)
    assert hits[2].score == pytest.approx(0.0, abs=1e-6)
    axes = store.get_document("docs", "axes")
    assert (hits[0].source, hits[0].ordinal, hits[0].document_id, hits[0].file_id) == (
        "axes", 1, axes.id, axes.file_id)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
    assert len({hit.chunk_id for hit in hits}) == 4


def test_search_scale_does_not_change_cosine_score(store):
    ingest(store, "a", ["x"], [[2.0, 0.0, 0.0, 0.0]])
    assert store.search("docs", [0.5, 0.0, 0.0, 0.0])[0].score == pytest.approx(1.0, abs=1e-6)


def test_search_limit_and_threshold(store):
    ingest(store, "axes", ["x", "y", "z"], [basis(0), basis(1), basis(2)])
    ingest(store, "diag", ["xy"], [[1.0, 1.0, 0.0, 0.0]])
    assert [hit.text for hit in store.search("docs", basis(0), limit=2)] == ["x", "xy"]
    assert [hit.text for hit in store.search("docs", basis(0), score_threshold=0.5)] == ["x", "xy"]
    assert [hit.text for hit in store.search("docs", basis(0), score_threshold=0.99)] == ["x"]
    assert store.search("docs", basis(3), score_threshold=0.1) == []
    with pytest.raises(ValueError):
        store.search("docs", basis(0), limit=0)


def test_search_empty_collection(store):
    ingest(store, "a.md", ["x"], [basis(0)])
    store.delete_file(store.get_document("docs", "a.md").file_id)
    assert store.search("docs", basis(0)) == []


# Files


def test_content_hash_is_sha256_hex():
    assert content_hash(b"# Hello\n") == hashlib.sha256(b"# Hello\n").hexdigest()


def test_files_round_trip(store):
    record = store.add_file("notes.md", b"# Hello\n")
    assert record.id.startswith("file_")
    assert (record.filename, record.size, record.purpose) == ("notes.md", 8, "assistants")
    assert record.content_hash == content_hash(b"# Hello\n")
    assert store.get_file(record.id) == record
    assert store.get_file_content(record.id) == b"# Hello\n"
    assert store.list_files() == [record]
    store.delete_file(record.id)
    assert store.list_files() == []


def test_unknown_file(store):
    for call in (store.get_file, store.get_file_content, store.delete_file):
        with pytest.raises(FileNotFound) as raised:
            call("file_missing")
        assert raised.value.code == "file_not_found"


def test_delete_file_cascades_to_documents_chunks_and_vectors(docs, path):
    upload, _ = ingest(docs, "a.md", ["a1", "a2"], [basis(0), basis(1)], data=b"alpha")
    copy, _ = ingest(docs, "a.md", ["a3"], [basis(0)], collection="other", data=b"alpha")
    ingest(docs, "b.md", ["b1"], [basis(0)], data=b"beta")
    # One file behind documents in two collections (what linking an upload twice used to make).
    query(path, "UPDATE documents SET file_id = ? WHERE file_id = ?", (upload.id, copy.id))

    docs.delete_file(upload.id)

    assert sources(path, "docs") == ["seed", "b.md"]
    assert sources(path, "other") == []
    assert docs.get_document("other", "a.md") is None
    assert chunk_count(path) == 2
    assert (vector_count(path, "docs"), vector_count(path, "other")) == (2, 0)
    assert [hit.text for hit in docs.search("docs", basis(0))] == ["b1", "seed"]
    assert integrity_ok(path)


def test_replaced_and_unchanged_documents_give_up_their_old_file(docs):
    old, _ = ingest(docs, "a.md", ["x"], [basis(0)], data=b"same")
    new, status = ingest(docs, "a.md", ["x"], [basis(0)], data=b"same")
    assert status == "unchanged"
    assert docs.get_document("docs", "a.md").file_id == new.id
    assert [f.id for f in docs.list_files()][1:] == [new.id]
    with pytest.raises(FileNotFound):
        docs.get_file(old.id)

    newest, status = ingest(docs, "a.md", ["y", "z"], [basis(1), basis(2)], data=b"changed")
    assert status == "replaced"
    assert [f.id for f in docs.list_files()][1:] == [newest.id]
    assert docs.get_document("docs", "a.md").file_id == newest.id


def test_old_file_another_document_uses_is_kept(docs, path):
    shared, _ = ingest(docs, "a.md", ["x"], [basis(0)], data=b"alpha")
    other, _ = ingest(docs, "a.md", ["x"], [basis(0)], collection="other", data=b"alpha")
    query(path, "UPDATE documents SET file_id = ? WHERE file_id = ?", (shared.id, other.id))
    query(path, "DELETE FROM files WHERE id = ?", (other.id,))

    ingest(docs, "a.md", ["y"], [basis(1)], data=b"beta")

    assert docs.get_file_content(shared.id) == b"alpha"
    assert docs.get_document("other", "a.md").file_id == shared.id


# Crashes and persistence


def _fail_after_first_vector(monkeypatch):
    real_insert = vector_table.insert

    def insert_then_fail(conn, collection_id, chunk_ids, blobs):
        real_insert(conn, collection_id, chunk_ids[:1], blobs[:1])
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(vector_table, "insert", insert_then_fail)


def test_failure_mid_document_writes_nothing(docs, path, monkeypatch):
    _fail_after_first_vector(monkeypatch)
    with pytest.raises(RuntimeError):
        ingest(docs, "a", ["x", "y"], [basis(0), basis(1)])
    assert docs.get_document("docs", "a") is None
    assert sources(path, "docs") == ["seed"]
    assert [f.filename for f in docs.list_files()] == ["seed"]
    assert (chunk_count(path), vector_count(path, "docs")) == (1, 1)
    assert [hit.text for hit in docs.search("docs", basis(0))] == ["seed"]
    assert integrity_ok(path)


def test_failure_mid_first_document_leaves_no_collection(store, path, monkeypatch):
    _fail_after_first_vector(monkeypatch)
    with pytest.raises(RuntimeError):
        ingest(store, "a", ["x", "y"], [basis(0), basis(1)])
    assert store.list_collections() == []
    assert store.list_files() == []
    assert chunk_count(path) == 0
    assert all_vectors(path) == 0
    assert integrity_ok(path)


def test_failed_replace_keeps_the_old_version(docs, path, monkeypatch):
    old, _ = ingest(docs, "a", ["old"], [basis(0)], data=b"v1")
    _fail_after_first_vector(monkeypatch)
    with pytest.raises(RuntimeError):
        ingest(docs, "a", ["new1", "new2"], [basis(1), basis(2)], data=b"v2")
    assert docs.get_document("docs", "a").content_hash == content_hash(b"v1")
    assert docs.get_document("docs", "a").file_id == old.id
    assert [f.id for f in docs.list_files()][1:] == [old.id]
    assert [hit.text for hit in docs.search("docs", basis(0))] == ["old", "seed"]
    assert (chunk_count(path), vector_count(path, "docs")) == (2, 2)
    assert integrity_ok(path)


def _kill_mid_ingest(path, collection):
    """Ingest a two-chunk document in a child process killed (os._exit) after its first vector."""
    script = textwrap.dedent(
        f"""
        import os
        from store import Store, content_hash, vector_table

        real_insert = vector_table.insert

        def insert_then_die(conn, collection_id, chunk_ids, blobs):
            real_insert(conn, collection_id, chunk_ids[:1], blobs[:1])
            os._exit(9)

        vector_table.insert = insert_then_die
        s = Store({os.fspath(path)!r})
        s.ingest_document({collection!r}, {MODEL!r}, "a", b"xy", content_hash(b"xy"), ["x", "y"],
                          [{basis(0)!r}, {basis(1)!r}])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()


def test_killed_process_leaves_no_half_document(path):
    with Store(path) as opened:
        ingest(opened, "kept", ["kept"], [basis(3)])
    _kill_mid_ingest(path, "docs")
    with Store(path) as reopened:
        assert sources(path, "docs") == ["kept"]
        assert [f.filename for f in reopened.list_files()] == ["kept"]
        assert integrity_ok(path)
        assert [hit.text for hit in reopened.search("docs", basis(0))] == ["kept"]
    assert (chunk_count(path), vector_count(path, "docs")) == (1, 1)


def test_killed_process_leaves_no_empty_collection(path):
    Store(path).close()
    _kill_mid_ingest(path, "fresh")
    with Store(path) as reopened:
        assert reopened.list_collections() == []
        assert reopened.list_files() == []
    assert chunk_count(path) == 0
    assert all_vectors(path) == 0
    assert integrity_ok(path)


def test_reopen_keeps_everything(path):
    with Store(path) as first:
        upload, _ = ingest(first, "a.md", ["a1"], [basis(0)], data=b"alpha")
    with Store(path) as second:
        assert second.get_collection("docs").dimension == DIM
        assert second.get_file_content(upload.id) == b"alpha"
        hit = second.search("docs", basis(0))[0]
        assert (hit.text, hit.file_id) == ("a1", upload.id)
    assert integrity_ok(path)


def test_threads_share_one_store(store, path):
    """32 first-or-later documents at once: one collection, created once, holds them all."""
    def ingest_and_search(i):
        ingest(store, f"doc{i}", [f"text{i}"], [basis(i % DIM)])
        return store.search("docs", basis(i % DIM), limit=1)[0].score

    with ThreadPoolExecutor(max_workers=8) as pool:
        scores = list(pool.map(ingest_and_search, range(32)))
    assert scores == pytest.approx([1.0] * 32, abs=1e-6)
    assert len(store.list_collections()) == 1
    assert len(sources(path, "docs")) == 32
    assert len(store.list_files()) == 32
    assert integrity_ok(path)


def test_opening_a_store_loads_neither_numpy_nor_the_sqlite_vec_package(path):
    """A front end that never searches keeps its memory small: numpy (about 12 MB resident) comes
    in with the first search or ingest, not with opening the store."""
    script = textwrap.dedent(
        f"""
        import sys
        from store import Store
        Store({os.fspath(path)!r}).close()
        print(sorted(m for m in ("numpy", "sqlite_vec") if m in sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=60)
    assert result.stdout.decode().strip() == "[]", result.stderr.decode()


def test_missing_sqlite_vec_package_says_what_to_install(path, monkeypatch):
    monkeypatch.setattr(db.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SqliteVecUnavailable) as raised:
        Store(path)
    assert "pip install sqlite-vec" in str(raised.value)
