"""Sign-bit codes of vectors, and the in-memory index that picks search candidates with them.

A code keeps one bit per dimension (is the value above the collection's centre?), packed into
bytes: 48 bytes for a 384-dim vector instead of 1536. The Hamming distance between two codes
tracks the angle between the vectors well enough to pick a few hundred candidates out of 100k,
which ``vector_table.py`` then rescores exactly.

The centre matters: many embedding models put every vector near one common direction (all
components of one sign, or a large shared offset), and signs taken around zero would then
hardly differ between vectors. Each collection's centre is the mean of the first vectors it
stored (``vector_table.insert``) and never changes, so every code of a collection is taken
around the same point.

This is the only module that needs numpy; the store imports it on first use, so a front end
that never searches or ingests does not pay for numpy's memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import vector_table
from .db import Connection

# Memory the index may hold for all collections together (56 bytes a chunk at 384 dims: 1M chunks fit).
DEFAULT_MAX_BYTES = 96 * 2**20
# Counted per cached collection besides its arrays, so that many tiny collections are bounded too.
ENTRY_OVERHEAD = 512
# When more codes tie at the cut-off than this many times the candidates wanted, the codes cannot
# tell the collection's vectors apart: the search rescores every vector instead.
MAX_CANDIDATES_FACTOR = 8


def centre_of(blobs: Sequence[bytes]) -> bytes:
    """The mean of float32 blobs (all of one length) as a float32 blob; rows that are not all finite
    are left out (zeros when none is)."""
    values = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)
    finite = values[np.isfinite(values).all(axis=1)]
    mean = finite.mean(axis=0, dtype=np.float64) if len(finite) else np.zeros(values.shape[1])
    return mean.astype(np.float32).tobytes()


def sign_codes(blobs: Sequence[bytes], centre: bytes) -> list[bytes]:
    """The code of each float32 blob: bit i is set when value i is above the centre's value i."""
    if not blobs:
        return []
    values = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)
    packed = np.packbits(values > np.frombuffer(centre, dtype=np.float32), axis=1, bitorder="little")
    return [row.tobytes() for row in packed]


def candidate_count(size: int, limit: int) -> int:
    """How many candidates to rescore for ``limit`` hits out of ``size`` vectors.

    Generous, because rescoring is cheap next to the scan: a fixed floor that
    covers small collections exactly, a multiple of the hits asked for, and
    a fixed share of large collections (the share of Hamming-near impostors
    grows with the collection). Measured in ``scripts/bench_retrieval.py``.
    """
    return min(size, max(1024, 32 * limit, size // 500))


def popcount_table(words: np.ndarray) -> np.ndarray:
    """Set bits in each uint64 of a 1-D array, through a byte table (numpy before 2.0)."""
    return _BITS_IN_BYTE[words.view(np.uint8)].reshape(len(words), 8).sum(axis=1, dtype=np.uint8)


def popcount_native(words: np.ndarray) -> np.ndarray:
    """Set bits in each uint64 of a 1-D array, with numpy 2's popcount."""
    return np.bitwise_count(words)


_BITS_IN_BYTE = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.uint8)
popcount = popcount_native if hasattr(np, "bitwise_count") else popcount_table


def as_words(codes: np.ndarray) -> np.ndarray:
    """Codes (one row of bytes each), zero-padded to whole uint64 words, one column per code.

    Column-major, so that the scan below runs over long contiguous rows
    rather than summing a handful of words per code.
    """
    padded = codes
    if codes.shape[1] % 8:
        padded = np.zeros((len(codes), -(-codes.shape[1] // 8) * 8), dtype=np.uint8)
        padded[:, :codes.shape[1]] = codes
    return np.ascontiguousarray(np.ascontiguousarray(padded).view(np.uint64).T)


def code_rows(codes: Sequence[bytes], code_bytes: int) -> np.ndarray:
    return np.frombuffer(b"".join(codes), dtype=np.uint8).reshape(len(codes), code_bytes)


def hamming(words: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distance from each code (column) of ``words`` to ``query`` (a one-column ``as_words``)."""
    distances = np.zeros(words.shape[1], dtype=np.uint32)
    for row, query_word in zip(words, query[:, 0]):
        distances += popcount(np.bitwise_xor(row, query_word))
    return distances


def nearest(distances: np.ndarray, count: int) -> np.ndarray | None:
    """Indices of at least ``count`` of the smallest ``distances`` (small integers), in index order:
    every index below the cut-off and every one tied at it. None when the tie at the cut-off is so
    large (over MAX_CANDIDATES_FACTOR times ``count`` in all) that the distances say little.

    Distances are bounded by the code's bit count, so a histogram finds the cut-off in linear time
    (quicker than a general partition of 1M values).
    """
    cumulative = np.cumsum(np.bincount(distances))
    cutoff = int(np.searchsorted(cumulative, count))
    if cumulative[cutoff] > MAX_CANDIDATES_FACTOR * count:
        return None
    return np.flatnonzero(distances <= cutoff)


@dataclass(frozen=True)
class _Codes:
    """One collection's codes at one revision: column ``i`` of ``words`` is the code of chunk ``ids[i]``."""

    revision: int
    centre: bytes
    ids: np.ndarray  # int64
    words: np.ndarray  # uint64, see as_words

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.words.nbytes + len(self.centre) + ENTRY_OVERHEAD


class CodeIndex:
    """The codes of recently searched collections, kept in memory and checked against the
    collection's revision on every search, so a change committed by any connection or process is
    seen by the next search. One search at a time reads a collection's codes; the others wait for
    it. Least recently used collections are dropped beyond ``max_bytes``; a collection larger than
    that is read for each search instead of kept. Thread-safe.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self._max_bytes = max_bytes
        self._entries: OrderedDict[int, _Codes] = OrderedDict()
        self._total = 0
        self._lock = threading.Lock()
        self._loading: dict[int, threading.Lock] = {}

    def candidates(self, conn: Connection, collection_id: int, code_bytes: int, query_blob: bytes,
                   limit: int) -> list[int] | None:
        """Ids of the chunks to rescore for the ``limit`` nearest to the query, as seen by ``conn``'s
        read transaction; None when every chunk of the collection should be rescored."""
        codes = self._codes(conn, collection_id, code_bytes)
        count = candidate_count(len(codes.ids), limit)
        if count >= len(codes.ids):
            return None
        query = as_words(code_rows(sign_codes([query_blob], codes.centre), code_bytes))
        picked = nearest(hamming(codes.words, query), count)
        return None if picked is None else codes.ids[picked].tolist()

    def _codes(self, conn: Connection, collection_id: int, code_bytes: int) -> _Codes:
        revision = vector_table.revision(conn, collection_id)
        cached = self._cached(collection_id, revision)
        if cached is not None:
            return cached
        with self._lock:
            loading = self._loading.setdefault(collection_id, threading.Lock())
        with loading:  # one reader per collection; the others find its result
            cached = self._cached(collection_id, revision)
            if cached is not None:
                return cached
            loaded = self._load(conn, collection_id, code_bytes, revision)
            self._keep(collection_id, loaded)
        return loaded

    def _cached(self, collection_id: int, revision: int) -> _Codes | None:
        with self._lock:
            cached = self._entries.get(collection_id)
            if cached is None or cached.revision != revision:
                return None
            self._entries.move_to_end(collection_id)
            return cached

    @staticmethod
    def _load(conn: Connection, collection_id: int, code_bytes: int, revision: int) -> _Codes:
        """Read the codes in batches into preallocated arrays (never a Python object per chunk for all of them)."""
        size = vector_table.count(conn, collection_id)
        ids = np.empty(size, dtype=np.int64)
        codes = np.empty((size, code_bytes), dtype=np.uint8)
        filled = 0
        for rows in vector_table.code_batches(conn, collection_id):
            ids[filled:filled + len(rows)] = [row[0] for row in rows]
            codes[filled:filled + len(rows)] = code_rows([row[1] for row in rows], code_bytes)
            filled += len(rows)
        centre = vector_table.centre(conn, collection_id) or b""
        return _Codes(revision, centre, ids, as_words(codes))

    def _keep(self, collection_id: int, loaded: _Codes) -> None:
        with self._lock:
            old = self._entries.get(collection_id)
            if old is not None and old.revision > loaded.revision:
                return  # a newer snapshot was cached meanwhile: keep it
            if old is not None:
                self._total -= self._entries.pop(collection_id).nbytes
            if loaded.nbytes > self._max_bytes:
                return
            self._entries[collection_id] = loaded
            self._total += loaded.nbytes
            while self._total > self._max_bytes:
                self._total -= self._entries.popitem(last=False)[1].nbytes
