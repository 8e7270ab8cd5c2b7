"""The job state machine as an executable specification: a pure-Python model of gridqueue.

It models what moves a job, in plain data, without Redis or a clock:

- the ledger (``gridqueue/lua/*.lua``): jobs and their attempts, workers and their
  incarnations, slots and health verdicts, quarantines and probations, the ``lost`` hash,
  the ``stats`` counters, the dispatch index (the promise that an attempt's message is
  published), the watch indexes (``liveness`` and ``stalls``: a running attempt's beat
  and progress mark), the health changes the watchdog has yet to apply, and each
  worker's kill orders;
- the broker (kombu on Redis, ``acks_late``): every message Celery carries, ``queued``
  in its model's list, ``delivered`` to a consumer (kept in kombu's ``unacked``, never
  redelivered by kombu itself), or ``acked`` (gone). A message is known by its delivery
  tag, made at publish, which stays the same when kombu puts it back on its queue;
- the processes: whether each node's main process is up (it heartbeats, and its consumer
  takes messages), whether it is still connected (a frozen process keeps its sockets; a
  dead one's close, and with them its presence subscription), and the pool children
  running claimed attempts (running, stuck, frozen or gone);
- the watchdog's tick, and what Celery and the worker agent do when a pool child dies:
  Celery puts its message back on the queue (``task_reject_on_worker_lost``) unless its
  connection is gone, and the agent reports the child, unless the node dies or Redis is
  out of reach first.

Time is the caller's: ``elapse()`` lets every grace and timeout pass at once (dispatch
leases and backoffs, claim graces, silent heartbeats, lapsed beats and progress marks,
probations), while deadlines pass only when the caller says so, and stalls counted
against a node never age out of their window. Each ledger verb applies the
compare-and-set rules of its Lua script and returns what the script would answer, and
counters are named as in the scripts, so a differential test replays one history on both.

``owners()`` states the contract's invariant (DESIGN.md section 1): a job that has not
ended has an owner that will move it. Three switches turn off the three parts of the fix
that keeps it true. ``recover_stranded``: the watchdog's stranded-delivery sweep
(``sweep_deliveries.lua``), and the agent's report of a pool child that died, which names
the child and its incarnation and, if the child died before its claim, redelivers the
attempt (``redeliver.lua``). ``claim_watches``: a claim puts the attempt under its
liveness and stall watch in the same step (``claim.lua``). ``requeue_lost``: Celery puts
a dead child's message back on its queue instead of acking it. With one off the model is
the system as it was before that part, and the property tests find the hole it closes: a
message taken and never claimed, a claim that nothing watches, or a child lost before its
claim whose report was lost with it.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gridqueue.errors import WorkerNameInUseError
from gridqueue.health import HealthLevel
from gridqueue.keys import attempt_id, split_attempt_id
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
# claim.lua defers one attempt to another worker at most this many times.
MAX_DEFERRALS = 3
# finish.lua counts a first attempt lost to its node as a bad placement.
_BAD_PLACEMENT = (Outcome.WORKER_LOST, Outcome.NODE_LOST, Outcome.GPU_FAULT)
# A worker in these states has left the fleet: the watchdog no longer watches it.
_GONE = (WorkerState.DEAD, WorkerState.STOPPED)
# heartbeat.lua accepts the beat of a worker in these states; any other is fenced.
_HEARTBEATING = (WorkerState.ALIVE, WorkerState.QUARANTINED, WorkerState.PROBATION)
# A verdict that keeps a node out of work (end_probation.lua).
_SICK = (HealthLevel.UNHEALTHY.value, HealthLevel.DEGRADED.value)
# Who quarantined a node, besides an operator: its health, or its repeated stalls.
HEALTH, WATCHDOG = "health", "watchdog"
EVACUATE, DRAIN = "evacuate", "drain"

DEFAULT_MODEL = "sim-llm"

# Where a message is: in its queue's list, in kombu's unacked (taken by a consumer that
# has not acked it), or gone.
QUEUED, DELIVERED, ACKED = "queued", "delivered", "acked"
# What a pool child does with a claimed attempt: beats and marks progress, beats only (a
# handler stuck in a CUDA call), nothing (SIGSTOP, D-state), or nothing ever again.
RUNNING, STUCK, FROZEN, GONE = "running", "stuck", "frozen", "gone"


@dataclass
class AttemptModel:
    """One try of a job: who claimed it and how it ended."""

    n: int
    worker: str | None = None
    pid: int | None = None
    epoch: int | None = None  # the worker's incarnation that claimed it
    outcome: Outcome | None = None
    late_result_discarded: bool = False
    delivery_tag: int | None = None  # the message the claim came with (kombu's tag)
    deferred: int = 0  # claims that left it to another worker ('avoid')

    def __deepcopy__(self, memo: dict[int, Any]) -> AttemptModel:
        # What-if drives copy the model at every step: this is fast, every field immutable.
        return copy.copy(self)


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
    model: str = DEFAULT_MODEL  # its attempts' messages go to this model's queue

    def __deepcopy__(self, memo: dict[int, Any]) -> JobModel:
        twin = copy.copy(self)  # the attempts are the one mutable field
        twin.attempts = {n: copy.copy(a) for n, a in self.attempts.items()}
        return twin

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

    def queues(self, n: int) -> bool:
        """Attempt ``n`` is the job's current attempt, waiting for a claim."""
        return self.state is JobState.QUEUED and self.attempt == n

    @property
    def chain(self) -> list[AttemptModel]:
        return [a for k, a in self.attempts.items() if k >= self.chain_start]

    @property
    def failed_on(self) -> set[str]:
        """Workers that went down under an earlier attempt of the current chain."""
        return {str(a.worker) for a in self.chain[:-1] if a.worker and a.outcome in NODE_OUTCOMES}

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
        # Spread a failing job: a node it took down leaves it to another node that can
        # take it now, a bounded number of times, so that it cannot bounce between them.
        if others_ready and worker in self.failed_on and self.current.deferred < MAX_DEFERRALS:
            self.current.deferred += 1
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

    def finish(
        self,
        n: int,
        outcome: Outcome,
        decision: Decision,
        worker: str = "",
        pid: int | None = None,
        epoch: int | None = None,
    ) -> str:
        """End running attempt ``n`` without a result; ``worker=''`` matches any worker.
        With ``pid`` (a worker's report, as the fixed agent sends it), the child and the
        incarnation that claimed the attempt must match too."""
        if not self.runs(n, worker or None):
            return "stale"
        if pid is not None and (self.current.pid, self.current.epoch) != (pid, epoch):
            return "stale"  # another child of the node, or another incarnation
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
    """A worker name, its current incarnation, and the process behind it."""

    state: WorkerState = WorkerState.ALIVE
    epoch: int = 1
    up: bool = True  # its main process runs: it heartbeats, and its consumer takes messages
    process: int = 0  # which process (a restart is a new one; a re-registration is not)
    silent: bool = False  # its heartbeat is older than stale_after: it may be declared dead
    late: bool = False  # its heartbeat is late by more than one interval
    # Its process lives (running or frozen), so its presence subscription is held: a live
    # process that loses it takes it again faster than the watchdog's two looks.
    connected: bool = True
    kill: set[str] = field(default_factory=set)  # attempts its agent must SIGKILL
    concurrency: int = 1  # its slots: how many attempts it runs at once
    verdict: str = ""  # the health verdict its heartbeat last carried
    quarantined_by: str = ""  # 'health', 'watchdog' (repeated stalls) or an operator
    quarantine_mode: str = ""  # 'evacuate' or 'drain'
    stalls: int = 0  # attempts of it declared stalled
    probation_until: bool | None = None  # its probation's end: passed, not yet, or none
    probation_listed: bool = False  # in the probation index the watchdog scans

    def __deepcopy__(self, memo: dict[int, Any]) -> WorkerModel:
        twin = copy.copy(self)
        twin.kill = set(self.kill)
        return twin


@dataclass
class DispatchEntry:
    """An entry of the dispatch index: the promise that the attempt will be published."""

    due: bool  # its score has passed: the watchdog's next tick publishes the attempt
    lease: int = 0  # the score begin_dispatch wrote for a publish under way; 0 if none

    def __deepcopy__(self, memo: dict[int, Any]) -> DispatchEntry:
        return copy.copy(self)  # every field is immutable


@dataclass
class MessageModel:
    """One Celery message (task ``<job>.<n>``) on its model's queue."""

    tag: int  # kombu's delivery tag, made at publish: the same when it is put back
    member: str
    queue: str
    state: str = QUEUED
    consumer: tuple[str, int] | None = None  # the (worker, process) that took it
    ran: bool = False  # its consumer ran the task: a claim answered, or the child died
    lapsed: bool = False  # in unacked for longer than the claim grace
    claimed: bool = False  # a claim came with it: out of the stranded-delivery sweep's range

    def __deepcopy__(self, memo: dict[int, Any]) -> MessageModel:
        return copy.copy(self)  # every field is immutable


@dataclass
class ChildModel:
    """A pool child that claimed an attempt."""

    worker: str
    process: int
    pid: int
    tag: int | None  # the message it runs
    state: str = RUNNING
    started: bool = False  # it sent its first beat and progress mark

    def __deepcopy__(self, memo: dict[int, Any]) -> ChildModel:
        return copy.copy(self)  # every field is immutable

    @property
    def beats(self) -> bool:
        return self.state in (RUNNING, STUCK)


@dataclass
class LedgerModel:
    """Jobs, workers, the ``lost`` hash, the ``stats`` counters, the dispatch and watch
    indexes, the broker's messages and the processes. With ``probation``
    (``GRIDQUEUE_PROBATION_BASE_S > 0``) a worker back from the dead serves a probation;
    one whose health recovers serves one either way (of no length without it). Every
    worker serves every model (so no claim is refused 'not_served')."""

    workloads: Mapping[str, WorkloadClass] = field(default_factory=dict)
    probation: bool = True
    jobs: dict[str, JobModel] = field(default_factory=dict)
    workers: dict[str, WorkerModel] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)  # attempt id -> outcome
    stats: Counter[str] = field(default_factory=Counter)
    recover_stranded: bool = True
    claim_watches: bool = True
    requeue_lost: bool = True
    # The broker is the ledger's own Redis, so the ledger's scripts publish: submit sends
    # attempt 1's message in the step that writes the job (no dispatch entry), and a
    # dispatch sends inside end_dispatch, only while its lease is still ours. Off: another
    # broker (RabbitMQ), where the producer publishes under the lease submit wrote.
    scripts_publish: bool = False
    stall_quarantine_after: int = 3  # stalls of one node that quarantine (drain) it
    dispatch: dict[str, DispatchEntry] = field(default_factory=dict)  # attempt id -> entry
    liveness: dict[str, bool] = field(default_factory=dict)  # attempt id -> lapsed
    stalls: dict[str, bool] = field(default_factory=dict)  # attempt id -> lapsed
    health_changes: set[str] = field(default_factory=set)  # workers whose verdict changed
    messages: dict[int, MessageModel] = field(default_factory=dict)  # delivery tag -> message
    children: dict[str, ChildModel] = field(default_factory=dict)  # attempt id -> claimer
    serial: int = 0  # the last delivery tag or dispatch lease handed out

    # -- the ledger: jobs ------------------------------------------------------------------

    def submit(
        self, job_id: str, workload: str, has_deadline: bool = False, passed: bool = False
    ) -> JobModel:
        """A producer retrying after a lost reply sends the same id: written once. With
        ``scripts_publish``, attempt 1's message goes out in the same step (``submit.lua``
        given the rendered message) and the attempt is published. Otherwise the dispatch
        entry is the producer's promise to publish: leased to it (``lease``) until the
        dispatch grace has passed, then due for the watchdog."""
        if (job := self.jobs.get(job_id)) is None:
            job = JobModel(job_id, workload, has_deadline, has_deadline and passed)
            self.jobs[job_id] = job
            if self.scripts_publish:
                self.send(attempt_id(job_id, 1))
                self.stats["attempts_published"] += 1
            else:
                self.serial += 1
                entry = DispatchEntry(due=False, lease=self.serial)
                self.dispatch[attempt_id(job_id, 1)] = entry
        return job

    def can_take(self, worker: str) -> bool:
        """``can_take`` in ``_common.lua``: the worker could start an attempt now: ALIVE,
        heartbeating within stale_after, with a free slot (every worker serves every
        model here)."""
        known = self.workers[worker]
        if known.state is not WorkerState.ALIVE or known.silent:
            return False
        return len(self.running_on(worker)) < known.concurrency

    def claim(self, job_id: str, n: int, worker: str, pid: int = 0, tag: int | None = None) -> str:
        """A job deferred from a node it took down goes to another worker that can take
        it now and did not go down under it either, at most MAX_DEFERRALS times per
        attempt. A refused claim (fenced, avoid) of the queued attempt asks for a new
        publish. With ``claim_watches`` a claim puts the attempt under its liveness and
        stall watch."""
        job = self.jobs.get(job_id)
        if job is None:
            return "unknown"
        known = self.workers.get(worker)
        alive = known is not None and known.state is WorkerState.ALIVE
        others_ready = False
        if worker in job.failed_on and job.queues(n):
            failed = job.failed_on
            others_ready = any(
                self.can_take(other) for other in self.workers if other not in failed
            )
        fresh = job.state is JobState.QUEUED
        queued = job.queues(n)
        epoch = known.epoch if known else 0
        status = job.claim(n, worker, alive, pid, others_ready, epoch)
        member = attempt_id(job_id, n)
        if status in _REFUSALS:
            self.stats[_REFUSALS[status]] += 1
            if status in ("fenced", "avoid") and queued:
                self.dispatch[member] = DispatchEntry(due=True)
        elif status == "ok" and fresh:
            if n == 1:
                self.stats["first_placements"] += 1
            self.stats["claims"] += 1
            job.current.delivery_tag = tag
            message = self.messages.get(tag) if tag is not None else None
            if message is not None and message.state == DELIVERED:
                message.claimed = True  # out of the stranded-delivery sweep's range
            self.dispatch.pop(member, None)
            if self.claim_watches:
                self.liveness[member] = self.stalls[member] = False
        return status

    def progress(self, job_id: str, n: int, worker: str) -> bool:
        """``progress.lua``: moves the progress mark, and so the stall watch."""
        job = self.jobs.get(job_id)
        if job is None or not job.runs(n, worker):
            return False
        self.stalls[attempt_id(job_id, n)] = False
        return True

    def beat(self, job_id: str, n: int, worker: str) -> bool:
        """``beat.lua``: the attempt's own heartbeat, from the child that runs it."""
        job = self.jobs.get(job_id)
        if job is None or not job.runs(n, worker):
            return False
        self.liveness[attempt_id(job_id, n)] = False
        return True

    def complete(self, job_id: str, n: int, worker: str, result: str) -> bool:
        job = self.jobs.get(job_id)
        running = job is not None and job.runs(n, worker)
        if job is not None and job.complete(n, worker, result) == "ok":
            if running:
                self._release(job, n)
                self.stats[f"attempts_ended:{Outcome.SUCCEEDED.value}"] += 1
            return True
        self.stats["stale_results_discarded"] += 1
        return False

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
        """``Ledger.end_attempt``: ask the workload's policy, then commit as ``finish.lua``.
        ``pid`` and ``epoch`` name the child and the incarnation that report (the agent's
        report, as fixed): they must be the claim's."""
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
        status = job.finish(n, outcome, decision, worker, pid, epoch)
        if status == "stale":  # another worker's word: refused; if lost, it stays lost
            return status
        self._release(job, n)
        self.stats[f"attempts_ended:{outcome.value}"] += 1
        if job.state is JobState.DEAD_LETTERED:
            self.stats["dead_lettered"] += 1
        if n == 1 and outcome in _BAD_PLACEMENT:
            self.stats["bad_first_placements"] += 1
        if isinstance(decision, Retry):
            # Published at once, or by the watchdog once the backoff has passed.
            due = int(decision.after_s * 1000) == 0
            self.dispatch[attempt_id(job_id, n + 1)] = DispatchEntry(due=due)
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
        status = job.replay(workload is not None and workload.default_deadline_s is not None)
        if status == "ok":
            self.dispatch[attempt_id(job_id, job.attempt)] = DispatchEntry(due=True)
        return status

    def _stop(self, job: JobModel, state: JobState, outcome: Outcome, reason: str) -> str:
        """End the job from outside: its current attempt, queued or running, ends with it
        and leaves every index of running work, the lost hash included. A running one's
        child is ordered killed; a queued one is never dispatched."""
        if job.terminal:
            return "stale"
        member = attempt_id(job.id, job.attempt)
        if job.state is JobState.RUNNING and job.current.worker in self.workers:
            self.workers[str(job.current.worker)].kill.add(member)
        job.current.outcome = outcome
        job.state, job.reason = state, reason
        self._release(job, job.attempt)
        self.stats[f"attempts_ended:{outcome.value}"] += 1
        self.dispatch.pop(member, None)
        return "ok"

    def _release(self, job: JobModel, n: int) -> None:
        """``release_attempt``: the attempt leaves every index of running work, and its
        message leaves kombu's unacked, so that kombu never redelivers it."""
        member = attempt_id(job.id, n)
        self.lost.pop(member, None)
        self.liveness.pop(member, None)
        self.stalls.pop(member, None)
        tag = job.attempts[n].delivery_tag
        if tag is not None and self.messages[tag].state == DELIVERED:
            self.messages[tag].state = ACKED

    def running_on(self, worker: str) -> list[str]:
        """The worker's running attempts (the ``worker:<name>:running`` set)."""
        return [
            attempt_id(j.id, j.attempt) for j in self.jobs.values() if j.runs(j.attempt, worker)
        ]

    def _lose_attempts_of(self, worker: str, outcome: Outcome = Outcome.NODE_LOST) -> int:
        members = self.running_on(worker)
        for member in members:
            self.lost[member] = outcome.value
        return len(members)

    # -- the ledger: workers ---------------------------------------------------------------

    def register(self, worker: str, concurrency: int = 1) -> int:
        """A new incarnation with ``concurrency`` slots: what the name still runs belongs
        to the old one, and is lost. A quarantine or a probation outlives the restart; the
        health verdict starts afresh. A worker whose process is down starts a new process,
        refused (WorkerNameInUseError) while the old one's heartbeat is fresh; one that is
        up registers again from the same process (its agent, fenced, killed its children
        first)."""
        known = self.workers.get(worker)
        # A new process, while the old one's heartbeat is still fresh: one name, one process.
        in_use = known is not None and not (known.up or known.silent)
        if in_use and known is not None and known.state in _HEARTBEATING:
            self.stats["registers_refused"] += 1
            raise WorkerNameInUseError(f"worker name {worker!r} is in use")
        self._lose_attempts_of(worker)
        known = self.workers.setdefault(worker, WorkerModel(epoch=0, up=False))
        if known.state is WorkerState.DEAD and self.probation:
            self._start_probation(known)
        elif known.state not in (WorkerState.QUARANTINED, WorkerState.PROBATION):
            known.state = WorkerState.ALIVE
        known.epoch += 1
        known.kill.clear()
        known.concurrency, known.verdict = concurrency, ""
        if not known.up:
            known.up, known.process = True, known.process + 1
        known.silent = known.late = False
        known.connected = True
        return known.epoch

    def unregister(self, worker: str, epoch: int) -> bool:
        known = self.workers.get(worker)
        if known is None or known.epoch != epoch:
            return False
        self._lose_attempts_of(worker)
        known.state = WorkerState.STOPPED
        return True

    def heartbeat(
        self, worker: str, epoch: int, held: set[str], verdict: str = ""
    ) -> tuple[str, list[str]]:
        """``heartbeat.lua``: ('ok', attempts to kill) or ('fenced', []) for a worker
        declared dead, stopped, unknown, or replaced by a newer incarnation. A kill order
        stays until the heartbeat no longer lists the attempt among those the worker
        ``held``, so that a lost reply loses none. A new health ``verdict`` is queued for
        the watchdog (``apply_health``)."""
        known = self.workers.get(worker)
        if known is None or known.state not in _HEARTBEATING or known.epoch != epoch:
            self.stats["heartbeats_refused"] += 1
            return "fenced", []
        known.silent = known.late = False
        if verdict and verdict != known.verdict:
            known.verdict = verdict
            self.health_changes.add(worker)
        known.kill &= held
        return "ok", sorted(known.kill)

    def declare_dead(self, worker: str, signal: str = "heartbeat") -> int | None:
        """``declare_dead.lua``: the worker went silent past ``stale_after_s``
        ('heartbeat'), or its beat is late by an interval and its connection has closed
        ('connection'); None if it is not a live worker (or, for 'connection', if its
        beat is on time or its process still holds its subscription)."""
        known = self.workers.get(worker)
        if known is None or known.state in _GONE:
            return None
        if signal == "connection" and not (known.late and not known.connected):
            return None
        known.state, known.probation_listed = WorkerState.DEAD, False
        self.stats["workers_declared_dead"] += 1
        self.stats["incidents:worker_dead"] += 1
        return self._lose_attempts_of(worker)

    def quarantine(self, worker: str, drain: bool = False, by: str = "operator") -> int | None:
        """An operator's quarantine (``by``): no new work, and unless it drains, its running
        attempts move to the lost hash now and their children are ordered killed. None if
        the worker is not a live one."""
        known = self.workers.get(worker)
        if known is None or known.state not in _HEARTBEATING:
            return None
        return self._quarantine(worker, by, DRAIN if drain else EVACUATE, Outcome.EVACUATED)

    def _quarantine(self, worker: str, by: str, mode: str, outcome: Outcome) -> int:
        """``quarantine`` in ``_common.lua``: 'evacuate' moves the running attempts (to
        the lost hash with ``outcome``) and orders their children killed."""
        known = self.workers[worker]
        was_quarantined = known.state is WorkerState.QUARANTINED
        known.state, known.probation_listed = WorkerState.QUARANTINED, False
        known.quarantined_by, known.quarantine_mode = by, mode
        moved = 0
        if mode == EVACUATE:
            known.kill.update(self.running_on(worker))
            moved = self._lose_attempts_of(worker, outcome)
        # The monitor's counters: once per quarantine, by kind; an incident when a fault
        # caused it or it moved work.
        kind = by if by in (HEALTH, WATCHDOG) else "operator"
        if not was_quarantined:
            self.stats[f"quarantines:{kind}"] += 1
        if moved or (kind != "operator" and not was_quarantined):
            incident = {HEALTH: "gpu_quarantine" if mode == EVACUATE else "gpu_drain"}.get(
                by, "stall_quarantine" if by == WATCHDOG else "operator_quarantine"
            )
            self.stats[f"incidents:{incident}"] += 1
        return moved

    def release(self, worker: str) -> bool | None:
        """An operator re-admits a quarantined or probationary worker; None if unknown."""
        known = self.workers.get(worker)
        if known is None or known.state not in (WorkerState.QUARANTINED, WorkerState.PROBATION):
            return None if known is None else False
        known.state = WorkerState.ALIVE
        known.quarantined_by = known.quarantine_mode = ""
        known.probation_until, known.probation_listed = None, False
        return True

    def _start_probation(self, known: WorkerModel) -> None:
        """``start_probation``: of no length without ``probation`` (a zero base)."""
        known.state = WorkerState.PROBATION
        known.quarantined_by = known.quarantine_mode = ""
        known.probation_until, known.probation_listed = not self.probation, True

    def apply_health(self, worker: str) -> str:
        """``apply_health.lua``, the watchdog's action on a changed verdict: UNHEALTHY
        quarantines the node and moves its running attempts now (outcome gpu_fault),
        unless it is evacuated already; DEGRADED quarantines and drains it, unless it is
        quarantined already; HEALTHY after a health quarantine starts its probation. A
        recovery does not lift another's quarantine (an operator's, or the watchdog's for
        repeated stalls), but an UNHEALTHY verdict on a node that was only drained makes
        the quarantine the health check's, which a recovery then lifts. Answers
        'evacuated', 'draining', 'probation' or 'ignored'."""
        self.health_changes.discard(worker)
        known = self.workers.get(worker)
        if known is None or known.state not in _HEARTBEATING:
            return "ignored"
        quarantined = known.state is WorkerState.QUARANTINED
        if known.verdict == HealthLevel.UNHEALTHY.value:
            if quarantined and known.quarantine_mode == EVACUATE:
                return "ignored"
            self._quarantine(worker, HEALTH, EVACUATE, Outcome.GPU_FAULT)
            return "evacuated"
        if known.verdict == HealthLevel.DEGRADED.value:
            if quarantined:
                return "ignored"
            self._quarantine(worker, HEALTH, DRAIN, Outcome.EVACUATED)
            return "draining"
        recovered = known.verdict == HealthLevel.HEALTHY.value and known.quarantined_by == HEALTH
        if recovered and quarantined:
            self._start_probation(known)
            return "probation"
        return "ignored"

    def end_probation(self, worker: str) -> bool:
        """``end_probation.lua``: a probation whose end has passed makes the worker ALIVE,
        unless its verdict is still sick."""
        known = self.workers.get(worker)
        if known is None:
            return False
        if known.state is not WorkerState.PROBATION:
            known.probation_listed = False
            return False
        if known.probation_until is False:
            return False
        known.probation_listed = False
        if known.verdict in _SICK:
            return False
        known.state, known.probation_until = WorkerState.ALIVE, None
        return True

    # -- the ledger: dispatch and watches --------------------------------------------------

    def begin_dispatch(self, member: str, own_lease: int = 0) -> int | None:
        """``begin_dispatch.lua``: lease the entry while the caller publishes. None if the
        attempt is no longer the job's queued attempt ('stale': the entry is dropped), if
        there is no entry ('published': it was published, or claimed), or if it is not due
        and its lease is not ``own_lease`` ('leased': another publisher holds it, or a
        backoff has not passed)."""
        job_id, n = split_attempt_id(member)
        job = self.jobs.get(job_id)
        if job is None or not job.queues(n):
            self.dispatch.pop(member, None)
            return None
        entry = self.dispatch.get(member)
        if entry is None or not (entry.due or (own_lease and entry.lease == own_lease)):
            return None
        self.serial += 1
        self.dispatch[member] = DispatchEntry(due=False, lease=self.serial)
        return self.serial

    def end_dispatch(self, member: str, lease: int, message: bool = False) -> bool:
        """``end_dispatch.lua``: drop the entry only if it still holds our lease (a refused
        claim may have asked for a new publish meanwhile, and that request must survive).
        With the attempt's ``message`` (``scripts_publish``), send it in the same step, and
        only then: a lease lost means its holder publishes."""
        entry = self.dispatch.get(member)
        if entry is None or entry.lease != lease:
            return False
        if message:
            self.send(member)
        del self.dispatch[member]
        self.stats["attempts_published"] += 1
        return True

    def stall(self, member: str, kind: str) -> str:
        """``stall.lua``: the attempt's liveness beat (``kind='liveness'``) or progress mark
        lapsed: it is lost with outcome 'stalled' and its child is ordered killed; the
        node that stalls ``stall_quarantine_after`` times is quarantined (drained).
        Answers 'stalled', 'alive' (not lapsed) or 'stale'."""
        index = self.liveness if kind == "liveness" else self.stalls
        if member not in index:
            return "stale"
        if not index[member]:
            return "alive"
        job_id, n = split_attempt_id(member)
        job = self.jobs.get(job_id)
        if job is None or not job.runs(n) or job.current.worker is None:
            del index[member]
            return "stale"
        if member in self.lost:  # already judged: the first verdict stays the cause
            self.liveness.pop(member, None)
            self.stalls.pop(member, None)
            return "stale"
        self.liveness.pop(member, None)
        self.stalls.pop(member, None)
        self.lost[member] = Outcome.STALLED.value
        worker = job.current.worker
        known = self.workers[worker]
        known.kill.add(member)
        self.stats["stalls"] += 1
        self.stats["incidents:stall"] += 1
        known.stalls += 1
        if known.stalls >= self.stall_quarantine_after and known.state in (
            WorkerState.ALIVE,
            WorkerState.PROBATION,
        ):
            self._quarantine(worker, WATCHDOG, DRAIN, Outcome.EVACUATED)
        return "stalled"

    def redeliver(self, job_id: str, n: int) -> str:
        """``redeliver.lua``: a worker's report that the child given attempt ``n`` died
        before it claimed it: if the attempt is still the job's queued attempt, its
        dispatch entry is due now. Answers 'ok' or 'stale'."""
        job = self.jobs.get(job_id)
        if job is None or not job.queues(n):
            return "stale"
        self.dispatch[attempt_id(job_id, n)] = DispatchEntry(due=True)
        self.stats["redeliveries"] += 1
        return "ok"

    def sweep_stranded(self) -> list[str]:
        """``sweep_deliveries.lua``, the watchdog's stranded-delivery sweep over kombu's
        unacked index: a message taken longer than the claim grace ago, and never claimed,
        whose attempt is still the job's queued attempt lost its consumer before the claim.
        It leaves unacked and the attempt's dispatch entry is due now. A copy that carries
        the running attempt's own delivery tag (put back on its queue and taken again) is
        marked claimed: the attempt's end removes it. Any other unclaimed copy (of an
        attempt running elsewhere, superseded or ended) is only removed. A message waiting
        in its queue is never republished. Returns the attempts made due."""
        recovered = []
        for message in self.messages.values():
            if message.state != DELIVERED or not message.lapsed or message.claimed:
                continue
            job_id, n = split_attempt_id(message.member)
            job = self.jobs.get(job_id)
            if job is None:
                continue  # not a job of this ledger
            if job.queues(n):
                message.state = ACKED
                self.dispatch[message.member] = DispatchEntry(due=True)
                self.stats["stranded_deliveries"] += 1
                recovered.append(message.member)
            elif job.runs(n) and job.current.delivery_tag == message.tag:
                message.claimed = True
            else:
                message.state = ACKED
                self.stats["stale_deliveries_removed"] += 1
        return recovered

    # -- the broker and the processes ------------------------------------------------------

    def send(self, member: str) -> int:
        """Celery's ``send_task``: a new message on the attempt's model queue."""
        job_id, _ = split_attempt_id(member)
        self.serial += 1
        self.messages[self.serial] = MessageModel(self.serial, member, self.jobs[job_id].model)
        return self.serial

    def publish(self, member: str, own_lease: int = 0) -> bool:
        """``Dispatcher.publish``: lease, send, then drop the entry; with
        ``scripts_publish``, lease, then send and drop the entry in one step while the lease
        is ours."""
        lease = self.begin_dispatch(member, own_lease)
        if lease is None:
            return False
        if self.scripts_publish:
            return self.end_dispatch(member, lease, message=True)
        self.send(member)
        self.end_dispatch(member, lease)
        return True

    def publish_own(self, member: str, lease: int) -> bool:
        """``Dispatcher.publish_own``, the producer's publish of attempt 1 on a broker the
        scripts cannot reach (not ``scripts_publish``): it holds the lease submit wrote,
        so it sends without taking it again, then drops the entry if the lease is still
        its own. A lease that lapsed and was taken by another publisher, or an attempt no
        longer queued, makes this message a duplicate or a stale one, which the claim
        refuses."""
        self.send(member)
        self.end_dispatch(member, lease)
        return True

    def deliver(self, tag: int, worker: str) -> bool:
        """A worker's consumer takes a queued message (kombu moves it to unacked)."""
        message, known = self.messages.get(tag), self.workers.get(worker)
        if message is None or message.state != QUEUED or known is None or not known.up:
            return False
        message.state, message.consumer = DELIVERED, (worker, known.process)
        message.ran = message.lapsed = message.claimed = False
        return True

    def held(self, tag: int) -> bool:
        """The message's consumer is up and has not run its task yet: it will claim."""
        message = self.messages[tag]
        if message.consumer is None or message.ran:
            return False
        worker, process = message.consumer
        known = self.workers[worker]
        return known.up and known.process == process

    def ack(self, tag: int) -> None:
        """Celery acks the message: the task returned, or its claim was refused."""
        message = self.messages[tag]
        message.ran = True
        if message.state == DELIVERED:
            message.state = ACKED

    def reject(self, tag: int) -> bool:
        """``Reject(requeue=True)`` (kombu's ``restore_by_tag``): the message goes back to
        its queue, under the same tag, if it is still in unacked (the end of the attempt
        it was claimed for may have removed it)."""
        message = self.messages[tag]
        message.ran = True
        if message.state != DELIVERED:
            return False
        message.state, message.consumer = QUEUED, None
        message.lapsed = message.claimed = False
        return True

    def child_died(self, tag: int, connected: bool = True) -> None:
        """Celery's main process sees the pool child running the task of message ``tag``
        die (``WorkerLostError``): with ``requeue_lost`` (``task_reject_on_worker_lost``)
        it puts the message back on its queue, else it acks it. On a channel whose
        connection is gone (Redis out of reach) either is dropped, and the message stays
        in unacked."""
        if not connected:
            self.messages[tag].ran = True
        elif self.requeue_lost:
            self.reject(tag)
        else:
            self.ack(tag)

    def start_child(self, member: str, worker: str, pid: int, tag: int | None) -> ChildModel:
        """A pool child of the worker's process runs the attempt it claimed."""
        child = ChildModel(worker, self.workers[worker].process, pid, tag)
        self.children[member] = child
        return child

    def child_of(self, member: str) -> ChildModel | None:
        """The child that runs the attempt, while it is alive in an up process."""
        child = self.children.get(member)
        if child is None or child.state == GONE:
            return None
        known = self.workers[child.worker]
        return child if known.up and known.process == child.process else None

    def kill_node(self, worker: str) -> None:
        """kill -9 of the node: its heartbeat stops, its children die with it, and what
        its consumer took stays in kombu's unacked (kombu never redelivers it)."""
        known = self.workers[worker]
        known.up = known.connected = False
        for child in self.children.values():
            if (child.worker, child.process) == (worker, known.process):
                child.state = GONE

    def freeze_node(self, worker: str) -> None:
        """SIGSTOP of the node (or a partition that closes no socket): its heartbeat
        stops and its children stop with it, but its connections stay open, so only its
        silence tells. Its consumer takes nothing here. In the system a pending ``BRPOP``
        can still pop a message into its unread socket; like a message lost between
        ``BRPOP`` and the ``unacked`` write, the model leaves that out: the watchdog finds
        both with ``find_lost_messages.lua`` (at the heartbeat verdict, after it killed the
        node's broker connections, for the frozen one)."""
        known = self.workers[worker]
        known.up = False
        for child in self.children.values():
            if (child.worker, child.process) == (worker, known.process):
                child.state = FROZEN

    def elapse_interval(self) -> None:
        """One heartbeat interval passes, and no more: the beat of a node that is down is
        late (the connection signal may apply), but nothing is stale yet."""
        for known in self.workers.values():
            known.late = known.late or not known.up

    def stop_node(self, worker: str) -> None:
        """A clean stop: the process exits. A gridqueue worker's channel restores nothing
        when it closes (``own_redelivery_in_this_worker``), so what its consumer held
        stays in unacked, for the attempt's end or the stranded-delivery sweep."""
        self.kill_node(worker)

    def report_worker_lost(self, job_id: str, n: int, worker: str, pid: int) -> str:
        """The worker agent's report of a pool child that died under task ``<job>.<n>``
        (``AttemptRequest.on_failure`` in ``gridqueue/runner.py``, after Celery put the
        message back or acked it; ``GridQueueAgent._on_child_lost``). Without
        ``recover_stranded`` it ends the attempt as the worker's (``end_attempt`` by
        name); with it, it names the child and the incarnation, and when the attempt is
        still queued (the child died before its claim) it asks for a ``redeliver`` and
        publishes the attempt again. Answers the end's status, or 'redelivered'."""
        if not self.recover_stranded:
            return self.end_attempt(job_id, n, Outcome.WORKER_LOST, worker)
        epoch = self.workers[worker].epoch
        status = self.end_attempt(job_id, n, Outcome.WORKER_LOST, worker, pid=pid, epoch=epoch)
        if status == "stale" and self.redeliver(job_id, n) == "ok":
            self.publish(attempt_id(job_id, n))  # the agent publishes it again at once
            return "redelivered"
        return status

    # -- time and the watchdog -------------------------------------------------------------

    def elapse(self) -> None:
        """Every grace and timeout passes (deadlines do not): children that run beat and
        mark progress, every other watch lapses; dispatch leases and backoffs pass; taken
        messages outlive the claim grace; a node that is down falls silent; probations
        end."""
        beaten: set[str] = set()
        progressed: set[str] = set()
        for member in sorted(self.children):
            child = self.child_of(member)
            if child is None or not child.beats:
                continue
            job_id, n = split_attempt_id(member)
            if child.state == RUNNING:
                child.started = True
                if self.progress(job_id, n, child.worker):
                    progressed.add(member)
            if self.beat(job_id, n, child.worker):
                beaten.add(member)
        for member in self.liveness:
            self.liveness[member] = member not in beaten
        for member in self.stalls:
            self.stalls[member] = member not in progressed
        for entry in self.dispatch.values():
            entry.due = True
        for message in self.messages.values():
            message.lapsed = message.state == DELIVERED
        for known in self.workers.values():
            known.silent = not known.up
            known.late = known.late or not known.up
            if known.probation_until is False:
                known.probation_until = True

    def watchdog_tick(self) -> Counter[str]:
        """``Watchdog.tick``: declare silent workers dead, and late ones whose connection
        has closed (the connection signal), apply changed health verdicts,
        stall lapsed watches, apply the policy to lost attempts, end probations that are
        due, expire jobs past their deadline, (with ``recover_stranded``) recover stranded
        deliveries, and publish due dispatches."""
        report: Counter[str] = Counter()
        for name, known in sorted(self.workers.items()):
            signal = "heartbeat" if known.silent else "connection"
            if self.declare_dead(name, signal) is not None:
                report["workers_declared_dead"] += 1
        for name in sorted(self.health_changes):
            report[f"health_{self.apply_health(name)}"] += 1
        lapsed = [(m, "liveness") for m, late in sorted(self.liveness.items()) if late]
        lapsed += [(m, "progress") for m, late in sorted(self.stalls.items()) if late]
        for member, kind in lapsed:
            report["attempts_stalled"] += self.stall(member, kind) == "stalled"
        for member, outcome in sorted(self.lost.items()):
            job_id, n = split_attempt_id(member)
            report[self.end_attempt(job_id, n, Outcome(outcome))] += 1
        for name, known in sorted(self.workers.items()):
            if known.probation_listed and known.probation_until:
                report["workers_readmitted"] += self.end_probation(name)
        for job in sorted(self.jobs.values(), key=lambda j: j.id):
            if job.deadline_passed and not job.terminal:
                report["jobs_expired"] += self.expire(job.id) == "ok"
        if self.recover_stranded:
            report["stranded_deliveries"] += len(self.sweep_stranded())
        for member, entry in sorted(self.dispatch.items()):
            if entry.due:
                report["dispatched"] += self.publish(member)
        return +report  # what it did, without the zeros

    # -- the contract ----------------------------------------------------------------------

    def owners(self, job_id: str) -> list[str]:
        """Who will move the job (DESIGN.md 1): empty for a job that has not ended is a
        hole. A queued attempt: its dispatch entry, a message waiting in its queue, or one
        a live consumer holds (with ``recover_stranded``, any message in unacked: the
        sweep owns it). A running one: its lost entry, its watch, the child that will beat
        (and so start its watch), or its node's heartbeat, which lapses."""
        job = self.jobs[job_id]
        if job.terminal:
            return ["ended"]
        member = attempt_id(job_id, job.attempt)
        found = []
        if job.state is JobState.QUEUED:
            if member in self.dispatch:
                found.append("dispatch entry")
            for message in self.messages.values():
                if message.member != member:
                    continue
                if message.state == QUEUED:
                    found.append(f"message {message.tag} in its queue")
                elif self.held(message.tag):
                    found.append(f"message {message.tag} held by {message.consumer}")
                elif message.state == DELIVERED and not message.claimed and self.recover_stranded:
                    found.append(f"message {message.tag} stranded in unacked")
            return found
        if member in self.lost:
            found.append("lost entry")
        if member in self.liveness or member in self.stalls:
            found.append("watch")
        child = self.child_of(member)
        if child is not None and child.beats:
            found.append(f"child {child.pid} of {child.worker}")
        known = self.workers.get(str(job.current.worker))
        if known is not None and not known.up and known.state not in _GONE:
            found.append(f"the silent heartbeat of {job.current.worker}")
        return found
