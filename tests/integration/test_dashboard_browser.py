"""The dashboard in a real browser: headless Chromium (Debian's, driven by Playwright for
Python, never a downloaded one) against `gridqueue dashboard` processes, a private Redis,
two real `gridqueue worker` processes with the simulated GPU and a real watchdog.

Every page loads without a console error and shows the fleet; a worker killed with
kill -9 turns DEAD on an open page without a reload, and its incident reaches the
failovers page; quarantine and replay work from the page with the token, and are refused,
visibly and with the ledger unchanged, without it, with a wrong one, or on a read-only
dashboard.

One fleet serves the whole module (starting real workers is the slow part); the tests
run in file order and each leaves the fleet as it found it, except the last, which kills
a worker. Without chromium or Playwright every test is reported as skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gridqueue import GridQueue
from gridqueue.embedded import EmbeddedRedis
from gridqueue.fleet import LocalFleet
from gridqueue.ledger import Ledger, connect_redis
from gridqueue.settings import Settings
from gridqueue.states import JobState, Outcome, WorkerState
from tests.helpers import wait_for, wait_until_watchdog_judges

pytestmark = pytest.mark.integration

TOKEN = "correct-horse-battery-staple"
WORKERS = ("w1", "w2")
GIB = 2**30
# Bounds for a slow, busy 2-core machine: waiting longer costs nothing when things work.
UI_TIMEOUT_MS = 15_000
DEAD_TIMEOUT_MS = 30_000
# The poison jobs' workers: registered, then taken down by the job three times (through
# the ledger's verbs, before the real fleet starts), then stopped cleanly.
POISONERS = ("gpu-a", "gpu-b", "gpu-c")
FAKE_GPU = {
    "index": 0,
    "uuid": "GPU-fake-0",
    "name": "Simulated H100",
    "memory_total_bytes": 80 * GIB,
    "memory_used_bytes": 9 * GIB,
}
FIT = {"sim-llm": {"required_bytes": 8 * GIB, "largest_gpu_bytes": 80 * GIB}}


# -- the stack: Redis, fleet, dashboards, browser -------------------------------------------


@dataclass
class Dashboard:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@dataclass
class Stack:
    ledger: Ledger
    gq: GridQueue
    fleet: LocalFleet
    armed: Dashboard  # actions need TOKEN
    read_only: Dashboard  # no token configured
    browser: Any  # playwright.sync_api.Browser
    jobs: dict[str, str] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start_dashboard(redis_url: str, log_path: Path, token: str | None) -> Dashboard:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDQUEUE_")}
    env["PYTHONUNBUFFERED"] = "1"
    if token is not None:
        env["GRIDQUEUE_DASHBOARD_TOKEN"] = token
    port = _free_port()
    args = ["dashboard", "--port", str(port), "--redis", redis_url]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "gridqueue.cli", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Dashboard(f"http://127.0.0.1:{port}", process, log_path)


def _wait_ready(dashboard: Dashboard, timeout_s: float = 60.0) -> None:
    def ready() -> bool:
        if dashboard.process.poll() is not None:
            raise AssertionError(f"the dashboard exited:\n{dashboard.log()}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{dashboard.url}/readyz", timeout=2.0).status_code == 200
        return False

    wait_for(ready, timeout_s, interval_s=0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def _poison(ledger: Ledger, job_id: str) -> None:
    """A batch job whose attempts took down three workers: dead-lettered as poison."""
    ledger.submit(job_id, "sim-llm", "batch", json.dumps({"prompt": job_id, "ms": 100}), 0, None)
    for attempt, worker in enumerate(POISONERS, start=1):
        assert ledger.claim(job_id, attempt, worker, 4242, "").status == "ok"
        ledger.end_attempt(job_id, attempt, Outcome.WORKER_LOST, worker=worker, pid=4242)
    assert ledger.get(job_id).state is JobState.DEAD_LETTERED


def _make_poison_jobs(ledger: Ledger, job_ids: list[str]) -> None:
    epochs = {}
    for name in POISONERS:
        epochs[name] = ledger.register(
            name, ["sim-llm"], 4242, "rack-9", 1, "{}", "simulated", [FAKE_GPU], FIT
        )
        health = json.dumps({"probe": "simulated", "gpus": [FAKE_GPU], "reasons": []})
        ledger.heartbeat(name, epochs[name], health, "HEALTHY")
    for job_id in job_ids:
        _poison(ledger, job_id)
    for name, epoch in epochs.items():  # a clean leave: the watchdog has no one to judge
        assert ledger.unregister(name, epoch)


@pytest.fixture(scope="module")
def stack(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH: install Debian's chromium package to run this test")
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError as exc:
        pytest.skip(f"Playwright for Python is not installed ({exc}): pip install -e '.[dev]'")
    expect.set_options(timeout=UI_TIMEOUT_MS)

    url = redis_server.url
    # Our own private server (the session's, as the other tests use it): start clean.
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        client.flushall()
    logs = tmp_path_factory.mktemp("browser-logs")
    settings = Settings(redis_url=url)
    ledger = Ledger(connect_redis(url), settings)
    fleet = LocalFleet(url, logs)
    dashboards: list[Dashboard] = []
    gq = GridQueue(settings=settings)
    try:
        _make_poison_jobs(ledger, ["poison-replayed", "poison-kept"])
        for name in WORKERS:
            fleet.start_worker(name, concurrency=2)
        fleet.start_watchdog()
        armed = _start_dashboard(url, logs / "dashboard-armed.log", TOKEN)
        dashboards.append(armed)
        read_only = _start_dashboard(url, logs / "dashboard-read-only.log", None)
        dashboards.append(read_only)
        fleet.wait_alive(ledger, list(WORKERS))
        for dashboard in dashboards:
            _wait_ready(dashboard)

        # Work the real fleet did: quick successes, and one whose first attempt's child
        # crashed (a two-attempt timeline).
        quick = [gq.submit("sim-llm", {"prompt": f"hello {i}", "ms": 100}) for i in range(3)]
        crashed = gq.submit("sim-llm", {"prompt": "segfault once", "ms": 200, "crash": 1})
        for job in (*quick, crashed):
            job.result(timeout=60)
        jobs = {"succeeded": quick[0].id, "crashed": crashed.id}

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                yield Stack(ledger, gq, fleet, armed, read_only, browser, jobs)
            finally:
                browser.close()
    finally:
        for dashboard in dashboards:
            _stop(dashboard.process)
        fleet.stop_all()
        gq.close()
        ledger.client.close()


@dataclass
class Tab:
    """One browser tab (its own context, so its own sessionStorage) and what it logged."""

    page: Any  # playwright.sync_api.Page
    base_url: str
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    navigations: int = 0

    def goto(self, path: str) -> None:
        response = self.page.goto(self.base_url + path)
        assert response is not None and response.status == 200, (path, response)
        # The page's live stream is up: what happens from now on reaches the page.
        self.page.wait_for_selector("#live-status[data-connected=true]", state="attached")

    def flash(self, kind: str) -> Any:
        return self.page.locator(f"#flash .msg[data-kind={kind}]").first

    def set_token(self, token: str) -> None:
        self.page.fill("#token-input", token)
        self.page.click("#token-form button[type=submit]")
        self.page.wait_for_selector("#token-state[data-set=true]", state="attached")


@pytest.fixture
def open_tab(stack: Stack) -> Iterator[Callable[..., Tab]]:
    contexts: list[Any] = []

    def open_(dashboard: Dashboard, reason: str = "fan failing") -> Tab:
        context = stack.browser.new_context()
        context.set_default_timeout(UI_TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        tab = Tab(page, dashboard.url)

        def on_console(message: Any) -> None:
            if message.type == "error":
                tab.console_errors.append(f"{message.text} ({message.location})")

        def on_dialog(dialog: Any) -> None:
            tab.dialogs.append(dialog.message)
            if dialog.type == "prompt":
                dialog.accept(reason)
            else:
                dialog.accept()

        def on_navigated(frame: Any) -> None:
            if frame == page.main_frame:
                tab.navigations += 1

        page.on("console", on_console)
        page.on("pageerror", lambda error: tab.page_errors.append(str(error)))
        page.on("dialog", on_dialog)
        page.on("framenavigated", on_navigated)
        return tab

    yield open_
    for context in contexts:
        context.close()


def unexpected_console_errors(tab: Tab) -> list[str]:
    """Console errors other than the browser's note on an expected 401/403 reply."""
    expected = ("status of 401", "status of 403")
    return [e for e in tab.console_errors if not any(code in e for code in expected)]


# -- pages --------------------------------------------------------------------------------


def test_every_page_loads_and_shows_the_fleet(stack: Stack, open_tab: Callable[..., Tab]) -> None:
    from playwright.sync_api import expect

    tab = open_tab(stack.armed)
    page = tab.page
    done, crashed = stack.jobs["succeeded"], stack.jobs["crashed"]

    tab.goto("/")
    expect(page.locator('[data-count="workers:ALIVE"]')).to_have_attribute("data-value", "2")
    expect(page.locator('[data-count="jobs:SUCCEEDED"]')).to_have_attribute("data-value", "4")
    expect(page.locator('[data-count="jobs:DEAD_LETTERED"]')).to_have_attribute("data-value", "2")
    expect(page.locator("tr[data-queue=sim-llm]")).to_be_visible()
    expect(page.locator("#token-form")).to_be_visible()
    expect(page.locator("#read-only-banner")).to_have_count(0)

    tab.goto("/workers")
    for name in WORKERS:
        row = page.locator(f"tr[data-worker={name}]")
        expect(row).to_have_attribute("data-state", "ALIVE")
        expect(row.locator("[data-field=state]")).to_have_text("ALIVE")
        expect(row.locator("[data-field=verdict]")).to_have_text("HEALTHY")
        expect(row.locator(".gpu").first).to_be_visible()  # the simulated probe's GPUs
        expect(row.get_by_role("button", name="Quarantine")).to_be_enabled()
    for name in POISONERS:  # they left cleanly
        expect(page.locator(f"tr[data-worker={name}]")).to_have_attribute("data-state", "STOPPED")

    tab.goto("/workers/w1")
    head = page.locator(".head[data-worker=w1]")
    expect(head).to_have_attribute("data-state", "ALIVE")
    expect(head.locator("h1")).to_contain_text("Worker w1")
    expect(page.locator(".gpu").first).to_be_visible()
    expect(page.locator("tr[data-event=worker_registered]").first).to_be_visible()

    tab.goto("/jobs")
    for job_id, state in (
        (done, "SUCCEEDED"),
        (crashed, "SUCCEEDED"),
        ("poison-kept", "DEAD_LETTERED"),
    ):
        row = page.locator(f'tr[data-job="{job_id}"]')
        expect(row).to_have_attribute("data-state", state)
        expect(row.locator("[data-field=state]")).to_have_text(state)

    tab.goto(f"/jobs/{done}")
    expect(page.locator(".head h1")).to_contain_text(done)
    expect(page.locator(".head [data-field=state]")).to_have_text("SUCCEEDED")
    expect(page.locator("#result")).to_contain_text("olleh")  # the prompt, reversed

    # The child crashed on attempt 1 (the agent reports it worker_lost, or the watchdog
    # finds it stalled first); attempt 2 succeeded. The page shows what the ledger says.
    attempts = stack.gq.get(crashed).attempts
    assert len(attempts) == 2 and attempts[-1].outcome == "succeeded"
    tab.goto(f"/jobs/{crashed}")
    expect(page.locator("table.attempts tbody tr")).to_have_count(2)
    for n, attempt in enumerate(attempts, start=1):
        row = page.locator(f"table.attempts tr[data-attempt='{n}']")
        expect(row).to_have_attribute("data-outcome", attempt.outcome)
        expect(row.locator(".badge")).to_have_text(attempt.outcome)
        expect(row).to_contain_text(attempt.worker)
    expect(page.locator("#timeline .lane")).to_have_count(2)

    tab.goto("/jobs/poison-kept")
    expect(page.locator(".head")).to_have_attribute("data-state", "DEAD_LETTERED")
    lanes = page.locator("#timeline .lane-label")
    expect(lanes).to_have_text([f"#{n} {w}" for n, w in enumerate(POISONERS, start=1)])

    tab.goto("/failovers")
    expect(page.locator("h1")).to_contain_text("Failovers")

    tab.goto("/dead-letters")
    group = page.locator("section.group[data-reason=poison]")
    expect(group).to_have_attribute("data-count", "2")
    row = group.locator('tr[data-job="poison-kept"]')
    expect(row).to_have_attribute("data-state", "DEAD_LETTERED")
    for name in POISONERS:  # the evidence: which attempt ended how on which worker
        expect(row).to_contain_text(f"{name}: worker_lost")

    assert tab.console_errors == [] and tab.page_errors == []


# -- actions --------------------------------------------------------------------------------


def test_read_only_dashboard_refuses_every_action(
    stack: Stack, open_tab: Callable[..., Tab]
) -> None:
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
    from playwright.sync_api import expect

    tab = open_tab(stack.read_only)
    page = tab.page
    tab.goto("/workers")
    expect(page.locator("#read-only-banner")).to_be_visible()
    expect(page.locator("#read-only-banner")).to_contain_text("GRIDQUEUE_DASHBOARD_TOKEN")
    expect(page.locator("#token-form")).to_have_count(0)
    buttons = page.locator("button.act")
    assert buttons.count() >= 2
    for i in range(buttons.count()):
        expect(buttons.nth(i)).to_be_disabled()

    tab.goto("/dead-letters")
    expect(page.locator("#read-only-banner")).to_be_visible()
    replay = page.locator('tr[data-job="poison-kept"]').get_by_role("button", name="Replay")
    expect(replay).to_be_disabled()
    replay.click(force=True)  # a disabled button does nothing, even when clicked
    expect(page.locator("#flash .msg")).to_have_count(0)
    # Enabled by hand, the page itself refuses and says why. Enabled and clicked in one
    # script: the page refetches its live part (once its stream connects, then whenever
    # it is idle) and swaps in the server's disabled buttons, so a button enabled in one
    # step could be disabled again before a click in the next. On a busy machine the swap
    # can even land between finding the button and clicking it, and a click on a button
    # no longer in the page reaches no handler: so it is clicked again, a few times at
    # most, until the page answers.
    refusals = page.locator("#flash .msg[data-kind=error]")
    for _ in range(20):
        replay.evaluate("(button) => { button.disabled = false; button.click(); }")
        try:
            refusals.first.wait_for(state="attached", timeout=1500)
            break
        except PlaywrightTimeoutError:
            continue
    expect(tab.flash("error")).to_contain_text("The dashboard is read-only")
    # Around the page's guard: the server itself refuses, with how to enable actions.
    for path, body in (
        ("/api/dead-letters/poison-kept/replay", None),
        ("/api/workers/w1/quarantine", {"reason": "r"}),
    ):
        reply = page.evaluate(
            """async ([path, token, body]) => {
                const res = await fetch(path, {method: "POST", headers: {
                    Authorization: `Bearer ${token}`, "Content-Type": "application/json"},
                    body: body ? JSON.stringify(body) : undefined});
                return {status: res.status, body: await res.json()};
            }""",
            [path, TOKEN, body],
        )
        assert reply["status"] == 403, reply
        assert "read-only" in reply["body"]["error"], reply
    assert tab.dialogs == []
    assert stack.ledger.get("poison-kept").state is JobState.DEAD_LETTERED
    assert stack.ledger.worker("w1").state is WorkerState.ALIVE  # type: ignore[union-attr]
    assert tab.page_errors == [] and unexpected_console_errors(tab) == []


def test_quarantine_needs_the_token(stack: Stack, open_tab: Callable[..., Tab]) -> None:
    from playwright.sync_api import expect

    ledger = stack.ledger
    tab = open_tab(stack.armed, reason="fan failing")
    page = tab.page
    tab.goto("/workers/w1")
    head = page.locator(".head[data-worker=w1]")
    quarantine = head.get_by_role("button", name="Quarantine")
    try:
        # No token entered: refused in the page, nothing sent.
        quarantine.click()
        expect(tab.flash("error")).to_contain_text("Enter the dashboard token first")
        assert tab.dialogs == []
        assert ledger.worker("w1").state is WorkerState.ALIVE  # type: ignore[union-attr]

        # A wrong token: the server refuses it, the page says so and forgets the token.
        tab.set_token("not-the-token")
        quarantine.click()
        expect(tab.flash("error")).to_contain_text("missing or wrong token")
        expect(page.locator("#token-state")).to_have_attribute("data-set", "false")
        assert len(tab.dialogs) == 1 and "Reason?" in tab.dialogs[0]
        assert ledger.worker("w1").state is WorkerState.ALIVE  # type: ignore[union-attr]
        expect(head).to_have_attribute("data-state", "ALIVE")

        # The token: quarantined in the ledger, and the page shows it without a reload.
        tab.set_token(TOKEN)
        quarantine.click()
        expect(tab.flash("ok")).to_contain_text("quarantine w1: done")
        record = ledger.worker("w1")
        assert record is not None and record.state is WorkerState.QUARANTINED
        assert record.quarantine_reason == "fan failing"
        assert record.quarantined_by == "dashboard:127.0.0.1"
        expect(head).to_have_attribute("data-state", "QUARANTINED")
        expect(head.locator("[data-field=state]")).to_have_text("QUARANTINED")
        expect(page.locator("dl.facts")).to_contain_text("by dashboard:127.0.0.1: fan failing")

        # And back: Release, after its confirmation.
        head.get_by_role("button", name="Release").click()
        expect(tab.flash("ok")).to_contain_text("release w1: done")
        assert ledger.worker("w1").state is WorkerState.ALIVE  # type: ignore[union-attr]
        expect(head).to_have_attribute("data-state", "ALIVE")
        assert tab.dialogs[-1].startswith("Release w1 now?")
    finally:  # the next tests need w1 serving
        if ledger.worker("w1").state is WorkerState.QUARANTINED:  # type: ignore[union-attr]
            ledger.release("w1", "test-cleanup")
    assert tab.navigations == 1  # the first load only
    assert tab.page_errors == [] and unexpected_console_errors(tab) == []


def test_replay_a_dead_letter_with_the_token(stack: Stack, open_tab: Callable[..., Tab]) -> None:
    from playwright.sync_api import expect

    ledger = stack.ledger
    tab = open_tab(stack.armed)
    page = tab.page
    tab.goto("/dead-letters")
    row = page.locator('tr[data-job="poison-replayed"]')
    expect(row).to_have_attribute("data-state", "DEAD_LETTERED")
    replay = row.get_by_role("button", name="Replay")

    # No token yet: refused in the page. The live area redraws this table as the dead
    # letters change, and a click that lands during a redraw meets a row on its way out,
    # as a user's would: click again, as the user would, until the refusal shows.
    for tries_left in (2, 1, 0):
        replay.click()
        try:
            expect(tab.flash("error")).to_contain_text(
                "Enter the dashboard token first", timeout=5_000
            )
            break
        except AssertionError:
            if not tries_left:
                raise
    assert ledger.get("poison-replayed").state is JobState.DEAD_LETTERED

    tab.set_token(TOKEN)
    replay.click()
    assert tab.dialogs == ["Replay job poison-replayed as a fresh attempt chain?"]
    expect(tab.flash("ok")).to_contain_text("replayed poison-replayed as attempt 4")
    wait_for(lambda: ledger.get("poison-replayed").state is not JobState.DEAD_LETTERED)
    # The real workers serve its model: it runs again, and this time it succeeds.
    wait_for(lambda: ledger.get("poison-replayed").state is JobState.SUCCEEDED, timeout_s=60)
    last = ledger.get("poison-replayed").attempts[-1]
    assert last.worker in WORKERS and last.outcome == "succeeded"
    # The page drops it from the dead letters live; the other one stays.
    expect(row).to_have_count(0)
    expect(page.locator('tr[data-job="poison-kept"]')).to_have_attribute(
        "data-state", "DEAD_LETTERED"
    )
    assert ledger.get("poison-kept").state is JobState.DEAD_LETTERED
    assert tab.navigations == 1
    assert tab.page_errors == [] and unexpected_console_errors(tab) == []


# -- a worker dies: live, then on the failovers page -----------------------------------------
# (last in the file: it leaves one worker DEAD)


def running_on(ledger: Ledger, job_ids: list[str]) -> dict[str, str]:
    found = {}
    for job_id in job_ids:
        record = ledger.get(job_id)
        if record.state is JobState.RUNNING and record.worker:
            found[job_id] = record.worker
    return found


def test_a_killed_worker_turns_dead_live_and_its_incident_is_listed(
    stack: Stack, open_tab: Callable[..., Tab]
) -> None:
    from playwright.sync_api import expect

    ledger, gq = stack.ledger, stack.gq
    wait_until_watchdog_judges(ledger)  # so the node's death is judged, not its attempts
    tab = open_tab(stack.armed)
    page = tab.page
    tab.goto("/workers")
    page.evaluate("window.__marker = 1")

    jobs = [gq.submit("sim-llm", {"prompt": f"long {i}", "ms": 3000}) for i in range(4)]
    ids = [job.id for job in jobs]
    placed = wait_for(lambda: len(running_on(ledger, ids)) == 4 and running_on(ledger, ids))
    victim = placed[ids[0]]
    moved = sorted(job_id for job_id, worker in placed.items() if worker == victim)
    survivor = next(name for name in WORKERS if name != victim)

    stack.fleet.kill(victim, signal.SIGKILL)  # its whole process group: node and children

    row = page.locator(f"tr[data-worker={victim}]")
    expect(row).to_have_attribute("data-state", "DEAD", timeout=DEAD_TIMEOUT_MS)
    expect(row.locator("[data-field=state]")).to_have_text("DEAD")
    expect(page.locator(f"tr[data-worker={survivor}]")).to_have_attribute("data-state", "ALIVE")
    assert page.evaluate("window.__marker") == 1, "the page was reloaded"
    assert tab.navigations == 1
    assert ledger.worker(victim).state is WorkerState.DEAD  # type: ignore[union-attr]

    tab.goto("/failovers")
    incident = page.locator("tbody[data-kind=worker_dead]").filter(
        has=page.locator(f'a[href="/workers/{victim}"]')
    )
    expect(incident).to_have_count(1)
    expect(incident.locator(".badge.k-worker_dead")).to_have_text("worker dead")
    expect(incident.locator("td.num").nth(3)).to_have_text(str(len(moved)))  # jobs moved
    incident.locator("summary").click()
    for job_id in moved:
        expect(incident.locator(f'tr[data-job="{job_id}"]')).to_be_visible()
        expect(incident.locator(f'tr[data-job="{job_id}"]')).to_contain_text("node_lost")
    assert tab.console_errors == [] and tab.page_errors == []
