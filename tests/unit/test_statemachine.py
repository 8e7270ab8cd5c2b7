"""The job state machine's invariants, explored by hypothesis over the pure model.

The rules are what real callers do: workers join, stop, fall silent, are quarantined and
come back; the worker that claimed an attempt completes or fails it, even long after it
was superseded (a zombie); strangers send results for attempts they never claimed; the
watchdog handles lost attempts and expires jobs; callers cancel; operators replay dead
letters. After every step the
invariants hold, and a healthy worker plus the watchdog can still drive every job to a
terminal state.

Claims here come out of nowhere, as the differential test replays them on the Lua ledger.
``test_statemachine_liveness.py`` runs the same machine with the broker, the processes
and their faults, where every claim comes with a message, and checks that no job is ever
left without an owner.
"""

from __future__ import annotations

import copy

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gridqueue.health import HealthLevel
from gridqueue.keys import attempt_id, split_attempt_id
from gridqueue.policies import GiveUp, Retry
from gridqueue.statemachine import MAX_DEFERRALS, JobModel, LedgerModel
from gridqueue.states import NODE_OUTCOMES, JobState, Outcome, WorkerState
from gridqueue.workloads import WorkloadClass, load_workloads

# The shipped classes, and one that two node failures dead-letter: with two workers the
# shipped poison threshold (three) is out of reach, and dead letters can be replayed.
FRAGILE = WorkloadClass("fragile", idempotent=True, max_attempts=6, poison_after_workers=2)
WORKLOADS = {**load_workloads(), "fragile": FRAGILE}
WORKERS = ("w1", "w2")
HEALTHY = "healthy"  # joins only when the test drives the jobs to their end
JOBS = ("j1", "j2", "j3")
ENDINGS = [outcome for outcome in Outcome if outcome is not Outcome.SUCCEEDED]
# What a worker's heartbeat says of its GPUs: nothing new, or a verdict.
VERDICTS = ["", *(level.value for level in HealthLevel)]

Snapshot = tuple[JobState, int, str | None, str, tuple[tuple[int, str | None, str | None], ...]]
Claim = tuple[str, int, str]  # job, attempt, worker


def state_of(model: LedgerModel, worker: str) -> WorkerState:
    return model.workers[worker].state


def result_of(n: int, worker: str) -> str:
    return f'{{"attempt":{n},"worker":"{worker}"}}'


def snapshot(job: JobModel) -> Snapshot:
    attempts = tuple((a.n, a.worker, a.outcome) for a in job.attempts.values())
    return job.state, job.attempt, job.result, job.reason, attempts


def drive_to_end(model: LedgerModel) -> int:
    """How many watchdog ticks a healthy worker and the watchdog need to end every job.

    Every other worker falls silent; the watchdog declares it dead and applies the policy
    to the lost attempts; the healthy worker claims each queued attempt and completes it.
    A job left RUNNING with no lost entry could only end by its deadline.
    """
    model.register(HEALTHY)
    most_attempts = max(WORKLOADS[job.workload].max_attempts for job in model.jobs.values())
    for tick in range(2 * most_attempts + 2):
        if all(job.terminal for job in model.jobs.values()):
            return tick
        for worker in list(model.workers):
            if worker != HEALTHY:
                model.declare_dead(worker)
        for member, outcome in list(model.lost.items()):
            job_id, n = split_attempt_id(member)
            model.end_attempt(job_id, n, Outcome(outcome))
        for job in model.jobs.values():
            if job.state is JobState.QUEUED:
                assert model.claim(job.id, job.attempt, HEALTHY) == "ok"
            if job.state is JobState.RUNNING and job.current.worker == HEALTHY:
                assert model.complete(job.id, job.attempt, HEALTHY, result_of(job.attempt, HEALTHY))
            elif job.state is JobState.RUNNING and job.has_deadline:
                job.deadline_passed = True
                assert model.expire(job.id) == "ok"
    stuck = [job for job in model.jobs.values() if not job.terminal]
    raise AssertionError(f"jobs not ended by a healthy worker and the watchdog: {stuck}")


class JobLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = LedgerModel(workloads=WORKLOADS)
        self.epochs: dict[str, int] = {}
        self.claims: list[Claim] = []  # every claim that won
        self.incarnation: dict[tuple[str, int], int] = {}  # (job, n) -> claimer's epoch
        self.discarded = 0  # results the test expects the ledger to discard
        self.ended: dict[str, Snapshot] = {}  # job -> how it was when it first ended

    @initialize(
        jobs=st.lists(
            st.tuples(st.sampled_from(sorted(WORKLOADS)), st.booleans()),
            min_size=len(JOBS),
            max_size=len(JOBS),
        ),
        alive=st.sets(st.sampled_from(WORKERS)),
        probation=st.booleans(),
    )
    def start(self, jobs: list[tuple[str, bool]], alive: set[str], probation: bool) -> None:
        self.model.probation = probation
        for job_id, (workload, has_deadline) in zip(JOBS, jobs, strict=True):
            self.model.submit(job_id, workload, has_deadline)
        for worker in sorted(alive):
            self.register(worker)

    def superseded(self, job_id: str, n: int) -> bool:
        """Independent of the model's own compare: is attempt ``n`` no longer running?"""
        job = self.model.jobs[job_id]
        return job.state is not JobState.RUNNING or job.attempt != n

    def state_of(self, worker: str) -> WorkerState | None:
        known = self.model.workers.get(worker)
        return None if known is None else known.state

    def alive(self, worker: str) -> bool:
        return self.state_of(worker) is WorkerState.ALIVE

    def live(self, worker: str) -> bool:
        """Registered and heartbeating, whether or not it may take work."""
        return self.state_of(worker) not in (None, WorkerState.DEAD, WorkerState.STOPPED)

    # -- workers -----------------------------------------------------------------------

    @rule(
        worker=st.sampled_from(WORKERS),
        how=st.sampled_from(
            ["registers", "is_released", "registers_and_is_released", "serves_its_probation"]
        ),
        slots=st.sampled_from([1, 2]),
    )
    def worker_returns(self, worker: str, how: str, slots: int) -> None:
        if how.startswith("registers"):
            self.register(worker, slots)
        if how.endswith("is_released"):
            self.operator_releases(worker)
        if how == "serves_its_probation":
            self.probation_ends(worker)

    def register(self, worker: str, slots: int = 1) -> None:
        before = self.state_of(worker)
        self.epochs[worker] = self.model.register(worker, slots)
        assert self.model.workers[worker].verdict == ""  # a new incarnation's health is new
        if before in (WorkerState.QUARANTINED, WorkerState.PROBATION):
            assert self.state_of(worker) is before  # a restart does not lift them
        elif before is WorkerState.DEAD and self.model.probation:
            assert self.state_of(worker) is WorkerState.PROBATION
        else:
            assert self.alive(worker)

    def probation_ends(self, worker: str) -> None:
        """Time passes, and the watchdog ends the worker's probation: it is ALIVE again
        unless its GPUs are still sick."""
        self.model.elapse()
        was = self.state_of(worker)
        verdict = self.model.workers[worker].verdict if worker in self.model.workers else ""
        ended = self.model.end_probation(worker)
        sick = verdict in (HealthLevel.UNHEALTHY, HealthLevel.DEGRADED)
        assert ended is (was is WorkerState.PROBATION and not sick)
        assert self.state_of(worker) is (WorkerState.ALIVE if ended else was)

    def operator_releases(self, worker: str) -> None:
        was = self.state_of(worker)
        released = self.model.release(worker)
        if was in (WorkerState.QUARANTINED, WorkerState.PROBATION):
            assert released and self.alive(worker)
        else:
            assert released is (None if was is None else False)
            assert self.state_of(worker) is was

    @rule(
        worker=st.sampled_from(WORKERS),
        how=st.sampled_from(["stops", "falls_silent", "is_quarantined", "is_drained"]),
    )
    def worker_leaves(self, worker: str, how: str) -> None:
        """One rule for every way out, so that workers come back as often as they go."""
        if how == "stops":
            self.unregister(worker)
        elif how == "falls_silent":
            self.falls_silent(worker)
        else:
            self.operator_quarantines(worker, drain=how == "is_drained")

    def unregister(self, worker: str) -> None:
        if worker in self.epochs:
            assert self.model.unregister(worker, self.epochs[worker])
            assert not self.alive(worker)

    def falls_silent(self, worker: str) -> None:
        was_live = self.live(worker)
        lost = self.model.declare_dead(worker)
        assert (lost is not None) == was_live
        assert not self.live(worker)

    def operator_quarantines(self, worker: str, drain: bool) -> None:
        was_live = self.live(worker)
        running = self.model.running_on(worker)
        lost_before = dict(self.model.lost)
        moved = self.model.quarantine(worker, drain)
        assert moved == ((0 if drain else len(running)) if was_live else None)
        if was_live and not drain:
            # Evacuation: its attempts move now, not when it falls silent.
            assert self.model.lost == {**lost_before, **dict.fromkeys(running, "evacuated")}
        else:
            assert self.model.lost == lost_before
        if was_live:
            assert self.state_of(worker) is WorkerState.QUARANTINED

    def held_by(self, worker: str) -> set[str]:
        """What the worker's heartbeat says its processes hold: here, what it runs."""
        return set(self.model.running_on(worker))

    @rule(
        worker=st.sampled_from(WORKERS),
        verdict=st.sampled_from(VERDICTS),
        applied=st.booleans(),
    )
    def worker_reports_health(self, worker: str, verdict: str, applied: bool) -> None:
        """The worker's heartbeat carries its GPUs' verdict; a change is queued for the
        watchdog, which (``applied``) quarantines, drains or re-admits the node."""
        known = self.model.workers.get(worker)
        if known is None:
            return
        before = known.verdict
        status, _ = self.model.heartbeat(worker, known.epoch, self.held_by(worker), verdict)
        assert (status == "ok") == self.live(worker)
        if status == "ok" and verdict and verdict != before:
            assert worker in self.model.health_changes
        if applied and worker in self.model.health_changes:
            self.watchdog_applies_health(worker)

    def watchdog_applies_health(self, worker: str) -> None:
        """UNHEALTHY: quarantine and evacuate now (outcome gpu_fault); DEGRADED:
        quarantine and drain; HEALTHY after a health quarantine: probation. An operator's
        quarantine stays the operator's, and a node evacuated already is left alone."""
        known = self.model.workers[worker]
        was, by, mode = known.state, known.quarantined_by, known.quarantine_mode
        running, lost_before = self.model.running_on(worker), dict(self.model.lost)
        action = self.model.apply_health(worker)
        assert worker not in self.model.health_changes
        quarantined = was is WorkerState.QUARANTINED
        if not self.live(worker):
            expected = "ignored"
        elif known.verdict == HealthLevel.UNHEALTHY:
            expected = "ignored" if quarantined and mode == "evacuate" else "evacuated"
        elif known.verdict == HealthLevel.DEGRADED:
            expected = "ignored" if quarantined else "draining"
        elif known.verdict == HealthLevel.HEALTHY and quarantined and by == "health":
            expected = "probation"
        else:
            expected = "ignored"
        assert action == expected, (was, by, mode, known.verdict)
        if action == "evacuated":
            assert (known.state, known.quarantined_by) == (WorkerState.QUARANTINED, "health")
            assert self.model.lost == {**lost_before, **dict.fromkeys(running, "gpu_fault")}
            return
        assert self.model.lost == lost_before
        if action == "draining":
            assert (known.state, known.quarantine_mode) == (WorkerState.QUARANTINED, "drain")
        elif action == "probation":
            assert known.state is WorkerState.PROBATION
        else:
            assert known.state is was

    # -- attempts ----------------------------------------------------------------------

    @rule(
        job_id=st.sampled_from(JOBS),
        worker=st.sampled_from(WORKERS),
        delta=st.sampled_from([0, -1, 1]),
        pid=st.sampled_from([101, 102]),
    )
    def claim(self, job_id: str, worker: str, delta: int, pid: int = 101) -> None:
        self.claims_attempt(job_id, worker, delta, pid)

    def claims_attempt(
        self, job_id: str, worker: str, delta: int, pid: int = 101, tag: int | None = None
    ) -> str:
        """A claim, checked against what the rules say it must answer. ``tag`` is the
        delivery tag of the message it came with, when the broker is followed."""
        job = self.model.jobs[job_id]
        n = max(1, job.attempt + delta)
        alive = self.alive(worker)
        current = job.state is not JobState.QUEUED and not job.terminal and n == job.attempt
        holder = (job.current.worker, job.current.pid, job.current.epoch) if current else None
        incarnation = self.model.workers[worker].epoch if worker in self.model.workers else 0
        failed = {
            a.worker
            for k, a in job.attempts.items()
            if job.chain_start <= k < job.attempt and a.outcome in NODE_OUTCOMES
        }
        # Another worker that can take the attempt now: ALIVE, heartbeating, with a free
        # slot, and not one the job took down too.
        others_ready = any(
            self.alive(other)
            and not known.silent
            and other not in failed
            and self.busy(other) < known.concurrency
            for other, known in self.model.workers.items()
            if other != worker
        )
        deferred = job.current.deferred
        before = snapshot(job)
        if tag is None:
            status = self.model.claim(job_id, n, worker, pid)
        else:
            status = self.model.claim(job_id, n, worker, pid, tag)
        if not alive:
            assert status == "fenced"
        elif job.terminal or n != job.attempt:
            assert status == "stale"
        elif holder is not None:
            # The same claim again (a reply lost on the way back) is answered again; any
            # other delivery of a running attempt starts nothing.
            # Only the same incarnation's retry is answered again: a restart that reuses
            # the pid is a stranger to the attempt.
            assert status == ("ok" if holder == (worker, pid, incarnation) else "duplicate")
        elif worker in failed and others_ready and deferred < MAX_DEFERRALS:
            # The job goes to a node it has not taken down, a bounded number of times.
            assert status == "avoid"
            assert job.current.deferred == deferred + 1
        else:
            assert status == "ok"
            assert (job.state, job.current.worker) == (JobState.RUNNING, worker)
            self.claims.append((job_id, n, worker))
            self.incarnation[job_id, n] = self.model.workers[worker].epoch
            return status
        assert snapshot(job) == before
        return status

    def busy(self, worker: str) -> int:
        """How many attempts the worker runs (its slots in use)."""
        jobs = self.model.jobs.values()
        return sum(job.state is JobState.RUNNING and job.current.worker == worker for job in jobs)

    def queued(self) -> list[str]:
        return [job.id for job in self.model.jobs.values() if job.state is JobState.QUEUED]

    @precondition(lambda self: self.queued() and any(self.alive(w) for w in WORKERS))
    @rule(data=st.data())
    def live_worker_takes_a_queued_attempt(self, data: st.DataObject) -> None:
        """The common case, which the random claims above reach too seldom."""
        alive = [worker for worker in WORKERS if self.alive(worker)]
        job_id = data.draw(st.sampled_from(self.queued()))
        self.claims_attempt(job_id, data.draw(st.sampled_from(alive)), 0)

    @precondition(
        lambda self: any(job.state is JobState.DEAD_LETTERED for job in self.model.jobs.values())
    )
    @rule(data=st.data())
    def operator_replays_a_dead_letter(self, data: st.DataObject) -> None:
        dead = [j.id for j in self.model.jobs.values() if j.state is JobState.DEAD_LETTERED]
        self.operator_replays(data.draw(st.sampled_from(dead)))

    @rule(
        what=st.sampled_from(["stranger_result", "stranger_failure", "claim_retried", "progress"]),
        data=st.data(),
    )
    def echo(self, what: str, data: st.DataObject) -> None:
        """Messages that change nothing: a stranger's result or failure, a claim retried
        after a lost reply, a progress mark. One rule, so they do not crowd out the rest."""
        if what.startswith("stranger"):
            job_id = data.draw(st.sampled_from(JOBS))
            worker = data.draw(st.sampled_from((*WORKERS, HEALTHY)))
            delta = data.draw(st.sampled_from([0, -1, 1]))
            if what == "stranger_result":
                self.stranger_completes(job_id, worker, delta)
            else:
                self.stranger_fails(job_id, worker, delta, data.draw(st.sampled_from(ENDINGS)))
        elif self.claims and what == "claim_retried":
            self.claimer_retries_its_claim(data)
        elif self.claims:
            self.claimer_reports_progress(data)

    def claimer_retries_its_claim(self, data: st.DataObject) -> None:
        job_id, n, worker = data.draw(st.sampled_from(self.claims))
        self.claims_attempt(job_id, worker, n - self.model.jobs[job_id].attempt, 101)

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def claimer_completes(self, data: st.DataObject) -> None:
        self.completes(*data.draw(st.sampled_from(self.claims)))

    def completes(self, job_id: str, n: int, worker: str) -> bool:
        """The claimer sends its result: published once, unless it is a zombie's."""
        job = self.model.jobs[job_id]
        assert job.attempts[n].worker == worker  # an attempt is claimed once
        repeated = job.attempts[n].outcome is Outcome.SUCCEEDED
        zombie = self.superseded(job_id, n) and not repeated
        before = snapshot(job)
        published = self.model.complete(job_id, n, worker, result_of(n, worker))
        assert published is not zombie
        if repeated:
            # Its own result again (a reply lost on the way back): acknowledged, not counted.
            assert snapshot(job) == before
        elif zombie:
            # Attempt fencing: the zombie's result is dropped, marked and counted.
            self.discarded += 1
            assert snapshot(job) == before
            assert job.attempts[n].late_result_discarded
        else:
            assert job.state is JobState.SUCCEEDED
        return published

    def stranger_completes(self, job_id: str, worker: str, delta: int) -> None:
        """A result for an attempt this worker never claimed: always discarded."""
        job = self.model.jobs[job_id]
        n = max(1, job.attempt + delta)
        if (job_id, n, worker) in self.claims:
            return
        before = snapshot(job)
        assert not self.model.complete(job_id, n, worker, result_of(n, worker))
        self.discarded += 1
        assert snapshot(job) == before

    def stranger_fails(self, job_id: str, worker: str, delta: int, outcome: Outcome) -> None:
        """A failure reported for an attempt this worker never claimed (a fenced node's
        agent reporting the child it killed during a duplicate delivery): refused, and a
        lost attempt stays lost, for the watchdog."""
        job = self.model.jobs[job_id]
        n = max(1, job.attempt + delta)
        if (job_id, n, worker) in self.claims:
            return
        before, lost = snapshot(job), dict(self.model.lost)
        assert self.model.end_attempt(job_id, n, outcome, worker=worker) == "stale"
        assert snapshot(job) == before
        if not self.superseded(job_id, n):
            assert self.model.lost == lost

    @precondition(lambda self: self.claims)
    @rule(data=st.data(), outcome=st.sampled_from(ENDINGS))
    def claimer_fails(self, data: st.DataObject, outcome: Outcome) -> None:
        job_id, n, worker = data.draw(st.sampled_from(self.claims))
        job = self.model.jobs[job_id]
        zombie = self.superseded(job_id, n)
        before = snapshot(job)
        # An attempt the watchdog already judged (lost: stalled, evacuated...) keeps that
        # verdict as its outcome, whatever its worker reports after the kill.
        verdict = self.model.lost.get(attempt_id(job_id, n))
        status = self.model.end_attempt(job_id, n, outcome, worker=worker)
        if zombie:
            assert status == "stale"
            assert snapshot(job) == before
        else:
            assert status in ("retry", "ended")
            assert job.attempts[n].outcome == (Outcome(verdict) if verdict else outcome)
            assert job.terminal == (status == "ended")
            self.no_retry_past_the_deadline(job, status)

    def claimer_reports_progress(self, data: st.DataObject) -> None:
        job_id, n, worker = data.draw(st.sampled_from(self.claims))
        assert self.model.progress(job_id, n, worker) is not self.superseded(job_id, n)

    def no_retry_past_the_deadline(self, job: JobModel, status: str) -> None:
        if job.deadline_passed:
            assert status != "retry"
        else:
            assert job.reason != "deadline"

    # -- watchdog and callers ----------------------------------------------------------

    @rule()
    def watchdog_handles_lost(self) -> None:
        for member, outcome in list(self.model.lost.items()):
            job_id, n = split_attempt_id(member)
            status = self.model.end_attempt(job_id, n, Outcome(outcome))
            assert status in ("retry", "ended")
            assert self.model.jobs[job_id].attempts[n].outcome == outcome
            self.no_retry_past_the_deadline(self.model.jobs[job_id], status)
        assert not self.model.lost

    @rule(
        job_id=st.sampled_from(JOBS),
        kind=st.sampled_from(["liveness", "progress"]),
        time_passes=st.booleans(),
    )
    def watchdog_reads_a_watch(self, job_id: str, kind: str, time_passes: bool) -> None:
        """Time passes (every watch lapses, the progress marks of this machine's claimers
        are never renewed by a beat), or not, and the watchdog reads the current attempt's
        watch: a lapsed one stalls the attempt, which moves to the lost hash with its
        child ordered killed."""
        if time_passes:
            self.model.elapse()
        job = self.model.jobs[job_id]
        member = attempt_id(job_id, job.attempt)
        index = self.model.liveness if kind == "liveness" else self.model.stalls
        watched, lapsed = member in index, index.get(member, False)
        before, lost = snapshot(job), dict(self.model.lost)
        worker = str(job.current.worker)
        was = self.state_of(worker)
        stalls = self.model.workers[worker].stalls if was is not None else 0
        status = self.model.stall(member, kind)
        assert snapshot(job) == before  # the watchdog ends it later, by policy
        if not watched:
            assert (status, self.model.lost) == ("stale", lost)
        elif not lapsed:
            assert (status, self.model.lost) == ("alive", lost)
        elif member in lost:
            # Already judged (its node died, or it was evacuated): that verdict stays.
            assert (status, self.model.lost) == ("stale", lost)
            assert member not in self.model.liveness and member not in self.model.stalls
        else:
            assert job.runs(job.attempt)  # a watch is released with its attempt
            assert status == "stalled"
            assert self.model.lost == {**lost, member: "stalled"}
            assert member in self.model.workers[worker].kill
            assert member not in self.model.liveness and member not in self.model.stalls
            # A node that keeps stalling is drained.
            known = self.model.workers[worker]
            assert known.stalls == stalls + 1
            if known.stalls >= 3 and was in (WorkerState.ALIVE, WorkerState.PROBATION):
                assert (known.state, known.quarantined_by, known.quarantine_mode) == (
                    WorkerState.QUARANTINED,
                    "watchdog",
                    "drain",
                )
            else:
                assert self.state_of(worker) is was

    @rule(
        job_id=st.sampled_from(JOBS),
        what=st.sampled_from(["deadline_passes", "watchdog_expires", "caller_cancels", "replay"]),
    )
    def from_outside(self, job_id: str, what: str) -> None:
        """Time, the watchdog, callers and operators, in one rule: each ends jobs early."""
        if what == "deadline_passes":
            self.deadline_passes(job_id)
        elif what == "watchdog_expires":
            self.watchdog_expires(job_id)
        elif what == "caller_cancels":
            self.caller_cancels(job_id)
        else:
            self.operator_replays(job_id)

    def deadline_passes(self, job_id: str) -> None:
        job = self.model.jobs[job_id]
        job.deadline_passed = job.has_deadline

    def watchdog_expires(self, job_id: str) -> None:
        job = self.model.jobs[job_id]
        was_terminal = job.terminal
        status = self.model.expire(job_id)
        if was_terminal:
            assert status == "stale"
        elif not job.deadline_passed:
            assert status == "not_due"
        else:
            assert status == "ok"
            assert job.state is JobState.EXPIRED
            assert job.current.outcome is Outcome.EXPIRED

    def operator_replays(self, job_id: str) -> None:
        job = self.model.jobs[job_id]
        was, before = job.state, snapshot(job)
        status = self.model.replay(job_id)
        if was is not JobState.DEAD_LETTERED:
            assert (status, snapshot(job)) == ("not_dead_lettered", before)
            return
        # The one way out of a terminal state: a person re-runs the dead letter, as a new
        # attempt at the end of a new chain; the old attempts stay as history.
        assert status == "ok"
        fresh = before[1] + 1
        assert (job.state, job.attempt, job.chain_start) == (JobState.QUEUED, fresh, fresh)
        assert job.result is None and job.reason == ""
        assert snapshot(job)[4][:-1] == before[4]
        del self.ended[job_id]

    def caller_cancels(self, job_id: str) -> None:
        job = self.model.jobs[job_id]
        was_terminal = job.terminal
        status = self.model.cancel(job_id)
        assert status == ("stale" if was_terminal else "ok")
        assert job.terminal

    # -- invariants --------------------------------------------------------------------

    @invariant()
    def at_most_one_visible_result(self) -> None:
        for job in self.model.jobs.values():
            succeeded = [a for a in job.attempts.values() if a.outcome is Outcome.SUCCEEDED]
            assert len(succeeded) <= 1
            if job.state is JobState.SUCCEEDED:
                # The result is the current attempt's, sent by the worker that claimed it.
                current = job.current
                assert current.worker is not None
                assert succeeded == [current]
                assert job.result == result_of(current.n, current.worker)
            else:
                assert not succeeded
                assert job.result is None

    @invariant()
    def only_the_current_attempt_is_open(self) -> None:
        for job in self.model.jobs.values():
            assert sorted(job.attempts) == list(range(1, job.attempt + 1))
            for n, attempt in job.attempts.items():
                if n < job.attempt:
                    assert attempt.outcome is not None and attempt.worker is not None
            assert (job.current.outcome is not None) == job.terminal

    @invariant()
    def terminal_states_are_absorbing(self) -> None:
        for job in self.model.jobs.values():
            if job.id in self.ended:
                assert snapshot(job) == self.ended[job.id]
            elif job.terminal:
                self.ended[job.id] = snapshot(job)

    @invariant()
    def counters_count(self) -> None:
        stats, jobs = self.model.stats, self.model.jobs.values()
        assert stats["stale_results_discarded"] == self.discarded
        assert stats["first_placements"] == sum(job.attempts[1].worker is not None for job in jobs)
        bad = sum(
            job.attempts[1].outcome in (Outcome.WORKER_LOST, Outcome.NODE_LOST, Outcome.GPU_FAULT)
            for job in jobs
        )
        assert stats["bad_first_placements"] == bad

    @invariant()
    def no_attempt_is_stranded(self) -> None:
        """A running attempt whose worker incarnation is gone (dead, stopped, or replaced
        by a restart) waits in the lost hash for the watchdog; the lost hash holds
        running attempts only. (A draining, quarantined worker keeps its attempts.)"""
        for member in self.model.lost:
            assert not self.superseded(*split_attempt_id(member))
        for job in self.model.jobs.values():
            if job.state is JobState.RUNNING:
                worker = self.model.workers[str(job.current.worker)]
                claimed_by = self.incarnation[job.id, job.attempt]
                gone = worker.state in (WorkerState.DEAD, WorkerState.STOPPED)
                if gone or worker.epoch != claimed_by:
                    assert attempt_id(job.id, job.attempt) in self.model.lost

    @invariant()
    def every_path_ends_in_a_terminal_state(self) -> None:
        future = copy.deepcopy(self.model, memo={id(WORKLOADS): WORKLOADS})
        drive_to_end(future)
        assert all(job.terminal for job in future.jobs.values())


JobLifecycle.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
TestJobLifecycle = JobLifecycle.TestCase


# -- worked examples: the same rules, spelled out -------------------------------------


def test_a_zombie_result_after_failover_is_discarded_and_counted() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    job = model.submit("j", "realtime")
    model.register("w1")
    model.register("w2")
    assert model.claim("j", 1, "w1") == "ok"
    assert model.declare_dead("w1") == 1
    assert model.lost == {"j.1": "node_lost"}
    assert model.end_attempt("j", 1, Outcome.NODE_LOST) == "retry"
    assert model.claim("j", 2, "w2") == "ok"

    assert not model.complete("j", 1, "w1", '"late"')  # w1 was only partitioned
    assert model.stats["stale_results_discarded"] == 1
    assert job.attempts[1].late_result_discarded
    assert model.complete("j", 2, "w2", '"fresh"')
    assert (job.state, job.result) == (JobState.SUCCEEDED, '"fresh"')
    assert [a.outcome for a in job.attempts.values()] == [Outcome.NODE_LOST, Outcome.SUCCEEDED]


def test_a_dead_worker_is_fenced_from_new_work() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    model.submit("j", "batch")
    model.register("w1")
    model.declare_dead("w1")
    assert model.claim("j", 1, "w1") == "fenced"
    assert model.claim("j", 1, "nobody") == "fenced"
    assert model.stats["claims_refused"] == 2
    assert model.jobs["j"].state is JobState.QUEUED


def test_a_redelivered_message_starts_nothing() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    model.submit("j", "batch")
    model.register("w1")
    model.register("w2")
    assert model.claim("j", 1, "w1") == "ok"
    assert model.claim("j", 1, "w2") == "duplicate"
    assert model.claim("j", 2, "w2") == "stale"
    assert model.jobs["j"].current.worker == "w1"
    assert (model.stats["duplicate_deliveries"], model.stats["stale_deliveries"]) == (1, 1)


def test_finish_needs_the_running_attempt_and_its_worker() -> None:
    job = JobModel("j", "batch")
    assert job.finish(1, Outcome.ERROR, Retry(0.0)) == "stale"  # queued, not running
    assert job.claim(1, "w1", worker_alive=True) == "ok"
    assert job.finish(1, Outcome.ERROR, Retry(0.0), worker="w2") == "stale"
    assert job.finish(2, Outcome.ERROR, Retry(0.0)) == "stale"
    assert job.finish(1, Outcome.ERROR, Retry(0.5), worker="w1") == "retry"
    assert (job.state, job.attempt) == (JobState.QUEUED, 2)
    assert job.claim(2, "w2", worker_alive=True) == "ok"
    assert job.finish(2, Outcome.STALLED, GiveUp("poison", JobState.DEAD_LETTERED)) == "ended"
    assert (job.state, job.reason) == (JobState.DEAD_LETTERED, "poison")
    assert job.claim(3, "w1", worker_alive=True) == "stale"


def test_a_restarted_worker_loses_what_its_old_incarnation_ran() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    model.submit("j", "realtime")
    model.register("w1")
    model.claim("j", 1, "w1")
    model.kill_node("w1")
    model.elapse()  # the new process waits until the old one's heartbeat lapses
    assert model.register("w1") == 2  # restarted before the watchdog noticed
    assert model.lost == {"j.1": "node_lost"}


def test_the_drive_ends_a_job_stranded_on_a_worker_that_died() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    job = model.submit("j", "realtime")
    model.register("w1")
    model.claim("j", 1, "w1")
    assert drive_to_end(model) == 1
    assert job.state is JobState.SUCCEEDED
    assert [(a.worker, a.outcome) for a in job.attempts.values()] == [
        ("w1", Outcome.NODE_LOST),
        (HEALTHY, Outcome.SUCCEEDED),
    ]


def test_a_claim_or_a_result_retried_after_a_lost_reply_is_answered_again() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    job = model.submit("j", "batch")
    model.register("w1")
    assert model.claim("j", 1, "w1", pid=7) == "ok"
    assert model.claim("j", 1, "w1", pid=7) == "ok"  # the same child asks again
    assert model.claim("j", 1, "w1", pid=8) == "duplicate"  # another child of the node
    assert model.complete("j", 1, "w1", '"r"')
    assert model.complete("j", 1, "w1", '"r"')
    # Answered again, counted once: one claim, one attempt ended.
    assert model.stats == {
        "first_placements": 1,
        "claims": 1,
        "attempts_ended:succeeded": 1,
        "duplicate_deliveries": 1,
    }
    assert (job.state, job.result) == (JobState.SUCCEEDED, '"r"')


def test_a_node_that_took_a_job_down_leaves_it_to_another_ready_node() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    model.submit("j", "batch")
    model.register("w1")
    model.claim("j", 1, "w1")
    assert model.end_attempt("j", 1, Outcome.WORKER_LOST, worker="w1") == "retry"
    model.register("w2")
    assert model.claim("j", 2, "w1") == "avoid"
    assert model.stats["claims_deferred"] == 1
    model.declare_dead("w2")  # no other ready node: w1 may take it after all
    assert model.claim("j", 2, "w1") == "ok"


def test_a_replayed_dead_letter_starts_a_fresh_chain() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    job = model.submit("j", "fragile")
    for n, worker in enumerate(["w1", "w2"], start=1):
        model.register(worker)
        assert model.claim("j", n, worker) == "ok"
        model.end_attempt("j", n, Outcome.WORKER_LOST, worker=worker)
    assert (job.state, job.reason) == (JobState.DEAD_LETTERED, "poison")
    assert model.replay("j") == "ok"
    assert (job.state, job.attempt, job.chain_start) == (JobState.QUEUED, 3, 3)
    # The new chain has no poison evidence yet: one more node failure is retried.
    assert model.claim("j", 3, "w1") == "ok"
    assert model.end_attempt("j", 3, Outcome.WORKER_LOST, worker="w1") == "retry"
    assert model.replay("j") == "not_dead_lettered"
    assert model.replay("nope") == "unknown"


def test_another_workers_failure_report_leaves_a_lost_attempt_for_the_watchdog() -> None:
    """finish.lua once dropped the lost entry here, stranding the attempt on a dead node."""
    model = LedgerModel(workloads=WORKLOADS)
    job = model.submit("j", "batch")  # no deadline: nothing else would end it
    model.register("w1")
    model.register("w2")
    model.claim("j", 1, "w1")
    model.declare_dead("w1")
    assert model.end_attempt("j", 1, Outcome.WORKER_LOST, worker="w2") == "stale"
    assert model.lost == {"j.1": "node_lost"}
    assert model.end_attempt("j", 1, Outcome.NODE_LOST) == "retry"  # the watchdog
    assert (job.state, job.attempt) == (JobState.QUEUED, 2)


def test_a_failing_job_is_deferred_only_to_a_free_worker_and_at_most_three_times() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    model.submit("j", "batch")
    model.submit("k", "batch")
    model.register("w1")
    model.claim("j", 1, "w1")
    assert model.end_attempt("j", 1, Outcome.WORKER_LOST, worker="w1") == "retry"
    model.register("w2")  # one slot
    assert model.claim("k", 1, "w2") == "ok"
    # w2's one slot is taken: it could not start j.2 now, so w1 does not wait for it.
    assert model.claim("j", 2, "w1") == "ok"
    assert model.end_attempt("j", 2, Outcome.WORKER_LOST, worker="w1") == "retry"
    assert model.complete("k", 1, "w2", '"r"')
    # w2 is free now, but the attempt bounces at most MAX_DEFERRALS times.
    for deferred in range(1, MAX_DEFERRALS + 1):
        assert model.claim("j", 3, "w1") == "avoid"
        assert model.jobs["j"].current.deferred == deferred
    assert model.claim("j", 3, "w1") == "ok"
    assert model.stats["claims_deferred"] == MAX_DEFERRALS


def test_health_verdicts_quarantine_drain_and_readmit_a_node() -> None:
    model = LedgerModel(workloads=WORKLOADS, probation=False)
    model.submit("j", "batch")
    model.register("w1")
    assert model.claim("j", 1, "w1") == "ok"
    # DEGRADED: no new work, the running attempt finishes.
    assert model.heartbeat("w1", 1, {"j.1"}, "DEGRADED") == ("ok", [])
    assert model.health_changes == {"w1"}
    assert model.apply_health("w1") == "draining"
    assert state_of(model, "w1") is WorkerState.QUARANTINED and model.lost == {}
    # UNHEALTHY: the running attempt moves now, and its child is ordered killed.
    assert model.heartbeat("w1", 1, {"j.1"}, "UNHEALTHY") == ("ok", [])
    assert model.apply_health("w1") == "evacuated"
    assert model.lost == {"j.1": "gpu_fault"} and model.workers["w1"].kill == {"j.1"}
    assert model.end_attempt("j", 1, Outcome.GPU_FAULT) == "retry"
    # HEALTHY again: a probation (of no length here), then ALIVE.
    model.heartbeat("w1", 1, set(), "HEALTHY")
    assert model.apply_health("w1") == "probation"
    assert state_of(model, "w1") is WorkerState.PROBATION
    assert model.end_probation("w1")
    assert state_of(model, "w1") is WorkerState.ALIVE
    # An operator's quarantine is the operator's to lift: a recovery changes nothing.
    assert model.quarantine("w1", by="ops") == 0
    model.heartbeat("w1", 1, set(), "UNHEALTHY")
    assert model.apply_health("w1") == "ignored"  # evacuated already
    model.heartbeat("w1", 1, set(), "HEALTHY")
    assert model.apply_health("w1") == "ignored"
    assert model.workers["w1"].quarantined_by == "ops"


def test_a_probation_does_not_end_while_the_node_is_sick() -> None:
    model = LedgerModel(workloads=WORKLOADS, probation=True)
    model.register("w1")
    model.declare_dead("w1")
    model.register("w1")  # back from the dead: on probation
    model.heartbeat("w1", 2, set(), "DEGRADED")  # not applied yet
    assert not model.end_probation("w1")  # its probation has not passed
    model.elapse()
    assert not model.end_probation("w1")
    assert model.workers["w1"].state is WorkerState.PROBATION
    assert model.apply_health("w1") == "draining"


def test_a_node_that_keeps_stalling_is_drained() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    model.register("w1")
    for n, job_id in enumerate(("a", "b", "c"), start=1):
        model.submit(job_id, "batch")
        assert model.claim(job_id, 1, "w1", pid=n) == "ok"
        model.elapse()
        assert model.stall(attempt_id(job_id, 1), "liveness") == "stalled"
        drained = n == model.stall_quarantine_after
        assert (model.workers["w1"].state is WorkerState.QUARANTINED) is drained
    known = model.workers["w1"]
    assert (known.quarantined_by, known.quarantine_mode, known.stalls) == ("watchdog", "drain", 3)
    assert sorted(model.lost) == ["a.1", "b.1", "c.1"]


def test_an_unhealthy_verdict_makes_a_drain_the_health_checks_to_lift() -> None:
    """An operator's drain: the GPU fails (its attempts must move now, so the node is
    evacuated, by its health) and recovers; the recovery then lifts the quarantine."""
    model = LedgerModel(workloads=WORKLOADS, probation=False)
    model.register("w1")
    assert model.quarantine("w1", drain=True, by="ops") == 0
    model.heartbeat("w1", 1, set(), "DEGRADED")
    assert model.apply_health("w1") == "ignored"  # quarantined already
    model.heartbeat("w1", 1, set(), "UNHEALTHY")
    assert model.apply_health("w1") == "evacuated"
    assert model.workers["w1"].quarantined_by == "health"
    model.heartbeat("w1", 1, set(), "HEALTHY")
    assert model.apply_health("w1") == "probation"
