"""The job state machine as an executable specification: a pure-Python model of the ledger.

Each verb applies the compare-and-set rules of its Lua script (``gridqueue/lua/``) to plain
data, without Redis or a clock: a deadline has passed or not, a worker falls silent when the
caller says so, and the caller holds the watchdog lease. Replies and counters are named as
in the scripts, so a differential test replays one history on both and compares them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from gridqueue.keys import attempt_id
from gridqueue.policies import Decision, EndedAttempt, GiveUp, Retry, decide
from gridqueue.states import NODE_OUTCOMES, TERMINAL_STATES, JobState, Outcome, WorkerState
from gridqueue.workloads import WorkloadClass

# claim.lua counts each claim that starts nothing.
_REFUSALS = dict(
    fenced="claims_refused",
    stale="stale_deliveries",
    duplicate="duplicate_deliveries",
    avoid="claims_deferred",
)
# finish.lua counts a first attempt lost to its node as a bad placement.
_BAD_PLACEMENT = (Outcome.WORKER_LOST, Outcome.GPU_FAULT)
# A worker in these states has left the fleet: the watchdog no longer watches it.
_GONE = (WorkerState.DEAD, WorkerState.STOPPED)


@dataclass
class AttemptModel:
    """One try of a job: who claimed it and how it ended."""

    n: int
    worker: str | None = None
    pid: int | None = None
    epoch: int | None = None  # the worker's incarnation that claimed it
    outcome: Outcome | None = None
    late_result_discarded: bool = False


@dataclass
class JobModel:
    """One job. Every verb returns the status its Lua script would answer."""

    id: str
    workload: str
    has_deadline: bool = False
    deadline_passed: bool = False
    state: JobState = JobState.QUEUED
    attempt: int = 1
    attempts: dict[int, AttemptModel] = field(default_factory=lambda: {1: AttemptModel(1)})
    result: str | None = None
    reason: str = ""
    chain_start: int = 1  # a replay starts a new chain: limits and poison count from here

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def current(self) -> AttemptModel:
        return self.attempts[self.attempt]

    def runs(self, n: int, worker: str | None = None) -> bool:
        """The compare of every compare-and-set that ends attempt ``n`` (by ``worker``)."""
        running = self.state is JobState.RUNNING and self.attempt == n
        return running and worker in (None, self.current.worker)

    @property
    def chain(self) -> list[AttemptModel]:
        return [a for k, a in self.attempts.items() if k >= self.chain_start]

    def claim(
        self,
        n: int,
        worker: str,
        worker_alive: bool,
        pid: int = 0,
        others_ready: bool = False,
        epoch: int = 0,
    ) -> str:
        # Placement fence first: a worker that is not ALIVE never starts work.
        if not worker_alive:
            return "fenced"
        # Attempt fence: only the current attempt of a queued job may start, once; the
        # same claim retried after a lost reply (same incarnation and pid) is answered again.
        if self.terminal or n != self.attempt:
            return "stale"
        if self.state is JobState.RUNNING:
            held = (self.current.worker, self.current.pid, self.current.epoch)
            return "ok" if held == (worker, pid, epoch) else "duplicate"
        # Spread a failing job: a node it took down leaves it to another ready node.
        if others_ready and any(
            a.worker == worker and a.outcome in NODE_OUTCOMES for a in self.chain[:-1]
        ):
            return "avoid"
        self.current.worker, self.current.pid, self.current.epoch = worker, pid, epoch
        self.state = JobState.RUNNING
        return "ok"

    def complete(self, n: int, worker: str, result: str) -> str:
        # Attempt fencing: a zombie's late result must not overwrite the current attempt's.
        attempt = self.attempts.get(n)
        if attempt and (attempt.worker, attempt.outcome) == (worker, Outcome.SUCCEEDED):
            return "ok"  # its own result, retried after a lost reply
        if not self.runs(n, worker):
            if attempt is not None:
                attempt.late_result_discarded = True
            return "stale"
        self.current.outcome = Outcome.SUCCEEDED
        self.result, self.state, self.reason = result, JobState.SUCCEEDED, ""
        return "ok"

    def finish(self, n: int, outcome: Outcome, decision: Decision, worker: str = "") -> str:
        """End running attempt ``n`` without a result; ``worker=''`` matches any worker."""
        if not self.runs(n, worker or None):
            return "stale"
        self.current.outcome = outcome
        if isinstance(decision, Retry):
            self.attempt, self.state = n + 1, JobState.QUEUED
            self.attempts[n + 1] = AttemptModel(n + 1)
            return "retry"
        self.state, self.reason = decision.state, decision.reason
        return "ended"

    def replay(self, has_deadline: bool) -> str:
        """An operator re-runs a dead letter: a fresh chain, the old one kept as history."""
        if self.state is not JobState.DEAD_LETTERED:
            return "not_dead_lettered"
        self.attempt = self.chain_start = self.attempt + 1
        self.attempts[self.attempt] = AttemptModel(self.attempt)
        self.state, self.reason, self.result = JobState.QUEUED, "", None
        self.has_deadline, self.deadline_passed = has_deadline, False
        return "ok"


@dataclass
class WorkerModel:
    """A worker name and its current incarnation."""

    state: WorkerState = WorkerState.ALIVE
    epoch: int = 1


@dataclass
class LedgerModel:
    """Jobs, workers, the ``lost`` hash and the ``stats`` counters. With ``probation``
    (``GRIDQUEUE_PROBATION_BASE_S > 0``) a worker back from the dead serves a probation.
    A probation ends only by ``release`` here: its timed end needs a clock, as do health
    verdicts and stalls, which are left out."""

    workloads: Mapping[str, WorkloadClass] = field(default_factory=dict)
    probation: bool = True
    jobs: dict[str, JobModel] = field(default_factory=dict)
    workers: dict[str, WorkerModel] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)  # attempt id -> outcome
    stats: Counter[str] = field(default_factory=Counter)

    def submit(
        self, job_id: str, workload: str, has_deadline: bool = False, passed: bool = False
    ) -> JobModel:
        """A producer retrying after a lost reply sends the same id: written once."""
        if (job := self.jobs.get(job_id)) is None:
            job = JobModel(job_id, workload, has_deadline, has_deadline and passed)
            self.jobs[job_id] = job
        return job

    def claim(self, job_id: str, n: int, worker: str, pid: int = 0) -> str:
        """Every worker serves every job's model: "another ready node" is any other ALIVE."""
        job = self.jobs.get(job_id)
        if job is None:
            return "unknown"
        ready = {name for name, w in self.workers.items() if w.state is WorkerState.ALIVE}
        fresh = job.state is JobState.QUEUED
        known = self.workers.get(worker)
        epoch = known.epoch if known else 0
        status = job.claim(n, worker, worker in ready, pid, bool(ready - {worker}), epoch)
        if status in _REFUSALS:
            self.stats[_REFUSALS[status]] += 1
        elif status == "ok" and fresh and n == 1:
            self.stats["first_placements"] += 1
        return status

    def progress(self, job_id: str, n: int, worker: str) -> bool:
        job = self.jobs.get(job_id)
        return job is not None and job.runs(n, worker)

    def complete(self, job_id: str, n: int, worker: str, result: str) -> bool:
        job = self.jobs.get(job_id)
        if job is not None and job.complete(n, worker, result) == "ok":
            self.lost.pop(attempt_id(job_id, n), None)
            return True
        self.stats["stale_results_discarded"] += 1
        return False

    def end_attempt(self, job_id: str, n: int, outcome: Outcome, worker: str = "") -> str:
        """``Ledger.end_attempt``: ask the workload's policy, then commit as ``finish.lua``."""
        job = self.jobs.get(job_id)
        if job is None or not job.runs(n):
            self.lost.pop(attempt_id(job_id, n), None)  # superseded: not the watchdog's now
            return "stale"
        verdict = self.lost.get(attempt_id(job_id, n))
        if worker and verdict is not None and job.current.worker == worker:
            outcome = Outcome(verdict)  # the watchdog's verdict is the cause, not the symptom
        chain = job.chain
        history = [EndedAttempt(a.worker, a.outcome) for a in chain[:-1]]
        history.append(EndedAttempt(job.current.worker, outcome.value))
        remaining_s = None
        if job.has_deadline:
            remaining_s = 0.0 if job.deadline_passed else math.inf
        decision: Decision = GiveUp("unknown_workload")
        if (workload := self.workloads.get(job.workload)) is not None:
            decision = decide(workload, outcome, len(chain), history, remaining_s)
        status = job.finish(n, outcome, decision, worker)
        if status == "stale":  # another worker's word: refused; if lost, it stays lost
            return status
        self.lost.pop(attempt_id(job_id, n), None)
        if n == 1 and outcome in _BAD_PLACEMENT:
            self.stats["bad_first_placements"] += 1
        if status == "retry":
            self.stats["requeues"] += 1
        return status

    def expire(self, job_id: str) -> str:
        job = self.jobs.get(job_id)
        if job is None or job.terminal:
            return "stale"
        if not job.deadline_passed:
            return "not_due"
        return self._stop(job, JobState.EXPIRED, Outcome.EXPIRED, "deadline")

    def cancel(self, job_id: str, reason: str = "cancelled") -> str:
        job = self.jobs.get(job_id)
        if job is None:
            return "unknown"
        return self._stop(job, JobState.CANCELLED, Outcome.CANCELLED, reason)

    def replay(self, job_id: str) -> str:
        job = self.jobs.get(job_id)
        if job is None:
            return "unknown"
        workload = self.workloads.get(job.workload)
        return job.replay(workload is not None and workload.default_deadline_s is not None)

    def _stop(self, job: JobModel, state: JobState, outcome: Outcome, reason: str) -> str:
        """End the job from outside: its current attempt, queued or running, ends with it
        and leaves every index of running work, the lost hash included."""
        if job.terminal:
            return "stale"
        job.current.outcome = outcome
        job.state, job.reason = state, reason
        self.lost.pop(attempt_id(job.id, job.attempt), None)
        return "ok"

    def running_on(self, worker: str) -> list[str]:
        """The worker's running attempts (the ``worker:<name>:running`` set)."""
        return [
            attempt_id(j.id, j.attempt) for j in self.jobs.values() if j.runs(j.attempt, worker)
        ]

    def _lose_attempts_of(self, worker: str, outcome: Outcome = Outcome.WORKER_LOST) -> int:
        members = self.running_on(worker)
        for member in members:
            self.lost[member] = outcome.value
        return len(members)

    def register(self, worker: str) -> int:
        """A new incarnation: what the name still runs belongs to the old one, and is lost.
        A quarantine or a probation outlives the restart."""
        self._lose_attempts_of(worker)
        known = self.workers.setdefault(worker, WorkerModel(epoch=0))
        if known.state is WorkerState.DEAD and self.probation:
            known.state = WorkerState.PROBATION
        elif known.state not in (WorkerState.QUARANTINED, WorkerState.PROBATION):
            known.state = WorkerState.ALIVE
        known.epoch += 1
        return known.epoch

    def unregister(self, worker: str, epoch: int) -> bool:
        known = self.workers.get(worker)
        if known is None or known.epoch != epoch:
            return False
        self._lose_attempts_of(worker)
        known.state = WorkerState.STOPPED
        return True

    def declare_dead(self, worker: str) -> int | None:
        """The worker went silent past ``stale_after_s``; None if it is not a live worker."""
        known = self.workers.get(worker)
        if known is None or known.state in _GONE:
            return None
        known.state = WorkerState.DEAD
        self.stats["workers_declared_dead"] += 1
        return self._lose_attempts_of(worker)

    def quarantine(self, worker: str, drain: bool = False) -> int | None:
        """An operator's quarantine: no new work, and unless it drains, its running attempts
        move to the lost hash now. None if the worker is not a live one."""
        known = self.workers.get(worker)
        if known is None or known.state in _GONE:
            return None
        known.state = WorkerState.QUARANTINED
        return 0 if drain else self._lose_attempts_of(worker, Outcome.EVACUATED)

    def release(self, worker: str) -> bool | None:
        """An operator re-admits a quarantined or probationary worker; None if unknown."""
        known = self.workers.get(worker)
        if known is None or known.state not in (WorkerState.QUARANTINED, WorkerState.PROBATION):
            return None if known is None else False
        known.state = WorkerState.ALIVE
        return True
