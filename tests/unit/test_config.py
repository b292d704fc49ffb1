"""Settings from the environment: defaults, validation listing every bad variable, masked secrets."""

from __future__ import annotations

import datetime as dt

import pytest

from relay import config, crypto, errors


def test_defaults_match_the_interface() -> None:
    """With only the secret key set, every default is the documented one."""
    settings = config.from_env({"RELAY_SECRET_KEY": crypto.generate_key()})
    assert settings.database_url.reveal() == "postgresql://postgres@127.0.0.1:5432/relay"
    assert settings.amqp_url.reveal() == "amqp://guest:guest@127.0.0.1:5672/"
    assert settings.qonto_api_url == "https://thirdparty.qonto.com"
    assert settings.cegid_api_url == "https://api.cegid.com/loop-api-publiques"
    assert settings.flush_at == dt.time(20, 0)
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)


def test_every_bad_variable_is_named_at_once() -> None:
    """One start-up error lists all the problems, not the first one only."""
    with pytest.raises(errors.ConfigurationError) as caught:
        config.from_env(
            {
                "RELAY_SECRET_KEY": "short",
                "RELAY_DATABASE_URL": "mysql://x",
                "RELAY_FLUSH_AT": "8pm",
                "RELAY_PORT": "http",
                "RELAY_QONTO_CLIENT_ID": "only-the-id",
            }
        )
    message = str(caught.value)
    for name in (
        "RELAY_SECRET_KEY",
        "RELAY_DATABASE_URL",
        "RELAY_FLUSH_AT",
        "RELAY_PORT",
        "RELAY_QONTO_CLIENT_SECRET",
    ):
        assert name in message


def test_missing_secret_key_is_required() -> None:
    """Outside the demo, the key sealing credentials is mandatory."""
    with pytest.raises(errors.ConfigurationError, match="RELAY_SECRET_KEY: required"):
        config.from_env({})


def test_secrets_never_show_in_repr_or_errors() -> None:
    """A password in a URL or a key never reaches a repr or an error message."""
    key = crypto.generate_key()
    settings = config.from_env(
        {
            "RELAY_SECRET_KEY": key,
            "RELAY_AMQP_URL": "amqp://user:hunter2-password@mq:5672/",
            "RELAY_CEGID_SUBSCRIPTION_KEY": "subscription-key-value",
        }
    )
    text = repr(settings)
    for secret in (key, "hunter2", "subscription-key-value"):
        assert secret not in text
    with pytest.raises(errors.ConfigurationError) as caught:
        config.from_env({"RELAY_SECRET_KEY": key, "RELAY_DATABASE_URL": "ftp://u:hunter2@h/db"})
    assert "hunter2" not in str(caught.value)


def test_flush_time_is_parsed_as_utc_clock() -> None:
    """RELAY_FLUSH_AT is HH:MM."""
    settings = config.from_env(
        {"RELAY_SECRET_KEY": crypto.generate_key(), "RELAY_FLUSH_AT": "06:30"}
    )
    assert settings.flush_at == dt.time(6, 30)
