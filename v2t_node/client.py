"""A small async client of the node's API, used by the CLI (and handy in scripts)."""

from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from scheduler.job import Job


class ApiError(Exception):
    """The node answered with an error (``code``, ``status``) or could not be reached (``code='unreachable'``)."""

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class JobList(msgspec.Struct):
    jobs: list[Job]


class Client:
    """``async with Client(url, token) as c: job = await c.submit_file(path)``."""

    def __init__(self, url: str, token: str = "") -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None, connect=5))

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._session.close()

    async def _request(self, method: str, path: str, **kw: Any) -> tuple[int, bytes]:
        try:
            async with self._session.request(method, self.url + path, **kw) as resp:
                body = await resp.read()
        except (aiohttp.ClientError, OSError) as e:
            raise ApiError("unreachable", f"cannot reach the node at {self.url}: {e}") from None
        if resp.status >= 400:
            try:
                err = msgspec.json.decode(body)["error"]
                raise ApiError(err["code"], err["message"], resp.status)
            except (msgspec.DecodeError, KeyError, TypeError):
                raise ApiError("http_error", f"HTTP {resp.status}: {body[:200]!r}", resp.status) from None
        return resp.status, body

    async def health(self) -> dict[str, Any]:
        return msgspec.json.decode((await self._request("GET", "/v1/health"))[1])

    async def alive(self) -> bool:
        try:
            await self.health()
        except ApiError as e:
            return e.code != "unreachable"
        return True

    async def submit_file(self, path: Path, *, model: str | None = None, language: str | None = None,
                          job_id: str | None = None) -> Job:
        with open(path, "rb") as f:
            form = aiohttp.FormData()
            for name, value in (("model", model), ("language", language), ("id", job_id)):
                if value:
                    form.add_field(name, value)
            form.add_field("file", f, filename=path.name, content_type="application/octet-stream")
            _, body = await self._request("POST", "/v1/jobs", data=form)
        return msgspec.json.decode(body, type=Job)

    async def job(self, job_id: str) -> Job:
        return msgspec.json.decode((await self._request("GET", f"/v1/jobs/{job_id}"))[1], type=Job)

    async def jobs(self, state: str | None = None, limit: int = 50) -> list[Job]:
        params = {"limit": str(limit), **({"state": state} if state else {})}
        return msgspec.json.decode((await self._request("GET", "/v1/jobs", params=params))[1], type=JobList).jobs

    async def transcript(self, job_id: str, fmt: str = "txt") -> bytes:
        return (await self._request("GET", f"/v1/jobs/{job_id}/transcript", params={"format": fmt}))[1]

    async def peers(self) -> dict[str, Any]:
        return msgspec.json.decode((await self._request("GET", "/v1/peers"))[1])

    async def cancel(self, job_id: str) -> Job:
        return msgspec.json.decode((await self._request("DELETE", f"/v1/jobs/{job_id}"))[1], type=Job)
