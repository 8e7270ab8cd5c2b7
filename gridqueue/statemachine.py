"""The job state machine as an executable specification: a pure-Python model of the ledger.

Each verb applies the compare-and-set rules of the Lua script of the same name in
``gridqueue/lua/`` to plain data, with no Redis and no clock: a deadline has passed or not,
a worker is declared dead when the caller says it fell silent, and the caller holds the
watchdog lease. Statuses and counters are named as in the scripts, so a differential test
replays one random history on both and compares them step by step.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from gridqueue.keys import attempt_id
from gridqueue.policies import Decision, EndedAttempt, GiveUp, Retry, decide
from gridqueue.states import TERMINAL_STATES, JobState, Outcome, WorkerState
from gridqueue.workloads import WorkloadClass

# claim.lua counts each refusal in the stats hash.
_CLAIM_COUNTERS = dict(
    fenced="claims_refused", stale="stale_deliveries", duplicate="duplicate_deliveries"
)


@dataclass
class AttemptModel:
    """One try of a job: who claimed it and how it ended."""

    n: int
    worker: str | None = None
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

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def current(self) -> AttemptModel:
        return self.attempts[self.attempt]

    def runs(self, n: int, worker: str | None = None) -> bool:
        """The compare of every compare-and-set that ends attempt ``n`` (by ``worker``)."""
        attempt = self.attempts.get(n)
        if self.state is not JobState.RUNNING or self.attempt != n or attempt is None:
            return False
        return worker is None or attempt.worker == worker

    def claim(self, n: int, worker: str, worker_alive: bool) -> str:
        # Placement fence first: a worker that is not ALIVE never starts work.
        if not worker_alive:
            return "fenced"
        # Attempt fence: only the current attempt of a queued job may start, once.
        if self.terminal or n != self.attempt:
            return "stale"
        if self.state is JobState.RUNNING:
            return "duplicate"
        self.current.worker = worker
        self.state = JobState.RUNNING
        return "ok"

    def complete(self, n: int, worker: str, result: str) -> str:
        # Attempt fencing: a zombie's late result must not overwrite the current attempt's.
        if not self.runs(n, worker):
            if n in self.attempts:
                self.attempts[n].late_result_discarded = True
            return "stale"
        self.current.outcome = Outcome.SUCCEEDED
        self.result = result
        self.state, self.reason = JobState.SUCCEEDED, ""
        return "ok"

    def finish(self, n: int, outcome: Outcome, decision: Decision, worker: str = "") -> str:
        """End running attempt ``n`` without a result; ``worker=''`` matches any worker."""
        if not self.runs(n, worker or None):
            return "stale"
        self.current.outcome = outcome
        if isinstance(decision, Retry):
            self.attempt = n + 1
            self.attempts[n + 1] = AttemptModel(n + 1)
            self.state = JobState.QUEUED
            return "retry"
        self.state, self.reason = decision.state, decision.reason
        return "ended"

    def expire(self) -> str:
        if not self.terminal and not self.deadline_passed:
            return "not_due"
        return self.stop(JobState.EXPIRED, Outcome.EXPIRED, "deadline")

    def cancel(self, reason: str = "cancelled") -> str:
        return self.stop(JobState.CANCELLED, Outcome.CANCELLED, reason)

    def stop(self, state: JobState, outcome: Outcome, reason: str) -> str:
        """End the job from outside: the current attempt, queued or running, ends with it."""
        if self.terminal:
            return "stale"
        self.current.outcome = outcome
        self.state, self.reason = state, reason
        return "ok"


@dataclass
class WorkerModel:
    """A worker name and its current incarnation."""

    state: WorkerState = WorkerState.ALIVE
    epoch: int = 1


@dataclass
class LedgerModel:
    """Jobs, workers, the ``lost`` hash and the counters of the ``stats`` hash."""

    workloads: Mapping[str, WorkloadClass] = field(default_factory=dict)
    jobs: dict[str, JobModel] = field(default_factory=dict)
    workers: dict[str, WorkerModel] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)  # attempt id -> outcome
    stats: Counter[str] = field(default_factory=Counter)

    def submit(
        self, job_id: str, workload: str, has_deadline: bool = False, passed: bool = False
    ) -> JobModel:
        assert job_id not in self.jobs, "submit.lua expects a fresh job id"
        self.jobs[job_id] = job = JobModel(job_id, workload, has_deadline, has_deadline and passed)
        return job

    def claim(self, job_id: str, n: int, worker: str) -> str:
        job = self.jobs.get(job_id)
        if job is None:
            return "unknown"
        known = self.workers.get(worker)
        status = job.claim(n, worker, known is not None and known.state is WorkerState.ALIVE)
        if status in _CLAIM_COUNTERS:
            self.stats[_CLAIM_COUNTERS[status]] += 1
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

    def finish(
        self, job_id: str, n: int, outcome: Outcome, decision: Decision, worker: str = ""
    ) -> str:
        job = self.jobs.get(job_id)
        # Ended or refused, the attempt is no longer the watchdog's to handle.
        self.lost.pop(attempt_id(job_id, n), None)
        if job is None:
            return "stale"
        status = job.finish(n, outcome, decision, worker)
        if status == "retry":
            self.stats["requeues"] += 1
        return status

    def end_attempt(self, job_id: str, n: int, outcome: Outcome, worker: str = "") -> str:
        """``Ledger.end_attempt``: ask the workload's policy, then ``finish``."""
        job = self.jobs.get(job_id)
        if job is None or not job.runs(n):
            self.lost.pop(attempt_id(job_id, n), None)
            return "stale"
        history = [EndedAttempt(a.worker, a.outcome) for k, a in job.attempts.items() if k < n]
        history.append(EndedAttempt(job.current.worker, outcome.value))
        remaining_s = None
        if job.has_deadline:
            remaining_s = 0.0 if job.deadline_passed else math.inf
        workload = self.workloads.get(job.workload)
        decision: Decision = GiveUp("unknown_workload")
        if workload is not None:
            decision = decide(workload, outcome, n, history, remaining_s)
        return self.finish(job_id, n, outcome, decision, worker)

    def expire(self, job_id: str) -> str:
        job = self.jobs.get(job_id)
        return "stale" if job is None else self._released(job, job.expire())

    def cancel(self, job_id: str, reason: str = "cancelled") -> str:
        job = self.jobs.get(job_id)
        return "unknown" if job is None else self._released(job, job.cancel(reason))

    def _released(self, job: JobModel, status: str) -> str:
        # An attempt that stops running leaves every index of running work, lost included.
        if status == "ok":
            self.lost.pop(attempt_id(job.id, job.attempt), None)
        return status

    def running_on(self, worker: str) -> list[str]:
        """The worker's running attempts (the ``worker:<name>:running`` set)."""
        return [
            attempt_id(job.id, job.attempt)
            for job in self.jobs.values()
            if job.state is JobState.RUNNING and job.current.worker == worker
        ]

    def _lose_attempts_of(self, worker: str) -> int:
        members = self.running_on(worker)
        for member in members:
            self.lost[member] = Outcome.WORKER_LOST.value
        return len(members)

    def register(self, worker: str) -> int:
        """A new incarnation: what the name still runs belongs to the old one, and is lost."""
        self._lose_attempts_of(worker)
        known = self.workers.setdefault(worker, WorkerModel(epoch=0))
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
        if known is None or known.state is not WorkerState.ALIVE:
            return None
        known.state = WorkerState.DEAD
        self.stats["workers_declared_dead"] += 1
        return self._lose_attempts_of(worker)
