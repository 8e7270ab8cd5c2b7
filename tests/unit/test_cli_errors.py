"""A Redis that cannot be reached: every command says so in one line, names the URL
(password masked) and what to do, and exits 2. No traceback, no GPU message, no 30 s of
retries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import typer

from gridqueue import cli
from gridqueue.errors import RedisUnavailableError
from gridqueue.settings import Settings

PASSWORD = "hunter2-secret"
ENTRY_POINT = Path(sys.executable).with_name("gridqueue")

# Every command that talks to Redis, with the arguments it needs to get that far.
COMMANDS: dict[str, list[str]] = {
    "status": ["status"],
    "status --json": ["status", "--json"],
    "submit": ["submit", "sim-llm", "--payload", '{"prompt": "hi"}'],
    "submit --wait": ["submit", "sim-llm", "--wait", "--timeout", "5"],
    "job": ["job", "0123456789abcdef"],
    "cancel": ["cancel", "0123456789abcdef"],
    "worker": ["worker", "--name", "w1", "--models", "sim-llm", "--probe", "simulated"],
    "watchdog": ["watchdog"],
    "dlq list": ["dlq", "list"],
    "dlq replay": ["dlq", "replay", "0123456789abcdef"],
    "quarantine": ["quarantine", "w1", "--reason", "test"],
    "drain": ["drain", "w1"],
    "release": ["release", "w1"],
    "fault inject": ["fault", "inject", "--worker", "w1", "--xid", "79"],
    "fault clear": ["fault", "clear", "--worker", "w1"],
    "drill": ["drill", "--duration", "5"],
    "dashboard": ["dashboard", "--port", "8555"],
    "jobs": ["jobs", "--state", "RUNNING"],
    "failovers": ["failovers"],
}
# Commands that start their own private Redis and take no URL.
NO_REDIS_URL = {"demo"}


@pytest.fixture(scope="module")
def closed_port() -> int:
    """A loopback port that nothing listens on: bound by us, then closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    for name in list(os.environ):
        if name.upper().startswith("GRIDQUEUE_"):
            monkeypatch.delenv(name)
    # A narrow terminal: a message that wraps would show as more than one line.
    yield {**os.environ, "COLUMNS": "60", "PYTHONWARNINGS": "default"}


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    if ENTRY_POINT.exists():
        command = [str(ENTRY_POINT)]
    else:
        command = [sys.executable, "-c", "from gridqueue.cli import main; main()"]
    return subprocess.run(
        [*command, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_redis_line(result: subprocess.CompletedProcess[str], url: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert PASSWORD not in output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert f"cannot reach Redis at {url}" in line
    assert "GRIDQUEUE_REDIS_URL" in line and "--redis" in line
    assert result.stdout == ""
    return line


def _command_names(app: typer.Typer, prefix: str = "") -> set[str]:
    names = set()
    for command in app.registered_commands:
        assert command.callback is not None
        name = command.name or command.callback.__name__.replace("_", "-")
        names.add(f"{prefix}{name}")
    for group in app.registered_groups:
        assert group.typer_instance is not None and group.name is not None
        names |= _command_names(group.typer_instance, f"{prefix}{group.name} ")
    return names


def test_every_command_is_covered() -> None:
    """A new command that talks to Redis must be added to COMMANDS (or NO_REDIS_URL)."""
    tested = {name.removesuffix(" --json").removesuffix(" --wait") for name in COMMANDS}
    assert _command_names(cli.app) == tested | NO_REDIS_URL


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_an_unreachable_redis_is_one_line_and_exit_2(
    name: str, closed_port: int, clean_env: dict[str, str]
) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{closed_port}/0"
    result = run_cli([*COMMANDS[name], "--redis", url], clean_env)
    line = assert_one_redis_line(result, f"redis://:***@127.0.0.1:{closed_port}/0")
    assert "Connection refused" in line
    assert "fits this node's GPUs" not in line


def test_the_url_from_the_environment_is_named(closed_port: int, clean_env: dict[str, str]) -> None:
    url = f"redis://127.0.0.1:{closed_port}/3"
    result = run_cli(["status"], {**clean_env, "GRIDQUEUE_REDIS_URL": url})
    assert_one_redis_line(result, url)


def test_redis_lost_after_the_start_is_one_line_too(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    closed_port: int,
    clean_env: dict[str, str],
) -> None:
    """The first PING passed, then Redis went away and the ledger's retries ran out."""
    from gridqueue import client

    url = f"redis://:{PASSWORD}@127.0.0.1:{closed_port}/0"
    monkeypatch.setattr(cli, "configure_logging", lambda *_: None)
    monkeypatch.setattr(redis.Redis, "ping", lambda self: True)

    def lost(*_: Any, **__: Any) -> Any:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as exc:
            raise redis.ConnectionError("Error 111 connecting. Connection refused.") from exc

    monkeypatch.setattr(client.GridQueue, "status", lost)
    monkeypatch.setattr(sys, "argv", ["gridqueue", "status", "--redis", url])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [
        f"error: cannot reach Redis at redis://:***@127.0.0.1:{closed_port}/0 "
        "(Connection refused); start Redis or set GRIDQUEUE_REDIS_URL (or --redis) to its URL"
    ]


def test_run_worker_checks_redis_before_the_gpu_probe(
    monkeypatch: pytest.MonkeyPatch, closed_port: int, clean_env: dict[str, str]
) -> None:
    from gridqueue import worker

    def probe(*_: Any, **__: Any) -> Any:
        raise AssertionError("the GPU probe was opened before Redis was reached")

    monkeypatch.setattr(worker, "make_probe", probe)
    url = f"redis://127.0.0.1:{closed_port}/0"
    with pytest.raises(RedisUnavailableError, match=f"cannot reach Redis at {url}"):
        worker.run_worker(
            name="w1",
            models=["sim-llm"],
            handler_modules=["workers.simulated"],
            concurrency=1,
            settings=Settings(redis_url=url),
            probe_kind="simulated",
        )


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:s3cret@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:s3/cr@et@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://host:6380/0?password=s3cret&ssl=1", "rediss://host:6380/0?password=***&ssl=1"),
        ("unix:///run/redis.sock?db=0&password=s3cret", "unix:///run/redis.sock?db=0&password=***"),
        ("not a url", "not a url"),
    ],
)
def test_the_password_is_masked(url: str, masked: str) -> None:
    assert RedisUnavailableError.mask(url) == masked
    assert "s3cret" not in str(RedisUnavailableError(url, "Connection refused"))


def test_without_details_the_message_is_the_docstring() -> None:
    assert str(RedisUnavailableError()) == RedisUnavailableError.__doc__
