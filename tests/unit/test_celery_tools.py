"""What Celery's tools and Flower rely on, without a server: the queue separator, the
events switch, the importable app, and the Celery state each ledger verdict maps to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest
from celery import states
from kombu.transport import redis as kombu_redis

from gridqueue.celeryapp import QUEUE_SEP, make_celery, priority_lists
from gridqueue.celerystate import NodeLostAnnouncer, verdict_of
from gridqueue.errors import InvalidModelError
from gridqueue.handlers import check_model_name
from gridqueue.records import JobRecord
from gridqueue.worker import celery_worker_argv

URL = "redis://127.0.0.1:1/0"  # nothing listens there: nothing here may connect


def test_the_fleet_uses_kombus_own_separator_as_stock_clients_do() -> None:
    assert QUEUE_SEP == kombu_redis.Channel.sep == "\x06\x16"
    # Not set: a stock `celery --broker URL ...` client and the fleet cannot differ.
    assert "sep" not in make_celery(URL).conf.broker_transport_options
    assert priority_lists("gq.model.m") == [
        "gq.model.m",
        "gq.model.m\x06\x163",
        "gq.model.m\x06\x166",
        "gq.model.m\x06\x169",
    ]


@pytest.mark.parametrize("model", ["x:unfit", "x\x06\x163", "x\x163"])
def test_a_model_name_that_could_alias_another_models_keys_is_refused(model: str) -> None:
    with pytest.raises(InvalidModelError, match="ledger's key names"):
        check_model_name(model)


def test_events_follow_the_setting_and_are_json() -> None:
    on, off = make_celery(URL, events=True).conf, make_celery(URL, events=False).conf
    assert on.worker_send_task_events and on.task_send_sent_event
    assert not off.worker_send_task_events and not off.task_send_sent_event
    for conf in (on, off):
        assert conf.event_serializer == "json" and conf.accept_content == ["json"]
    # The event heartbeat is what tells Flower a worker is online.
    assert "--without-heartbeat" not in celery_worker_argv("w1", ["q"], 2, "INFO", True)
    assert "--without-heartbeat" in celery_worker_argv("w1", ["q"], 2, "INFO", False)


def test_the_importable_app_reads_the_environment_and_connects_to_nothing() -> None:
    env = {**os.environ, "GRIDQUEUE_REDIS_URL": URL, "GRIDQUEUE_CELERY_EVENTS": "false"}
    code = (
        "import json; from gridqueue.app import app; c = app.conf; "
        "print(json.dumps([c.broker_url, c.worker_send_task_events, "
        "c.broker_transport_options['visibility_timeout']]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    broker, events, visibility = json.loads(done.stdout)
    assert (broker, events) == (URL, False)
    assert visibility >= 10 * 365 * 86_400  # a long-lived tool never redelivers an attempt


# -- the Celery state of each ledger verdict ---------------------------------------------


def record(state: str, current: int, *attempts: dict[str, Any], reason: str = "") -> JobRecord:
    data = {
        "id": "j",
        "model": "sim-llm",
        "workload": "realtime",
        "state": state,
        "attempt": str(current),
        "payload": "{}",
        "created_ms": "1",
        "reason": reason,
        "worker": "w1",
    }
    for attempt in attempts:
        data[f"a:{attempt['n']}"] = json.dumps(attempt)
    return JobRecord.from_hash(data)


@pytest.mark.parametrize(
    ("outcome", "celery_state", "expired"),
    [
        ("succeeded", states.SUCCESS, False),
        ("error", states.FAILURE, False),
        ("invalid_input", states.FAILURE, False),
        ("worker_lost", states.FAILURE, False),
        ("node_lost", states.FAILURE, False),
        ("stalled", states.FAILURE, False),
        ("gpu_fault", states.FAILURE, False),
        ("evacuated", states.FAILURE, False),
        ("cancelled", states.REVOKED, False),
        ("expired", states.REVOKED, True),
    ],
)
def test_an_ended_attempt_takes_the_state_of_its_outcome(
    outcome: str, celery_state: str, expired: bool
) -> None:
    job = record("QUEUED", 2, {"n": 1, "outcome": outcome, "error": "why"}, {"n": 2})
    verdict = verdict_of(job, 1)
    assert (verdict.state, verdict.expired) == (celery_state, expired)
    assert verdict.detail.startswith(f"{outcome}: why; job QUEUED as attempt 2")


def test_an_attempt_without_an_outcome_takes_its_state_from_the_job() -> None:
    running = record("RUNNING", 1, {"n": 1, "worker": "w1"})
    assert verdict_of(running, 1).state is None  # a second delivery: the running one speaks
    # Refused at claim (a fenced, quarantined or avoided node): the ledger publishes it again.
    assert verdict_of(record("QUEUED", 1, {"n": 1}), 1).state == states.RETRY
    assert verdict_of(record("CANCELLED", 1, {"n": 1}), 1).state == states.REVOKED
    expired = verdict_of(record("EXPIRED", 1, {"n": 1}), 1)
    assert (expired.state, expired.expired) == (states.REVOKED, True)
    assert verdict_of(record("FAILED", 1, {"n": 1}), 1).state == states.FAILURE
    superseded = verdict_of(record("RUNNING", 3, {"n": 2}, {"n": 3}), 2)
    assert superseded.state == states.FAILURE and "superseded by attempt 3" in superseded.detail
    assert verdict_of(None, 1).state == states.FAILURE  # no such job


class _Recording(NodeLostAnnouncer):
    """The announcer with its send step recording instead of reading the ledger and
    publishing: what is under test is when the thread sends, not what."""

    def __init__(self) -> None:
        super().__init__(app=None, ledger=None, enabled=True)  # type: ignore[arg-type]
        self.sent: list[tuple[str, int]] = []

    def _announce(self, job_id: str, n: int) -> None:
        self.sent.append((job_id, n))


def test_lost_node_announcements_wait_while_a_requeue_holds_them() -> None:
    """The watchdog holds its task-failed events while it requeues a node's attempts (they
    would take the interpreter from the requeue they describe), and sends every one of
    them after."""
    announcer = _Recording()
    announcer.node_lost("job-0", 1)
    assert announcer.drain(5.0)
    with announcer.held():
        for i in range(1, 4):
            announcer.node_lost(f"job-{i}", 1)
        time.sleep(0.3)
        assert announcer.sent == [("job-0", 1)]
    assert announcer.drain(5.0)
    assert announcer.sent == [(f"job-{i}", 1) for i in range(4)]
