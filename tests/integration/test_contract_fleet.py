"""The contract's holes, closed end to end: real `gridqueue worker` and `gridqueue
watchdog` processes on a private redis-server, and real deaths at the moments between a
message, its claim and its watch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import redis

from gridqueue import GridQueue
from gridqueue.celeryapp import make_celery, priority_lists
from gridqueue.fleet import LocalFleet
from gridqueue.handlers import Context, handler
from gridqueue.keys import KOMBU_UNACKED, attempt_id, queue_for_model
from gridqueue.ledger import DispatchLease, Ledger, connect_redis
from gridqueue.runner import WorkerRuntime, install_runtime, run_attempt
from gridqueue.settings import Settings
from gridqueue.states import JobState, WorkerState
from gridqueue.watchdog import Watchdog
from tests.helpers import wait_for
from workers.simulated import complete_text


def queue_depth(client: redis.Redis, queue: str) -> int:
    """Messages waiting in a model's queue, over kombu's priority lists."""
    return sum(int(client.llen(name)) for name in priority_lists(queue))  # type: ignore[arg-type]


def event_times(gq: GridQueue, kind: str) -> list[int]:
    return [int(e["ts"]) for e in gq.ledger.events() if e["type"] == kind]


def test_a_node_killed_after_taking_a_message_does_not_strand_its_job(
    fleet: LocalFleet, gq: GridQueue, redis_url: str
) -> None:
    """kombu moves a delivered message to ``unacked``, where nothing redelivers it (the
    visibility timeout is ten years). A node killed before claiming it must not leave the
    job QUEUED forever: the watchdog's sweep publishes it again within the claim grace."""
    fleet.start_watchdog()
    queue = queue_for_model(gq.settings.namespace, "sim-llm")
    taker = subprocess.Popen(
        [sys.executable, "-m", "gridqueue.faults", "take", redis_url, queue, "60"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        job = gq.submit("sim-llm", {"prompt": "stranded", "ms": 50}, workload="batch")
        assert taker.stdout is not None
        taken = json.loads(taker.stdout.readline())
        assert taken["task_id"] == attempt_id(job.id, 1)
        assert gq.ledger.client.hexists(KOMBU_UNACKED, taken["delivery_tag"])
    finally:
        os.killpg(taker.pid, signal.SIGKILL)  # the node dies holding the message
        taker.wait(timeout=30)
        if taker.stdout is not None:
            taker.stdout.close()
    killed_ms = gq.ledger.time_ms()
    fleet.start_worker("w1")

    assert job.result(timeout=90)["text"] == complete_text("stranded")
    record = gq.get(job.id)
    assert [(a.n, a.worker, a.outcome) for a in record.attempts] == [(1, "w1", "succeeded")]
    assert not gq.ledger.client.hexists(KOMBU_UNACKED, taken["delivery_tag"])
    assert gq.ledger.stats()["stranded_deliveries"] == 1
    # Generous bound (latency is the benchmark's to measure): the claim grace plus ticks.
    (stranded_ms,) = event_times(gq, "delivery_stranded")
    grace_ms = (gq.settings.stale_after_s + gq.settings.dispatch_grace_s) * 1000
    assert stranded_ms - killed_ms <= grace_ms + 10_000


def test_a_child_killed_before_its_claim_leaves_no_queued_job(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    """A child that dies after Celery handed it the attempt but before its claim: Celery
    acks the message (nothing holds the attempt any more) and the worker agent must
    publish it again. No watchdog runs here: the agent alone must do it."""
    fleet.start_worker("w1", concurrency=1, handlers="tests.integration.die_before_claim")
    fleet.wait_alive(gq.ledger, ["w1"])
    client = gq.ledger.client
    job_id = "0" * 32
    client.sadd(f"{gq.settings.namespace}:test:die_before_claim", job_id)
    submitted = gq.ledger.submit(
        job_id, "sim-llm", "batch", '{"prompt":"orphaned","ms":50}', 60_000, None
    )
    assert gq.dispatcher.publish(attempt_id(job_id, 1), submitted.dispatch_lease)

    assert gq.job(job_id).result(timeout=60)["text"] == complete_text("orphaned")
    record = gq.get(job_id)
    assert [(a.n, a.outcome) for a in record.attempts] == [(1, "succeeded")]
    assert gq.ledger.stats()["redeliveries"] == 1
    # Celery also requeued the message: its second delivery is refused and acked.
    wait_for(lambda: client.hlen(KOMBU_UNACKED) == 0)


@pytest.fixture
def short_dispatch_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    """A dispatch grace of 0.5 s (2 s by default) for the fleet and the producer alike:
    a backlog outwaits many graces in a few seconds."""
    monkeypatch.setenv("GRIDQUEUE_DISPATCH_GRACE_S", "0.5")
    return 0.5


def test_a_backlog_waiting_in_its_queue_is_never_republished(
    short_dispatch_grace: float, fleet: LocalFleet, gq: GridQueue
) -> None:
    """A long queue on a busy fleet: messages wait far longer than any grace, and none is
    published twice."""
    assert gq.settings.dispatch_grace_s == short_dispatch_grace
    assert fleet.env["GRIDQUEUE_DISPATCH_GRACE_S"] == str(short_dispatch_grace)
    fleet.start_watchdog()
    fleet.start_worker("w1", concurrency=1)
    fleet.wait_alive(gq.ledger, ["w1"])
    jobs = [
        gq.submit("sim-llm", {"prompt": f"b{i}", "ms": 100}, workload="batch") for i in range(2000)
    ]
    # Well past the claim grace and the dispatch grace, while the worker works through it.
    time.sleep(3 * (gq.settings.stale_after_s + gq.settings.dispatch_grace_s))
    working = gq.ledger.stats()
    # While the backlog waited: every job published once, by its submit, and nothing
    # taken for stranded, duplicated or stale.
    assert working.get("attempts_published", 0) == len(jobs), working
    for stat in ("stranded_deliveries", "duplicate_deliveries", "stale_deliveries"):
        assert working.get(stat, 0) == 0, (stat, working)

    fleet.stop("w1")  # warm shutdown: finishes what runs, takes nothing more
    time.sleep(2 * gq.settings.dispatch_grace_s)  # and the watchdog keeps ticking

    queue = queue_for_model(gq.settings.namespace, "sim-llm")
    counts = gq.ledger.counts()
    assert counts["SUCCEEDED"] > 0, "the fleet was working through the backlog"
    assert counts["SUCCEEDED"] + counts["QUEUED"] == len(jobs)
    # Every queued job still has its message, and nothing is held or owed. Not "exactly
    # one": a message the consumer took as the shutdown began stays in kombu's unacked
    # until the worker's last connection closes, which a shutdown longer than the claim
    # grace outlasts; the sweep then publishes it again and kombu puts the original back,
    # and the claim admits one of the two.
    assert queue_depth(gq.ledger.client, queue) >= counts["QUEUED"]
    assert gq.ledger.client.hlen(KOMBU_UNACKED) == 0
    assert gq.ledger.client.zcard(gq.ledger.keys.dispatch) == 0


def test_a_second_process_under_a_live_name_is_refused_and_fences_no_one(
    fleet: LocalFleet, gq: GridQueue, redis_url: str, tmp_path: Path
) -> None:
    fleet.start_worker("w1")
    fleet.wait_alive(gq.ledger, ["w1"])
    first = gq.ledger.worker("w1")
    assert first is not None

    second = subprocess.run(
        [sys.executable, "-m", "gridqueue.cli", "worker", "--name", "w1", "--models", "sim-llm",
         "--handlers", "workers.simulated", "--probe", "simulated", "--loglevel", "WARNING"],
        env={**os.environ, "GRIDQUEUE_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip

    assert second.returncode == 2
    output = second.stdout + second.stderr
    assert f"in use by pid {first.pid}" in output and first.host in output
    after = gq.ledger.worker("w1")
    assert after is not None
    assert (after.epoch, after.pid, after.state) == (first.epoch, first.pid, WorkerState.ALIVE)
    job = gq.submit("sim-llm", {"prompt": "still here", "ms": 20})
    assert job.result(timeout=30)["worker"] == "w1"


# -- the beat lasts until the outcome is written --------------------------------------------

SLOW_WRITES = {"s": 0.0}


@handler("contract-echo")
def _echo(payload: Any, ctx: Context) -> Any:
    return payload


class SlowCompleteLedger(Ledger):
    """The ledger, with a result write that takes longer than the attempt's liveness
    timeout, as a write retried through a Redis blip does."""

    def complete(self, job_id: str, attempt: int, worker: str, result_json: str) -> bool:
        time.sleep(SLOW_WRITES["s"])
        return super().complete(job_id, attempt, worker, result_json)


def test_an_attempt_beats_until_its_result_is_written(settings: Settings, tmp_path: Path) -> None:
    workloads = tmp_path / "workloads.toml"
    workloads.write_text(
        "[quick]\nidempotent = true\nmax_attempts = 3\nwait_for_capacity = true\n"
        "liveness_timeout_s = 0.4\nstall_timeout_s = 30.0\n"
    )
    settings = settings.model_copy(update={"workloads_file": workloads})
    ledger = SlowCompleteLedger(connect_redis(settings.redis_url), settings)
    runtime = WorkerRuntime("w1", ["contract-echo"], settings, 1, make_celery(settings.redis_url))
    runtime._ledger, runtime._pid = ledger, os.getpid()
    install_runtime(runtime)
    epoch = ledger.register(
        "w1", ["contract-echo"], os.getpid(), "node-a", 1, "{}",
        model_fit={"contract-echo": {"required_bytes": 0, "largest_gpu_bytes": 0}},
    )  # fmt: skip
    submitted = ledger.submit("j-slow", "contract-echo", "quick", '{"x":1}', 0, None)

    watchdog = Watchdog(settings, owner="contract-watchdog")
    stop = threading.Event()

    def node_and_watchdog() -> None:
        while not stop.wait(0.05):  # the node heartbeats; the watchdog ticks
            ledger.heartbeat("w1", epoch)
            watchdog.tick()

    background = threading.Thread(target=node_and_watchdog, daemon=True)
    background.start()
    try:
        time.sleep(watchdog.grace_s + 0.2)  # past the new leader's grace: it judges now
        SLOW_WRITES["s"] = 4 * 0.4
        task = SimpleNamespace(request=SimpleNamespace(properties={"delivery_tag": ""}))
        run_attempt(task, submitted.job_id, 1)  # type: ignore[arg-type]
    finally:
        SLOW_WRITES["s"] = 0.0
        stop.set()
        background.join(timeout=10)
    record = ledger.get(submitted.job_id)
    assert record.state is JobState.SUCCEEDED and record.result == {"x": 1}
    assert [a.outcome for a in record.attempts] == ["succeeded"]
    assert ledger.stats().get("stalls", 0) == 0


# -- submit() after the commit ------------------------------------------------------------


class BlipAfterCommitLedger(Ledger):
    """The ledger, with Redis dropping the connection right after submit's commit: the
    producer's next ledger step (it ends the dispatch it leased at submit) fails, and so
    would a lease taken anew."""

    def begin_dispatch(self, member: str, own_lease: str = "") -> Any:
        raise redis.ConnectionError("connection reset by peer")

    def end_dispatch(self, lease: DispatchLease, message: Any = None) -> bool:
        raise redis.ConnectionError("connection reset by peer")


def _connection_reset(*args: Any, **kwargs: Any) -> Any:
    raise redis.ConnectionError("connection reset by peer")


@pytest.mark.parametrize("message_sent", [False, True], ids=["unsent", "sent"])
def test_submit_returns_the_handle_of_a_committed_job_whatever_the_publish_does(
    fleet: LocalFleet, settings: Settings, monkeypatch: pytest.MonkeyPatch, message_sent: bool
) -> None:
    """On the send_task path (a broker the ledger's scripts cannot reach, as RabbitMQ),
    the blip either takes the broker's connection too, and the message never goes out,
    or comes after the message is out and before its dispatch entry is ended: the entry
    lingers, and whatever a second publish sends, the claim refuses."""
    gq = GridQueue(settings=settings)
    gq.ledger = BlipAfterCommitLedger(gq.ledger.client, settings)
    gq.dispatcher.renderer = None  # the send_task path
    if not message_sent:
        monkeypatch.setattr(gq.app, "send_task", _connection_reset)
    try:
        job = gq.submit("sim-llm", {"prompt": "committed", "ms": 20}, workload="batch")
        assert gq.get(job.id).state is JobState.QUEUED
        assert gq.ledger.client.zscore(gq.ledger.keys.dispatch, attempt_id(job.id, 1))
        # The dispatch entry covers the publish: the watchdog sends it after the grace.
        fleet.start_watchdog()
        fleet.start_worker("w1")
        assert gq.job(job.id).result(timeout=60)["text"] == complete_text("committed")
        assert len(gq.get(job.id).attempts) == 1
    finally:
        gq.close()


def test_a_submit_on_the_ledgers_redis_has_its_message_out_when_it_returns(
    fleet: LocalFleet, settings: Settings
) -> None:
    """On the ledger's own Redis as the broker, submit is one step: the job and attempt
    1's message are written together, so a blip right after the commit (no other ledger
    step works) leaves nothing to publish: no dispatch entry, the message in its queue,
    and the job runs once a worker comes, with no watchdog."""
    gq = GridQueue(settings=settings)
    gq.ledger = BlipAfterCommitLedger(gq.ledger.client, settings)
    try:
        job = gq.submit("sim-llm", {"prompt": "one step", "ms": 20}, workload="batch")
        member = attempt_id(job.id, 1)
        assert gq.get(job.id).state is JobState.QUEUED
        assert gq.ledger.client.zscore(gq.ledger.keys.dispatch, member) is None
        assert gq.ledger.client.zscore(gq.ledger.keys.published, member) is not None
        queue = queue_for_model(settings.namespace, "sim-llm")
        assert sum(int(gq.ledger.client.llen(name)) for name in priority_lists(queue)) == 1
        fleet.start_worker("w1")
        assert gq.job(job.id).result(timeout=60)["text"] == complete_text("one step")
        assert len(gq.get(job.id).attempts) == 1
    finally:
        gq.close()


@pytest.fixture(autouse=True)
def _quiet_runtime() -> Any:
    yield
    # Tests that install an in-process worker runtime leave nothing behind for others.
    import gridqueue.runner as runner

    runner._runtime = None
