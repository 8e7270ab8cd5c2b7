"""The core failover loop on real parts: a private redis-server, real `gridqueue worker`
processes (Celery prefork), a real watchdog, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gridqueue import GridQueue, JobCancelled, JobExpired, JobFailed
from gridqueue.audit import run_counts
from gridqueue.fleet import LocalFleet
from gridqueue.keys import attempt_id
from gridqueue.ledger import Ledger
from gridqueue.settings import Settings
from gridqueue.states import JobState, WorkerState
from tests.brokers import broker_env
from tests.helpers import wait_for, wait_until_watchdog_judges
from workers.simulated import complete_text

pytestmark = pytest.mark.integration


# Every test here runs on both brokers: the ledger's Redis, and RabbitMQ (tests/brokers.py),
# except the few marked where no broker plays a part.
@pytest.fixture
def settings(redis_url: str, broker_url: str | None) -> Settings:
    return Settings(redis_url=redis_url, broker_url=broker_url)


@pytest.fixture
def fleet(redis_url: str, broker_url: str | None, tmp_path: Path) -> Iterator[LocalFleet]:
    fleet = LocalFleet(redis_url, tmp_path / "logs", env=broker_env(broker_url))
    yield fleet
    fleet.stop_all()


def running_on(ledger: Ledger, job_ids: list[str]) -> dict[str, str]:
    """job -> worker, for the jobs that are RUNNING now."""
    found = {}
    for job_id in job_ids:
        record = ledger.get(job_id)
        if record.state is JobState.RUNNING and record.worker:
            found[job_id] = record.worker
    return found


def test_submit_then_result(fleet: LocalFleet, gq: GridQueue) -> None:
    fleet.start_worker("w1")
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1"])

    job = gq.submit("sim-llm", {"prompt": "hello", "ms": 100})

    assert job.result(timeout=30) == {"text": complete_text("hello"), "worker": "w1", "attempt": 1}
    record = gq.get(job.id)
    assert record.state is JobState.SUCCEEDED
    [attempt] = record.attempts
    assert attempt.worker == "w1" and attempt.outcome == "succeeded"
    assert attempt.pid and attempt.started_ms and attempt.ended_ms >= attempt.started_ms


def test_kill_9_of_a_node_moves_its_jobs_elsewhere(fleet: LocalFleet, gq: GridQueue) -> None:
    for name in ("w1", "w2"):
        fleet.start_worker(name, concurrency=2)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1", "w2"])
    wait_until_watchdog_judges(gq.ledger)  # so the node's death is judged before a stall

    payloads = [{"prompt": f"p{i}", "ms": 2500, "retry_ms": 300} for i in range(4)]
    jobs = [gq.submit("sim-llm", payload) for payload in payloads]
    ids = [j.id for j in jobs]
    placed = wait_for(lambda: len(running_on(gq.ledger, ids)) == 4 and running_on(gq.ledger, ids))
    victim = placed[ids[0]]
    victims_jobs = [job_id for job_id, worker in placed.items() if worker == victim]

    fleet.kill(victim, signal.SIGKILL)  # the whole process group: main process and children

    for job in jobs:
        assert job.result(timeout=60)["text"] == complete_text(gq.get(job.id).payload["prompt"])
    for job_id in victims_jobs:
        history = [(a.worker, a.outcome) for a in gq.get(job_id).attempts]
        assert history[0] == (victim, "node_lost")  # the node died, not the job's child
        assert history[-1][1] == "succeeded" and history[-1][0] != victim
    assert gq.ledger.worker(victim).state is WorkerState.DEAD
    # The requeue removed the dead worker's messages from kombu's unacked structures.
    assert gq.ledger.client.hlen("unacked") == 0


def test_killed_child_requeues_without_the_watchdog(fleet: LocalFleet, gq: GridQueue) -> None:
    fleet.start_worker("w1", concurrency=2)  # no watchdog at all in this test
    fleet.wait_alive(gq.ledger, ["w1"])

    job = gq.submit("sim-llm", {"prompt": "segfault", "ms": 400, "crash": 1})

    assert job.result(timeout=30)["attempt"] == 2
    attempts = gq.get(job.id).attempts
    assert [a.outcome for a in attempts] == ["worker_lost", "succeeded"]
    assert gq.ledger.client.get(gq.ledger.keys.leader) is None  # no watchdog ever led


def test_zombie_result_after_sigcont_is_discarded_and_counted(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    for name in ("w1", "w2"):
        fleet.start_worker(name, concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1", "w2"])

    job = gq.submit("sim-llm", {"prompt": "zombie", "ms": 2000, "retry_ms": 300})
    zombie = wait_for(lambda: running_on(gq.ledger, [job.id]).get(job.id))
    children = fleet.processes[zombie].children()
    assert children, "a prefork worker has pool children"

    fleet.kill(zombie, signal.SIGSTOP)  # frozen: alive, but silent
    result = job.result(timeout=60)
    assert result["worker"] != zombie and result["attempt"] == 2
    # Frozen whole, the node stops heartbeating and its attempt stops beating, and the node
    # is declared dead either way. Both verdicts are right for the attempt, and they race:
    # node_lost when the node's silence is judged first (the usual case: it lapses a second
    # sooner), stalled when one watchdog tick finds both lapsed (a watchdog that just took
    # the lease, or ran a tick late on a busy machine, waits out a grace period first).
    wait_for(lambda: gq.ledger.worker(zombie).state is WorkerState.DEAD, timeout_s=30)

    # The child wakes first and finishes its superseded attempt: the late result must be
    # refused by the ledger, counted, and never become visible.
    for pid in children:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: gq.ledger.stats().get("stale_results_discarded", 0) >= 1)
    fleet.kill(zombie, signal.SIGCONT)

    record = gq.get(job.id)
    assert record.state is JobState.SUCCEEDED and record.result == result
    assert [a.worker for a in record.attempts] == [zombie, result["worker"]]
    assert record.attempts[0].outcome in ("node_lost", "stalled")
    assert record.attempts[0].late_result_discarded
    assert record.attempts[1].outcome == "succeeded"
    assert not record.attempts[1].late_result_discarded
    events = gq.ledger.events()
    [requeued] = [e for e in events if e["type"] == "requeued" and e["job"] == job.id]
    assert requeued["attempt"] == "1" and requeued["outcome"] == record.attempts[0].outcome
    [discarded] = [e for e in events if e["type"] == "stale_result_discarded"]
    assert (discarded["job"], discarded["attempt"], discarded["worker"]) == (job.id, "1", zombie)
    assert (discarded["current_attempt"], discarded["state"]) == ("2", "SUCCEEDED")
    # The zombie is fenced, and re-registers as a new incarnation, on probation: a node
    # that was declared dead gets no work until the delay passes. Fenced one of two ways:
    # its next heartbeat is refused; or, when the reply it reads first is that of a beat it
    # sent just before the freeze (accepted then, while it was still ALIVE), it fences
    # itself, since that beat is older than stale_after_s.
    wait_for(lambda: gq.ledger.worker(zombie).epoch == 2, timeout_s=30)
    refused = int(gq.ledger.stats().get("heartbeats_refused", 0))
    self_fenced = '"event": "worker.self_fenced"' in fleet.processes[zombie].log_path.read_text()
    assert refused >= 1 or self_fenced, "the zombie rejoined without being fenced"
    [rejoined] = [
        e
        for e in gq.ledger.events()
        if e["type"] == "worker_registered" and e["worker"] == zombie and e["epoch"] == "2"
    ]
    assert (rejoined["previous_state"], rejoined["state"]) == ("DEAD", "PROBATION")
    assert gq.ledger.worker(zombie).state is WorkerState.PROBATION  # 10 s by default


def test_exclusive_job_fails_explicitly_when_its_node_dies(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    for name in ("w1", "w2"):
        fleet.start_worker(name)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1", "w2"])
    wait_until_watchdog_judges(gq.ledger)  # so the node's death is judged before a stall

    job = gq.submit("sim-llm", {"prompt": "charge card", "ms": 3000}, workload="exclusive")
    victim = wait_for(lambda: running_on(gq.ledger, [job.id]).get(job.id))
    # RUNNING is the claim; the handler counts its run a moment later. Killed in between
    # (a busy machine), the node would die before the run the test is about had started.
    wait_for(lambda: run_counts(gq.ledger.client, gq.settings.namespace, [job.id])[job.id])
    fleet.kill(victim)

    with pytest.raises(JobFailed) as failure:
        job.result(timeout=30)
    assert failure.value.reason == "worker_lost"
    record = gq.get(job.id)
    assert record.state is JobState.FAILED
    assert [a.outcome for a in record.attempts] == ["node_lost"]  # never run again
    assert record.error is not None and record.error.startswith("outcome unknown")
    # Counted, not assumed: the handler itself recorded every run it started.
    runs = run_counts(gq.ledger.client, gq.settings.namespace, [job.id])
    assert runs == {job.id: 1}


def test_deadline_expires_a_running_job_and_kills_its_attempt(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    fleet.start_worker("w1", concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1"])

    job = gq.submit("sim-llm", {"prompt": "slow", "ms": 30_000}, deadline_s=1.5)

    with pytest.raises(JobExpired) as expired:
        job.result(timeout=30)
    assert expired.value.reason == "deadline"
    assert gq.get(job.id).attempts[0].outcome == "expired"
    # The child running it was killed: the single slot serves the next job promptly.
    assert gq.submit("sim-llm", {"prompt": "next", "ms": 50}).result(timeout=20)["attempt"] == 1


def test_batch_job_waiting_for_capacity_expires_at_its_deadline(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    fleet.start_watchdog()  # no worker serves the model; batch jobs may wait for one
    job = gq.submit("sim-llm", {"prompt": "nobody", "ms": 10}, workload="batch", deadline_s=1.0)
    with pytest.raises(JobExpired):
        job.result(timeout=20)


def test_cancel_kills_the_running_attempt(fleet: LocalFleet, gq: GridQueue) -> None:
    fleet.start_worker("w1", concurrency=1)
    fleet.wait_alive(gq.ledger, ["w1"])
    job = gq.submit("sim-llm", {"prompt": "cancel me", "ms": 30_000})
    wait_for(lambda: job.status() is JobState.RUNNING)

    assert job.cancel() is True
    assert job.cancel() is False  # already ended: a second cancel changes nothing

    with pytest.raises(JobCancelled):
        job.result(timeout=5)
    assert gq.submit("sim-llm", {"prompt": "next", "ms": 50}).result(timeout=20)["worker"] == "w1"


def test_handler_errors_follow_the_class_policy(fleet: LocalFleet, gq: GridQueue) -> None:
    fleet.start_worker("w1", concurrency=2)
    fleet.wait_alive(gq.ledger, ["w1"])

    invalid = gq.submit("sim-llm", {"prompt": "x", "fail": "invalid"})
    transient = gq.submit("sim-llm", {"prompt": "x", "fail": "transient"})

    with pytest.raises(JobFailed) as bad:
        invalid.result(timeout=20)
    assert bad.value.reason == "invalid_input"
    assert len(gq.get(invalid.id).attempts) == 1  # invalid input is never retried
    with pytest.raises(JobFailed) as flaky:
        transient.result(timeout=20)
    assert flaky.value.reason == "error"
    assert [a.outcome for a in gq.get(transient.id).attempts] == ["error"] * 3  # realtime: 3


def test_producer_killed_between_ledger_write_and_publish(
    fleet: LocalFleet, gq: GridQueue, redis_url: str
) -> None:
    fleet.start_worker("w1")
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1"])
    # A producer that writes the job (submit's first step) and dies before publishing.
    script = (
        "import os, signal, sys\n"
        "from gridqueue import GridQueue\n"
        "gq = GridQueue(sys.argv[1])\n"
        "job_id = gq.ledger.submit('orphan', 'sim-llm', 'realtime',"
        ' \'{"prompt": "orphan", "ms": 50}\', 60000, None).job_id\n'
        "print(job_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    producer = subprocess.run(
        [sys.executable, "-c", script, redis_url], capture_output=True, text=True, timeout=60
    )
    assert producer.returncode == -signal.SIGKILL
    assert producer.stdout.strip() == "orphan"

    assert gq.job("orphan").result(timeout=30)["text"] == complete_text("orphan")


def test_standby_watchdog_takes_over_and_failover_still_works(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    for name in ("w1", "w2"):
        fleet.start_worker(name)
    leader = fleet.start_watchdog("watchdog-a")
    fleet.wait_alive(gq.ledger, ["w1", "w2"])
    leader_key = gq.ledger.keys.leader
    wait_for(lambda: str(leader.pid) in (gq.ledger.client.get(leader_key) or ""))
    standby = fleet.start_watchdog("watchdog-b")

    fleet.kill("watchdog-a")
    wait_for(lambda: str(standby.pid) in (gq.ledger.client.get(leader_key) or ""), 20)

    job = gq.submit("sim-llm", {"prompt": "after takeover", "ms": 2500, "retry_ms": 300})
    victim = wait_for(lambda: running_on(gq.ledger, [job.id]).get(job.id))
    fleet.kill(victim)
    result = job.result(timeout=60)
    assert result["worker"] != victim and result["attempt"] == 2


# The ledger alone decides that a key names a job; submit_then_result covers both brokers.
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_idempotency_key_returns_the_same_job(fleet: LocalFleet, gq: GridQueue) -> None:
    fleet.start_worker("w1")
    fleet.wait_alive(gq.ledger, ["w1"])
    first = gq.submit("sim-llm", {"prompt": "once", "ms": 50}, idempotency_key="order-42")
    second = gq.submit("sim-llm", {"prompt": "once", "ms": 50}, idempotency_key="order-42")
    assert second.id == first.id and first.created and not second.created
    assert first.result(timeout=20) == second.result(timeout=20)
    assert gq.ledger.counts()["SUCCEEDED"] == 1


# The broker plays no part below: the CLI refuses before it connects to one.
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sim-llm", "--payload", "{not json"], "not valid JSON"),
        (["sim-llm", "--workload", "nope"], "unknown workload class"),
        (["", "--payload", "{}"], "invalid model name"),
    ],
)
def test_cli_submit_refuses_bad_input_and_writes_nothing(
    redis_url: str, gq: GridQueue, args: list[str], message: str
) -> None:
    cli = [sys.executable, "-m", "gridqueue.cli", "submit", *args, "--redis", redis_url]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in " ".join(done.stderr.split())
    assert gq.ledger.client.dbsize() == 0


# Read from the ledger alone, whichever broker carries the messages.
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_cli_status_json_lists_workers_and_counts(fleet: LocalFleet, gq: GridQueue) -> None:
    fleet.start_worker("w1")
    fleet.wait_alive(gq.ledger, ["w1"])
    gq.submit("sim-llm", {"prompt": "s", "ms": 10}).result(timeout=20)
    cli = [sys.executable, "-m", "gridqueue.cli", "status", "--json"]
    done = subprocess.run(
        cli, capture_output=True, text=True, timeout=60, env=fleet.env, check=True
    )
    overview = json.loads(done.stdout)
    [worker] = overview["workers"]
    assert worker["name"] == "w1" and worker["state"] == "ALIVE"
    assert worker["heartbeat_age_ms"] < 5000
    assert overview["jobs"]["SUCCEEDED"] == 1


def test_requeued_attempt_runs_ahead_of_fresh_work(fleet: LocalFleet, gq: GridQueue) -> None:
    # One slot in the fleet, busy: the fresh work waits in the queue behind it.
    fleet.start_worker("w1", concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1"])
    lost = gq.submit("sim-llm", {"prompt": "lost", "ms": 4000, "retry_ms": 300})
    wait_for(lambda: running_on(gq.ledger, [lost.id]).get(lost.id) == "w1")
    waiting = [gq.submit("sim-llm", {"prompt": f"fresh {i}", "ms": 100}) for i in range(3)]

    fleet.kill("w1")

    # The failover is published while the fresh work still waits, and nothing can take
    # either yet: whichever slot frees first has both to choose from. (Timed against a
    # survivor's running job instead, the requeue could lose that race on a slow machine
    # and find the fresh work already started, as the contract allows.)
    requeued = attempt_id(lost.id, 2)
    wait_for(
        lambda: (
            (r := gq.get(lost.id)).state is JobState.QUEUED
            and r.attempt == 2
            and gq.ledger.client.zscore(gq.ledger.keys.dispatch, requeued) is None
        ),
        timeout_s=30,
    )
    assert all(job.status() is JobState.QUEUED for job in waiting)
    fleet.start_worker("w2", concurrency=1)

    failed_over = lost.result(timeout=60)
    for job in waiting:
        assert job.result(timeout=60)["worker"] == "w2"
    assert failed_over == {**failed_over, "worker": "w2", "attempt": 2}
    requeued_start = gq.get(lost.id).attempts[-1].started_ms
    fresh_starts = [gq.get(job.id).attempts[0].started_ms for job in waiting]
    assert all(requeued_start < start for start in fresh_starts), (requeued_start, fresh_starts)


# Refused before any write: no broker is ever reached.
@pytest.mark.parametrize("broker_url", ["redis"], indirect=True)
def test_every_bad_input_is_refused_before_anything_is_written(gq: GridQueue) -> None:
    from gridqueue.errors import (
        InvalidModelError,
        PayloadNotJSONError,
        PayloadTooLargeError,
        UnknownWorkloadError,
    )

    small = GridQueue(settings=gq.settings.model_copy(update={"payload_max_bytes": 64}))
    cases = [
        (lambda: gq.submit("sim-llm", {"prompt": "x"}, workload="gold"), UnknownWorkloadError),
        (lambda: gq.submit("sim-llm", {"prompt": {1, 2}}), PayloadNotJSONError),
        (lambda: gq.submit("sim-llm", {"x": float("nan")}), PayloadNotJSONError),
        (lambda: small.submit("sim-llm", {"prompt": "x" * 100}), PayloadTooLargeError),
        (lambda: gq.submit("", {"prompt": "x"}), InvalidModelError),
        (lambda: gq.submit("   ", {"prompt": "x"}), InvalidModelError),
    ]
    for call, error in cases:
        with pytest.raises(error):
            call()
    assert gq.ledger.client.dbsize() == 0  # no job, no queue message, no event
    small.close()


def test_warm_shutdown_finishes_running_work_in_place(fleet: LocalFleet, gq: GridQueue) -> None:
    for name in ("w1", "w2"):
        fleet.start_worker(name, concurrency=1)
    fleet.start_watchdog()
    fleet.wait_alive(gq.ledger, ["w1", "w2"])
    job = gq.submit("sim-llm", {"prompt": "finish me", "ms": 2500})
    worker = wait_for(lambda: running_on(gq.ledger, [job.id]).get(job.id))

    fleet.processes[worker].process.send_signal(signal.SIGTERM)  # a normal `docker stop`

    result = job.result(timeout=30)
    assert result["worker"] == worker and result["attempt"] == 1  # not thrown away
    wait_for(lambda: gq.ledger.worker(worker).state is WorkerState.STOPPED, timeout_s=30)
    assert gq.ledger.stats().get("requeues", 0) == 0
