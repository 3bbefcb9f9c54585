"""Stored responses (POST /v1/responses): one row each, read back alone or as a conversation chain."""

from __future__ import annotations

import json

from .db import Connection
from .errors import ConversationTooLong, ResponseNotFound
from .records import StoredResponse

RESPONSE_COLUMNS = "id, previous_response_id, model, input_items, response, created_at"


def insert(conn: Connection, record: StoredResponse) -> None:
    conn.execute(
        f"INSERT INTO responses ({RESPONSE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
        (record.id, record.previous_response_id, record.model, _dumps(record.input_items),
         _dumps(record.response), record.created_at),
    )


def find(conn: Connection, response_id: str) -> StoredResponse | None:
    row = conn.mapping(f"SELECT {RESPONSE_COLUMNS} FROM responses WHERE id = ?", (response_id,))
    return None if row is None else _record(row)


def chain(conn: Connection, response_id: str, max_responses: int, max_chars: int) -> list[StoredResponse]:
    """The response and those before it through previous_response_id, oldest first.

    The chain ends at a response with no predecessor or whose predecessor was deleted. Its size
    is measured in SQL before any row is read into memory: more than ``max_responses`` responses,
    or more than ``max_chars`` characters of stored JSON, is ConversationTooLong."""
    links = conn.execute(
        "WITH RECURSIVE link(id, previous, depth, size) AS ("
        " SELECT id, previous_response_id, 1, length(input_items) + length(response) FROM responses WHERE id = ?"
        " UNION ALL"
        " SELECT r.id, r.previous_response_id, link.depth + 1, length(r.input_items) + length(r.response)"
        " FROM responses r JOIN link ON r.id = link.previous WHERE link.depth <= ?)"
        " SELECT id, depth, size FROM link ORDER BY depth",
        (response_id, max_responses),
    )
    if not links:
        raise ResponseNotFound(f"no stored response with id {response_id!r}", "previous_response_id")
    if len(links) > max_responses:
        raise ConversationTooLong(f"the conversation through {response_id!r} holds more than {max_responses} "
                                  "responses: start a new one (send the turns you need as input)")
    size = sum(row[2] for row in links)
    if size > max_chars:
        raise ConversationTooLong(f"the conversation through {response_id!r} holds {size} characters of stored "
                                  f"items, over the {max_chars} this model's context allows: start a new one")
    records = [find(conn, row[0]) for row in reversed(links)]
    return [r for r in records if r is not None]


def delete(conn: Connection, response_id: str) -> None:
    """Delete a response (inside the caller's transaction): ResponseNotFound if there is none."""
    if conn.fetchone("SELECT 1 FROM responses WHERE id = ?", (response_id,)) is None:
        raise ResponseNotFound(f"no stored response with id {response_id!r}")
    conn.execute("DELETE FROM responses WHERE id = ?", (response_id,))


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _record(row: dict) -> StoredResponse:
    return StoredResponse(**{**row, "input_items": json.loads(row["input_items"]),
                             "response": json.loads(row["response"])})
