"""Synthetic files: right magic numbers, exact sizes, distinct per seed, streamable."""

from __future__ import annotations

import hashlib
import struct
import zlib

import pytest

from relay.sandbox import files

MAGIC = {
    "jpeg": b"\xff\xd8\xff",
    "png": b"\x89PNG\r\n\x1a\n",
    "pdf": b"%PDF-",
    "heic": b"\x00\x00\x00\x18ftypheic",
    "gif": b"GIF89a",
}
MAKERS = {
    "jpeg": files.jpeg,
    "png": files.png,
    "pdf": files.pdf,
    "heic": files.heic,
    "gif": files.gif,
}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_file_makers_give_the_size_asked_with_the_right_magic(kind: str) -> None:
    """Each maker returns exactly the requested size, starting with its format's magic number."""
    content = MAKERS[kind](size=4096, seed=3)
    assert len(content) == 4096
    assert content.startswith(MAGIC[kind])


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_file_makers_give_distinct_content_per_seed(kind: str) -> None:
    """Different seeds give different bytes (so the relay's content dedupe does not merge them)."""
    contents = {MAKERS[kind](seed=seed) for seed in (0, 1, 2, 256)}
    assert len(contents) == 4


def test_pdf_ends_with_an_eof_marker() -> None:
    """The PDF carries a complete %%EOF trailer."""
    assert files.pdf(size=3000, seed=1).rstrip().endswith(b"%%EOF")


def test_jpeg_ends_with_an_end_of_image_marker() -> None:
    """The JPEG ends with FFD9."""
    assert files.jpeg(seed=5).endswith(b"\xff\xd9")


def test_png_chunks_carry_valid_crcs_and_end_with_iend() -> None:
    """Every PNG chunk's CRC is right and the last chunk is IEND."""
    content = files.png(size=1500, seed=9)
    offset, kinds = 8, []
    while offset < len(content):
        (length,) = struct.unpack(">I", content[offset : offset + 4])
        kind = content[offset + 4 : offset + 8]
        data = content[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", content[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + data)
        kinds.append(kind)
        offset += 12 + length
    assert kinds[0] == b"IHDR"
    assert kinds[-1] == b"IEND"


def test_synthetic_streams_in_bounded_chunks_with_a_matching_sha256() -> None:
    """A synthetic file streams in chunks of at most 64 KiB; sha256() equals the hash of its bytes."""
    spec = files.Synthetic("pdf", 1_000_003, seed=7)
    chunks = list(spec.chunks())
    assert max(len(c) for c in chunks) <= files.CHUNK
    content = b"".join(chunks)
    assert len(content) == spec.size
    assert content.startswith(b"%PDF-")
    assert spec.sha256() == hashlib.sha256(content).hexdigest()
    assert spec.content_type == "application/pdf"
    assert files.Synthetic("pdf", 1_000_003, seed=8).sha256() != spec.sha256()
