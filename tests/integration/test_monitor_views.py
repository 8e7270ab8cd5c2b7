"""The monitor's read-only views against a real ledger: state written by the ledger's own
verbs (and the watchdog's), read back as the dashboard, the API and /metrics see it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest

from gridqueue.errors import JobNotFoundError, WorkerNotFoundError
from gridqueue.ledger import Ledger
from gridqueue.monitor.views import FleetView
from gridqueue.settings import Settings
from gridqueue.states import JobState, Outcome
from gridqueue.watchdog import Watchdog
from tests.helpers import GIB, hist_count, register_sim_worker

pytestmark = pytest.mark.integration

PAYLOAD = '{"prompt":"p"}'


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"stale_after_s": 0.3, "heartbeat_interval_s": 0.05, "watchdog_lease_s": 60.0}
    )


def test_a_dead_worker_is_one_incident_followed_to_its_jobs_running_again(fast: Settings) -> None:
    watchdog = Watchdog(fast, owner="views")
    ledger = watchdog.ledger
    view = FleetView(ledger)
    epochs = {name: register_sim_worker(ledger, name) for name in ("w1", "w2")}
    for n in range(3):
        ledger.submit(f"j{n}", "sim-llm", "realtime", PAYLOAD, 0, None)
    for n in range(2):
        assert ledger.claim(f"j{n}", 1, "w1", 7, "").status == "ok"
    assert ledger.claim("j2", 1, "w2", 8, "").status == "ok"
    assert ledger.complete("j2", 1, "w2", '{"ok": true}')

    # w1 goes silent; w2 keeps beating. The watchdog declares w1 dead and requeues.
    deadline = time.monotonic() + 10
    while ledger.worker("w1").state.value != "DEAD":  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "w1 was never declared dead"
        ledger.heartbeat("w2", epochs["w2"])
        watchdog.tick()
        time.sleep(0.05)
    watchdog.tick()
    for n in range(2):
        assert ledger.get(f"j{n}").state is JobState.QUEUED
    assert ledger.claim("j0", 2, "w2", 9, "").status == "ok"

    incidents = view.failovers()
    assert [i["kind"] for i in incidents] == ["worker_dead"]
    incident = incidents[0]
    assert incident["worker"] == "w1"
    assert incident["jobs_moved"] == 2
    assert incident["detect_ms"] >= 300  # silent at least stale_after_s
    rows = {row["job"]: row for row in incident["attempts"]}
    assert set(rows) == {"j0", "j1"}
    assert rows["j0"]["outcome"] == Outcome.NODE_LOST.value
    assert rows["j0"]["requeued_ms"] >= incident["verdict_ms"]
    assert rows["j0"]["next_attempt"] == 2
    assert rows["j0"]["running_again_ms"] >= rows["j0"]["requeued_ms"]
    assert rows["j1"]["running_again_ms"] is None  # still waiting for a worker
    assert incident["pending"] == 1
    assert incident["running_again_ms"] is None  # not every moved job runs again yet

    # The histograms the scripts keep: one detection, one recovery, three queue waits.
    hist = ledger.histograms()
    assert hist_count(hist, "detect|kind=worker_dead") == 1
    assert int(hist["detect|kind=worker_dead|sum_ms"]) == incident["detect_ms"]
    assert hist_count(hist, "recovery|workload=realtime") == 1
    assert hist_count(hist, "queue_wait|workload=realtime") == 4
    assert hist_count(hist, "run|workload=realtime,outcome=succeeded") == 1
    assert hist_count(hist, "run|workload=realtime,outcome=node_lost") == 2

    # The job's timeline carries the fault's sign on the attempt the failover moved.
    timeline = view.job("j0")["timeline"]
    assert [row["n"] for row in timeline] == [1, 2]
    assert timeline[0]["fault_ms"] == incident["sign_ms"]
    assert timeline[0]["outcome"] == "node_lost" and timeline[1]["worker"] == "w2"

    # The worker's page: its history, newest first, and the overview's counts and rates.
    dead = view.worker("w1")
    assert dead["state"] == "DEAD" and dead["gone_ms"] is not None
    kinds = [event["type"] for event in dead["history"]]
    assert kinds[0] == "worker_dead" and "worker_registered" in kinds
    overview = view.overview()
    assert overview["workers"]["ALIVE"] == 1 and overview["workers"]["DEAD"] == 1
    assert overview["jobs"]["RUNNING"] == 1 and overview["jobs"]["QUEUED"] == 1
    assert overview["running_attempts"] == 1
    assert sum(row["requeues"] for row in overview["rates"]["per_minute"]) == 2
    assert overview["queues"][0]["model"] == "sim-llm"
    assert overview["watchdog"]["leader"] == "views"
    alive = next(w for w in view.workers() if w["name"] == "w2")
    assert alive["gpus"][0]["memory_used_bytes"] == 9 * GIB
    assert alive["running"] == ["j0.2"] and alive["heartbeat_age_ms"] is not None
    # A worker's jobs are the ones any attempt of which it ran, moved or not.
    assert {job["id"] for job in view.jobs(worker="w1")["jobs"]} == {"j0", "j1"}
    assert {job["id"] for job in view.jobs(worker="w2")["jobs"]} == {"j0", "j2"}
    assert [job["id"] for job in view.jobs(worker="w2", state="SUCCEEDED")["jobs"]] == ["j2"]
    with pytest.raises(WorkerNotFoundError):
        view.worker("nobody")
    with pytest.raises(JobNotFoundError):
        view.job("nothing")


def test_job_pages_walk_every_job_once_newest_first_with_filters(ledger: Ledger) -> None:
    register_sim_worker(ledger, "w1")
    for n in range(30):
        workload = "batch" if n % 3 else "realtime"
        ledger.submit(f"j{n:02d}", "sim-llm", workload, PAYLOAD, 0, None)
    for n in range(0, 30, 2):
        assert ledger.claim(f"j{n:02d}", 1, "w1", 7, "").status == "ok"
    for n in range(0, 30, 4):
        assert ledger.complete(f"j{n:02d}", 1, "w1", "1")
    view = FleetView(ledger)

    seen: list[str] = []
    cursor = None
    while True:
        page = view.jobs(limit=7, cursor=cursor)
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == [f"j{n:02d}" for n in range(30)]
    assert len(seen) == len(set(seen))

    running = view.jobs(state="running", limit=50)["jobs"]
    assert {job["id"] for job in running} == {f"j{n:02d}" for n in range(2, 30, 4)}
    done = view.jobs(state="SUCCEEDED", workload="realtime")["jobs"]
    assert {job["id"] for job in done} == {f"j{n:02d}" for n in range(0, 30, 12)}
    by_worker = view.jobs(worker="w1", limit=100)["jobs"]
    assert len(by_worker) == 15
    assert view.jobs(model="other-model")["jobs"] == []
    with pytest.raises(ValueError, match="unknown job state"):
        view.jobs(state="sleeping")
    with pytest.raises(ValueError, match="malformed cursor"):
        view.jobs(cursor="yesterday")
    with pytest.raises(ValueError, match="limit"):
        view.jobs(limit=0)


def test_dead_letters_are_grouped_by_reason_with_their_evidence(ledger: Ledger) -> None:
    for name in ("w1", "w2", "w3"):
        register_sim_worker(ledger, name)
    ledger.submit("poison", "sim-llm", "batch", PAYLOAD, 0, None)
    for attempt, worker in enumerate(("w1", "w2", "w3"), start=1):
        assert ledger.claim("poison", attempt, worker, 7, "").status == "ok"
        ledger.end_attempt("poison", attempt, Outcome.WORKER_LOST, worker=worker, pid=7)
    assert ledger.get("poison").state is JobState.DEAD_LETTERED

    letters = FleetView(ledger).dead_letters()
    assert letters["total"] == 1
    [group] = letters["groups"]
    assert group["count"] == 1 and group["reason"] == ledger.get("poison").reason
    evidence = group["jobs"][0]["evidence"]
    assert [(e["worker"], e["outcome"]) for e in evidence] == [
        ("w1", "worker_lost"),
        ("w2", "worker_lost"),
        ("w3", "worker_lost"),
    ]
    assert FleetView(ledger).dead_letters(reason="no such reason")["groups"] == []
    assert ledger.stats()["dead_lettered"] == 1


def test_the_cli_mirrors_the_views(ledger: Ledger, settings: Settings) -> None:
    register_sim_worker(ledger, "w1")
    for n in range(3):
        ledger.submit(f"j{n}", "sim-llm", "batch", PAYLOAD, 0, None)
    assert ledger.claim("j1", 1, "w1", 7, "").status == "ok"
    ledger.quarantine("w1", by="op", reason="maintenance")

    def cli(*args: str) -> Any:
        out = subprocess.run(
            [sys.executable, "-m", "gridqueue.cli", *args, "--json", "--redis", settings.redis_url],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(out.stdout)

    view = FleetView(ledger)
    assert cli("jobs", "--state", "queued") == view.jobs(state="QUEUED")
    assert [j["id"] for j in cli("jobs", "--worker", "w1")["jobs"]] == ["j1"]
    [incident] = cli("failovers")
    assert incident == view.failovers()[0]
    assert incident["kind"] == "operator_quarantine" and incident["jobs_moved"] == 1
    argv = ["jobs", "--state", "asleep", "--redis", settings.redis_url]
    bad = subprocess.run(
        [sys.executable, "-m", "gridqueue.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown job state 'asleep'" in bad.stderr


def test_incidents_count_what_moved_once(fast: Settings) -> None:
    """A drain made an evacuation is one quarantine; a node that dies after its work was
    evacuated moves nothing twice; an operator's quarantine of an idle node is no
    incident and adds nothing to detect times."""
    watchdog = Watchdog(fast, owner="views")
    ledger = watchdog.ledger
    view = FleetView(ledger)
    register_sim_worker(ledger, "w1")
    register_sim_worker(ledger, "idle")
    ledger.submit("j", "sim-llm", "batch", PAYLOAD, 0, None)
    assert ledger.claim("j", 1, "w1", 7, "").status == "ok"
    assert ledger.quarantine("idle", by="op", reason="maintenance") == 0
    assert ledger.quarantine("w1", by="op", reason="drain", drain=True) == 0
    assert ledger.quarantine("w1", by="op", reason="now", drain=False) == 1
    stats = ledger.stats()
    assert stats["quarantines:operator"] == 2  # idle once, w1 once
    assert [(i["worker"], i["jobs_moved"]) for i in view.failovers()] == [("w1", 1)]
    assert "detect|kind=operator_quarantine|count" not in ledger.histograms()

    token = ledger.lease("views", 60_000)[1]
    time.sleep(fast.stale_after_s * 1.5)
    assert ledger.declare_dead("w1", token) == 1
    dead = view.failovers()[0]
    assert dead["kind"] == "worker_dead" and dead["jobs_moved"] == 0 and dead["attempts"] == []
