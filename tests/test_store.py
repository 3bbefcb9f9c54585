"""Store tests against a real SQLite file with the real sqlite-vec extension."""

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
    DocumentNotFound,
    FileNotFound,
    FileRecord,
    InvalidCollectionName,
    SchemaTooNew,
    SqliteVecUnavailable,
    Store,
    StoreClosed,
    StoreError,
)
from store import db, store as store_module, vec_tables
from store.migrations import MIGRATIONS, Migration, apply_migrations

REPO_ROOT = Path(__file__).resolve().parent.parent
DIM = 4


def basis(i, dim=DIM):
    return [1.0 if j == i else 0.0 for j in range(dim)]


def query(path, sql, params=()):
    """Rows from a separate connection, to look at the file as another process would."""
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        return conn.execute(sql, params)
    finally:
        conn.close()


def vector_count(path, collection):
    collection_id = query(path, "SELECT id FROM collections WHERE name = ?", (collection,))[0][0]
    return query(path, f"SELECT count(*) FROM {vec_tables.table_name(collection_id)}")[0][0]


def chunk_count(path):
    return query(path, "SELECT count(*) FROM chunks")[0][0]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "edgellm.db"


@pytest.fixture
def store(path):
    with Store(path) as opened:
        yield opened


@pytest.fixture
def docs(store):
    store.create_collection("docs", "test-model", DIM)
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


def test_create_collection_is_idempotent(store):
    created = store.create_collection("docs", "m", 3)
    assert created == Collection("docs", "m", 3, created.created_at)
    assert store.create_collection("docs", "m", 3) == created
    assert store.get_collection("docs") == created
    assert store.get_collection("other") is None


def test_create_collection_conflict(store):
    store.create_collection("docs", "m", 3)
    with pytest.raises(CollectionConflict) as raised:
        store.create_collection("docs", "m", 4)
    assert raised.value.code == "collection_conflict"
    with pytest.raises(CollectionConflict):
        store.create_collection("docs", "other-model", 3)


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "semi;colon", 'quo"te', "dot.ted", "ünï"])
def test_collection_names_are_restricted(store, name):
    with pytest.raises(InvalidCollectionName) as raised:
        store.create_collection(name, "m", 3)
    assert raised.value.code == "invalid_collection_name"


def test_collection_names_may_differ_only_in_case(store):
    store.create_collection("Docs-1", "m", 2)
    store.create_collection("docs-1", "m", 3)
    store.upsert_document("Docs-1", "s", "h", ["upper"], [[1, 0]])
    store.upsert_document("docs-1", "s", "h", ["lower"], [[1, 0, 0]])
    assert [c.name for c in store.list_collections()] == ["Docs-1", "docs-1"]
    assert store.search("Docs-1", [1, 0])[0].text == "upper"
    assert store.search("docs-1", [1, 0, 0])[0].text == "lower"


def test_delete_collection_drops_its_vectors(docs, path):
    docs.upsert_document("docs", "a", "h", ["x"], [basis(0)])
    docs.delete_collection("docs")
    assert docs.get_collection("docs") is None
    assert chunk_count(path) == 0
    assert query(path, "SELECT name FROM sqlite_master WHERE name LIKE 'vec_%'") == []
    with pytest.raises(CollectionNotFound):
        docs.delete_collection("docs")


def test_unknown_collection(store):
    with pytest.raises(CollectionNotFound) as raised:
        store.search("nope", basis(0))
    assert raised.value.code == "collection_not_found"
    with pytest.raises(CollectionNotFound):
        store.upsert_document("nope", "a", "h", ["x"], [basis(0)])
    with pytest.raises(CollectionNotFound):
        store.list_documents("nope")


def test_errors_name_the_request_field_to_blame():
    assert StoreError.param is None
    assert InvalidCollectionName.param == CollectionNotFound.param == CollectionConflict.param == "collection"
    assert FileNotFound.param == "id"
    assert DimensionMismatch.param is None


# Documents


def test_add_unchanged_and_replace(docs, path):
    doc_id, status = docs.upsert_document("docs", "a.md", "h1", ["one", "two"], [basis(0), basis(1)])
    assert status == "added"
    assert (chunk_count(path), vector_count(path, "docs")) == (2, 2)

    assert docs.upsert_document("docs", "a.md", "h1", ["ignored"], [basis(2)]) == (doc_id, "unchanged")
    assert (chunk_count(path), vector_count(path, "docs")) == (2, 2)
    assert [hit.text for hit in docs.search("docs", basis(0))] == ["one", "two"]

    assert docs.upsert_document("docs", "a.md", "h2", ["three"], [basis(2)]) == (doc_id, "replaced")
    assert (chunk_count(path), vector_count(path, "docs")) == (1, 1)
    assert [hit.text for hit in docs.search("docs", basis(0))] == ["three"]

    record = docs.get_document("docs", "a.md")
    assert (record.id, record.content_hash, record.chunk_count) == (doc_id, "h2", 1)
    assert docs.get_document("docs", "missing") is None


def test_same_source_in_two_collections_is_two_documents(docs):
    docs.create_collection("other", "test-model", DIM)
    first, _ = docs.upsert_document("docs", "a", "h", ["x"], [basis(0)])
    second, status = docs.upsert_document("other", "a", "h", ["x"], [basis(0)])
    assert status == "added" and first != second


def test_list_and_delete_documents(docs, path):
    docs.upsert_document("docs", "a", "h", ["x", "y"], [basis(0), basis(1)])
    docs.upsert_document("docs", "b", "h", ["z"], [basis(2)])
    assert [(d.source, d.chunk_count) for d in docs.list_documents("docs")] == [("a", 2), ("b", 1)]
    docs.delete_document("docs", "a")
    assert [d.source for d in docs.list_documents("docs")] == ["b"]
    assert (chunk_count(path), vector_count(path, "docs")) == (1, 1)
    with pytest.raises(DocumentNotFound):
        docs.delete_document("docs", "a")


def test_chunk_and_vector_counts_must_match(docs):
    with pytest.raises(ValueError):
        docs.upsert_document("docs", "a", "h", ["x", "y"], [basis(0)])


def test_dimension_mismatch(docs, path):
    with pytest.raises(DimensionMismatch) as raised:
        docs.search("docs", [1.0, 0.0])
    assert raised.value.code == "dimension_mismatch"
    with pytest.raises(DimensionMismatch):
        docs.upsert_document("docs", "a", "h", ["x", "y"], [basis(0), [1.0] * (DIM + 1)])
    assert docs.list_documents("docs") == []
    assert chunk_count(path) == 0


# Search


def test_search_ranks_nearest_first(docs):
    docs.upsert_document("docs", "axes", "h", ["x", "y", "z"], [basis(0), basis(1), basis(2)])
    docs.upsert_document("docs", "diag", "h", ["xy"], [[1.0, 1.0, 0.0, 0.0]])
    hits = docs.search("docs", basis(1), limit=10)
    assert [hit.text for hit in hits] == ["y", "xy", "x", "z"]
    assert hits[0].score == pytest.approx(1.0, abs=1e-6)
    assert hits[1].score == pytest.approx(2 ** -0.5, abs=1e-6)
    assert hits[2].score == pytest.approx(0.0, abs=1e-6)
    assert (hits[0].source, hits[0].ordinal) == ("axes", 1)
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_search_scale_does_not_change_cosine_score(docs):
    docs.upsert_document("docs", "a", "h", ["x"], [[2.0, 0.0, 0.0, 0.0]])
    assert docs.search("docs", [0.5, 0.0, 0.0, 0.0])[0].score == pytest.approx(1.0, abs=1e-6)


def test_search_limit_and_threshold(docs):
    docs.upsert_document("docs", "axes", "h", ["x", "y", "z"], [basis(0), basis(1), basis(2)])
    docs.upsert_document("docs", "diag", "h", ["xy"], [[1.0, 1.0, 0.0, 0.0]])
    assert [hit.text for hit in docs.search("docs", basis(0), limit=2)] == ["x", "xy"]
    assert [hit.text for hit in docs.search("docs", basis(0), score_threshold=0.5)] == ["x", "xy"]
    assert [hit.text for hit in docs.search("docs", basis(0), score_threshold=0.99)] == ["x"]
    assert docs.search("docs", basis(3), score_threshold=0.1) == []
    with pytest.raises(ValueError):
        docs.search("docs", basis(0), limit=0)


def test_search_empty_collection(docs):
    assert docs.search("docs", basis(0)) == []


# Files


def test_files_round_trip(store):
    record = store.add_file("notes.md", b"# Hello\n")
    assert record.id.startswith("file_")
    assert (record.filename, record.size, record.purpose) == ("notes.md", 8, "assistants")
    assert len(record.content_hash) == 64
    assert store.get_file(record.id) == record
    assert store.get_file_content(record.id) == b"# Hello\n"
    assert store.list_files() == [record]
    store.delete_file(record.id)
    assert store.list_files() == []


def test_unknown_file(store):
    store.create_collection("docs", "m", DIM)
    for call in (store.get_file, store.get_file_content, store.delete_file):
        with pytest.raises(FileNotFound) as raised:
            call("file_missing")
        assert raised.value.code == "file_not_found"
    with pytest.raises(FileNotFound):
        store.upsert_document("docs", "a", "h", ["x"], [basis(0)], file_id="file_missing")


def test_delete_file_cascades_to_documents_chunks_and_vectors(docs, path):
    docs.create_collection("other", "test-model", DIM)
    upload = docs.add_file("a.md", b"alpha")
    kept = docs.add_file("b.md", b"beta")
    docs.upsert_document("docs", "a.md", "h", ["a1", "a2"], [basis(0), basis(1)], file_id=upload.id)
    docs.upsert_document("other", "a.md", "h", ["a3"], [basis(0)], file_id=upload.id)
    docs.upsert_document("docs", "b.md", "h", ["b1"], [basis(0)], file_id=kept.id)

    docs.delete_file(upload.id)

    assert [d.source for d in docs.list_documents("docs")] == ["b.md"]
    assert docs.list_documents("other") == []
    assert chunk_count(path) == 1
    assert (vector_count(path, "docs"), vector_count(path, "other")) == (1, 0)
    assert [hit.text for hit in docs.search("docs", basis(0))] == ["b1"]
    assert docs.integrity_check() == "ok"


def test_unchanged_upsert_moves_the_file_link(docs):
    old = docs.add_file("a.md", b"same")
    new = docs.add_file("a.md", b"same")
    docs.upsert_document("docs", "a.md", "h", ["x"], [basis(0)], file_id=old.id)
    assert docs.upsert_document("docs", "a.md", "h", ["x"], [basis(0)], file_id=new.id)[1] == "unchanged"
    docs.delete_file(old.id)
    assert docs.get_document("docs", "a.md").file_id == new.id


# Crashes and persistence


def _fail_after_first_vector(monkeypatch):
    real_insert = vec_tables.insert

    def insert_then_fail(conn, collection_id, rows):
        real_insert(conn, collection_id, rows[:1])
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(store_module.vec_tables, "insert", insert_then_fail)


def test_failure_mid_document_writes_nothing(docs, path, monkeypatch):
    _fail_after_first_vector(monkeypatch)
    with pytest.raises(RuntimeError):
        docs.upsert_document("docs", "a", "h", ["x", "y"], [basis(0), basis(1)])
    assert docs.list_documents("docs") == []
    assert (chunk_count(path), vector_count(path, "docs")) == (0, 0)
    assert docs.search("docs", basis(0)) == []
    assert docs.integrity_check() == "ok"


def test_failed_replace_keeps_the_old_version(docs, path, monkeypatch):
    docs.upsert_document("docs", "a", "h1", ["old"], [basis(0)])
    _fail_after_first_vector(monkeypatch)
    with pytest.raises(RuntimeError):
        docs.upsert_document("docs", "a", "h2", ["new1", "new2"], [basis(1), basis(2)])
    assert docs.get_document("docs", "a").content_hash == "h1"
    assert [hit.text for hit in docs.search("docs", basis(0))] == ["old"]
    assert (chunk_count(path), vector_count(path, "docs")) == (1, 1)
    assert docs.integrity_check() == "ok"


def test_killed_process_leaves_no_half_document(path):
    with Store(path) as opened:
        opened.create_collection("docs", "test-model", DIM)
        opened.upsert_document("docs", "kept", "h", ["kept"], [basis(3)])
    script = textwrap.dedent(
        f"""
        import os
        from store import Store, vec_tables
        from store import store as store_module

        real_insert = vec_tables.insert

        def insert_then_die(conn, collection_id, rows):
            real_insert(conn, collection_id, rows[:1])
            os._exit(9)

        store_module.vec_tables.insert = insert_then_die
        s = Store({os.fspath(path)!r})
        s.upsert_document("docs", "a", "h", ["x", "y"], [{basis(0)!r}, {basis(1)!r}])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()

    with Store(path) as reopened:
        assert [d.source for d in reopened.list_documents("docs")] == ["kept"]
        assert reopened.integrity_check() == "ok"
        assert [hit.text for hit in reopened.search("docs", basis(0))] == ["kept"]
    assert (chunk_count(path), vector_count(path, "docs")) == (1, 1)


def test_reopen_keeps_everything(path):
    with Store(path) as first:
        first.create_collection("docs", "test-model", DIM)
        upload = first.add_file("a.md", b"alpha")
        first.upsert_document("docs", "a.md", "h", ["a1"], [basis(0)], file_id=upload.id)
    with Store(path) as second:
        assert second.get_collection("docs").dimension == DIM
        assert second.get_file_content(upload.id) == b"alpha"
        hit = second.search("docs", basis(0))[0]
        assert (hit.text, hit.file_id) == ("a1", upload.id)
        assert second.integrity_check() == "ok"


def test_threads_share_one_store(docs):
    def ingest(i):
        docs.upsert_document("docs", f"doc{i}", "h", [f"text{i}"], [basis(i % DIM)])
        return docs.search("docs", basis(i % DIM), limit=1)[0].score

    with ThreadPoolExecutor(max_workers=8) as pool:
        scores = list(pool.map(ingest, range(32)))
    assert scores == pytest.approx([1.0] * 32, abs=1e-6)
    assert len(docs.list_documents("docs")) == 32
    assert docs.integrity_check() == "ok"


# Ingesting an uploaded file


def test_ingest_file_stores_file_and_document_together(docs, path):
    record, _, status = docs.ingest_file("docs", "a.md", b"alpha", ["alpha"], [basis(0)])
    assert status == "added"
    assert docs.get_document("docs", "a.md").file_id == record.id
    assert docs.get_file_content(record.id) == b"alpha"
    again, _, status = docs.ingest_file("docs", "a.md", b"alpha beta", ["alpha", "beta"], [basis(0), basis(1)])
    assert status == "replaced"
    assert [f.id for f in docs.list_files()] == [again.id]  # the replaced version's file went with it
    assert vector_count(path, "docs") == 2


def test_ingest_file_failure_leaves_neither_file_nor_document(docs, path):
    with pytest.raises(DimensionMismatch):
        docs.ingest_file("docs", "b.md", b"beta", ["beta"], [[1.0, 0.0]])
    assert docs.list_files() == []
    assert docs.get_document("docs", "b.md") is None
    assert chunk_count(path) == 0
