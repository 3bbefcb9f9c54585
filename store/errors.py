"""Exceptions raised by the store.

Every error carries a stable, machine-readable ``code`` so the API layer can
map it to an OpenAI-style error body without parsing messages, and a
``param`` for that body: the request field to blame, or None when none is.
"""


class StoreError(Exception):
    """Base class for every error the store raises on purpose."""

    code = "store_error"
    param: str | None = None


class SqliteVecUnavailable(StoreError):
    """No SQLite binding on this machine could load the sqlite-vec extension."""

    code = "sqlite_vec_unavailable"


class DatabaseError(StoreError):
    """SQLite itself reported an error (locked, corrupt, disk full...)."""

    code = "database_error"


class SchemaTooNew(StoreError):
    """The file was migrated by a newer edgellm than this one."""

    code = "schema_too_new"


class StoreClosed(StoreError):
    """The store was used after ``close()``."""

    code = "store_closed"


class InvalidCollectionName(StoreError):
    code = "invalid_collection_name"
    param = "collection"


class CollectionNotFound(StoreError):
    code = "collection_not_found"
    param = "collection"


class CollectionConflict(StoreError):
    """A collection exists under that name, built with another model."""

    code = "collection_conflict"
    param = "collection"


class FileNotFound(StoreError):
    """No uploaded file has that id.

    ``param`` is "id", as OpenAI's API answers for an unknown file, and the
    name of the field that carries a file id in a request body (/v1/chunks).
    """

    code = "file_not_found"
    param = "id"


class DimensionMismatch(StoreError):
    """A vector's length differs from its collection's dimension.

    No ``param``: the vectors come from the embedding model, not the request.
    """

    code = "dimension_mismatch"


class ResponseNotFound(StoreError):
    """No stored response has that id (never stored, store: false, or deleted)."""

    code = "response_not_found"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ConversationTooLong(StoreError):
    """A previous_response_id whose chain of stored responses is over the bounds it may be read with."""

    code = "conversation_too_long"
    param = "previous_response_id"
