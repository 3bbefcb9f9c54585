"""Sign-bit codes of vectors, and the in-memory index that picks search candidates with them.

A code keeps one bit per dimension (is the value positive?), packed into
bytes: 48 bytes for a 384-dim vector instead of 1536. The Hamming distance
between two codes tracks the angle between the vectors well enough to pick a
few hundred candidates out of 100k, which ``vector_table.py`` then rescores exactly.

This is the only module that needs numpy; the store imports it on first use,
so a front end that never searches or ingests does not pay for numpy's memory.
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


def sign_codes(blobs: Sequence[bytes]) -> list[bytes]:
    """The code of each float32 blob (all of one length): bit i is set when value i is positive."""
    if not blobs:
        return []
    values = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), -1)
    packed = np.packbits(values > 0, axis=1, bitorder="little")
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


@dataclass(frozen=True)
class _Codes:
    """One collection's codes at one revision: ``words[i]`` is the code of chunk ``ids[i]``."""

    revision: int
    ids: np.ndarray  # int64
    words: np.ndarray  # uint64, one column per chunk (see as_words)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.words.nbytes


def as_words(codes: Sequence[bytes], code_bytes: int) -> np.ndarray:
    """Codes of ``code_bytes`` bytes each, zero-padded to whole uint64 words, one column per code.

    Column-major, so that the scan below runs over long contiguous rows
    rather than summing a handful of words per code.
    """
    width = -(-code_bytes // 8) * 8
    padded = np.zeros((len(codes), width), dtype=np.uint8)
    if codes:
        padded[:, :code_bytes] = np.frombuffer(b"".join(codes), dtype=np.uint8).reshape(len(codes), code_bytes)
    return np.ascontiguousarray(padded.view(np.uint64).T)


def hamming(words: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distance from each code (column) of ``words`` to ``query`` (a one-column ``as_words``)."""
    distances = np.zeros(words.shape[1], dtype=np.uint16)
    for row, query_word in zip(words, query[:, 0]):
        distances += popcount(np.bitwise_xor(row, query_word))
    return distances


def nearest(distances: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` of the smallest ``distances`` (small integers), in index order.

    Distances are bounded by the code's bit count, so a histogram finds the
    cut-off in linear time (quicker than a general partition of 1M values);
    ties at the cut-off are taken in index order.
    """
    cumulative = np.cumsum(np.bincount(distances))
    cutoff = int(np.searchsorted(cumulative, count))
    below = np.flatnonzero(distances < cutoff)
    at = np.flatnonzero(distances == cutoff)[:count - len(below)]
    return np.sort(np.concatenate([below, at]))


class CodeIndex:
    """The codes of recently searched collections, kept in memory and checked against the
    collection's revision on every search, so a change committed by any connection or process is
    seen by the next search. Least recently used collections are dropped beyond ``max_bytes``; a
    collection larger than that is read for each search instead of kept. Thread-safe.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self._max_bytes = max_bytes
        self._entries: OrderedDict[int, _Codes] = OrderedDict()
        self._lock = threading.Lock()

    def candidates(self, conn: Connection, collection_id: int, code_bytes: int, query_blob: bytes,
                   limit: int) -> list[int]:
        """Ids of the chunks to rescore for the ``limit`` nearest to the query, as seen by ``conn``'s
        read transaction."""
        codes = self._codes(conn, collection_id, code_bytes)
        count = candidate_count(len(codes.ids), limit)
        if count >= len(codes.ids):
            return codes.ids.tolist()
        query = as_words(sign_codes([query_blob]), code_bytes)
        return codes.ids[nearest(hamming(codes.words, query), count)].tolist()

    def _codes(self, conn: Connection, collection_id: int, code_bytes: int) -> _Codes:
        revision = vector_table.revision(conn, collection_id)
        with self._lock:
            cached = self._entries.get(collection_id)
            if cached is not None and cached.revision == revision:
                self._entries.move_to_end(collection_id)
                return cached
        ids, codes = vector_table.load_codes(conn, collection_id)
        loaded = _Codes(revision, np.array(ids, dtype=np.int64), as_words(codes, code_bytes))
        with self._lock:
            self._entries.pop(collection_id, None)
            if loaded.nbytes <= self._max_bytes:
                self._entries[collection_id] = loaded
                while sum(entry.nbytes for entry in self._entries.values()) > self._max_bytes:
                    self._entries.popitem(last=False)
        return loaded
