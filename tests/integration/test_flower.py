"""Flower and Celery's own tools on a gridqueue fleet: real `gridqueue worker` processes
and a watchdog on a private redis-server, real Flower (from PyPI) read through its HTTP
API, and Celery's own command line.

One fleet and one Flower serve the whole module (starting them is most of the cost); each
test cancels what it leaves running. The test that kills a worker comes last.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gridqueue import GridQueue
from gridqueue.celeryapp import make_celery
from gridqueue.embedded import EmbeddedRedis, free_port
from gridqueue.errors import JobEndedError
from gridqueue.fleet import LocalFleet
from gridqueue.keys import KOMBU_UNACKED, attempt_id, queue_for_model
from gridqueue.records import JobRecord
from gridqueue.settings import Settings
from gridqueue.states import JobState
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

HOST = socket.gethostname()  # Celery names a node <name>@<host>
WORKERS = ["w1", "w2"]
NODES = [f"{name}@{HOST}" for name in WORKERS]
BOUND_S = 60.0  # generous: a slow two-core machine runs other tests alongside


@dataclass
class Fleet:
    url: str
    gq: GridQueue
    fleet: LocalFleet
    flower: str  # Flower's base URL
    env: dict[str, str]

    def flower_get(self, path: str) -> Any:
        response = httpx.get(self.flower + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def online(self) -> dict[str, bool]:
        """Flower 2.2's view of which workers are online, from their event heartbeats."""
        return dict(self.flower_get("/api/workers?status=true"))

    def task(self, task_id: str) -> dict[str, Any] | None:
        response = httpx.get(f"{self.flower}/api/task/info/{task_id}", timeout=30)
        return dict(response.json()) if response.status_code == 200 else None

    def task_in(self, task_id: str, state: str) -> dict[str, Any] | None:
        task = self.task(task_id)
        return task if task is not None and task["state"] == state else None

    def celery(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Celery's own command line, as a user would run it."""
        return subprocess.run(
            [sys.executable, "-m", "celery", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    logs = tmp_path_factory.mktemp("flower")
    with EmbeddedRedis() as url:
        env = {
            **os.environ,
            "GRIDQUEUE_REDIS_URL": url,
            "FLOWER_UNAUTHENTICATED_API": "true",  # Flower 2 serves its API only so, or with auth
        }
        fleet = LocalFleet(url, logs / "fleet")
        gq = GridQueue(settings=Settings(redis_url=url))
        port = free_port()
        with open(logs / "flower.log", "ab") as flower_log:
            flower = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "gridqueue.app", "flower",
                 f"--port={port}", "--address=127.0.0.1"],
                env=env,
                stdout=flower_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            for name in WORKERS:
                fleet.start_worker(name)
            fleet.start_watchdog()
            fleet.wait_alive(gq.ledger, WORKERS, timeout_s=BOUND_S)
            live = Fleet(url, gq, fleet, f"http://127.0.0.1:{port}", env)
            wait_for(lambda: _serving(live, flower), BOUND_S)
            yield live
        finally:
            for job_id in _unfinished(gq):
                with contextlib.suppress(Exception):
                    gq.ledger.cancel(job_id)  # its child is killed: the workers stop at once
            with contextlib.suppress(ProcessLookupError):
                os.killpg(flower.pid, signal.SIGTERM)
            try:
                flower.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(flower.pid, signal.SIGKILL)
                flower.wait(timeout=15)
            fleet.stop_all()
            gq.close()


def _serving(live: Fleet, flower: subprocess.Popen[bytes]) -> bool:
    assert flower.poll() is None, "Flower exited; see flower.log"
    try:
        return httpx.get(live.flower + "/healthcheck", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _unfinished(gq: GridQueue) -> list[str]:
    keys = gq.ledger.client.scan_iter(match=gq.ledger.keys.job("*"), count=500)
    ids = [str(k).split(":", 2)[2] for k in keys if str(k).count(":") == 2]
    return [i for i in ids if not gq.get(i).terminal]


def _running(live: Fleet, job_id: str) -> JobRecord | None:
    record = live.gq.get(job_id)
    return record if record.state is JobState.RUNNING else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child stays a zombie until its worker reaps it: that is gone too.
    with contextlib.suppress(FileNotFoundError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def test_flower_shows_every_worker_online_and_each_attempt_in_its_true_state(
    live: Fleet,
) -> None:
    wait_for(lambda: all(live.online().get(node) for node in NODES), BOUND_S)

    ok = live.gq.submit("sim-llm", {"prompt": "flower ok", "ms": 50})
    invalid = live.gq.submit("sim-llm", {"prompt": "bad", "ms": 50, "fail": "invalid"})
    crash = live.gq.submit("sim-llm", {"prompt": "crash once", "ms": 300, "crash": 1})
    assert ok.result(timeout=BOUND_S)["attempt"] == 1
    with pytest.raises(JobEndedError):
        invalid.result(timeout=BOUND_S)
    assert crash.result(timeout=BOUND_S)["attempt"] == 2

    succeeded = wait_for(lambda: live.task_in(attempt_id(ok.id, 1), "SUCCESS"), BOUND_S)
    assert succeeded["worker"] in NODES
    # The task-sent event (published by the submit script on the Redis broker) reached
    # Flower: it knows when the attempt was sent, as it would from send_task.
    assert succeeded["sent"], succeeded
    failed = wait_for(lambda: live.task_in(attempt_id(invalid.id, 1), "FAILURE"), BOUND_S)
    assert "invalid_input" in failed["exception"] and "job FAILED" in failed["exception"]
    # The child died under attempt 1 (Celery says only "rejected"): Flower shows the
    # ledger's verdict. Which verdict depends on who noticed first: the worker, at once
    # (worker_lost), or, when Celery hears of the dead child late, the watchdog's
    # liveness watch (stalled); either way the one the ledger holds.
    record = live.gq.get(crash.id)
    first, second = record.attempts
    assert first.outcome in ("worker_lost", "stalled") and second.outcome == "succeeded"
    lost = wait_for(lambda: live.task_in(attempt_id(crash.id, 1), "FAILURE"), BOUND_S)
    assert lost["exception"].startswith(f"AttemptFailed('{first.outcome}: "), lost["exception"]
    wait_for(lambda: live.task_in(attempt_id(crash.id, 2), "SUCCESS"), BOUND_S)


def test_stock_inspect_ping_and_inspect_active_reach_the_fleet(live: Fleet) -> None:
    destinations = ",".join(NODES)  # replies are awaited only until every node answered
    # Stock Celery, no gridqueue app: kombu's default separator on both sides.
    ping = live.celery("--broker", live.url, "inspect", "ping", "-d", destinations, "-t", "30")
    assert ping.returncode == 0, ping.stdout + ping.stderr
    for node in NODES:
        assert node in ping.stdout

    job = live.gq.submit("sim-llm", {"prompt": "inspect me", "ms": 60_000})
    record = wait_for(lambda: _running(live, job.id), BOUND_S)
    active = live.celery(
        "-A", "gridqueue.app", "inspect", "active", "-d", destinations, "-t", "30", "--json"
    )
    assert active.returncode == 0, active.stdout + active.stderr
    replies = json.loads(active.stdout)
    node = f"{record.worker}@{HOST}"
    assert [task["id"] for task in replies[node]] == [attempt_id(job.id, 1)]
    assert live.gq.ledger.cancel(job.id)


@pytest.fixture
def control(live: Fleet) -> Iterator[Any]:
    """A producer's app: what Flower's buttons and ``app.control.revoke`` use."""
    app = make_celery(live.url)
    yield app.control
    app.close()


def test_a_revoke_becomes_a_ledger_cancel_or_is_refused(live: Fleet, control: Any) -> None:
    ledger = live.gq.ledger
    job = live.gq.submit("sim-llm", {"prompt": "revoke me", "ms": 60_000})
    record = wait_for(lambda: _running(live, job.id), BOUND_S)
    member = attempt_id(job.id, 1)
    (running,) = record.attempts
    assert running.pid is not None and _pid_alive(running.pid)

    # A plain revoke (Flower's "revoke") does not stop a running attempt: refused.
    replies = control.revoke(member, reply=True, destination=NODES, timeout=30)
    assert len(replies) == len(NODES)
    assert all("error" in next(iter(r.values())) for r in replies), replies
    assert _running(live, job.id) is not None

    # With terminate (Flower's "terminate"): one worker cancels it through the ledger.
    replies = control.revoke(
        member, terminate=True, signal="SIGTERM", reply=True, destination=NODES, timeout=30
    )
    answers = [next(iter(r.values())) for r in replies]
    assert sum("cancelled through the ledger" in a.get("ok", "") for a in answers) == 1, answers
    record = ledger.get(job.id)
    assert (record.state, record.reason) == (JobState.CANCELLED, "revoked")
    wait_for(lambda: not _pid_alive(running.pid), BOUND_S)  # its worker killed the child
    wait_for(lambda: live.task_in(member, "REVOKED"), BOUND_S)
    # No requeue: no attempt 2, and the message Celery put back was refused and acked.
    queue = queue_for_model(live.gq.settings.namespace, "sim-llm")
    wait_for(lambda: ledger.client.hlen(KOMBU_UNACKED) == 0, BOUND_S)
    assert ledger.client.llen(queue) == 0
    record = ledger.get(job.id)
    assert [(a.n, a.outcome) for a in record.attempts] == [(1, "cancelled")]
    assert record.state is JobState.CANCELLED

    # A finished job's attempt: refused by every worker, the job unchanged.
    done = live.gq.submit("sim-llm", {"prompt": "done", "ms": 20})
    done.result(timeout=BOUND_S)
    before = ledger.get(done.id)
    refused = live.celery(
        "-A", "gridqueue.app", "control", "terminate", "SIGTERM", attempt_id(done.id, 1),
        "-d", ",".join(NODES), "-t", "30", "--json",
    )  # fmt: skip
    assert refused.returncode == 0, refused.stdout + refused.stderr
    answers = [next(iter(r.values())) for r in json.loads(refused.stdout)]
    assert len(answers) == len(NODES)
    assert all("already ended SUCCEEDED" in a.get("error", "") for a in answers), answers
    assert ledger.get(done.id) == before


def test_flower_shows_a_killed_worker_offline_and_its_attempt_lost(live: Fleet) -> None:
    wait_for(lambda: all(live.online().get(node) for node in NODES), BOUND_S)
    job = live.gq.submit("sim-llm", {"prompt": "on a doomed node", "ms": 60_000})
    record = wait_for(lambda: _running(live, job.id), BOUND_S)
    victim = record.worker
    assert victim is not None
    wait_for(lambda: live.task_in(attempt_id(job.id, 1), "STARTED"), BOUND_S)

    live.fleet.kill(victim)  # kill -9, the whole node

    node = f"{victim}@{HOST}"
    wait_for(lambda: live.online().get(node) is False, BOUND_S)  # its heartbeats expired
    (survivor,) = [n for n in NODES if n != node]
    assert live.online()[survivor] is True
    # The watchdog speaks for the dead node: attempt 1 ended node_lost, and stays offline.
    lost = wait_for(lambda: live.task_in(attempt_id(job.id, 1), "FAILURE"), BOUND_S)
    assert "node_lost" in lost["exception"] and lost["worker"] == node
    wait_for(lambda: live.task_in(attempt_id(job.id, 2), "STARTED"), BOUND_S)
    assert live.task(attempt_id(job.id, 2))["worker"] == survivor  # type: ignore[index]
    assert live.online().get(node) is False
