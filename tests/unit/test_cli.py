"""The command line's contract: --help everywhere, exit codes, no prompts, configuration errors."""

from __future__ import annotations

import pytest

from relay import cli, crypto

COMMANDS = [
    ["keygen"],
    ["migrate"],
    ["serve"],
    ["consume"],
    ["scheduler"],
    ["run"],
    ["flush"],
    ["connections", "add"],
    ["connections", "list"],
    ["connections", "show"],
    ["connections", "check"],
    ["connections", "disconnect"],
    ["connections", "reconnect"],
    ["documents", "list"],
    ["documents", "resolve"],
    ["dlq", "list"],
    ["dlq", "show"],
    ["dlq", "replay"],
    ["dlq", "purge"],
    ["demo"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_takes_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """`relay <command> --help` describes it and exits 0."""
    with pytest.raises(SystemExit) as exited:
        cli.main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: relay" in capsys.readouterr().out


def test_keygen_prints_a_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    """The printed key is accepted as RELAY_SECRET_KEY."""
    assert cli.main(["keygen"]) == 0
    assert crypto.is_valid_key(capsys.readouterr().out.strip())


def test_bad_usage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown flags and malformed values are usage errors (exit 2)."""
    with pytest.raises(SystemExit) as exited:
        cli.main(["documents", "list", "--state", "lost"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit) as exited:
        cli.main(["connections", "show", "not-a-uuid"])
    assert exited.value.code == 2
    assert "UUID" in capsys.readouterr().err


def test_flush_without_now_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The immediate flush must be asked for explicitly."""
    monkeypatch.setenv("RELAY_SECRET_KEY", crypto.generate_key())
    assert cli.main(["flush"]) == 2
    assert "--now" in capsys.readouterr().err


def test_configuration_errors_exit_2_naming_every_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A malformed environment stops the command with one message naming each bad variable."""
    monkeypatch.delenv("RELAY_SECRET_KEY", raising=False)
    monkeypatch.setenv("RELAY_FLUSH_AT", "25:00")
    assert cli.main(["connections", "list"]) == 2
    err = capsys.readouterr().err
    assert "RELAY_SECRET_KEY" in err
    assert "RELAY_FLUSH_AT" in err


def test_add_needs_exactly_one_qonto_authentication(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """API key and refresh token together are refused before anything is contacted."""
    monkeypatch.setenv("RELAY_SECRET_KEY", crypto.generate_key())
    code = cli.main(
        [
            "connections",
            "add",
            "--client-name",
            "Acme",
            "--qonto-organization-id",
            "org",
            "--qonto-api-key",
            "login:secret",
            "--qonto-refresh-token",
            "token",
            "--cegid-api-key",
            "k",
            "--cegid-api-secret",
            "s",
            "--cegid-dossier",
            "D",
            "--cegid-domain",
            "X",
            "--webhook-secret",
            "x" * 32,
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "exactly one" in err
    assert "login:secret" not in err
