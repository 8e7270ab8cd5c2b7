"""The message a ledger script publishes is the one Celery's ``send_task`` would publish.

On the Redis broker, ``submit.lua`` and ``end_dispatch.lua`` push the attempt's message
themselves, rendered by :class:`gridqueue.brokers.rendering.MessageRenderer`. Here each
rendering is compared with what ``send_task`` really writes on a private Redis: the list
it LPUSHes to (kombu's priority list for the step) and the message there, and the
task-sent event it PUBLISHes (the fanout topic and the message), field for field, but
for the fields that are random by nature (kombu's delivery tag, the event's timestamp
and clock). Every priority step, attempt 1 and a requeue, events on and off, and a
``global_keyprefix``.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from kombu.exceptions import OperationalError

from gridqueue import GridQueue
from gridqueue.brokers.rendering import MessageRenderer, RenderedMessage
from gridqueue.celeryapp import PRIORITY_STEPS, TASK_NAME, make_celery, priority_lists
from gridqueue.dispatch import Dispatcher
from gridqueue.keys import attempt_id, queue_for_model
from gridqueue.ledger import Ledger
from gridqueue.settings import Settings

pytestmark = pytest.mark.integration

QUEUE = queue_for_model("gq", "sim-llm")
# kombu's delivery tag is a fresh uuid per publish; an event's timestamp and Lamport
# clock move on with every event.
RANDOM_PROPERTIES = ("delivery_tag",)
RANDOM_EVENT_FIELDS = ("timestamp", "clock")


def normalised(payload: str) -> dict[str, Any]:
    """A kombu message with its random fields blanked (an event's inside its body)."""
    message = json.loads(payload)
    for name in RANDOM_PROPERTIES:
        assert message["properties"].pop(name)
    if message["headers"].get("task") is None and message["properties"].get("body_encoding"):
        body = json.loads(base64.b64decode(message["body"]))
        if body.get("type") == "task-sent":
            for name in RANDOM_EVENT_FIELDS:
                assert name in body
                body.pop(name)
            message["body"] = body
    return message


def sent_by_celery(
    app: Celery, client: redis.Redis, task_id: str, args: list[Any], priority: int
) -> tuple[list[tuple[str, str, dict[str, Any]]], int]:
    """What ``send_task`` writes: its LPUSH (read back from the lists) and its PUBLISH
    (heard on every channel), as (command, key, message); and how many commands it ran."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*")
    before = {name: client.llen(name) for name in _all_lists(client)}
    app.send_task(TASK_NAME, args=args, task_id=task_id, queue=QUEUE, priority=priority)
    found: list[tuple[str, str, dict[str, Any]]] = []
    for name in _all_lists(client):
        added = client.llen(name) - before.get(name, 0)
        if added:
            assert added == 1, name
            found.append(("LPUSH", name, normalised(client.lindex(name, 0))))
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        heard = pubsub.get_message(timeout=0.1)
        if heard is not None:
            found.append(("PUBLISH", heard["channel"], normalised(heard["data"])))
            break
    pubsub.close()
    return found, len(found)


def _all_lists(client: redis.Redis) -> list[str]:
    return [k for k in client.keys("*") if client.type(k) == "list"]


def rendered(message: RenderedMessage) -> list[tuple[str, str, dict[str, Any]]]:
    return [(command, key, normalised(value)) for command, key, value in message.commands]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    found = redis.Redis.from_url(redis_url, decode_responses=True)
    yield found
    found.close()


def _app(redis_url: str, events: bool = True, **transport: Any) -> Celery:
    app = make_celery(redis_url, events=events)
    if transport:
        app.conf.broker_transport_options = {**app.conf.broker_transport_options, **transport}
    return app


Commands = list[tuple[str, str, dict[str, Any]]]


def render_and_send(
    redis_url: str, client: redis.Redis, job: str, attempt: int, priority: int,
    events: bool = True, **transport: Any,
) -> tuple[Commands, Commands]:  # fmt: skip
    """Attempt ``job``.``attempt`` rendered, then sent by ``send_task`` on the same app:
    (the rendering, what Celery wrote), each as :func:`rendered` gives it."""
    app = _app(redis_url, events, **transport)
    renderer = MessageRenderer(app)
    member = attempt_id(job, attempt)
    try:
        mine = rendered(renderer.render(TASK_NAME, member, [job, attempt], QUEUE, priority))
        celerys, _ = sent_by_celery(app, client, member, [job, attempt], priority)
    finally:
        renderer.close()
        app.close()
    return mine, celerys


@pytest.mark.parametrize("priority", range(10))
@pytest.mark.parametrize("attempt", [1, 2], ids=["first", "requeue"])
def test_the_rendered_message_is_what_send_task_publishes(
    redis_url: str, client: redis.Redis, priority: int, attempt: int
) -> None:
    """Each priority (kombu's steps take 0-9) and both attempt 1 and a requeue: the same
    list, the same message, the same task-sent event on the same topic."""
    mine, celerys = render_and_send(redis_url, client, "job-a", attempt, priority)
    assert [command for command, _, _ in mine] == ["LPUSH", "PUBLISH"]
    assert mine == celerys
    step = max(s for s in PRIORITY_STEPS if s <= priority)
    assert mine[0][1] == priority_lists(QUEUE)[PRIORITY_STEPS.index(step)]
    assert mine[1][1].endswith("celeryev/task.sent")


def test_without_events_no_task_sent_event_is_rendered(redis_url: str, client: redis.Redis) -> None:
    """With Celery's events off (``GRIDQUEUE_CELERY_EVENTS=0``), send_task publishes no
    task-sent event, and neither does the rendering."""
    mine, celerys = render_and_send(redis_url, client, "job-b", 1, 6, events=False)
    assert [command for command, _, _ in mine] == ["LPUSH"]
    assert mine == celerys


def test_kombus_global_keyprefix_is_on_the_rendered_keys(
    redis_url: str, client: redis.Redis
) -> None:
    """kombu's ``global_keyprefix`` transport option prefixes the queue's list (and the
    event's topic, if kombu does) as kombu's own client would."""
    mine, celerys = render_and_send(redis_url, client, "job-c", 1, 3, global_keyprefix="tenant-1:")
    assert mine[0][1].startswith("tenant-1:")
    assert mine == celerys


def test_rendering_sends_nothing(redis_url: str, client: redis.Redis) -> None:
    """A rendering writes nothing anywhere: the ledger's script is what publishes."""
    app = _app(redis_url)
    renderer = MessageRenderer(app)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*")
    try:
        renderer.render(TASK_NAME, "job-d.1", ["job-d", 1], QUEUE, 0)
        assert pubsub.get_message(timeout=0.3) is None
        assert _all_lists(client) == []
    finally:
        pubsub.close()
        renderer.close()
        app.close()


@pytest.mark.parametrize("workload", ["realtime", "batch"])
def test_the_dispatcher_renders_each_attempt_at_its_classs_priority(
    settings: Settings, ledger: Ledger, client: redis.Redis, workload: str
) -> None:
    """Attempt 1 at the class's priority, a requeue at its requeue priority: the same list
    and message as ``send_task`` at the priority ``Dispatcher`` gave it before the ledger
    published itself."""
    app = make_celery(settings.redis_target)
    dispatcher = Dispatcher(ledger, app)
    klass = ledger.workloads[workload]
    try:
        for attempt, step in ((1, klass.priority), (2, klass.requeue_priority)):
            member = attempt_id("job-e", attempt)
            message = dispatcher.render(member, "sim-llm", workload)
            assert message is not None
            celerys, _ = sent_by_celery(app, client, member, ["job-e", attempt], step)
            assert rendered(message) == celerys
            client.flushdb()
    finally:
        app.close()


def test_a_submit_whose_message_cannot_be_rendered_is_left_to_its_dispatch_lease(
    gq: GridQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rendering that fails (kombu cannot open its channel: the broker is down) does not
    fail the submit: the job is written under a dispatch lease, as on a broker the
    scripts cannot reach, and the watchdog publishes it when the lease lapses."""

    def broker_down(*args: Any, **kwargs: Any) -> Any:
        raise OperationalError("connection refused")

    renderer = gq.dispatcher.renderer
    assert renderer is not None
    monkeypatch.setattr(renderer, "render", broker_down)
    monkeypatch.setattr(gq.app, "send_task", broker_down)  # the lease path's publish too
    job = gq.submit("sim-llm", {"prompt": "later"}, workload="batch")
    member = attempt_id(job.id, 1)
    assert job.created
    assert gq.ledger.client.zscore(gq.ledger.keys.dispatch, member) is not None
    assert gq.ledger.client.zscore(gq.ledger.keys.published, member) is None
    assert sum(int(gq.ledger.client.llen(name)) for name in priority_lists(QUEUE)) == 0


@pytest.mark.parametrize("bad", [("DEL", "gq:stats", "x"), ("LPUSH", QUEUE)])
def test_a_message_with_anything_but_a_publish_is_refused_before_any_write(
    ledger: Ledger, client: redis.Redis, bad: tuple[str, ...]
) -> None:
    """The scripts run only kombu's publish commands, each with its key and value; a
    message with another (or a short triple) fails the submit before the job is written,
    so nothing is left without its message."""
    message = RenderedMessage((("LPUSH", QUEUE, "{}"), bad))  # type: ignore[arg-type]
    with pytest.raises(redis.ResponseError, match="not a publish command"):
        ledger.submit("job-bad", "sim-llm", "realtime", "{}", 0, None, message=message)
    assert not client.exists(ledger.keys.job("job-bad"))
    assert _all_lists(client) == []


def test_messages_from_one_template_each_carry_their_own_ids_tag_clock_and_time(
    redis_url: str, client: redis.Redis
) -> None:
    """After the first, a queue and priority's messages come from its template: each is
    still what ``send_task`` publishes for its own attempt, with a delivery tag of its
    own, the event clock moving on, and the time it was rendered at. An id of another
    shape than gridqueue's (one JSON would escape) is rendered by Celery, as before."""
    app = _app(redis_url)
    renderer = MessageRenderer(app)
    tags, clocks = set(), []
    try:
        for job in ("job-t1", "job-t2", 'job "quoted"\\', "job-t3"):
            before = time.time()
            message = renderer.render(TASK_NAME, f"{job}.2", [job, 2], QUEUE, 6)
            push, event = (json.loads(value) for _, _, value in message.commands)
            tags.add(push["properties"]["delivery_tag"])
            body = json.loads(base64.b64decode(event["body"]))
            clocks.append(body["clock"])
            assert before <= body["timestamp"] <= time.time()
            assert json.loads(base64.b64decode(push["body"]))[0] == [job, 2]
            celerys, _ = sent_by_celery(app, client, f"{job}.2", [job, 2], 6)
            assert rendered(message) == celerys
            client.flushdb()
    finally:
        renderer.close()
        app.close()
    assert len(tags) == 4
    assert clocks == sorted(clocks) and len(set(clocks)) == 4


def test_a_message_that_cannot_be_pushed_leaves_no_job_behind(
    ledger: Ledger, client: redis.Redis
) -> None:
    """Redis does not undo a script's earlier writes when a command fails, so submit
    publishes before it writes: a push that fails (here the queue's key holds a string)
    fails the submit with nothing written, never a job without its message."""
    client.set("gq-not-a-list", "x")
    message = RenderedMessage((("LPUSH", "gq-not-a-list", "{}"),))
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        ledger.submit("job-wt", "sim-llm", "realtime", "{}", 0, None, message=message)
    assert not client.exists(ledger.keys.job("job-wt"))
    assert client.zscore(ledger.keys.published, "job-wt.1") is None
    assert client.zscore(ledger.keys.dispatch, "job-wt.1") is None


def test_a_worker_process_keeps_one_dispatcher_and_its_renderer(settings: Settings) -> None:
    """Every immediate retry a worker publishes goes through the same renderer: one
    broker channel and one set of templates per process, not one opened per publish."""
    from gridqueue.runner import WorkerRuntime

    app = make_celery(settings.redis_url)
    runtime = WorkerRuntime("w1", ["sim-llm"], settings, 1, app)
    try:
        first = runtime.dispatcher
        assert runtime.dispatcher is first
        assert first.renderer is not None
        first.render(attempt_id("job-r", 2), "sim-llm", "realtime")
        assert runtime.dispatcher.renderer is first.renderer and first.renderer.opened
    finally:
        if runtime.dispatcher.renderer is not None:
            runtime.dispatcher.renderer.close()
        app.close()


def test_a_forked_child_renders_on_a_channel_of_its_own(redis_url: str) -> None:
    """A producer made before a fork (a preloading web server): the child renders on a
    channel and lock of its own, never on the parent's socket, and the parent's still
    works after."""
    import os

    app = _app(redis_url)
    renderer = MessageRenderer(app)
    try:
        renderer.render(TASK_NAME, "job-p.1", ["job-p", 1], QUEUE, 0)
        parents = renderer._channel
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            ok = False
            try:
                message = renderer.render(TASK_NAME, "job-c.1", ["job-c", 1], QUEUE, 0)
                ok = renderer._channel is not parents and "job-c.1" in message.commands[0][2]
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert renderer._channel is parents
        after = renderer.render(TASK_NAME, "job-q.1", ["job-q", 1], QUEUE, 0)
        assert "job-q.1" in after.commands[0][2]
    finally:
        renderer.close()
        app.close()
