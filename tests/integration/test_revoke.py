"""A Celery revoke of an attempt, as a gridqueue worker handles it, against a real ledger
(the fleet end to end is in test_flower.py): every case that is not "cancel the job" is
refused with its reason and leaves the job as it was."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
from celery.worker import control
from celery.worker import state as worker_state

from gridqueue.celeryapp import make_celery
from gridqueue.keys import attempt_id
from gridqueue.ledger import Ledger
from gridqueue.revoke import REVOKED_REASON, make_revoke, revoke_attempt
from gridqueue.states import JobState

pytestmark = pytest.mark.integration

PAYLOAD = '{"prompt":"p","ms":10}'
FIT = {"sim-llm": {"required_bytes": 0, "largest_gpu_bytes": 1}}


def submit(ledger: Ledger, job_id: str) -> str:
    ledger.submit(job_id, "sim-llm", "realtime", PAYLOAD, 60_000, None)
    return job_id


def test_a_queued_attempt_is_cancelled_by_a_plain_revoke(ledger: Ledger) -> None:
    job = submit(ledger, "j-queued")
    answer = revoke_attempt(ledger, attempt_id(job, 1), terminate=False)
    assert answer is not None and answer.cancelled and answer.ok
    record = ledger.get(job)
    assert (record.state, record.reason) == (JobState.CANCELLED, REVOKED_REASON)
    # The same revoke reaching another worker: nothing more to do, and it says so.
    again = revoke_attempt(ledger, attempt_id(job, 1), terminate=False)
    assert again is not None and again.ok and not again.cancelled
    assert "already CANCELLED" in again.message


def test_a_running_attempt_needs_terminate_and_then_its_child_is_ordered_killed(
    ledger: Ledger,
) -> None:
    ledger.register("w1", ["sim-llm"], os.getpid(), "node-a", 1, "{}", model_fit=FIT)
    job = submit(ledger, "j-running")
    assert ledger.claim(job, 1, "w1", os.getpid(), "tag-1").status == "ok"
    before = ledger.get(job)

    refused = revoke_attempt(ledger, attempt_id(job, 1), terminate=False)
    assert refused is not None and not refused.ok and "with terminate" in refused.message
    assert ledger.get(job) == before

    done = revoke_attempt(ledger, attempt_id(job, 1), terminate=True)
    assert done is not None and done.cancelled and done.was_running
    assert ledger.get(job).state is JobState.CANCELLED
    # The ledger's kill order, which the worker agent obeys on its next heartbeat.
    assert ledger.client.sismember(ledger.keys.worker_kill("w1"), attempt_id(job, 1))


def test_a_superseded_or_ended_attempt_is_refused_and_the_job_unchanged(ledger: Ledger) -> None:
    job = submit(ledger, "j-ended")
    ledger.client.hset(ledger.keys.job(job), "attempt", "2")  # attempt 2 replaced attempt 1
    before = ledger.get(job)
    stale = revoke_attempt(ledger, attempt_id(job, 1), terminate=True)
    assert stale is not None and not stale.ok and "not job j-ended's current" in stale.message
    assert ledger.get(job) == before

    assert ledger.cancel(job)
    ended = ledger.get(job)
    assert not revoke_attempt(ledger, attempt_id(job, 2), terminate=True).ok  # type: ignore[union-attr]
    assert ledger.get(job) == ended


def test_ids_the_ledger_does_not_know_go_to_celerys_own_revoke(ledger: Ledger) -> None:
    """Celery's own revoke flags them in the worker's revoked set; an attempt the ledger
    cancelled is not flagged there (Celery must not discard or terminate it itself)."""
    revoke = make_revoke(lambda: ledger, control.revoke)  # Celery's own, as installed
    app = make_celery(ledger.settings.redis_url)
    state = SimpleNamespace(app=app, consumer=None)  # no task held: nothing to terminate
    job = submit(ledger, "j-mixed")
    foreign = "1480b55c-b8b2-462c-985e-24af3e9158f9"
    try:
        reply = revoke(state, [attempt_id(job, 1), foreign, "gone.1"], terminate=True)
    finally:
        app.close()
    assert "cancelled through the ledger" in reply["ok"], reply
    assert ledger.get(job).state is JobState.CANCELLED
    assert {foreign, "gone.1"} <= set(worker_state.revoked)
    assert attempt_id(job, 1) not in worker_state.revoked


def test_the_ledger_checks_the_attempt_and_the_cancel_in_one_step(ledger: Ledger) -> None:
    """What a revoke read can be stale by the time it cancels: the cancel itself refuses
    an attempt that was superseded, or claimed when the revoke does not terminate."""
    ledger.register("w1", ["sim-llm"], os.getpid(), "node-a", 1, "{}", model_fit=FIT)
    job = submit(ledger, "j-race")
    assert ledger.claim(job, 1, "w1", os.getpid(), "tag-1").status == "ok"
    before = ledger.get(job)
    assert ledger.cancel_attempt(job, 1, REVOKED_REASON, running_ok=False) == "running"
    assert ledger.cancel_attempt(job, 2, REVOKED_REASON, running_ok=True) == "superseded"
    assert ledger.get(job) == before
    assert ledger.cancel_attempt(job, 1, REVOKED_REASON, running_ok=True) == "ok"
    assert ledger.get(job).state is JobState.CANCELLED
    assert ledger.cancel_attempt(job, 1, REVOKED_REASON, running_ok=True) == "stale"
    assert ledger.cancel_attempt("nothing", 1, REVOKED_REASON, running_ok=True) == "unknown"
