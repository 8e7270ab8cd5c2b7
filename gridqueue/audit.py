"""Auditing a run against the contract: nothing lost, at most one visible result.

Used by the demo, the benchmarks and the tests, so that all three count the same way.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from gridqueue.ledger import Ledger
from gridqueue.records import JobRecord
from gridqueue.states import Outcome


@dataclass
class Audit:
    submitted: int = 0
    by_state: Counter[str] = field(default_factory=Counter)
    failed_by_reason: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)  # never reached a terminal state
    duplicates: list[str] = field(default_factory=list)  # more than one visible result
    stale_results_discarded: int = 0

    @property
    def succeeded(self) -> int:
        return self.by_state["SUCCEEDED"]

    def to_dict(self) -> dict[str, object]:
        return {
            "submitted": self.submitted,
            "by_state": dict(self.by_state),
            "failed_by_reason": dict(self.failed_by_reason),
            "lost": len(self.lost),
            "duplicates": len(self.duplicates),
            "stale_results_discarded": self.stale_results_discarded,
        }


def audit(ledger: Ledger, job_ids: Iterable[str]) -> Audit:
    """Check every job; a duplicate is a job with two succeeded attempts or two
    ``succeeded`` events in the stream (either would mean two visible results)."""
    result = Audit()
    wanted = set(job_ids)
    result.submitted = len(wanted)
    succeeded_events = Counter(
        e.get("job") for e in _all_events(ledger) if e.get("type") == "succeeded"
    )
    for job_id in sorted(wanted):
        record = ledger.get(job_id)
        result.by_state[record.state.value] += 1
        if not record.terminal:
            result.lost.append(job_id)
        elif record.state.value != "SUCCEEDED":
            result.failed_by_reason[f"{record.state.value}/{record.reason}"] += 1
        wins = sum(1 for a in record.attempts if a.outcome == Outcome.SUCCEEDED.value)
        if wins > 1 or succeeded_events[job_id] > 1:
            result.duplicates.append(job_id)
    result.stale_results_discarded = ledger.stats().get("stale_results_discarded", 0)
    return result


def failover_latencies_ms(records: Iterable[JobRecord], worker: str, kill_ms: int) -> list[int]:
    """For each attempt that ``worker`` lost, the time from the kill to the next attempt
    RUNNING on another worker (Redis server time)."""
    latencies = []
    for record in records:
        for lost, following in zip(record.attempts, record.attempts[1:], strict=False):
            if (
                lost.worker == worker
                and lost.outcome == Outcome.WORKER_LOST.value
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
