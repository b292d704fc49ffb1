"""Synthetic files with the right magic numbers, distinct per seed, for the sandboxes.

``Synthetic`` describes a file without holding it: the Qonto sandbox generates its bytes chunk by
chunk, so a benchmark can serve 200 files of 20 MB without 4 GB in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import zlib
from collections.abc import Iterator

CHUNK = 64 * 1024

_HEADS = {
    "jpeg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00",
    "png": b"\x89PNG\r\n\x1a\n",
    "pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
    "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
    "gif": b"GIF89a",
}
CONTENT_TYPES = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "pdf": "application/pdf",
    "heic": "image/heic",
    "gif": "image/gif",
}


def _filler(seed: int, size: int) -> Iterator[bytes]:
    block = hashlib.sha256(f"relay-sandbox-{seed}".encode()).digest() * (CHUNK // 32)
    remaining = size
    while remaining > 0:
        piece = block[: min(CHUNK, remaining)]
        remaining -= len(piece)
        yield piece


@dataclasses.dataclass(frozen=True)
class Synthetic:
    """A file of ``size`` bytes, a real header of ``kind`` followed by seeded filler."""

    kind: str
    size: int
    seed: int = 0

    def chunks(self) -> Iterator[bytes]:
        head = _HEADS[self.kind] + f"seed={self.seed};".encode()
        if self.size <= len(head):
            yield head[: self.size]
            return
        yield head
        yield from _filler(self.seed, self.size - len(head))

    def content(self) -> bytes:
        return b"".join(self.chunks())

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.kind]


def pdf(size: int = 2048, seed: int = 0) -> bytes:
    body = (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[3 0 R]/Count 1>>endobj\n"
        b"3 0 obj<</Type/Page/Parent 2 0 R/MediaBox[0 0 595 842]>>endobj\n"
        + f"% receipt {seed}\n".encode()
    )
    trailer = b"\n%%EOF\n"
    padding = max(0, size - len(body) - 1 - len(trailer))
    return body + b"%" + b"x" * padding + trailer


def png(size: int = 2048, seed: int = 0) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"".join(b"\x00" + bytes([(seed + x) % 256 for x in range(3 * 8)]) for _ in range(8))
    image = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
    )
    comment = b"Comment\x00" + f"seed={seed};".encode()
    text = chunk(b"tEXt", comment + b"r" * max(0, size - len(image) - 12 - len(comment) - 12))
    return image + text + chunk(b"IEND", b"")


def jpeg(size: int = 2048, seed: int = 0) -> bytes:
    return Synthetic("jpeg", size, seed).content()[:-2] + b"\xff\xd9"


def heic(size: int = 2048, seed: int = 0) -> bytes:
    return Synthetic("heic", size, seed).content()


def gif(size: int = 2048, seed: int = 0) -> bytes:
    return Synthetic("gif", size, seed).content()
