"""The broker seam, without a server: which broker a setting names, and what each one
configures (priorities, queue arguments, transport options)."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import urllib.parse
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from gridqueue.brokers import broker_of
from gridqueue.brokers.amqp import (
    MANAGEMENT_TIMEOUT_S,
    AmqpBroker,
    ManagementTarget,
    server_version,
)
from gridqueue.brokers.redis import RedisBroker
from gridqueue.celeryapp import NEVER_REDELIVER_S, broker_client_name, celery_for
from gridqueue.connection import RedisTarget
from gridqueue.embedded import free_port
from gridqueue.settings import Settings
from gridqueue.states import WorkerState

REDIS = "redis://127.0.0.1:1/0"
AMQP = "amqp://user:secret@rabbit.example:5672/gq"


def test_unset_the_broker_is_the_ledgers_redis() -> None:
    settings = Settings(redis_url=REDIS)
    assert isinstance(settings.broker, RedisBroker)
    app = celery_for(settings)
    assert app.conf.broker_url == REDIS
    assert app.conf.broker_transport_options["visibility_timeout"] == NEVER_REDELIVER_S
    assert app.conf.worker_disable_prefetch is True
    assert app.conf.task_queue_max_priority is None
    assert isinstance(broker_of(RedisTarget(REDIS), "  "), RedisBroker)  # empty is unset


def test_amqp_puts_the_messages_on_rabbitmq_and_the_ledger_stays_on_redis() -> None:
    settings = Settings(redis_url=REDIS, broker_url=AMQP, broker_consumer_timeout_s=7200)
    assert isinstance(settings.broker, AmqpBroker)
    assert settings.redis_target.url == REDIS
    app = celery_for(settings)
    conf = app.conf
    assert conf.broker_url == AMQP
    assert conf.broker_transport_options == {"confirm_publish": True}
    assert conf.task_acks_late and conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    # Redis-only: Celery ignores it elsewhere, with a warning in every worker.
    assert not conf.worker_disable_prefetch
    queue = app.amqp.queues["gq.model.sim-llm"]  # a per-model queue, made on demand
    assert queue.queue_arguments == {"x-max-priority": 9, "x-consumer-timeout": 7_200_000}
    assert queue.durable


def test_a_requeued_attempt_goes_first_on_either_broker() -> None:
    redis_broker = broker_of(RedisTarget(REDIS))
    amqp_broker = broker_of(RedisTarget(REDIS), AMQP)
    requeue, fresh, batch = 0, 3, 6
    # kombu's Redis transport serves the lowest number first, RabbitMQ the highest.
    assert redis_broker.message_priority(requeue) < redis_broker.message_priority(fresh)
    assert amqp_broker.message_priority(requeue) > amqp_broker.message_priority(fresh)
    assert amqp_broker.message_priority(fresh) > amqp_broker.message_priority(batch)
    assert [amqp_broker.message_priority(s) for s in (0, 9)] == [9, 0]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://127.0.0.1:6379/0", "must be an amqp:// or amqps:// URL"),
        ("rabbit.example:5672", "must be an amqp:// or amqps:// URL"),
        ("amqp:///vhost", "names no host"),
    ],
)
def test_a_broker_url_that_names_no_rabbitmq_is_refused_with_what_to_do(
    url: str, message: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(redis_url=REDIS, broker_url=url)
    text = str(caught.value)
    assert message in text and "GRIDQUEUE_BROKER_URL" in text


def test_the_server_version_decides_where_the_consumer_timeout_is_set() -> None:
    assert server_version({"version": b"3.10.8"}) == (3, 10, 8)
    assert server_version({"version": "4.0.5"}) == (4, 0, 5)
    assert server_version({}) is None


def test_the_management_api_is_found_from_the_broker_url_unless_told() -> None:
    derived = ManagementTarget.of(AMQP, None)
    assert derived == ManagementTarget("http://rabbit.example:15672", "user", "secret", "gq")
    tls = ManagementTarget.of("amqps://u:p%40ss@rabbit.example:5671//", None)
    assert tls == ManagementTarget("https://rabbit.example:15672", "u", "p@ss", "/")
    told = ManagementTarget.of(AMQP, "https://admin:pw@mgmt.example:443/rabbit/")
    assert told == ManagementTarget("https://mgmt.example:443/rabbit", "admin", "pw", "gq")
    assert ManagementTarget.of(AMQP, "off") is None


def test_a_management_url_that_is_not_http_is_refused_with_what_to_do() -> None:
    with pytest.raises(ValidationError, match="management API as an http"):
        Settings(redis_url=REDIS, broker_url=AMQP, broker_management_url="amqp://x:15672")


def test_a_workers_amqp_connections_carry_its_name() -> None:
    settings = Settings(redis_url=REDIS, broker_url=AMQP)
    app = celery_for(settings, client_name=broker_client_name("w1"))
    options = app.conf.broker_transport_options
    assert options["client_properties"] == {"connection_name": "gridqueue-broker:w1"}
    assert options["confirm_publish"] is True  # the broker's own options are kept


class FakeManagementApi:
    """RabbitMQ's management API as far as the cut-off uses it: the vhost's connections
    with their client properties, and closing one by name (basic auth checked)."""

    def __init__(self, connections: dict[str, dict[str, str]], login: str = "user:secret"):
        self.connections = connections  # RabbitMQ's name -> {"vhost", "connection_name"}
        self.closed: list[tuple[str, str]] = []
        expected = "Basic " + base64.b64encode(login.encode()).decode()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == expected:
                    return True
                self.send_response(401)
                self.end_headers()
                return False

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                path, _, query = self.path.partition("?")
                vhost = urllib.parse.unquote(path.split("/")[3])
                assert path == f"/api/vhosts/{urllib.parse.quote(vhost, safe='')}/connections"
                assert "columns=name,client_properties" in query
                body = json.dumps(
                    [
                        {"name": name, "client_properties": {"connection_name": c["name"]}}
                        for name, c in api.connections.items()
                        if c["vhost"] == vhost
                    ]
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def do_DELETE(self) -> None:
                if not self._authorized():
                    return
                name = urllib.parse.unquote(self.path.removeprefix("/api/connections/"))
                if api.connections.pop(name, None) is None:
                    self.send_response(404)
                else:
                    api.closed.append((name, self.headers.get("X-Reason", "")))
                    self.send_response(204)
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_cut_off_closes_the_dead_workers_connections_and_no_other() -> None:
    api = FakeManagementApi(
        {
            "127.0.0.1:50001 -> 127.0.0.1:5672": {"vhost": "gq", "name": "gridqueue-broker:w1"},
            "127.0.0.1:50002 -> 127.0.0.1:5672": {"vhost": "gq", "name": "gridqueue-broker:w1"},
            "127.0.0.1:50003 -> 127.0.0.1:5672": {"vhost": "gq", "name": "gridqueue-broker:w2"},
            "127.0.0.1:50004 -> 127.0.0.1:5672": {"vhost": "other", "name": "gridqueue-broker:w1"},
        }
    )
    try:
        broker = AmqpBroker(AMQP, management_url=api.url)  # the broker URL's login
        assert broker.cut_off(None, ["w1", "w3"]) == 2  # type: ignore[arg-type]  # unused
        assert sorted(name for name, _ in api.closed) == [
            "127.0.0.1:50001 -> 127.0.0.1:5672",
            "127.0.0.1:50002 -> 127.0.0.1:5672",
        ]
        assert all("declared dead" in reason for _, reason in api.closed)
        assert sorted(c["name"] for c in api.connections.values()) == [
            "gridqueue-broker:w1",  # another vhost's: not this broker's
            "gridqueue-broker:w2",
        ]
        assert broker.cut_off(None, ["w1"]) == 0  # type: ignore[arg-type]  # none left
    finally:
        api.close()


def test_without_a_reachable_management_api_the_cut_off_fails_fast_and_waits() -> None:
    refused = AmqpBroker(AMQP, management_url=f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    assert refused.cut_off(None, ["w1"]) == 0  # type: ignore[arg-type]  # unused
    assert refused._cut.failed_at is not None, "the failure is remembered"
    assert refused.cut_off(None, ["w1"]) == 0  # type: ignore[arg-type]  # not tried again
    assert time.monotonic() - started < 2 * MANAGEMENT_TIMEOUT_S
    api = FakeManagementApi({}, login="someone:else")
    try:  # a login the API refuses: the same
        denied = AmqpBroker(AMQP, management_url=api.url)
        assert denied.cut_off(None, ["w1"]) == 0  # type: ignore[arg-type]
        assert denied._cut.failed_at is not None
    finally:
        api.close()
    assert AmqpBroker(AMQP, management_url="off").cut_off(None, ["w1"]) == 0  # type: ignore[arg-type]


class WorkerStates:
    """The one ledger read the cut-off makes: a worker's record (its state)."""

    def __init__(self, **states: WorkerState) -> None:
        self.states = states

    def worker(self, name: str) -> SimpleNamespace | None:
        state = self.states.get(name)
        return None if state is None else SimpleNamespace(name=name, state=state)


def test_a_connection_the_api_lists_late_is_closed_on_a_later_tick() -> None:
    """The management API lists a connection once its first statistics are in (up to 5 s):
    a worker cut off before its connections show is looked for again, once a second, for a
    while, as long as it is dead; not once its window is over."""
    api = FakeManagementApi({})
    ledger: Any = WorkerStates(w1=WorkerState.DEAD)
    try:
        broker = AmqpBroker(AMQP, management_url=api.url)
        assert broker.cut_off(ledger, ["w1"]) == 0  # not listed yet
        api.connections["127.0.0.1:50001 -> 127.0.0.1:5672"] = {
            "vhost": "gq",
            "name": "gridqueue-broker:w1",
        }
        assert broker.retry_cut_off(ledger) == 0  # within a second of the last look
        time.sleep(1.05)
        assert broker.retry_cut_off(ledger) == 1
        assert [name for name, _ in api.closed] == ["127.0.0.1:50001 -> 127.0.0.1:5672"]
        broker._cut.pending["w1"] = time.monotonic() - 1  # its window is over
        api.connections["127.0.0.1:50002 -> 127.0.0.1:5672"] = {
            "vhost": "gq",
            "name": "gridqueue-broker:w1",
        }
        time.sleep(1.05)
        assert broker.retry_cut_off(ledger) == 0
        assert not broker._cut.pending
    finally:
        api.close()


def test_a_worker_that_registered_again_keeps_its_new_connections() -> None:
    """A frozen node that thaws within the window registers again and connects anew, under
    the same name: those connections are its new incarnation's and stay open."""
    api = FakeManagementApi({})
    states = WorkerStates(w1=WorkerState.DEAD)
    try:
        broker = AmqpBroker(AMQP, management_url=api.url)
        assert broker.cut_off(states, ["w1"]) == 0  # type: ignore[arg-type]
        states.states["w1"] = WorkerState.ALIVE
        api.connections["127.0.0.1:50001 -> 127.0.0.1:5672"] = {
            "vhost": "gq",
            "name": "gridqueue-broker:w1",
        }
        time.sleep(1.05)
        assert broker.retry_cut_off(states) == 0  # type: ignore[arg-type]
        assert api.closed == [] and not broker._cut.pending
    finally:
        api.close()
