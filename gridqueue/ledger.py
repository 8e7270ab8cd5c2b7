"""The ledger: gridqueue's store of record in Redis, and the only owner of the job state
machine.

Every transition is one atomic Lua script (``gridqueue/lua/*.lua``) that compares and sets
on ``(job, attempt)``: a write from a superseded attempt, a fenced worker or a deposed
watchdog is refused there, not in the callers. The ledger's verbs are ``submit``,
``claim``, ``progress``, ``complete``, ``end_attempt`` (fail or requeue, as the policy
decides), ``expire`` and ``cancel``, plus the worker liveness verbs ``register``,
``heartbeat``, ``unregister`` and ``declare_dead``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar, cast

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from gridqueue.brokers.rendering import RenderedMessage
from gridqueue.celeryapp import PRIORITY_STEPS, QUEUE_SEP
from gridqueue.connection import RedisTarget
from gridqueue.errors import (
    CheckpointNotJSONError,
    CheckpointTooLargeError,
    ChunkNotJSONError,
    ChunkTooLargeError,
    DoesNotFitError,
    InvalidJobError,
    JobNotFoundError,
    JobTimeoutError,
    NoCapacityError,
    ReplicationTimeoutError,
    StreamFullError,
    StreamGapError,
    WorkerNameInUseError,
    WorkerNotFoundError,
)
from gridqueue.keys import Keys, attempt_id, queue_for_model, split_attempt_id
from gridqueue.logs import get_logger
from gridqueue.lua import fixed_count
from gridqueue.lua.runner import ScriptRunner
from gridqueue.policies import EndedAttempt, GiveUp, Retry, decide, node_failures
from gridqueue.records import ENDING_FIELDS, Ending, JobRecord, WorkerRecord
from gridqueue.settings import Settings
from gridqueue.states import JobState, Outcome
from gridqueue.workloads import WorkloadClass, load_workloads

_log = get_logger("gridqueue.ledger")

_SCRIPTS = (
    "submit",
    "claim",
    "progress",
    "complete",
    "finish",
    "expire",
    "cancel",
    "register",
    "heartbeat",
    "unregister",
    "declare_dead",
    "begin_dispatch",
    "end_dispatch",
    "scan",
    "lease",
    "resign",
    "apply_health",
    "end_probation",
    "quarantine_worker",
    "release",
    "beat",
    "stall",
    "replay",
    "redeliver",
    "sweep_deliveries",
    "forget",
    "find_lost_messages",
    "emit",
    "checkpoint",
    "fold",
)

# Events one stats fold adds at most: about 5 µs of Redis time each, so a batch holds
# Redis for about 2.5 ms.
FOLD_BATCH = 500


# Durable mode (GRIDQUEUE_REDIS_MIN_REPLICAS > 0) waits for replicas after these: the
# verdicts that end or restart a job. Submit waits too, and raises when unconfirmed.
_REPLICATED = frozenset({"complete", "finish", "cancel", "expire", "replay"})


# A Redis blip (a restart, a failover, a dropped connection) must not lose a submit, a
# claim or a result: callers retry for a while with jittered exponential backoff. Every
# verb is safe to retry: each is a compare-and-set on (job, attempt), or keyed by an id
# chosen before the first try.
_retrying = retry(
    retry=retry_if_exception_type((RedisConnectionError, RedisTimeoutError)),
    wait=wait_exponential_jitter(multiplier=0.05, max=2.0, jitter=0.1),
    stop=stop_after_delay(30),
    before_sleep=lambda state: _log.warning(
        "redis.retrying",
        call=getattr(state.fn, "__name__", "?"),
        attempt=state.attempt_number,
        error=repr(state.outcome.exception()) if state.outcome else "",
    ),
    reraise=True,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")


def retry_redis(fn: Callable[_P, _T]) -> Callable[_P, _T]:
    """``fn``, retried through Redis blips as above. The first try is a plain call:
    tenacity's retry costs about 25 µs of Python a call to set up, twice per job in a
    pool child and more in a producer, and nearly every call succeeds at once."""

    def first_try(*args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError):
            return _retrying(fn)(*args, **kwargs)

    return first_try


def connect_redis(target: str | RedisTarget) -> redis.Redis:
    """A client for the ledger: str replies, bounded socket waits, retries on blips. A
    Sentinel target follows the primary: each new connection asks the Sentinels."""
    if isinstance(target, str):
        target = RedisTarget(target)
    return target.client(
        decode_responses=True,
        socket_timeout=5.0,
        socket_connect_timeout=5.0,
        health_check_interval=10,
    )


@dataclass(frozen=True)
class Submitted:
    job_id: str
    created: bool
    # The producer's lease on attempt 1's publish; '' when submit published it itself.
    dispatch_lease: str = ""


@dataclass(frozen=True)
class Claim:
    status: str  # ok | fenced | stale | duplicate | avoid | not_served | unknown
    payload: str | None = None
    model: str | None = None
    workload: str | None = None
    detail: str | None = None
    checkpoint: str | None = None  # the job's last resume state (JSON), if any
    checkpoint_position: int | None = None  # the stream position it was taken at


@dataclass(frozen=True)
class StreamRead:
    """What a read of a job's output stream found: chunks from ``position`` on (decoded
    JSON), and the job's end state if the end marker was among them."""

    position: int  # the position of chunks[0]
    chunks: list[Any]
    ended: str | None = None

    @property
    def next_position(self) -> int:
        return self.position + len(self.chunks)


def stream_after(position: int) -> str:
    """The stream id to read after, to get chunk ``position`` on (chunk i is ``0-(i+1)``)."""
    return f"0-{position}"


def parse_stream(position: int, entries: list[tuple[str, dict[str, str]]]) -> StreamRead:
    """Decode stream entries read from ``position`` on. Shared by the sync and async
    readers; the ids are checked, so a reader never skips or repeats a chunk silently."""
    chunks: list[Any] = []
    for entry_id, fields in entries:
        expected = f"0-{position + len(chunks) + 1}"
        if entry_id != expected:
            raise StreamGapError(
                f"stream entry {entry_id} where {expected} was expected; report this as a bug"
            )
        if "end" in fields:
            return StreamRead(position, chunks, fields["end"])
        chunks.append(json.loads(fields["c"]))
    return StreamRead(position, chunks)


@dataclass(frozen=True)
class Heartbeat:
    fenced: bool
    kill: list[str]
    state: str | None = None


@dataclass(frozen=True)
class AttemptEnd:
    status: str  # retry | ended | stale | not_leader
    next_attempt: int | None = None
    state: str | None = None
    after_s: float = 0.0
    # The broker delivery tag the end took out of kombu's unacked, in the same step; ''
    # if none, or if a durable write was not confirmed by its replicas.
    released: str = ""


@dataclass(frozen=True)
class Completion:
    """What :meth:`Ledger.complete_attempt` did."""

    ok: bool  # the result is the job's (written now, or by an earlier call of ours)
    # The broker delivery tag the completion took out of kombu's unacked, in the same
    # step; '' if none, or if a durable write was not confirmed by its replicas.
    released: str = ""


@dataclass(frozen=True)
class _EndPlan:
    """A decision to end an attempt, as the ``finish`` script's arguments."""

    args: tuple[str | int, ...]
    after_s: float

    def reply(self, reply: Any, replicated: bool = True) -> AttemptEnd:
        released = str(reply[2] or "") if replicated and len(reply) > 2 else ""
        if reply[0] == "retry":
            return AttemptEnd(
                "retry", next_attempt=int(reply[1]), after_s=self.after_s, released=released
            )
        if reply[0] == "ended":
            return AttemptEnd("ended", state=reply[1], released=released)
        return AttemptEnd(reply[0])


@dataclass(frozen=True)
class Scan:
    now_ms: int
    stale_workers: list[str]
    expired_jobs: list[str]
    due_dispatches: list[str]
    lost: dict[str, str]
    health_changes: list[str]
    probation_due: list[str]
    liveness_lapsed: list[str]
    progress_lapsed: list[str]
    # Late workers whose presence subscription has closed: their process is likely gone.
    unreachable_workers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class DispatchLease:
    member: str
    model: str
    workload: str
    lease: str


class Ledger:
    """Verbs on the job store; see the module docstring."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        workloads: Mapping[str, WorkloadClass] | None = None,
    ) -> None:
        self.client = client
        self.settings = settings
        self.keys = Keys(settings.namespace)
        self.workloads = dict(workloads or load_workloads(settings.workloads_file))
        self.scripts = ScriptRunner(client, _SCRIPTS, settings.ledger_scripts)
        self._fixed = (
            settings.namespace,
            settings.events_max_len,
            settings.job_retention_s,
            int(settings.probation_base_s * 1000),
            int(settings.probation_cap_s * 1000),
            int(settings.probation_window_s * 1000),
        )

    @classmethod
    def connect(cls, settings: Settings) -> Ledger:
        return cls(connect_redis(settings.redis_target), settings)

    def _call(self, name: str, *args: str | int | float) -> Any:
        reply, _ = self._call_confirmed(name, *args)
        return reply

    def _call_confirmed(self, name: str, *args: str | int | float) -> tuple[Any, bool]:
        """:meth:`_call`, and whether the write is as durable as the settings ask."""
        if self.settings.redis_min_replicas and name in _REPLICATED:
            return self._call_replicated(name, *args)
        return self._call_plain(name, *args)

    def argv(self, name: str, *args: str | int | float) -> list[str | int | float]:
        """Script ``name``'s whole ARGV: the fixed arguments it takes (all six, or the
        heartbeat's two; see ``gridqueue/lua/__init__.py``), then ``args``."""
        return [*self._fixed[: fixed_count(name)], *args]

    def _call_replicated(self, name: str, *args: str | int | float) -> tuple[Any, bool]:
        """Durable mode: the script, then WAIT for GRIDQUEUE_REDIS_MIN_REPLICAS replicas,
        in one round trip. Returns the reply and whether enough replicas confirmed it.

        A verdict that no replica confirmed in time is logged, not raised: it is on the
        primary, and the worker cannot take it back; the producer's submit() raises
        instead (see :meth:`submit`), so an acknowledged job is a replicated one.
        """
        need = self.settings.redis_min_replicas
        timeout_ms = int(self.settings.redis_replica_timeout_s * 1000)
        pipe = self.client.pipeline(transaction=False)
        self.queue_call(pipe, name, *args)
        pipe.wait(need, timeout_ms)
        reply, confirmed = self.execute(pipe)
        replicated = int(confirmed) >= need
        if not replicated and name != "submit":
            _log.error(
                "ledger.write_not_replicated", call=name, replicas=int(confirmed), needed=need,
                timeout_s=self.settings.redis_replica_timeout_s,
            )  # fmt: skip
        return reply, replicated

    def queue_call(self, pipe: Any, name: str, *args: str | int | float) -> None:
        """Queue one script call on a pipeline (``client.pipeline()``), for bulk loads such
        as the benchmarks' fills: the raw reply comes back from :meth:`execute`, with none
        of the verb's checks. Arguments as the script takes them."""
        self.scripts.queue(pipe, name, self.argv(name, *args))

    def execute(self, pipe: Any, raise_on_error: bool = True) -> list[Any]:
        """``pipe.execute()`` for a pipeline with script calls (:meth:`queue_call`): a call
        that found the scripts gone from Redis (a restart, a failover) is sent again."""
        return self.scripts.execute(pipe, raise_on_error)

    # -- jobs ------------------------------------------------------------------------

    def submit(
        self,
        job_id: str,
        model: str,
        workload: str,
        payload_json: str,
        deadline_in_ms: int,
        idempotency_key: str | None,
        wait_for_capacity: bool = True,
        message: RenderedMessage | None = None,
    ) -> Submitted:
        """Write a job and its dispatch promise, leased to this producer for the grace;
        or, given attempt 1's ``message`` (the broker is this Redis), write the job and
        publish the message in the same step, with no promise left to keep.

        Raises DoesNotFitError if no registered GPU can hold the model, and (unless
        ``wait_for_capacity``) NoCapacityError if no live, unquarantined worker serves it.
        """
        call = self._call_replicated if self.settings.redis_min_replicas else self._call_plain
        reply, replicated = call(
            "submit",
            *self.submit_args(
                job_id,
                model,
                workload,
                payload_json,
                deadline_in_ms,
                idempotency_key,
                wait_for_capacity,
                message,
            ),
        )
        submitted = submitted_from_reply(model, reply)
        if not replicated:
            raise self.unreplicated_submit(submitted.job_id)
        return submitted

    def unreplicated_submit(self, job_id: str) -> ReplicationTimeoutError:
        """The error of a durable submit that no replica confirmed in time."""
        return ReplicationTimeoutError(
            f"job {job_id} is written on the Redis primary, but fewer than "
            f"{self.settings.redis_min_replicas} replica(s) confirmed it within "
            f"{self.settings.redis_replica_timeout_s:g} s, so a failover now could lose "
            "it: it will run unless that happens. Check the replicas (INFO "
            "replication); submit again with the same idempotency_key to get its "
            "handle, or follow it with gq.job(job_id).",
            job_id=job_id,
        )

    def submit_args(
        self,
        job_id: str,
        model: str,
        workload: str,
        payload_json: str,
        deadline_in_ms: int,
        idempotency_key: str | None,
        wait_for_capacity: bool = True,
        message: RenderedMessage | None = None,
    ) -> tuple[str | int, ...]:
        """The submit script's own arguments (shared with the asyncio client)."""
        return (
            job_id,
            model,
            workload,
            payload_json,
            deadline_in_ms,
            idempotency_key or "",
            self.settings.job_retention_s,
            int(self.settings.dispatch_grace_s * 1000),
            "1" if wait_for_capacity else "0",
            *self._watch_ms(workload),
            *(message.args if message else ()),
        )

    @property
    def fixed_args(self) -> tuple[str | int, ...]:
        """The arguments every script takes first (see ``_common.lua``)."""
        return self._fixed

    def _call_plain(self, name: str, *args: str | int | float) -> tuple[Any, bool]:
        return self.scripts.call(name, self.argv(name, *args)), True

    def _watch_ms(self, workload: str) -> tuple[int, int]:
        """The liveness and stall timeouts a claim registers for jobs of this class."""
        found = self.workloads.get(workload)
        liveness_s = found.liveness_timeout_s if found else 5.0
        stall_s = found.stall_timeout_s if found else 300.0
        return int(liveness_s * 1000), int(stall_s * 1000)

    def claim(self, job_id: str, attempt: int, worker: str, pid: int, delivery_tag: str) -> Claim:
        """Start attempt ``attempt`` on this worker, and put it under a liveness and stall
        watch in the same step."""
        reply = self._call(
            "claim",
            job_id,
            attempt,
            worker,
            pid,
            delivery_tag,
            int(self.settings.stale_after_s * 1000),
        )
        if reply[0] == "ok":
            checkpoint = reply[4] if len(reply) > 4 and reply[4] else None
            position = int(reply[5]) if len(reply) > 5 and reply[5] else None
            return Claim(
                "ok",
                payload=reply[1],
                model=reply[2],
                workload=reply[3],
                checkpoint=checkpoint,
                checkpoint_position=position,
            )
        return Claim(reply[0], detail=reply[1] if len(reply) > 1 else None)

    def progress(
        self, job_id: str, attempt: int, worker: str, info: str = "", stall_ms: int = 60_000
    ) -> bool:
        """Move the attempt's progress mark; False once the attempt is superseded."""
        return bool(self._call("progress", job_id, attempt, worker, info, stall_ms))

    # -- output streams ----------------------------------------------------------------

    def emit(
        self, job_id: str, attempt: int, worker: str, seq: int, chunk: Any, stall_ms: int = 60_000
    ) -> bool:
        """Append chunk ``seq`` of the attempt to the job's stream (see ``emit.lua``).

        True if the stream has it now (appended, or already there: a repeat is dropped
        and counted); False if the attempt is superseded (refused and counted). Raises
        ChunkNotJSONError or ChunkTooLargeError before writing anything, StreamFullError
        at the stream's bound, StreamGapError if ``seq`` is past the stream's end. Safe to
        retry: a retried append of a chunk that landed is a repeat.
        """
        try:
            body = dumps(chunk)
        except (TypeError, ValueError) as exc:
            raise ChunkNotJSONError(
                f"ctx.emit() got a chunk that is not JSON ({exc}); emit dicts, lists, str, "
                "numbers, bools or None"
            ) from exc
        size = len(body.encode())
        if size > self.settings.stream_chunk_max_bytes:
            raise ChunkTooLargeError(
                f"chunk is {size} bytes, over the limit of {self.settings.stream_chunk_max_bytes}"
                " (GRIDQUEUE_STREAM_CHUNK_MAX_BYTES); emit smaller pieces"
            )
        reply = self._call(
            "emit",
            job_id,
            attempt,
            worker,
            seq,
            body,
            self.settings.stream_max_chunks,
            self.settings.stream_max_bytes,
            stall_ms,
        )
        if reply[0] in ("ok", "repeat"):
            return True
        if reply[0] == "full":
            raise StreamFullError(
                f"job {job_id}'s stream holds {reply[1]} chunks and is at its bound "
                f"({self.settings.stream_max_chunks} chunks, "
                f"{self.settings.stream_max_bytes} bytes: GRIDQUEUE_STREAM_MAX_CHUNKS, "
                "GRIDQUEUE_STREAM_MAX_BYTES); emit fewer, larger chunks or raise the bound"
            )
        if reply[0] == "gap":
            raise StreamGapError(
                f"chunk {seq} would leave a gap: job {job_id}'s stream has {reply[1]} chunks; "
                "ctx.seek() only to ctx.resume.position"
            )
        return False

    def checkpoint(self, job_id: str, attempt: int, worker: str, position: int, state: Any) -> bool:
        """Store the job's resume state, taken at stream ``position``. False if the attempt
        is superseded. Raises CheckpointNotJSONError or CheckpointTooLargeError before
        writing anything."""
        try:
            body = dumps(state)
        except (TypeError, ValueError) as exc:
            raise CheckpointNotJSONError(
                f"ctx.checkpoint() got a state that is not JSON ({exc}); store dicts, lists, "
                "str, numbers, bools or None"
            ) from exc
        size = len(body.encode())
        if size > self.settings.checkpoint_max_bytes:
            raise CheckpointTooLargeError(
                f"resume state is {size} bytes, over the limit of "
                f"{self.settings.checkpoint_max_bytes} (GRIDQUEUE_CHECKPOINT_MAX_BYTES); "
                "store a reference to it instead"
            )
        reply = self._call("checkpoint", job_id, attempt, worker, position, body)
        if reply[0] == "ahead":
            raise StreamGapError(
                f"checkpoint at position {position} is past the end of job {job_id}'s stream "
                f"({reply[1]} chunks); checkpoint after the chunks it covers are emitted"
            )
        return bool(reply[0] == "ok")

    def read_stream(self, job_id: str, position: int, block_ms: int | None = None) -> StreamRead:
        """Chunks of the job's stream from ``position`` on (at most 1,000), waiting up to
        ``block_ms`` for the first one if there is none yet."""
        key = self.keys.job_stream(job_id)
        reply = self.client.xread({key: stream_after(position)}, count=1000, block=block_ms)
        entries: list[tuple[str, dict[str, str]]] = []
        for _, rows in cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], reply or []):
            entries.extend(rows)
        return parse_stream(position, entries)

    def beat(self, job_id: str, attempt: int, worker: str, liveness_ms: int) -> bool:
        """The running attempt's own liveness beat; False once it is superseded."""
        return bool(self._call("beat", job_id, attempt, worker, liveness_ms))

    def stall(self, member: str, kind: str, token: str) -> tuple[bool, bool]:
        """Declare a lapsed attempt stalled: returns (stalled, its node was quarantined)."""
        reply = self._call(
            "stall",
            member,
            kind,
            token,
            self.settings.stall_quarantine_after,
            int(self.settings.stall_window_s * 1000),
        )
        return reply[0] == "stalled", bool(reply[0] == "stalled" and int(reply[1]))

    def replay(self, job_id: str, by: str = "") -> int:
        """Start a fresh attempt chain for a dead-lettered job; returns its attempt number."""
        record = self.get(job_id)
        workload = self.workloads.get(record.workload)
        deadline_s = workload.default_deadline_s if workload else None
        reply = self._call("replay", job_id, int(deadline_s * 1000) if deadline_s else 0, by)
        if reply[0] == "not_dead_lettered":
            raise InvalidJobError(
                f"job {job_id} is {reply[1]}, not DEAD_LETTERED; only dead letters are replayed"
            )
        if reply[0] == "unknown":
            raise JobNotFoundError(f"no job {job_id} in the ledger")
        return int(reply[1])

    def dead_letters(self, count: int = 100) -> list[JobRecord]:
        ids = cast(list[str], self.client.zrevrange(self.keys.dead_letters, 0, count - 1))
        records = []
        for job_id in ids:
            try:
                records.append(self.get(job_id))
            except JobNotFoundError:  # its record outlived job_retention_s: drop the entry
                self.client.zrem(self.keys.dead_letters, job_id)
        return records

    def complete(self, job_id: str, attempt: int, worker: str, result_json: str) -> bool:
        """Publish the result if the attempt is still current; False if it was discarded."""
        return self.complete_attempt(job_id, attempt, worker, result_json).ok

    def complete_attempt(
        self, job_id: str, attempt: int, worker: str, result_json: str
    ) -> Completion:
        """:meth:`complete`, saying also which broker delivery it released: the worker
        that ran the attempt then acks that delivery without asking Redis again."""
        reply, replicated = self._call_confirmed("complete", job_id, attempt, worker, result_json)
        if reply[0] != "ok":
            return Completion(False)
        released = str(reply[1] or "") if replicated and len(reply) > 1 else ""
        return Completion(True, released)

    def end_attempt(
        self,
        job_id: str,
        attempt: int,
        outcome: Outcome,
        error: str = "",
        worker: str = "",
        token: str = "",
        pid: int | None = None,
        epoch: int | None = None,
    ) -> AttemptEnd:
        """End running attempt ``attempt`` without a result; requeue or fail per policy.

        The decision is made here from a read of the record and committed by a script
        that compares and sets on (job, attempt), so a stale decision is refused. A
        worker's report names the process that ran it (``pid``, ``epoch``): another
        child of the same node, or another incarnation, cannot end it.
        """
        try:
            record: JobRecord | None = self.get(job_id)
        except JobNotFoundError:
            record = None
        if worker and record is not None and record.attempts[-1].worker == worker:
            # The watchdog may already have judged this attempt (stalled, evacuated, a GPU
            # fault) and ordered its child killed: the worker then reports the kill, but
            # the verdict is the cause, and the one the policy and the history must see.
            verdict = self.client.hget(self.keys.lost, attempt_id(job_id, attempt))
            if verdict:
                outcome = Outcome(str(verdict))
        now_ms = self.time_ms() if record is not None and record.deadline_ms is not None else 0
        plan = self._plan_end(
            job_id, attempt, record, outcome, error, worker, token, pid, epoch, now_ms
        )
        if isinstance(plan, AttemptEnd):
            self.client.hdel(self.keys.lost, attempt_id(job_id, attempt))
            return plan
        return plan.reply(*self._call_confirmed("finish", *plan.args))

    def end_lost_attempts(
        self, lost: list[tuple[str, int, Outcome, str]], token: str
    ) -> list[AttemptEnd]:
        """The watchdog's :meth:`end_attempt` for many attempts at once (a node's, a
        rack's): ``(job, attempt, outcome, error)`` each. The records are read in one round
        trip and the verdicts committed in another; each verdict is still its own
        compare-and-set script, so a stale one is refused as it would be alone."""
        pipe = self.client.pipeline(transaction=False)
        for job_id, _, _, _ in lost:
            pipe.hgetall(self.keys.job(job_id))
        pipe.time()
        *raws, (seconds, micros) = pipe.execute()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        plans: list[AttemptEnd | _EndPlan] = []
        for (job_id, attempt, outcome, error), raw in zip(lost, raws, strict=True):
            data = cast(dict[str, str], raw)
            record = JobRecord.from_hash(data) if data and "state" in data else None
            plans.append(
                self._plan_end(
                    job_id, attempt, record, outcome, error, "", token, None, None, now_ms
                )
            )
        pipe = self.client.pipeline(transaction=False)
        for (job_id, attempt, _, _), plan in zip(lost, plans, strict=True):
            if isinstance(plan, AttemptEnd):
                pipe.hdel(self.keys.lost, attempt_id(job_id, attempt))
            else:
                self.queue_call(pipe, "finish", *plan.args)
        need = self.settings.redis_min_replicas
        if need:
            pipe.wait(need, int(self.settings.redis_replica_timeout_s * 1000))
        replies = self.execute(pipe)
        replicated = not need or int(replies[-1]) >= need
        if not replicated:
            _log.error(
                "ledger.write_not_replicated", call="finish", replicas=int(replies[-1]),
                needed=need, attempts=len(lost), timeout_s=self.settings.redis_replica_timeout_s,
            )  # fmt: skip
        return [
            plan if isinstance(plan, AttemptEnd) else plan.reply(reply, replicated)
            for plan, reply in zip(plans, replies, strict=False)
        ]

    def _plan_end(
        self,
        job_id: str,
        attempt: int,
        record: JobRecord | None,
        outcome: Outcome,
        error: str,
        worker: str,
        token: str,
        pid: int | None,
        epoch: int | None,
        now_ms: int,
    ) -> AttemptEnd | _EndPlan:
        """The policy's decision for ending ``attempt`` of ``record`` (read beforehand),
        as the arguments of the ``finish`` script; a stale attempt ends here."""
        if record is None or record.state is not JobState.RUNNING or record.attempt != attempt:
            return AttemptEnd("stale")
        # A replay starts a fresh chain: only its attempts count for limits and poison.
        chain = [a for a in record.attempts if a.n >= record.chain_start]
        current = chain[-1]
        history = [EndedAttempt(a.worker, a.outcome) for a in chain[:-1]]
        history.append(EndedAttempt(current.worker, outcome.value))
        remaining_s = None
        if record.deadline_ms is not None:
            remaining_s = (record.deadline_ms - now_ms) / 1000
        workload = self.workloads.get(record.workload)
        decision: Retry | GiveUp
        if workload is None:
            decision = GiveUp("unknown_workload")
        else:
            decision = decide(workload, outcome, len(chain), history, remaining_s)
        if isinstance(decision, Retry):
            args: tuple[str | int, ...] = ("retry", int(decision.after_s * 1000), "", "")
        else:
            args = ("give_up", 0, decision.state.value, decision.reason)
            if decision.reason == "poison":
                evidence = ", ".join(f"{a.worker}: {a.outcome}" for a in history if a.worker)
                error = f"poison: it took down {len(node_failures(history))} workers ({evidence})"
            elif decision.reason == Outcome.WORKER_LOST.value:
                # Non-idempotent work lost with its process: it may have had effects.
                error = f"outcome unknown: it may have run partly ({error or outcome.value})"
        return _EndPlan(
            (
                job_id,
                attempt,
                outcome.value,
                error,
                *args,
                worker,
                token,
                "" if pid is None else pid,
                "" if epoch is None else epoch,
            ),
            decision.after_s if isinstance(decision, Retry) else 0.0,
        )

    def redeliver(self, job_id: str, attempt: int) -> bool:
        """Attempt ``attempt`` lost its consumer before it was claimed (a pool child died
        with it): make its publish due now. False if the attempt is no longer the job's
        queued one."""
        return bool(self._call("redeliver", job_id, attempt)[0] == "ok")

    def expire(self, job_id: str, token: str = "") -> bool:
        return bool(self._call("expire", job_id, token)[0] == "ok")

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        reply = self._call("cancel", job_id, reason)
        if reply[0] == "unknown":
            raise JobNotFoundError(f"no job {job_id} in the ledger")
        return bool(reply[0] == "ok")

    def cancel_attempt(self, job_id: str, attempt: int, reason: str, running_ok: bool) -> str:
        """Cancel the job only while ``attempt`` is its current one (and, without
        ``running_ok``, only before that attempt has started), in one step. Answers 'ok',
        'stale' (the job had ended), 'superseded', 'running' or 'unknown'."""
        reply = self._call("cancel", job_id, reason, attempt, "1" if running_ok else "0")
        return str(reply[0])

    def get(self, job_id: str) -> JobRecord:
        data = cast(dict[str, str], self.client.hgetall(self.keys.job(job_id)))
        if not data or "state" not in data:
            raise job_not_found(job_id, self.settings)
        return JobRecord.from_hash(data)

    def state_of(self, job_id: str) -> JobState | None:
        """The job's state, in one cheap read; None if the ledger has no such job."""
        state = self.client.hget(self.keys.job(job_id), "state")
        return JobState(str(state)) if state else None

    def wait(self, job_id: str, timeout_s: float | None) -> JobRecord:
        """Block until the job is terminal; JobTimeoutError after ``timeout_s``."""
        self.wait_ending(job_id, timeout_s)
        return retry_redis(self.get)(job_id)

    def ending(self, job_id: str) -> Ending:
        """The job's state and, if it ended, its result or why not: one light read."""
        values = self.client.hmget(self.keys.job(job_id), ENDING_FIELDS)
        return ending_of(job_id, values, self.settings)

    def wait_ending(self, job_id: str, timeout_s: float | None) -> Ending:
        """Block until the job is terminal, and return how it ended (what ``result()``
        needs); JobTimeoutError after ``timeout_s``."""
        give_up_at = None if timeout_s is None else time.monotonic() + timeout_s
        done_key = self.keys.job_done(job_id)
        while True:
            record = retry_redis(self.ending)(job_id)
            if record.terminal:
                return record
            slice_s = 1.0
            if give_up_at is not None:
                remaining = give_up_at - time.monotonic()
                if remaining <= 0:
                    raise JobTimeoutError(
                        f"job {job_id} is still {record.state.value} after {timeout_s} s; "
                        "it is tracked, call result() again or check gq.get(job_id)"
                    )
                slice_s = min(slice_s, remaining)
            try:
                # Rotate the token in place rather than pop and push it back: the list
                # never empties, so it keeps the TTL end_job gave it, and other waiters
                # still find it.
                timeout = cast(int, max(slice_s, 0.01))  # Redis takes a float; the stub says int
                self.client.blmove(done_key, done_key, timeout, "RIGHT", "LEFT")
            except (RedisConnectionError, RedisTimeoutError):
                time.sleep(min(slice_s, 0.2))  # the next read retries with backoff

    # -- workers ---------------------------------------------------------------------

    def register(
        self,
        name: str,
        models: list[str],
        pid: int,
        host: str,
        concurrency: int,
        info: str,
        probe: str = "none",
        gpus: list[dict[str, Any]] | None = None,
        model_fit: dict[str, dict[str, int]] | None = None,
    ) -> int:
        """Register a new incarnation; returns its epoch (the fence of its heartbeats).

        ``model_fit`` maps each model served to ``{required_bytes, largest_gpu_bytes}``;
        the worker is listed as a consumer of the models that fit. Raises
        WorkerNameInUseError while another process heartbeats under ``name``.
        """
        reply = self._call(
            "register",
            name,
            ",".join(models),
            pid,
            host,
            concurrency,
            info,
            probe,
            json.dumps(gpus or []),
            json.dumps(model_fit or {}),
            int(self.settings.stale_after_s * 1000),
        )
        if reply[0] == "in_use":
            _, other_host, other_pid, age_ms = reply
            raise WorkerNameInUseError(
                f"worker name {name!r} is in use by pid {other_pid} on host {other_host!r}, "
                f"which heartbeated {int(age_ms)} ms ago; give this worker another --name, "
                "or stop the other process first"
            )
        return int(reply[0])

    def heartbeat(
        self,
        name: str,
        epoch: int,
        health: str = "",
        verdict: str = "",
        held: list[str] | None = None,
        present: bool = False,
    ) -> Heartbeat:
        """Beat; ``held`` lists the attempts this worker's processes hold, so that kill
        orders for them are repeated until they are gone. ``present``: the worker's
        presence subscription is up, so its closing may be read as the process's death."""
        reply = self._call(
            "heartbeat", *self.heartbeat_args(name, epoch, health, verdict, held, present)
        )
        if reply[0] == "fenced":
            return Heartbeat(fenced=True, kill=[], state=reply[1])
        return Heartbeat(fenced=False, kill=list(reply[2:]), state=reply[1])

    def heartbeat_args(
        self,
        name: str,
        epoch: int,
        health: str = "",
        verdict: str = "",
        held: Sequence[str] | None = None,
        present: bool = False,
    ) -> list[str | int]:
        """The heartbeat script's own arguments (for :meth:`heartbeat`, and for a load
        generator that packs its own calls), less the empty ones at the end."""
        args: list[str | int] = [name, epoch, int(present), verdict, health, ",".join(held or ())]
        while args[-1] == "":
            args.pop()
        return args

    def apply_health(self, name: str, token: str) -> str:
        """Quarantine, drain or start the probation of a worker, as its verdict says."""
        return str(self._call("apply_health", name, token)[0])

    def apply_health_all(self, names: Sequence[str], token: str) -> list[str | Exception]:
        """:meth:`apply_health` for each worker in turn, in one round trip: every worker
        that registers queues its first verdict, so a fleet that starts (or comes back
        after a Redis restart) queues thousands at once. A script error answers its item
        as an exception; losing Redis raises."""
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            self.queue_call(pipe, "apply_health", name, token)
        replies = self.execute(pipe, raise_on_error=False)
        return [r if isinstance(r, Exception) else str(r[0]) for r in replies]

    def end_probation(self, name: str, token: str) -> bool:
        return bool(self._call("end_probation", name, token))

    def quarantine(self, name: str, by: str, reason: str, drain: bool = False) -> int:
        """An operator's quarantine: returns how many running attempts were moved."""
        mode = "drain" if drain else "evacuate"
        reply = self._call("quarantine_worker", name, by, reason, mode)
        if reply[0] == "unknown":
            raise WorkerNotFoundError(f"no worker {name!r} is registered")
        if reply[0] == "dead":
            raise WorkerNotFoundError(f"worker {name!r} is {reply[1]}, not running")
        return int(reply[1])

    def release(self, name: str, by: str) -> bool:
        reply = self._call("release", name, by)
        if reply[0] == "unknown":
            raise WorkerNotFoundError(f"no worker {name!r} is registered")
        return bool(reply[0] == "ok")

    def unregister(self, name: str, epoch: int) -> bool:
        return bool(self._call("unregister", name, epoch))

    def declare_dead(self, name: str, token: str, signal: str = "heartbeat") -> int | None:
        """Mark a worker DEAD; returns how many attempts it lost, None if alive.

        ``signal`` 'heartbeat': it has been silent for ``stale_after_s``. 'connection': its
        heartbeat is late by one interval and its presence subscription has closed."""
        reply = self._call(
            "declare_dead",
            name,
            int(self.settings.stale_after_s * 1000),
            token,
            signal,
            self.late_ms,
        )
        return int(reply[1]) if reply[0] == "dead" else None

    @property
    def late_ms(self) -> int:
        """How late a heartbeat must be before a closed presence subscription counts as
        the process's death: one heartbeat interval; 0 when the connection signal is off."""
        if not self.settings.connection_signal:
            return 0
        return int(self.settings.heartbeat_interval_s * 1000)

    def worker(self, name: str) -> WorkerRecord | None:
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.worker(name))
        pipe.smembers(self.keys.worker_running(name))
        pipe.zscore(self.keys.workers, name)
        data, running, beat_ms = pipe.execute()
        if not data:
            return None
        return WorkerRecord.from_hash(data, list(running), beat_ms)

    def workers(self) -> list[WorkerRecord]:
        """Every registered worker, read in one round trip after the listing."""
        beats = dict(
            cast(
                list[tuple[str, float]],
                self.client.zrange(self.keys.workers, 0, -1, withscores=True),
            )
        )
        names = set(beats)
        pattern = self.keys.worker("*")
        for key in self.client.scan_iter(match=pattern, count=500):
            if key.count(":") == pattern.count(":"):
                names.add(key.rsplit(":", 1)[1])
        ordered = sorted(names)
        pipe = self.client.pipeline(transaction=False)
        for name in ordered:
            pipe.hgetall(self.keys.worker(name))
            pipe.smembers(self.keys.worker_running(name))
        replies = pipe.execute()
        return [
            WorkerRecord.from_hash(data, list(running), beats.get(name))
            for name, data, running in zip(ordered, replies[::2], replies[1::2], strict=True)
            if data
        ]

    # -- watchdog --------------------------------------------------------------------

    def scan(self, batch: int = 256) -> Scan:
        now, stale, expired, due, lost, health, probation, silent, stuck, unreachable = self._call(
            "scan", int(self.settings.stale_after_s * 1000), batch, self.late_ms
        )
        return Scan(
            now_ms=int(now),
            stale_workers=list(stale),
            expired_jobs=list(expired),
            due_dispatches=list(due),
            lost=dict(zip(lost[::2], lost[1::2], strict=True)),
            health_changes=list(health),
            probation_due=list(probation),
            liveness_lapsed=list(silent),
            progress_lapsed=list(stuck),
            unreachable_workers=list(unreachable),
        )

    def lost_attempts(self, batch: int = 256) -> dict[str, str]:
        """Attempts whose worker is gone, with the outcome to apply: the part of a scan
        that changes when the tick itself declares a worker dead or an attempt stalled."""
        _, found = self.client.hscan(self.keys.lost, 0, count=batch)
        return cast(dict[str, str], found)

    def begin_dispatch(self, member: str, own_lease: str = "") -> DispatchLease | None:
        """Lease a due dispatch (or one whose lease ``own_lease`` is) for publishing."""
        reply = self._call(
            "begin_dispatch", member, int(self.settings.dispatch_grace_s * 1000), own_lease
        )
        if reply[0] != "ok":
            return None
        return DispatchLease(member, reply[1], reply[2], reply[3])

    def end_dispatch(self, lease: DispatchLease, message: RenderedMessage | None = None) -> bool:
        """The attempt is published: list it so, if the lease is still ours. With its
        ``message`` (the broker is this Redis), publish it in the same step, and only
        then. Returns whether the lease was still ours."""
        args = message.args if message else ()
        return bool(self._call("end_dispatch", lease.member, lease.lease, *args))

    def begin_dispatch_many(self, members: list[str]) -> list[DispatchLease | None]:
        """:meth:`begin_dispatch` for many attempts, in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        grace_ms = int(self.settings.dispatch_grace_s * 1000)
        for member in members:
            self.queue_call(pipe, "begin_dispatch", member, grace_ms, "")
        return [
            DispatchLease(member, r[1], r[2], r[3]) if r[0] == "ok" else None
            for member, r in zip(members, self.execute(pipe), strict=True)
        ]

    def end_dispatch_many(
        self, leases: list[DispatchLease], messages: Sequence[RenderedMessage | None] = ()
    ) -> list[bool]:
        """:meth:`end_dispatch` for many leases (each with its message, if given), in one
        round trip."""
        if not leases:
            return []
        pipe = self.client.pipeline(transaction=False)
        for i, lease in enumerate(leases):
            message = messages[i] if messages else None
            args = message.args if message else ()
            self.queue_call(pipe, "end_dispatch", lease.member, lease.lease, *args)
        return [bool(reply) for reply in self.execute(pipe)]

    def sweep_deliveries(self, token: str, batch: int = 256) -> list[str]:
        """Recover deliveries whose consumer died before claiming them (see
        ``sweep_deliveries.lua``); returns the attempts whose dispatch is now due."""
        reply = self._call(
            "sweep_deliveries",
            int(self.settings.dispatch_grace_s * 1000),
            batch,
            queue_for_model(self.settings.namespace, ""),
            token,
        )
        return [str(member) for member in reply[1:]] if reply[0] == "ok" else []

    def find_lost_messages(
        self,
        token: str,
        batch: int = 1000,
        *,
        models: list[str] | None = None,
        published_before_ms: int | None = None,
    ) -> list[str]:
        """Publish again the unclaimed attempts whose message is nowhere any more (see
        ``find_lost_messages.lua``); returns those attempts, due for dispatch now.

        By default it looks at attempts published one dispatch grace ago or earlier, of
        every model; ``models`` and ``published_before_ms`` narrow or widen the look."""
        if published_before_ms is None:
            published_before_ms = self.time_ms() - int(self.settings.dispatch_grace_s * 1000)
        suffixes = ",".join(f"{QUEUE_SEP}{step}" for step in PRIORITY_STEPS if step)
        reply = self._call(
            "find_lost_messages",
            published_before_ms,
            queue_for_model(self.settings.namespace, ""),
            suffixes,
            batch,
            token,
            ",".join(models or ()),
        )
        return [str(member) for member in reply[1:]] if reply[0] == "ok" else []

    def forget(self, token: str, batch: int = 256) -> tuple[int, int]:
        """Delete what has outlived ``job_retention_s`` and has no TTL of its own: workers
        gone that long, and dead-letter entries. Returns (workers, dead letters)."""
        before_ms = self.time_ms() - self.settings.job_retention_s * 1000
        reply = self._call("forget", before_ms, batch, token)
        if reply[0] == "not_leader":
            return 0, 0
        return int(reply[0]), int(reply[1])

    def lease(self, owner: str, lease_ms: int) -> tuple[bool, str]:
        held, value = self._call("lease", owner, lease_ms)
        return bool(held), str(value or "")

    def resign(self, value: str) -> bool:
        return bool(self._call("resign", value))

    # -- reading -----------------------------------------------------------------------

    def time_ms(self) -> int:
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    def counts(self) -> dict[str, int]:
        """Jobs the ledger holds, by state (the sizes of the lists by state)."""
        pipe = self.client.pipeline(transaction=False)
        for state in JobState:
            pipe.zcard(self.keys.jobs_in_state(state.value))
        return {s.value: int(n) for s, n in zip(JobState, pipe.execute(), strict=True)}

    def fold_stats(self, batches: int = 100) -> int:
        """Add the counts the events carry (their tallies) to the counters, the
        per-minute counters and the histograms; returns how many events it folded. The
        leading watchdog folds as events come (beside its ticks); a reader folds first, so that
        it reads exact counts.
        At most ``batches`` rounds of FOLD_BATCH events: a reader waits a bounded time."""
        folded = 0
        for _ in range(batches):
            try:
                count, more, _lost = self._call("fold", FOLD_BATCH)
            except (NoPermissionError, ReadOnlyError) as exc:
                # A reader on a replica, or under an ACL that lets it read only: it reads
                # the counts as the watchdog last folded them (a moment behind).
                _log.debug("ledger.fold_refused", error=str(exc))
                break
            folded += int(count)
            if not int(more):
                break
        return folded

    def stats(self) -> dict[str, int]:
        self.fold_stats()
        raw = cast(dict[str, str], self.client.hgetall(self.keys.stats))
        return {k: int(v) for k, v in sorted(raw.items())}

    def histograms(self) -> dict[str, int]:
        """The ``{ns}:hist`` hash (see gridqueue/keys.py), folded first."""
        self.fold_stats()
        raw = cast(dict[str, str], self.client.hgetall(self.keys.hist))
        return {k: int(v) for k, v in raw.items()}

    def events(self, count: int = 1000, after: str = "-") -> list[dict[str, str]]:
        rows = cast(
            list[tuple[str, dict[str, str]]],
            self.client.xrange(self.keys.events, min=after, max="+", count=count),
        )
        return [{"id": event_id, **event_fields(fields)} for event_id, fields in rows]

    def running_attempts(self) -> list[str]:
        """The attempts running now: the current attempt of each job in RUNNING."""
        jobs = cast(list[str], self.client.zrange(self.keys.jobs_in_state("RUNNING"), 0, -1))
        pipe = self.client.pipeline(transaction=False)
        for job_id in jobs:
            pipe.hget(self.keys.job(job_id), "attempt")
        attempts = pipe.execute()
        return [attempt_id(j, int(n)) for j, n in zip(jobs, attempts, strict=True) if n]


def job_not_found(job_id: str, settings: Settings) -> JobNotFoundError:
    return JobNotFoundError(
        f"no job {job_id} in the ledger (ended jobs are kept {settings.job_retention_s} s)"
    )


def ending_of(job_id: str, values: Any, settings: Settings) -> Ending:
    """How the job stands, from the values of ENDING_FIELDS; JobNotFoundError if absent."""
    ending = Ending.from_fields(cast(list[str | None], values))
    if ending is None:
        raise job_not_found(job_id, settings)
    return ending


def event_fields(fields: Mapping[str, str]) -> dict[str, str]:
    """An event as its readers see it: without its tally, which is the stats fold's
    (see ``bump`` in ``_common.lua``), not part of what happened."""
    return {k: v for k, v in fields.items() if k != "tally"}


def submitted_from_reply(model: str, reply: Any) -> Submitted:
    """Decode the submit script's reply; raise the admission errors it names."""
    if reply[0] == "does_not_fit":
        raise DoesNotFitError(_does_not_fit_message(model, json.loads(reply[1])))
    if reply[0] == "no_capacity":
        raise NoCapacityError(_no_capacity_message(model, json.loads(reply[1])))
    if reply[1] == "created":
        return Submitted(str(reply[0]), True, str(reply[2]))
    return Submitted(str(reply[0]), False)


def parse_attempt(member: str) -> tuple[str, int]:
    return split_attempt_id(member)


def dumps(value: Any) -> str:
    """The one JSON encoding used for payloads and results (no pickle, anywhere)."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


def _gb(value: int) -> str:
    return f"{value / 2**30:.1f} GiB"


def _worker_list(workers: Any) -> str:
    if not workers:  # cjson encodes an empty list as {}
        return "none registered"
    return ", ".join(
        f"{w['name']} ({w['state']}, largest GPU {_gb(int(w['largest_gpu_bytes']))})"
        for w in workers
    )


def _does_not_fit_message(model: str, detail: dict[str, Any]) -> str:
    return (
        f"model {model!r} needs {_gb(int(detail['required_bytes']))} of GPU memory, but the "
        f"largest GPU in the fleet has {_gb(int(detail['largest_gpu_bytes']))}; "
        f"workers serving it: {_worker_list(detail['workers'])}. Add a worker with a bigger "
        "GPU or serve a smaller model."
    )


def _no_capacity_message(model: str, detail: dict[str, Any]) -> str:
    return (
        f"no live, unquarantined worker serves model {model!r} now; workers serving it: "
        f"{_worker_list(detail['workers'])}. Start a worker with --models {model}, release a "
        "quarantined one, or submit with a workload class that waits for capacity."
    )
