"""The dashboard and its JSON API against a real ledger: state written by the ledger's own
verbs, read back through every page and endpoint, actions behind the bearer token, the
live stream, and the errors a client sees."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():
    # Starlette's TestClient now prefers httpx2 and warns on import when it finds httpx,
    # which our dev extras install; the warning is about a future, not a fault here.
    warnings.filterwarnings("ignore", "Using `httpx`", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

from gridqueue import GridQueue
from gridqueue.ledger import Ledger, connect_redis
from gridqueue.monitor.web import create_app
from gridqueue.settings import Settings
from gridqueue.states import JobState, Outcome, WorkerState
from gridqueue.watchdog import Watchdog
from tests.helpers import GIB, register_sim_worker, wait_for

pytestmark = pytest.mark.integration

TOKEN = "correct-horse-battery-staple"
PAYLOAD = '{"prompt":"p"}'
PAGES = ("/", "/workers", "/workers/w1", "/jobs", "/failovers", "/dead-letters")
ACTIONS = (
    "/api/workers/w1/quarantine",
    "/api/workers/w1/drain",
    "/api/workers/w1/release",
    "/api/jobs/running/cancel",
    "/api/dead-letters/poison/replay",
    "/api/dead-letters/replay",
)


@pytest.fixture
def fleet(ledger: Ledger, gq: GridQueue) -> dict[str, str]:
    """Three workers; a running job, a succeeded one, a poison job dead-lettered, and one
    submitted through the client, waiting in its queue."""
    for name in ("w1", "w2", "w3"):
        register_sim_worker(ledger, name)
    ledger.submit("running", "sim-llm", "realtime", PAYLOAD, 0, None)
    assert ledger.claim("running", 1, "w1", 7, "").status == "ok"
    ledger.submit("done", "sim-llm", "realtime", PAYLOAD, 0, None)
    assert ledger.claim("done", 1, "w2", 8, "").status == "ok"
    assert ledger.complete("done", 1, "w2", '{"text": "forty-two"}')
    ledger.submit("poison", "sim-llm", "batch", PAYLOAD, 0, None)
    for attempt, worker in enumerate(("w1", "w2", "w3"), start=1):
        assert ledger.claim("poison", attempt, worker, 9, "").status == "ok"
        ledger.end_attempt("poison", attempt, Outcome.WORKER_LOST, worker=worker, pid=9)
    assert ledger.get("poison").state is JobState.DEAD_LETTERED
    queued = gq.submit("sim-llm", {"prompt": "waiting"}).id
    return {"queued": queued}


@pytest.fixture
def read_only(settings: Settings, ledger: Ledger) -> Iterator[TestClient]:
    assert settings.dashboard_token is None
    with TestClient(create_app(settings, ledger=ledger)) as client:
        yield client


@pytest.fixture
def armed(settings: Settings, ledger: Ledger) -> Iterator[TestClient]:
    with_token = settings.model_copy(update={"dashboard_token": SecretStr(TOKEN)})
    with TestClient(create_app(with_token, ledger=ledger)) as client:
        yield client


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The JSON error every 4xx/5xx answer carries: what went wrong and what to do."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error", "detail"}, body
    assert isinstance(body["error"], str) and body["error"]
    return body


# -- reads ---------------------------------------------------------------------------------


def test_every_page_and_its_json_twin_show_the_fleet(
    read_only: TestClient, fleet: dict[str, str]
) -> None:
    client = read_only
    overview = client.get("/api/overview").json()
    assert overview["workers"]["ALIVE"] == 3
    assert overview["jobs"]["RUNNING"] == 1 and overview["jobs"]["DEAD_LETTERED"] == 1
    assert overview["running_attempts"] == 1
    [queue] = overview["queues"]
    assert queue["model"] == "sim-llm" and queue["depth"] == 1  # the client's publish

    workers = {w["name"]: w for w in client.get("/api/workers").json()}
    assert set(workers) == {"w1", "w2", "w3"}
    assert workers["w1"]["running"] == ["running.1"]
    assert workers["w1"]["gpus"][0]["memory_used_bytes"] == 9 * GIB
    w1 = client.get("/api/workers/w1").json()
    assert w1["state"] == "ALIVE" and w1["history"][-1]["type"] == "worker_registered"

    running = client.get("/api/jobs", params={"state": "RUNNING"}).json()
    assert [job["id"] for job in running["jobs"]] == ["running"]
    by_worker = client.get("/api/jobs", params={"worker": "w3"}).json()
    assert [job["id"] for job in by_worker["jobs"]] == ["poison"]
    page = client.get("/api/jobs", params={"limit": 2}).json()
    assert len(page["jobs"]) == 2 and page["next_cursor"]
    rest = client.get("/api/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
    seen = [job["id"] for job in page["jobs"] + rest["jobs"]]
    assert sorted(seen) == sorted(["running", "done", "poison", fleet["queued"]])

    done = client.get("/api/jobs/done").json()
    assert done["state"] == "SUCCEEDED" and done["result"] == {"text": "forty-two"}
    poison = client.get("/api/jobs/poison").json()
    assert [row["worker"] for row in poison["timeline"]] == ["w1", "w2", "w3"]
    assert [row["outcome"] for row in poison["timeline"]] == ["worker_lost"] * 3

    letters = client.get("/api/dead-letters").json()
    assert letters["total"] == 1
    [group] = letters["groups"]
    assert [job["id"] for job in group["jobs"]] == ["poison"]
    assert [e["worker"] for e in group["jobs"][0]["evidence"]] == ["w1", "w2", "w3"]
    assert client.get("/api/failovers").json() == []

    # The pages: server-rendered from the same reads, with stable hooks for live updates.
    html = {path: client.get(path) for path in (*PAGES, "/jobs/done", "/jobs/poison")}
    for path, response in html.items():
        assert response.status_code == 200, (path, response.text)
        assert response.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in response.headers["content-security-policy"]
        assert 'id="read-only-banner"' in response.text, path
        assert "GRIDQUEUE_DASHBOARD_TOKEN" in response.text, path
        assert "http://" not in response.text and "https://" not in response.text, path
    assert '<tr data-worker="w1" data-state="ALIVE"' in html["/workers"].text
    assert "Simulated H100" in html["/workers"].text and "Xid 13\u00d72" in html["/workers"].text
    assert 'data-count="workers:ALIVE" data-value="3"' in html["/"].text
    assert 'data-job="running" data-state="RUNNING"' in html["/jobs"].text
    assert "forty-two" in html["/jobs/done"].text
    assert 'data-reason="poison"' in html["/dead-letters"].text
    assert "worker_registered" in html["/workers/w1"].text
    assert 'data-job="poison" data-state="DEAD_LETTERED"' in html["/jobs/poison"].text
    # Without a token, every action button is disabled.
    assert "disabled" in html["/workers"].text.split('data-url="/api/workers/w1/quarantine"')[1]

    # The page's script asks for the live part alone after a transition.
    fragment = client.get("/workers", headers={"X-Gridqueue-Fragment": "live"})
    assert fragment.status_code == 200
    assert "<html" not in fragment.text and 'data-worker="w2"' in fragment.text
    assert int(fragment.headers["x-gridqueue-now-ms"]) > 0
    filtered = client.get("/jobs", params={"state": "DEAD_LETTERED", "model": "sim-llm"})
    assert 'data-job="poison"' in filtered.text and 'data-job="done"' not in filtered.text
    found = client.get("/jobs", params={"id": "done"}, follow_redirects=False)
    assert found.status_code == 303 and found.headers["location"] == "/jobs/done"

    for asset, kind in (("dashboard.js", "javascript"), ("dashboard.css", "text/css")):
        response = client.get(f"/static/{asset}")
        assert response.status_code == 200 and kind in response.headers["content-type"]


def test_the_workers_table_pages_a_large_fleet_and_filters_by_state(
    read_only: TestClient, ledger: Ledger
) -> None:
    for k in range(130):
        register_sim_worker(ledger, f"node-{k:03d}")
    ledger.quarantine("node-120", by="op", reason="maintenance")
    first = read_only.get("/workers").text
    assert first.count("<tr data-worker=") == 100 and 'data-worker="node-099"' in first
    assert "1-100 of 130" in first and 'id="next-page"' in first
    second = read_only.get("/workers?page=2").text
    assert second.count("<tr data-worker=") == 30 and 'data-worker="node-129"' in second
    quarantined = read_only.get("/workers?state=quarantined").text
    assert quarantined.count("<tr data-worker=") == 1 and 'data-worker="node-120"' in quarantined
    assert "No worker is DEAD." in read_only.get("/workers?state=DEAD").text
    assert read_only.get("/workers?state=asleep").status_code == 422
    assert len(read_only.get("/api/workers").json()) == 130  # the API lists them all


def test_probes_and_the_openapi_schema(read_only: TestClient) -> None:
    assert read_only.get("/healthz").json() == {"status": "ok"}
    ready = read_only.get("/readyz")
    assert ready.status_code == 200 and ready.json()["redis"] is True

    schema = read_only.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    for path in (
        "/api/overview",
        "/api/workers",
        "/api/workers/{name}",
        "/api/jobs",
        "/api/jobs/{job_id}",
        "/api/failovers",
        "/api/dead-letters",
        "/api/stream",
        "/healthz",
        "/readyz",
    ):
        assert "get" in paths[path], path
    for path in (
        "/api/workers/{name}/quarantine",
        "/api/workers/{name}/drain",
        "/api/workers/{name}/release",
        "/api/jobs/{job_id}/cancel",
        "/api/dead-letters/{job_id}/replay",
        "/api/dead-letters/replay",
    ):
        assert set(paths[path]) == {"post"}, path
        operation = paths[path]["post"]
        assert operation["security"] == [{"HTTPBearer": []}], path
        assert {"401", "403", "404"} <= set(operation["responses"]), path
    overview = paths["/api/overview"]["get"]["responses"]["200"]["content"]["application/json"]
    assert overview["schema"] == {"$ref": "#/components/schemas/Overview"}
    assert "ErrorReply" in schema["components"]["schemas"]
    assert not any(path.startswith("/workers") for path in paths)  # pages stay out

    pytest.importorskip("gridqueue.monitor.metrics")
    metrics = read_only.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")


# -- actions -----------------------------------------------------------------------------------


def test_without_a_token_the_dashboard_is_read_only(
    read_only: TestClient, ledger: Ledger, fleet: dict[str, str]
) -> None:
    for path in ACTIONS:
        body = error_of(read_only.post(path, headers=auth(), json={"reason": "r"}), 403)
        assert "read-only" in body["error"], path
        assert "GRIDQUEUE_DASHBOARD_TOKEN" in body["detail"]["how_to_enable"], path
    assert ledger.worker("w1").state is WorkerState.ALIVE  # type: ignore[union-attr]
    assert ledger.get("running").state is JobState.RUNNING
    assert ledger.get("poison").state is JobState.DEAD_LETTERED


def test_actions_need_the_right_token(armed: TestClient, fleet: dict[str, str]) -> None:
    page = armed.get("/workers").text
    assert 'id="read-only-banner"' not in page and 'id="token-form"' in page
    for headers in ({}, auth("wrong"), {"Authorization": f"Basic {TOKEN}"}, auth("")):
        for path in ACTIONS:
            response = armed.post(path, headers=headers, json={"reason": "r"})
            body = error_of(response, 401)
            assert "Authorization: Bearer" in body["error"], path
            assert response.headers["www-authenticate"].startswith("Bearer"), path


def test_actions_change_the_ledger(
    armed: TestClient, ledger: Ledger, fleet: dict[str, str]
) -> None:
    reply = armed.post("/api/workers/w1/quarantine", headers=auth(), json={"reason": "bad fan"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["attempts_moved"] == 1  # the running job moves elsewhere now
    w1 = ledger.worker("w1")
    assert w1 is not None and w1.state is WorkerState.QUARANTINED
    assert w1.quarantine_reason == "bad fan" and w1.quarantine_mode == "evacuate"
    assert w1.quarantined_by is not None and w1.quarantined_by.startswith("dashboard")
    # The watchdog ends the evacuated attempt and requeues it on its next tick.
    assert ledger.lost_attempts() == {"running.1": Outcome.EVACUATED.value}
    [incident] = armed.get("/api/failovers").json()
    assert incident["kind"] == "operator_quarantine" and incident["worker"] == "w1"
    assert 'data-incident="' in armed.get("/failovers").text

    assert armed.post("/api/workers/w1/release", headers=auth()).status_code == 200
    assert ledger.worker("w1").state is WorkerState.ALIVE  # type: ignore[union-attr]
    conflict = error_of(armed.post("/api/workers/w1/release", headers=auth()), 409)
    assert conflict["detail"] == {"state": "ALIVE"}

    assert armed.post("/api/workers/w2/drain", headers=auth()).status_code == 200
    w2 = ledger.worker("w2")
    assert w2 is not None and w2.state is WorkerState.QUARANTINED
    assert w2.quarantine_mode == "drain" and w2.quarantine_reason == "drain"

    cancelled = armed.post(f"/api/jobs/{fleet['queued']}/cancel", headers=auth())
    assert cancelled.json() == {"job": fleet["queued"], "cancelled": True}
    assert ledger.get(fleet["queued"]).state is JobState.CANCELLED
    assert ledger.get(fleet["queued"]).reason == "cancelled by dashboard:testclient"
    again = error_of(armed.post(f"/api/jobs/{fleet['queued']}/cancel", headers=auth()), 409)
    assert "already ended CANCELLED" in again["error"]

    replayed = armed.post("/api/dead-letters/poison/replay", headers=auth())
    assert replayed.status_code == 200 and replayed.json()["attempt"] == 4
    assert ledger.get("poison").state is JobState.QUEUED
    assert ledger.get("poison").replays == 1
    # Published at once, as the CLI does, not left for the watchdog: the message waits in
    # the model's queue and the attempt is listed as published.
    assert ledger.client.zscore(ledger.keys.dispatch, "poison.4") is None
    assert ledger.client.zscore(ledger.keys.published, "poison.4") is not None
    twice = error_of(armed.post("/api/dead-letters/poison/replay", headers=auth()), 409)
    assert "not DEAD_LETTERED" in twice["error"]


def test_replay_every_dead_letter_that_matches_a_filter(
    armed: TestClient, ledger: Ledger, fleet: dict[str, str]
) -> None:
    ledger.submit("poison2", "sim-llm", "batch", PAYLOAD, 0, None)
    for attempt, worker in enumerate(("w1", "w2", "w3"), start=1):
        assert ledger.claim("poison2", attempt, worker, 9, "").status == "ok"
        ledger.end_attempt("poison2", attempt, Outcome.WORKER_LOST, worker=worker, pid=9)
    reason = ledger.get("poison").reason
    assert reason == ledger.get("poison2").reason

    unfiltered = error_of(armed.post("/api/dead-letters/replay", headers=auth(), json={}), 422)
    assert '"all": true' in unfiltered["error"]
    none = armed.post(
        "/api/dead-letters/replay", headers=auth(), json={"model": "other-model"}
    ).json()
    assert none["matched"] == 0 and none["replayed"] == []

    report = armed.post(
        "/api/dead-letters/replay", headers=auth(), json={"reason": reason, "model": "sim-llm"}
    ).json()
    assert report["matched"] == 2 and report["failed"] == []
    assert sorted(r["job"] for r in report["replayed"]) == ["poison", "poison2"]
    for job_id in ("poison", "poison2"):
        assert ledger.get(job_id).state is JobState.QUEUED
    assert armed.get("/api/dead-letters").json()["total"] == 0


def test_actions_are_post_only(armed: TestClient, fleet: dict[str, str]) -> None:
    for path in ACTIONS:
        response = armed.get(path, headers=auth())
        body = error_of(response, 405)
        assert response.headers["allow"] == "POST", path
        assert "POST only" in body["error"], path


# -- errors --------------------------------------------------------------------------------


def test_bad_input_is_a_clear_4xx_never_a_500(armed: TestClient, fleet: dict[str, str]) -> None:
    cases = [
        ("/api/jobs?state=sleeping", 422, "use one of QUEUED"),
        ("/api/jobs?limit=0", 422, "limit"),
        ("/api/jobs?limit=501", 422, "limit"),
        ("/api/jobs?limit=many", 422, "limit"),
        ("/api/jobs?cursor=yesterday", 400, "without ?cursor="),
        ("/api/jobs?workload=overnight", 422, "realtime"),
        ("/api/jobs?model=bad:name", 422, "invalid model name"),
        ("/api/jobs/nothing", 404, "no job nothing"),
        ("/api/workers/nobody", 404, "nobody"),
        ("/api/failovers?limit=0", 422, "limit"),
        ("/api/dead-letters?limit=501", 422, "limit"),
        ("/api/failovers?limit=501", 422, "limit"),
        ("/api/stream?after=yesterday", 422, "after"),
        ("/api/nothing", 404, "no such page"),
    ]
    for path, status, words in cases:
        assert words in error_of(armed.get(path), status)["error"], path
    posts = [
        ("/api/workers/nobody/quarantine", {"reason": "r"}, 404, "GET /api/workers"),
        ("/api/workers/w1/quarantine", {}, 422, "reason"),
        ("/api/workers/w1/quarantine", {"reason": ""}, 422, "reason"),
        ("/api/jobs/nothing/cancel", None, 404, "no job nothing"),
        ("/api/dead-letters/nothing/replay", None, 404, "no job nothing"),
        ("/api/dead-letters/running/replay", None, 409, "not DEAD_LETTERED"),
        ("/api/dead-letters/replay", {"reason": "poison", "since": 1}, 422, "since"),
        ("/api/dead-letters/replay", {"model": "a:b"}, 422, "invalid model name"),
        ("/api/dead-letters/replay", {"all": True, "limit": 501}, 422, "limit"),
    ]
    for path, body, status, words in posts:
        assert words in error_of(armed.post(path, headers=auth(), json=body), status)["error"]
    # A page answers in HTML, with the same words.
    missing = armed.get("/jobs/nothing")
    assert missing.status_code == 404 and "no job nothing" in missing.text
    bad = armed.get("/jobs?state=sleeping")
    assert bad.status_code == 422 and "use one of QUEUED" in bad.text


def test_without_redis_pages_say_so_and_readyz_is_503(closed_port: int) -> None:
    settings = Settings(redis_url=f"redis://:hunter2@127.0.0.1:{closed_port}/0")
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        for path in ("/readyz", "/api/overview", "/api/jobs/anything"):
            body = error_of(client.get(path), 503)
            assert f"cannot reach Redis at redis://:***@127.0.0.1:{closed_port}/0" in body["error"]
            assert "hunter2" not in json.dumps(body)
        page = client.get("/workers")
        assert page.status_code == 503 and "cannot reach Redis" in page.text


@pytest.fixture
def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- live updates ----------------------------------------------------------------------------


def stream_readers(ledger: Ledger) -> int:
    name = f"{ledger.settings.namespace}-dashboard-stream"
    return sum(1 for c in ledger.client.client_list() if c.get("name") == name)


def next_event(lines: Iterator[str], kind: str = "message") -> dict[str, Any]:
    """The data of the next SSE event of this kind (keep-alive comments skipped)."""
    event = "message"
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: ") and event == kind:
            data: dict[str, Any] = json.loads(line.removeprefix("data: "))
            return data
        elif line == "":
            event = "message"
    raise AssertionError(f"the stream ended before a {kind!r} event")


def test_the_stream_pushes_transitions_made_after_connecting(
    read_only: TestClient, ledger: Ledger
) -> None:
    register_sim_worker(ledger, "w1")
    with read_only.stream("GET", "/api/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        ready = next_event(lines, "ready")
        assert stream_readers(ledger) == 1
        ledger.quarantine("w1", "operator:test", "hot")
        event = next_event(lines)
        assert event["type"] == "worker_quarantined" and event["worker"] == "w1"
        assert event["id"] > ready["after"]
        ledger.release("w1", "operator:test")
        assert next_event(lines)["type"] == "worker_released"
    # The page went away: its reader stops and its connection closes.
    wait_for(lambda: stream_readers(ledger) == 0, timeout_s=10)

    # A reconnect names the last event it saw (the browser's Last-Event-ID): nothing lost.
    headers = {"Last-Event-ID": event["id"]}
    with read_only.stream("GET", "/api/stream", headers=headers) as response:
        lines = response.iter_lines()
        assert next_event(lines, "ready")["after"] == event["id"]
        assert next_event(lines)["type"] == "worker_released"
    wait_for(lambda: stream_readers(ledger) == 0, timeout_s=10)


# -- the command -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_gridqueue_dashboard_serves_and_drops_a_closed_stream(
    redis_url: str, ledger: Ledger, tmp_path: Path
) -> None:
    """The real server (uvicorn): a browser that closes its page frees its reader."""
    port = free_port()
    entry = Path(sys.executable).with_name("gridqueue")
    command = [str(entry)] if entry.exists() else [sys.executable, "-m", "gridqueue.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDQUEUE_")}
    log = (tmp_path / "dashboard.log").open("w")
    server = subprocess.Popen(
        [*command, "dashboard", "--port", str(port), "--redis", redis_url],
        env={**env, "GRIDQUEUE_DASHBOARD_TOKEN": TOKEN},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert server.poll() is None, (tmp_path / "dashboard.log").read_text()
            try:
                return httpx.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout_s=30, interval_s=0.1)
        register_sim_worker(ledger, "w1")
        reply = httpx.post(f"{base}/api/workers/w1/drain", headers=auth(), timeout=5)
        assert reply.status_code == 200, reply.text
        with httpx.stream("GET", f"{base}/api/stream", timeout=10) as response:
            lines = response.iter_lines()
            next_event(lines, "ready")
            assert stream_readers(ledger) == 1
            ledger.release("w1", "operator:test")
            assert next_event(lines)["type"] == "worker_released"
        wait_for(lambda: stream_readers(ledger) == 0, timeout_s=10)
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def test_a_port_in_use_is_one_line_and_exit_2(redis_url: str) -> None:
    entry = Path(sys.executable).with_name("gridqueue")
    command = [str(entry)] if entry.exists() else [sys.executable, "-m", "gridqueue.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDQUEUE_")}
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*command, "dashboard", "--port", str(port), "--redis", redis_url],
            env={**env, "COLUMNS": "60"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], lines
    assert "--port" in lines[0] and "Traceback" not in result.stderr


def test_the_app_connects_nothing_until_asked(settings: Settings) -> None:
    """create_app connects nothing until the first request (it can start before Redis)."""
    client = connect_redis(settings.redis_url)
    before = len(client.client_list())
    create_app(settings)
    assert len(client.client_list()) == before
    client.close()


class _BrokerDown:
    """A dispatcher whose broker cannot be reached (Dispatcher.publish's interface)."""

    def publish(self, member: str, own_lease: str = "") -> bool:
        raise redis.exceptions.ConnectionError("broker unreachable")


def test_a_replay_whose_publish_fails_is_still_owned_and_published_by_the_watchdog(
    armed: TestClient, ledger: Ledger, fleet: dict[str, str], settings: Settings
) -> None:
    armed.app.state.dashboard.dispatcher = _BrokerDown()  # type: ignore[attr-defined]
    replayed = armed.post("/api/dead-letters/poison/replay", headers=auth())
    assert replayed.status_code == 200, replayed.text  # committed: not an error
    attempt = replayed.json()["attempt"]
    member = f"poison.{attempt}"
    assert ledger.get("poison").state is JobState.QUEUED
    # Its owner is the dispatch entry, due now: the watchdog publishes it.
    assert ledger.client.zscore(ledger.keys.dispatch, member) is not None
    Watchdog(settings, owner="replay-owner").tick()
    assert ledger.client.zscore(ledger.keys.published, member) is not None
    assert ledger.client.zscore(ledger.keys.dispatch, member) is None
