"""The metrics module without a server: its mapping of the ledger's counters and
histograms is checked against what the Lua scripts actually write, and each family builder
against plain data in the shapes FleetView returns."""

from __future__ import annotations

import math
import re
from importlib import resources
from typing import Any

from prometheus_client.core import Metric

from gridqueue.monitor.metrics import (
    HIST_BOUNDS_MS,
    HISTOGRAMS,
    INCIDENT_KINDS,
    LABELLED_COUNTERS,
    QUARANTINE_KINDS,
    STAT_COUNTERS,
    counter_families,
    gpu_families,
    histogram_family,
    parse_histograms,
    worker_families,
)
from gridqueue.states import Outcome


def lua_sources() -> dict[str, str]:
    folder = resources.files("gridqueue.lua")
    return {
        entry.name: entry.read_text(encoding="utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".lua")
    }


def samples(families: list[Metric], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in families
        for s in family.samples
        if s.name == name
    }


# -- the mapping covers what the scripts write --------------------------------------------------


def test_every_counter_the_scripts_bump_is_exported() -> None:
    """A new counter in a script fails here until it is given a metric name and a meaning
    in STAT_COUNTERS (or a label in LABELLED_COUNTERS)."""
    text = "\n".join(lua_sources().values())
    literal = set(re.findall(r"\bbump\('([a-z_]+)'\)", text))
    literal |= set(re.findall(r"\bcount_now\(\{([a-z_]+) =", text))  # written at once
    prefixes = set(re.findall(r"\bbump\('([a-z_]+:)'\s*\.\.", text))
    assert literal, "no bump('...') found in the scripts: did the counter helper change?"
    assert literal - {stat for stat, _, _ in STAT_COUNTERS} == set()
    assert prefixes == {prefix for prefix, *_ in LABELLED_COUNTERS}


def test_every_incident_and_quarantine_kind_is_a_known_label() -> None:
    sources = lua_sources()
    text = "\n".join(sources.values())
    kinds = set(re.findall(r"\bincident\('([a-z_]+)'", text))
    for line in text.splitlines():
        if re.search(r"\bincident_kind\s*=", line):
            # The values assigned, not those compared with (mode == 'evacuate').
            kinds |= set(re.findall(r"(?:[^=~<>]=|\band|\bor)\s*'([a-z_]+)'", line))
    assert kinds == set(INCIDENT_KINDS)

    quarantine = sources["_common.lua"].split("local function quarantine(", 1)[1]
    quarantine = quarantine.split("bump('quarantines:'", 1)[0]
    by_kind = {
        word
        for line in quarantine.splitlines()
        if re.search(r"\bkind\b", line) and "incident_kind" not in line
        for word in re.findall(r"'([a-z_]+)'", line)
    }
    assert by_kind == set(QUARANTINE_KINDS)


def test_the_histograms_match_what_the_scripts_observe() -> None:
    sources = lua_sources()
    bounds = re.search(r"HIST_BOUNDS_MS\s*=\s*\{([^}]*)\}", sources["_common.lua"])
    assert bounds is not None
    assert tuple(int(b) for b in re.findall(r"\d+", bounds.group(1))) == HIST_BOUNDS_MS

    specs = {spec.key: spec for spec in HISTOGRAMS}
    seen = set()
    for text in sources.values():
        for key, labels_arg in re.findall(
            r"\bobserve\('([a-z_]+)',\s*([^,]+(?:,[^,]*?)?)\s*,\s*NOW", text
        ):
            if re.fullmatch(r"[a-z_]+", labels_arg.strip()):  # a local: read its definition
                found = re.search(rf"local {labels_arg.strip()}\s*=\s*(.*)", text)
                assert found is not None, labels_arg
                labels_arg = found.group(1)
            names = tuple(re.findall(r"'[,]?([a-z_]+)=", labels_arg))
            assert key in specs, key
            assert names == specs[key].labels, (key, names)
            seen.add(key)
    assert seen == set(specs)


# -- histograms ---------------------------------------------------------------------------------


def test_a_histogram_is_cumulative_in_seconds_and_keeps_an_unknown_bound() -> None:
    parsed = parse_histograms(
        {
            # Labels in another order are the same series.
            "run|outcome=error,workload=batch|5": "1",
            "run|workload=batch,outcome=error|7": "2",  # a bound the ledger may add one day
            "run|workload=batch,outcome=error|inf": "1",
            "run|workload=batch,outcome=error|sum_ms": "1500",
            "run|workload=batch,outcome=error|count": "999",  # the buckets decide
        }
    )
    series = parsed["run"]
    assert list(series) == [("batch", "error")]
    family = histogram_family("x_seconds", "help", ("workload", "outcome"), series)
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets["0.005"] == 1
    assert buckets["0.007"] == 3
    assert buckets["0.01"] == 3
    assert buckets["3600.0"] == 3
    assert buckets["+Inf"] == 4
    les = [s.labels["le"] for s in family.samples if s.name == "x_seconds_bucket"]
    assert les[-1] == "+Inf"
    assert [float(le) for le in les[:-1]] == sorted(float(le) for le in les[:-1])
    count = [s.value for s in family.samples if s.name == "x_seconds_count"]
    total = [s.value for s in family.samples if s.name == "x_seconds_sum"]
    assert count == [4] and total == [1.5]


def test_no_series_without_a_single_readable_field() -> None:
    parsed = parse_histograms({"detect|kind=stall|soon": "1", "detect|kind=stall|5": "x"})
    assert parsed["detect"] == {}


# -- counters ------------------------------------------------------------------------------------


def test_counters_start_at_zero_and_map_to_celery_exporter_names() -> None:
    stats = {
        "claims": 10,
        "claims_refused": 1,
        "claims_deferred": 2,
        "stale_deliveries": 3,
        "duplicate_deliveries": 4,
        "attempts_published": 12,
        "requeues": 5,
        "attempts_ended:succeeded": 6,
        "attempts_ended:node_lost": 2,
        "attempts_ended:error": 1,
        "attempts_ended:cancelled": 1,
        "attempts_ended:expired": 1,
        "quarantines:health": 2,
        "quarantines:surprise": 9,  # a kind nobody mapped: not exported under a guess
        "something_new": 1,
    }
    families = counter_families(stats)
    task = (("name", "gridqueue.attempt"),)
    assert samples(families, "gridqueue_claims_total") == {(): 10}
    assert samples(families, "gridqueue_dead_letters_total") == {(): 0}
    assert samples(families, "gridqueue_quarantines_total") == {
        (("kind", "health"),): 2,
        (("kind", "watchdog"),): 0,
        (("kind", "operator"),): 0,
    }
    ended = samples(families, "gridqueue_attempts_ended_total")
    assert set(ended) == {(("outcome", o.value),) for o in Outcome}
    assert samples(families, "celery_task_sent_total") == {task: 12}
    assert samples(families, "celery_task_started_total") == {task: 10}
    assert samples(families, "celery_task_rejected_total") == {task: 10}
    assert samples(families, "celery_task_received_total") == {task: 20}
    assert samples(families, "celery_task_succeeded_total") == {task: 6}
    assert samples(families, "celery_task_retried_total") == {task: 5}
    assert samples(families, "celery_task_revoked_total") == {task: 2}
    failed = samples(families, "celery_task_failed_total")
    assert failed[(("exception", "node_lost"), *task)] == 2
    assert failed[(("exception", "error"), *task)] == 1
    assert sum(failed.values()) == 3
    exported = {s.name for f in families for s in f.samples}
    assert not any("something_new" in name or "surprise" in name for name in exported)


# -- workers and GPUs -----------------------------------------------------------------------------


def worker(name: str, state: str, age_ms: int | None, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "state": state,
        "heartbeat_age_ms": age_ms,
        "running": [],
        "concurrency": 2,
        "models": ["sim-llm"],
        "host": "node-a",
        "gpus": [],
        **extra,
    }


def test_workers_on_one_host_share_its_celery_series() -> None:
    workers = [
        worker("a", "ALIVE", 100, running=["j1.1", "j2.1"]),
        worker("b", "QUARANTINED", 100, running=["j3.1"]),
        worker("c", "ALIVE", 5_000, running=["j4.1"]),  # silent: not up, not active
        worker("d", "DEAD", 60_000, host="node-b"),
    ]
    families = worker_families(workers, stale_after_ms=1_000)
    up = samples(families, "gridqueue_worker_up")
    assert up == {
        (("worker", "a"),): 1,
        (("worker", "b"),): 1,
        (("worker", "c"),): 0,
        (("worker", "d"),): 0,
    }
    assert samples(families, "celery_worker_up") == {
        (("hostname", "node-a"),): 1,
        (("hostname", "node-b"),): 0,
    }
    assert samples(families, "celery_worker_tasks_active") == {
        (("hostname", "node-a"),): 3,
        (("hostname", "node-b"),): 0,
    }
    assert samples(families, "gridqueue_worker_state")[(("state", "DEAD"), ("worker", "d"))] == 1
    assert len(samples(families, "gridqueue_worker_state")) == len(workers)
    ages = samples(families, "gridqueue_worker_heartbeat_age_seconds")
    assert ages[(("worker", "c"),)] == 5.0


def test_gpu_readings_of_live_workers_only_and_no_made_up_zeros() -> None:
    reading = {
        "index": 0,
        "memory_used_bytes": 2**30,
        "memory_total_bytes": 80 * 2**30,
        "utilization_ratio": 0.5,
        "temperature_c": 61.5,
        "power_w": None,  # the driver does not offer it
        "xid_counts": {"79": 1, "13": 4},
    }
    lost = {"index": 1, "lost": True, "xid_counts": {"79": 2}}
    odd = [{"index": True}, {"index": "2"}, "not a reading"]
    families = gpu_families(
        [
            worker("a", "ALIVE", 100, gpus=[reading, lost, *odd]),
            worker("d", "DEAD", 60_000, gpus=[reading]),
        ]
    )
    assert samples(families, "gridqueue_gpu_temperature_celsius") == {
        (("gpu", "0"), ("worker", "a")): 61.5
    }
    assert samples(families, "gridqueue_gpu_power_watts") == {}
    assert samples(families, "gridqueue_gpu_utilization_ratio") == {
        (("gpu", "0"), ("worker", "a")): 0.5
    }
    assert samples(families, "gridqueue_gpu_xid_errors_total") == {
        (("gpu", "0"), ("worker", "a"), ("xid", "13")): 4,
        (("gpu", "0"), ("worker", "a"), ("xid", "79")): 1,
        (("gpu", "1"), ("worker", "a"), ("xid", "79")): 2,
    }
    assert not any(math.isnan(s.value) for f in families for s in f.samples)
