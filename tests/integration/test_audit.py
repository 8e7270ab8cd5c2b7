"""The audit counts what could go wrong: handler runs as the handler counted them, and
visible results checked against the attempts that produced them, on a real Redis and a
real worker. Where a real run cannot produce the fault (the ledger's compare-and-set
prevents it), the test writes the broken state itself and checks the audit sees it."""

from __future__ import annotations

import json

import pytest

from gridqueue import GridQueue
from gridqueue.audit import RETURNS_KEY, RUNS_KEY, Seen, audit, count_run, run_counts
from gridqueue.fleet import LocalFleet
from gridqueue.ledger import Ledger

pytestmark = pytest.mark.integration


def test_a_run_counts_once_per_token_and_expires(ledger: Ledger) -> None:
    client, ns = ledger.client, ledger.settings.namespace

    assert count_run(client, ns, "job-a", 1, "run-1", ttl_s=60) == 1
    assert count_run(client, ns, "job-a", 1, "run-1", ttl_s=60) == 1  # a retried count
    assert count_run(client, ns, "job-a", 2, "run-2", ttl_s=60) == 2  # a second run
    assert count_run(client, ns, "job-a", 2, "run-2", ttl_s=60, returned=True) == 1

    assert run_counts(client, ns, ["job-a", "job-b"]) == {"job-a": 2, "job-b": 0}
    assert run_counts(client, ns, ["job-a"], returned=True) == {"job-a": 1}
    for key in (RUNS_KEY, RETURNS_KEY):
        assert 0 < int(client.ttl(key.format(ns=ns))) <= 60  # bounded lifetime


def test_a_job_missing_from_the_ledger_is_lost(ledger: Ledger) -> None:
    result = audit(ledger, ["no-such-job"])

    assert result.lost == ["no-such-job"] and result.missing == ["no-such-job"]


def test_audit_counts_real_runs_and_catches_what_the_ledger_would_not_show(
    fleet: LocalFleet, gq: GridQueue
) -> None:
    fleet.start_worker("w1", concurrency=2)
    fleet.wait_alive(gq.ledger, ["w1"])
    exclusive = gq.submit("sim-llm", {"prompt": "charge", "ms": 50}, workload="exclusive")
    plain = gq.submit("sim-llm", {"prompt": "plain", "ms": 50})
    seen = {}
    for job in (exclusive, plain):
        result = job.result(timeout=60)
        seen[job.id] = Seen("SUCCEEDED", result)
    ids = [exclusive.id, plain.id]

    clean = audit(gq.ledger, ids, seen)

    assert clean.lost == [] and clean.duplicates == [] and clean.succeeded == 2
    assert clean.exclusive_classes == ["exclusive"] and clean.exclusive_jobs == 1
    assert clean.handler_runs == 2 and clean.handler_returns == 2  # counted by the handler
    assert clean.exclusive_runs_over_one == [] and clean.succeeded_uncounted == []

    # A second delivery of the exclusive job started its handler again: a double run,
    # whatever the ledger's attempts say.
    ledger = gq.ledger
    ns = ledger.settings.namespace
    count_run(ledger.client, ns, exclusive.id, 1, "second-delivery", ttl_s=60)
    assert audit(ledger, ids, seen).exclusive_runs_over_one == [exclusive.id]

    # The producer read one result; the ledger now shows another.
    changed = {**seen, plain.id: Seen("SUCCEEDED", {"text": "something else"})}
    result = audit(ledger, ids, changed)
    assert result.duplicates == [plain.id]
    assert result.duplicate_reasons == {"visible result changed after the producer read it": 1}

    # A visible result stamped by an attempt that did not succeed, and a second succeeded
    # attempt: states the ledger's compare-and-set never writes, written by hand.
    key = ledger.keys.job(plain.id)
    stored = json.loads(ledger.client.hget(key, "result"))
    ledger.client.hset(key, "result", json.dumps({**stored, "attempt": 3}))
    result = audit(ledger, ids)
    assert result.duplicates == [plain.id]
    assert result.duplicate_reasons == {"result from an attempt that did not succeed": 1}
    ledger.client.hset(key, "result", json.dumps(stored))
    second = {**json.loads(ledger.client.hget(key, "a:1")), "n": 2}
    ledger.client.hset(key, "a:2", json.dumps(second))
    result = audit(ledger, ids)
    assert result.duplicates == [plain.id]
    assert result.duplicate_reasons["more than one succeeded attempt"] == 1
    assert result.duplicate_reasons["succeeded attempt is not the job's current attempt"] == 1

    # A success the handler never counted: the run counters are not being written.
    ledger.client.delete(RUNS_KEY.format(ns=ns))
    assert audit(ledger, ids).succeeded_uncounted == sorted(ids)
