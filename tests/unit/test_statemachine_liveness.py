"""Every job has an owner until it ends, explored by hypothesis over the whole model.

``GridLifecycle`` is ``JobLifecycle`` (every rule and invariant of the ledger's state
machine still holds) with what moves a job between the ledger's verbs: producers and the
watchdog publish dispatch entries, consumers take messages, pool children claim, beat,
get stuck, freeze, die (Celery putting their message back, the agent reporting them, or
the report lost with the node or with Redis) or lose a claim's reply, nodes are killed,
restarted or report their GPUs' health, time passes, the agent obeys kill orders and its
fencing, and the watchdog ticks. Claims come with messages here, never out of nowhere.

After every step each job that has not ended has an owner (DESIGN.md section 1), and once
the faults stop, a healthy worker and a bounded number of watchdog ticks end every job.
With one part of the fix switched off (the system as it was before it) hypothesis finds
the hole that part closes: a message taken and never claimed, a claim that nothing
watches, or a child lost before its claim whose message was acked and whose report was
lost.
"""

from __future__ import annotations

import copy
import re

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from gridqueue.errors import WorkerNameInUseError
from gridqueue.keys import attempt_id, split_attempt_id
from gridqueue.statemachine import (
    ACKED,
    DELIVERED,
    FROZEN,
    GONE,
    QUEUED,
    STUCK,
    ChildModel,
    LedgerModel,
)
from gridqueue.states import JobState, Outcome, WorkerState
from tests.unit.test_statemachine import (
    HEALTHY,
    JOBS,
    VERDICTS,
    WORKERS,
    WORKLOADS,
    JobLifecycle,
    result_of,
    snapshot,
)

PIDS = (101, 102)
# How a pool child runs a task: as it should, or with one of the faults around its claim:
# the claim's reply lost, or the child dying first (see ``child_dies``).
RUNS = st.sampled_from(
    [
        "claims",
        "claims",
        "claim_reply_lost",
        "child_dies_first",
        "child_dies_first_unreported",
        "child_dies_first_with_its_node",
    ]
)
HEALTHY_PID = 900
# A worker in these states still heartbeats; any other is fenced by heartbeat.lua.
HEARTBEATING = (WorkerState.ALIVE, WorkerState.QUARANTINED, WorkerState.PROBATION)
# Once the faults stop: every job ends within this many ticks (a lost attempt is requeued
# on the first, and published after its backoff on the second).
TICKS = 3


def drive_to_end(model: LedgerModel) -> int:
    """How many watchdog ticks it takes, once the faults stop, to end every job.

    A healthy worker that consumes every model registers; every other node is killed.
    Then, each round, time passes beyond every grace and timeout (deadlines excepted),
    the watchdog ticks, and the healthy worker takes every queued message, claims it
    and completes what it claimed.
    """
    model.register(HEALTHY)
    for name, known in model.workers.items():
        if name != HEALTHY and known.up:
            model.kill_node(name)
    for tick in range(TICKS + 1):
        if all(job.terminal for job in model.jobs.values()):
            return tick
        model.elapse()
        model.watchdog_tick()
        for message in list(model.messages.values()):
            if not model.deliver(message.tag, HEALTHY):
                continue
            job_id, n = split_attempt_id(message.member)
            if model.claim(job_id, n, HEALTHY, HEALTHY_PID, message.tag) == "ok":
                assert model.complete(job_id, n, HEALTHY, result_of(n, HEALTHY))
            model.ack(message.tag)
    stuck = {j.id: (j.state.value, j.attempt) for j in model.jobs.values() if not j.terminal}
    raise AssertionError(f"jobs not ended by a healthy worker and {TICKS} ticks: {stuck}")


def hole(model: LedgerModel, job_id: str) -> str:
    """What a job without an owner looks like, for the assertion message."""
    job = model.jobs[job_id]
    member = attempt_id(job_id, job.attempt)
    messages = [(m.tag, m.state, m.consumer) for m in model.messages.values() if m.member == member]
    found = f"job {job_id} has no owner: {job.state.value} attempt {job.attempt}"
    if job.state is JobState.RUNNING:
        found += f" claimed by {job.current.worker}, child {model.children.get(member)}"
    return f"{found}, messages (tag, state, consumer) {messages}"


class GridLifecycle(JobLifecycle):
    def __init__(
        self,
        recover_stranded: bool = True,
        claim_watches: bool = True,
        requeue_lost: bool = True,
        scripts_publish: bool = False,
    ) -> None:
        super().__init__()
        self.model = LedgerModel(
            workloads=WORKLOADS,
            recover_stranded=recover_stranded,
            claim_watches=claim_watches,
            requeue_lost=requeue_lost,
            scripts_publish=scripts_publish,
        )

    @initialize(
        jobs=st.lists(
            st.tuples(st.sampled_from(sorted(WORKLOADS)), st.booleans()),
            min_size=len(JOBS),
            max_size=len(JOBS),
        ),
        absent=st.sets(st.sampled_from(WORKERS)),
        probation=st.booleans(),
        unpublished=st.sets(st.sampled_from(JOBS)),
    )
    def start(
        self,
        jobs: list[tuple[str, bool]],
        absent: set[str],
        probation: bool,
        unpublished: set[str],
    ) -> None:
        """The workers not ``absent`` are up. On the ledger's Redis (``scripts_publish``)
        each job's first attempt goes out with the job. On another broker the producer
        publishes it after writing the job, unless it died in between (``unpublished``):
        the dispatch entry is then the watchdog's to publish."""
        super().start(jobs, set(WORKERS) - absent, probation)
        for job_id in JOBS:
            member = attempt_id(job_id, 1)
            if job_id not in unpublished and not self.model.scripts_publish:
                assert self.model.publish_own(member, self.model.dispatch[member].lease)

    @property
    def fixed(self) -> bool:
        """Whether the agent reports a dead child as fixed: naming the child and its
        incarnation, and redelivering an attempt it never claimed (``recover_stranded``)."""
        return self.model.recover_stranded

    # -- claims come with messages ---------------------------------------------------------

    def claim(self, job_id: str, worker: str, delta: int, pid: int = 101) -> None:
        """Not a rule here: a claim comes with a message (``consumer_runs_the_task``)."""
        raise AssertionError("claims come with messages in this machine")

    def messages_in(self, state: str) -> list[int]:
        return [tag for tag, m in sorted(self.model.messages.items()) if m.state == state]

    def up(self, worker: str) -> bool:
        known = self.model.workers.get(worker)
        return known is not None and known.up

    def held(self) -> list[int]:
        """Messages a live consumer took and has not run yet."""
        return [tag for tag in sorted(self.model.messages) if self.model.held(tag)]

    def live_children(self) -> list[tuple[str, ChildModel]]:
        return [(m, c) for m, c in sorted(self.model.children.items()) if self.model.child_of(m)]

    @precondition(lambda self: self.model.dispatch)
    @rule(nth=st.integers(0, 2), how=st.sampled_from(["publishes", "dies", "dies_late"]))
    def publisher_acts(self, nth: int, how: str) -> None:
        """A producer, a runner or the watchdog publishes a dispatch entry (the oldest
        first), or dies after taking its lease ("dies") or after sending the message too
        ("dies_late"): the lease lapses, and the watchdog publishes it again."""
        members = sorted(self.model.dispatch)
        member = members[nth % len(members)]
        job_id, n = split_attempt_id(member)
        job = self.model.jobs[job_id]
        # Only a due entry is taken: another publisher's lease, or a backoff, must lapse.
        due = job.queues(n) and self.model.dispatch[member].due
        before, entry = snapshot(job), self.model.dispatch[member]
        if how == "publishes":
            assert self.model.publish(member) == due
            assert member not in self.model.dispatch if due else (entry.due or job.queues(n))
        else:
            lease = self.model.begin_dispatch(member)
            assert (lease is not None) == due
            if lease is not None and how == "dies_late":
                self.model.send(member)
        if not job.queues(n):
            assert member not in self.model.dispatch  # a stale entry is dropped
        assert snapshot(job) == before

    @precondition(
        lambda self: self.messages_in(QUEUED) and any(self.up(worker) for worker in WORKERS)
    )
    @rule(nth=st.integers(0, 2), worker=st.sampled_from(WORKERS))
    def consumer_takes(self, nth: int, worker: str) -> None:
        """The worker's consumer (if it is up) takes a queued message (the oldest first)."""
        self.takes(nth, worker)

    def takes(self, nth: int, worker: str) -> int | None:
        queued = self.messages_in(QUEUED)
        if not queued or not self.up(worker):
            return None
        tag = queued[nth % len(queued)]
        assert self.model.deliver(tag, worker)
        message = self.model.messages[tag]
        process = self.model.workers[worker].process
        assert (message.state, message.consumer) == (DELIVERED, (worker, process))
        return tag

    @precondition(lambda self: self.held())
    @rule(
        nth=st.integers(0, 2),
        pid=st.sampled_from(PIDS),
        how=RUNS,
    )
    def consumer_runs_the_task(self, nth: int, pid: int, how: str) -> None:
        """A pool child runs the task of a message a live consumer holds (the oldest
        first): it claims (and runs the attempt if the claim is its own), or its claim
        commits but the reply is lost (the runner rejects the message back to its queue
        and runs nothing), or it dies before it claims (see ``child_dies``)."""
        held = self.held()
        self.runs_task(held[nth % len(held)], pid, how)

    @precondition(
        lambda self: self.messages_in(QUEUED) and any(self.up(worker) for worker in WORKERS)
    )
    @rule(
        nth=st.integers(0, 2), worker=st.sampled_from(WORKERS), pid=st.sampled_from(PIDS), how=RUNS
    )
    def live_worker_takes_a_queued_attempt(self, nth: int, worker: str, pid: int, how: str) -> None:
        """The common case, which the steps above reach too seldom: a consumer takes a
        message and a child runs its task at once."""
        tag = self.takes(nth, worker)
        if tag is not None:
            self.runs_task(tag, pid, how)

    def runs_task(self, tag: int, pid: int, how: str) -> None:
        """``run_attempt`` in a pool child. A busy child takes no second task."""
        message = self.model.messages[tag]
        worker = (message.consumer or ("",))[0]
        if (worker, pid) in {(c.worker, c.pid) for _, c in self.live_children()}:
            return
        member = message.member
        job_id, n = split_attempt_id(member)
        job = self.model.jobs[job_id]
        if how.startswith("child_dies_first"):
            self.child_dies(job_id, n, worker, pid, tag, how.removeprefix("child_dies_first"))
            return
        status = self.claims_attempt(job_id, worker, n - job.attempt, pid, tag)
        if how == "claim_reply_lost":
            self.model.reject(tag)
        elif status == "ok" and job.runs(n, worker) and self.model.child_of(member) is None:
            self.model.start_child(member, worker, pid, tag)
        elif status != "ok":
            self.model.ack(tag)

    # -- children --------------------------------------------------------------------------

    @precondition(lambda self: self.live_children())
    @rule(
        nth=st.integers(0, 2),
        how=st.sampled_from(
            [
                "beats",
                "completes",
                "fails",
                "freezes",
                "gets_stuck",
                "dies",
                "dies_unreported",
                "dies_with_its_node",
            ]
        ),
    )
    def child_acts(self, nth: int, how: str) -> None:
        """A live child (the oldest first): starts beating and marking progress,
        completes, fails (the handler raised), freezes (SIGSTOP: no beat, no progress),
        gets stuck (beats, no progress), or dies (see ``child_dies``)."""
        children = self.live_children()
        member, child = children[nth % len(children)]
        job_id, n = split_attempt_id(member)
        if how == "beats":
            runs = self.model.jobs[job_id].runs(n, child.worker)
            assert self.model.progress(job_id, n, child.worker) is runs
            assert self.model.beat(job_id, n, child.worker) is runs
            child.started = True
        elif how == "freezes":
            child.state = FROZEN
        elif how == "gets_stuck" and child.started:
            child.state = STUCK  # a handler stuck in a CUDA call, once it is running
        elif how.startswith("dies"):
            child.state = GONE
            self.child_dies(job_id, n, child.worker, child.pid, child.tag, how.removeprefix("dies"))
        elif how in ("completes", "fails"):
            child.state = GONE
            if how == "completes":
                self.completes(job_id, n, child.worker)
            else:
                self.child_reports(job_id, n, child, Outcome.ERROR)
            if child.tag is not None:
                self.model.ack(child.tag)

    def child_dies(
        self, job_id: str, n: int, worker: str, pid: int, tag: int | None, fault: str = ""
    ) -> None:
        """A pool child dies under the task of message ``tag``, before or after its claim
        (OOM kill, segfault, CUDA abort, or its agent's SIGKILL). Celery puts the message
        back on its queue (``requeue_lost``; else it acks it) and the agent reports the
        child, unless a fault comes first: ``_unreported``, Redis is out of reach (the
        requeue is dropped with the channel's connection, the report fails: the message
        stays in unacked); ``_with_its_node``, the node dies right after the requeue."""
        if tag is not None:
            message = self.model.messages[tag]
            delivered = message.state == DELIVERED
            self.model.child_died(tag, connected=fault != "_unreported")
            if delivered and fault != "_unreported":
                assert message.state == (QUEUED if self.model.requeue_lost else ACKED)
        if fault == "_with_its_node":
            self.model.kill_node(worker)
        elif not fault:
            self.report_child_lost(job_id, n, worker, pid)

    def child_reports(self, job_id: str, n: int, child: ChildModel, outcome: Outcome) -> None:
        """The runner ends its attempt (the handler raised): by worker name without the
        fix, with its pid and incarnation with it."""
        job = self.model.jobs[job_id]
        mine = self.reports_own(job_id, n, child.worker, child.pid)
        verdict = self.model.lost.get(attempt_id(job_id, n))
        before = snapshot(job)
        if self.fixed:
            epoch = self.model.workers[child.worker].epoch
            status = self.model.end_attempt(
                job_id, n, outcome, child.worker, pid=child.pid, epoch=epoch
            )
        else:
            status = self.model.end_attempt(job_id, n, outcome, child.worker)
        if mine:
            assert status in ("retry", "ended")
            assert job.attempts[n].outcome == (Outcome(verdict) if verdict else outcome)
            self.no_retry_past_the_deadline(job, status)
        else:
            assert status == "stale"
            assert snapshot(job) == before

    def reports_own(self, job_id: str, n: int, worker: str, pid: int) -> bool:
        """Whether a report from this child ends the attempt: without the fix, any report
        from the worker that claimed it does; with it, only the claiming child's, while
        the incarnation that claimed it lives."""
        job = self.model.jobs[job_id]
        if not job.runs(n, worker):
            return False
        attempt = job.attempts[n]
        epoch = self.model.workers[worker].epoch
        return not self.fixed or (attempt.pid, attempt.epoch) == (pid, epoch)

    def report_child_lost(self, job_id: str, n: int, worker: str, pid: int) -> None:
        """The agent's WorkerLostError report. As fixed, a child that died before its
        claim gets its attempt redelivered, and a sibling's report leaves a running
        attempt alone."""
        job = self.model.jobs[job_id]
        mine = self.reports_own(job_id, n, worker, pid)
        queued = job.queues(n)
        verdict = self.model.lost.get(attempt_id(job_id, n))
        before, lost = snapshot(job), dict(self.model.lost)
        status = self.model.report_worker_lost(job_id, n, worker, pid)
        if mine:
            assert status in ("retry", "ended")
            expected = Outcome(verdict) if verdict else Outcome.WORKER_LOST
            assert job.attempts[n].outcome == expected
            self.no_retry_past_the_deadline(job, status)
            return
        assert status == ("redelivered" if self.fixed and queued else "stale")
        assert snapshot(job) == before
        if status == "redelivered":  # made due, and published again at once
            member = attempt_id(job_id, n)
            assert member not in self.model.dispatch
            assert any(
                m.member == member for m in self.model.messages.values() if m.state == QUEUED
            )
        if job.runs(n):
            assert self.model.lost == lost  # a lost attempt stays the watchdog's

    # -- nodes -----------------------------------------------------------------------------

    @precondition(lambda self: any(self.up(worker) for worker in WORKERS))
    @rule(worker=st.sampled_from(WORKERS))
    def node_killed(self, worker: str) -> None:
        """kill -9: its heartbeat stops, its children die, what it took stays unacked."""
        known = self.model.workers.get(worker)
        if known is not None and known.up:
            self.model.kill_node(worker)
            assert not any(child.worker == worker for _, child in self.live_children())

    def register(self, worker: str, slots: int = 1) -> None:
        """A restart if the node is up and not fenced (kill -9, then a new process, which
        waits until the old one's heartbeat lapses); the agent registering again from the
        same process if it was fenced (it kills its children first: Celery puts their
        messages back, and the agent reports each one lost); a new process if it was
        down."""
        known = self.model.workers.get(worker)
        if known is not None and known.up and known.state in HEARTBEATING:
            self.model.kill_node(worker)
        doomed: list[tuple[str, ChildModel]] = []
        if known is not None and known.up:
            doomed = [(m, c) for m, c in self.live_children() if c.worker == worker]
            for _, child in doomed:
                child.state = GONE
                if child.tag is not None:
                    self.model.child_died(child.tag)
        elif known is not None and known.state in HEARTBEATING and not known.silent:
            # One name, one process: the new one waits until the old heartbeat lapses.
            with pytest.raises(WorkerNameInUseError):
                self.model.register(worker, slots)
            return
        super().register(worker, slots)
        assert self.model.workers[worker].up
        for member, child in doomed:
            job_id, n = split_attempt_id(member)
            self.report_child_lost(job_id, n, worker, child.pid)

    def unregister(self, worker: str) -> None:
        """A clean stop: the pool stops, the agent unregisters; the channel restores
        nothing, so what the consumer held stays in unacked. A node that is down stops
        nothing."""
        known = self.model.workers.get(worker)
        if known is None or not known.up:
            return
        taken = [tag for tag, m in self.model.messages.items() if m.state == DELIVERED]
        super().unregister(worker)
        self.model.stop_node(worker)
        assert all(self.model.messages[tag].state == DELIVERED for tag in taken)

    def held_by(self, worker: str) -> set[str]:
        """What the node's processes hold: the attempts its live children run, and the
        messages its consumer took and has not run yet."""
        held = {m for m, c in self.live_children() if c.worker == worker}
        return held | {self.model.messages[tag].member for tag in self.held()}

    def worker_reports_health(self, worker: str, verdict: str, applied: bool) -> None:
        """Not a rule here: the agent's heartbeat carries the verdict
        (``agent_heartbeats``), and the watchdog's tick applies it."""
        raise AssertionError("verdicts come with the agent's heartbeats in this machine")

    def watchdog_reads_a_watch(self, job_id: str, kind: str, time_passes: bool) -> None:
        """Not a rule here: the watchdog reads lapsed watches on its tick."""
        raise AssertionError("the watchdog reads watches on its tick in this machine")

    @precondition(lambda self: any(self.up(worker) for worker in WORKERS))
    @rule(worker=st.sampled_from(WORKERS), verdict=st.sampled_from(VERDICTS))
    def agent_heartbeats(self, worker: str, verdict: str) -> None:
        """The agent's heartbeat, with its GPUs' verdict: it kills the children it is
        ordered to kill (each one's message put back and its death reported), or, fenced,
        kills them all and registers again."""
        known = self.model.workers.get(worker)
        if known is None or not known.up:
            return
        held = self.held_by(worker)
        status, doomed = self.model.heartbeat(worker, known.epoch, held, verdict)
        if status == "fenced":
            assert known.state not in HEARTBEATING
            self.register(worker)
            return
        assert set(doomed) <= held
        for member in doomed:
            child = self.model.child_of(member)
            if child is None or child.worker != worker:
                continue  # a message it holds: its task is refused when it runs
            child.state = GONE
            job_id, n = split_attempt_id(member)
            self.child_dies(job_id, n, worker, child.pid, child.tag)

    # -- time and the watchdog -------------------------------------------------------------

    @rule()
    def time_passes(self) -> None:
        """Every grace and timeout passes; deadlines pass only by ``deadline_passes``."""
        self.model.elapse()
        assert all(entry.due for entry in self.model.dispatch.values())

    @rule()
    def watchdog_ticks(self) -> None:
        discarded = self.model.stats["stale_results_discarded"]
        self.model.watchdog_tick()
        assert self.model.stats["stale_results_discarded"] == discarded
        assert not self.model.lost  # every lost attempt was requeued or ended
        assert not any(entry.due for entry in self.model.dispatch.values())
        assert not any(self.model.liveness.values()) and not any(self.model.stalls.values())
        if self.fixed:
            for message in self.model.messages.values():
                job_id, n = split_attempt_id(message.member)
                stranded = message.state == DELIVERED and message.lapsed
                assert not (stranded and self.model.jobs[job_id].queues(n))

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def a_job_that_has_not_ended_has_an_owner(self) -> None:
        for job_id in JOBS:
            owners = self.model.owners(job_id)
            assert owners, hole(self.model, job_id)
            job = self.model.jobs[job_id]
            if self.model.claim_watches and job.state is JobState.RUNNING:
                # As fixed, a running attempt is always under its watch, or lost.
                assert {"watch", "lost entry"} & set(owners), hole(self.model, job_id)

    @invariant()
    def every_path_ends_in_a_terminal_state(self) -> None:
        future = copy.deepcopy(self.model, memo={id(WORKLOADS): WORKLOADS})
        assert drive_to_end(future) <= TICKS
        assert all(job.terminal for job in future.jobs.values())


GridLifecycle.TestCase.settings = settings(max_examples=400, stateful_step_count=80, deadline=None)
TestGridLifecycle = GridLifecycle.TestCase


class ScriptsPublishGrid(GridLifecycle):
    """The grid on the ledger's own Redis as the broker: submit publishes attempt 1 with
    the job, and every other publish goes out inside the end of its dispatch."""

    def __init__(self) -> None:
        super().__init__(scripts_publish=True)


ScriptsPublishGrid.TestCase.settings = GridLifecycle.TestCase.settings
TestScriptsPublishGrid = ScriptsPublishGrid.TestCase


# -- without the fix: hypothesis finds each hole -------------------------------------------

# A fixed seed, no example database, and no explain phase (it traces every line): the
# search is the same on every run, and the report is the shrunk steps alone.
HUNT = settings(
    max_examples=500,
    stateful_step_count=20,
    deadline=None,
    database=None,
    derandomize=True,
    phases=[Phase.generate, Phase.shrink],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow],
)


class OwnersOnly(GridLifecycle):
    """The machine with its owner invariant, without the drive to the end."""

    def every_path_ends_in_a_terminal_state(self) -> None:
        """Not an invariant here."""


def counterexample(machine: type[GridLifecycle], **switches: bool) -> tuple[str, list[str]]:
    """Run the machine with part of the fix off: the failure, and the shrunk steps (the
    invariant checks between them left out)."""
    with pytest.raises(AssertionError) as failure:
        run_state_machine_as_test(lambda: machine(**switches), settings=HUNT)
    invariants = {invariant.function.__name__ for invariant in machine.setup_state().invariants}
    steps = [
        line
        for note in getattr(failure.value, "__notes__", [])
        for line in note.splitlines()
        if line.startswith("state.") and line[6:].partition("(")[0] not in invariants
    ]
    return str(failure.value).splitlines()[0], steps


def test_without_stranded_recovery_a_message_taken_and_never_claimed_strands_its_job() -> None:
    """Hole 1, as the drive to the end finds it: a consumer took the message, then every
    node but the healthy one is killed; kombu never gives the message back."""
    failure, steps = counterexample(GridLifecycle, recover_stranded=False)
    assert failure == "jobs not ended by a healthy worker and 3 ticks: {'j1': ('QUEUED', 1)}"
    assert len(steps) <= 3 and "state.consumer_takes(" in steps[1], steps


def test_without_stranded_recovery_the_owner_invariant_sees_the_hole_when_it_opens() -> None:
    """Hole 1, as the owner invariant finds it, at the step that opens it: the consumer's
    node is killed, or its child dies with Redis out of reach (the requeue is dropped),
    between taking the message and claiming it."""
    failure, steps = counterexample(OwnersOnly, recover_stranded=False)
    assert re.match(r"job j\d has no owner: QUEUED attempt 1", failure), failure
    opened = ("state.node_killed(", "child_dies_first_unreported", "state.worker_returns(")
    assert len(steps) <= 4 and any(what in steps[-2] for what in opened), steps


def test_without_claim_watches_a_claim_that_nothing_watches_strands_its_job() -> None:
    """Hole 2: a claim commits, and the child never beats (its reply was lost, or it froze
    or died unreported first) while its node heartbeats on: nothing will ever end it."""
    failure, steps = counterexample(OwnersOnly, claim_watches=False)
    assert failure.startswith("job j1 has no owner: RUNNING attempt 1"), failure
    opened = ("claim_reply_lost", "how='freezes'", "how='dies_unreported'")
    assert len(steps) <= 4 and any(what in steps[-2] for what in opened), steps


def test_without_requeue_a_child_lost_before_its_claim_and_its_report_strands_its_job() -> None:
    """Hole 3: a pool child dies before its claim, Celery acks its message, and the node
    dies before the agent reports the child: nothing holds the attempt any more. Celery's
    requeue (``task_reject_on_worker_lost``) closes it."""
    failure, steps = counterexample(OwnersOnly, requeue_lost=False)
    assert re.match(r"job j\d has no owner: QUEUED attempt 1", failure), failure
    assert len(steps) <= 4 and "child_dies_first_with_its_node" in steps[-2], steps


# -- worked examples: the holes, and how the fix closes each ---------------------------------


def fleet(
    recover_stranded: bool = True, claim_watches: bool = True, requeue_lost: bool = True
) -> LedgerModel:
    """A batch job published, and two workers up."""
    model = LedgerModel(
        workloads=WORKLOADS,
        recover_stranded=recover_stranded,
        claim_watches=claim_watches,
        requeue_lost=requeue_lost,
    )
    model.submit("j", "batch")
    model.register("w1")
    model.register("w2")
    assert model.publish_own("j.1", model.dispatch["j.1"].lease)
    return model


def only_message(model: LedgerModel, state: str = QUEUED) -> int:
    (tag,) = [tag for tag, m in model.messages.items() if m.state == state]
    return tag


@pytest.mark.parametrize("fixed", [False, True])
def test_a_node_killed_between_taking_a_message_and_claiming_it(fixed: bool) -> None:
    model = fleet(recover_stranded=fixed)
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    model.kill_node("w1")
    assert model.messages[tag].state == DELIVERED  # in unacked: kombu never gives it back
    assert bool(model.owners("j")) is fixed
    model.elapse()
    report = model.watchdog_tick()
    assert report["workers_declared_dead"] == 1
    if not fixed:
        assert model.owners("j") == [] and "j.1" not in model.dispatch
        assert [m.state for m in model.messages.values()] == [DELIVERED]
        with pytest.raises(AssertionError, match="jobs not ended"):
            drive_to_end(model)
        return
    assert report["stranded_deliveries"] == report["dispatched"] == 1
    assert model.messages[tag].state == ACKED  # out of unacked, and published again
    again = only_message(model)
    assert model.deliver(again, "w2")
    assert model.claim("j", 1, "w2", 7, again) == "ok"
    assert model.complete("j", 1, "w2", '"r"')
    assert model.messages[again].state == ACKED  # released with the attempt
    assert model.stats["stranded_deliveries"] == 1


@pytest.mark.parametrize("fixed", [False, True])
def test_a_child_lost_before_its_claim(fixed: bool) -> None:
    """Without Celery's requeue (``requeue_lost``) the message of a task whose child died
    is acked: only the agent's report (as fixed, a redelivery) gives the job an owner."""
    model = fleet(recover_stranded=fixed, requeue_lost=False)
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    model.child_died(tag)
    assert model.messages[tag].state == ACKED and model.owners("j") == []
    status = model.report_worker_lost("j", 1, "w1", pid=7)
    if not fixed:
        assert status == "stale"  # end_attempt: the job is QUEUED, not RUNNING
        assert model.owners("j") == []
        return
    assert status == "redelivered"
    assert model.stats["redeliveries"] == 1
    assert model.owners("j") == [f"message {only_message(model)} in its queue"]


@pytest.mark.parametrize("report", ["sent", "lost with the node", "lost with redis"])
def test_a_child_lost_before_its_claim_keeps_its_message(report: str) -> None:
    """Celery puts the message of a task whose child died back on its queue, the same
    message under the same tag, and the agent reports the child: both copies reach a
    claim and only one starts the attempt. If the node dies first, the message in the
    queue owns the job; if Redis is out of reach, the requeue is dropped with the
    channel's connection, and the sweep owns the message left in unacked."""
    model = fleet()
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    model.child_died(tag, connected=report != "lost with redis")
    if report == "lost with redis":
        assert model.owners("j") == [f"message {tag} stranded in unacked"]
        model.elapse()
        assert model.watchdog_tick()["stranded_deliveries"] == 1
        assert model.messages[tag].state == ACKED
        assert model.owners("j") == [f"message {only_message(model)} in its queue"]
        return
    assert model.messages[tag].state == QUEUED  # same tag: kombu's restore_by_tag
    assert model.owners("j") == [f"message {tag} in its queue"]
    if report == "lost with the node":
        model.kill_node("w1")
        assert model.owners("j") == [f"message {tag} in its queue"]
        return
    assert model.report_worker_lost("j", 1, "w1", pid=7) == "redelivered"
    again = max(model.messages)
    assert {model.messages[t].state for t in (tag, again)} == {QUEUED}
    assert model.deliver(tag, "w2") and model.deliver(again, "w1")
    assert model.claim("j", 1, "w2", 8, tag) == "ok"
    assert model.claim("j", 1, "w1", 9, again) == "duplicate"


def test_a_claimed_attempts_message_put_back_by_a_dead_child_is_refused() -> None:
    """A child dies after claiming: Celery puts its message back (same tag) and the agent
    ends the attempt. The copy is refused by the claim ('stale'), so a poison job cannot
    loop; before the agent's word lands it is a 'duplicate'."""
    model = fleet()
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    assert model.claim("j", 1, "w1", 7, tag) == "ok"
    model.start_child("j.1", "w1", 7, tag).state = GONE
    model.child_died(tag)
    assert model.deliver(tag, "w2")
    assert model.claim("j", 1, "w2", 8, tag) == "duplicate"
    model.ack(tag)
    assert model.report_worker_lost("j", 1, "w1", pid=7) == "retry"
    assert model.jobs["j"].attempts[1].outcome is Outcome.WORKER_LOST
    assert model.messages[tag].state == ACKED


def test_a_copy_of_a_running_attempt_under_its_own_tag_is_left_to_the_attempt() -> None:
    """The claimed message was put back (a claim whose reply was lost) and taken again
    by a consumer that died: the sweep marks it claimed rather than removing it, and the
    attempt's end takes it out of unacked."""
    model = fleet()
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    assert model.claim("j", 1, "w1", 7, tag) == "ok"
    assert model.reject(tag)
    assert model.deliver(tag, "w2")
    model.kill_node("w2")
    model.elapse()
    assert model.sweep_stranded() == []
    assert (model.messages[tag].state, model.messages[tag].claimed) == (DELIVERED, True)
    assert model.stats["stale_deliveries_removed"] == 0
    assert model.end_attempt("j", 1, Outcome.ERROR, "w1", pid=7, epoch=1) == "retry"
    assert model.messages[tag].state == ACKED


@pytest.mark.parametrize("fixed", [False, True])
def test_a_claim_whose_reply_was_lost(fixed: bool) -> None:
    """The claim commits; the runner never hears it, rejects the message back to its
    queue and runs nothing. w1 heartbeats on: declare_dead never fires."""
    model = fleet(claim_watches=fixed)
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    assert model.claim("j", 1, "w1", 7, tag) == "ok"
    assert model.reject(tag) and model.messages[tag].state == QUEUED
    assert model.deliver(tag, "w2")
    assert model.claim("j", 1, "w2", 8, tag) == "duplicate"  # harmless
    model.ack(tag)
    assert (model.jobs["j"].state, model.owners("j") == []) == (JobState.RUNNING, not fixed)
    for _ in range(3):
        model.elapse()
        model.watchdog_tick()
    if not fixed:
        assert model.jobs["j"].state is JobState.RUNNING  # forever
        return
    assert model.stats["stalls"] == 1
    assert model.jobs["j"].attempts[1].outcome is Outcome.STALLED
    assert model.jobs["j"].state is JobState.QUEUED and model.jobs["j"].attempt == 2
    assert model.workers["w1"].kill == {"j.1"}  # its agent kills the child, if any


@pytest.mark.parametrize("fixed", [False, True])
def test_a_child_frozen_before_its_first_beat(fixed: bool) -> None:
    model = fleet(claim_watches=fixed)
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    assert model.claim("j", 1, "w1", 7, tag) == "ok"
    model.start_child("j.1", "w1", 7, tag).state = FROZEN
    assert bool(model.owners("j")) is fixed
    model.elapse()
    model.watchdog_tick()
    assert (model.stats["stalls"], model.jobs["j"].attempt) == ((1, 2) if fixed else (0, 1))


@pytest.mark.parametrize("fixed", [False, True])
def test_a_sibling_child_lost_with_a_duplicate_leaves_the_running_attempt_alone(
    fixed: bool,
) -> None:
    """Child 7 of w1 runs j.1; a duplicate of its message goes to child 8 of w1, which
    dies before claiming. Without the fix the agent's report, by worker name, ends j.1."""
    model = fleet(recover_stranded=fixed)
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    assert model.claim("j", 1, "w1", 7, tag) == "ok"
    model.start_child("j.1", "w1", 7, tag)
    duplicate = model.send("j.1")
    assert model.deliver(duplicate, "w1")
    model.child_died(duplicate)  # back on its queue: its next claim is a 'duplicate'
    status = model.report_worker_lost("j", 1, "w1", pid=8)
    if fixed:
        assert status == "stale"
        assert model.jobs["j"].state is JobState.RUNNING
        assert model.complete("j", 1, "w1", '"r"')
    else:
        assert status == "retry"  # a healthy attempt thrown away
        assert not model.complete("j", 1, "w1", '"r"')
    assert model.end_attempt("j", 1, Outcome.ERROR, "w1", pid=7, epoch=1) == "stale"


def test_an_incarnation_cannot_end_what_the_one_before_claimed() -> None:
    model = fleet()
    assert model.claim("j", 1, "w1", 7) == "ok"
    model.declare_dead("w1")  # a partition: w1's process lives on
    assert model.register("w1") == 2  # fenced: its agent registers again, same pid
    assert model.end_attempt("j", 1, Outcome.WORKER_LOST, "w1", pid=7, epoch=2) == "stale"
    assert model.lost == {"j.1": "node_lost"}  # the watchdog's, with the cause it saw
    assert model.end_attempt("j", 1, Outcome.NODE_LOST) == "retry"


def test_the_sweep_never_republishes_a_message_waiting_in_its_queue() -> None:
    model = fleet()
    tag = only_message(model)
    for _ in range(3):
        model.elapse()
        assert model.watchdog_tick() == {}
    assert list(model.messages) == [tag] and model.messages[tag].state == QUEUED


def test_a_slow_consumer_swept_past_its_grace_makes_a_harmless_duplicate() -> None:
    """w1 holds the message behind a long task; past the claim grace the sweep publishes
    it again. Both copies reach a claim: one starts the attempt, the other is refused."""
    model = fleet()
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    model.elapse()
    assert model.watchdog_tick()["stranded_deliveries"] == 1
    copy_tag = only_message(model)
    assert model.deliver(copy_tag, "w2")
    assert model.claim("j", 1, "w2", 8, copy_tag) == "ok"
    assert model.held(tag)  # w1 still has its copy in memory
    assert model.claim("j", 1, "w1", 7, tag) == "duplicate"
    model.ack(tag)
    assert model.complete("j", 1, "w2", '"r"')
    assert model.stats["duplicate_deliveries"] == 1


def test_a_dead_consumers_copy_of_a_running_attempt_is_removed_not_republished() -> None:
    model = fleet()
    tag = only_message(model)
    assert model.deliver(tag, "w2")
    assert model.claim("j", 1, "w2", 8, tag) == "ok"
    duplicate = model.send("j.1")
    assert model.deliver(duplicate, "w1")
    model.kill_node("w1")
    model.elapse()
    model.sweep_stranded()
    assert model.messages[duplicate].state == ACKED
    assert model.messages[tag].state == DELIVERED  # claimed: out of the sweep's range
    assert model.stats["stale_deliveries_removed"] == 1
    assert "j.1" not in model.dispatch


def test_a_publish_never_takes_over_another_publishers_lease() -> None:
    model = LedgerModel(workloads=WORKLOADS)
    model.submit("j", "batch")
    producer = model.dispatch["j.1"].lease
    assert model.begin_dispatch("j.1") is None  # the producer's, until the grace passes
    lease = model.begin_dispatch("j.1", producer)
    assert lease is not None and model.begin_dispatch("j.1") is None
    model.elapse()  # the publisher died: its lease lapses
    assert model.publish("j.1")
    assert not model.end_dispatch("j.1", lease)  # nothing left to drop
    assert model.begin_dispatch("j.1") is None  # published: no entry


def test_a_restarted_node_waits_until_its_old_heartbeat_lapses() -> None:
    model = fleet()
    model.kill_node("w1")
    with pytest.raises(WorkerNameInUseError):
        model.register("w1")
    model.elapse()
    assert model.register("w1") == 2
    assert model.workers["w1"].process == 2


def test_a_kill_order_stays_until_the_worker_no_longer_holds_the_attempt() -> None:
    model = fleet()
    assert model.claim("j", 1, "w1", 7) == "ok"
    assert model.cancel("j") == "ok"
    assert model.heartbeat("w1", 1, {"j.1"}) == ("ok", ["j.1"])
    assert model.heartbeat("w1", 1, {"j.1"}) == ("ok", ["j.1"])  # a lost reply loses none
    assert model.heartbeat("w1", 1, set()) == ("ok", [])
    assert model.workers["w1"].kill == set()


def test_a_killed_node_is_dead_one_interval_later_on_its_closed_connection() -> None:
    model = fleet()
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    assert model.claim("j", 1, "w1", 7, tag) == "ok"
    model.kill_node("w1")
    assert model.watchdog_tick()["workers_declared_dead"] == 0  # its beat is not late yet
    model.elapse_interval()  # late by one interval: nothing is stale yet
    assert not model.workers["w1"].silent
    report = model.watchdog_tick()
    assert report["workers_declared_dead"] == 1 and report["retry"] == 1
    assert model.workers["w1"].state is WorkerState.DEAD
    assert model.stats["incidents:worker_dead"] == 1


def test_a_frozen_node_keeps_its_connection_and_is_dead_only_when_silent() -> None:
    model = fleet()
    tag = only_message(model)
    assert model.deliver(tag, "w1")
    assert model.claim("j", 1, "w1", 7, tag) == "ok"
    model.freeze_node("w1")
    model.elapse_interval()
    assert model.watchdog_tick()["workers_declared_dead"] == 0  # late, but connected
    assert model.declare_dead("w1", "connection") is None
    model.elapse()  # stale_after passes
    assert model.watchdog_tick()["workers_declared_dead"] == 1


def test_a_live_node_is_never_dead_on_the_connection_signal() -> None:
    """A node that heartbeats keeps (or at once retakes) its subscription: however late a
    tick comes, the connection signal has nothing to say about it."""
    model = fleet()
    for _ in range(3):
        model.elapse_interval()
        assert model.watchdog_tick().get("workers_declared_dead", 0) == 0
        assert model.declare_dead("w1", "connection") is None
    assert model.workers["w1"].state is WorkerState.ALIVE


def test_on_the_ledgers_redis_a_submitted_job_is_owned_by_its_message_at_once() -> None:
    """With the scripts publishing, submit writes the job and sends attempt 1 in one step:
    the job has its message as owner from the first moment, and no dispatch entry (a
    producer that dies right after submit leaves nothing half done)."""
    model = LedgerModel(workloads=WORKLOADS, scripts_publish=True)
    model.submit("j", "batch")
    assert "j.1" not in model.dispatch
    (tag,) = model.messages
    assert model.owners("j") == [f"message {tag} in its queue"]
    assert model.stats["attempts_published"] == 1
    model.submit("j", "batch")  # a producer's retry after a lost reply: written once
    assert list(model.messages) == [tag]


def test_on_the_ledgers_redis_a_dispatch_whose_lease_was_taken_sends_nothing() -> None:
    """With the scripts publishing, the message goes out with the end of the dispatch, and
    only while the lease is ours: a publisher whose lease lapsed and was taken sends no
    duplicate; the holder's end sends the one message."""
    model = LedgerModel(workloads=WORKLOADS, scripts_publish=True)
    model.submit("j", "batch")
    model.register("w1")
    tag = only_message(model)
    model.deliver(tag, "w1")
    model.claim("j", 1, "w1", tag=tag)
    assert model.end_attempt("j", 1, Outcome.WORKER_LOST, "w1") == "retry"
    model.elapse()  # the backoff passes: the dispatch of attempt 2 is due
    first = model.begin_dispatch("j.2")
    assert first is not None
    model.elapse()  # its lease lapses, and another publisher takes it
    second = model.begin_dispatch("j.2")
    assert second is not None
    sent_before = len(model.messages)
    assert not model.end_dispatch("j.2", first, message=True)
    assert len(model.messages) == sent_before
    assert model.end_dispatch("j.2", second, message=True)
    assert [m.member for m in model.messages.values()].count("j.2") == 1
    assert "j.2" not in model.dispatch
