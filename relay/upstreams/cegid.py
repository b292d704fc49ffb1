"""Cegid Loop's API client, where httpx errors and Loop's answers become the relay's outcomes."""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import AsyncIterator
from typing import Any, Final

import httpx
import orjson

from relay import config, errors, events, log, retry
from relay.domain import credentials

logger = log.get(__name__)

CHUNK: Final = 64 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Stored:
    status: int
    body: Any
    document_id: str | None


@contextlib.asynccontextmanager
async def http_client(
    settings: config.Settings, *, transport: httpx.AsyncBaseTransport | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """Open the Cegid client's httpx client with its base URL, subscription key and timeouts.

    ``transport`` is for tests (httpx.MockTransport).
    """
    if not settings.cegid_subscription_key:
        # without it Loop answers 401 to every call, which would be blamed on the firm's key
        raise errors.ConfigurationError(
            "RELAY_CEGID_SUBSCRIPTION_KEY: required to call Cegid Loop (the partner's "
            "Ocp-Apim-Subscription-Key, issued by Cegid)"
        )
    headers = {
        "User-Agent": "qonto-cegid-relay",
        "Ocp-Apim-Subscription-Key": settings.cegid_subscription_key.reveal(),
    }
    # httpcore scans its whole pool on every request: size it to the upload cap
    limits = httpx.Limits(
        max_connections=settings.upload_concurrency + 4,
        max_keepalive_connections=settings.upload_concurrency + 4,
    )
    async with httpx.AsyncClient(
        base_url=settings.cegid_api_url,
        headers=headers,
        # consumers.upload retries under its own policy: httpx never re-sends a file
        transport=transport or httpx.AsyncHTTPTransport(limits=limits, retries=0),
        timeout=httpx.Timeout(connect=5, read=60, write=60, pool=None),
    ) as client:
        yield client


def _retry_after(response: httpx.Response) -> float | None:
    return retry.retry_after(response.headers.get("retry-after"))


def _excerpt(response: httpx.Response) -> str:
    return response.text[:300].replace("\n", " ")


def _body(response: httpx.Response) -> Any:
    try:
        return events.loads(response.content)  # kept in jsonb: without NUL characters
    except orjson.JSONDecodeError:
        return response.text[:2000]


class CegidClient:
    def __init__(self, settings: config.Settings, http: httpx.AsyncClient) -> None:
        self._settings = settings
        self._http = http

    async def check_dossier(self, creds: credentials.CegidCredentials, dossier: str) -> None:
        """Check with a cheap dossier-scoped read that the key may read the dossier, else raise.

        Loop's refusals are undocumented; they are told apart as the sandbox models them: 401 the
        key itself (:class:`~relay.errors.CegidKeyRefused`), 403 a dossier the key may not read
        (:class:`~relay.errors.CegidDossierNotAssociated`), an answer without data a dossier Loop
        does not know (:class:`~relay.errors.CegidDossierUnknown`); all are CegidAccessRefused.
        """
        try:
            response = await self._http.get(
                "/journal",
                params={"codeDossier": dossier, "take": 1},
                headers={"x-apikey": creds.header()},
            )
        except httpx.HTTPError as exc:
            raise errors.CegidUnavailable(f"Cegid Loop unreachable ({type(exc).__name__})") from exc
        if response.status_code == 401:
            raise errors.CegidKeyRefused(
                f"Cegid refused the firm's API key and secret (HTTP 401, dossier {dossier}): check "
                "the key and secret created in CegidLife, and the partner declared with them in "
                "Loop Hub"
            )
        if response.status_code == 403:
            raise errors.CegidDossierNotAssociated(
                f"Cegid refused access to dossier {dossier} (HTTP 403): associate the dossier with "
                "the key in Loop Hub"
            )
        if response.status_code == 429:
            raise errors.CegidRateLimited(
                "Cegid Loop is throttling", retry_after=_retry_after(response)
            )
        if response.status_code >= 500:
            raise errors.CegidUnavailable(f"Cegid Loop answered HTTP {response.status_code}")
        body = _body(response)
        data = body.get("data") if isinstance(body, dict) else body
        if response.status_code >= 300 or not data:
            raise errors.CegidDossierUnknown(
                f"Cegid: dossier {dossier} not found with this key (HTTP {response.status_code}): check the "
                "code dossier in Loop and its association with the key in Loop Hub"
            )

    async def store_document(
        self,
        creds: credentials.CegidCredentials,
        *,
        dossier: str,
        file_name: str,
        transaction: str,
        content_type: str,
        path: pathlib.Path,
        size: int,
    ) -> Stored:
        """POST the file at ``path`` to the dossier's deposit and return how it ended, or why not.

        Every way a deposit can end is classified (the contract documents none):
        - 2xx: stored; the whole answer is kept, with its ``id`` when there is one;
        - 429 and 5xx, or a failure before the whole body was sent (refused connection, DNS, TLS,
          a write error): Loop did not keep the file → ``CegidUnavailable`` / ``CegidRateLimited``;
        - 401/403: the firm's key or the dossier's association is refused → ``CegidAccessRefused``;
        - 408: Loop gave up receiving the request, nothing was stored → ``CegidUnavailable``;
        - 404/405: no such route (a wrong ``RELAY_CEGID_API_URL``) → ``CegidAccessRefused``;
        - 400/413/415 and other 4xx: the file itself is refused → ``CegidFileRejected``;
        - the whole body was sent but no answer came (read timeout, connection reset or closed,
          garbled answer) → ``OutcomeUnknown``: the file may or may not be in Loop.
        """
        sent = {"all": False}

        async def body() -> AsyncIterator[bytes]:
            # A local temporary file read in 64 KiB chunks from the page cache: a thread hop per
            # chunk (anyio.open_file) cost more CPU than the read itself (profiled in make bench).
            with path.open("rb") as handle:
                while chunk := handle.read(CHUNK):
                    yield chunk
            sent["all"] = True

        params = {
            "context": dossier,
            "filename": file_name,
            "transaction": transaction,
            "uploadMode": "API",
        }
        headers = {
            "x-apikey": creds.header(),
            "Content-Type": content_type,
            "Content-Length": str(size),
        }
        try:
            response = await self._http.post(
                "/storeDocument", params=params, content=body(), headers=headers
            )
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise errors.CegidUnavailable(f"Cegid Loop unreachable ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:  # transport errors, and an answer httpx could not decode
            if sent["all"]:
                raise errors.OutcomeUnknown(
                    f"the file was sent but Cegid Loop did not answer ({type(exc).__name__})"
                ) from exc
            raise errors.CegidUnavailable(
                f"Cegid Loop connection failed before the file was sent ({type(exc).__name__})"
            ) from exc
        status = response.status_code
        if 200 <= status < 300:
            answer = _body(response)
            document_id = answer.get("id") if isinstance(answer, dict) else None
            return Stored(status, answer, str(document_id) if document_id else None)
        if status == 429:
            raise errors.CegidRateLimited(
                "Cegid Loop is throttling (HTTP 429)", retry_after=_retry_after(response)
            )
        if status >= 500:
            raise errors.CegidUnavailable(
                f"Cegid Loop answered HTTP {status}", retry_after=_retry_after(response)
            )
        if status == 408:  # Loop gave up waiting for the request: nothing was stored
            raise errors.CegidUnavailable("Cegid Loop timed out receiving the file (HTTP 408)")
        if status in (401, 403):
            raise errors.CegidAccessRefused(
                f"Cegid refused the deposit into dossier {dossier} (HTTP {status}): check the firm's API key "
                "and the dossier's association with it in Loop Hub"
            )
        if status in (404, 405):  # no such route: the deployment's URL, not this file
            raise errors.CegidAccessRefused(
                f"Cegid Loop has no storeDocument route here (HTTP {status}): check "
                "RELAY_CEGID_API_URL (https://api.cegid.com/loop-api-publiques)"
            )
        raise errors.CegidFileRejected(
            f"Cegid refused the file (HTTP {status}): {_excerpt(response)}",
            status=status,
            body=_excerpt(response),
        )
