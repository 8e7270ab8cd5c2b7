"""Celery's events as a gridqueue worker publishes them: from a template on kombu's Redis
transport, and still exactly what Celery's own dispatcher sends.

Every message heard on the event channels is compared, envelope and body, with what
Celery's ``EventDispatcher`` renders for the same events through kombu (all but the
delivery tag, a fresh uuid in each). A real receiver (Celery's ``EventReceiver`` feeding
``events.State``, as Flower and ``celery events`` run it) hears every attempt's
task-received, task-started and task-succeeded. Real parts throughout: a private
redis-server and, for the fleet test, a real worker.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from celery.events.dispatcher import EventDispatcher

from gridqueue import GridQueue
from gridqueue.brokers.events import RedisEventDispatcher
from gridqueue.brokers.rendering import _keeping_channel, _KeptBatch
from gridqueue.celeryapp import TASK_NAME, make_celery
from gridqueue.fleet import LocalFleet
from gridqueue.keys import attempt_id
from tests.helpers import wait_for

pytestmark = pytest.mark.integration

JOBS = 20
# The fields of each task event, as Celery 5 sends them (its "Event Reference").
COMMON = {"type", "uuid", "hostname", "timestamp", "utcoffset", "pid", "clock"}
FIELDS = {
    "task-received": COMMON
    | {"name", "args", "kwargs", "root_id", "parent_id", "retries", "eta", "expires"},
    "task-started": COMMON,
    "task-succeeded": COMMON | {"result", "runtime"},
}


def celerys_own(app: Celery, hostname: str, events: Any, routing_key: str) -> list[Any]:
    """The Redis commands Celery's own ``EventDispatcher`` sends to publish ``events``
    (one event, or a list of them) under ``routing_key``: kombu's publish, kept instead
    of sent."""
    kept: list[_KeptBatch] = []

    def keep(channel: Any) -> _KeptBatch:
        kept.append(_KeptBatch(channel))
        return kept[-1]

    connection: Any = app.connection_for_write()
    connection.transport.Channel = _keeping_channel(connection.transport.Channel, keep)
    try:
        dispatcher = EventDispatcher(connection, hostname=hostname, app=app)
        with dispatcher.producer.batch():
            dispatcher._publish(events, dispatcher.producer, routing_key)
        dispatcher.close()
    finally:
        connection.release()
    return [(name, *args) for batch in kept for name, args in batch.commands]


def heard_messages(pubsub: Any, quiet_s: float = 0.5) -> list[tuple[str, str]]:
    """Every message heard on the subscribed event channels, as (channel, payload),
    until nothing more comes for ``quiet_s``."""
    heard = []
    quiet = 0.0
    while quiet < quiet_s:
        message = pubsub.get_message(timeout=0.1)
        if message is None:
            quiet += 0.1
            continue
        quiet = 0.0
        heard.append((str(message["channel"]), str(message["data"])))
    return heard


def body_of(payload: str) -> Any:
    return json.loads(base64.b64decode(json.loads(payload)["body"]))


def assert_celerys_own(app: Celery, channel: str, payload: str) -> None:
    """``payload`` heard on ``channel`` is what Celery's own dispatcher sends for the same
    events, all but the delivery tag (a fresh uuid in every message)."""
    message = json.loads(payload)
    body = body_of(payload)
    routing_key = message["properties"]["delivery_info"]["routing_key"]
    hostname = message["headers"]["hostname"]
    [(command, topic, expected)] = celerys_own(app, hostname, body, routing_key)
    assert (command, topic) == ("publish", channel)
    expected_message = json.loads(expected)
    tag = message["properties"]["delivery_tag"]
    assert isinstance(tag, str) and tag != expected_message["properties"]["delivery_tag"]
    expected_message["properties"]["delivery_tag"] = tag
    assert message == expected_message
    assert payload == json.dumps(expected_message)  # and in kombu's very text


@pytest.fixture
def events_pubsub(redis_url: str) -> Iterator[Any]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*celeryev/*")
    wait_for(lambda: client.pubsub_numpat() >= 1)
    yield pubsub
    pubsub.close()
    client.close()


def test_the_dispatcher_sends_celerys_own_messages_from_a_template(
    redis_url: str, events_pubsub: Any
) -> None:
    app = make_celery(redis_url)
    connection: Any = app.connection_for_write()
    dispatcher = app.events.Dispatcher(connection, hostname="n1@host", buffer_group=["task"])
    assert isinstance(dispatcher, RedisEventDispatcher)
    clock_before = app.clock.value
    sent = [
        ("task-received", {"uuid": "j1.1", "name": TASK_NAME, "args": "['j1', 1]", "kwargs": "{}"}),
        ("task-started", {"uuid": "j1.1"}),
        ("task-succeeded", {"uuid": "j1.1", "result": "{'text': 'h\u00e9'}", "runtime": 0.25}),
    ]
    for type_, fields in sent:
        dispatcher.send(type_, **fields)
        dispatcher.flush()  # as the worker's event loop does on its next tick
    dispatcher.send("task-received", uuid="j2.1", name=TASK_NAME, args="['j2', 1]", kwargs="{}")
    dispatcher.send("task-started", uuid="j2.1")
    dispatcher.flush()  # two buffered events: one message
    dispatcher.send("worker-heartbeat", freq=2.0, active=0, processed=3)  # not buffered
    heard = heard_messages(events_pubsub)
    assert dispatcher._templates["task.multi"] is not None  # the template path sent them
    assert dispatcher._templates["worker.heartbeat"] is not None
    dispatcher.close()
    connection.release()

    assert len(heard) == 5
    for channel, payload in heard:
        assert_celerys_own(app, channel, payload)
    events = [event for _, payload in heard for event in _listed(body_of(payload))]
    assert [e["type"] for e in events] == [t for t, _ in sent] + [
        "task-received",
        "task-started",
        "worker-heartbeat",
    ]
    for event, (_, fields) in zip(events, sent, strict=False):
        assert {k: event[k] for k in fields} == fields
        assert event["hostname"] == "n1@host"
    # Lamport clock: one step of the app's clock per event, as Celery's dispatcher does.
    assert [e["clock"] for e in events] == list(range(clock_before + 1, clock_before + 7))


def test_closing_sends_the_events_still_buffered(redis_url: str, events_pubsub: Any) -> None:
    """A worker's last task events wait for the next flush; closing the dispatcher (a warm
    shutdown) sends them first, where Celery's would leave them behind."""
    app = make_celery(redis_url)
    connection: Any = app.connection_for_write()
    dispatcher = app.events.Dispatcher(connection, hostname="n1@host", buffer_group=["task"])
    dispatcher.send("task-succeeded", uuid="j3.1", result="'ok'", runtime=0.5)
    assert heard_messages(events_pubsub, quiet_s=0.3) == []  # buffered, not sent
    dispatcher.close()
    dispatcher.close()  # once only
    connection.release()
    [(channel, payload)] = heard_messages(events_pubsub)
    assert_celerys_own(app, channel, payload)
    [event] = body_of(payload)
    assert (event["type"], event["uuid"], event["result"]) == ("task-succeeded", "j3.1", "'ok'")


def _listed(body: Any) -> list[dict[str, Any]]:
    return body if isinstance(body, list) else [body]


def test_a_workers_task_events_are_celerys_own_and_a_receiver_hears_every_attempt(
    redis_url: str, fleet: LocalFleet, gq: GridQueue, events_pubsub: Any
) -> None:
    app = make_celery(redis_url)
    state = app.events.State()
    received: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        received.append(dict(event))  # before State marks it
        state.event(event)

    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": on_event})
        listening = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        listening.start()
        try:
            fleet.start_worker("w1", concurrency=2)
            fleet.wait_alive(gq.ledger, ["w1"])
            # The receiver is subscribed once it hears the worker's event heartbeat.
            node = wait_for(lambda: next(iter(state.workers), None), timeout_s=60)
            jobs = [gq.submit("sim-llm", {"prompt": f"p{i}", "ms": 0}) for i in range(JOBS)]
            results = {job.id: job.result(timeout=60) for job in jobs}
            attempts = {attempt_id(job.id, 1): job.id for job in jobs}

            def all_succeeded() -> bool:
                tasks = [state.tasks.get(a) for a in attempts]
                return all(t is not None and t.state == "SUCCESS" and t.started for t in tasks)

            wait_for(all_succeeded, timeout_s=60)
        finally:
            receiver.should_stop = True
            listening.join(timeout=10)
    heard = heard_messages(events_pubsub)

    # On the wire: every message is Celery's own rendering of its events (the producer's
    # task-sent events too, which the ledger's script publishes).
    for channel, payload in heard:
        assert_celerys_own(app, channel, payload)
    everything = [event for _, payload in heard for event in _listed(body_of(payload))]
    wire = [event for event in everything if event["hostname"] == node]
    by_attempt: dict[str, list[dict[str, Any]]] = {a: [] for a in attempts}
    for event in wire:
        if event.get("uuid") in by_attempt:
            by_attempt[event["uuid"]].append(event)
    for attempt, events in by_attempt.items():
        assert [e["type"] for e in events] == list(FIELDS), attempt
        for event in events:
            assert set(event) == FIELDS[event["type"]], event
        received_event, _, succeeded = events
        assert received_event["name"] == TASK_NAME
        assert received_event["args"] == repr([attempts[attempt], 1])
        assert received_event["retries"] == 0
        assert isinstance(succeeded["runtime"], float)
        assert attempts[attempt] in results
    # The worker's Lamport clock moves forward with every event it sends.
    clocks = [e["clock"] for e in wire]
    assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks)

    # The receiver heard the same events, and events.State tells each attempt's story.
    heard_by_receiver = [
        {k: v for k, v in e.items() if k != "local_received"}
        for e in received
        if e.get("uuid") in attempts and e["hostname"] == node
    ]
    assert heard_by_receiver == [e for e in wire if e.get("uuid") in attempts]
    for attempt in attempts:
        task = state.tasks[attempt]
        assert (task.name, task.worker.hostname, task.retries) == (TASK_NAME, node, 0)
        assert task.received and task.started and task.succeeded and task.runtime is not None
