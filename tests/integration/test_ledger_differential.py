"""Differential test: the Lua ledger against its executable specification.

``MirroredLedger`` is a ``gridqueue.statemachine.LedgerModel`` whose every verb also runs
on a real Redis through ``Ledger``: the replies must agree, and after each verb so must
every job (state, attempt, chain, reason, result, each attempt's worker, pid, outcome and
late-result mark), the workers, the lost hash, the running index, the state counts and the
stats counters. Two kinds of history drive it:

- random sequences of verbs, from the right and the wrong workers, for current, superseded
  and never-submitted jobs, with any outcome;
- the unit tier's ``JobLifecycle`` state machine, unchanged, whose rules follow jobs through
  retries, failovers, poison and replays with its own invariants checked on the way.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, run_state_machine_as_test

from gridqueue.embedded import EmbeddedRedis
from gridqueue.errors import InvalidJobError, JobNotFoundError, WorkerNotFoundError
from gridqueue.keys import attempt_id, split_attempt_id
from gridqueue.ledger import Ledger, connect_redis, dumps
from gridqueue.settings import Settings
from gridqueue.statemachine import JobModel, LedgerModel
from gridqueue.states import JobState, Outcome
from tests.unit.test_statemachine import WORKLOADS, JobLifecycle

pytestmark = pytest.mark.integration

JOBS = ("j1", "j2", "j3")
GHOST = "never-submitted"
WORKERS = ("w1", "w2")
ENDINGS = sorted(outcome for outcome in Outcome if outcome is not Outcome.SUCCEEDED)
DEADLINES = ("none", "passed", "far")
# Every worker serves the one model, so claim.lua's "another ready node" is any other one.
MODEL_FIT = {"sim-llm": {"required_bytes": 1, "largest_gpu_bytes": 2}}
BY = "differential-test"

Op = tuple[Any, ...]


@pytest.fixture(scope="module")
def ledgers(redis_server: EmbeddedRedis) -> Iterator[dict[bool, Ledger]]:
    """One ledger with a probation for workers back from the dead, one without.

    stale_after_s rounds to 0 ms in declare_dead: every live worker counts as silent, so
    the test decides when one falls silent instead of sleeping. The probation (when on)
    is ten minutes: it never ends by itself during a test, as in the model. The workload
    classes are the unit tier's: the shipped ones and a fragile one that two node
    failures dead-letter.
    """
    client = connect_redis(redis_server.url)
    found = {}
    for probation in (False, True):
        config = Settings(
            redis_url=redis_server.url,
            stale_after_s=0.0004,
            heartbeat_interval_s=0.0002,
            probation_base_s=600.0 if probation else 0.0,
        )
        found[probation] = Ledger(client, config, WORKLOADS)
    yield found
    client.close()


class MirroredLedger(LedgerModel):
    """The model, with each verb run on the real ledger too and the two compared."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger.workloads, probation=ledger.settings.probation_base_s > 0)
        self.ledger = ledger
        ledger.client.flushall()
        held, self.token = ledger.lease(BY, 600_000)
        assert held

    def __deepcopy__(self, memo: dict[int, Any]) -> LedgerModel:
        """A plain model: what-if drives of the state machine must not touch Redis."""
        pure = LedgerModel(self.workloads, self.probation)
        state = (self.jobs, self.workers, self.lost, self.stats)
        pure.jobs, pure.workers, pure.lost, pure.stats = copy.deepcopy(state, memo)
        return pure

    # -- jobs ----------------------------------------------------------------------------

    def submit(
        self, job_id: str, workload: str, has_deadline: bool = False, passed: bool = False
    ) -> JobModel:
        deadline_in_ms = (1 if passed else 3_600_000) if has_deadline else 0
        payload = dumps({"job": job_id})
        reply = self.ledger.submit(job_id, "sim-llm", workload, payload, deadline_in_ms, None)
        assert (reply.job_id, reply.created) == (job_id, job_id not in self.jobs)
        if deadline_in_ms == 1:
            time.sleep(0.003)  # the 1 ms deadline has passed on the server clock
        job = super().submit(job_id, workload, has_deadline, passed)
        self.assert_same()
        return job

    def claim(self, job_id: str, n: int, worker: str, pid: int = 0) -> str:
        status = super().claim(job_id, n, worker, pid)
        claim = self.ledger.claim(job_id, n, worker, pid, "")
        assert claim.status == status, (job_id, n, worker, pid)
        if status == "fenced":
            known = self.workers.get(worker)
            assert claim.detail == (known.state.value if known else "UNKNOWN")
        elif status == "stale":
            assert claim.detail == self.jobs[job_id].state.value
        elif status == "avoid":
            assert claim.detail in WORKERS and claim.detail != worker
        elif status == "ok":
            assert json.loads(claim.payload or "") == {"job": job_id}
        return self.checked(status)

    def progress(self, job_id: str, n: int, worker: str) -> bool:
        marked = super().progress(job_id, n, worker)
        assert self.ledger.progress(job_id, n, worker, "50%") == marked
        return self.checked(marked)

    def complete(self, job_id: str, n: int, worker: str, result: str) -> bool:
        published = super().complete(job_id, n, worker, result)
        assert self.ledger.complete(job_id, n, worker, result) == published
        return self.checked(published)

    def end_attempt(self, job_id: str, n: int, outcome: Outcome, worker: str = "") -> str:
        token = self.token if worker == "" else ""  # the watchdog writes under its lease
        status = super().end_attempt(job_id, n, outcome, worker)
        end = self.ledger.end_attempt(job_id, n, outcome, "boom", worker=worker, token=token)
        assert end.status == status, (job_id, n, outcome, worker)
        if status == "retry":
            assert end.next_attempt == self.jobs[job_id].attempt
        elif status == "ended":
            assert end.state == self.jobs[job_id].state.value
        return self.checked(status)

    def expire(self, job_id: str) -> str:
        status = super().expire(job_id)
        assert self.ledger.expire(job_id, self.token) == (status == "ok"), (job_id, status)
        return self.checked(status)

    def cancel(self, job_id: str, reason: str = "cancelled") -> str:
        status = super().cancel(job_id, reason)
        if status == "unknown":
            with pytest.raises(JobNotFoundError):
                self.ledger.cancel(job_id, reason)
        else:
            assert self.ledger.cancel(job_id, reason) == (status == "ok"), (job_id, status)
        return self.checked(status)

    def replay(self, job_id: str) -> str:
        status = super().replay(job_id)
        if status == "ok":
            assert self.ledger.replay(job_id, BY) == self.jobs[job_id].attempt
        else:
            error = JobNotFoundError if status == "unknown" else InvalidJobError
            with pytest.raises(error):
                self.ledger.replay(job_id, BY)
        return self.checked(status)

    # -- workers -------------------------------------------------------------------------

    def register(self, worker: str) -> int:
        epoch = super().register(worker)
        # stale_after_s rounds to 0 ms: to claim.lua no heartbeat is ever fresh, so no
        # worker is one another could defer to ('avoid').
        self.workers[worker].silent = True
        ledger = self.ledger
        assert (
            ledger.register(worker, ["sim-llm"], 4242, "h", 1, "{}", model_fit=MODEL_FIT) == epoch
        )
        return self.checked(epoch)

    def unregister(self, worker: str, epoch: int) -> bool:
        stopped = super().unregister(worker, epoch)
        assert self.ledger.unregister(worker, epoch) == stopped
        return self.checked(stopped)

    def declare_dead(self, worker: str) -> int | None:
        lost = super().declare_dead(worker)
        assert self.ledger.declare_dead(worker, self.token) == lost
        return self.checked(lost)

    def quarantine(self, worker: str, drain: bool = False) -> int | None:
        moved = super().quarantine(worker, drain)
        if moved is None:
            with pytest.raises(WorkerNotFoundError):
                self.ledger.quarantine(worker, BY, "drill", drain)
        else:
            assert self.ledger.quarantine(worker, BY, "drill", drain) == moved
        return self.checked(moved)

    def release(self, worker: str) -> bool | None:
        released = super().release(worker)
        if released is None:
            with pytest.raises(WorkerNotFoundError):
                self.ledger.release(worker, BY)
        else:
            assert self.ledger.release(worker, BY) == released
        return self.checked(released)

    # -- the stores ----------------------------------------------------------------------

    def checked(self, reply: Any) -> Any:
        self.assert_same()
        return reply

    def assert_same(self) -> None:
        ledger = self.ledger
        for job_id in (*JOBS, GHOST):
            job = self.jobs.get(job_id)
            if job is None:
                with pytest.raises(JobNotFoundError):
                    ledger.get(job_id)
                continue
            record = ledger.get(job_id)
            assert (record.state, record.attempt) == (job.state, job.attempt), job_id
            assert record.chain_start == job.chain_start, job_id
            assert (record.reason or "") == job.reason, job_id
            assert record.result == (json.loads(job.result) if job.result else None), job_id
            stored = [
                (a.n, a.worker, a.pid, a.outcome, a.late_result_discarded) for a in record.attempts
            ]
            modelled = [
                (a.n, a.worker, a.pid, a.outcome and a.outcome.value, a.late_result_discarded)
                for a in job.attempts.values()
            ]
            assert stored == modelled, job_id
        assert ledger.stats() == {name: count for name, count in self.stats.items() if count}
        assert ledger.client.hgetall(ledger.keys.lost) == self.lost
        running = [attempt_id(j.id, j.attempt) for j in self.jobs.values() if j.runs(j.attempt)]
        assert sorted(ledger.running_attempts()) == sorted(running)
        states = Counter(job.state.value for job in self.jobs.values())
        assert ledger.counts() == {state.value: states[state.value] for state in JobState}
        for name, known in self.workers.items():
            record = ledger.worker(name)
            assert record is not None
            assert (record.state, record.epoch) == (known.state, known.epoch), name
            assert record.running == sorted(self.running_on(name)), name


# -- random histories ---------------------------------------------------------------------

jobs = st.sampled_from((*JOBS, *JOBS, GHOST))  # now and then, a job that was never submitted
workers = st.sampled_from(WORKERS)
deltas = st.sampled_from([0, 0, 0, -1, 1])  # which attempt, relative to the current one
# Who sends a result or a failure: mostly the worker holding the attempt, as the model
# knows it when the step runs; otherwise any worker (a zombie or a stranger).
senders = st.sampled_from(["holder", "holder", *WORKERS])

# Arguments of each verb, and how often it comes up: enough claims to push jobs through
# retries, enough workers coming back, few enough cancels that jobs live a while.
ARGUMENTS: Mapping[str, tuple[st.SearchStrategy[Any], ...]] = {
    "submit": (jobs, st.sampled_from(sorted(WORKLOADS)), st.sampled_from(DEADLINES)),
    "register": (workers,),
    "unregister": (workers,),
    "declare_dead": (workers,),
    "quarantine": (workers, st.booleans()),
    "release": (workers,),
    "claim": (jobs, deltas, workers, st.sampled_from([4242, 4243])),
    "progress": (jobs, deltas, senders),
    "complete": (jobs, deltas, senders),
    "end_attempt": (jobs, deltas, senders, st.sampled_from(ENDINGS)),
    "watchdog_lost": (),
    "expire": (jobs,),
    "cancel": (jobs,),
    "replay": (jobs,),
}
WEIGHTS = {"register": 3, "release": 2, "claim": 6, "complete": 3, "end_attempt": 3}
operations = st.sampled_from(
    [verb for verb in ARGUMENTS for _ in range(WEIGHTS.get(verb, 1))]
).flatmap(lambda verb: st.tuples(st.just(verb), *ARGUMENTS[verb]))


def apply(mirror: MirroredLedger, op: Op) -> None:
    verb, *args = op
    if verb in ("progress", "complete", "end_attempt", "claim"):
        job_id, delta, who, *rest = args
        job = mirror.jobs.get(job_id)
        n = max(1, (job.attempt if job else 1) + delta)
        holder = job.attempts[n].worker if job and n in job.attempts else None
        worker = (holder or WORKERS[0]) if who == "holder" else who
        if verb == "claim":
            mirror.claim(job_id, n, worker, *rest)
        elif verb == "progress":
            mirror.progress(job_id, n, worker)
        elif verb == "complete":
            mirror.complete(job_id, n, worker, dumps({"attempt": n, "worker": worker}))
        else:
            mirror.end_attempt(job_id, n, Outcome(rest[0]), worker)
    elif verb == "submit":  # again, as a producer retrying; or the never-submitted job
        job_id, workload, deadline = args
        mirror.submit(job_id, workload, deadline != "none", deadline == "passed")
    elif verb == "unregister":
        known = mirror.workers.get(args[0])
        mirror.unregister(args[0], known.epoch if known else 1)
    elif verb == "watchdog_lost":
        for member, outcome in sorted(mirror.lost.items()):
            job_id, n = split_attempt_id(member)
            mirror.end_attempt(job_id, n, Outcome(outcome))
    else:
        getattr(mirror, verb)(*args)


# Paths the random draws reach seldom, spelled out: a claim retried after a lost reply, a
# node left out for the job it took down, poison, a replay, a result sent twice, a zombie,
# a retry past the deadline; evacuation, draining, probation and release.
FAILOVER_AND_REPLAY: list[Op] = [
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j1", 0, "w2", 4243),
    ("end_attempt", "j1", 0, "holder", "worker_lost"),
    ("claim", "j1", 0, "w1", 4242),
    ("claim", "j1", 0, "w2", 4242),
    ("end_attempt", "j1", 0, "holder", "stalled"),
    ("replay", "j1"),
    ("claim", "j1", 0, "w1", 4242),
    ("complete", "j1", 0, "holder"),
    ("complete", "j1", 0, "holder"),
    ("complete", "j1", -1, "w2"),
    ("claim", "j3", 0, "w2", 4242),
    ("end_attempt", "j3", 0, "holder", "error"),
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
    ("register", "w1"),
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
    ("end_attempt", "j1", 0, "w2", "worker_lost"),
    ("watchdog_lost",),
    ("claim", "j1", 0, "w2", 4242),
    ("complete", "j1", 0, "holder"),
]


@settings(max_examples=40, deadline=None)
@example(
    probation=False,
    setup=[("batch", "none"), ("batch", "none"), ("batch", "none")],
    ops=STRANGER_FAILURE_REPORT,
)
@example(
    probation=False,
    setup=[("fragile", "none"), ("batch", "far"), ("realtime", "passed")],
    ops=FAILOVER_AND_REPLAY,
)
@example(
    probation=True,
    setup=[("batch", "none"), ("batch", "none"), ("exclusive", "far")],
    ops=QUARANTINE_AND_PROBATION,
)
@given(
    probation=st.booleans(),
    setup=st.lists(
        st.tuples(st.sampled_from(sorted(WORKLOADS)), st.sampled_from(DEADLINES)),
        min_size=len(JOBS),
        max_size=len(JOBS),
    ),
    ops=st.lists(operations, min_size=20, max_size=50),
)
def test_random_histories_agree(
    ledgers: dict[bool, Ledger], probation: bool, setup: list[tuple[str, str]], ops: list[Op]
) -> None:
    mirror = MirroredLedger(ledgers[probation])
    for job_id, (workload, deadline) in zip(JOBS, setup, strict=True):
        mirror.submit(job_id, workload, deadline != "none", deadline == "passed")
    for worker in WORKERS:
        mirror.register(worker)
    for op in ops:
        apply(mirror, op)


# -- the unit tier's state machine, on the mirror -----------------------------------------


def test_the_state_machine_agrees(ledgers: dict[bool, Ledger]) -> None:
    class MirroredLifecycle(JobLifecycle):
        @initialize(
            jobs=st.lists(
                st.tuples(st.sampled_from(sorted(WORKLOADS)), st.sampled_from(DEADLINES)),
                min_size=len(JOBS),
                max_size=len(JOBS),
            ),
            alive=st.sets(st.sampled_from(WORKERS)),
            probation=st.booleans(),
        )
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
