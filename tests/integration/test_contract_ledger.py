"""The contract's holes, closed in the ledger: each test drives the real Lua scripts on a
private redis-server the way a worker, a producer or the watchdog would, and checks that
a job that has not ended always has an owner that will move it.
"""

from __future__ import annotations

import json
import time

import pytest

from gridqueue.brokers.rendering import RenderedMessage
from gridqueue.celeryapp import priority_lists
from gridqueue.dispatch import Dispatcher
from gridqueue.errors import DoesNotFitError, NoCapacityError, WorkerNameInUseError
from gridqueue.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, attempt_id, queue_for_model
from gridqueue.ledger import _SCRIPTS, AttemptEnd, DispatchLease, Ledger, connect_redis
from gridqueue.lua import script_source
from gridqueue.settings import Settings
from gridqueue.states import JobState, Outcome, WorkerState
from gridqueue.watchdog import TickReport, Watchdog

GIB = 2**30
PAYLOAD = '{"prompt":"p","ms":10}'


def fits(*models: str, required_gib: int = 8, largest_gib: int = 80) -> dict[str, dict[str, int]]:
    fit = {"required_bytes": required_gib * GIB, "largest_gpu_bytes": largest_gib * GIB}
    return {model: dict(fit) for model in models}


def register(
    ledger: Ledger,
    name: str,
    *models: str,
    pid: int = 100,
    host: str = "node-a",
    model_fit: dict[str, dict[str, int]] | None = None,
) -> int:
    models = models or ("sim-llm",)
    return ledger.register(
        name, list(models), pid, host, 1, "{}", model_fit=model_fit or fits(*models)
    )


def submit(ledger: Ledger, job_id: str, model: str = "sim-llm", workload: str = "realtime") -> str:
    return ledger.submit(job_id, model, workload, PAYLOAD, 60_000, None).job_id


def deliver(
    ledger: Ledger, job_id: str, n: int, tag: str, age_s: float, model: str = "sim-llm"
) -> None:
    """What kombu writes when a consumer takes a message with acks_late: the message in
    ``unacked`` and its delivery time (the consumer's clock, seconds) in
    ``unacked_index``."""
    queue = queue_for_model(ledger.settings.namespace, model)
    message = {
        "body": "",
        "headers": {"id": attempt_id(job_id, n), "task": "gridqueue.attempt"},
        "properties": {"delivery_tag": tag},
    }
    client = ledger.client
    client.hset(KOMBU_UNACKED, tag, json.dumps([message, "", queue]))
    client.zadd(KOMBU_UNACKED_INDEX, {tag: time.time() - age_s})


def leader(ledger: Ledger) -> str:
    held, token = ledger.lease("test-watchdog", 60_000)
    assert held
    return token


# -- hole 1: message taken, never claimed ---------------------------------------------------


def test_a_delivery_unclaimed_past_the_grace_is_republished_and_removed(ledger: Ledger) -> None:
    register(ledger, "w1")
    job = submit(ledger, "j1")
    ledger.client.zrem(ledger.keys.dispatch, attempt_id(job, 1))  # the producer published it
    deliver(ledger, job, 1, "tag-dead", age_s=ledger.settings.dispatch_grace_s + 1)

    recovered = ledger.sweep_deliveries(leader(ledger))

    assert recovered == [attempt_id(job, 1)]
    assert ledger.client.hget(KOMBU_UNACKED, "tag-dead") is None
    assert ledger.client.zscore(KOMBU_UNACKED_INDEX, "tag-dead") is None
    due = ledger.client.zscore(ledger.keys.dispatch, attempt_id(job, 1))
    assert due is not None and due <= ledger.time_ms()
    assert ledger.stats()["stranded_deliveries"] == 1
    assert ledger.get(job).state is JobState.QUEUED  # same attempt, published again


def test_a_delivery_within_its_claim_grace_is_left_alone(ledger: Ledger) -> None:
    register(ledger, "w1")
    job = submit(ledger, "j1")
    deliver(ledger, job, 1, "tag-fresh", age_s=0.0)

    assert ledger.sweep_deliveries(leader(ledger)) == []
    assert ledger.client.hget(KOMBU_UNACKED, "tag-fresh") is not None


def test_a_claimed_delivery_leaves_the_sweep_for_good(ledger: Ledger) -> None:
    """A long-running attempt's message stays in unacked (acks_late) while it runs: the
    sweep must not republish it, and must not read it again every tick."""
    register(ledger, "w1")
    job = submit(ledger, "j1")
    deliver(ledger, job, 1, "tag-run", age_s=0.0)
    assert ledger.claim(job, 1, "w1", 4242, "tag-run").status == "ok"
    # Long after the claim grace, the delivery is still out of range.
    ceiling = time.time() + 3600
    assert ledger.client.zrangebyscore(KOMBU_UNACKED_INDEX, "-inf", ceiling) == []
    assert ledger.sweep_deliveries(leader(ledger)) == []
    assert ledger.get(job).state is JobState.RUNNING


def test_deliveries_of_other_applications_are_never_touched(ledger: Ledger) -> None:
    """Another Celery app (or another gridqueue namespace) on the same database keeps its
    unacked messages and its own visibility-timeout redelivery."""
    stranger = {"body": "", "headers": {"id": "abc.1"}, "properties": {}}
    ledger.client.hset(KOMBU_UNACKED, "tag-other", json.dumps([stranger, "", "celery"]))
    ledger.client.zadd(KOMBU_UNACKED_INDEX, {"tag-other": time.time() - 3600})
    other_ns = queue_for_model("otherns", "sim-llm")
    ledger.client.hset(KOMBU_UNACKED, "tag-ns", json.dumps([stranger, "", other_ns]))
    ledger.client.zadd(KOMBU_UNACKED_INDEX, {"tag-ns": time.time() - 3600})

    assert ledger.sweep_deliveries(leader(ledger)) == []
    assert ledger.client.zscore(KOMBU_UNACKED_INDEX, "tag-other") is not None
    assert ledger.client.zscore(KOMBU_UNACKED_INDEX, "tag-ns") is not None


def test_the_sweep_is_fenced_by_the_leader_token(ledger: Ledger) -> None:
    register(ledger, "w1")
    job = submit(ledger, "j1")
    deliver(ledger, job, 1, "tag-dead", age_s=60)
    leader(ledger)
    assert ledger.sweep_deliveries("someone-else:99") == []
    assert ledger.client.hget(KOMBU_UNACKED, "tag-dead") is not None


def test_a_child_lost_before_its_claim_is_redelivered(ledger: Ledger) -> None:
    register(ledger, "w1")
    job = submit(ledger, "j1")
    ledger.client.zrem(ledger.keys.dispatch, attempt_id(job, 1))  # published and delivered
    # The child died before claiming: the worker's report ends nothing (the attempt never
    # ran) and the attempt is made due again.
    end = ledger.end_attempt(job, 1, Outcome.WORKER_LOST, worker="w1", pid=4242, epoch=1)
    assert end.status == "stale"
    assert ledger.redeliver(job, 1)
    assert ledger.client.zscore(ledger.keys.dispatch, attempt_id(job, 1)) is not None
    # Once it is claimed, a late report of that lost delivery redelivers nothing.
    assert ledger.claim(job, 1, "w1", 4243, "").status == "ok"
    assert not ledger.redeliver(job, 1)


# -- hole 2: claimed but unwatched ------------------------------------------------------------


def test_the_claim_puts_the_attempt_under_its_class_watch(ledger: Ledger) -> None:
    register(ledger, "w1")
    job = submit(ledger, "j1", workload="batch")
    before = ledger.time_ms()
    assert ledger.claim(job, 1, "w1", 4242, "").status == "ok"
    member = attempt_id(job, 1)
    batch = ledger.workloads["batch"]
    liveness = ledger.client.zscore(ledger.keys.liveness, member)
    stall = ledger.client.zscore(ledger.keys.stalls, member)
    assert liveness is not None and stall is not None, "a claimed attempt nothing watches"
    assert before + batch.liveness_timeout_s * 1000 <= liveness
    assert liveness <= ledger.time_ms() + batch.liveness_timeout_s * 1000
    assert before + batch.stall_timeout_s * 1000 <= stall


def test_a_claim_whose_child_never_beats_is_declared_stalled(ledger: Ledger) -> None:
    """A claim whose reply was lost, or a child frozen between its claim and its first
    beat: the watch the claim registered lapses, and the watchdog's verdict moves it."""
    register(ledger, "w1")
    job = submit(ledger, "j1")
    assert ledger.claim(job, 1, "w1", 4242, "").status == "ok"
    member = attempt_id(job, 1)
    ledger.client.zadd(ledger.keys.liveness, {member: ledger.time_ms() - 1})  # time passes
    scan = ledger.scan()
    assert member in scan.liveness_lapsed
    stalled, _ = ledger.stall(member, "liveness", leader(ledger))
    assert stalled
    assert ledger.lost_attempts() == {member: "stalled"}


# -- hole 3: avoid loops ----------------------------------------------------------------------


def test_register_replaces_the_models_a_worker_is_listed_under(ledger: Ledger) -> None:
    register(ledger, "w1", "sim-llm", "sim-embed")
    assert ledger.client.hexists(ledger.keys.model("sim-embed"), "w1")
    register(ledger, "w1", "sim-llm")  # restarted without sim-embed
    assert not ledger.client.hexists(ledger.keys.model("sim-embed"), "w1")
    assert ledger.client.hexists(ledger.keys.model("sim-llm"), "w1")


def test_a_model_that_does_not_fit_is_not_listed_as_consumed(ledger: Ledger) -> None:
    fit = {**fits("sim-llm"), **fits("sim-llm-70b", required_gib=140)}
    register(ledger, "w1", "sim-llm", "sim-llm-70b", model_fit=fit)
    assert not ledger.client.hexists(ledger.keys.model("sim-llm-70b"), "w1")
    assert ledger.client.hexists(ledger.keys.model_unfit("sim-llm-70b"), "w1")
    assert ledger.worker("w1") is not None
    assert ledger.worker("w1").models == ["sim-llm"]  # type: ignore[union-attr]


def lose_first_attempt(ledger: Ledger, job: str, worker: str) -> None:
    assert ledger.claim(job, 1, worker, 4242, "").status == "ok"
    end = ledger.end_attempt(job, 1, Outcome.WORKER_LOST, worker=worker, pid=4242)
    assert end.status == "retry"


def test_avoid_defers_only_to_a_worker_that_still_consumes_the_model(ledger: Ledger) -> None:
    register(ledger, "w1")
    register(ledger, "w2")
    register(ledger, "w2", "sim-embed")  # w2 no longer serves sim-llm, but is ALIVE
    job = submit(ledger, "j1")
    lose_first_attempt(ledger, job, "w1")
    # w1 failed under the job, but no one else can take it: w1 runs it, no bouncing.
    assert ledger.claim(job, 2, "w1", 4243, "").status == "ok"


def test_avoid_never_defers_to_a_silent_worker(ledger: Ledger) -> None:
    register(ledger, "w1")
    register(ledger, "w2")
    ledger.client.zadd(ledger.keys.workers, {"w2": ledger.time_ms() - 60_000})  # silent
    job = submit(ledger, "j1")
    lose_first_attempt(ledger, job, "w1")
    assert ledger.claim(job, 2, "w1", 4243, "").status == "ok"


def test_two_workers_that_both_failed_a_job_do_not_bounce_it(ledger: Ledger) -> None:
    register(ledger, "w1")
    register(ledger, "w2")
    job = submit(ledger, "j1", workload="batch")
    lose_first_attempt(ledger, job, "w1")
    assert ledger.claim(job, 2, "w2", 5000, "").status == "ok"
    assert ledger.end_attempt(job, 2, Outcome.WORKER_LOST, worker="w2", pid=5000).status == "retry"
    ledger.client.zadd(ledger.keys.dispatch, {attempt_id(job, 3): 0})
    # Each failed once: neither may defer to the other.
    assert ledger.claim(job, 3, "w1", 4244, "").status == "ok"


def test_avoid_still_spreads_a_failing_job_to_a_ready_worker(ledger: Ledger) -> None:
    register(ledger, "w1")
    register(ledger, "w2")
    job = submit(ledger, "j1")
    lose_first_attempt(ledger, job, "w1")
    claim = ledger.claim(job, 2, "w1", 4243, "")
    assert (claim.status, claim.detail) == ("avoid", "w2")


# -- hole 4: two processes, one name ------------------------------------------------------


def test_a_second_process_under_a_live_name_is_refused(ledger: Ledger) -> None:
    epoch = register(ledger, "w1", pid=100, host="node-a")
    with pytest.raises(WorkerNameInUseError) as refused:
        register(ledger, "w1", pid=200, host="node-b")
    assert "node-a" in str(refused.value) and "100" in str(refused.value)
    record = ledger.worker("w1")
    assert record is not None and record.epoch == epoch and record.pid == 100  # not fenced
    # The same process registering again (after a fence) is itself, not a second process.
    assert register(ledger, "w1", pid=100, host="node-a") == epoch + 1


def test_a_name_is_free_again_once_its_heartbeat_is_stale(settings: Settings) -> None:
    fast = settings.model_copy(update={"stale_after_s": 0.3, "heartbeat_interval_s": 0.1})
    ledger = Ledger(connect_redis(fast.redis_url), fast)
    register(ledger, "w1", pid=100)
    with pytest.raises(WorkerNameInUseError):
        register(ledger, "w1", pid=200)
    time.sleep(0.4)  # a kill -9, then a restart once the old heartbeat is stale
    register(ledger, "w1", pid=200)
    assert ledger.worker("w1").pid == 200  # type: ignore[union-attr]


def test_a_name_stays_taken_while_its_process_beats_long_after_it_registered(
    settings: Settings,
) -> None:
    fast = settings.model_copy(update={"stale_after_s": 1.0, "heartbeat_interval_s": 0.2})
    ledger = Ledger(connect_redis(fast.redis_url), fast)
    epoch = register(ledger, "w1", pid=100)
    time.sleep(0.6)
    ledger.heartbeat("w1", epoch)
    time.sleep(0.6)  # the registration is stale by now; the last beat is not
    with pytest.raises(WorkerNameInUseError):
        register(ledger, "w1", pid=200)


# -- the last beat: one index, the fleet's scores ------------------------------------------------


def test_a_plain_beat_writes_its_time_only_in_the_fleet(ledger: Ledger) -> None:
    epoch = register(ledger, "w1")
    time.sleep(0.01)
    ledger.heartbeat("w1", epoch)
    beat_ms = ledger.client.zscore(ledger.keys.workers, "w1")
    assert beat_ms is not None
    assert ledger.client.hget(ledger.keys.worker("w1"), "last_heartbeat_ms") is None
    record = ledger.worker("w1")
    assert record is not None and record.last_heartbeat_ms == int(beat_ms)
    (listed,) = ledger.workers()
    assert listed.last_heartbeat_ms == int(beat_ms)


def test_a_worker_that_left_the_fleet_keeps_its_last_beat(settings: Settings) -> None:
    fast = settings.model_copy(update={"stale_after_s": 0.2, "heartbeat_interval_s": 0.05})
    ledger = Ledger(connect_redis(fast.redis_url), fast)
    token = leader(ledger)
    beats = {}
    for name in ("dies", "stops"):
        epoch = register(ledger, name)
        ledger.heartbeat(name, epoch)
        beats[name] = int(ledger.client.zscore(ledger.keys.workers, name) or 0)
        if name == "stops":
            assert ledger.unregister(name, epoch)
    time.sleep(0.3)
    assert ledger.declare_dead("dies", token) == 0
    assert ledger.client.zcard(ledger.keys.workers) == 0
    by_name = {w.name: w for w in ledger.workers()}
    assert by_name["dies"].state is WorkerState.DEAD
    assert by_name["stops"].state is WorkerState.STOPPED
    assert {name: w.last_heartbeat_ms for name, w in by_name.items()} == beats
    # Back in the fleet, its beats are its score there again.
    epoch = register(ledger, "dies")
    assert ledger.client.hget(ledger.keys.worker("dies"), "last_heartbeat_ms") is None
    assert ledger.worker("dies").last_heartbeat_ms == int(  # type: ignore[union-attr]
        ledger.client.zscore(ledger.keys.workers, "dies") or 0
    )


# -- hole 6: failure reports fenced by process, not name ---------------------------------------


def test_another_child_of_the_same_node_cannot_end_a_running_attempt(ledger: Ledger) -> None:
    epoch = register(ledger, "w1")
    job = submit(ledger, "j1")
    assert ledger.claim(job, 1, "w1", 4242, "").status == "ok"
    # A duplicate delivery killed child 5151 of the same node: its report is refused.
    end = ledger.end_attempt(job, 1, Outcome.WORKER_LOST, worker="w1", pid=5151, epoch=epoch)
    assert end.status == "stale"
    assert ledger.get(job).state is JobState.RUNNING
    # Another incarnation of the node cannot end it either.
    end = ledger.end_attempt(job, 1, Outcome.WORKER_LOST, worker="w1", pid=4242, epoch=epoch + 7)
    assert end.status == "stale"
    # The child that claimed it can.
    end = ledger.end_attempt(job, 1, Outcome.WORKER_LOST, worker="w1", pid=4242, epoch=epoch)
    assert end.status == "retry"


# -- hole 9: a worker only starts models it serves ---------------------------------------------


def test_a_claim_for_a_model_the_worker_does_not_serve_is_refused(ledger: Ledger) -> None:
    register(ledger, "w-embed", "sim-embed")
    register(ledger, "w-llm", "sim-llm")
    job = submit(ledger, "j1", model="sim-llm")
    ledger.client.zrem(ledger.keys.dispatch, attempt_id(job, 1))
    claim = ledger.claim(job, 1, "w-embed", 4242, "")
    assert (claim.status, claim.detail) == ("not_served", "sim-llm")
    assert ledger.get(job).state is JobState.QUEUED
    assert ledger.client.zscore(ledger.keys.dispatch, attempt_id(job, 1)) is not None
    assert ledger.claim(job, 1, "w-llm", 4243, "").status == "ok"


# -- hole 11: poison evidence -----------------------------------------------------------------


def test_three_nodes_that_died_do_not_dead_letter_an_innocent_job(settings: Settings) -> None:
    fast = settings.model_copy(
        update={"stale_after_s": 0.2, "heartbeat_interval_s": 0.05, "probation_base_s": 0}
    )
    ledger = Ledger(connect_redis(fast.redis_url), fast)
    token = leader(ledger)
    job = submit(ledger, "j1", workload="batch")
    for n, worker in enumerate(("w1", "w2", "w3"), start=1):
        register(ledger, worker)
        assert ledger.claim(job, n, worker, 4242, "").status == "ok"
        time.sleep(0.3)  # its node goes silent
        assert ledger.declare_dead(worker, token) == 1
        assert ledger.lost_attempts() == {attempt_id(job, n): "node_lost"}
        end = ledger.end_attempt(job, n, Outcome.NODE_LOST, token=token)
        assert end.status == "retry", end
        ledger.client.zadd(ledger.keys.dispatch, {attempt_id(job, n + 1): 0})
    record = ledger.get(job)
    assert record.state is JobState.QUEUED
    assert [a.outcome for a in record.attempts[:3]] == ["node_lost"] * 3


# -- hole 12: smaller ones ---------------------------------------------------------------------


def test_a_kill_order_survives_a_lost_heartbeat_reply(ledger: Ledger) -> None:
    epoch = register(ledger, "w1")
    job = submit(ledger, "j1")
    assert ledger.claim(job, 1, "w1", 4242, "").status == "ok"
    member = attempt_id(job, 1)
    ledger.cancel(job)  # orders the child killed
    first = ledger.heartbeat("w1", epoch, held=[member])  # ...and this reply is lost
    again = ledger.heartbeat("w1", epoch, held=[member])
    assert first.kill == [member] and again.kill == [member]
    # Once the worker no longer holds it, the order is done.
    assert ledger.heartbeat("w1", epoch, held=[]).kill == []
    assert ledger.client.scard(ledger.keys.worker_kill("w1")) == 0


def test_a_publisher_cannot_take_over_a_lease_another_one_holds(ledger: Ledger) -> None:
    register(ledger, "w1")
    submitted = ledger.submit("j1", "sim-llm", "realtime", PAYLOAD, 60_000, None)
    member = attempt_id(submitted.job_id, 1)
    # The producer holds the publish lease until the dispatch grace has passed.
    assert ledger.begin_dispatch(member) is None
    lease = ledger.begin_dispatch(member, submitted.dispatch_lease)
    assert lease is not None
    ledger.end_dispatch(lease)
    # Published: nothing is left to publish, so no second message is sent.
    assert ledger.begin_dispatch(member) is None


def test_worker_state_after_refused_register_is_untouched(ledger: Ledger) -> None:
    register(ledger, "w1", pid=100)
    with pytest.raises(WorkerNameInUseError):
        register(ledger, "w1", pid=200, host="node-b")
    assert ledger.worker("w1").state is WorkerState.ALIVE  # type: ignore[union-attr]
    assert ledger.stats()["registers_refused"] == 1


# -- the watchdog's tick ----------------------------------------------------------------------


def patient(settings: Settings) -> Settings:
    """A leader lease long enough that a slow test machine never loses it mid-test."""
    return settings.model_copy(update={"watchdog_lease_s": 60.0})


def test_a_tick_applies_the_first_verdicts_of_a_fleet_that_starts_at_once(
    settings: Settings,
) -> None:
    """Every registration queues the worker's first verdict: the tick applies a batch of
    them in one round trip, each as it would alone, and leaves none queued."""
    watchdog = Watchdog(patient(settings), owner="tick-test")
    ledger = watchdog.ledger
    epochs = {f"w{i:02d}": register(ledger, f"w{i:02d}") for i in range(40)}
    for name, epoch in epochs.items():
        verdict = {"w07": "UNHEALTHY", "w08": "DEGRADED"}.get(name, "HEALTHY")
        assert not ledger.heartbeat(name, epoch, "", verdict).fenced
    assert ledger.client.zcard(ledger.keys.health_changes) == 40

    report = watchdog.tick()

    assert report.workers_quarantined == 2 and report.items_failed == 0
    states = {name: ledger.worker(name).state for name in epochs}  # type: ignore[union-attr]
    assert states.pop("w07") is states.pop("w08") is WorkerState.QUARANTINED
    assert set(states.values()) == {WorkerState.ALIVE}
    assert ledger.worker("w07").quarantine_mode == "evacuate"  # type: ignore[union-attr]
    assert ledger.worker("w08").quarantine_mode == "drain"  # type: ignore[union-attr]
    assert ledger.client.zcard(ledger.keys.health_changes) == 0


def test_one_failing_item_does_not_hold_up_the_rest_of_a_tick(settings: Settings) -> None:
    watchdog = Watchdog(patient(settings), owner="tick-test")
    ledger = watchdog.ledger
    register(ledger, "w1")
    for job in ("a-corrupt", "b-sound"):  # both due, the corrupt one first
        ledger.submit(job, "sim-llm", "realtime", PAYLOAD, 1, None)
    ledger.client.hset(ledger.keys.job("a-corrupt"), "a:1", "not json")
    time.sleep(0.01)

    report = watchdog.tick()

    assert report.items_failed == 1
    assert ledger.get("b-sound").state is JobState.EXPIRED


class SlowTickWatchdog(Watchdog):
    slow_s = 0.0

    def _requeue_lost(self, lost: dict[str, str], token: str, report: TickReport) -> None:
        time.sleep(self.slow_s)  # a tick with much to do
        super()._requeue_lost(lost, token, report)


def tick_for(watchdog: Watchdog, seconds: float) -> None:
    """Tick as the watchdog's loop does (every watchdog_tick_s) for ``seconds``."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        watchdog.tick()
        time.sleep(watchdog.settings.watchdog_tick_s)


def test_a_long_tick_opens_no_blind_period(settings: Settings) -> None:
    watchdog = SlowTickWatchdog(patient(settings), owner="tick-test")
    ledger = watchdog.ledger
    tick_for(watchdog, watchdog.grace_s + 0.1)  # a new leader's grace, then it judges
    register(ledger, "ghost")  # beats once, then never again
    watchdog.slow_s = settings.stale_after_s * 0.8
    watchdog.tick()
    watchdog.slow_s = 0.0
    time.sleep(settings.stale_after_s * 0.4)

    report = watchdog.tick()  # the ghost is silent past stale_after_s now

    assert report.workers_declared_dead == 1
    assert ledger.worker("ghost").state is WorkerState.DEAD  # type: ignore[union-attr]


def running_rack(ledger: Ledger, size: int) -> list[str]:
    """``size`` workers, each running one attempt of its own job; the jobs."""
    jobs = []
    for i in range(size):
        register(ledger, f"r{i:02d}")
        jobs.append(submit(ledger, f"rack-{i:02d}"))
        assert ledger.claim(jobs[-1], 1, f"r{i:02d}", 4242, "").status == "ok"
    return jobs


def lose_rack(ledger: Ledger, size: int) -> None:
    """The rack goes down: every worker of it evacuated, its attempt lost."""
    for i in range(size):
        assert ledger.quarantine(f"r{i:02d}", "operator", "rack down") == 1


class SlowRequeueWatchdog(Watchdog):
    def _end_lost(self, job_id: str, attempt: int, outcome: str, token: str) -> AttemptEnd:
        time.sleep(0.1)  # each lost attempt a few slow round trips
        return super()._end_lost(job_id, attempt, outcome, token)

    def _end_lost_many(self, batch: list[tuple[str, str]], token: str) -> list[AttemptEnd | None]:
        time.sleep(0.1 * len(batch))  # as slow per attempt in a batch
        return super()._end_lost_many(batch, token)


# A 1 s lease between ticks of about 0.5 s: a neighbour's load that delays the next tick
# lets the lease lapse, and the token the test asserts changes.
@pytest.mark.serial
def test_a_tick_leaves_what_outlasts_half_its_lease_to_the_next(settings: Settings) -> None:
    """Many attempts lost at once (a rack of nodes): a tick requeues them until half the
    leader lease is spent, so the lease never lapses mid-tick; the next ticks requeue the
    rest, and none of them is a new leader's blind one."""
    lease_s = 1.0  # a budget of 0.5 s: about five lost attempts a tick
    watchdog = SlowRequeueWatchdog(
        settings.model_copy(update={"watchdog_lease_s": lease_s}), owner="tick-test"
    )
    ledger = watchdog.ledger
    jobs = running_rack(ledger, 12)
    watchdog.tick()  # the lease
    token = watchdog.token
    lose_rack(ledger, 12)

    reports = [watchdog.tick()]
    while sum(r.attempts_requeued for r in reports) < 12 and len(reports) < 20:
        reports.append(watchdog.tick())

    assert reports[0].lost_deferred > 0 and reports[0].attempts_requeued < 12
    assert sum(r.attempts_requeued for r in reports) == 12
    assert all(r.leader for r in reports) and watchdog.token == token
    assert all(r.duration_s < lease_s for r in reports)
    assert {ledger.get(job).attempt for job in jobs} == {2}


def test_avoid_never_defers_to_a_worker_without_a_free_slot(ledger: Ledger) -> None:
    register(ledger, "w1")
    register(ledger, "w2")  # one slot
    busy = submit(ledger, "busy")
    assert ledger.claim(busy, 1, "w2", 5000, "").status == "ok"
    job = submit(ledger, "j1")
    lose_first_attempt(ledger, job, "w1")
    assert ledger.claim(job, 2, "w1", 4243, "").status == "ok"


def test_an_attempt_is_deferred_a_bounded_number_of_times(ledger: Ledger) -> None:
    """The ready worker may never take the message (its consumer is reconnecting, or the
    failed worker keeps winning the race for it): the bouncing stops."""
    register(ledger, "w1")
    register(ledger, "w2")
    job = submit(ledger, "j1")
    lose_first_attempt(ledger, job, "w1")
    statuses = [ledger.claim(job, 2, "w1", 4243, "").status for _ in range(10)]
    assert statuses[:3] == ["avoid"] * 3 and statuses[3] == "ok"


# -- a message lost inside kombu -------------------------------------------------------------


def publish_without_message(ledger: Ledger, job: str) -> str:
    """The producer's publish as the ledger sees it; the message itself then vanishes, as
    when a consumer (or Redis) dies between kombu's BRPOP and its unacked write."""
    submitted = ledger.submit(job, "sim-llm", "batch", PAYLOAD, 60_000, None)
    lease = ledger.begin_dispatch(attempt_id(job, 1), submitted.dispatch_lease)
    assert lease is not None
    ledger.end_dispatch(lease)
    return attempt_id(job, 1)


def test_an_attempt_whose_message_vanished_is_published_again(settings: Settings) -> None:
    settings = settings.model_copy(update={"dispatch_grace_s": 0.2})
    ledger = Ledger(connect_redis(settings.redis_url), settings)
    register(ledger, "w1")
    lost = publish_without_message(ledger, "gone")
    waiting = publish_without_message(ledger, "waiting")
    queue = queue_for_model(settings.namespace, "sim-llm")
    message = {"body": "", "headers": {"id": waiting}, "properties": {}}
    ledger.client.lpush(priority_lists(queue)[2], json.dumps(message))  # still in its queue
    held = publish_without_message(ledger, "held")
    deliver(ledger, "held", 1, "tag-held", age_s=0.0)  # delivered, not yet claimed
    token = leader(ledger)
    assert ledger.find_lost_messages(token) == []  # within the grace: not judged yet
    time.sleep(0.3)

    assert ledger.find_lost_messages(token) == [lost]

    assert ledger.client.zscore(ledger.keys.dispatch, lost) is not None
    assert ledger.client.zscore(ledger.keys.dispatch, waiting) is None
    assert ledger.client.zscore(ledger.keys.dispatch, held) is None
    assert ledger.stats()["lost_messages"] == 1
    # Claimed attempts leave the check.
    assert ledger.claim("waiting", 1, "w1", 4242, "").status == "ok"
    assert ledger.client.zscore(ledger.keys.published, waiting) is None


def test_a_stall_does_not_overwrite_a_dead_nodes_verdict(settings: Settings) -> None:
    fast = settings.model_copy(update={"stale_after_s": 0.2, "heartbeat_interval_s": 0.05})
    ledger = Ledger(connect_redis(fast.redis_url), fast)
    token = leader(ledger)
    register(ledger, "w1")
    job = submit(ledger, "j1")
    assert ledger.claim(job, 1, "w1", 4242, "").status == "ok"
    member = attempt_id(job, 1)
    time.sleep(0.3)
    assert ledger.declare_dead("w1", token) == 1  # the node is dead...
    ledger.client.zadd(ledger.keys.liveness, {member: ledger.time_ms() - 1})
    assert ledger.stall(member, "liveness", token) == (False, False)  # ...and stays the cause
    assert ledger.lost_attempts() == {member: "node_lost"}


def test_admission_reads_the_whole_fleet_only_to_explain_a_refusal(ledger: Ledger) -> None:
    """A submit admits on the first ready consumer it finds; with none ready, it reads every
    listing and refuses as before, naming the workers and why."""
    fits = {"sim-llm": {"required_bytes": 8 * GIB, "largest_gpu_bytes": 80 * GIB}}
    small = {"sim-llm": {"required_bytes": 8 * GIB, "largest_gpu_bytes": 4 * GIB}}
    for k in range(40):
        ledger.register(f"w{k:02d}", ["sim-llm"], 100 + k, "node", 1, "{}", model_fit=fits)
        ledger.quarantine(f"w{k:02d}", by="op", reason="maintenance")
    ledger.register("tiny", ["sim-llm"], 99, "node", 1, "{}", model_fit=small)

    with pytest.raises(NoCapacityError) as refused:
        ledger.submit("rt-1", "sim-llm", "realtime", '{"p": 1}', 0, None, wait_for_capacity=False)
    assert "w00 (QUARANTINED" in str(refused.value) and "w39 (QUARANTINED" in str(refused.value)
    # A class that waits is admitted by a quarantined (not stopped) consumer.
    assert ledger.submit("b-1", "sim-llm", "batch", '{"p": 1}', 0, None).created

    ledger.release("w17", by="op")
    assert ledger.submit("rt-2", "sim-llm", "realtime", '{"p": 1}', 0, None, False).created
    assert ledger.get("rt-2").state is JobState.QUEUED
    vl = {"sim-vl": {"required_bytes": 8 * GIB, "largest_gpu_bytes": 4 * GIB}}
    ledger.register("tiny2", ["sim-vl"], 98, "node", 1, "{}", model_fit=vl)
    with pytest.raises(DoesNotFitError):  # only a GPU too small serves this model
        ledger.submit("vl-1", "sim-vl", "batch", '{"p": 1}', 0, None)


# -- the scripts as Redis loads them ------------------------------------------------------------


def test_every_script_compiles_with_the_part_of_the_prelude_it_carries(ledger: Ledger) -> None:
    """Each script takes only the prelude statements it uses: what it carries must still be
    whole Lua (a statement cut in two fails here, at load, not on the path that first
    runs it)."""
    for name in _SCRIPTS:
        assert ledger.client.script_load(script_source(name))


def test_a_racks_lost_attempts_are_ended_and_published_in_batches(settings: Settings) -> None:
    """Forty attempts lost at once, one of them ended meanwhile by other means: each live
    one is requeued once and its successor published once, through the batched round
    trips; the ended one is left alone, and nothing is left in the lost hash."""
    watchdog = Watchdog(settings, owner="tick-test")
    ledger = watchdog.ledger
    jobs = running_rack(ledger, 40)
    watchdog.tick()  # the lease
    lose_rack(ledger, 40)
    assert ledger.cancel(jobs[7])  # ended while its lost entry waits

    report = watchdog.tick()

    assert report.attempts_requeued == 39 and report.lost_deferred == 0
    assert report.dispatched == 39 and report.items_failed == 0
    assert ledger.lost_attempts() == {}
    published = ledger.client.zrange(ledger.keys.published, 0, -1)
    expected = sorted(attempt_id(job, 2) for job in jobs if job != jobs[7])
    assert sorted(published) == expected
    assert ledger.client.zcard(ledger.keys.dispatch) == 0
    queue = queue_for_model(settings.namespace, "sim-llm")
    messages = sum(int(ledger.client.llen(name)) for name in priority_lists(queue))
    assert messages == 39  # one message per requeued attempt
    assert ledger.get(jobs[7]).state is JobState.CANCELLED
    assert {ledger.get(job).attempt for job in jobs if job != jobs[7]} == {2}


class OneMessageFails(Dispatcher):
    """kombu refusing one message of a batch: ``_message`` is where its errors land on
    the send_task path, ``render`` on the path where the ledger's script publishes."""

    failing = ""

    def _message(self, lease: DispatchLease, producer: object = None) -> bool:
        return lease.member != self.failing and super()._message(lease, producer)

    def render(self, member: str, model: str, workload: str) -> RenderedMessage | None:
        return None if member == self.failing else super().render(member, model, workload)


@pytest.mark.parametrize("scripts_publish", [True, False], ids=["script", "send_task"])
def test_an_attempt_whose_batched_publish_fails_keeps_its_owner(
    settings: Settings, scripts_publish: bool
) -> None:
    """One message of a batched publish fails: the others are published, and the failed
    attempt keeps its leased dispatch entry, so the watchdog publishes it once the lease
    lapses. An attempt with neither entry would wait for nobody. Whether the ledger's
    script publishes (the Redis broker) or ``send_task`` does (as on RabbitMQ)."""
    watchdog = Watchdog(settings, owner="tick-test")
    ledger = watchdog.ledger
    register(ledger, "w1")
    members = [attempt_id(submit(ledger, f"batch-{i}"), 1) for i in range(3)]
    ledger.client.zadd(ledger.keys.dispatch, dict.fromkeys(members, 0))  # all due
    dispatcher = OneMessageFails(ledger, watchdog.dispatcher.app)
    if not scripts_publish:
        dispatcher.renderer = None
    dispatcher.failing = members[1]

    assert dispatcher.publish_many(members) == 2

    published = set(ledger.client.zrange(ledger.keys.published, 0, -1))
    assert published == {members[0], members[2]}
    lease = ledger.client.zscore(ledger.keys.dispatch, members[1])
    assert lease is not None and lease > ledger.time_ms()  # still owned, leased
    ledger.client.zadd(ledger.keys.dispatch, {members[1]: 0})  # the lease lapses
    report = watchdog.tick()
    assert report.dispatched == 1
    assert members[1] in set(ledger.client.zrange(ledger.keys.published, 0, -1))


# -- the delivery an attempt's end releases -------------------------------------------------


def test_the_end_of_an_attempt_names_the_delivery_it_took_out_of_unacked(ledger: Ledger) -> None:
    """The worker acks that delivery in memory only: the tag must be the one the script
    removed, and only when it removed it."""
    register(ledger, "w1")
    done, failed, untagged = submit(ledger, "j1"), submit(ledger, "j2"), submit(ledger, "j3")
    for job, tag in ((done, "tag-done"), (failed, "tag-failed")):
        deliver(ledger, job, 1, tag, age_s=0.0)
        assert ledger.claim(job, 1, "w1", 4242, tag).status == "ok"
    assert ledger.claim(untagged, 1, "w1", 4242, "").status == "ok"

    completion = ledger.complete_attempt(done, 1, "w1", '{"text":"ok"}')
    assert (completion.ok, completion.released) == (True, "tag-done")
    assert ledger.client.hget(KOMBU_UNACKED, "tag-done") is None
    assert ledger.client.zscore(KOMBU_UNACKED_INDEX, "tag-done") is None
    # Our own result again (a lost reply): the first call released it.
    assert ledger.complete_attempt(done, 1, "w1", '{"text":"ok"}').released == "tag-done"
    # Another worker's late result releases nothing.
    late = ledger.complete_attempt(done, 1, "w2", '{"text":"late"}')
    assert (late.ok, late.released) == (False, "")

    end = ledger.end_attempt(failed, 1, Outcome.INVALID_INPUT, "bad", worker="w1", pid=4242)
    assert (end.status, end.released) == ("ended", "tag-failed")
    assert ledger.client.hget(KOMBU_UNACKED, "tag-failed") is None
    stale = ledger.end_attempt(failed, 1, Outcome.ERROR, "again", worker="w1", pid=4242)
    assert (stale.status, stale.released) == ("stale", "")

    assert ledger.complete_attempt(untagged, 1, "w1", '{"text":"ok"}').released == ""


def test_a_durable_end_no_replica_confirmed_releases_nothing_to_the_worker(
    ledger: Ledger,
) -> None:
    """Durable mode, no replica: the script ran on the primary, but a failover could lose
    it, so the worker is told nothing was released and acks in Redis as usual."""
    register(ledger, "w1")
    job = submit(ledger, "j1")
    deliver(ledger, job, 1, "tag-1", age_s=0.0)
    assert ledger.claim(job, 1, "w1", 4242, "tag-1").status == "ok"
    durable = ledger.settings.model_copy(
        update={"redis_min_replicas": 1, "redis_replica_timeout_s": 0.05}
    )
    unconfirmed = Ledger(ledger.client, durable)

    completion = unconfirmed.complete_attempt(job, 1, "w1", '{"text":"ok"}')

    assert (completion.ok, completion.released) == (True, "")
    assert ledger.client.hget(KOMBU_UNACKED, "tag-1") is None  # removed all the same
