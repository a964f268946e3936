"""The object stores' exceptions; each has a stable ``code`` and the HTTP status the API answers with."""


class StoreError(Exception):
    """Base class: the object store failed (unreachable, refused, misconfigured)."""

    code = "storage_error"
    status = 503
    retryable = True


class ObjectNotFound(StoreError):
    """No object under that key."""

    code = "object_not_found"
    status = 404
    retryable = False


class InvalidKey(StoreError):
    """A key that would escape the store or is malformed."""

    code = "invalid_key"
    status = 400
    retryable = False
