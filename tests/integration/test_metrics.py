"""Prometheus /metrics on real parts: the ledger's scripts on a private redis-server, a
real watchdog tick, real Celery messages in the queues, and promtool's own lint on the
exposition. The registry is the one the dashboard serves (``make_registry(view)`` and
``generate_latest``)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gridqueue import GridQueue
from gridqueue.ledger import Ledger, connect_redis
from gridqueue.monitor.metrics import HIST_BOUNDS_MS, make_registry
from gridqueue.monitor.views import FleetView
from gridqueue.probes.simulated import Fault, SimulatedProbe
from gridqueue.settings import Settings
from gridqueue.states import JobState
from gridqueue.watchdog import Watchdog
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

MODEL = "sim-llm"
GIB = 2**30
DOCS = Path(__file__).resolve().parents[2] / "docs" / "monitoring.md"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- helpers ------------------------------------------------------------------------------


def scrape(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, metric: str, /, **labels: str) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def health_document(count: int = 2, faults: dict[int, Fault] | None = None) -> str:
    """The health snapshot a worker agent heartbeats (HealthMonitor.read_once)."""
    probe = SimulatedProbe(count, "Simulated H100 80GB", 80, fault_source=lambda: faults or {})
    reading = probe.read()
    return json.dumps(
        {
            "probe": reading.probe,
            "note": "simulated",
            "verdict": "HEALTHY",
            "reasons": [],
            "unresponsive": False,
            "error": None,
            "gpus": [gpu.to_dict() for gpu in reading.gpus],
        }
    )


def join(ledger: Ledger, name: str, host: str = "node-a", health: str | None = None) -> int:
    """Register a worker serving MODEL on simulated GPUs and beat once, as its agent does."""
    fit = {MODEL: {"required_bytes": 8 * GIB, "largest_gpu_bytes": 80 * GIB}}
    gpus = [
        {"index": i, "name": "Simulated H100 80GB", "memory_total_bytes": 80 * GIB} for i in (0, 1)
    ]
    epoch = ledger.register(
        name, [MODEL], 4000, host, 2, "{}", probe="simulated", gpus=gpus, model_fit=fit
    )
    beat(ledger, name, epoch, health)
    return epoch


def beat(ledger: Ledger, name: str, epoch: int, health: str | None = None) -> None:
    reply = ledger.heartbeat(name, epoch, health or health_document(), "HEALTHY")
    assert not reply.fenced


def promtool_check_metrics(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool is not installed (Debian: apt-get install prometheus), so the "
            "exposition was not linted"
        )
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    problems = (checked.stdout + checked.stderr).strip()
    assert checked.returncode == 0 and not problems, problems


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def fast_settings(redis_url: str) -> Settings:
    # A worker is dead after 0.5 s of silence, so a failover test takes seconds.
    return Settings(redis_url=redis_url, stale_after_s=0.5, heartbeat_interval_s=0.1)


@pytest.fixture
def fast_ledger(fast_settings: Settings) -> Iterator[Ledger]:
    ledger = Ledger(connect_redis(fast_settings.redis_url), fast_settings)
    yield ledger
    ledger.client.close()


@pytest.fixture
def producer(fast_settings: Settings) -> Iterator[GridQueue]:
    client = GridQueue(settings=fast_settings)
    yield client
    client.close()


# -- histograms as the ledger keeps them ----------------------------------------------------


def test_histogram_fields_become_cumulative_second_buckets(ledger: Ledger) -> None:
    """``{ns}:hist`` counts per bucket, not cumulatively, with bounds in ms; Prometheus
    wants cumulative buckets in seconds, every bound on every series, +Inf == count."""
    run = "run|workload=batch,outcome=succeeded|"
    ledger.client.hset(
        ledger.keys.hist,
        mapping={
            run + "5": 2,
            run + "250": 3,
            run + "3600000": 1,
            run + "inf": 4,
            run + "sum_ms": 9_000_000,
            run + "count": 10,
            "run|workload=batch,outcome=error|1000": 1,
            "run|workload=batch,outcome=error|sum_ms": 700,
            "run|workload=batch,outcome=error|count": 1,
            "detect|kind=worker_dead|1000": 1,
            "detect|kind=worker_dead|sum_ms": 812,
            "detect|kind=worker_dead|count": 1,
            "recovery|workload=realtime|2500": 1,
            "recovery|workload=realtime|sum_ms": 1500,
            "queue_wait|workload=realtime|5": 7,
            # Skipped: another label set, an unknown histogram, an unreadable count.
            "run|workload=batch|5": 1,
            "bogus|kind=x|5": 1,
            "detect|kind=stall|oops": 1,
            "detect|kind=stall|5": "many",
        },
    )

    samples = parse(scrape(make_registry(FleetView(ledger))))

    labels = {"workload": "batch", "outcome": "succeeded"}
    buckets = {
        bound: value(
            samples, "gridqueue_attempt_run_seconds_bucket", le=repr(bound / 1000), **labels
        )
        for bound in HIST_BOUNDS_MS
    }
    assert buckets[5] == 2
    assert buckets[10] == buckets[100] == 2
    assert buckets[250] == buckets[1_800_000] == 5
    assert buckets[3_600_000] == 6
    assert value(samples, "gridqueue_attempt_run_seconds_bucket", le="+Inf", **labels) == 10
    assert value(samples, "gridqueue_attempt_run_seconds_count", **labels) == 10
    assert value(samples, "gridqueue_attempt_run_seconds_sum", **labels) == 9000.0
    error = {"workload": "batch", "outcome": "error"}
    assert value(samples, "gridqueue_attempt_run_seconds_bucket", le="0.5", **error) == 0
    assert value(samples, "gridqueue_attempt_run_seconds_bucket", le="1.0", **error) == 1
    assert value(samples, "gridqueue_failover_detect_seconds_sum", kind="worker_dead") == 0.812
    assert value(samples, "gridqueue_failover_detect_seconds_count", kind="worker_dead") == 1
    assert value(samples, "gridqueue_failover_recovery_seconds_count", workload="realtime") == 1
    assert value(samples, "gridqueue_failover_recovery_seconds_sum", workload="realtime") == 1.5
    assert (
        value(samples, "gridqueue_queue_wait_seconds_bucket", le="0.005", workload="realtime") == 7
    )
    # Only the succeeded run times, as celery-exporter observes task-succeeded only.
    task = {"name": "gridqueue.attempt"}
    assert value(samples, "celery_task_runtime_count", **task) == 10
    assert value(samples, "celery_task_runtime_sum", **task) == 9000.0
    assert value(samples, "celery_task_runtime_bucket", le="0.25", **task) == 5
    # The fields that did not fit the layout made no series at all.
    run_series = {
        dict(lbl).get("workload") for n, lbl in samples if n.startswith("gridqueue_attempt_run")
    }
    assert run_series == {"batch"}
    assert value(samples, "gridqueue_failover_detect_seconds_count", kind="stall") is None
    assert value(samples, "gridqueue_ledger_up") == 1


# -- the ledger's verbs move the metrics ----------------------------------------------------


def test_a_job_through_its_life_moves_the_metrics(fast_ledger: Ledger, producer: GridQueue) -> None:
    ledger = fast_ledger
    registry = make_registry(FleetView(ledger))
    epoch = join(ledger, "w1", health=health_document(faults={1: Fault(xid=(13, 13))}))

    before = parse(scrape(registry))
    assert value(before, "gridqueue_workers", state="ALIVE") == 1
    assert value(before, "gridqueue_worker_up", worker="w1") == 1
    assert value(before, "gridqueue_worker_state", worker="w1", state="ALIVE") == 1
    assert value(before, "gridqueue_worker_slots", worker="w1") == 2
    assert value(before, "celery_worker_up", hostname="node-a") == 1
    assert value(before, "gridqueue_model_workers_ready", model=MODEL) == 1
    age = value(before, "gridqueue_worker_heartbeat_age_seconds", worker="w1")
    assert age is not None and 0 <= age < ledger.settings.stale_after_s
    gpu = {"worker": "w1", "gpu": "0"}
    assert value(before, "gridqueue_gpu_memory_total_bytes", **gpu) == 80 * GIB
    assert value(before, "gridqueue_gpu_memory_used_bytes", **gpu) == GIB
    assert value(before, "gridqueue_gpu_utilization_ratio", **gpu) == 0.3
    assert value(before, "gridqueue_gpu_temperature_celsius", **gpu) == 45.0
    assert value(before, "gridqueue_gpu_power_watts", **gpu) == 120.0
    assert value(before, "gridqueue_gpu_xid_errors_total", worker="w1", gpu="1", xid="13") == 2
    assert value(before, "gridqueue_jobs", state="QUEUED") == 0
    assert value(before, "gridqueue_watchdog_leader") == 0

    # Submit: attempt 1 is published to the model's queue, where nobody consumes it yet.
    job = producer.submit(MODEL, {"prompt": "hi"})
    time.sleep(0.05)  # the oldest message's age is measured on Redis server time
    queued = parse(scrape(registry))
    assert value(queued, "gridqueue_jobs", state="QUEUED") == 1
    assert value(queued, "gridqueue_attempts_published_total") == 1
    assert value(queued, "celery_task_sent_total", name="gridqueue.attempt") == 1
    depth = [value(queued, "gridqueue_queue_depth", model=MODEL, priority=p) for p in "0369"]
    assert depth == [0, 1, 0, 0]  # realtime work goes out at priority step 3
    assert value(queued, "celery_queue_length", queue_name=f"gq.model.{MODEL}") == 1
    oldest = value(queued, "gridqueue_queue_oldest_age_seconds", model=MODEL)
    assert oldest is not None and oldest >= 0.05

    # Claim: the job runs on w1. Its message stays in the list (no consumer took it), but
    # it now waits for no one, so the oldest waiting age drops to 0.
    claim = ledger.claim(job.id, 1, "w1", 4001, "")
    assert claim.status == "ok"
    # The worker counts as up (and its attempts as active) while its beat is younger than
    # stale_after_s, half a second here: a busy machine may take that since it joined.
    beat(ledger, "w1", epoch)
    running = parse(scrape(registry))
    assert value(running, "gridqueue_jobs", state="RUNNING") == 1
    assert value(running, "gridqueue_running_attempts") == 1
    assert value(running, "gridqueue_worker_running_attempts", worker="w1") == 1
    assert value(running, "celery_worker_tasks_active", hostname="node-a") == 1
    assert value(running, "gridqueue_claims_total") == 1
    assert value(running, "celery_task_started_total", name="gridqueue.attempt") == 1
    assert value(running, "gridqueue_queue_oldest_age_seconds", model=MODEL) == 0
    assert value(running, "gridqueue_queue_wait_seconds_count", workload="realtime") == 1

    # A second delivery of the running attempt is refused and counted.
    assert ledger.claim(job.id, 1, "w2-ghost", 1, "").status == "fenced"

    assert ledger.complete(job.id, 1, "w1", '{"text":"ok"}')
    beat(ledger, "w1", epoch)
    done = parse(scrape(registry))
    assert value(done, "gridqueue_jobs", state="SUCCEEDED") == 1
    assert value(done, "gridqueue_jobs", state="RUNNING") == 0
    assert value(done, "gridqueue_attempts_ended_total", outcome="succeeded") == 1
    assert value(done, "celery_task_succeeded_total", name="gridqueue.attempt") == 1
    assert (
        value(done, "gridqueue_attempt_run_seconds_count", workload="realtime", outcome="succeeded")
        == 1
    )
    assert value(done, "celery_task_runtime_count", name="gridqueue.attempt") == 1
    assert value(done, "gridqueue_claims_refused_total") == 1
    assert value(done, "celery_task_rejected_total", name="gridqueue.attempt") == 1
    assert value(done, "celery_task_received_total", name="gridqueue.attempt") == 2
    assert value(done, "gridqueue_worker_running_attempts", worker="w1") == 0

    # An operator's quarantine: still up, no longer ready for the model.
    assert ledger.quarantine("w1", by="operator:test", reason="maintenance") == 0
    beat(ledger, "w1", epoch)  # a quarantined worker still heartbeats
    fenced = parse(scrape(registry))
    assert value(fenced, "gridqueue_quarantines_total", kind="operator") == 1
    assert value(fenced, "gridqueue_quarantines_total", kind="health") == 0
    # It moved nothing (w1 ran nothing): a quarantine, not a failover incident.
    assert value(fenced, "gridqueue_failover_incidents_total", kind="operator_quarantine") == 0
    assert value(fenced, "gridqueue_worker_state", worker="w1", state="QUARANTINED") == 1
    assert value(fenced, "gridqueue_worker_up", worker="w1") == 1
    assert value(fenced, "gridqueue_model_workers_ready", model=MODEL) == 0
    assert value(fenced, "gridqueue_workers", state="QUARANTINED") == 1


def test_a_dead_worker_moves_the_failover_metrics(
    fast_ledger: Ledger, fast_settings: Settings, producer: GridQueue
) -> None:
    """w1 goes silent under a running job; a real watchdog declares it dead, the job's
    next attempt runs on w2: detection, recovery and the counters all move."""
    ledger = fast_ledger
    registry = make_registry(FleetView(ledger))
    epoch1 = join(ledger, "w1", host="node-a")
    epoch2 = join(ledger, "w2", host="node-b")
    job = producer.submit(MODEL, {"prompt": "hi"})
    assert ledger.claim(job.id, 1, "w1", 4001, "").status == "ok"

    watchdog = Watchdog(fast_settings, owner="metrics-test")
    try:

        def moved() -> bool:
            beat(ledger, "w2", epoch2)  # w2 lives on; w1 never beats again
            watchdog.tick()
            record = ledger.get(job.id)
            return record.attempt == 2 and record.state is JobState.QUEUED

        wait_for(moved, timeout_s=30, interval_s=0.05)
        assert ledger.claim(job.id, 2, "w2", 4002, "").status == "ok"
        # w1 wakes up: its heartbeat is refused and its late result discarded.
        assert ledger.heartbeat("w1", epoch1, health_document(), "HEALTHY").fenced
        assert not ledger.complete(job.id, 1, "w1", '{"text":"late"}')
        beat(ledger, "w2", epoch2)
        samples = parse(scrape(registry))
    finally:
        watchdog.ledger.client.close()

    assert value(samples, "gridqueue_watchdog_leader") == 1
    assert value(samples, "gridqueue_workers_declared_dead_total") == 1
    assert value(samples, "gridqueue_workers", state="DEAD") == 1
    assert value(samples, "gridqueue_worker_up", worker="w1") == 0
    assert value(samples, "gridqueue_worker_state", worker="w1", state="DEAD") == 1
    assert value(samples, "celery_worker_up", hostname="node-a") == 0
    assert value(samples, "celery_worker_up", hostname="node-b") == 1
    # A dead worker's last GPU readings are not exported as if they were current.
    assert value(samples, "gridqueue_gpu_temperature_celsius", worker="w1", gpu="0") is None
    assert value(samples, "gridqueue_gpu_temperature_celsius", worker="w2", gpu="0") == 45.0
    assert value(samples, "gridqueue_model_workers_ready", model=MODEL) == 1
    assert value(samples, "gridqueue_failover_incidents_total", kind="worker_dead") == 1
    assert value(samples, "gridqueue_attempts_ended_total", outcome="node_lost") == 1
    assert value(samples, "gridqueue_requeues_total") == 1
    assert value(samples, "celery_task_retried_total", name="gridqueue.attempt") == 1
    failed = {"name": "gridqueue.attempt", "exception": "node_lost"}
    assert value(samples, "celery_task_failed_total", **failed) == 1
    detect_s = value(samples, "gridqueue_failover_detect_seconds_sum", kind="worker_dead")
    assert value(samples, "gridqueue_failover_detect_seconds_count", kind="worker_dead") == 1
    # Silence is judged after stale_after, on Redis time: detection cannot be quicker.
    assert detect_s is not None and detect_s >= fast_settings.stale_after_s
    recovery = {"workload": "realtime"}
    assert value(samples, "gridqueue_failover_recovery_seconds_count", **recovery) == 1
    recovery_s = value(samples, "gridqueue_failover_recovery_seconds_sum", **recovery)
    assert recovery_s is not None and recovery_s >= detect_s
    assert value(samples, "gridqueue_queue_wait_seconds_count", workload="realtime") == 2
    assert value(samples, "gridqueue_jobs", state="RUNNING") == 1
    assert value(samples, "gridqueue_worker_running_attempts", worker="w2") == 1
    assert value(samples, "gridqueue_dispatch_overdue_seconds") == 0
    assert value(samples, "gridqueue_heartbeats_refused_total") == 1
    assert value(samples, "gridqueue_stale_results_discarded_total") == 1


def test_workers_gone_past_the_retention_drop_out(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, worker_metrics_retention_s=1.0)
    ledger = Ledger(connect_redis(redis_url), settings)
    try:
        registry = make_registry(FleetView(ledger))
        join(ledger, "stays")
        leaves = join(ledger, "leaves", host="node-b")
        assert ledger.unregister("leaves", leaves)

        gone = parse(scrape(registry))
        assert value(gone, "gridqueue_worker_state", worker="leaves", state="STOPPED") == 1
        assert value(gone, "gridqueue_worker_up", worker="leaves") == 0
        assert value(gone, "celery_worker_up", hostname="node-b") == 0

        stopped_ms = ledger.time_ms()
        wait_for(lambda: ledger.time_ms() - stopped_ms > 1100, timeout_s=10)
        later = parse(scrape(registry))
        assert not [key for key in later if ("worker", "leaves") in key[1]]
        assert value(later, "celery_worker_up", hostname="node-b") is None
        assert value(later, "gridqueue_worker_up", worker="stays") is not None
        # The fleet counts still see it until the ledger forgets it.
        assert value(later, "gridqueue_workers", state="STOPPED") == 1
    finally:
        ledger.client.close()


# -- Redis down --------------------------------------------------------------------------------


def test_redis_down_is_a_metric_not_a_failed_scrape() -> None:
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    ledger = Ledger(connect_redis(settings.redis_url), settings)
    registry = make_registry(FleetView(ledger))

    started = time.monotonic()
    first = parse(scrape(registry))
    second_text = scrape(registry)
    elapsed_s = time.monotonic() - started

    second = parse(second_text)
    assert value(first, "gridqueue_ledger_up") == 0
    assert value(first, "gridqueue_scrape_errors_total", reason="redis") == 1
    assert value(second, "gridqueue_scrape_errors_total", reason="redis") == 2
    assert value(second, "gridqueue_scrape_errors_total", reason="internal") == 0
    # No stale or made-up fleet values while the ledger cannot be read.
    assert not {n for n in names(second) if n.startswith("gridqueue_")} - {
        "gridqueue_ledger_up",
        "gridqueue_scrape_errors_total",
        "gridqueue_scrape_duration_seconds",
    }
    assert not {n for n in names(second) if n.startswith("celery_")}
    # Prometheus's default scrape timeout is 10 s: a refused connection answers well within.
    assert elapsed_s < 10, elapsed_s
    promtool_check_metrics(second_text)
    ledger.client.close()


# -- the exposition as a whole -------------------------------------------------------------------


@pytest.fixture
def busy_fleet(fast_ledger: Ledger, producer: GridQueue) -> Ledger:
    """A fleet with something in every family: workers in several states, GPUs with Xids,
    jobs queued, running and ended, every histogram observed."""
    ledger = fast_ledger
    join(ledger, "w1", health=health_document(faults={0: Fault(xid=(13,))}))
    join(ledger, "w2", host="node-b")
    leaves = join(ledger, "w3", host="node-c")
    jobs = [producer.submit(MODEL, {"prompt": str(i)}) for i in range(4)]
    assert ledger.claim(jobs[0].id, 1, "w1", 4001, "").status == "ok"
    assert ledger.claim(jobs[1].id, 1, "w2", 4002, "").status == "ok"
    assert ledger.complete(jobs[1].id, 1, "w2", '{"text":"ok"}')
    assert ledger.cancel(jobs[2].id)
    assert ledger.unregister("w3", leaves)
    ledger.client.hset(
        ledger.keys.hist,
        mapping={"detect|kind=stall|250": 1, "recovery|workload=realtime|1000": 1},
    )
    return ledger


def test_the_exposition_passes_promtool(busy_fleet: Ledger) -> None:
    text = scrape(make_registry(FleetView(busy_fleet)))
    assert value(parse(text), "gridqueue_ledger_up") == 1
    promtool_check_metrics(text)


def test_every_metric_is_documented(busy_fleet: Ledger) -> None:
    """docs/monitoring.md names every family /metrics exposes (process_* are
    prometheus_client's own)."""
    exposed = set()
    for family in text_string_to_metric_families(scrape(make_registry(FleetView(busy_fleet)))):
        name = family.name + ("_total" if family.type == "counter" else "")
        if not name.startswith("process_"):
            exposed.add(name)
    documented = set(
        re.findall(r"`((?:gridqueue|celery)_[a-z_]+)", DOCS.read_text(encoding="utf-8"))
    )
    assert exposed - documented == set()


# -- scale ---------------------------------------------------------------------------------------


@pytest.fixture
def patient_ledger(redis_url: str) -> Iterator[Ledger]:
    # Building a large fleet takes longer than stale_after: nobody heartbeats meanwhile.
    ledger = Ledger(connect_redis(redis_url), Settings(redis_url=redis_url, stale_after_s=600))
    yield ledger
    ledger.client.close()


def _submit_many(ledger: Ledger, first: int, count: int) -> None:
    pipe = ledger.client.pipeline(transaction=False)
    for i in range(first, first + count):
        args = ledger.submit_args(f"job-{i:06d}", MODEL, "batch", '{"prompt":"p"}', 0, None)
        ledger.queue_call(pipe, "submit", *args)
    for reply in pipe.execute():
        assert reply[1] == "created", reply


def _commands_run_by(ledger: Ledger, action: Callable[[], object]) -> int:
    """Redis commands ``action`` made Redis run (INFO commandstats; one INFO included)."""

    def total() -> int:
        stats = ledger.client.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")

    before = total()
    action()
    return total() - before


def test_a_scrape_of_a_large_fleet_reads_no_job_record(patient_ledger: Ledger) -> None:
    """1,000 workers with 8 GPUs each: a scrape makes the same Redis commands with 2,000
    jobs in the ledger as with 22,000, so it reads no job record and its cost does not grow
    with the jobs. How long it takes is measured by benchmarks/monitor_scale.py (a timed
    bound here would fail on a busy machine, not on a slow scrape)."""
    ledger = patient_ledger
    workers = 1_000
    health = health_document(count=8)
    fit = {MODEL: {"required_bytes": 8 * GIB, "largest_gpu_bytes": 80 * GIB}}
    _submit_many(ledger, 0, 2_000)  # before the workers: a submit's fit check reads them
    epochs = {}
    for i in range(workers):
        name = f"node-{i:04d}"
        epochs[name] = ledger.register(name, [MODEL], 1000 + i, name, 4, "{}", model_fit=fit)
    for name, epoch in epochs.items():
        ledger.heartbeat(name, epoch, health, "HEALTHY")
    for i, name in enumerate(epochs):  # one attempt running on every worker
        assert ledger.claim(f"job-{i:06d}", 1, name, 1000 + i, "").status == "ok"
    registry = make_registry(FleetView(ledger))
    scrape(registry)  # first use: nothing cached, and the same on both sides

    few = _commands_run_by(ledger, lambda: scrape(registry))
    _submit_many(ledger, 2_000, 20_000)
    # A scrape folds the events written since the last fold (the watchdog's tick does,
    # in a fleet): work that follows what happened since, not what the ledger holds.
    ledger.fold_stats()
    texts: list[str] = []
    many = _commands_run_by(ledger, lambda: texts.append(scrape(registry)))

    assert many == few, f"a scrape ran {few} commands with 2,000 jobs, {many} with 22,000"
    samples = parse(texts[0])
    assert value(samples, "gridqueue_jobs", state="QUEUED") == 22_000 - workers
    assert value(samples, "gridqueue_running_attempts") == workers
    assert value(samples, "gridqueue_model_workers_ready", model=MODEL) == workers
    assert value(samples, "gridqueue_gpu_temperature_celsius", worker="node-0999", gpu="7") == 45
