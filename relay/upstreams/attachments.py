"""Qonto attachments, what the API says of one and its file fetched from object storage.

:func:`parse` reads what the API says of an attachment; :func:`fetch` downloads its file from its
presigned URL. URLs are never logged.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import pathlib
from typing import Any, Final

import httpx

from relay import errors, models

CHUNK: Final = 64 * 1024


class TooLarge(errors.Permanent):
    """An attachment bigger than Cegid Loop accepts (50 MB).

    ``size`` is what had arrived.
    """

    def __init__(self, size: int) -> None:
        super().__init__(
            f"larger than {models.MAX_UPLOAD_BYTES // (1024 * 1024)} MB ({size} bytes received)"
        )
        self.size = size


@dataclasses.dataclass(frozen=True, slots=True)
class Attachment:
    id: str
    file_name: str | None
    file_size: int | None
    content_type: str | None
    url: str = dataclasses.field(repr=False)  # presigned: never logged, never stored
    created_at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Download:
    attachment_id: str
    path: pathlib.Path
    size: int
    sha256: str
    head: bytes
    file_name: str | None
    content_type: str | None


def parse(attachment_id: str, item: dict[str, Any]) -> Attachment:
    """Read what ``GET /v2/attachments/{id}`` says of one attachment.

    Raises QontoProtocolError when it has no download URL.
    """
    url = item.get("url")
    if not isinstance(url, str) or not url.startswith(("https://", "http://")):
        raise errors.QontoProtocolError("Qonto attachment: no download URL")
    size = item.get("file_size")
    created = item.get("created_at")
    try:
        created_at = dt.datetime.fromisoformat(created) if isinstance(created, str) else None
    except ValueError:
        created_at = None
    return Attachment(
        id=attachment_id,
        file_name=item.get("file_name") if isinstance(item.get("file_name"), str) else None,
        file_size=int(size) if isinstance(size, str | int) and str(size).isdigit() else None,
        content_type=item.get("file_content_type")
        if isinstance(item.get("file_content_type"), str)
        else None,
        url=url,
        created_at=created_at,
    )


async def fetch(
    storage: httpx.AsyncClient, attachment: Attachment, dest: pathlib.Path
) -> Download | str:
    """Make one try at streaming the file to ``dest``, hashing it on the way.

    Returns the download, or why a new try may help ("expired" for a refused URL, an HTTP status or
    a network error); raises QontoNotFound, TooLarge, or QontoProtocolError when none can.

    The storage client has no base URL and no credentials (object storage refuses two, and Qonto's
    key must not go to another host). The file is given up past what Cegid Loop accepts
    (:class:`TooLarge`). httpx's errors for storage are translated here as
    :mod:`relay.upstreams.qonto` does for the API, whose ``QontoClient.download`` retries this and
    asks for a fresh URL when one expired.
    """
    digest, size, head = hashlib.sha256(), 0, b""
    try:
        async with storage.stream("GET", attachment.url) as response:
            if response.status_code == 403:
                return "expired"
            if response.status_code == 404:
                raise errors.QontoNotFound("Qonto storage: the file no longer exists")
            if response.status_code >= 500 or response.status_code == 429:
                return f"HTTP {response.status_code}"
            if response.status_code != 200:
                raise errors.QontoProtocolError(f"Qonto storage: HTTP {response.status_code}")
            with dest.open("wb") as out:
                async for chunk in response.aiter_bytes(CHUNK):
                    size += len(chunk)
                    if size > models.MAX_UPLOAD_BYTES:
                        raise TooLarge(size)
                    if len(head) < 16:
                        head = (head + chunk)[:16]
                    digest.update(chunk)
                    out.write(chunk)
    except httpx.TransportError as exc:
        return type(exc).__name__
    except httpx.HTTPError as exc:
        raise errors.QontoProtocolError(f"Qonto storage: {type(exc).__name__}") from exc
    return Download(
        attachment_id=attachment.id,
        path=dest,
        size=size,
        sha256=digest.hexdigest(),
        head=head,
        file_name=attachment.file_name,
        content_type=attachment.content_type,
    )
