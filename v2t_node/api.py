"""The HTTP JSON API (aiohttp).

Every error is ``{"error": {"code", "message"}}`` with a stable code and the matching status. Handlers only
translate HTTP to calls on the node's components; the work happens in ``scheduler``.
"""

import asyncio
import hmac
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aiohttp
import msgspec
from aiohttp import web
from prometheus_async.aio import time as timed
from redis.exceptions import RedisError

from cache.errors import ObjectNotFound
from cache.s3 import S3Store
from cache.store import file_chunks
from peers.signing import check_token
from scheduler.job import JOB_ID, Job
from transcoder.formats import CONTENT_TYPES, FORMATS, render
from transcoder.transcript import Transcript

from .errors import (
    BadRequest,
    JoinUnavailable,
    SourceNotFound,
    Unauthorized,
    UnsupportedMediaType,
    UnsupportedSource,
)

if TYPE_CHECKING:
    from .app import Node

log = logging.getLogger(__name__)

NODE: web.AppKey["Node"] = web.AppKey("node")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STATES = ("queued", "running", "completed", "failed", "cancelled")
CHUNK = 1 << 16
#: Paths open without the bearer token: probes, and the join request (authenticated by the cluster secret).
PUBLIC = frozenset({"/v1/health", "/v1/cluster/join"})
#: The header carrying a peer token (HMAC under the cluster secret) on requests between nodes.
PEER_TOKEN_HEADER = "X-V2T-Peer-Token"


class Submission(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A JSON submission (``POST /v1/jobs`` with ``application/json``)."""

    source: str
    model: str | None = None
    language: str | None = None
    id: str | None = None


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def job_response(job: Job, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(job), status=status, content_type="application/json")


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turns every exception into a JSON error; the node keeps serving whatever a request did."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        name = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(e.status, "http_error")
        return error_response(e.status, name, e.reason if e.status != 404 else f"no route {request.path}")
    except (RedisError, OSError) as e:
        # Redis (or a local disk) failing under us: the request may succeed later; say so, loudly once per kind.
        log.warning("%s %s: %s: %s", request.method, request.path, type(e).__name__, e)
        return error_response(503, "queue_unavailable" if isinstance(e, RedisError) else "storage_error",
                              f"temporarily unavailable ({type(e).__name__}: {e}); retry later")
    except Exception as e:  # noqa: BLE001
        code, status = getattr(e, "code", None), getattr(e, "status", None)
        if isinstance(code, str) and isinstance(status, int):
            if status >= 500:
                log.warning("%s %s: %s", request.method, request.path, e)
            return error_response(status, code, str(e))
        if isinstance(code, str):  # transcoder/model errors carry a code but no status: bad input
            return error_response(400, code, str(e))
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "internal_error", f"{type(e).__name__}: {e}")


def auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                raise Unauthorized("missing or wrong bearer token (Authorization: Bearer <api.token>)")
        return await handler(request)

    return auth


# -- submission --------------------------------------------------------------------------------------------------

async def submit(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return await timed(node.metrics.submit_seconds, _submit(request, node))


async def _submit(request: web.Request, node: "Node") -> web.Response:
    ctype = request.content_type
    idem: str | None = request.headers.get("Idempotency-Key") or None
    if ctype == "multipart/form-data":
        job, created = await _submit_multipart(request, node, idem)
    elif ctype == "application/json":
        job, created = await _submit_json(request, node, idem)
    else:
        raise UnsupportedMediaType(
            f"Content-Type {ctype or '(none)'} is not accepted: send multipart/form-data with a 'file' part, "
            "or application/json with a 'source' URL"
        )
    if created:
        node.metrics.submitted.labels("yes" if job.cached else "no").inc()
    return job_response(job, 202 if created and not job.terminal else 200)


async def _options(
    node: "Node", model: str | None, language: str | None, job_id: str | None
) -> tuple[str, str, str | None]:
    model = model or node.config.models.default
    await asyncio.to_thread(node.check_model, model)  # may convert a bundled model on first use
    language = (language or ("en" if model.endswith(".en") else "auto")).lower()
    if not language.isalpha() or len(language) > 8:
        raise BadRequest(f"language {language!r} is not a language code (e.g. en, de, auto)")
    if model.endswith(".en") and language not in ("en", "auto"):
        raise BadRequest(f"model {model} is English-only; language {language!r} needs a multilingual model")
    if job_id is not None and not JOB_ID.match(job_id):
        raise BadRequest(f"bad job id {job_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit")
    return model, "en" if model.endswith(".en") else language, job_id


async def _submit_multipart(request: web.Request, node: "Node", idem: str | None) -> tuple[Job, bool]:
    reader = await request.multipart()
    form: dict[str, str] = {}
    upload: tuple[Job, bool] | None = None
    while (part := await reader.next()) is not None:
        if not isinstance(part, aiohttp.BodyPartReader):
            raise BadRequest("nested multipart bodies are not supported")
        if part.name == "file":
            if upload is not None:
                raise BadRequest("one 'file' part per request; submit several files as several jobs")
            # Fields must come before the file so the upload can be streamed straight to its job.
            model, language, job_id = await _options(node, form.get("model"), form.get("language"), form.get("id"))
            upload = await node.intake.submit(
                _part_chunks(part), filename=part.filename or "upload", model=model, language=language,
                job_id=job_id, idempotency_key=idem,
            )
        elif part.name in ("model", "language", "id"):
            if upload is not None:
                raise BadRequest(f"form field {part.name!r} must come before the 'file' part")
            form[part.name] = (await part.text()).strip()
        else:
            raise BadRequest(f"unknown form field {part.name!r}: expected file, model, language, id")
    if upload is None:
        raise BadRequest("no 'file' part in the multipart body")
    return upload


async def _part_chunks(part: aiohttp.BodyPartReader) -> AsyncIterator[bytes]:
    while chunk := await part.read_chunk(CHUNK):
        yield chunk


async def _submit_json(request: web.Request, node: "Node", idem: str | None) -> tuple[Job, bool]:
    try:
        body = msgspec.json.decode(await request.read(), type=Submission)
    except msgspec.ValidationError as e:
        raise BadRequest(f"invalid JSON submission: {e}") from None
    except msgspec.DecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    model, language, job_id = await _options(node, body.model, body.language, body.id)
    url = urlsplit(body.source)
    if url.scheme == "file":
        if not node.config.api.allow_file_sources:
            raise UnsupportedSource("file:// sources are disabled on this node (api.allow_file_sources)")
        path = Path(unquote(url.path))
        if not path.is_file():
            raise SourceNotFound(f"{body.source}: no such file on node {node.node_id}")
        if not os.access(path, os.R_OK):
            raise SourceNotFound(f"{body.source}: not readable by node {node.node_id} (permissions)")
        chunks, filename = file_chunks(path, 1 << 20), path.name
    elif url.scheme == "s3":
        if not isinstance(node.store, S3Store):
            raise UnsupportedSource("s3:// sources need an S3 object store on this node (storage.url)")
        chunks, filename = _s3_chunks(node.store, body.source), Path(url.path).name or "object"
    elif url.scheme in ("http", "https"):
        chunks, filename = _http_chunks(node, body.source), Path(url.path).name or "download"
    else:
        raise UnsupportedSource(
            f"source scheme {url.scheme or '(none)'!r} is not supported: use file://, s3:// or http(s)://"
        )
    return await node.intake.submit(chunks, filename=filename, model=model, language=language, job_id=job_id,
                                    idempotency_key=idem)


async def _s3_chunks(store: S3Store, url: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in store.stream_url(url):
            yield chunk
    except ObjectNotFound as e:
        raise SourceNotFound(str(e)) from None


async def _http_chunks(node: "Node", url: str) -> AsyncIterator[bytes]:
    try:
        async with node.http().get(url) as resp:
            if resp.status != 200:
                raise SourceNotFound(f"{url}: HTTP {resp.status}")
            async for chunk in resp.content.iter_chunked(1 << 20):
                yield chunk
    except aiohttp.ClientError as e:
        raise SourceNotFound(f"{url}: {e}") from None


# -- jobs ----------------------------------------------------------------------------------------------------------

async def get_job(request: web.Request) -> web.Response:
    return job_response(await request.app[NODE].queue.get(request.match_info["id"]))


async def list_jobs(request: web.Request) -> web.Response:
    state = request.query.get("state") or None
    if state is not None and state not in STATES:
        raise BadRequest(f"state must be one of {', '.join(STATES)}")
    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise BadRequest("limit must be an integer") from None
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must be between 1 and 1000")
    jobs = await request.app[NODE].queue.list(state, limit)
    return web.Response(body=msgspec.json.encode({"jobs": jobs}), content_type="application/json")


async def cancel_job(request: web.Request) -> web.Response:
    job = await request.app[NODE].queue.cancel(request.match_info["id"])
    return job_response(job, 200 if job.terminal else 202)


async def transcript(request: web.Request) -> web.Response:
    node = request.app[NODE]
    fmt = request.query.get("format", "json")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}")
    key = await node.queue.transcript_key(request.match_info["id"])
    data = await node.store.get_bytes(key)
    if fmt == "json":
        body: bytes | str = data
    else:
        body = render(msgspec.json.decode(data, type=Transcript), fmt)
    resp = web.Response(body=body.encode() if isinstance(body, str) else body)
    ctype, _, charset = CONTENT_TYPES[fmt].partition(";")
    resp.content_type = ctype.strip()
    if charset:
        resp.charset = charset.split("=")[1].strip()
    return resp


# -- node ----------------------------------------------------------------------------------------------------------

async def health(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body = await node.health()
    return web.json_response(body, status=200 if body["status"] == "ok" else 503)


async def peers(request: web.Request) -> web.Response:
    node = request.app[NODE]
    body: dict[str, Any] = {"cluster": node.config.peers.cluster, "node": node.node_id, "peers": await node.peers()}
    if node.discovery is not None:
        body["rejected"] = dict(node.discovery.rejected)
    return web.json_response(body)


async def cluster_join(request: web.Request) -> web.Response:
    """The cluster's shared endpoints, for a node that has only the cluster secret (zero-config join).

    Authenticated by a token signed with the cluster secret; never advertised. S3 credentials are not handed
    out: the joining node takes them from its own AWS variables or profile.
    """
    node = request.app[NODE]
    secret = node.config.cluster_secret
    peer = check_token(secret, request.headers.get(PEER_TOKEN_HEADER, "")) if secret else None
    if peer is None:
        raise Unauthorized(f"a valid {PEER_TOKEN_HEADER} signed with the cluster secret is required")
    c = node.config
    redis_url = c.redis.url
    if not redis_url or urlsplit(redis_url).hostname in (None, "127.0.0.1", "localhost", "::1"):
        raise JoinUnavailable(f"node {node.node_id} uses a Redis only it can reach ({redis_url or 'embedded'}); "
                              "join a node started with a shared --redis-url")
    log.info("node %s joins cluster %s through us", peer, c.peers.cluster)
    return web.json_response({
        "cluster": c.peers.cluster, "node": node.node_id, "redis_url": redis_url, "redis_prefix": c.redis.prefix,
        "storage": {"url": c.storage.url, "endpoint": c.storage.endpoint, "region": c.storage.region},
    })


def make_app(node: "Node") -> web.Application:
    """The API application of ``node``."""
    middlewares = [errors_middleware]
    if node.config.api_token:
        middlewares.append(auth_middleware(node.config.api_token))
    app = web.Application(middlewares=middlewares, client_max_size=1 << 20)
    app[NODE] = node
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{id}", get_job)
    app.router.add_delete("/v1/jobs/{id}", cancel_job)
    app.router.add_get("/v1/jobs/{id}/transcript", transcript)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/peers", peers)
    app.router.add_get("/v1/cluster/join", cluster_join)
    app.router.add_get("/metrics", node.metrics.handler(node))
    return app

