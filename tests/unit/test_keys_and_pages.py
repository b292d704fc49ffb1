"""Key rotation's Box, RELAY_SECRET_KEY lists, the consent URL, and the pages' building blocks
(CSRF tokens, rate-limit windows, templates), with nothing running."""

from __future__ import annotations

import datetime as dt
import urllib.parse

import pytest
from cryptography.fernet import Fernet

from relay import config, crypto, errors
from relay.edge.pages import ratelimit, sessions, templates
from relay.upstreams import qonto


def test_the_first_key_seals_and_every_key_opens() -> None:
    """MultiFernet: "new,old" opens what "old" sealed; reseal moves it under "new"."""
    old, new = crypto.generate_key(), crypto.generate_key()
    sealed_old = crypto.Box(old).seal("secret")
    both = crypto.Box(f"{new}, {old}")
    assert both.open(sealed_old) == "secret"
    assert not both.sealed_by_first(sealed_old)
    moved = both.reseal(sealed_old)
    assert both.sealed_by_first(moved)
    assert crypto.Box(new).open(moved) == "secret"
    assert Fernet(new.encode()).decrypt(both.seal("x")) == b"x"
    with pytest.raises(errors.ConfigurationError):
        crypto.Box(old).open(moved)
    assert "secret" not in repr(both)
    assert new not in repr(both)


def test_secret_key_lists_are_validated_key_by_key() -> None:
    """A bad key in the list is named by its position, never by its value."""
    good = crypto.generate_key()
    settings = config.from_env({"RELAY_SECRET_KEY": f"{good},{crypto.generate_key()}"})
    assert crypto.Box(settings.secret_key.reveal()).open(crypto.Box(good).seal("v")) == "v"
    with pytest.raises(errors.ConfigurationError, match="key 2 of the comma-separated list") as bad:
        config.from_env({"RELAY_SECRET_KEY": f"{good},not-a-key"})
    assert "not-a-key" not in str(bad.value)
    with pytest.raises(errors.ConfigurationError, match="RELAY_SECRET_KEY"):
        config.from_env({"RELAY_SECRET_KEY": " , "})


def test_the_loop_hub_values_come_from_the_configuration() -> None:
    """RELAY_LOOP_APPLICATION_NAME defaults to Qonto; the provider email needs the local part."""
    key = crypto.generate_key()
    plain = config.from_env({"RELAY_SECRET_KEY": key})
    assert plain.loop_application_name == "Qonto"
    assert plain.provider_email("CABINET") is None
    set_ = config.from_env(
        {
            "RELAY_SECRET_KEY": key,
            "RELAY_LOOP_APPLICATION_NAME": "Qonto Relay",
            "RELAY_LOOP_PROVIDER_EMAIL_LOCAL_PART": "relay.ops",
        }
    )
    assert set_.loop_application_name == "Qonto Relay"
    assert set_.provider_email("CABINET") == "relay.ops@CABINET.onmicrosoft.com"
    with pytest.raises(errors.ConfigurationError, match="RELAY_LOOP_PROVIDER_EMAIL_LOCAL_PART"):
        config.from_env({"RELAY_SECRET_KEY": key, "RELAY_LOOP_PROVIDER_EMAIL_LOCAL_PART": "a@b"})


def test_the_consent_url_names_the_app_the_callback_the_scopes_and_the_state() -> None:
    """response_type=code, the client id, {public}/setup/oauth/callback, every scope, the state."""
    settings = config.Settings(
        secret_key=config.Secret(crypto.generate_key()),
        qonto_oauth_url="https://oauth.qonto.com",
        qonto_client_id="app-id",
        qonto_client_secret=config.Secret("app-secret"),
        public_url="https://relay.example.com",
    )
    url = urllib.parse.urlsplit(qonto.authorization_url(settings, "the-state"))
    params = dict(urllib.parse.parse_qsl(url.query))
    assert (url.scheme, url.netloc, url.path) == ("https", "oauth.qonto.com", "/oauth2/auth")
    assert params == {
        "client_id": "app-id",
        "redirect_uri": "https://relay.example.com/setup/oauth/callback",
        "response_type": "code",
        "scope": "webhook organization.read attachment.read supplier_invoice.read "
        "client_invoices.read subscription.read offline_access",
        "state": "the-state",
    }
    assert "app-secret" not in qonto.authorization_url(settings, "s")
    with pytest.raises(errors.ConfigurationError, match="RELAY_QONTO_CLIENT_ID"):
        qonto.authorization_url(config.Settings(secret_key=settings.secret_key), "s")


def test_a_csrf_token_belongs_to_its_session() -> None:
    """Derived from the session id: stable for one session, different for another, never it."""
    now = dt.datetime.now(dt.UTC)
    one = sessions.Session("a" * 43, {}, now, is_new=True)
    two = sessions.Session("b" * 43, {}, now, is_new=True)
    assert one.csrf_token == sessions.Session("a" * 43, {}, now, is_new=False).csrf_token
    assert one.csrf_token != two.csrf_token
    assert "a" * 43 not in one.csrf_token
    assert one.csrf_ok(one.csrf_token)
    assert not one.csrf_ok(two.csrf_token)
    assert not one.csrf_ok(None)
    assert not one.csrf_ok("")
    assert repr(one) == "Session(***)"


def test_rate_limit_windows_are_fixed_and_aligned() -> None:
    """Two moments in one 10-minute window share it; the next window starts fresh."""
    limit = ratelimit.SETUP_GUESSES
    start = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert limit.window_start(start + dt.timedelta(minutes=9)) == start
    assert limit.window_start(start + dt.timedelta(minutes=10)) == start + limit.window
    assert limit.bucket("127.0.0.1") == "setup-guess:127.0.0.1"


def test_templates_escape_what_they_show() -> None:
    """A client name with markup is shown as text."""
    page = templates.render(
        "problem.html",
        flush_at="20:00",
        title="<b>x</b>",
        message="<script>alert(1)</script>",
        action=None,
        restart=False,
    )
    body = bytes(page.body).decode()
    assert "<script>alert" not in body
    assert "&lt;script&gt;" in body
