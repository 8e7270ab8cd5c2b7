"""The JSON API's shapes, as its OpenAPI schema documents them.

The read endpoints return what :class:`gridqueue.monitor.views.FleetView` returns, as is:
these models describe it for ``/openapi.json`` and are not used to validate it (a field
the view adds later reaches the client without a release of the dashboard). The action
endpoints build their replies from these models.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gridqueue.monitor.views import MAX_LIMIT


class _Open(BaseModel):
    """A documented shape that may carry more fields than it names."""

    model_config = ConfigDict(extra="allow")


class ErrorReply(BaseModel):
    """Every 4xx and 5xx answer of the API: what went wrong, and what to do."""

    error: str = Field(description="What went wrong and what to do next, in one sentence.")
    detail: Any = Field(None, description="The specifics: the value refused, the choices.")


class QueueDepth(_Open):
    model: str
    queue: str
    depth: int
    by_priority: dict[str, int] = Field(description="Messages per priority step (0, 3, 6, 9).")


class Rates(_Open):
    window_s: int
    per_minute: list[dict[str, int]] = Field(
        description="One row per minute: minute_ms, claims, succeeded, failures, requeues..."
    )
    requeues_per_min: float
    failures_per_min: float


class Overview(_Open):
    now_ms: int = Field(description="Redis server time, ms.")
    workers: dict[str, int] = Field(description="Workers by state.")
    jobs: dict[str, int] = Field(description="Jobs by state.")
    running_attempts: int
    queues: list[QueueDepth]
    rates: Rates
    stats: dict[str, int] = Field(description="The ledger's counters.")
    watchdog: dict[str, Any] = Field(description="The leading watchdog, if any.")


class Gpu(_Open):
    index: int | None = None
    name: str | None = None
    uuid: str | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    utilization_ratio: float | None = Field(None, description="0..1, as the probe reads it.")
    temperature_c: float | None = None
    power_w: float | None = None
    lost: bool = False
    read_error: str | None = Field(
        None, description="Every NVML call on this GPU failed: the first error."
    )
    xid_events_missing: str | None = Field(
        None, description="Why this GPU's Xid events are not watched; None while they are."
    )
    xid_counts: dict[str, int] = Field(
        default_factory=dict, description="Xid code -> events since the probe started."
    )


class WorkerSummary(_Open):
    name: str
    state: str = Field(description="ALIVE, PROBATION, QUARANTINED, DEAD or STOPPED.")
    verdict: str | None = Field(None, description="HEALTHY, DEGRADED or UNHEALTHY.")
    reasons: list[str] = Field(default_factory=list)
    notices: list[str] = Field(
        default_factory=list,
        description="Monitoring gaps, not faults: no_xid_events:gpuN (an Xid there goes unseen).",
    )
    probe: str | None = None
    models: list[str] = Field(default_factory=list)
    host: str | None = None
    pid: int | None = None
    epoch: int | None = None
    heartbeat_age_ms: int | None = None
    running: list[str] = Field(default_factory=list, description="Attempt ids <job>.<n>.")
    concurrency: int | None = None
    gpus: list[Gpu] = Field(default_factory=list)
    quarantined_by: str | None = None
    quarantine_reason: str | None = None
    quarantine_mode: str | None = None
    probation_until_ms: int | None = None
    failures: int | None = None
    declared_dead_ms: int | None = None
    gone_ms: int | None = None


class WorkerDetail(WorkerSummary):
    history: list[dict[str, Any]] = Field(description="The worker's events, newest first.")


class JobSummary(_Open):
    id: str
    model: str
    workload: str
    state: str
    attempt: int
    worker: str | None = None
    created_ms: int | None = None
    updated_ms: int | None = None
    ended_ms: int | None = None
    reason: str | None = None
    error: str | None = None


class JobPage(_Open):
    jobs: list[JobSummary]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")
    scanned: int
    complete: bool = Field(description="False when the scan stopped at its bound.")


class TimelineEntry(_Open):
    n: int
    worker: str | None = None
    pid: int | None = None
    queued_ms: int | None = None
    claimed_ms: int | None = None
    ended_ms: int | None = None
    outcome: str | None = None
    error: str | None = None
    last_progress_ms: int | None = None


class JobDetail(_Open):
    id: str
    model: str
    workload: str
    state: str
    attempt: int
    result: Any = None
    reason: str | None = None
    error: str | None = None
    attempts: list[dict[str, Any]]
    timeline: list[TimelineEntry]


class IncidentAttempt(_Open):
    attempt: str
    job: str
    requeued_ms: int | None = None
    next_attempt: int | None = None
    running_again_ms: int | None = None
    outcome: str | None = None
    state: str | None = None


class Incident(_Open):
    id: str
    kind: str = Field(
        description="worker_dead, gpu_quarantine, gpu_drain, stall, stall_quarantine or "
        "operator_quarantine."
    )
    worker: str | None = None
    reason: str | None = None
    sign_ms: int | None = Field(None, description="The fault's last sign of life.")
    verdict_ms: int | None = None
    detect_ms: int | None = Field(None, description="verdict_ms - sign_ms.")
    attempts: list[IncidentAttempt] = Field(default_factory=list)
    jobs_moved: int = 0
    requeue_ms: int | None = Field(None, description="From the verdict to the last requeue.")
    running_again_ms: int | None = Field(
        None, description="From the last sign of life to the last moved job running again."
    )
    pending: int = Field(0, description="Moved attempts whose next attempt is not running.")


class DeadLetterGroup(_Open):
    reason: str
    count: int
    jobs: list[dict[str, Any]] = Field(description="JobSummary plus its evidence.")


class DeadLetters(_Open):
    groups: list[DeadLetterGroup]
    total: int


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    redis: bool
    now_ms: int | None = None


class QuarantineRequest(BaseModel):
    reason: str = Field(
        min_length=1, max_length=500, description="Why; recorded with who in the ledger."
    )


class DrainRequest(BaseModel):
    reason: str = Field("drain", min_length=1, max_length=500)


class WorkerActionReply(BaseModel):
    worker: str
    action: str = Field(description="quarantine, drain or release.")
    by: str = Field(description="The operator recorded in the ledger.")
    attempts_moved: int | None = Field(
        None, description="Running attempts moved elsewhere (quarantine only)."
    )


class CancelReply(BaseModel):
    job: str
    cancelled: bool


class ReplayReply(BaseModel):
    job: str
    attempt: int = Field(description="The first attempt of the replay's fresh chain.")
    by: str


class ReplayFilter(BaseModel):
    """Which dead letters to replay. Name a reason or a model, or set ``all``."""

    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, min_length=1, max_length=200)
    model: str | None = Field(None, min_length=1, max_length=128)
    all: bool = Field(False, description="Replay every dead letter when no filter is named.")
    limit: int = Field(
        200, ge=1, le=MAX_LIMIT, description="The most dead letters read in one call."
    )


class ReplayFailure(BaseModel):
    job: str
    error: str


class ReplayManyReply(BaseModel):
    filter: dict[str, Any]
    matched: int
    replayed: list[ReplayReply]
    failed: list[ReplayFailure]
