"""The /v1/files shapes: a file object, and listing with OpenAI's paging (``after``, ``limit``,
``order``, ``purpose``), so that SDKs that page through the list stop at its end."""

from __future__ import annotations

from frontend import validation as v
from frontend.errors import bad_request
from store import FileRecord

LIST_QUERY = {"after", "limit", "order", "purpose"}
MAX_LIST_LIMIT = 10_000  # OpenAI's largest page


def file_object(record: FileRecord) -> dict:
    return {"id": record.id, "object": "file", "bytes": record.size, "created_at": record.created_at,
            "filename": record.filename, "purpose": record.purpose}


def file_list(records: list[FileRecord], query: dict[str, str]) -> dict:
    """One page of ``records`` (oldest first, as the store lists them) as the query asks."""
    unknown = sorted(set(query) - LIST_QUERY)
    if unknown:
        raise bad_request(f"unknown query parameter '{unknown[0]}'; GET /v1/files takes "
                          f"{', '.join(sorted(LIST_QUERY))}", unknown[0])
    limit = query.get("limit", str(MAX_LIST_LIMIT))
    if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIST_LIMIT:
        raise bad_request(f"'limit' must be an integer from 1 to {MAX_LIST_LIMIT}", "limit")
    order = v.string(query, "order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("'order' must be 'asc' or 'desc'", "order")
    if "purpose" in query:
        records = [r for r in records if r.purpose == query["purpose"]]
    if order == "desc":
        records = records[::-1]
    if "after" in query:
        ids = [r.id for r in records]
        if query["after"] not in ids:
            raise bad_request(f"'after' must be the id of a listed file; no file {query['after']!r}", "after")
        records = records[ids.index(query["after"]) + 1:]
    page = records[:int(limit)]
    return {"object": "list", "data": [file_object(r) for r in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
            "has_more": len(records) > len(page)}
