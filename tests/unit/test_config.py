"""Settings from the environment: defaults, validation listing every bad variable, masked secrets."""

from __future__ import annotations

import datetime as dt
import pathlib
import re

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
    assert (settings.heartbeat_interval_s, settings.stall_after_s) == (5, 60)


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
                "RELAY_HEARTBEAT_INTERVAL": "0",
                "RELAY_STALL_AFTER": "soon",
            }
        )
    message = str(caught.value)
    for name in (
        "RELAY_SECRET_KEY",
        "RELAY_DATABASE_URL",
        "RELAY_FLUSH_AT",
        "RELAY_PORT",
        "RELAY_QONTO_CLIENT_SECRET",
        "RELAY_HEARTBEAT_INTERVAL",
        "RELAY_STALL_AFTER",
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


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_DATABASE_URL", "postgresql//u:hunter2@h/db"),
        ("RELAY_DATABASE_URL", "postgres:/u:hunter2@h"),
        ("RELAY_AMQP_URL", "amqp:guest:hunter2@h"),
        ("RELAY_AMQP_URL", "hunter2://guest:hunter2"),
        ("RELAY_DATABASE_URL", "postgresql:///db?password=hunter2"),
    ],
)
def test_a_malformed_secret_url_is_named_never_echoed(name: str, value: str) -> None:
    """A typo'd URL may still hold a password: the error names the variable and the problem only."""
    with pytest.raises(errors.ConfigurationError) as caught:
        config.from_env({"RELAY_SECRET_KEY": crypto.generate_key(), name: value})
    message = str(caught.value)
    assert name in message
    assert "hunter2" not in message


def test_unparseable_urls_and_bad_ports_are_listed_with_the_other_problems() -> None:
    """An IPv6 bracket left open or a port that is no port is a configuration error, not a crash."""
    with pytest.raises(errors.ConfigurationError) as caught:
        config.from_env(
            {
                "RELAY_SECRET_KEY": crypto.generate_key(),
                "RELAY_AMQP_URL": "amqp://guest:hunter2@[::1/",
                "RELAY_DATABASE_URL": "postgresql://u:hunter2@db:port/relay",
                "RELAY_QONTO_API_URL": "https://qonto.example:99999",
                "RELAY_PUBLIC_URL": "https://relay.example:0",
                "RELAY_FLUSH_AT": "8pm",
            }
        )
    message = str(caught.value)
    for name in (
        "RELAY_AMQP_URL",
        "RELAY_DATABASE_URL",
        "RELAY_QONTO_API_URL",
        "RELAY_PUBLIC_URL",
        "RELAY_FLUSH_AT",
    ):
        assert name in message
    assert "the port must be a number from 1 to 65535" in message
    assert "hunter2" not in message


def test_the_cegid_subscription_key_is_required_when_cegid_is_called() -> None:
    """Without it Loop answers 401 to everything: the commands that call Cegid refuse to start."""
    env = {"RELAY_SECRET_KEY": crypto.generate_key()}
    assert config.from_env(env).cegid_subscription_key is None
    with pytest.raises(errors.ConfigurationError, match="RELAY_CEGID_SUBSCRIPTION_KEY: required"):
        config.from_env(env, require_cegid_subscription_key=True)
    settings = config.from_env(
        {**env, "RELAY_CEGID_SUBSCRIPTION_KEY": "partner-key"}, require_cegid_subscription_key=True
    )
    assert settings.cegid_subscription_key is not None


def test_readme_states_each_default_as_the_settings_table_does() -> None:
    """README's configuration table gives every default exactly as relay/config.py's table."""
    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    stated: dict[str, str] = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`RELAY_"):
            continue
        names = re.findall(r"`(RELAY_[A-Z0-9_]+)`", cells[0])
        defaults = re.findall(r"`([^`]*)`", cells[1])
        if len(defaults) == len(names):
            stated.update(zip(names, defaults, strict=True))
    for variable in config.VARIABLES:
        assert stated.get(variable.name) == variable.default, variable.name


def test_settings_built_directly_have_the_defaults_the_environment_gives() -> None:
    direct = config.Settings(secret_key=config.Secret("k"))
    from_env = config.from_env({"RELAY_SECRET_KEY": crypto.generate_key()})
    for variable in config.VARIABLES:
        assert getattr(direct, variable.field) == getattr(from_env, variable.field), variable.name
