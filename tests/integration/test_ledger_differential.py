"""Differential test: the Lua ledger against its executable specification.

``MirroredLedger`` is a ``gridqueue.statemachine.LedgerModel`` whose every ledger verb
also runs on a real Redis through ``Ledger``: the replies must agree, and after each verb
so must everything the scripts keep. Every job (state, attempt, chain, reason, result,
each attempt's worker, pid, incarnation, outcome, delivery tag, deferrals and late-result
mark); every worker (state, incarnation, slots, running set, kill orders, health verdict,
who quarantined it and how, stalls counted, probation, whether its heartbeat is stale,
whether a health change waits for the watchdog); the lost hash, the
lists by state and the stats counters; the dispatch index (each entry's lease, or whether it
is due); the liveness and stall watches (lapsed or not); and kombu's unacked deliveries
(claimed, or past the claim grace). The broker's side is kombu's own structures, written
here as kombu writes them: a delivery in ``unacked``, an ack or a requeue taking it out.

Time is the model's: ``elapse()`` moves every timestamp the model lets pass (dispatch
leases and backoffs, watches, deliveries, the heartbeats of nodes that are down,
probations) a day into the past, which to the scripts is a day gone by. The workload
classes' backoffs and watch timeouts are stretched so that nothing lapses by itself while
a test runs, and ``stale_after_s`` is a minute, so a heartbeat is stale only when the test
says so.

Three kinds of history drive it:

- random sequences of verbs, from the right and the wrong workers, for current,
  superseded and never-submitted jobs, with any outcome, lease, delivery and verdict;
- the unit tier's ``JobLifecycle`` state machine, unchanged, whose rules follow jobs
  through retries, failovers, stalls, health verdicts, poison and replays;
- the unit tier's ``GridLifecycle``, the whole model with the broker, the processes and
  their faults, whose every claim comes with a delivery.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import fields, replace
from typing import Any, cast

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, run_state_machine_as_test

from gridqueue.brokers.rendering import RenderedMessage
from gridqueue.embedded import EmbeddedRedis
from gridqueue.errors import (
    InvalidJobError,
    JobNotFoundError,
    WorkerNameInUseError,
    WorkerNotFoundError,
)
from gridqueue.keys import KOMBU_UNACKED, KOMBU_UNACKED_INDEX, attempt_id, queue_for_model
from gridqueue.ledger import DispatchLease, Ledger, connect_redis, dumps
from gridqueue.records import JobRecord, WorkerRecord
from gridqueue.settings import Settings
from gridqueue.statemachine import DELIVERED, QUEUED, WATCHDOG, JobModel, LedgerModel
from gridqueue.states import JobState, Outcome, WorkerState
from gridqueue.workloads import WorkloadClass
from tests.unit.test_statemachine import VERDICTS, JobLifecycle
from tests.unit.test_statemachine import WORKLOADS as UNIT_WORKLOADS
from tests.unit.test_statemachine_liveness import GridLifecycle

pytestmark = pytest.mark.integration

JOBS = ("j1", "j2", "j3")
GHOST = "never-submitted"
WORKERS = ("w1", "w2")
ENDINGS = sorted(outcome for outcome in Outcome if outcome is not Outcome.SUCCEEDED)
DEADLINES = ("none", "passed", "far")
# Every worker serves the one model, so claim.lua's "another ready node" is any other one.
MODEL_FIT = {"sim-llm": {"required_bytes": 1, "largest_gpu_bytes": 2}}
BY = "differential-test"
HOST = "node"
PID_BASE = 4000  # a worker's process n registers with pid PID_BASE + n
# One elapse: a day, past every grace, lease, backoff, watch and probation (not deadlines).
ELAPSE_MS = 86_400_000
LONG_MS = 3_600_000  # the next due of a beat or progress mark: never while a test runs
CLAIMED_OFFSET_S = 1e10  # _common.lua: a claimed delivery's score is this far ahead


def stretched(workload: WorkloadClass) -> WorkloadClass:
    """The class with a backoff (if it has one) of ten minutes or more, and watches of an
    hour: none passes by itself while a test runs. Its deadline outlasts any backoff."""
    backoff = workload.backoff_max_s > 0 or workload.backoff_jitter_s > 0
    return replace(
        workload,
        backoff_initial_s=600.0 if backoff else 0.0,
        backoff_max_s=1200.0 if backoff else 0.0,
        liveness_timeout_s=3600.0,
        stall_timeout_s=3600.0,
    )


WORKLOADS = {name: stretched(workload) for name, workload in UNIT_WORKLOADS.items()}

Op = tuple[Any, ...]


@pytest.fixture(scope="module")
def ledgers(redis_server: EmbeddedRedis) -> Iterator[dict[bool, Ledger]]:
    """One ledger with a probation for workers back from the dead (ten minutes: it ends
    only when the test lets time pass), one without. The workload classes are the unit
    tier's, stretched."""
    client = connect_redis(redis_server.url)
    found = {}
    for probation in (False, True):
        config = Settings(
            redis_url=redis_server.url,
            stale_after_s=60.0,
            heartbeat_interval_s=1.0,
            dispatch_grace_s=600.0,
            probation_base_s=600.0 if probation else 0.0,
            probation_cap_s=600.0,
        )
        found[probation] = Ledger(client, config, WORKLOADS)
    yield found
    client.close()


class MirroredLedger(LedgerModel):
    """The model, with each verb run on the real ledger too and the two compared."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(
            ledger.workloads,
            probation=ledger.settings.probation_base_s > 0,
            stall_quarantine_after=ledger.settings.stall_quarantine_after,
        )
        self.ledger = ledger
        self.keys = ledger.keys
        self.client = ledger.client
        self.stale_after_ms = int(ledger.settings.stale_after_s * 1000)
        self.grace_ms = int(ledger.settings.dispatch_grace_s * 1000)
        self.leases: dict[int, int] = {}  # the model's lease -> the score the script wrote
        self.issued: list[tuple[str, int]] = []  # (attempt, lease), in the order written
        self.leased_at = 0  # server time (ms) of the last lease written
        self.quiet = False  # within elapse(): compare once it is done
        self.client.flushall()
        held, self.token = ledger.lease(BY, 600_000)
        assert held

    def __deepcopy__(self, memo: dict[int, Any]) -> LedgerModel:
        """A plain model: what-if drives of the state machines must not touch Redis."""
        memo[id(self.workloads)] = self.workloads
        pure = LedgerModel.__new__(LedgerModel)
        for spec in fields(LedgerModel):
            setattr(pure, spec.name, copy.deepcopy(getattr(self, spec.name), memo))
        return pure

    def checked(self, reply: Any) -> Any:
        if not self.quiet:
            self.assert_same()
        return reply

    # -- jobs ----------------------------------------------------------------------------

    def submit(
        self, job_id: str, workload: str, has_deadline: bool = False, passed: bool = False
    ) -> JobModel:
        deadline_in_ms = (1 if passed else 3_600_000) if has_deadline else 0
        payload = dumps({"job": job_id})
        created = job_id not in self.jobs
        self.lease_later()
        message = self.message(attempt_id(job_id, 1)) if self.scripts_publish else None
        reply = self.ledger.submit(
            job_id, "sim-llm", workload, payload, deadline_in_ms, None, message=message
        )
        assert (reply.job_id, reply.created) == (job_id, created)
        if deadline_in_ms == 1:
            time.sleep(0.003)  # the 1 ms deadline has passed on the server clock
        job = super().submit(job_id, workload, has_deadline, passed)
        member = attempt_id(job_id, 1)
        if created and self.scripts_publish:
            assert reply.dispatch_lease == "", "a submit that publishes holds no lease"
            self.same_message(member)
        elif created:
            self.leased(member, self.dispatch[member].lease, reply.dispatch_lease)
        return cast(JobModel, self.checked(job))

    def message(self, member: str) -> RenderedMessage:
        """A stand-in for the attempt's Celery message, on its model's queue: the scripts
        push what they are given, and the model's next delivery tag marks it."""
        queue = queue_for_model(self.ledger.settings.namespace, "sim-llm")
        body = json.dumps({"member": member, "tag": self.serial + 1})
        return RenderedMessage((("LPUSH", queue, body),))

    def same_message(self, member: str) -> None:
        """The model sent a message for ``member`` just now: the script pushed it."""
        tag = self.serial
        assert self.messages[tag].member == member
        queue = queue_for_model(self.ledger.settings.namespace, "sim-llm")
        head = self.client.lindex(queue, 0)
        assert json.loads(head or "{}") == {"member": member, "tag": tag}, "message pushed"

    def claim(self, job_id: str, n: int, worker: str, pid: int = 0, tag: int | None = None) -> str:
        status = super().claim(job_id, n, worker, pid, tag)
        delivery = "" if tag is None else tag_of(tag)
        claim = self.ledger.claim(job_id, n, worker, pid, delivery)
        assert claim.status == status, (job_id, n, worker, pid, claim)
        if status == "fenced":
            known = self.workers.get(worker)
            assert claim.detail == (known.state.value if known else "UNKNOWN")
        elif status == "stale":
            assert claim.detail == self.jobs[job_id].state.value
        elif status == "avoid":
            assert claim.detail is not None and self.can_take(claim.detail)
        elif status == "ok":
            assert json.loads(claim.payload or "") == {"job": job_id}
        return cast(str, self.checked(status))

    def progress(self, job_id: str, n: int, worker: str) -> bool:
        marked = super().progress(job_id, n, worker)
        assert self.ledger.progress(job_id, n, worker, "50%", LONG_MS) == marked
        return cast(bool, self.checked(marked))

    def beat(self, job_id: str, n: int, worker: str) -> bool:
        beaten = super().beat(job_id, n, worker)
        assert self.ledger.beat(job_id, n, worker, LONG_MS) == beaten
        return cast(bool, self.checked(beaten))

    def complete(self, job_id: str, n: int, worker: str, result: str) -> bool:
        published = super().complete(job_id, n, worker, result)
        assert self.ledger.complete(job_id, n, worker, result) == published
        return cast(bool, self.checked(published))

    def end_attempt(
        self,
        job_id: str,
        n: int,
        outcome: Outcome,
        worker: str = "",
        *,
        pid: int | None = None,
        epoch: int | None = None,
    ) -> str:
        token = self.token if worker == "" else ""  # the watchdog writes under its lease
        status = super().end_attempt(job_id, n, outcome, worker, pid=pid, epoch=epoch)
        end = self.ledger.end_attempt(
            job_id, n, outcome, "boom", worker=worker, token=token, pid=pid, epoch=epoch
        )
        assert end.status == status, (job_id, n, outcome, worker, pid, epoch)
        if status == "retry":
            assert end.next_attempt == self.jobs[job_id].attempt
        elif status == "ended":
            assert end.state == self.jobs[job_id].state.value
        return cast(str, self.checked(status))

    def expire(self, job_id: str) -> str:
        status = super().expire(job_id)
        assert self.ledger.expire(job_id, self.token) == (status == "ok"), (job_id, status)
        return cast(str, self.checked(status))

    def cancel(self, job_id: str, reason: str = "cancelled") -> str:
        status = super().cancel(job_id, reason)
        if status == "unknown":
            with pytest.raises(JobNotFoundError):
                self.ledger.cancel(job_id, reason)
        else:
            assert self.ledger.cancel(job_id, reason) == (status == "ok"), (job_id, status)
        return cast(str, self.checked(status))

    def replay(self, job_id: str) -> str:
        status = super().replay(job_id)
        if status == "ok":
            assert self.ledger.replay(job_id, BY) == self.jobs[job_id].attempt
        else:
            error = JobNotFoundError if status == "unknown" else InvalidJobError
            with pytest.raises(error):
                self.ledger.replay(job_id, BY)
        return cast(str, self.checked(status))

    # -- workers -------------------------------------------------------------------------

    def register(self, worker: str, concurrency: int = 1) -> int:
        """A worker whose process is down registers from a new one (a new pid)."""
        known = self.workers.get(worker)
        process = (known.process if known else 0) + (0 if known and known.up else 1)
        args = (worker, ["sim-llm"], PID_BASE + process, HOST, concurrency, "{}")
        try:
            epoch = super().register(worker, concurrency)
        except WorkerNameInUseError:
            with pytest.raises(WorkerNameInUseError):
                self.ledger.register(*args, model_fit=MODEL_FIT)
            self.checked(None)
            raise
        assert self.ledger.register(*args, model_fit=MODEL_FIT) == epoch
        return cast(int, self.checked(epoch))

    def unregister(self, worker: str, epoch: int) -> bool:
        stopped = super().unregister(worker, epoch)
        assert self.ledger.unregister(worker, epoch) == stopped
        return cast(bool, self.checked(stopped))

    def heartbeat(
        self, worker: str, epoch: int, held: set[str], verdict: str = ""
    ) -> tuple[str, list[str]]:
        status, doomed = super().heartbeat(worker, epoch, held, verdict)
        beat = self.ledger.heartbeat(worker, epoch, "", verdict, sorted(held))
        assert (beat.fenced, sorted(beat.kill)) == (status == "fenced", doomed)
        known = self.workers.get(worker)
        assert beat.state == (known.state.value if known else "UNKNOWN")
        self.checked(None)
        return status, doomed

    def declare_dead(self, worker: str, signal: str = "heartbeat") -> int | None:
        """The watchdog declares a worker whose heartbeat is stale: one that is not stale
        yet falls silent first. On the connection signal both answer as they are: these
        workers never hold a presence subscription, so the real script finds none."""
        if signal == "connection":
            lost = super().declare_dead(worker, signal)
            assert self.ledger.declare_dead(worker, self.token, signal) == lost
            return cast("int | None", self.checked(lost))
        known = self.workers.get(worker)
        if known is not None and not known.silent:
            known.silent = True
            self.set_heartbeat(worker, self.ledger.time_ms() - 2 * self.stale_after_ms)
        lost = super().declare_dead(worker)
        assert self.ledger.declare_dead(worker, self.token) == lost
        return cast("int | None", self.checked(lost))

    def quarantine(self, worker: str, drain: bool = False, by: str = BY) -> int | None:
        moved = super().quarantine(worker, drain, by)
        if moved is None:
            with pytest.raises(WorkerNotFoundError):
                self.ledger.quarantine(worker, by, "drill", drain)
        else:
            assert self.ledger.quarantine(worker, by, "drill", drain) == moved
        return cast("int | None", self.checked(moved))

    def release(self, worker: str) -> bool | None:
        released = super().release(worker)
        if released is None:
            with pytest.raises(WorkerNotFoundError):
                self.ledger.release(worker, BY)
        else:
            assert self.ledger.release(worker, BY) == released
        return cast("bool | None", self.checked(released))

    def apply_health(self, worker: str) -> str:
        action = super().apply_health(worker)
        assert self.ledger.apply_health(worker, self.token) == action, worker
        return cast(str, self.checked(action))

    def end_probation(self, worker: str) -> bool:
        ended = super().end_probation(worker)
        assert self.ledger.end_probation(worker, self.token) == ended, worker
        return cast(bool, self.checked(ended))

    # -- dispatch, watches and deliveries ------------------------------------------------

    def begin_dispatch(self, member: str, own_lease: int = 0) -> int | None:
        lease = super().begin_dispatch(member, own_lease)
        self.lease_later()
        taken = self.ledger.begin_dispatch(member, str(self.leases.get(own_lease, "")))
        assert (taken is None) == (lease is None), (member, own_lease, taken)
        if lease is not None and taken is not None:
            assert (taken.model, taken.workload) == (
                "sim-llm",
                self.jobs[member_job(member)].workload,
            )
            self.leased(member, lease, taken.lease)
        return cast("int | None", self.checked(lease))

    def end_dispatch(self, member: str, lease: int, message: bool = False) -> bool:
        sent = self.message(member) if message else None
        queue = queue_for_model(self.ledger.settings.namespace, "sim-llm")
        before = self.client.llen(queue)
        dropped = super().end_dispatch(member, lease, message)
        ended = self.ledger.end_dispatch(
            DispatchLease(member, "", "", str(self.leases[lease])), sent
        )
        assert ended == dropped, (member, lease)
        # The message goes out with the end of the dispatch, and only with it.
        assert self.client.llen(queue) == before + (1 if message and dropped else 0)
        if message and dropped:
            self.same_message(member)
        return cast(bool, self.checked(dropped))

    def stall(self, member: str, kind: str) -> str:
        job = self.jobs.get(member_job(member))
        worker = str(job.current.worker) if job else ""
        known = self.workers.get(worker)
        was = known.state if known else None
        status = super().stall(member, kind)
        quarantined = (
            known is not None
            and known.state is not was
            and (known.state, known.quarantined_by) == (WorkerState.QUARANTINED, WATCHDOG)
        )
        assert self.ledger.stall(member, kind, self.token) == (status == "stalled", quarantined)
        return cast(str, self.checked(status))

    def redeliver(self, job_id: str, n: int) -> str:
        status = super().redeliver(job_id, n)
        assert self.ledger.redeliver(job_id, n) == (status == "ok")
        return cast(str, self.checked(status))

    def sweep_stranded(self) -> list[str]:
        recovered = super().sweep_stranded()
        assert sorted(self.ledger.sweep_deliveries(self.token)) == sorted(recovered)
        return cast(list[str], self.checked(recovered))

    def deliver(self, tag: int, worker: str) -> bool:
        """kombu's delivery with acks_late: the message in ``unacked``, its delivery time
        (the consumer's clock, in seconds) in ``unacked_index``."""
        delivered = super().deliver(tag, worker)
        if delivered:
            message = self.messages[tag]
            body = {
                "body": "",
                "headers": {"id": message.member, "task": "gridqueue.attempt"},
                "properties": {"delivery_tag": tag_of(tag)},
            }
            queue = queue_for_model(self.ledger.settings.namespace, message.queue)
            self.client.hset(KOMBU_UNACKED, tag_of(tag), json.dumps([body, "", queue]))
            self.client.zadd(KOMBU_UNACKED_INDEX, {tag_of(tag): time.time()})
        return cast(bool, self.checked(delivered))

    def ack(self, tag: int) -> None:
        super().ack(tag)
        self.forget_delivery(tag)
        self.checked(None)

    def reject(self, tag: int) -> bool:
        """kombu's ``restore_by_tag``: out of unacked and back on its queue, if it was
        still in unacked (the queue's list is the model's alone: no script reads it)."""
        requeued = super().reject(tag)
        self.forget_delivery(tag)
        return cast(bool, self.checked(requeued))

    def forget_delivery(self, tag: int) -> None:
        self.client.zrem(KOMBU_UNACKED_INDEX, tag_of(tag))
        self.client.hdel(KOMBU_UNACKED, tag_of(tag))

    # -- time ----------------------------------------------------------------------------

    def elapse(self) -> None:
        """A day goes by: every timestamp the model lets pass moves a day back. The nodes
        that are up kept heartbeating; the children that run beat (through the model)."""
        now_ms = self.ledger.time_ms()
        shifts = {
            self.keys.dispatch: ELAPSE_MS,
            self.keys.liveness: ELAPSE_MS,
            self.keys.stalls: ELAPSE_MS,
            self.keys.probation: ELAPSE_MS,
            KOMBU_UNACKED_INDEX: ELAPSE_MS / 1000,
        }
        for key, by in shifts.items():
            scores = cast(list[tuple[str, float]], self.client.zrange(key, 0, -1, withscores=True))
            if scores:
                self.client.zadd(key, {member: score - by for member, score in scores})
        self.leases = {lease: score - ELAPSE_MS for lease, score in self.leases.items()}
        for name, known in self.workers.items():
            until = self.client.hget(self.keys.worker(name), "probation_until_ms")
            if until:
                self.client.hset(
                    self.keys.worker(name), "probation_until_ms", int(until) - ELAPSE_MS
                )
            self.set_heartbeat(name, now_ms if known.up else now_ms - 2 * self.stale_after_ms)
        self.quiet = True
        try:
            super().elapse()
        finally:
            self.quiet = False
        self.assert_same()

    def set_heartbeat(self, worker: str, at_ms: int) -> None:
        """The worker's last heartbeat, if it has one that counts (it is in the fleet)."""
        if self.client.zscore(self.keys.workers, worker) is not None:
            self.client.zadd(self.keys.workers, {worker: at_ms})

    def lease_later(self) -> None:
        """A lease is a score, NOW + grace: two written in the same millisecond would be
        one. Wait for the next millisecond, so each lease of the model is its own."""
        while self.ledger.time_ms() <= self.leased_at:
            time.sleep(0.0002)

    def leased(self, member: str, lease: int, score: str) -> None:
        self.leases[lease] = int(score)
        self.leased_at = int(score) - self.grace_ms
        self.issued.append((member, lease))

    # -- the stores ----------------------------------------------------------------------

    def assert_same(self) -> None:
        self.ledger.fold_stats()  # the counters: what the steps' events tallied
        keys, pipe = self.keys, self.client.pipeline(transaction=False)
        names = sorted(self.workers)
        for job_id in (*JOBS, GHOST):
            pipe.hgetall(keys.job(job_id))
        for name in names:
            pipe.hgetall(keys.worker(name))
            pipe.smembers(keys.worker_running(name))
            pipe.smembers(keys.worker_kill(name))
            pipe.zscore(keys.probation, name)
        pipe.hgetall(keys.stats)
        pipe.hgetall(keys.lost)
        for key in (keys.dispatch, keys.liveness, keys.stalls, keys.workers, KOMBU_UNACKED_INDEX):
            pipe.zrange(key, 0, -1, withscores=True)
        pipe.hkeys(KOMBU_UNACKED)
        pipe.zrange(keys.health_changes, 0, -1)
        for state in JobState:
            pipe.zrange(keys.jobs_in_state(state.value), 0, -1)
        pipe.time()
        *replies_list, (seconds, micros) = pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        replies = iter(replies_list)
        for job_id in (*JOBS, GHOST):
            self.same_job(job_id, next(replies))
        for name in names:
            record, running, kill, listed = (next(replies) for _ in range(4))
            self.same_worker(name, record, running, kill, listed, now_ms)
        stats, lost = (next(replies) for _ in range(2))
        dispatch, liveness, stalls, beats, index = (dict(next(replies)) for _ in range(5))
        unacked, changes = next(replies), next(replies)
        # The job lists (and so the counts) by state: every job in its state's list, and
        # in no other.
        listed = {state.value: set(next(replies)) for state in JobState}
        assert listed == {
            state.value: {j.id for j in self.jobs.values() if j.state is state}
            for state in JobState
        }, "job lists by state"

        assert {k: int(v) for k, v in stats.items()} == {k: v for k, v in self.stats.items() if v}
        assert lost == self.lost
        assert set(dispatch) == set(self.dispatch), "dispatch index"
        for member, entry in self.dispatch.items():
            if entry.lease:
                assert dispatch[member] == self.leases[entry.lease], (member, "lease")
            else:
                assert (dispatch[member] <= now_ms) == entry.due, (member, "due")
        for name, watch, stored in (
            ("liveness", self.liveness, liveness),
            ("stalls", self.stalls, stalls),
        ):
            assert {m: score <= now_ms for m, score in stored.items()} == watch, name
        assert sorted(changes) == sorted(self.health_changes), "health changes"
        for name, score in beats.items():
            stale = now_ms - score >= self.stale_after_ms
            assert stale == self.workers[name].silent, (name, "heartbeat")
        delivered = {tag_of(t): m for t, m in self.messages.items() if m.state == DELIVERED}
        assert set(unacked) == set(delivered) == set(index), "unacked"
        ceiling_s = (now_ms - self.grace_ms) / 1000
        for tag, message in delivered.items():
            claimed = index[tag] >= CLAIMED_OFFSET_S
            assert claimed == message.claimed, (tag, "claimed")
            if not claimed:
                assert (index[tag] <= ceiling_s) == message.lapsed, (tag, "lapsed")

    def same_job(self, job_id: str, stored: dict[str, str]) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            assert not stored, job_id
            return
        record = JobRecord.from_hash(stored)
        assert (record.state, record.attempt) == (job.state, job.attempt), job_id
        assert record.chain_start == job.chain_start, job_id
        assert (record.reason or "") == job.reason, job_id
        assert record.result == (json.loads(job.result) if job.result else None), job_id
        attempts = [json.loads(v) for k, v in sorted(stored.items()) if k.startswith("a:")]
        found = sorted(
            (
                a["n"],
                a.get("worker"),
                a.get("pid"),
                a.get("epoch"),
                a.get("outcome"),
                a.get("delivery_tag"),
                a.get("deferred", 0),
                a.get("late_result_discarded", False),
            )
            for a in attempts
        )
        modelled = [
            (
                a.n,
                a.worker,
                a.pid,
                a.epoch,
                a.outcome and a.outcome.value,
                None if a.delivery_tag is None else tag_of(a.delivery_tag),
                a.deferred,
                a.late_result_discarded,
            )
            for a in job.attempts.values()
        ]
        assert found == modelled, job_id

    def same_worker(
        self,
        name: str,
        stored: dict[str, str],
        running: set[str],
        kill: set[str],
        listed: Any,
        now_ms: int,
    ) -> None:
        known = self.workers[name]
        record = WorkerRecord.from_hash(stored, list(running))
        assert (record.state, record.epoch) == (known.state, known.epoch), name
        assert record.concurrency == known.concurrency, name
        assert record.running == sorted(self.running_on(name)), name
        assert kill == known.kill, name
        assert (record.verdict or "") == known.verdict, name
        quarantine = (record.quarantined_by or "", record.quarantine_mode or "")
        assert quarantine == (known.quarantined_by, known.quarantine_mode), name
        assert int(stored.get("stall_count") or 0) == known.stalls, name
        assert (listed is not None) == known.probation_listed, name
        until = record.probation_until_ms
        passed = None if until is None else until <= now_ms
        assert passed == known.probation_until, name


def tag_of(tag: int) -> str:
    """The model's delivery tag as kombu's (a string; kombu's are uuids)."""
    return f"tag-{tag}"


def member_job(member: str) -> str:
    return member.rpartition(".")[0]


# -- random histories ---------------------------------------------------------------------

jobs = st.sampled_from((*JOBS, *JOBS, GHOST))  # now and then, a job that was never submitted
workers = st.sampled_from(WORKERS)
deltas = st.sampled_from([0, 0, 0, -1, 1])  # which attempt, relative to the current one
nths = st.integers(0, 3)  # which of the messages (or leases) concerned, the oldest first
# Who sends a result or a failure: mostly the worker holding the attempt, as the model
# knows it when the step runs; otherwise any worker (a zombie or a stranger).
senders = st.sampled_from(["holder", "holder", *WORKERS])

# Arguments of each verb, and how often it comes up: enough claims to push jobs through
# retries, enough workers coming back, few enough cancels that jobs live a while.
ARGUMENTS: Mapping[str, tuple[st.SearchStrategy[Any], ...]] = {
    "submit": (jobs, st.sampled_from(sorted(WORKLOADS)), st.sampled_from(DEADLINES)),
    "register": (workers, st.sampled_from([1, 1, 2])),
    "unregister": (workers,),
    "declare_dead": (workers,),
    "quarantine": (workers, st.booleans()),
    "release": (workers,),
    "kill_node": (workers,),
    "heartbeat": (workers, st.sampled_from(VERDICTS), st.booleans(), st.sampled_from([0, 0, -1])),
    "apply_health": (workers,),
    "end_probation": (workers,),
    "claim": (jobs, deltas, workers, st.sampled_from([4242, 4243])),
    "run": (nths, st.sampled_from([4242, 4243])),
    "progress": (jobs, deltas, senders),
    "beat": (jobs, deltas, senders),
    "complete": (jobs, deltas, senders),
    "end_attempt": (jobs, deltas, senders, st.sampled_from(ENDINGS), st.booleans()),
    "publish": (jobs, deltas, st.booleans()),
    "publish_own": (jobs, deltas),
    "begin_dispatch": (jobs, deltas, st.booleans()),
    "end_dispatch": (nths,),
    "deliver": (nths, workers),
    "ack": (nths,),
    "reject": (nths,),
    "child_died": (nths, st.booleans()),
    "redeliver": (jobs, deltas),
    "stall": (jobs, deltas, st.sampled_from(["liveness", "progress"])),
    "sweep_stranded": (),
    "elapse": (),
    "watchdog_lost": (),
    "watchdog_tick": (),
    "expire": (jobs,),
    "cancel": (jobs,),
    "replay": (jobs,),
}
WEIGHTS = {
    "register": 3,
    "release": 2,
    "heartbeat": 2,
    "claim": 4,
    "run": 4,
    "deliver": 4,
    "publish": 3,
    "complete": 2,
    "end_attempt": 2,
    "elapse": 2,
}
operations = st.sampled_from(
    [verb for verb in ARGUMENTS for _ in range(WEIGHTS.get(verb, 1))]
).flatmap(lambda verb: st.tuples(st.just(verb), *ARGUMENTS[verb]))


def nth(found: list[int], n: int) -> int | None:
    return found[n % len(found)] if found else None


def apply(mirror: MirroredLedger, op: Op) -> None:
    verb, *args = op
    if verb in ("progress", "beat", "complete", "end_attempt", "claim"):
        job_id, delta, who, *rest = args
        job = mirror.jobs.get(job_id)
        n = max(1, (job.attempt if job else 1) + delta)
        holder = job.attempts[n] if job and n in job.attempts else None
        worker = ((holder and holder.worker) or WORKERS[0]) if who == "holder" else who
        if verb == "claim":
            mirror.claim(job_id, n, worker, *rest)
        elif verb == "progress":
            mirror.progress(job_id, n, worker)
        elif verb == "beat":
            mirror.beat(job_id, n, worker)
        elif verb == "complete":
            mirror.complete(job_id, n, worker, dumps({"attempt": n, "worker": worker}))
        else:
            outcome, named = Outcome(rest[0]), rest[1]
            if named and holder is not None and holder.worker == worker:
                # The report of the child that claimed it, naming it and its incarnation.
                pid = holder.pid or 0
                mirror.end_attempt(job_id, n, outcome, worker, pid=pid, epoch=holder.epoch)
            else:
                mirror.end_attempt(job_id, n, outcome, worker)
    elif verb in ("publish", "publish_own", "begin_dispatch", "redeliver", "stall"):
        job_id, delta, *rest = args
        job = mirror.jobs.get(job_id)
        n = max(1, (job.attempt if job else 1) + delta)
        member = attempt_id(job_id, n)
        if verb == "redeliver":
            mirror.redeliver(job_id, n)
        elif verb == "stall":
            mirror.stall(member, rest[0])
        else:
            # With its own lease: the last one written for the attempt (the producer's).
            own = [lease for leased, lease in mirror.issued if leased == member]
            if verb == "publish_own":
                # The producer's publish, under the lease it holds (or held), on a broker
                # the scripts cannot reach.
                if own and not mirror.scripts_publish:
                    mirror.publish_own(member, own[-1])
            else:
                lease = own[-1] if rest[0] and own else 0
                getattr(mirror, verb)(member, lease)
    elif verb == "end_dispatch":
        if mirror.issued:
            member, lease = mirror.issued[args[0] % len(mirror.issued)]
            mirror.end_dispatch(member, lease, mirror.scripts_publish)
    elif verb in ("deliver", "run", "ack", "reject", "child_died"):
        state = QUEUED if verb == "deliver" else DELIVERED
        tag = nth([t for t, m in sorted(mirror.messages.items()) if m.state == state], args[0])
        if tag is None:
            return
        message = mirror.messages[tag]
        if verb == "deliver":
            mirror.deliver(tag, args[1])
        elif verb == "run":
            job_id, n = member_job(message.member), int(message.member.rpartition(".")[2])
            consumer = message.consumer[0] if message.consumer else WORKERS[0]
            mirror.claim(job_id, n, consumer, args[1], tag)
        elif verb == "child_died":
            mirror.child_died(tag, connected=args[1])
            mirror.assert_same()
        else:
            getattr(mirror, verb)(tag)
    elif verb == "heartbeat":
        worker, verdict, holds, delta = args
        known = mirror.workers.get(worker)
        held = set(mirror.running_on(worker)) if holds else set()
        mirror.heartbeat(worker, (known.epoch if known else 1) + delta, held, verdict)
    elif verb == "register":
        with contextlib.suppress(WorkerNameInUseError):
            mirror.register(*args)
    elif verb == "submit":  # again, as a producer retrying; or the never-submitted job
        job_id, workload, deadline = args
        mirror.submit(job_id, workload, deadline != "none", deadline == "passed")
    elif verb == "unregister":
        known = mirror.workers.get(args[0])
        mirror.unregister(args[0], known.epoch if known else 1)
    elif verb == "kill_node":
        if args[0] in mirror.workers:
            mirror.kill_node(args[0])
    elif verb == "watchdog_lost":
        for member, verdict in sorted(mirror.lost.items()):
            job_id, n = member_job(member), int(member.rpartition(".")[2])
            mirror.end_attempt(job_id, n, Outcome(verdict))
    else:
        getattr(mirror, verb)(*args)


# Paths the random draws reach seldom, spelled out: a claim retried after a lost reply, a
# node left out for the job it took down, poison, a replay, a result sent twice, a zombie,
# a retry past the deadline; evacuation, draining, probation and release.
FAILOVER_AND_REPLAY: list[Op] = [
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j1", 0, "w2", 4243),
    ("end_attempt", "j1", 0, "holder", "worker_lost", False),
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j1", 0, "w2", 4242),
    ("end_attempt", "j1", 0, "holder", "stalled", True),
    ("replay", "j1"),
    ("claim", "j1", 0, "w1", 4242),
    ("complete", "j1", 0, "holder"),
    ("complete", "j1", 0, "holder"),
    ("complete", "j1", -1, "w2"),
    ("claim", "j3", 0, "w2", 4242),
    ("end_attempt", "j3", 0, "holder", "error", True),
    ("expire", "j2"),
]
QUARANTINE_AND_PROBATION: list[Op] = [
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j2", 0, "w1", 4243),
    ("claim", "j3", 0, "w2", 4242),
    ("quarantine", "w1", False),
    ("claim", "j1", 1, "w1", 4242),
    ("watchdog_lost",),
    ("quarantine", "w2", True),
    ("complete", "j3", 0, "holder"),
    ("declare_dead", "w1"),
    ("register", "w1", 1),
    ("claim", "j1", 0, "w1", 4242),
    ("release", "w1"),
    ("claim", "j1", 0, "w1", 4242),
    ("unregister", "w1"),
    ("watchdog_lost",),
    ("release", "w2"),
    ("cancel", "j2"),
    ("cancel", GHOST),
]
# finish.lua used to drop the lost entry when another worker reported a failure for a
# running attempt, stranding it on its dead node (j1 has no deadline): it must stay lost.
STRANGER_FAILURE_REPORT: list[Op] = [
    ("claim", "j1", 0, "w1", 4242),
    ("declare_dead", "w1"),
    ("end_attempt", "j1", 0, "w2", "worker_lost", False),
    ("watchdog_lost",),
    ("claim", "j1", 0, "w2", 4242),
    ("complete", "j1", 0, "holder"),
]
# A failed job deferred from its node to a free one, at most three times; the other
# node busy, then free; health: drained, evacuated, recovered on probation, readmitted;
# an operator's quarantine that a recovery does not lift, and an operator's drain that
# an UNHEALTHY verdict turns into the health check's, which a recovery does lift.
DEFERRALS_AND_HEALTH: list[Op] = [
    ("claim", "j1", 0, "w1", 4242),
    ("end_attempt", "j1", 0, "holder", "worker_lost", True),
    ("claim", "j2", 0, "w2", 4242),
    ("claim", "j1", 0, "w1", 4242),
    ("end_attempt", "j1", 0, "holder", "stalled", True),
    ("complete", "j2", 0, "holder"),
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j1", 0, "w1", 4242),
    ("heartbeat", "w1", "DEGRADED", True, 0),
    ("apply_health", "w1"),
    ("heartbeat", "w1", "UNHEALTHY", True, 0),
    ("watchdog_tick",),
    ("heartbeat", "w1", "HEALTHY", False, 0),
    ("apply_health", "w1"),
    ("end_probation", "w1"),
    ("elapse",),
    ("end_probation", "w1"),
    ("quarantine", "w2", False),
    ("heartbeat", "w2", "UNHEALTHY", False, 0),
    ("apply_health", "w2"),
    ("heartbeat", "w2", "HEALTHY", False, 0),
    ("apply_health", "w2"),
    ("heartbeat", "w2", "UNHEALTHY", False, -1),
    ("release", "w2"),
    ("quarantine", "w2", True),
    ("heartbeat", "w2", "UNHEALTHY", False, 0),
    ("apply_health", "w2"),
    ("heartbeat", "w2", "HEALTHY", False, 0),
    ("apply_health", "w2"),
]
# The dispatch: the producer's own lease, another publisher refused, a lease that dies
# with its publisher, a refused claim asking for a new publish; deliveries: claimed,
# put back under the same tag, taken by a node that dies, swept; a child lost before
# its claim, redelivered; watches that lapse and stall.
DISPATCH_AND_DELIVERIES: list[Op] = [
    ("begin_dispatch", "j1", 0, False),
    ("publish", "j1", 0, True),
    ("end_dispatch", 0),
    ("begin_dispatch", "j2", 0, True),
    ("elapse",),
    ("publish", "j2", 0, False),
    ("end_dispatch", 1),
    ("deliver", 0, "w1"),
    ("deliver", 0, "w2"),
    ("run", 0, 4242),
    ("reject", 0),
    ("deliver", 0, "w2"),
    ("run", 1, 4243),
    ("kill_node", "w2"),
    ("elapse",),
    ("sweep_stranded",),
    ("beat", "j1", 0, "holder"),
    ("stall", "j1", 0, "progress"),
    ("stall", "j1", 0, "liveness"),
    ("watchdog_tick",),
    ("publish", "j3", 0, True),
    ("deliver", 0, "w1"),
    ("child_died", 0, True),
    ("redeliver", "j3", 0),
    ("deliver", 0, "w1"),
    ("child_died", 0, False),
    ("elapse",),
    ("watchdog_tick",),
]


@settings(max_examples=100, deadline=None)
@example(
    probation=False,
    setup=[("batch", "none"), ("batch", "none"), ("batch", "none")],
    ops=STRANGER_FAILURE_REPORT,
    scripts_publish=False,
)
@example(
    probation=False,
    setup=[("fragile", "none"), ("batch", "far"), ("realtime", "passed")],
    ops=FAILOVER_AND_REPLAY,
    scripts_publish=False,
)
@example(
    probation=True,
    setup=[("batch", "none"), ("batch", "none"), ("exclusive", "far")],
    ops=QUARANTINE_AND_PROBATION,
    scripts_publish=False,
)
@example(
    probation=False,
    setup=[("batch", "none"), ("batch", "far"), ("realtime", "none")],
    ops=DEFERRALS_AND_HEALTH,
    scripts_publish=False,
)
@example(
    probation=True,
    setup=[("realtime", "none"), ("batch", "none"), ("batch", "far")],
    ops=DISPATCH_AND_DELIVERIES,
    scripts_publish=False,
)
@example(
    probation=True,
    setup=[("realtime", "none"), ("batch", "none"), ("batch", "far")],
    ops=DISPATCH_AND_DELIVERIES,
    scripts_publish=True,
)
@given(
    probation=st.booleans(),
    setup=st.lists(
        st.tuples(st.sampled_from(sorted(WORKLOADS)), st.sampled_from(DEADLINES)),
        min_size=len(JOBS),
        max_size=len(JOBS),
    ),
    ops=st.lists(operations, min_size=20, max_size=60),
    scripts_publish=st.booleans(),
)
def test_random_histories_agree(
    ledgers: dict[bool, Ledger],
    probation: bool,
    setup: list[tuple[str, str]],
    ops: list[Op],
    scripts_publish: bool,
) -> None:
    mirror = MirroredLedger(ledgers[probation])
    mirror.scripts_publish = scripts_publish
    for job_id, (workload, deadline) in zip(JOBS, setup, strict=True):
        mirror.submit(job_id, workload, deadline != "none", deadline == "passed")
    for worker in WORKERS:
        mirror.register(worker)
    for op in ops:
        apply(mirror, op)


# -- the unit tier's state machines, on the mirror ----------------------------------------

JOB_SETUPS = st.lists(
    st.tuples(st.sampled_from(sorted(WORKLOADS)), st.sampled_from(DEADLINES)),
    min_size=len(JOBS),
    max_size=len(JOBS),
)


def test_the_state_machine_agrees(ledgers: dict[bool, Ledger]) -> None:
    class MirroredLifecycle(JobLifecycle):
        @initialize(jobs=JOB_SETUPS, alive=st.sets(workers), probation=st.booleans())
        def start(self, jobs: list[tuple[str, str]], alive: set[str], probation: bool) -> None:
            self.model = MirroredLedger(ledgers[probation])
            for job_id, (workload, deadline) in zip(JOBS, jobs, strict=True):
                self.model.submit(job_id, workload, deadline != "none", deadline == "passed")
            for worker in sorted(alive):
                self.register(worker)

        def deadline_passes(self, job_id: str) -> None:
            """Redis keeps time itself: deadlines are set at submit, past or far."""

    run_state_machine_as_test(
        MirroredLifecycle,
        settings=settings(max_examples=40, stateful_step_count=40, deadline=None),
    )


def test_the_grid_agrees(ledgers: dict[bool, Ledger]) -> None:
    """The whole model, with the broker, the processes and their faults."""

    class MirroredGrid(GridLifecycle):
        @initialize(
            jobs=JOB_SETUPS,
            absent=st.sets(workers),
            probation=st.booleans(),
            unpublished=st.sets(st.sampled_from(JOBS)),
            scripts_publish=st.booleans(),
        )
        def start(
            self,
            jobs: list[tuple[str, str]],
            absent: set[str],
            probation: bool,
            unpublished: set[str],
            scripts_publish: bool,
        ) -> None:
            self.model = MirroredLedger(ledgers[probation])
            self.model.scripts_publish = scripts_publish
            for job_id, (workload, deadline) in zip(JOBS, jobs, strict=True):
                self.model.submit(job_id, workload, deadline != "none", deadline == "passed")
            for worker in sorted(set(WORKERS) - absent):
                self.register(worker)
            # With scripts_publish the job's message went out with it: nothing to publish.
            for job_id in [] if scripts_publish else sorted(set(JOBS) - unpublished):
                member = attempt_id(job_id, 1)
                assert self.model.publish_own(member, self.model.dispatch[member].lease)

        def deadline_passes(self, job_id: str) -> None:
            """Redis keeps time itself: deadlines are set at submit, past or far."""

    run_state_machine_as_test(
        MirroredGrid,
        settings=settings(max_examples=120, stateful_step_count=50, deadline=None),
    )
