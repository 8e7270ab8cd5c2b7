"""The producer client: ``GridQueue.submit()`` and the job handle it returns.

``submit()`` validates everything before it writes anything, then writes the job in one
ledger step. On the ledger's own Redis as the broker (the default) that step publishes
attempt 1's message too: one round trip, and a job that is written has its message out.
On another broker the step writes a dispatch promise and ``submit()`` then publishes
attempt 1; if the process dies between the two, the watchdog publishes once the dispatch
grace has passed. Either way ``submit()`` raises or returns a job that is in the ledger
and will run.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery import Celery

from gridqueue.celeryapp import celery_for
from gridqueue.dispatch import Dispatcher
from gridqueue.errors import (
    InvalidJobError,
    JobCancelled,
    JobDeadLettered,
    JobEndedError,
    JobExpired,
    JobFailed,
    JobNotFoundError,
    JobTimeoutError,
    PayloadNotJSONError,
    PayloadTooLargeError,
    UnknownWorkloadError,
)
from gridqueue.handlers import check_model_name
from gridqueue.keys import attempt_id
from gridqueue.ledger import Ledger, connect_redis, dumps, retry_redis
from gridqueue.logs import get_logger
from gridqueue.records import Ending, JobRecord
from gridqueue.settings import Settings
from gridqueue.states import TERMINAL_STATES, JobState

_log = get_logger("gridqueue.client")

# How long one blocking read of a stream waits before the reader looks at the job's state
# (a job that never streams has no end marker to wake it).
STREAM_SLICE_MS = 500


def stream_slice_ms(
    job_id: str, give_up_at: float | None, timeout: float | None, position: int
) -> int:
    """How long the next blocking stream read may wait (sync and async readers alike);
    JobTimeoutError once ``give_up_at`` (monotonic) has passed."""
    if give_up_at is None:
        return STREAM_SLICE_MS
    remaining = give_up_at - time.monotonic()
    if remaining <= 0:
        raise JobTimeoutError(
            f"job {job_id} has not ended after {timeout} s ({position} chunks read); it is "
            "tracked, call stream() or result() again"
        )
    return max(1, min(STREAM_SLICE_MS, int(remaining * 1000)))


_ENDED_ERRORS: dict[JobState, type[JobEndedError]] = {
    JobState.FAILED: JobFailed,
    JobState.EXPIRED: JobExpired,
    JobState.CANCELLED: JobCancelled,
    JobState.DEAD_LETTERED: JobDeadLettered,
}


@dataclass(frozen=True)
class SubmitRequest:
    """A validated submission: the ledger's submit arguments, the job id chosen before
    the first try (a retry writes it once)."""

    job_id: str
    model: str
    workload: str
    body: str
    deadline_in_ms: int
    idempotency_key: str | None
    wait_for_capacity: bool

    @property
    def args(self) -> tuple[str, str, str, str, int, str | None, bool]:
        return (
            self.job_id,
            self.model,
            self.workload,
            self.body,
            self.deadline_in_ms,
            self.idempotency_key,
            self.wait_for_capacity,
        )


def prepare_submit(
    ledger: Ledger,
    model: str,
    payload: Any,
    workload: str,
    deadline_s: float | None,
    idempotency_key: str | None,
) -> SubmitRequest:
    """Validate a submission before anything is written (shared by the sync and async
    clients); raises an InvalidJobError that says what to fix."""
    check_model_name(model)
    workload_class = ledger.workloads.get(workload)
    if workload_class is None:
        known = ", ".join(sorted(ledger.workloads))
        raise UnknownWorkloadError(
            f"unknown workload class {workload!r}; known classes: {known} "
            "(defined in config/workloads.toml)"
        )
    try:
        body = dumps(payload)
    except (TypeError, ValueError) as exc:
        raise PayloadNotJSONError(
            f"payload is not JSON-serialisable ({exc}); send dicts, lists, str, "
            "numbers, bools or None"
        ) from exc
    size = len(body.encode())
    limit = ledger.settings.payload_max_bytes
    if size > limit:
        raise PayloadTooLargeError(
            f"payload is {size} bytes, over the limit of {limit}"
            " (GRIDQUEUE_PAYLOAD_MAX_BYTES); send a reference to the data instead"
        )
    if deadline_s is None:
        deadline_s = workload_class.default_deadline_s
    elif not math.isfinite(deadline_s) or deadline_s <= 0:
        raise InvalidJobError(
            f"deadline_s must be > 0 (or None for the class default), got {deadline_s}"
        )
    if idempotency_key is not None and not idempotency_key.strip():
        raise InvalidJobError("idempotency_key must be a non-empty string (or None)")
    return SubmitRequest(
        uuid.uuid4().hex,
        model,
        workload,
        body,
        int(deadline_s * 1000) if deadline_s else 0,
        idempotency_key,
        workload_class.wait_for_capacity,
    )


def outcome_of(record: JobRecord | Ending) -> Any:
    """The result of an ended job, or the Job* error it ended with."""
    if record.state is JobState.SUCCEEDED:
        return record.result
    error = _ENDED_ERRORS[record.state]
    raise error(record.id, record.state.value, record.reason, record.error)


class Job:
    """A handle on one submitted job."""

    def __init__(self, client: GridQueue, job_id: str, created: bool = True) -> None:
        self._client = client
        self.id = job_id
        self.created = created

    def status(self) -> JobState:
        return self._client.get(self.id).state

    def record(self) -> JobRecord:
        return self._client.get(self.id)

    def result(self, timeout: float | None = 60.0) -> Any:
        """The job's one visible result. Raises JobFailed, JobExpired, JobCancelled,
        JobDeadLettered if it ended otherwise, JobTimeoutError if it is still running."""
        return outcome_of(self._client.ledger.wait_ending(self.id, timeout))

    def stream(self, timeout: float | None = 60.0) -> Iterator[Any]:
        """Yield the job's output chunks (``ctx.emit()``) in order, each once, as they
        arrive, across failovers; stop when the job ends. Raises what ``result()``
        raises if it ended otherwise than SUCCEEDED, JobNotFoundError for an unknown job,
        JobTimeoutError if it has not ended within ``timeout`` seconds (read again with
        ``stream()``: it starts over from the first chunk)."""
        ledger = self._client.ledger
        give_up_at = None if timeout is None else time.monotonic() + timeout
        if retry_redis(ledger.state_of)(self.id) is None:
            raise JobNotFoundError(f"no job {self.id} in the ledger")
        position = 0
        while True:
            block_ms = stream_slice_ms(self.id, give_up_at, timeout, position)
            read = retry_redis(ledger.read_stream)(self.id, position, block_ms)
            yield from read.chunks
            position = read.next_position
            if read.ended is not None:
                self.result(timeout=0)  # raises the Job* error of an unsuccessful end
                return
            if not read.chunks:
                # A job that never streamed has no end marker: its state says it ended.
                # One that did is read to its marker (written in the step that ended it).
                state = retry_redis(ledger.state_of)(self.id)
                if state is None or state in TERMINAL_STATES:
                    tail = retry_redis(ledger.read_stream)(self.id, position)
                    yield from tail.chunks
                    position = tail.next_position
                    if tail.ended is None and tail.chunks:
                        continue
                    self.result(timeout=0)
                    return

    def cancel(self) -> bool:
        """Cancel the job; False if it had already ended. A running attempt is killed."""
        return self._client.ledger.cancel(self.id)

    def __repr__(self) -> str:
        return f"Job({self.id!r})"


class GridQueue:
    """Submit inference jobs and follow them to their one terminal state."""

    def __init__(self, redis_url: str | None = None, settings: Settings | None = None) -> None:
        if settings is None:
            settings = Settings() if redis_url is None else Settings(redis_url=redis_url)
        elif redis_url is not None:
            settings = settings.model_copy(update={"redis_url": redis_url})
        self.settings = settings
        self.ledger = Ledger(connect_redis(settings.redis_target), settings)
        self._app: Celery | None = None
        self._dispatcher: Dispatcher | None = None

    @classmethod
    def from_env(cls) -> GridQueue:
        """Build from ``GRIDQUEUE_*`` environment variables."""
        return cls(settings=Settings())

    @property
    def app(self) -> Celery:
        if self._app is None:
            self._app = celery_for(self.settings)
        return self._app

    @property
    def dispatcher(self) -> Dispatcher:
        # Made once per ledger, not per submit: it resolves the broker's settings.
        if self._dispatcher is None or self._dispatcher.ledger is not self.ledger:
            self._dispatcher = Dispatcher(self.ledger, self.app)
        return self._dispatcher

    def submit(
        self,
        model: str,
        payload: Any,
        workload: str = "realtime",
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> Job:
        """Accept a job. Raises an InvalidJobError before writing anything if the input
        is wrong; otherwise the job is in the ledger and will reach a terminal state."""
        request = prepare_submit(self.ledger, model, payload, workload, deadline_s, idempotency_key)
        message = self.dispatcher.render(attempt_id(request.job_id, 1), model, workload)
        submitted = retry_redis(self.ledger.submit)(*request.args, message)
        if submitted.created and submitted.dispatch_lease:
            # The job is in the ledger: from here on submit() returns its handle, whatever
            # the publish does. Raising now would tell the caller that a job that exists,
            # and will run, did not; a retry without an idempotency key would run it twice.
            # The dispatch entry covers a publish that fails: the watchdog sends it.
            try:
                self.dispatcher.publish_own(
                    attempt_id(request.job_id, 1),
                    request.model,
                    request.workload,
                    submitted.dispatch_lease,
                )
            except Exception as exc:  # redis and kombu errors alike
                _log.warning("submit.publish_deferred", job=request.job_id, error=repr(exc))
        return Job(self, submitted.job_id, submitted.created)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job."""
        self.ledger.get(job_id)
        return Job(self, job_id, created=False)

    def get(self, job_id: str) -> JobRecord:
        """The full record: state, attempts (worker, pid, start, end, outcome), error."""
        return self.ledger.get(job_id)

    def dead_letters(self, count: int = 100) -> list[JobRecord]:
        """Dead-lettered (poison) jobs, newest first, with their attempt evidence."""
        return self.ledger.dead_letters(count)

    def replay(self, job_id: str, by: str = "client") -> Job:
        """Run a dead-lettered job again, as a fresh attempt chain (recorded as a replay)."""
        attempt = self.ledger.replay(job_id, by)
        self.dispatcher.publish(attempt_id(job_id, attempt))
        return Job(self, job_id, created=False)

    def status(self) -> dict[str, Any]:
        """Fleet and job overview, as ``gridqueue status`` shows it."""
        now_ms = self.ledger.time_ms()
        workers = []
        for worker in self.ledger.workers():
            age = None if worker.last_heartbeat_ms is None else now_ms - worker.last_heartbeat_ms
            health = worker.health or {}
            workers.append(
                {
                    "name": worker.name,
                    "state": worker.state.value,
                    "verdict": worker.verdict,
                    "reasons": health.get("reasons", []),
                    "probe": worker.probe,
                    "models": worker.models,
                    "host": worker.host,
                    "pid": worker.pid,
                    "epoch": worker.epoch,
                    "heartbeat_age_ms": age,
                    "running": worker.running,
                    "gpus": health.get("gpus", worker.gpus),
                    "quarantined_by": worker.quarantined_by,
                    "quarantine_reason": worker.quarantine_reason,
                    "quarantine_mode": worker.quarantine_mode,
                    "probation_until_ms": worker.probation_until_ms,
                    "failures": worker.failures,
                }
            )
        stats = self.ledger.stats()
        first = stats.get("first_placements", 0)
        bad = stats.get("bad_first_placements", 0)
        return {
            "now_ms": now_ms,
            "workers": workers,
            "jobs": self.ledger.counts(),
            "stats": stats,
            "placements": {"first": first, "bad": bad, "bad_rate": bad / first if first else 0.0},
        }

    def close(self) -> None:
        self.ledger.client.close()
        if self._app is not None:
            self._app.close()


def payload_from_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PayloadNotJSONError(f"--payload is not valid JSON: {exc}") from exc
