"""The node's own exceptions (configuration, startup, API input). Each has a stable ``code`` and HTTP status."""


class V2TError(Exception):
    """Base class of the node's errors."""

    code = "error"
    status = 500


class ConfigError(V2TError):
    """A configuration value is missing, unknown or invalid; the message names the key."""

    code = "bad_config"


class StartupError(V2TError):
    """A component could not start (embedded server, port in use, pool)."""

    code = "startup_failed"


class BadRequest(V2TError):
    """The request is malformed; the message says which part."""

    code = "bad_request"
    status = 400


class Unauthorized(V2TError):
    """A bearer token is required and was missing or wrong."""

    code = "unauthorized"
    status = 401


class PayloadTooLarge(V2TError):
    """The upload exceeds ``api.max_upload_bytes``."""

    code = "payload_too_large"
    status = 413


class UnsupportedMediaType(V2TError):
    """The request body is neither multipart/form-data nor JSON."""

    code = "unsupported_media_type"
    status = 415


class UnsupportedSource(BadRequest):
    """A ``source`` URL whose scheme this node cannot read."""

    code = "unsupported_source"


class SourceNotFound(BadRequest):
    """A ``source`` that does not exist or cannot be read."""

    code = "source_not_found"


class JoinUnavailable(V2TError):
    """This node cannot hand out the cluster's endpoints (its Redis is private to it)."""

    code = "join_unavailable"
    status = 409


class JoinFailed(StartupError):
    """A node with only a cluster secret found no peer that would let it join."""

    code = "join_failed"
