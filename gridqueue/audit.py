"""Auditing a run against the contract: nothing lost, at most one visible result, and no
non-idempotent job run twice.

Used by the demo, the drill, the benchmarks and the tests, so that all of them count the
same way. The audit counts what could go wrong rather than re-read what the ledger's
compare-and-set guarantees:

- **runs**: how many times a handler *started* for each job, as the handler itself
  recorded it in Redis before doing any work (:func:`count_run`; the simulated LLM of
  ``workers/simulated.py`` does). A job of a non-idempotent class (``idempotent = false``,
  ``exclusive`` in the default classes) that started more than once ran twice, whatever
  the ledger says of its attempts.
- **duplicate visible results**: a job with more than one ``succeeded`` attempt or
  ``succeeded`` event; a visible result that is not the succeeded attempt's own (the
  handler stamps its attempt number into the result); a result on a job that did not
  succeed, or a succeeded job without one; and a visible result (or terminal state) that
  changed after the producer first read it (``seen``).
- **lost**: a job not terminal at the end, or no longer in the ledger at all (``missing``;
  a Redis that lost writes, e.g. AOF ``everysec`` after a crash).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis

from gridqueue.errors import JobNotFoundError
from gridqueue.ledger import Ledger
from gridqueue.records import JobRecord
from gridqueue.states import JobState, Outcome

# Handler run counters (hashes, job id -> count), written by the handler before it works
# and after it returned; with a bounded lifetime (refreshed on every write).
RUNS_KEY = "{ns}:sim:runs"
RETURNS_KEY = "{ns}:sim:returns"
_TOKEN_KEY = "{ns}:sim:run:{token}"  # one count per token: a retried count is safe
_TOKEN_TTL_S = 300  # longer than any retry of one count

# Idempotent under retry: a count whose reply was lost and is sent again counts once.
_COUNT_SCRIPT = """
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'EX', ARGV[4]) then
  redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
"""


def count_run(
    client: redis.Redis,
    namespace: str,
    job_id: str,
    attempt: int,
    token: str,
    ttl_s: int,
    returned: bool = False,
) -> int:
    """Count one handler run of ``job_id`` (``returned``: one that returned a value).

    ``token`` names this run: unique per run, the same when one count is retried. The
    counters expire ``ttl_s`` after their last write. Returns the job's count so far."""
    key = (RETURNS_KEY if returned else RUNS_KEY).format(ns=namespace)
    token_key = _TOKEN_KEY.format(ns=namespace, token=f"{token}:{int(returned)}")
    # By its SHA (EVALSHA): the script's text goes to Redis only when Redis lacks it.
    script = client.register_script(_COUNT_SCRIPT)
    reply = script(
        keys=[key, token_key], args=[job_id, f"{job_id}.{attempt}", max(1, ttl_s), _TOKEN_TTL_S]
    )
    return int(cast(int, reply))


def run_counts(
    client: redis.Redis, namespace: str, job_ids: list[str], returned: bool = False
) -> dict[str, int]:
    """Handler runs counted per job (0 for a job no handler counted)."""
    key = (RETURNS_KEY if returned else RUNS_KEY).format(ns=namespace)
    counts: dict[str, int] = {}
    for start in range(0, len(job_ids), 1000):
        chunk = job_ids[start : start + 1000]
        values = cast(list[Any], client.hmget(key, chunk))
        counts.update({j: int(v or 0) for j, v in zip(chunk, values, strict=True)})
    return counts


@dataclass(frozen=True)
class Seen:
    """What the producer read of a job once it was terminal: its state and result."""

    state: str
    result: Any


@dataclass
class Audit:
    submitted: int = 0
    by_state: Counter[str] = field(default_factory=Counter)
    failed_by_reason: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # never reached a terminal state
    missing: list[str] = field(default_factory=list)  # of ``lost``: gone from the ledger
    duplicates: list[str] = field(default_factory=list)  # more than one visible result
    duplicate_reasons: Counter[str] = field(default_factory=Counter)
    stale_results_discarded: int = 0
    exclusive_classes: list[str] = field(default_factory=list)
    exclusive_jobs: int = 0
    exclusive_runs_over_one: list[str] = field(default_factory=list)
    handler_runs: int = 0  # runs started, as the handler counted them
    handler_returns: int = 0  # runs that returned a value
    succeeded_uncounted: list[str] = field(default_factory=list)  # succeeded, no run counted
    runs_per_job: Counter[int] = field(default_factory=Counter)  # runs -> number of jobs

    @property
    def succeeded(self) -> int:
        return self.by_state["SUCCEEDED"]

    def to_dict(self) -> dict[str, object]:
        return {
            "submitted": self.submitted,
            "by_state": dict(self.by_state),
            "failed_by_reason": dict(self.failed_by_reason),
            "lost": len(self.lost),
            "lost_jobs": self.lost[:20],
            "missing_from_ledger": len(self.missing),
            "duplicates": len(self.duplicates),
            "duplicate_jobs": self.duplicates[:20],
            "duplicate_reasons": dict(self.duplicate_reasons),
            "stale_results_discarded": self.stale_results_discarded,
            "exclusive_jobs": self.exclusive_jobs,
            "exclusive_runs_over_one": len(self.exclusive_runs_over_one),
            "exclusive_runs_over_one_jobs": self.exclusive_runs_over_one[:20],
            "handler_runs": self.handler_runs,
            "handler_returns": self.handler_returns,
            "succeeded_without_counted_run": len(self.succeeded_uncounted),
            "jobs_by_runs": {str(k): v for k, v in sorted(self.runs_per_job.items())},
        }


def audit(ledger: Ledger, job_ids: Iterable[str], seen: Mapping[str, Seen] | None = None) -> Audit:
    """Audit every job in ``job_ids``; ``seen`` is what the producer read of each job when
    it first found it terminal (a later change of state or result is a duplicate)."""
    result = Audit()
    wanted = sorted(set(job_ids))
    result.submitted = len(wanted)
    seen = seen or {}
    succeeded_events = Counter(
        e.get("job") for e in _all_events(ledger) if e.get("type") == "succeeded"
    )
    result.exclusive_classes = sorted(n for n, w in ledger.workloads.items() if not w.idempotent)
    runs = run_counts(ledger.client, ledger.settings.namespace, wanted)
    returns = run_counts(ledger.client, ledger.settings.namespace, wanted, returned=True)
    result.handler_runs = sum(runs.values())
    result.handler_returns = sum(returns.values())
    result.runs_per_job = Counter(runs.values())
    for job_id in wanted:
        try:
            record = ledger.get(job_id)
        except JobNotFoundError:
            result.lost.append(job_id)
            result.missing.append(job_id)
            continue
        result.by_state[record.state.value] += 1
        if not record.terminal:
            result.lost.append(job_id)
        elif record.state is not JobState.SUCCEEDED:
            result.failed_by_reason[f"{record.state.value}/{record.reason}"] += 1
        if record.workload in result.exclusive_classes:
            result.exclusive_jobs += 1
            if runs[job_id] > 1:
                result.exclusive_runs_over_one.append(job_id)
        if record.state is JobState.SUCCEEDED and runs[job_id] == 0:
            result.succeeded_uncounted.append(job_id)
        reasons = visible_result_problems(record, succeeded_events[job_id], seen.get(job_id))
        if reasons:
            result.duplicates.append(job_id)
            result.duplicate_reasons.update(reasons)
    result.stale_results_discarded = ledger.stats().get("stale_results_discarded", 0)
    return result


def visible_result_problems(
    record: JobRecord, succeeded_events: int, seen: Seen | None = None
) -> list[str]:
    """Why ``record`` may have shown more than one result (empty: it did not)."""
    reasons: list[str] = []
    wins = [a for a in record.attempts if a.outcome == Outcome.SUCCEEDED.value]
    if len(wins) > 1:
        reasons.append("more than one succeeded attempt")
    if succeeded_events > 1:
        reasons.append("more than one succeeded event")
    if record.state is JobState.SUCCEEDED:
        if not wins:
            reasons.append("succeeded without a succeeded attempt")
        elif record.attempt != wins[-1].n:
            reasons.append("succeeded attempt is not the job's current attempt")
        stamped = record.result.get("attempt") if isinstance(record.result, dict) else None
        if isinstance(stamped, int) and wins and stamped not in {a.n for a in wins}:
            reasons.append("result from an attempt that did not succeed")
        worker = record.result.get("worker") if isinstance(record.result, dict) else None
        if isinstance(worker, str) and wins and worker not in {a.worker for a in wins}:
            reasons.append("result from a worker that did not succeed")
    elif record.result is not None or wins:
        reasons.append("a result on a job that did not succeed")
    if seen is not None and (seen.state != record.state.value or seen.result != record.result):
        reasons.append("visible result changed after the producer read it")
    return reasons


def failover_latencies_ms(records: Iterable[JobRecord], worker: str, kill_ms: int) -> list[int]:
    """For each attempt that ``worker`` lost, the time from the kill to the next attempt
    RUNNING on another worker (Redis server time)."""
    latencies = []
    for record in records:
        for lost, following in zip(record.attempts, record.attempts[1:], strict=False):
            if (
                lost.worker == worker
                and lost.outcome in (Outcome.WORKER_LOST.value, Outcome.NODE_LOST.value)
                and following.started_ms is not None
                and following.worker != worker
            ):
                latencies.append(following.started_ms - kill_ms)
    return latencies


def percentile(values: list[float] | list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return float(ordered[rank - 1])


def _all_events(ledger: Ledger) -> list[dict[str, str]]:
    events: list[dict[str, str]] = []
    after = "-"
    while True:
        batch = ledger.events(count=5000, after=after)
        if after != "-":
            batch = batch[1:]  # xrange is inclusive of the last id we saw
        if not batch:
            return events
        events += batch
        after = batch[-1]["id"]
