"""What a file is, decided by its first bytes (never by its name or the type Qonto reports)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, slots=True)
class Kind:
    name: str
    content_type: str
    extension: str
    exported: bool


JPEG = Kind("JPEG image", "image/jpeg", "jpg", exported=True)
PNG = Kind("PNG image", "image/png", "png", exported=True)
PDF = Kind("PDF document", "application/pdf", "pdf", exported=True)

_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1", b"avif")


def detect(head: bytes) -> Kind:
    """Tell a file's kind from its first bytes (16 at least).

    Only JPEG, PNG and PDF are ``exported``.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"%PDF-"):
        return PDF
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"avif":
            return Kind("AVIF image", "image/avif", "avif", exported=False)
        if brand in _HEIF_BRANDS:
            return Kind("HEIC image", "image/heic", "heic", exported=False)
        return Kind(
            "ISO media file (" + brand.decode("ascii", "replace") + ")",
            "video/mp4",
            "mp4",
            exported=False,
        )
    if head.startswith((b"GIF87a", b"GIF89a")):
        return Kind("GIF image", "image/gif", "gif", exported=False)
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return Kind("TIFF image", "image/tiff", "tif", exported=False)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return Kind("WEBP image", "image/webp", "webp", exported=False)
    if head.startswith(b"PK\x03\x04"):
        return Kind("ZIP archive or Office document", "application/zip", "zip", exported=False)
    if head.startswith(b"\xd0\xcf\x11\xe0"):
        return Kind("legacy Office document", "application/msword", "doc", exported=False)
    if not head:
        return Kind("empty file", "application/octet-stream", "bin", exported=False)
    return Kind("unknown type", "application/octet-stream", "bin", exported=False)
