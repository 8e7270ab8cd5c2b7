"""Prometheus metrics: one collector that reads the ledger on every scrape.

``make_registry(view)`` returns a registry whose collector reads the fleet through
:class:`~gridqueue.monitor.views.FleetView` (workers and their GPUs, job counts, queue
depths, counters, the watchdog's leader) and the ledger's own histograms (``{ns}:hist``)
and dispatch indexes, in a few pipelined round trips. It never reads a job record, so a
scrape costs the same with 100 jobs or 100,000. Nothing is cached between scrapes: every
value is the ledger's, read now, so any number of dashboards agree.

A Redis outage shows as ``gridqueue_ledger_up 0`` and a growing
``gridqueue_scrape_errors_total``, not as a failed scrape. The names that celery-exporter's
dashboards and alerts read (``celery_worker_up``, ``celery_task_*_total``,
``celery_queue_length``, ``celery_task_runtime``...) are exported too, where gridqueue has
the same thing to say. ``docs/monitoring.md`` lists every metric and that mapping.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from redis.exceptions import RedisError

from gridqueue.celeryapp import PRIORITY_STEPS, TASK_NAME, priority_lists
from gridqueue.ledger import Ledger
from gridqueue.logs import get_logger
from gridqueue.monitor.views import FleetView
from gridqueue.states import JobState, Outcome, WorkerState

_log = get_logger("gridqueue.monitor.metrics")

# The buckets the ledger's scripts count into (``observe`` in ``_common.lua``), upper
# bounds in ms; a field for another bound is merged in, never dropped.
HIST_BOUNDS_MS = (
    5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    120000, 300000, 600000, 1800000, 3600000,
)  # fmt: skip


@dataclass(frozen=True)
class HistogramSpec:
    """How one ledger histogram (``<key>|<labels>|<le>`` fields) is exported."""

    key: str
    name: str
    labels: tuple[str, ...]
    help: str


HISTOGRAMS = (
    HistogramSpec(
        "detect",
        "gridqueue_failover_detect_seconds",
        ("kind",),
        "Time from a failure's last sign of life (last heartbeat, last liveness beat or "
        "progress mark, the sick GPU's report) to the watchdog's verdict, by incident kind.",
    ),
    HistogramSpec(
        "recovery",
        "gridqueue_failover_recovery_seconds",
        ("workload",),
        "Time from a failure's last sign of life to the moved job running again on "
        "another worker (its next attempt claimed), by workload class.",
    ),
    HistogramSpec(
        "queue_wait",
        "gridqueue_queue_wait_seconds",
        ("workload",),
        "Time an attempt waited from being queued (or its retry backoff ending) to its "
        "claim by a worker, by workload class.",
    ),
    HistogramSpec(
        "run",
        "gridqueue_attempt_run_seconds",
        ("workload", "outcome"),
        "Time from an attempt's claim to its end, by workload class and outcome.",
    ),
)

# Counters in the ledger's ``{ns}:stats`` hash, each mapped by hand: a new counter in the
# scripts is exported once someone says what it means (tests/unit/test_metrics.py fails
# until then), never dumped under a guessed name.
STAT_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("attempts_published", "gridqueue_attempts_published_total",
     "Attempt messages published to Celery (a lost message published again counts again)."),
    ("claims", "gridqueue_claims_total", "Attempts a worker claimed and started."),
    ("first_placements", "gridqueue_first_placements_total",
     "First attempts of jobs claimed by a worker."),
    ("bad_first_placements", "gridqueue_bad_first_placements_total",
     "First attempts that ended because their worker, node or GPU failed."),
    ("claims_refused", "gridqueue_claims_refused_total",
     "Claims refused because the worker was not ALIVE (dead, stopped, quarantined, on "
     "probation) or does not serve the job's model; the attempt is published again."),
    ("claims_deferred", "gridqueue_claims_deferred_total",
     "Claims deferred to another ready worker, because this one already failed under the "
     "job."),
    ("stale_deliveries", "gridqueue_stale_deliveries_total",
     "Deliveries of an attempt that is no longer the job's current one (refused)."),
    ("duplicate_deliveries", "gridqueue_duplicate_deliveries_total",
     "Second deliveries of an attempt already running elsewhere (refused)."),
    ("stale_results_discarded", "gridqueue_stale_results_discarded_total",
     "Results from superseded attempts (a zombie worker's late result), discarded."),
    ("stream_chunks_refused", "gridqueue_stream_chunks_refused_total",
     "Output chunks from superseded or not-running attempts (a zombie's ctx.emit), refused."),
    ("stream_chunks_repeated", "gridqueue_stream_chunks_repeated_total",
     "Output chunks the stream already had (an attempt re-emitting after a failover), dropped."),
    ("stream_gaps_refused", "gridqueue_stream_gaps_refused_total",
     "Output chunks past the stream's end (a gap), refused; 0 unless a handler seeks wrongly."),
    ("stream_full", "gridqueue_stream_full_total",
     "Output chunks refused at the stream's bound (GRIDQUEUE_STREAM_MAX_CHUNKS or _BYTES)."),
    ("checkpoints_refused", "gridqueue_checkpoints_refused_total",
     "Checkpoints from superseded or not-running attempts, refused."),
    ("requeues", "gridqueue_requeues_total",
     "Attempts that ended without a result and were queued again under the retry policy."),
    ("stalls", "gridqueue_stalls_total",
     "Running attempts declared stalled (no liveness beat or no progress in time)."),
    ("workers_declared_dead", "gridqueue_workers_declared_dead_total",
     "Workers declared dead by the watchdog after missing heartbeats."),
    ("dead_lettered", "gridqueue_dead_letters_total",
     "Jobs dead-lettered (poison: they took down several workers)."),
    ("heartbeats_refused", "gridqueue_heartbeats_refused_total",
     "Heartbeats refused from a fenced (declared dead or superseded) worker incarnation."),
    ("registers_refused", "gridqueue_registers_refused_total",
     "Worker registrations refused because another live process holds the name."),
    ("redeliveries", "gridqueue_redeliveries_total",
     "Unclaimed attempts published again because the pool child holding them died."),
    ("stranded_deliveries", "gridqueue_stranded_deliveries_total",
     "Deliveries taken by a consumer that died before claiming, taken back and published "
     "again."),
    ("stale_deliveries_removed", "gridqueue_stale_deliveries_removed_total",
     "Stranded deliveries of attempts that were no longer current, removed from kombu."),
    ("lost_messages", "gridqueue_lost_messages_total",
     "Published attempts whose message was found nowhere (queue or unacked) and was "
     "published again."),
    ("stats_events_unfolded", "gridqueue_stats_events_unfolded_total",
     "Events trimmed from the capped event stream before the stats fold added their counts "
     "(no watchdog folded while GRIDQUEUE_EVENTS_MAX_LEN events were written): the other "
     "counters miss what those events carried."),
)  # fmt: skip

QUARANTINE_KINDS = ("health", "watchdog", "operator")
# The incident kinds the ledger records (FleetView's Incident "kind").
INCIDENT_KINDS = (
    "worker_dead",
    "gpu_quarantine",
    "gpu_drain",
    "stall",
    "stall_quarantine",
    "operator_quarantine",
)
# (stat prefix, metric, label, known values, help) for the counters kept per label value.
LABELLED_COUNTERS: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    ("attempts_ended:", "gridqueue_attempts_ended_total", "outcome",
     tuple(o.value for o in Outcome), "Attempts ended, by outcome."),
    ("quarantines:", "gridqueue_quarantines_total", "kind", QUARANTINE_KINDS,
     "Workers quarantined, by who decided: health (a GPU verdict), watchdog (repeated "
     "stalls) or operator."),
    ("incidents:", "gridqueue_failover_incidents_total", "kind", INCIDENT_KINDS,
     "Failover incidents (a worker declared dead, a GPU quarantine or drain, a stall...), "
     "by kind."),
)  # fmt: skip

# Outcomes that celery-exporter would have seen as a failed task, and as a revoked one.
CELERY_FAILED_OUTCOMES = (
    Outcome.ERROR,
    Outcome.INVALID_INPUT,
    Outcome.WORKER_LOST,
    Outcome.NODE_LOST,
    Outcome.STALLED,
    Outcome.GPU_FAULT,
)
CELERY_REVOKED_OUTCOMES = (Outcome.CANCELLED, Outcome.EXPIRED, Outcome.EVACUATED)
# Every claim that reached the ledger ends in exactly one of these counters.
CELERY_REJECTED_STATS = (
    "claims_refused",
    "claims_deferred",
    "stale_deliveries",
    "duplicate_deliveries",
)

# How many messages at the consuming end of each priority list are looked at for the
# oldest waiting attempt: a stale duplicate there (its attempt already claimed or
# superseded) is skipped over.
QUEUE_TAIL = 8

# Workers whose process is there: they heartbeat. DEAD and STOPPED ones are not, and
# their last GPU readings are not exported.
_LIVE_STATES = frozenset(
    state.value for state in (WorkerState.ALIVE, WorkerState.PROBATION, WorkerState.QUARANTINED)
)


def make_registry(view: FleetView) -> CollectorRegistry:
    """A registry for ``/metrics``: gridqueue's collector plus this process's own metrics."""
    registry = CollectorRegistry()
    registry.register(LedgerCollector(view))
    ProcessCollector(registry=registry)
    return registry


# -- histograms -------------------------------------------------------------------------


@dataclass
class HistogramSeries:
    """One labelled series of a ledger histogram: counts per bucket (not cumulative),
    keyed by upper bound in ms (``math.inf`` for the last), and the sum of observations."""

    buckets: dict[float, int] = field(default_factory=dict)
    sum_ms: int = 0


def parse_histograms(raw: Mapping[str, str]) -> dict[str, dict[tuple[str, ...], HistogramSeries]]:
    """The ``{ns}:hist`` hash, by histogram key and label values (in the spec's order).

    Fields of unknown histograms, with other label names, or with unreadable values are
    skipped: a series with a wrong label set would break the whole exposition.
    """
    specs = {spec.key: spec for spec in HISTOGRAMS}
    parsed: dict[str, dict[tuple[str, ...], HistogramSeries]] = {key: {} for key in specs}
    for name, value in raw.items():
        parts = name.split("|")
        if len(parts) != 3 or parts[0] not in specs:
            continue
        key, labels_text, bucket = parts
        labels = _parse_labels(labels_text)
        spec = specs[key]
        if labels is None or set(labels) != set(spec.labels):
            continue
        bound: float | None = None
        if bucket == "inf":
            bound = math.inf
        elif bucket.isdigit():
            bound = float(bucket)
        elif bucket != "sum_ms":
            continue  # "count" too: the buckets' total is the count, by construction
        try:
            number = int(value)
        except ValueError:
            continue
        series = parsed[key].setdefault(
            tuple(labels[label] for label in spec.labels), HistogramSeries()
        )
        if bound is None:
            series.sum_ms = number
        else:
            series.buckets[bound] = number
    return parsed


def _parse_labels(text: str) -> dict[str, str] | None:
    labels: dict[str, str] = {}
    for pair in text.split(",") if text else ():
        label, sep, value = pair.partition("=")
        if not sep or not label or label in labels:
            return None
        labels[label] = value
    return labels


def histogram_family(
    name: str,
    help_text: str,
    label_names: Sequence[str],
    series: Mapping[tuple[str, ...], HistogramSeries],
) -> HistogramMetricFamily:
    """Cumulative buckets in seconds, the same bounds for every series of the family."""
    family = HistogramMetricFamily(name, help_text, labels=list(label_names))
    bounds = sorted(
        {float(b) for b in HIST_BOUNDS_MS}
        | {b for s in series.values() for b in s.buckets if b != math.inf}
    )
    for labels, one in sorted(series.items()):
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound in bounds:
            cumulative += one.buckets.get(bound, 0)
            buckets.append((repr(bound / 1000), cumulative))  # as prometheus_client writes le
        cumulative += one.buckets.get(math.inf, 0)
        buckets.append(("+Inf", cumulative))
        family.add_metric(list(labels), buckets, one.sum_ms / 1000)
    return family


def histogram_families(raw: Mapping[str, str]) -> list[Metric]:
    parsed = parse_histograms(raw)
    families: list[Metric] = [
        histogram_family(spec.name, spec.help, spec.labels, parsed[spec.key]) for spec in HISTOGRAMS
    ]
    # celery-exporter's task runtime: the run time of attempts that succeeded (it observes
    # task-succeeded events only), every workload together.
    succeeded = HistogramSeries()
    for (_workload, outcome), series in parsed["run"].items():
        if outcome != Outcome.SUCCEEDED.value:
            continue
        for bound, count in series.buckets.items():
            succeeded.buckets[bound] = succeeded.buckets.get(bound, 0) + count
        succeeded.sum_ms += series.sum_ms
    families.append(
        histogram_family(
            "celery_task_runtime",
            "Run time of attempts that succeeded (celery-exporter's task runtime; name is "
            "gridqueue's one task, hostname and queue_name are not kept).",
            ("name",),
            {(TASK_NAME,): succeeded} if succeeded.buckets else {},
        )
    )
    return families


# -- counters -----------------------------------------------------------------------------


def counter_families(stats: Mapping[str, int]) -> list[Metric]:
    """Every mapped counter, 0 until the ledger first counts it, so that ``rate()`` and
    ``increase()`` see the first event."""
    families: list[Metric] = []
    for stat, name, help_text in STAT_COUNTERS:
        families.append(CounterMetricFamily(name, help_text, value=stats.get(stat, 0)))
    for prefix, name, label, values, help_text in LABELLED_COUNTERS:
        family = CounterMetricFamily(name, help_text, labels=[label])
        for value in values:
            family.add_metric([value], stats.get(prefix + value, 0))
        families.append(family)
    families.extend(celery_counter_families(stats))
    return families


def celery_counter_families(stats: Mapping[str, int]) -> list[Metric]:
    """celery-exporter's task counters, from the ledger's. Each attempt is one Celery task
    (``gridqueue.attempt``, id ``<job>.<n>``), so they count attempts, not jobs."""

    def ended(outcome: Outcome) -> int:
        return stats.get(f"attempts_ended:{outcome.value}", 0)

    rejected = sum(stats.get(stat, 0) for stat in CELERY_REJECTED_STATS)
    claims = stats.get("claims", 0)
    simple = (
        ("celery_task_sent_total", "Attempt messages published (attempts_published).",
         stats.get("attempts_published", 0)),
        ("celery_task_received_total", "Deliveries that reached a claim, started or "
         "rejected (claims plus the refused, deferred, stale and duplicate ones).",
         claims + rejected),
        ("celery_task_started_total", "Attempts claimed and started (claims).", claims),
        ("celery_task_succeeded_total", "Attempts that succeeded.", ended(Outcome.SUCCEEDED)),
        ("celery_task_rejected_total", "Deliveries a claim refused or deferred; the attempt "
         "is published again where it is still current.", rejected),
        ("celery_task_revoked_total", "Attempts stopped from outside: cancelled, expired or "
         "evacuated by an operator's quarantine.", sum(map(ended, CELERY_REVOKED_OUTCOMES))),
        ("celery_task_retried_total", "Attempts queued again under the retry policy "
         "(requeues).", stats.get("requeues", 0)),
    )  # fmt: skip
    families: list[Metric] = []
    for name, help_text, value in simple:
        family = CounterMetricFamily(name, help_text, labels=["name"])
        family.add_metric([TASK_NAME], value)
        families.append(family)
    failed = CounterMetricFamily(
        "celery_task_failed_total",
        "Attempts that ended in failure; exception is the attempt's outcome (error, "
        "invalid_input, worker_lost, node_lost, stalled, gpu_fault).",
        labels=["name", "exception"],
    )
    for outcome in CELERY_FAILED_OUTCOMES:
        failed.add_metric([TASK_NAME, outcome.value], ended(outcome))
    families.append(failed)
    return families


# -- workers and GPUs ---------------------------------------------------------------------


def _number(value: Any) -> float | None:
    """A JSON number as a float; None for anything else (bool, str, null, NaN). Exact type
    checks: this runs for every GPU field of every worker on each scrape."""
    kind = type(value)
    if kind is float:
        return None if math.isnan(value) else cast(float, value)
    if kind is int:
        return float(value)
    return None


def worker_is_up(worker: Mapping[str, Any], stale_after_ms: int) -> bool:
    """Its process heartbeats: a live state and a heartbeat younger than stale_after."""
    age = _number(worker.get("heartbeat_age_ms"))
    return worker.get("state") in _LIVE_STATES and age is not None and age < stale_after_ms


def worker_is_ready(worker: Mapping[str, Any], stale_after_ms: int) -> bool:
    """It takes new work now: ALIVE (not quarantined or on probation) and up."""
    return worker.get("state") == WorkerState.ALIVE.value and worker_is_up(worker, stale_after_ms)


def worker_families(workers: Sequence[Mapping[str, Any]], stale_after_ms: int) -> list[Metric]:
    up = GaugeMetricFamily(
        "gridqueue_worker_up",
        "1 while the worker heartbeats (ALIVE, PROBATION or QUARANTINED, with a heartbeat "
        "younger than stale_after), else 0.",
        labels=["worker"],
    )
    age = GaugeMetricFamily(
        "gridqueue_worker_heartbeat_age_seconds",
        "Time since the worker's last accepted heartbeat, on Redis server time.",
        labels=["worker"],
    )
    running = GaugeMetricFamily(
        "gridqueue_worker_running_attempts", "Attempts the worker runs now.", labels=["worker"]
    )
    slots = GaugeMetricFamily(
        "gridqueue_worker_slots",
        "Attempts the worker can run at once (its concurrency).",
        labels=["worker"],
    )
    state = GaugeMetricFamily(
        "gridqueue_worker_state",
        "1, labelled with the worker's current state (one series per worker: the one of "
        "its previous state ends when the state changes).",
        labels=["worker", "state"],
    )
    celery_up: dict[str, int] = defaultdict(int)
    celery_active: dict[str, int] = defaultdict(int)
    for worker in workers:
        name = str(worker["name"])
        is_up = worker_is_up(worker, stale_after_ms)
        up.add_metric([name], 1 if is_up else 0)
        heartbeat_age_ms = _number(worker.get("heartbeat_age_ms"))
        if heartbeat_age_ms is not None:
            age.add_metric([name], max(0.0, heartbeat_age_ms) / 1000)
        attempts = len(worker.get("running") or ())
        running.add_metric([name], attempts)
        concurrency = _number(worker.get("concurrency"))
        if concurrency is not None:
            slots.add_metric([name], concurrency)
        state.add_metric([name, str(worker.get("state"))], 1)
        # celery-exporter labels a worker by the host part of its node name (name@host):
        # workers sharing a host share its series, as they do there.
        host = str(worker.get("host") or name)
        celery_up[host] = max(celery_up[host], 1 if is_up else 0)
        celery_active[host] += attempts if is_up else 0
    worker_up = GaugeMetricFamily(
        "celery_worker_up",
        "1 while a gridqueue worker on the host heartbeats (celery-exporter's worker_up).",
        labels=["hostname"],
    )
    tasks_active = GaugeMetricFamily(
        "celery_worker_tasks_active",
        "Attempts the host's live gridqueue workers run now.",
        labels=["hostname"],
    )
    for host in sorted(celery_up):
        worker_up.add_metric([host], celery_up[host])
        tasks_active.add_metric([host], celery_active[host])
    return [up, age, running, slots, state, worker_up, tasks_active]


# (field of the probe's GPU reading, metric, help): GpuReading.to_dict() in probes/base.py.
# Kept to what capacity and health dashboards read: a fleet of 1,000 eight-GPU nodes makes
# 8,000 series of each, and every series costs the scrape time.
_GPU_GAUGES = (
    ("memory_used_bytes", "gridqueue_gpu_memory_used_bytes", "GPU memory in use."),
    ("memory_total_bytes", "gridqueue_gpu_memory_total_bytes", "GPU memory in all."),
    ("utilization_ratio", "gridqueue_gpu_utilization_ratio",
     "GPU busy time over the driver's last sample period, 0 to 1 (busy is not progress)."),
    ("temperature_c", "gridqueue_gpu_temperature_celsius", "GPU core temperature."),
    ("power_w", "gridqueue_gpu_power_watts", "GPU power draw."),
)  # fmt: skip


def gpu_families(workers: Sequence[Mapping[str, Any]]) -> list[Metric]:
    """Each live worker's GPUs as its last health snapshot reported them. A field the
    probe does not offer (or a GPU that fell off the bus) is left out, not exported as 0.

    Samples are appended directly: with thousands of GPUs, ``add_metric``'s per-call label
    zipping is a good part of the scrape.
    """
    gauges = [
        (key, GaugeMetricFamily(name, help_text, labels=["worker", "gpu"]))
        for key, name, help_text in _GPU_GAUGES
    ]
    xids = CounterMetricFamily(
        "gridqueue_gpu_xid_errors_total",
        "Xid errors the driver reported, by code, since the worker's probe started.",
        labels=["worker", "gpu", "xid"],
    )
    xid_name = xids.name + "_total"
    for worker in workers:
        if worker.get("state") not in _LIVE_STATES:
            continue
        name = str(worker["name"])
        for gpu in worker.get("gpus") or ():
            index = gpu.get("index") if isinstance(gpu, Mapping) else None
            if not isinstance(index, int) or isinstance(index, bool):
                continue
            labels = {"worker": name, "gpu": str(index)}  # shared: samples are read-only
            for key, family in gauges:
                value = _number(gpu.get(key))
                if value is not None:
                    family.samples.append(Sample(family.name, labels, value))
            counts = gpu.get("xid_counts") or {}
            for code, count in sorted(counts.items(), key=lambda kv: int(kv[0])):
                xid_labels = {**labels, "xid": str(int(code))}
                xids.samples.append(Sample(xid_name, xid_labels, float(count)))
    return [*(family for _, family in gauges), xids]


# -- jobs, queues and models ----------------------------------------------------------------


@dataclass(frozen=True)
class LedgerExtras:
    """What the collector reads from the ledger besides FleetView."""

    hist: dict[str, str]
    dispatch_pending: int
    dispatch_overdue_ms: int
    oldest_queued_ms: dict[str, int]  # model -> age of the oldest attempt in its queue


def read_extras(ledger: Ledger, now_ms: int, queues: Sequence[Mapping[str, Any]]) -> LedgerExtras:
    """Histograms, the dispatch index and the age of each queue's oldest attempt: two
    pipelined round trips, whatever the number of jobs.

    kombu pushes on the left of a priority list and consumers pop from the right, so the
    oldest messages are the last ones. A message names its attempt (``headers.id``), and
    ``{ns}:published`` says when that attempt was published; a message whose attempt is no
    longer listed there (claimed, superseded: a stale duplicate) waits for no one.
    """
    keys = ledger.keys
    # The histograms are as of the overview read just before, which folded first.
    pipe = ledger.client.pipeline(transaction=False)
    pipe.hgetall(keys.hist)
    pipe.zcard(keys.dispatch)
    pipe.zrange(keys.dispatch, 0, 0, withscores=True)
    lists: list[tuple[str, str]] = []  # (model, list name)
    for queue in queues:
        by_priority = queue.get("by_priority") or {}
        names = dict(zip(PRIORITY_STEPS, priority_lists(str(queue["queue"])), strict=True))
        for step, name in names.items():
            if int(by_priority.get(str(step), 0) or 0) > 0:
                lists.append((str(queue["model"]), name))
                pipe.lrange(name, -QUEUE_TAIL, -1)
    replies = pipe.execute()
    hist = cast(dict[str, str], replies[0])
    pending = int(replies[1])
    first = cast(list[tuple[str, float]], replies[2])
    overdue_ms = max(0, now_ms - int(first[0][1])) if first else 0

    candidates: list[tuple[str, str]] = []  # (model, attempt)
    for (model, _name), messages in zip(lists, replies[3:], strict=True):
        for raw in cast(list[str], messages):
            attempt = _message_attempt(raw)
            if attempt:
                candidates.append((model, attempt))
    oldest: dict[str, int] = {str(queue["model"]): 0 for queue in queues}
    if candidates:
        pipe = ledger.client.pipeline(transaction=False)
        for _model, attempt in candidates:
            pipe.zscore(keys.published, attempt)
        for (model, _attempt), score in zip(candidates, pipe.execute(), strict=True):
            if score is not None:
                oldest[model] = max(oldest[model], now_ms - int(score))
    return LedgerExtras(hist, pending, overdue_ms, oldest)


def _message_attempt(raw: str) -> str | None:
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    headers = message.get("headers") if isinstance(message, dict) else None
    attempt = headers.get("id") if isinstance(headers, dict) else None
    return attempt if isinstance(attempt, str) else None


def fleet_families(
    overview: Mapping[str, Any],
    workers: Sequence[Mapping[str, Any]],
    extras: LedgerExtras,
    stale_after_ms: int,
) -> list[Metric]:
    worker_counts = overview.get("workers") or {}
    by_state = GaugeMetricFamily(
        "gridqueue_workers",
        "Workers in the ledger, by state (dead and stopped ones until they are forgotten).",
        labels=["state"],
    )
    for state in WorkerState:
        by_state.add_metric([state.value], int(worker_counts.get(state.value, 0)))
    job_counts = overview.get("jobs") or {}
    jobs = GaugeMetricFamily(
        "gridqueue_jobs",
        "Jobs the ledger holds, by state: an ended job leaves its state's count when its "
        "record expires (the job retention after it ended).",
        labels=["state"],
    )
    for job_state in JobState:
        jobs.add_metric([job_state.value], int(job_counts.get(job_state.value, 0)))
    running = GaugeMetricFamily(
        "gridqueue_running_attempts",
        "Attempts running now, under a liveness and stall watch.",
        value=int(overview.get("running_attempts", 0)),
    )
    leader = GaugeMetricFamily(
        "gridqueue_watchdog_leader",
        "1 while a watchdog holds the leader lease, else 0.",
        value=1 if (overview.get("watchdog") or {}).get("leader") else 0,
    )
    dispatch_pending = GaugeMetricFamily(
        "gridqueue_dispatch_pending",
        "Attempts waiting to be published: retry backoff, a publish in flight, or due now.",
        value=extras.dispatch_pending,
    )
    dispatch_overdue = GaugeMetricFamily(
        "gridqueue_dispatch_overdue_seconds",
        "How long the most overdue attempt has been due for publishing (0 if none): the "
        "watchdog publishes due attempts every tick.",
        value=extras.dispatch_overdue_ms / 1000,
    )
    return [
        by_state,
        jobs,
        running,
        leader,
        dispatch_pending,
        dispatch_overdue,
        *queue_families(overview, workers, extras, stale_after_ms),
    ]


def queue_families(
    overview: Mapping[str, Any],
    workers: Sequence[Mapping[str, Any]],
    extras: LedgerExtras,
    stale_after_ms: int,
) -> list[Metric]:
    """Per model: queue depth, the oldest waiting attempt, the workers ready to take it.

    A model is listed while a worker that serves it was seen within the worker metrics
    retention, or while messages wait in its queue.
    """
    depth = GaugeMetricFamily(
        "gridqueue_queue_depth",
        "Messages waiting in the model's Celery queue, by priority step (0 is served first).",
        labels=["model", "priority"],
    )
    length = GaugeMetricFamily(
        "celery_queue_length",
        "Messages waiting in the Celery queue, all priority steps together.",
        labels=["queue_name"],
    )
    oldest = GaugeMetricFamily(
        "gridqueue_queue_oldest_age_seconds",
        "How long the oldest attempt waiting in the model's queue has waited since it was "
        "published (0 if none waits).",
        labels=["model"],
    )
    ready = GaugeMetricFamily(
        "gridqueue_model_workers_ready",
        "Workers that take the model's work now: ALIVE, heartbeating, consuming its queue.",
        labels=["model"],
    )
    ready_count: dict[str, int] = defaultdict(int)
    for worker in workers:
        for model in worker.get("models") or ():
            ready_count[str(model)] += 1 if worker_is_ready(worker, stale_after_ms) else 0
    waiting: dict[str, int] = {}
    for queue in overview.get("queues") or ():
        model, total = str(queue["model"]), int(queue.get("depth", 0))
        waiting[model] = total
        by_priority = queue.get("by_priority") or {}
        for step in PRIORITY_STEPS:
            depth.add_metric([model, str(step)], int(by_priority.get(str(step), 0) or 0))
        length.add_metric([str(queue["queue"])], total)
    models = set(ready_count) | {model for model, total in waiting.items() if total > 0}
    for model in sorted(models):
        ready.add_metric([model], ready_count.get(model, 0))
        oldest.add_metric([model], extras.oldest_queued_ms.get(model, 0) / 1000)
    return [depth, length, oldest, ready]


# -- the collector ------------------------------------------------------------------------


class LedgerCollector(Collector):
    """Reads the ledger on each scrape; see the module docstring."""

    def __init__(self, view: FleetView) -> None:
        self.view = view
        self._lock = threading.Lock()
        self._errors = {"redis": 0, "internal": 0}

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        families: list[Metric] = []
        failed: str | None = None
        try:
            families = self.read()
        except RedisError as exc:
            failed = "redis"
            _log.warning("metrics.ledger_unreachable", error=repr(exc))
        except Exception as exc:  # one bad field must not turn the scrape into a 500
            failed = "internal"
            _log.exception("metrics.read_failed", error=repr(exc))
        with self._lock:
            if failed:
                self._errors[failed] += 1
            errors = dict(self._errors)
        yield from families
        yield GaugeMetricFamily(
            "gridqueue_ledger_up",
            "1 when this scrape read the ledger, 0 when Redis did not answer or the read "
            "failed (the other gridqueue metrics are then left out).",
            value=0 if failed else 1,
        )
        scrape_errors = CounterMetricFamily(
            "gridqueue_scrape_errors_total",
            "Scrapes that could not read the ledger, by reason: redis (it did not answer) or "
            "internal (see the dashboard's log).",
            labels=["reason"],
        )
        for reason, count in sorted(errors.items()):
            scrape_errors.add_metric([reason], count)
        yield scrape_errors
        yield GaugeMetricFamily(
            "gridqueue_scrape_duration_seconds",
            "How long this scrape took to read the ledger.",
            value=time.perf_counter() - started,
        )

    def read(self) -> list[Metric]:
        """Every gridqueue family, or an exception: never half a scrape."""
        settings = self.view.ledger.settings
        retention_s = settings.worker_metrics_retention_s
        stale_after_ms = int(settings.stale_after_s * 1000)
        overview = self.view.overview()
        now_ms = int(overview["now_ms"])
        # Live workers, and those gone less than the retention ago: a fleet that churns
        # through names does not grow /metrics without bound.
        workers = self.view.workers(gone_within_s=retention_s)
        extras = read_extras(self.view.ledger, now_ms, overview.get("queues") or ())
        stats = {str(k): int(v) for k, v in (overview.get("stats") or {}).items()}
        families: list[Metric] = []
        families.extend(fleet_families(overview, workers, extras, stale_after_ms))
        families.extend(worker_families(workers, stale_after_ms))
        families.extend(gpu_families(workers))
        families.extend(counter_families(stats))
        families.extend(histogram_families(extras.hist))
        return families
