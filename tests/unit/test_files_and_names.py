"""File types are decided by bytes; Loop file names are meaningful, ASCII and unique."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from relay import filetype, models, naming
from relay.sandbox import files


@pytest.mark.parametrize(
    ("content", "name", "exported"),
    [
        (files.jpeg(), "JPEG image", True),
        (files.png(), "PNG image", True),
        (files.pdf(), "PDF document", True),
        (files.heic(), "HEIC image", False),
        (files.gif(), "GIF image", False),
        (b"PK\x03\x04rest", "ZIP archive or Office document", False),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00", "HEIC image", False),
        (b"\x00\x00\x00\x1cftypavif\x00\x00", "AVIF image", False),
        (b"II*\x00\x08\x00\x00\x00", "TIFF image", False),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WEBP image", False),
        (b" %PDF-1.7 leading space", "unknown type", False),
        (b"", "empty file", False),
        (b"hello world, plain text", "unknown type", False),
    ],
)
def test_types_come_from_the_bytes(content: bytes, name: str, exported: bool) -> None:
    """Only JPEG, PNG and PDF are exported, whatever the file is called."""
    kind = filetype.detect(content[:16])
    assert (kind.name, kind.exported) == (name, exported)


def _document(**overrides: object) -> models.Document:
    values: dict[str, object] = {
        "id": 7,
        "connection_id": uuid.uuid4(),
        "source": "transaction",
        "qonto_resource_id": "t",
        "qonto_attachment_id": "3e9a7c51-0d2b-4f8e-a6c4-1b5d7e9f0a23",
        "direction": "PURCHASE",
        "state": "pending",
        "reason": None,
        "document_date": dt.date(2026, 11, 22),
        "counterparty": "Le Petit Zinc",
        "amount": "84.00",
        "currency": "EUR",
        "qonto_file_name": None,
        "file_name": None,
        "content_type": None,
        "size_bytes": None,
        "sha256": None,
        "attempts": 0,
        "cegid_document_id": None,
        "uploaded_at": None,
        "created_at": dt.datetime.now(dt.UTC),
        "updated_at": dt.datetime.now(dt.UTC),
    }
    values.update(overrides)
    return models.Document(**values)  # type: ignore[arg-type]


def test_name_carries_date_counterparty_amount_and_attachment() -> None:
    name = naming.file_name(_document(), "jpg")
    assert (
        name == "2026-11-22_Le-Petit-Zinc_84.00EUR_receipt_3e9a7c51-0d2b-4f8e-a6c4-1b5d7e9f0a23.jpg"
    )


def test_accents_slashes_and_missing_fields_are_safe() -> None:
    """ASCII only, no path or query separators, sensible placeholders."""
    name = naming.file_name(
        _document(counterparty="Café / Brasserie & Cie?", amount=None, document_date=None), "pdf"
    )
    assert name.startswith("undated_Cafe-Brasserie-Cie_receipt_")
    assert all(c.isalnum() or c in "-_." for c in name)


def test_long_names_keep_the_unique_tail() -> None:
    name = naming.file_name(_document(counterparty="X" * 300, amount="1" * 40), "pdf")
    assert len(name) <= naming.MAX_LENGTH
    assert name.endswith("3e9a7c51-0d2b-4f8e-a6c4-1b5d7e9f0a23.pdf")


@pytest.mark.parametrize(
    ("source", "label"),
    [
        ("transaction", "_receipt_"),
        ("supplier_invoice", "_supplier-invoice_"),
        ("client_invoice", "_client-invoice_"),
    ],
)
def test_name_says_where_the_file_comes_from(source: str, label: str) -> None:
    """Receipt, supplier invoice or client invoice: readable in Loop's inbox."""
    assert label in naming.file_name(_document(source=source), "pdf")


def test_amount_keeps_its_decimals_and_loses_its_sign() -> None:
    """A decimal comma becomes a dot, a debit's minus sign is dropped, the currency upper case."""
    name = naming.file_name(_document(amount="-84,50", currency="eur"), "pdf")
    assert "_84.50EUR_" in name


def test_extension_comes_from_the_detected_type() -> None:
    """The extension given (from the bytes), never the one in Qonto's file name."""
    name = naming.file_name(_document(qonto_file_name="scan.heic"), "jpg")
    assert name.endswith(".jpg")
    assert "heic" not in name
