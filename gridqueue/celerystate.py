"""What Celery's tools (Flower, ``celery events``) are told about an attempt.

Each attempt is one Celery task, id ``<job>.<n>``. Celery's state of that task is read
from the ledger, never guessed from how the task body returned, so what Flower shows is
what the ledger holds:

=====================================================  =========  ==========================
the attempt in the ledger                              Celery     how it is announced
=====================================================  =========  ==========================
published, waiting in its queue                        PENDING    ``task-sent`` (producer)
delivered, claim under way / running                   RECEIVED,  Celery's own events
                                                       STARTED
outcome ``succeeded`` (its result is the job's)        SUCCESS    the task returns
outcome ``error``, ``invalid_input``, ``worker_lost``, FAILURE    the task raises
``node_lost``, ``stalled``, ``gpu_fault``,                        :class:`AttemptFailed`;
``evacuated``; or superseded                                      ``task-failed``
outcome ``cancelled`` (``job.cancel()``, a revoke)     REVOKED    ``task-revoked``
outcome ``expired`` (the job's deadline passed)        REVOKED    ``task-revoked``,
                                                                  ``expired=True``
refused at claim and queued again (a fenced,           RETRY      ``task-retried``
quarantined or avoided node; the ledger publishes it
again under the same id)
a second delivery of an attempt running elsewhere      (none)     its state is the running
                                                                  one's
=====================================================  =========  ==========================

A pool child that dies under its attempt makes Celery put the message back and send only
``task-rejected``, which does not change a STARTED task's state; the worker's main
process then reads the ledger's verdict and announces it (see
:class:`gridqueue.runner.AttemptRequest`). An attempt whose whole node died is announced
by the watchdog that ends it (``node_lost``: FAILURE, see :class:`NodeLostAnnouncer`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from celery import Celery, states
from celery.exceptions import Ignore

from gridqueue.errors import JobNotFoundError
from gridqueue.ledger import Ledger
from gridqueue.logs import get_logger
from gridqueue.records import JobRecord
from gridqueue.states import JobState, Outcome

log = get_logger("gridqueue.celerystate")


class AttemptFailed(Exception):
    """Raised by the task body of an attempt whose ledger verdict is FAILURE.

    ``released``: the broker delivery tag the ledger took out of kombu's unacked when it
    ended the attempt ('' if it did not): it travels with the exception to the worker's
    main process, which then acks the message without a round trip to Redis."""

    def __init__(self, detail: str, released: str = "") -> None:
        super().__init__(detail)
        self.detail = detail
        self.released = released

    def __str__(self) -> str:
        return self.detail


class AttemptRequeued(Exception):
    """The reason carried by Celery's ``Retry`` for an attempt refused at claim and
    queued again."""


class AttemptRevoked(Ignore):  # type: ignore[misc]
    """Raised by the task body of an attempt whose ledger verdict is REVOKED. ``Ignore``
    makes Celery ack the message and send nothing; the worker's main process sends
    ``task-revoked`` on seeing it."""

    def __init__(self, detail: str, expired: bool = False) -> None:
        super().__init__(detail, expired)
        self.detail = detail
        self.expired = expired

    def __str__(self) -> str:
        return self.detail


@dataclass(frozen=True)
class Verdict:
    """Celery's state for an attempt: ``states.SUCCESS``, ``FAILURE``, ``REVOKED`` or
    ``RETRY``; ``None`` while it runs (this delivery is not the one that runs it)."""

    state: str | None
    detail: str
    expired: bool = False


def _job_context(record: JobRecord) -> str:
    if record.terminal:
        reason = f" ({record.reason})" if record.reason else ""
        return f"job {record.state.value}{reason}"
    return f"job {record.state.value} as attempt {record.attempt}"


def verdict_of(record: JobRecord | None, n: int) -> Verdict:
    """The Celery state of attempt ``n`` of the job ``record`` (None: no such job)."""
    if record is None:
        return Verdict(states.FAILURE, "no such job in the ledger")
    attempt = next((a for a in record.attempts if a.n == n), None)
    context = _job_context(record)
    if attempt is not None and attempt.outcome:
        outcome = attempt.outcome
        detail = f"{outcome}: {attempt.error}" if attempt.error else outcome
        detail = f"{detail}; {context}"
        if outcome == Outcome.SUCCEEDED:
            return Verdict(states.SUCCESS, detail)
        if outcome == Outcome.CANCELLED:
            return Verdict(states.REVOKED, detail)
        if outcome == Outcome.EXPIRED:
            return Verdict(states.REVOKED, detail, expired=True)
        return Verdict(states.FAILURE, detail)
    if n > record.attempt:
        return Verdict(states.FAILURE, f"no attempt {n} in the ledger; {context}")
    if n < record.attempt:
        return Verdict(states.FAILURE, f"superseded by attempt {record.attempt}; {context}")
    # The job's current attempt, which has no outcome of its own.
    if record.state is JobState.RUNNING:
        return Verdict(None, f"running on {record.worker}")
    if record.state is JobState.QUEUED:
        return Verdict(states.RETRY, "refused here and queued again: the ledger publishes it anew")
    if record.state is JobState.CANCELLED:
        return Verdict(states.REVOKED, context)
    if record.state is JobState.EXPIRED:
        return Verdict(states.REVOKED, context, expired=True)
    if record.state is JobState.SUCCEEDED:
        return Verdict(states.SUCCESS, context)
    return Verdict(states.FAILURE, context)


class NodeLostAnnouncer:
    """The watchdog's voice for a node that died: ``task-failed`` for each attempt it
    ends ``node_lost``, or Flower would show that attempt STARTED for ever.

    The event is sent in the dead node's name (``<worker>@<host>``, as Celery names it),
    so Flower keeps showing where the attempt ran, and it is dated when the node was last
    heard from (its silence on the Redis clock, carried over to this host's clock): Flower
    counts a task event as a sign of life of its node, and one dated then does not bring
    the dead node back online.
    """

    # Announcements wait here for a thread of their own: the watchdog's failover loop
    # never waits on the reads and the publish an event takes. Past this many waiting,
    # the newest are dropped (and logged): the ledger has every outcome.
    BACKLOG = 10_000

    def __init__(self, app: Celery, ledger: Ledger, enabled: bool) -> None:
        self.app = app
        self.ledger = ledger
        self.enabled = enabled
        self._queue: queue.Queue[tuple[str, int]] = queue.Queue(self.BACKLOG)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._go = threading.Event()
        self._go.set()

    @contextmanager
    def held(self) -> Iterator[None]:
        """Announcements wait while this is open: a rack's requeue puts a thousand of
        them in the queue, and sending them (a record read and a publish each) on the
        same interpreter as the requeue would slow the requeue they describe."""
        self._go.clear()
        try:
            yield
        finally:
            self._go.set()

    def node_lost(self, job_id: str, n: int) -> None:
        """Queue the announcement; it is sent by the announcer's thread."""
        if not self.enabled:
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="gridqueue-lost-events", daemon=True
                )
                self._thread.start()
        try:
            self._queue.put_nowait((job_id, n))
        except queue.Full:
            log.warning("attempt.lost_event_dropped", job=job_id, attempt=n)

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued announcement was sent (tests, a clean stop)."""
        give_up_at = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < give_up_at:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            job_id, n = self._queue.get()
            self._go.wait()
            try:
                self._announce(job_id, n)
            except Exception as exc:  # an event is a courtesy: the ledger has the outcome
                log.warning("attempt.lost_event_failed", job=job_id, attempt=n, error=repr(exc))
            finally:
                self._queue.task_done()

    def _announce(self, job_id: str, n: int) -> None:
        try:
            record = self.ledger.get(job_id)
        except JobNotFoundError:
            return
        attempt = next((a for a in record.attempts if a.n == n), None)
        if attempt is None or not attempt.worker:
            return
        worker = self.ledger.worker(attempt.worker)
        if worker is None or not worker.host:
            return
        verdict = verdict_of(record, n)
        now_ms = self.ledger.time_ms()
        silent_s = max(0.0, (now_ms - (worker.last_heartbeat_ms or now_ms)) / 1000)
        fields = {"uuid": f"{job_id}.{n}", "timestamp": time.time() - silent_s}
        with self.app.events.default_dispatcher(hostname=f"{worker.name}@{worker.host}") as d:
            if verdict.state == states.FAILURE:
                failed = repr(AttemptFailed(verdict.detail))
                d.send("task-failed", exception=failed, traceback="", **fields)
            elif verdict.state == states.REVOKED:
                d.send("task-revoked", terminated=True, expired=verdict.expired, **fields)
