"""The command line's contract: --help everywhere, exit codes, no prompts, configuration errors."""

from __future__ import annotations

import json

import pytest

from relay import crypto
from relay.cli import commands
from relay.cli import main as cli

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
    ["status"],
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


ADD = [
    "connections",
    "add",
    "--client-name",
    "Acme",
    "--qonto-organization-id",
    "org",
    "--qonto-api-key",
    "login:secret-value",
    "--cegid-api-key",
    "k",
    "--cegid-api-secret",
    "s",
    "--cegid-dossier",
    "D",
    "--cegid-domain",
    "X",
]


def test_keygen_takes_json(capsys: pytest.CaptureFixture[str]) -> None:
    """`relay keygen --json` prints one JSON document holding the new key."""
    assert cli.main(["keygen", "--json"]) == 0
    assert crypto.is_valid_key(json.loads(capsys.readouterr().out)["secret_key"])


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "give at least one --webhook-secret, or --subscribe"),
        (["--webhook-secret", "too-short"], "16 to 256 characters"),
        (["--webhook-secret", "x" * 32, "--qonto-refresh-token", "t"], "exactly one"),
    ],
)
def test_flag_combinations_are_usage_errors(
    extra: list[str],
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Flags that do not go together exit 2, before the configuration or any upstream is read."""
    monkeypatch.setenv("RELAY_SECRET_KEY", crypto.generate_key())
    assert cli.main([*ADD, *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert "secret-value" not in err


@pytest.mark.parametrize("value", [":secret", "login:", "no-colon"])
def test_an_api_key_without_login_or_secret_is_a_usage_error(
    value: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--qonto-api-key must be LOGIN:SECRET, both parts present."""
    monkeypatch.setenv("RELAY_SECRET_KEY", crypto.generate_key())
    args = [*ADD, "--webhook-secret", "x" * 32]
    args[args.index("login:secret-value")] = value
    assert cli.main(args) == 2
    assert "must be LOGIN:SECRET" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        ["flush", "--now"],
        ["connections", "check", "8d1f5a5e-0c1e-4d0c-9b1a-2f3e4d5c6b7a"],
        ["connections", "reconnect", "8d1f5a5e-0c1e-4d0c-9b1a-2f3e4d5c6b7a"],
        ["scheduler"],
        ["run"],
        [*ADD, "--webhook-secret", "x" * 32],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_commands_calling_cegid_need_the_subscription_key(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without RELAY_CEGID_SUBSCRIPTION_KEY every Loop call would be a 401 blamed on the firm."""
    monkeypatch.setenv("RELAY_SECRET_KEY", crypto.generate_key())
    monkeypatch.delenv("RELAY_CEGID_SUBSCRIPTION_KEY", raising=False)
    assert cli.main(command) == 2
    assert "RELAY_CEGID_SUBSCRIPTION_KEY: required" in capsys.readouterr().err


def test_json_failures_print_one_json_document(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --json a failed command still prints exactly one JSON document, with the exit code."""
    monkeypatch.setenv("RELAY_SECRET_KEY", crypto.generate_key())
    monkeypatch.setenv("RELAY_FLUSH_AT", "25:00")
    assert cli.main(["connections", "list", "--json"]) == 2
    captured = capsys.readouterr()
    value = json.loads(captured.out)
    assert value["exit_code"] == 2
    assert "RELAY_FLUSH_AT" in value["error"]
    assert "RELAY_FLUSH_AT" in captured.err
    monkeypatch.delenv("RELAY_FLUSH_AT")
    assert cli.main([*ADD, "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["exit_code"] == 2
    with pytest.raises(SystemExit) as exited:
        cli.main(["documents", "list", "--state", "lost", "--json"])
    assert exited.value.code == 2
    captured = capsys.readouterr()
    value = json.loads(captured.out)
    assert (sorted(value), value["exit_code"]) == (["error", "exit_code"], 2)
    assert "invalid choice" in captured.err


def test_an_unexpected_error_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The last resort: one line on stderr (a traceback only with RELAY_LOG_LEVEL=debug), exit 1."""

    def broken(args: object) -> int:
        raise RuntimeError("cannot reach amqp://guest:hunter2@mq:5672/ today")

    monkeypatch.setattr(commands, "cmd_keygen", broken)
    monkeypatch.delenv("RELAY_LOG_LEVEL", raising=False)
    assert cli.main(["keygen", "--json"]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1
    assert "RuntimeError" in captured.err
    assert "hunter2" not in captured.err + captured.out
    assert json.loads(captured.out)["exit_code"] == 1
    monkeypatch.setenv("RELAY_LOG_LEVEL", "debug")
    assert cli.main(["keygen"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_status_without_postgresql_exits_1_with_one_json_document(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`relay status --json` needs no secret key; PostgreSQL unreachable is a failure (exit 1),
    said in one JSON document."""
    monkeypatch.delenv("RELAY_SECRET_KEY", raising=False)
    monkeypatch.setenv("RELAY_DATABASE_URL", "postgresql://postgres@127.0.0.1:1/relay")
    assert cli.main(["status", "--json"]) == 1
    value = json.loads(capsys.readouterr().out)
    assert value["exit_code"] == 1
    assert "PostgreSQL unavailable" in value["error"]
