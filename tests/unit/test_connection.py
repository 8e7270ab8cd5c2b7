"""Redis targets: plain URLs and kombu's Sentinel form, and the one-line errors a partial
or unreachable Sentinel configuration gets (exit 2, nothing written)."""

from __future__ import annotations

import socket

import pytest
from pydantic import ValidationError

from gridqueue.celeryapp import make_celery
from gridqueue.connection import RedisTarget, RedisTargetError, parse_sentinel_url
from gridqueue.errors import RedisUnavailableError
from gridqueue.settings import Settings
from tests.unit.test_cli_errors import PASSWORD, clean_env, run_cli  # noqa: F401

URL = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2;sentinel://10.0.0.3:26380/2"


def test_a_sentinel_url_lists_every_sentinel_and_the_database() -> None:
    parsed = parse_sentinel_url(URL)
    assert parsed.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380))
    assert parsed.db == 2
    assert parsed.password is None


def test_the_password_in_a_sentinel_url_is_the_primarys() -> None:
    parsed = parse_sentinel_url("sentinel://:s%40cret@h1:1;sentinel://:s%40cret@h2:2/0")
    assert parsed.password == "s@cret"
    assert parsed.db == 0


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("sentinel://h1:1;redis://h2:2/0", "starts with sentinel://"),
        ("sentinel://:26379/0", "no host"),
        ("sentinel://h1:port/0", "bad port"),
        ("sentinel://h1:1/zero", "a number"),
    ],
)
def test_a_malformed_sentinel_url_says_what_is_wrong(url: str, why: str) -> None:
    with pytest.raises(RedisTargetError, match=why):
        parse_sentinel_url(url)


def test_a_sentinel_url_needs_the_masters_name() -> None:
    with pytest.raises(ValidationError, match="GRIDQUEUE_REDIS_SENTINEL_MASTER"):
        Settings(redis_url=URL)


def test_a_master_name_needs_a_sentinel_url() -> None:
    with pytest.raises(ValidationError, match="not a sentinel:// URL"):
        Settings(redis_url="redis://127.0.0.1:6379/0", redis_sentinel_master="mymaster")


def test_the_broker_gets_kombus_sentinel_transport_options() -> None:
    settings = Settings(
        redis_url=URL, redis_sentinel_master="gq-main", redis_sentinel_password="sentinel-pw"
    )
    options = make_celery(settings.redis_target).conf.broker_transport_options
    assert options["master_name"] == "gq-main"
    assert options["sentinel_kwargs"] == {"password": "sentinel-pw"}
    plain = make_celery(Settings().redis_target).conf.broker_transport_options
    assert "master_name" not in plain


def test_every_part_of_a_sentinel_url_is_masked() -> None:
    masked = RedisUnavailableError.mask(f"sentinel://:{PASSWORD}@h1:1;sentinel://:{PASSWORD}@h2:2/0")
    assert PASSWORD not in masked
    assert masked == "sentinel://:***@h1:1;sentinel://:***@h2:2/0"


def test_a_plain_target_needs_no_master() -> None:
    target = RedisTarget("rediss://:pw@redis.internal:6380/0")
    assert not target.is_sentinel
    assert target.broker_options() == {}


def test_a_sentinel_url_without_a_master_is_one_line_and_exit_2(
    clean_env: dict[str, str],  # noqa: F811
) -> None:
    result = run_cli(["status"], {**clean_env, "GRIDQUEUE_REDIS_URL": URL})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "GRIDQUEUE_REDIS_SENTINEL_MASTER" in result.stderr


def test_an_unreachable_sentinel_set_is_one_line_and_exit_2(
    clean_env: dict[str, str],  # noqa: F811
) -> None:
    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    url = ";".join(f"sentinel://:{PASSWORD}@127.0.0.1:{p}" for p in ports) + "/0"
    env = {**clean_env, "GRIDQUEUE_REDIS_URL": url, "GRIDQUEUE_REDIS_SENTINEL_MASTER": "gq"}
    result = run_cli(["submit", "sim-llm", "--payload", '{"prompt": "x"}'], env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output and PASSWORD not in output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot reach Redis at sentinel://:***@127.0.0.1" in lines[0]
    assert "gq" in lines[0]  # the master it asked for
