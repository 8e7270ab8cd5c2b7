"""Read-only views of what the ledger stores: jobs, their attempts, workers."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gridqueue.states import TERMINAL_STATES, JobState, WorkerState


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _per_attempt(data: dict[str, str], prefix: str) -> dict[int, int]:
    return {int(k[len(prefix) :]): int(v) for k, v in data.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class AttemptRecord:
    """One try of a job on one worker. Times are Redis server time in ms."""

    n: int
    queued_ms: int | None = None
    not_before_ms: int | None = None
    worker: str | None = None
    pid: int | None = None
    epoch: int | None = None
    started_ms: int | None = None
    ended_ms: int | None = None
    outcome: str | None = None
    error: str | None = None
    delivery_tag: str | None = None
    late_result_discarded: bool = False
    replay: bool = False
    fault_ms: int | None = None  # a failover moved it: the fault's last sign of life

    @classmethod
    def from_json(cls, raw: str) -> AttemptRecord:
        data = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


# What result() reads of a job: a few fields, not the record with its payload and every
# attempt (HGETALL and the parse of each attempt's JSON were most of a producer's wait).
ENDING_FIELDS = ("id", "state", "result", "reason", "error")


@dataclass(frozen=True)
class Ending:
    """A job's state and, once it has ended, its result or why it has none."""

    id: str
    state: JobState
    result: Any
    reason: str | None
    error: str | None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_fields(cls, values: list[str | None]) -> Ending | None:
        """From the values of ENDING_FIELDS, in order; None if the job is not there."""
        job_id, state, result, reason, error = values
        if job_id is None or state is None:
            return None
        return cls(
            id=job_id,
            state=JobState(state),
            result=json.loads(result) if result is not None else None,
            reason=reason or None,
            error=error or None,
        )


@dataclass(frozen=True)
class JobRecord:
    """A job as the ledger knows it: state, every attempt, the visible result."""

    id: str
    model: str
    workload: str
    state: JobState
    attempt: int
    payload: Any
    created_ms: int
    deadline_ms: int | None
    ended_ms: int | None
    result: Any
    reason: str | None
    error: str | None
    worker: str | None
    progress_ms: int | None
    progress: str | None
    idempotency_key: str | None
    attempts: list[AttemptRecord] = field(default_factory=list)
    chain_start: int = 1  # first attempt of the current chain (a replay starts a new one)
    replays: int = 0
    # Output stream, per attempt: chunks emitted (appended or repeats dropped), and the
    # stream position the attempt started emitting from (a resumed attempt: its checkpoint).
    stream_emits: dict[int, int] = field(default_factory=dict)
    stream_starts: dict[int, int] = field(default_factory=dict)
    checkpoint_position: int | None = None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> JobRecord:
        attempts = sorted(
            (AttemptRecord.from_json(v) for k, v in data.items() if k.startswith("a:")),
            key=lambda a: a.n,
        )
        result = data.get("result")
        return cls(
            id=data["id"],
            model=data["model"],
            workload=data["workload"],
            state=JobState(data["state"]),
            attempt=int(data["attempt"]),
            payload=json.loads(data["payload"]),
            created_ms=int(data["created_ms"]),
            deadline_ms=_int(data.get("deadline_ms")),
            ended_ms=_int(data.get("ended_ms")),
            result=json.loads(result) if result is not None else None,
            reason=data.get("reason") or None,
            error=data.get("error") or None,
            worker=data.get("worker") or None,
            progress_ms=_int(data.get("progress_ms")),
            progress=data.get("progress") or None,
            idempotency_key=data.get("idempotency_key") or None,
            attempts=attempts,
            chain_start=int(data.get("chain_start") or 1),
            replays=int(data.get("replays") or 0),
            stream_emits=_per_attempt(data, "emits:"),
            stream_starts=_per_attempt(data, "emit_from:"),
            checkpoint_position=_int(data.get("checkpoint_position")),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "workload": self.workload,
            "state": self.state.value,
            "attempt": self.attempt,
            "created_ms": self.created_ms,
            "deadline_ms": self.deadline_ms,
            "ended_ms": self.ended_ms,
            "result": self.result,
            "reason": self.reason,
            "error": self.error,
            "worker": self.worker,
            "progress": self.progress,
            "chain_start": self.chain_start,
            "replays": self.replays,
            "stream_emits": self.stream_emits,
            "stream_starts": self.stream_starts,
            "checkpoint_position": self.checkpoint_position,
            "attempts": [a.__dict__ for a in self.attempts],
        }


@dataclass(frozen=True)
class WorkerRecord:
    """A worker node as registered, with its liveness."""

    name: str
    state: WorkerState
    epoch: int
    models: list[str]
    pid: int | None
    host: str | None
    concurrency: int | None
    registered_ms: int | None
    last_heartbeat_ms: int | None
    declared_dead_ms: int | None
    running: list[str]
    health: dict[str, Any] | None
    verdict: str | None = None
    probe: str | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    quarantined_by: str | None = None
    quarantine_reason: str | None = None
    quarantine_mode: str | None = None
    quarantined_ms: int | None = None
    probation_until_ms: int | None = None
    failures: int = 0

    @classmethod
    def from_hash(
        cls, data: dict[str, str], running: list[str], beat_ms: float | None = None
    ) -> WorkerRecord:
        """``beat_ms``: the worker's score in the fleet, where a worker in it keeps its last
        beat; one that left the fleet (dead, stopped) has it in its record."""
        health = data.get("health")
        return cls(
            verdict=data.get("verdict") or None,
            probe=data.get("probe") or None,
            gpus=json.loads(data.get("gpus") or "[]"),
            quarantined_by=data.get("quarantined_by") or None,
            quarantine_reason=data.get("quarantine_reason") or None,
            quarantine_mode=data.get("quarantine_mode") or None,
            quarantined_ms=_int(data.get("quarantined_ms")),
            probation_until_ms=_int(data.get("probation_until_ms")),
            failures=int(data.get("failures") or 0),
            name=data["name"],
            state=WorkerState(data["state"]),
            epoch=int(data.get("epoch", 0)),
            models=[m for m in data.get("models", "").split(",") if m],
            pid=_int(data.get("pid")),
            host=data.get("host"),
            concurrency=_int(data.get("concurrency")),
            registered_ms=_int(data.get("registered_ms")),
            last_heartbeat_ms=(
                int(beat_ms) if beat_ms is not None else _int(data.get("last_heartbeat_ms"))
            ),
            declared_dead_ms=_int(data.get("declared_dead_ms")),
            running=sorted(running),
            health=json.loads(health) if health else None,
        )
