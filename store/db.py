"""One SQLite connection with sqlite-vec loaded, the same for either binding.

The standard library's ``sqlite3`` is preferred, but many Python builds (this
project's own included) are compiled without extension loading, so ``apsw``
is the fallback. Both drive the same SQLite C API; the :class:`Connection`
adapter hides the few differences (how they open, load extensions and which
exception class they raise).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .errors import DatabaseError, SqliteVecUnavailable

BINDINGS = ("sqlite3", "apsw")

Row = tuple[Any, ...]
Mapping = dict[str, Any]


class Connection:
    """The handful of operations the store needs from a database connection.

    Statements run in autocommit mode unless wrapped in :meth:`transaction`.
    Errors from the underlying binding are re-raised as :class:`DatabaseError`.
    """

    def __init__(self, raw: Any, binding: str, error_types: tuple[type[BaseException], ...]):
        self._raw = raw
        self._error_types = error_types
        self._column_names = _COLUMN_NAMES[binding]
        self._in_transaction = False
        self.binding = binding

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement and return all its rows."""
        try:
            return self._raw.execute(sql, tuple(params)).fetchall()
        except self._error_types as exc:
            raise DatabaseError(str(exc)) from exc

    def batches(self, sql: str, params: Sequence[Any] = (), size: int = 10_000) -> Iterator[list[Row]]:
        """Run one query and yield its rows ``size`` at a time, so a large result never sits in
        memory whole. Other statements may run on this connection between batches (migration 3
        writes while it reads); the query's cursor stays open until the iteration ends."""
        try:
            cursor = iter(self._raw.execute(sql, tuple(params)))
            while True:
                rows = list(itertools.islice(cursor, size))
                if not rows:
                    return
                yield rows
        except self._error_types as exc:
            raise DatabaseError(str(exc)) from exc

    def mappings(self, sql: str, params: Sequence[Any] = ()) -> list[Mapping]:
        """Run one query and return its rows as ``{column name: value}``.

        Names are the SELECT's result names (``AS`` aliases included), so a
        record built with ``Record(**row)`` gets each value by name and can
        never be shifted by a reordered column list.
        """
        try:
            cursor = self._raw.execute(sql, tuple(params))
            names = self._column_names(cursor)
            if len(set(names)) != len(names):
                raise ValueError(f"duplicate result column names {names}: alias them apart")
            return [dict(zip(names, row)) for row in cursor.fetchall()]
        except self._error_types as exc:
            raise DatabaseError(str(exc)) from exc

    def mapping(self, sql: str, params: Sequence[Any] = ()) -> Mapping | None:
        rows = self.mappings(sql, params)
        return rows[0] if rows else None

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        try:
            self._raw.executemany(sql, [tuple(row) for row in rows])
        except self._error_types as exc:
            raise DatabaseError(str(exc)) from exc

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.execute(sql, params)
        return rows[0] if rows else None

    def fetchvalue(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """First column of the first row, or None when there is no row."""
        row = self.fetchone(sql, params)
        return row[0] if row else None

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Connection]:
        """Run the block as one transaction: all of it commits or none.

        A write transaction starts with ``BEGIN IMMEDIATE``, taking the write
        lock up front so that two writers wait on the busy timeout instead of
        failing when a read lock is upgraded. ``write=False`` gives a read
        snapshot that does not block writers (WAL). Not re-entrant on purpose:
        nesting would hide which block owns the commit.
        """
        if self._in_transaction:
            raise RuntimeError("transaction() is not re-entrant")
        self.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        self._in_transaction = True
        try:
            yield self
            self.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        finally:
            self._in_transaction = False

    def _rollback(self) -> None:
        if self._raw.in_transaction:
            self.execute("ROLLBACK")

    def close(self) -> None:
        self._raw.close()


def connect(path: str, *, busy_timeout_ms: int, binding: str | None = None) -> Connection:
    """Open ``path`` with sqlite-vec loaded, WAL on and foreign keys enforced.

    With ``binding=None`` the stdlib ``sqlite3`` is tried first and ``apsw``
    second; pass the binding a previous call returned to skip the probing.
    """
    loadable = _sqlite_vec_path()
    candidates = BINDINGS if binding is None else (binding,)
    failures = []
    for name in candidates:
        try:
            conn = _OPENERS[name](path, loadable)
        except _ExtensionUnavailable as exc:
            failures.append(f"{name}: {exc}")
            continue
        try:
            _configure(conn, busy_timeout_ms)
        except BaseException:
            conn.close()
            raise
        return conn
    raise SqliteVecUnavailable(
        "cannot load the sqlite-vec extension ("
        + "; ".join(failures)
        + "). Python's built-in sqlite3 module often cannot load extensions; "
        "install the apsw binding with: pip install apsw"
    )


class _ExtensionUnavailable(Exception):
    """This binding is missing or cannot load sqlite-vec; try the next one."""


def _sqlite_vec_path() -> str:
    """The loadable extension inside the sqlite_vec package, found without importing the package:
    its ``__init__`` imports numpy for a helper the store does not use, which would cost a front end
    that never searches about 12 MB of memory."""
    spec = importlib.util.find_spec("sqlite_vec")
    if spec is None or not spec.submodule_search_locations:
        raise SqliteVecUnavailable(
            "the sqlite-vec package is not installed; install it with: pip install sqlite-vec"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "vec0")


def _open_sqlite3(path: str, loadable: str) -> Connection:
    if not hasattr(sqlite3.Connection, "enable_load_extension"):
        raise _ExtensionUnavailable("this Python was built without extension loading")
    try:
        # Autocommit (isolation_level=None): transactions are explicit, see
        # Connection.transaction. The pool hands a connection to one thread at
        # a time, which is what check_same_thread would otherwise enforce.
        raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise DatabaseError(f"cannot open {path}: {exc}") from exc
    try:
        raw.enable_load_extension(True)
        raw.load_extension(loadable)
        raw.enable_load_extension(False)
    except (sqlite3.Error, AttributeError) as exc:
        raw.close()
        raise _ExtensionUnavailable(str(exc)) from exc
    return Connection(raw, "sqlite3", (sqlite3.Error,))


def _open_apsw(path: str, loadable: str) -> Connection:
    try:
        import apsw
    except ImportError as exc:
        raise _ExtensionUnavailable("apsw is not installed") from exc
    try:
        raw = apsw.Connection(path)
    except apsw.Error as exc:
        raise DatabaseError(f"cannot open {path}: {exc}") from exc
    try:
        raw.enable_load_extension(True)
        raw.load_extension(loadable)
        raw.enable_load_extension(False)
    except apsw.Error as exc:
        raw.close()
        raise _ExtensionUnavailable(str(exc)) from exc
    return Connection(raw, "apsw", (apsw.Error,))


_OPENERS = {"sqlite3": _open_sqlite3, "apsw": _open_apsw}


def _sqlite3_column_names(cursor: Any) -> list[str]:
    return [column[0] for column in cursor.description or ()]


def _apsw_column_names(cursor: Any) -> list[str]:
    """apsw describes only a statement still running: one that returned no row
    is already complete, and then there are no rows to name."""
    import apsw

    try:
        return [name for name, _ in cursor.getdescription()]
    except apsw.ExecutionCompleteError:
        return []


_COLUMN_NAMES: dict[str, Callable[[Any], list[str]]] = {
    "sqlite3": _sqlite3_column_names,
    "apsw": _apsw_column_names,
}


def _configure(conn: Connection, busy_timeout_ms: int) -> None:
    try:
        conn.execute("SELECT vec_version()")
    except DatabaseError as exc:
        raise SqliteVecUnavailable(f"sqlite-vec loaded but vec_version() failed: {exc}") from exc
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA foreign_keys = ON")
