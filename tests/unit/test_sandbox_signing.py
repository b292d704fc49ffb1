"""The sandbox signs webhooks exactly as Qonto does (the official test vector)."""

from __future__ import annotations

import hashlib
import hmac
import time

from relay.sandbox import signing
from tests.conftest import load_fixture


def test_sign_reproduces_the_official_qonto_vector() -> None:
    """sign() of the vector's body, secret and timestamp gives the vector's exact header."""
    vector = load_fixture("qonto-signature-test-vector.json")
    header = signing.sign(vector["raw_body"].encode(), vector["secret"], t=vector["now_unix"])
    assert header == vector["x_qonto_signature"]


def test_sign_covers_the_timestamp_not_the_body_alone() -> None:
    """The v1 value is never the HMAC of the body alone (the older, wrong scheme)."""
    vector = load_fixture("qonto-signature-test-vector.json")
    header = signing.sign(vector["raw_body"].encode(), vector["secret"], t=vector["now_unix"])
    assert vector["body_only_hmac_which_must_be_rejected"] not in header


def test_sign_without_a_timestamp_uses_the_current_time() -> None:
    """With t omitted, the header carries the current unix time and a matching v1."""
    before = int(time.time())
    header = signing.sign(b"{}", "s" * 32)
    after = int(time.time())
    fields = dict(part.split("=", 1) for part in header.split(","))
    assert before <= int(fields["t"]) <= after
    expected = hmac.new(b"s" * 32, f"{fields['t']}.{{}}".encode(), hashlib.sha256).hexdigest()
    assert fields["v1"] == expected
