"""The attempt runner: the body of the Celery task, run in a pool child.

It claims the attempt through the ledger (refused for a fenced worker or a superseded
attempt), runs the user handler, and ends the attempt with a fenced write. Every outcome
is written to the ledger, which is the store of record; only then does the task tell
Celery how it ended, as the ledger's verdict says (:mod:`gridqueue.celerystate`): it
returns for SUCCESS and raises for FAILURE, REVOKED and RETRY, so that Flower and
``celery events`` show each attempt in a state that is true.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Celery, Task, states
from celery.exceptions import Ignore, Reject, Retry
from celery.worker.request import Request
from redis.exceptions import RedisError

from gridqueue.celeryapp import TASK_NAME, ack_released
from gridqueue.celerystate import (
    AttemptFailed,
    AttemptRequeued,
    AttemptRevoked,
    Verdict,
    verdict_of,
)
from gridqueue.dispatch import Dispatcher
from gridqueue.errors import InvalidInput, JobNotFoundError
from gridqueue.handlers import Confirmation, Context, HandlerFn, Resume, get_handler
from gridqueue.keys import attempt_id, split_attempt_id
from gridqueue.ledger import AttemptEnd, Ledger, dumps, retry_redis
from gridqueue.logs import get_logger
from gridqueue.probes import Probe
from gridqueue.records import JobRecord
from gridqueue.settings import Settings
from gridqueue.states import Outcome

log = get_logger("gridqueue.runner")

# What follows a successful attempt's return value when the ledger released its delivery
# (see conclude), with the delivery's tag: read, and taken out, by the worker's main
# process.
RELEASED_MARK = " released="


@dataclass
class WorkerRuntime:
    """What this worker process (and the children it forks) knows of itself."""

    name: str
    models: list[str]
    settings: Settings
    concurrency: int
    app: Celery
    queues: list[str] = field(default_factory=list)  # the models that fit this node's GPUs
    model_fit: dict[str, dict[str, int]] = field(default_factory=dict)
    probe: Probe | None = None
    probe_note: str = ""
    host: str = field(default_factory=socket.gethostname)
    fatal: Exception | None = None  # why the agent could not join the fleet
    _ledger: Ledger | None = None
    _dispatcher: Dispatcher | None = None
    _pid: int = 0

    @property
    def ledger(self) -> Ledger:
        # One client per process: a forked child must not share its parent's sockets.
        if self._ledger is None or self._pid != os.getpid():
            self._ledger = Ledger.connect(self.settings)
            self._dispatcher = None
            self._pid = os.getpid()
        return self._ledger

    @property
    def dispatcher(self) -> Dispatcher:
        # One per process too: its message renderer holds a broker channel and the
        # templates, which a dispatcher per publish would open (and leak) each time.
        ledger = self.ledger
        if self._dispatcher is None:
            self._dispatcher = Dispatcher(ledger, self.app)
        return self._dispatcher

    def end_attempt(
        self,
        job_id: str,
        attempt: int,
        outcome: Outcome,
        error: str,
        pid: int | None = None,
        epoch: int | None = None,
    ) -> AttemptEnd:
        """End an attempt that process ``pid`` of this worker ran and, for an immediate
        retry, publish it now."""
        end: AttemptEnd = retry_redis(self.ledger.end_attempt)(
            job_id, attempt, outcome, error=error[:2000], worker=self.name, pid=pid, epoch=epoch
        )
        log.info(
            "attempt.ended",
            job=job_id,
            attempt=attempt,
            outcome=outcome.value,
            decision=end.status,
            state=end.state,
            next_attempt=end.next_attempt,
        )
        if end.status == "retry" and end.next_attempt and end.after_s == 0:
            retry_redis(self.dispatcher.publish)(attempt_id(job_id, end.next_attempt))
        return end


_runtime: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime) -> None:
    global _runtime
    _runtime = runtime


def current_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("gridqueue worker runtime not installed; start with `gridqueue worker`")
    return _runtime


class AttemptLiveness:
    """The running attempt's own heartbeat, for the attempt's life.

    The node's heartbeat says the worker's main process is alive; this one says the
    process running *this* attempt is. A frozen child (SIGSTOP, D-state) stops beating and
    the watchdog declares the attempt stalled after the class's liveness_timeout_s. The
    claim registered the first deadline, so the first beat comes one interval after the
    start, not at it. It beats until the attempt's outcome is in the ledger, not just until
    the handler returns: a result still being written through a Redis blip is not a stall.

    The beats are sent by one thread per process (:class:`_Beater`), not one per attempt:
    starting a thread cost about 125 µs of every attempt's time.
    """

    def __init__(self, runtime: WorkerRuntime, job_id: str, attempt: int, timeout_s: float):
        self.runtime = runtime
        self.job_id = job_id
        self.attempt = attempt
        self.timeout_ms = int(timeout_s * 1000)
        self.interval_s = max(0.05, timeout_s / 4)
        self._confirmed = Confirmation(runtime.settings.stale_after_s)
        self.due = 0.0  # monotonic time of the next beat
        self.stopped = False

    def start(self) -> None:
        self.due = time.monotonic() + self.interval_s
        _beater().add(self)

    def stop(self) -> None:
        self.stopped = True
        _beater().remove(self)

    def beat(self) -> bool:
        """One beat; False once there is nothing to vouch for (superseded, or unconfirmed
        for too long)."""
        try:
            return self._confirmed.record(
                self.runtime.ledger.beat(
                    self.job_id, self.attempt, self.runtime.name, self.timeout_ms
                )
            )
        except RedisError:
            # A blip must not look like a stall on our side; but once the attempt could
            # not be confirmed current for stale_after_s, it may well be another's now.
            return self._confirmed.recent()


class _Beater:
    """The thread that beats for every attempt its process runs, each on its own
    interval. Beats go out of the lock: a slow one (a Redis blip) delays the others of
    the process, never an attempt's start or stop.

    An idle beater looks again every IDLE_S, so an attempt whose first beat is due after
    that starts without waking it: a short attempt costs no thread switch at all."""

    IDLE_S = 1.0

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: dict[int, AttemptLiveness] = {}
        self._wakes_at = 0.0  # monotonic: when the thread looks again
        self._thread = threading.Thread(target=self._run, name="gq-liveness", daemon=True)
        self._thread.start()

    def add(self, watch: AttemptLiveness) -> None:
        with self._cond:
            self._watches[id(watch)] = watch
            if watch.due < self._wakes_at:
                self._cond.notify()

    def remove(self, watch: AttemptLiveness) -> None:
        with self._cond:
            self._watches.pop(id(watch), None)

    def _due(self) -> list[AttemptLiveness]:
        """Wait for the next beat that is due; the watches due now."""
        with self._cond:
            while True:
                now = time.monotonic()
                due = [w for w in self._watches.values() if w.due <= now]
                if due:
                    return due
                soonest = min((w.due for w in self._watches.values()), default=now + self.IDLE_S)
                self._wakes_at = soonest
                self._cond.wait(soonest - now)

    def _run(self) -> None:
        while True:
            for watch in self._due():
                if watch.stopped:
                    continue
                try:
                    current = watch.beat()
                except Exception:  # a bug: this attempt stops beating, the others do not
                    log.exception(
                        "attempt.liveness_failed", job=watch.job_id, attempt=watch.attempt
                    )
                    current = False
                if current:
                    watch.due = time.monotonic() + watch.interval_s
                else:
                    self.remove(watch)  # superseded, or unconfirmed for too long


# One beater per process: a pool child forked from a process that had one gets its own.
_beaters: dict[int, _Beater] = {}
_beaters_lock = threading.Lock()


def _beater() -> _Beater:
    pid = os.getpid()
    beater = _beaters.get(pid)
    if beater is None:
        with _beaters_lock:
            beater = _beaters.get(pid)
            if beater is None:
                beater = _beaters[pid] = _Beater()
    return beater


def read_verdict(ledger: Ledger, job_id: str, attempt: int) -> Verdict:
    """The ledger's verdict on an attempt, in Celery's terms. It is only told to Celery's
    tools, so it is read once: nothing waits out a Redis blip for it."""
    record: JobRecord | None
    try:
        record = ledger.get(job_id)
    except JobNotFoundError:
        record = None
    return verdict_of(record, attempt)


def verdict_or(ledger: Ledger, job_id: str, attempt: int, fallback: Verdict) -> Verdict:
    try:
        return read_verdict(ledger, job_id, attempt)
    except RedisError as exc:
        log.warning("attempt.verdict_unknown", job=job_id, attempt=attempt, error=str(exc))
        return fallback


def conclude(verdict: Verdict, job_id: str, attempt: int, released: str = "") -> str:
    """End the task body as ``verdict`` says: return for SUCCESS (the attempt and its
    outcome, ``<job>.<n> succeeded``: Celery's result, as Flower shows it), raise
    otherwise. The value is a short string: Celery hands it to the main process as its
    saferepr, which costs 25 µs of a pool child's time for a small dict, 3 for a string.

    ``released``: this delivery's tag when the ledger took it out of kombu's unacked as it
    ended the attempt; it goes to the worker's main process with the return value (or
    with :class:`AttemptFailed`), which then acks the message in memory only (see
    :func:`gridqueue.celeryapp.ack_released`)."""
    if verdict.state == states.SUCCESS:
        summary = f"{attempt_id(job_id, attempt)} {verdict.detail}"
        return f"{summary}{RELEASED_MARK}{released}" if released else summary
    if verdict.state == states.FAILURE:
        raise AttemptFailed(verdict.detail, released)
    if verdict.state == states.REVOKED:
        raise AttemptRevoked(verdict.detail, verdict.expired)
    if verdict.state == states.RETRY:
        raise Retry(verdict.detail, AttemptRequeued(verdict.detail))
    raise Ignore(verdict.detail)  # it runs elsewhere: that delivery reports it


def ended_verdict(
    runtime: WorkerRuntime, job_id: str, attempt: int, outcome: Outcome, error: str, end: AttemptEnd
) -> Verdict:
    """The verdict on an attempt this process just ended with ``outcome``."""
    if end.status == "stale":  # superseded meanwhile: the ledger has the last word
        fallback = Verdict(states.FAILURE, f"{outcome.value}: {error}; superseded")
        return verdict_or(runtime.ledger, job_id, attempt, fallback)
    if end.status == "retry" and end.next_attempt:
        context = f"job retried as attempt {end.next_attempt}"
    else:
        context = f"job {end.state}"
    return Verdict(states.FAILURE, f"{outcome.value}: {error}; {context}")


def released_here(end: AttemptEnd) -> str:
    """The delivery tag an end of the attempt by this process released, if any."""
    return end.released if end.status in ("retry", "ended") else ""


def run_attempt(task: Task, job_id: str, attempt: int) -> str:
    runtime = current_runtime()
    ledger = runtime.ledger
    properties: dict[str, Any] = getattr(task.request, "properties", None) or {}
    delivery_tag = str(properties.get("delivery_tag") or "")
    try:
        claim = retry_redis(ledger.claim)(job_id, attempt, runtime.name, os.getpid(), delivery_tag)
    except RedisError as exc:
        # Never ack a message we could not claim: put it back for a worker that can.
        log.error("attempt.claim_failed", job=job_id, attempt=attempt, error=str(exc))
        raise Reject(str(exc), requeue=True) from exc
    if claim.status != "ok":
        # Refused (fenced, not served, deferred), stale or a duplicate: the message is
        # acked, and the claim itself made the attempt's dispatch due again if it must.
        log.info(
            "attempt.skipped", job=job_id, attempt=attempt, why=claim.status, detail=claim.detail
        )
        unknown = Verdict(None, f"refused at claim ({claim.status}); the ledger is unreachable")
        return conclude(verdict_or(ledger, job_id, attempt, unknown), job_id, attempt)
    assert claim.model is not None and claim.payload is not None
    log.debug("attempt.started", job=job_id, attempt=attempt, model=claim.model)
    found = get_handler(claim.model)
    if found is None:
        error = f"no handler for model {claim.model!r} on this worker"
        end = runtime.end_attempt(job_id, attempt, Outcome.ERROR, error, pid=os.getpid())
        verdict = ended_verdict(runtime, job_id, attempt, Outcome.ERROR, error, end)
        return conclude(verdict, job_id, attempt, ours(delivery_tag, released_here(end)))
    workload = ledger.workloads.get(claim.workload or "")
    liveness_s = workload.liveness_timeout_s if workload else 5.0
    stall_ms = int((workload.stall_timeout_s if workload else 300.0) * 1000)
    # The claim started the stall clock and the liveness watch, and brought the job's last
    # checkpoint: a class that resumes hands it to the handler.
    resume = None
    if workload is not None and workload.resume and claim.checkpoint is not None:
        resume = Resume(json.loads(claim.checkpoint), claim.checkpoint_position or 0)
    ctx = Context(
        job_id,
        attempt,
        runtime.name,
        ledger,
        stall_ms=stall_ms,
        confirm_within_s=runtime.settings.stale_after_s,
        stream=ledger,
        resume=resume,
    )
    liveness = AttemptLiveness(runtime, job_id, attempt, liveness_s)
    liveness.start()
    try:
        verdict, released = _run_claimed(runtime, found.fn, json.loads(claim.payload), ctx)
    finally:
        liveness.stop()
    return conclude(verdict, job_id, attempt, ours(delivery_tag, released))


def ours(delivery_tag: str, released: str) -> str:
    """``released`` if it is this message's delivery: the only one whose ack may skip
    Redis. A tag the ledger held from another delivery leaves this one to the usual ack."""
    return released if delivery_tag and released == delivery_tag else ""


def _run_claimed(
    runtime: WorkerRuntime, fn: HandlerFn, payload: Any, ctx: Context
) -> tuple[Verdict, str]:
    """Run the handler and write its outcome; the caller beats until this returns.
    Returns the attempt's verdict for Celery, and the delivery tag the ledger released
    with the attempt's end ('' if none)."""
    job_id, attempt, pid = ctx.job_id, ctx.attempt, os.getpid()
    outcome, error = Outcome.ERROR, ""
    try:
        result = fn(payload, ctx)
    except InvalidInput as exc:
        outcome, error = Outcome.INVALID_INPUT, str(exc)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        try:
            body = dumps(result)
        except (TypeError, ValueError) as exc:
            error = f"handler returned a value that is not JSON: {exc}"
        else:
            done = retry_redis(runtime.ledger.complete_attempt)(job_id, attempt, runtime.name, body)
            if done.ok:
                log.debug("attempt.succeeded", job=job_id, attempt=attempt)
                return Verdict(states.SUCCESS, Outcome.SUCCEEDED.value), done.released
            log.warning("attempt.result_discarded", job=job_id, attempt=attempt, why="superseded")
            superseded = Verdict(states.FAILURE, "its result was discarded: superseded")
            return verdict_or(runtime.ledger, job_id, attempt, superseded), ""
    end = runtime.end_attempt(job_id, attempt, outcome, error, pid=pid)
    verdict = ended_verdict(runtime, job_id, attempt, outcome, error[:2000], end)
    return verdict, released_here(end)


ChildLostHook = Callable[[str, "int | None", str], None]
_child_lost: ChildLostHook | None = None


def on_child_lost(hook: ChildLostHook | None) -> None:
    """Install the worker agent's handler of a pool child that died under a task:
    ``hook(task_id, pid, error)``, pid None when no child had accepted it yet."""
    global _child_lost
    _child_lost = hook


class AttemptRequest(Request):  # type: ignore[misc]
    """Celery's request, in the worker's main process, reporting a pool child that died
    under it to the agent, with that child's pid: the report must name the process that
    ran the attempt, or a duplicate delivery that died could end a healthy attempt.

    Celery requeues such a message (``task_reject_on_worker_lost``) and, when it does,
    sends no ``task_failure``: the report is made here instead.

    It also tells Celery's tools what became of the attempt: after a lost child, Celery
    sends only ``task-rejected``, which leaves the task STARTED in Flower, so the ledger's
    verdict is announced here once the agent has recorded the loss; and a task body that
    raised :class:`AttemptRevoked` is announced as ``task-revoked``.

    And it acks, without a round trip to Redis, a message whose delivery the ledger
    already released when the attempt ended: the pool child says so with the attempt's
    return value or with :class:`AttemptFailed` (see :func:`conclude`); any other
    message is acked as usual (:func:`gridqueue.celeryapp.ack_released`)."""

    _released = False  # the ledger took this delivery out of kombu's unacked
    acknowledged: bool  # Celery's

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Celery's worker runs a subclass of this class made per task
        # (celery.worker.request.create_request_cls) that brings its own on_success:
        # wrapped here, so the return value is read before that on_success acks (checked
        # against celery 5.7.0, which hands over the value's saferepr). Should Celery stop
        # doing so, nothing is read and every message is acked as usual.
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("on_success")
        if own is not None:
            cls.on_success = _reading_release(own)  # type: ignore[method-assign]

    def on_success(self, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        return super().on_success(self.note_release(failed__retval__runtime), **kwargs)

    def note_release(self, failed__retval__runtime: Any) -> Any:
        """Note whether a successful attempt's return value says the ledger released this
        delivery; return the result as Celery should see it: without that mark, so the
        ``task-succeeded`` event shows the attempt and its outcome alone."""
        try:
            failed, retval, runtime = failed__retval__runtime
        except (TypeError, ValueError):
            return failed__retval__runtime
        if failed or not isinstance(retval, str) or len(retval) < 2:
            return failed__retval__runtime
        # Celery hands over the value's saferepr: the string conclude returned, quoted.
        mark = f"{RELEASED_MARK}{self._message.delivery_tag}"
        quote, inner = retval[-1], retval[:-1]
        if quote not in "'\"" or not inner.endswith(mark):
            return failed__retval__runtime  # not released here: ack as usual
        self._released = True
        return failed, inner[: -len(mark)] + quote, runtime

    def acknowledge(self) -> None:
        if self._released and not self.acknowledged and ack_released(self._message):
            self.acknowledged = True
            return
        super().acknowledge()

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exc = exc_info.exception
        if isinstance(exc, ExceptionWithTraceback):
            exc = exc.exc
        cancelled = self._already_cancelled or self._already_revoked
        lost = isinstance(exc, WorkerLostError) or (
            isinstance(exc, (SystemExit, KeyboardInterrupt)) and not cancelled
        )
        pid = self.worker_pid
        released = getattr(exc, "released", "") if isinstance(exc, AttemptFailed) else ""
        if released and released == str(self._message.delivery_tag):
            self._released = True
        try:
            return super().on_failure(
                exc_info, send_failed_event=send_failed_event, return_ok=return_ok
            )
        finally:
            if isinstance(exc, AttemptRevoked):
                self.send_event("task-revoked", terminated=False, signum=None, expired=exc.expired)
            if lost:
                if _child_lost is not None:
                    _child_lost(self.id, int(pid) if pid else None, str(exc))
                self._announce_verdict(str(exc))

    def _task_events_on(self) -> bool:
        eventer = self._eventer
        if not (eventer and eventer.enabled and self.task.send_events):
            return False
        return not eventer.groups or "task" in eventer.groups

    def _announce_verdict(self, why: str) -> None:
        """Send the event that gives the attempt its state in Flower, as the ledger says."""
        if not self._task_events_on():
            return
        try:
            job_id, attempt = split_attempt_id(self.id)
        except ValueError:
            return  # not an attempt id
        try:
            verdict = read_verdict(current_runtime().ledger, job_id, attempt)
        except (RedisError, RuntimeError) as exc:
            log.warning("attempt.verdict_unknown", attempt=self.id, error=str(exc))
            return
        if verdict.state == states.SUCCESS:
            self.send_event("task-succeeded", result=verdict.detail, runtime=None)
        elif verdict.state == states.FAILURE:
            failed = repr(AttemptFailed(verdict.detail))  # as if the task had raised it
            self.send_event("task-failed", exception=failed, traceback=why)
        elif verdict.state == states.REVOKED:
            self.send_event("task-revoked", terminated=True, signum=why, expired=verdict.expired)
        elif verdict.state == states.RETRY:
            self.send_event("task-retried", exception=verdict.detail, traceback=why)


def _reading_release(on_success: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(on_success)
    def reading_release(self: AttemptRequest, failed__retval__runtime: Any, **kwargs: Any) -> Any:
        return on_success(self, self.note_release(failed__retval__runtime), **kwargs)

    return reading_release


def register_task(app: Celery) -> Task:
    task: Task = app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        ignore_result=True,
        Request=AttemptRequest,
        # Expected ends of an attempt: Celery logs them in one line, without a traceback.
        throws=(AttemptFailed,),
    )(run_attempt)
    return task
