"""Webhook signatures, pinned to Qonto's official test vector."""

from __future__ import annotations

import pytest

from relay.edge import signature
from relay.sandbox import signing
from tests.conftest import load_fixture

VECTOR = load_fixture("qonto-signature-test-vector.json")


def test_official_test_vector_passes_with_pinned_clock() -> None:
    """Qonto's published vector verifies with the clock at its timestamp."""
    signature.verify(
        VECTOR["x_qonto_signature"],
        VECTOR["raw_body"].encode(),
        [VECTOR["secret"]],
        now=VECTOR["now_unix"],
    )


def test_body_only_hmac_of_the_older_scheme_is_rejected() -> None:
    """An HMAC of the body alone (the wrong, older scheme) does not verify."""
    header = f"t={VECTOR['now_unix']},v1={VECTOR['body_only_hmac_which_must_be_rejected']}"
    with pytest.raises(signature.Rejected, match="bad signature"):
        signature.verify(
            header, VECTOR["raw_body"].encode(), [VECTOR["secret"]], now=VECTOR["now_unix"]
        )


def test_sandbox_signing_matches_the_vector() -> None:
    """The sandboxes sign exactly as Qonto does."""
    assert (
        signing.sign(VECTOR["raw_body"].encode(), VECTOR["secret"], t=VECTOR["now_unix"])
        == (VECTOR["x_qonto_signature"])
    )


def test_a_reserialized_body_does_not_verify() -> None:
    """The raw bytes are signed: the same JSON with other spacing fails."""
    with pytest.raises(signature.Rejected, match="bad signature"):
        signature.verify(
            VECTOR["x_qonto_signature"],
            b'{"test": "data"}',
            [VECTOR["secret"]],
            now=VECTOR["now_unix"],
        )


@pytest.mark.parametrize("offset", [301, -301, 86400])
def test_timestamps_beyond_five_minutes_are_stale(offset: int) -> None:
    """Old (replayed) and far-future timestamps are refused."""
    with pytest.raises(signature.Rejected, match="stale timestamp"):
        signature.verify(
            VECTOR["x_qonto_signature"],
            VECTOR["raw_body"].encode(),
            [VECTOR["secret"]],
            now=VECTOR["now_unix"] + offset,
        )


def test_any_v1_may_match_any_current_secret() -> None:
    """During a rotation the header may carry several v1 and the connection several secrets."""
    body = b'{"id":"e1","type":"v1/transactions"}'
    good = signing.sign(body, "new-secret-" + "x" * 24, t=1000).split("v1=")[1]
    header = f"t=1000,v1={'0' * 64},v1={good}"
    signature.verify(header, body, ["old-secret-" + "y" * 24, "new-secret-" + "x" * 24], now=1000)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "t=abc,v1=00",
        "v1=00",
        "t=1000",
        "t=1000,v1",
        "t=1,t=2",
        "=,=",
        "t=99999999999999,v1=0",
    ],
)
def test_malformed_headers_are_refused_cleanly(header: str) -> None:
    """Whatever the header, the answer is a rejection with a reason, never a crash."""
    with pytest.raises(signature.Rejected):
        signature.verify(header, b"{}", ["s" * 32], now=1000)
