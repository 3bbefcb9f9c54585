"""Search over collections large enough that candidates come from sign-bit codes (store/codes.py),
the codes' cache staying true to the file, and the move of older files out of vec0 tables.
Real SQLite files with the real sqlite-vec extension."""

import os

import numpy as np
import pytest

from store import Store, content_hash, db
from store.codes import (
    CodeIndex,
    as_words,
    candidate_count,
    code_rows,
    hamming,
    nearest,
    popcount_native,
    popcount_table,
    sign_codes,
)
from store.migrations import MIGRATIONS, apply_migrations
from store.vector_table import to_blob

MODEL = "test-model"
DIM = 20  # not a multiple of 8 or 64: codes are padded
SIZE = 3000  # more than candidate_count's floor, so the codes pick the candidates


def clustered(rng, count, dim=DIM, clusters=30):
    centres = rng.standard_normal((clusters, dim))
    points = centres[rng.integers(0, clusters, count)] + 0.5 * rng.standard_normal((count, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def ingest(store, source, vectors, first=0, collection="docs"):
    chunks = [f"chunk {first + i}" for i in range(len(vectors))]
    data = f"{source} from chunk {first}".encode()
    return store.ingest_document(collection, MODEL, source, data, content_hash(data), chunks, vectors.tolist())


def fill(store, vectors, per_document=500):
    for first in range(0, len(vectors), per_document):
        ingest(store, f"doc-{first}", vectors[first:first + per_document], first)


def numbers(hits):
    return [int(hit.text.split()[1]) for hit in hits]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "edgellm.db"


def test_candidates_are_fewer_than_the_collection():
    assert candidate_count(SIZE, 5) < SIZE
    assert candidate_count(100, 5) == 100  # small collections are searched exactly


def test_search_through_codes_finds_each_stored_vector_first_and_the_true_neighbours(path):
    rng = np.random.default_rng(7)
    vectors = clustered(rng, SIZE)
    with Store(path) as store:
        fill(store, vectors)
        recall = 0.0
        for i in range(0, SIZE, 100):
            hits = store.search("docs", vectors[i].tolist(), limit=5)
            assert len(hits) == 5
            assert numbers(hits)[0] == i and hits[0].score == pytest.approx(1.0, abs=1e-5)
            assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
            exact = np.argsort(-(vectors @ vectors[i]), kind="stable")[:5]
            recall += len(set(numbers(hits)) & set(exact.tolist())) / 5
        assert recall / (SIZE // 100) >= 0.9


def test_scores_are_exact_cosine_similarities(path):
    rng = np.random.default_rng(3)
    vectors = clustered(rng, SIZE)
    query = rng.standard_normal(DIM)
    with Store(path) as store:
        fill(store, vectors)
        hits = store.search("docs", query.tolist(), limit=10)
    cosine = vectors @ (query / np.linalg.norm(query))
    for hit in hits:
        assert hit.score == pytest.approx(float(cosine[int(hit.text.split()[1])]), abs=1e-5)


def test_search_sees_every_change_to_the_collection_at_once(path):
    rng = np.random.default_rng(11)
    vectors = clustered(rng, SIZE)
    probe = -vectors[0]  # nothing stored points this way
    with Store(path) as store, Store(path) as other_process:
        fill(store, vectors)
        assert SIZE not in numbers(store.search("docs", probe.tolist(), limit=3))  # codes now cached
        record, _ = ingest(store, "new", probe[None, :], SIZE)
        assert numbers(store.search("docs", probe.tolist(), limit=1)) == [SIZE]
        store.delete_file(record.id)
        assert SIZE not in numbers(store.search("docs", probe.tolist(), limit=3))
        # A write through another connection (as from another process) is seen too.
        ingest(other_process, "elsewhere", probe[None, :], SIZE + 1)
        assert numbers(store.search("docs", probe.tolist(), limit=1)) == [SIZE + 1]
        # Replacing a document's text replaces its vectors.
        ingest(other_process, "doc-0", -probe[None, :], SIZE + 2)
        assert numbers(store.search("docs", vectors[1].tolist(), limit=SIZE + 10)).count(1) == 0


def test_a_collection_beyond_the_memory_bound_is_still_searched(path):
    rng = np.random.default_rng(5)
    vectors = clustered(rng, SIZE)
    with Store(path) as store:
        fill(store, vectors)
        store._code_index = CodeIndex(max_bytes=1000)  # smaller than one collection's codes
        for i in (0, 1234, SIZE - 1):
            assert numbers(store.search("docs", vectors[i].tolist(), limit=1)) == [i]


def test_codes_match_sqlite_vecs_binary_quantisation(path):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((50, 64)).astype(np.float32)
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        theirs = [bytes(conn.fetchvalue("SELECT vec_quantize_binary(?)", (to_blob(v),))) for v in vectors]
    finally:
        conn.close()
    assert sign_codes([to_blob(v) for v in vectors], to_blob([0.0] * 64)) == theirs


def test_hamming_distances_and_both_popcounts_agree_with_a_plain_count():
    rng = np.random.default_rng(2)
    codes = [rng.bytes(3) for _ in range(200)]  # 20 dims: 3 bytes, padded to one word
    query = rng.bytes(3)
    expected = [bin(int.from_bytes(code, "little") ^ int.from_bytes(query, "little")).count("1") for code in codes]
    assert hamming(as_words(code_rows(codes, 3)), as_words(code_rows([query], 3))).tolist() == expected
    words = rng.integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    plain = [bin(int(word)).count("1") for word in words]
    assert popcount_table(words).tolist() == plain
    if hasattr(np, "bitwise_count"):
        assert popcount_native(words).tolist() == plain


def test_nearest_takes_the_smallest_distances_and_every_tie_at_the_cut_off():
    distances = np.array([5, 1, 3, 1, 0, 3, 3, 9], dtype=np.uint32)
    assert nearest(distances, 1).tolist() == [4]
    assert nearest(distances, 3).tolist() == [1, 3, 4]
    assert nearest(distances, 4).tolist() == [1, 2, 3, 4, 5, 6]  # all three 3s
    assert nearest(distances, 8).tolist() == list(range(8))
    assert nearest(np.zeros(100, dtype=np.uint32), 5) is None  # the codes tell nothing apart
    rng = np.random.default_rng(4)
    many = rng.integers(0, 385, 10_000).astype(np.uint32)
    picked = nearest(many, 300)
    assert len(picked) >= 300 and many[picked].max() <= np.sort(many)[299]


def test_embeddings_that_share_one_direction_are_still_told_apart(path):
    """Many models put every vector in one orthant (or near one shared direction): codes are taken
    around the collection's centre, not around zero, so they still differ between vectors."""
    rng = np.random.default_rng(12)
    vectors = np.abs(clustered(rng, SIZE, dim=64)) + 0.5
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Store(path) as store:
        fill(store, vectors)
        for i in range(0, SIZE, 150):
            assert numbers(store.search("docs", vectors[i].tolist(), limit=1)) == [i]
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        assert conn.fetchvalue("SELECT count(DISTINCT code) FROM vectors") > 0.9 * SIZE  # around zero: 1
    finally:
        conn.close()


def test_codes_that_cannot_tell_vectors_apart_fall_back_to_an_exact_scan(path):
    """Vectors that differ in two dimensions only have four codes among them: the search rescores
    every vector rather than an arbitrary few of the tied ones."""
    rng = np.random.default_rng(13)
    vectors = np.zeros((SIZE, 16), dtype=np.float32)
    vectors[:, :2] = rng.standard_normal((SIZE, 2))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = vectors[SIZE - 1] + np.float32(0.01)
    with Store(path) as store:
        fill(store, vectors)
        hits = store.search("docs", query.tolist(), limit=5)
    cosine = vectors @ (query / np.linalg.norm(query))
    assert [hit.score for hit in hits] == pytest.approx(np.sort(cosine)[::-1][:5].tolist(), abs=1e-5)


def test_a_file_from_before_migration_3_has_its_vec0_vectors_moved(path):
    """Older edgellm kept each collection's vectors in a vec0 table vec_<id>: build such a file by hand."""
    rng = np.random.default_rng(9)
    vectors = clustered(rng, 1500)
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        apply_migrations(conn, MIGRATIONS[:2])
        with conn.transaction():
            conn.execute("INSERT INTO collections (id, name, model, dimension, created_at) VALUES (1, 'docs', ?, ?, 0)",
                         (MODEL, DIM))
            conn.execute(f"CREATE VIRTUAL TABLE vec_1 USING vec0(embedding float[{DIM}] distance_metric=cosine)")
            conn.execute("INSERT INTO files (id, filename, purpose, bytes, size, content_hash, created_at)"
                         " VALUES ('file-1', 'old.md', 'assistants', x'00', 1, 'h', 0)")
            conn.execute("INSERT INTO documents (id, collection_id, file_id, source, content_hash, created_at)"
                         " VALUES (1, 1, 'file-1', 'old.md', 'h', 0)")
            conn.executemany("INSERT INTO chunks (id, document_id, ordinal, text) VALUES (?, 1, ?, ?)",
                             [(i + 1, i, f"chunk {i}") for i in range(len(vectors))])
            conn.executemany("INSERT INTO vec_1 (rowid, embedding) VALUES (?, ?)",
                             [(i + 1, to_blob(v)) for i, v in enumerate(vectors)])
            # A vector whose chunk is gone (a damaged file): left behind, not a failed upgrade.
            conn.execute("INSERT INTO vec_1 (rowid, embedding) VALUES (99999, ?)", (to_blob(vectors[0]),))
    finally:
        conn.close()
    with Store(path) as store:
        assert store.applied_migrations == [3]
        for i in (0, 777, 1499):
            assert numbers(store.search("docs", vectors[i].tolist(), limit=1)) == [i]
        ingest(store, "new.md", vectors[:1], 5000)  # the moved collection takes new documents
        assert sorted(numbers(store.search("docs", vectors[0].tolist(), limit=2))) == [0, 5000]
    conn = db.connect(os.fspath(path), busy_timeout_ms=1000)
    try:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name GLOB 'vec_[0-9]*'") == []
        assert conn.fetchvalue("SELECT count(*) FROM vectors") == 1501
        assert conn.execute("PRAGMA integrity_check") == [("ok",)]
    finally:
        conn.close()
