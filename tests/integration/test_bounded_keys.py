"""Everything gridqueue writes has a bound: after a run of 5,000 jobs and 200 worker
names, and the job retention, the key count is back to its floor."""

from __future__ import annotations

import time

from gridqueue.ledger import Ledger
from gridqueue.settings import Settings
from gridqueue.states import JobState, Outcome
from gridqueue.watchdog import Watchdog

GIB = 2**30
FIT = {"sim-llm": {"required_bytes": 8 * GIB, "largest_gpu_bytes": 80 * GIB}}
PAYLOAD = '{"prompt":"p","ms":10}'


def keys_of(ledger: Ledger) -> set[str]:
    return set(ledger.client.scan_iter(count=1000))  # type: ignore[arg-type]


def test_keys_return_to_their_floor_after_the_retention(settings: Settings) -> None:
    settings = settings.model_copy(
        update={
            "job_retention_s": 5,
            "stale_after_s": 0.2,
            "heartbeat_interval_s": 0.05,
            "watchdog_lease_s": 60.0,
        }
    )
    watchdog = Watchdog(settings, owner="bounds")
    ledger = watchdog.ledger
    watchdog.tick()
    floor = keys_of(ledger)  # the leader's keys and the first events: a fleet at rest

    # 200 worker names come and go: half stop cleanly, half die.
    token = ledger.lease("bounds", 60_000)[1]
    for k in range(200):
        ledger.register(f"w{k}", ["sim-llm"], 1000 + k, "node", 1, "{}", model_fit=FIT)
    runners = [f"w{k}" for k in range(4)]
    # 5,000 jobs through the ledger as workers run them: most succeed (some waited on by
    # their producer, some with idempotency keys), some fail as poison, some are cancelled.
    for n in range(5000):
        job = f"job{n}"
        ledger.submit(job, "sim-llm", "batch", PAYLOAD, 60_000, f"idem{n}" if n % 5 == 0 else None)
        if n % 250 == 1:  # poison: it takes down three workers' children
            for attempt, worker in enumerate(runners[:3], start=1):
                assert ledger.claim(job, attempt, worker, 7, "").status == "ok"
                end = ledger.end_attempt(job, attempt, Outcome.WORKER_LOST, worker=worker, pid=7)
                assert end.status in ("retry", "ended")
            assert ledger.get(job).state is JobState.DEAD_LETTERED
        elif n % 100 == 2:
            assert ledger.cancel(job)
        else:
            worker = runners[n % len(runners)]
            assert ledger.claim(job, 1, worker, 7, "").status == "ok"
            if n % 50 == 3:  # a streaming job: its stream and checkpoint go with it
                assert ledger.emit(job, 1, worker, 0, "tok0")
                assert ledger.checkpoint(job, 1, worker, 1, {"next": 1})
                assert ledger.emit(job, 1, worker, 1, "tok1")
            assert ledger.complete(job, 1, worker, '{"ok":true}')
            if n % 100 == 0:
                assert ledger.wait(job, 1).state is JobState.SUCCEEDED
    for k in range(0, 200, 2):
        ledger.unregister(f"w{k}", 1)
    time.sleep(settings.stale_after_s * 1.5)
    for k in range(1, 200, 2):
        assert ledger.declare_dead(f"w{k}", token) is not None

    assert len(keys_of(ledger)) > 2000  # the run left its marks (the first may be gone)

    time.sleep(settings.job_retention_s + 0.5)
    for _ in range(3):  # the leader forgets at most a batch a second
        watchdog._next_forget = 0.0
        watchdog.tick()
    left = keys_of(ledger) - floor
    # What stays is fixed in size: counters by state and by name, histograms by label
    # (bounded by the classes, outcomes and kinds), the models served, the capped streams;
    # and the per-minute counters, which expire on their own.
    fixed = {
        ledger.keys.stats,
        ledger.keys.events,
        ledger.keys.folded,
        ledger.keys.hist,
        ledger.keys.models,
        ledger.keys.incidents,
    }
    minutes = {key for key in left if key.startswith(ledger.keys.minute(0)[:-1])}
    assert all(0 < ledger.client.ttl(key) <= 7200 for key in minutes), minutes
    assert left - minutes <= fixed, sorted(left - minutes - fixed)[:20]
    # The counts are of the jobs the ledger holds: the ended ones have expired.
    assert ledger.counts() == {state.value: 0 for state in JobState}
    assert ledger.client.zcard(ledger.keys.gone) == 0
    assert ledger.client.zcard(ledger.keys.dead_letters) == 0
    assert ledger.workers() == []


def test_a_workers_job_list_keeps_about_its_most_recent_ten_thousand(ledger: Ledger) -> None:
    """The dashboard's jobs-by-worker list is trimmed by about one claim in 50, not by
    every claim: it stays within a few dozen of its bound, and keeps the newest."""
    ledger.register("w1", ["sim-llm"], 100, "node-a", 1, "{}", model_fit=FIT)
    jobs = [f"job-{n:05d}" for n in range(12_000)]
    for first in range(0, len(jobs), 1000):
        pipe = ledger.client.pipeline(transaction=False)
        for job in jobs[first : first + 1000]:
            ledger.queue_call(
                pipe, "submit", job, "sim-llm", "realtime", PAYLOAD, 0, "", 0, 5000, "1",
                5000, 300_000,
            )  # fmt: skip
            ledger.queue_call(pipe, "claim", job, 1, "w1", 100, "", 60_000)
            ledger.queue_call(pipe, "complete", job, 1, "w1", "{}")
        ledger.execute(pipe)
    listed = ledger.client.zrange(ledger.keys.worker_jobs("w1"), 0, -1)
    assert 10_000 <= len(listed) <= 10_000 + 500, len(listed)
    assert listed[-1] == jobs[-1] and jobs[-len(listed)] == listed[0]
