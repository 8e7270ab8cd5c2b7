"""RabbitMQ as the broker (``GRIDQUEUE_BROKER_URL=amqp://...``); the ledger stays on Redis.

What differs from the Redis broker, and why:

- **Priorities.** Every queue is declared with ``x-max-priority`` (9), and RabbitMQ serves
  the *highest* priority first, so gridqueue's step ``s`` (0 first) is written as
  ``9 - s``: a requeued attempt (step 0) still goes ahead of fresh work.
- **Redelivery is the broker's.** RabbitMQ returns a consumer's unacked messages to the
  queue the moment its connection or channel closes (a worker killed with SIGKILL, a
  network cut), and delivers them again at once. That is harmless: the ledger's claim
  admits one delivery of the current attempt; a redelivered copy of an attempt that is
  running elsewhere, superseded or ended is refused and acked. There is no shared
  ``unacked`` structure to sweep, so the Redis broker's stranded-delivery sweep has
  nothing to do here, and the watchdog publishes nothing for it.
- **No message is "nowhere".** On Redis a consumer killed between BRPOP and its
  ``unacked`` write loses the message, which the watchdog looks for. On RabbitMQ a
  delivery is either in its queue or held by a live channel, and a publish is confirmed
  (``confirm_publish``) only once the broker has the durable, persistent message, so the
  lost-message check is skipped. A publish that fails or is never confirmed leaves its
  dispatch lease in the ledger, and the watchdog publishes again when the lease lapses.
- **A frozen node.** A stopped process keeps its connection, and RabbitMQ may push a
  requeued attempt into its free prefetch slots, where nobody claims it. Every connection
  of a worker carries its name (the ``connection_name`` client property,
  ``gridqueue-broker:<worker>``), and when the watchdog declares a worker dead on its
  heartbeat it closes them through RabbitMQ's management API before it publishes the
  worker's attempts again: RabbitMQ returns what they held to the queues at once. Where
  the management API cannot be reached (the plugin is off, a login without the rights),
  the watchdog says so in its log and the AMQP heartbeat (10 s; Celery's default is 120 s)
  is the bound: RabbitMQ closes such a connection within about two heartbeats.
- **Consumer timeout.** RabbitMQ closes the channel of a consumer that holds an unacked
  message longer than ``consumer_timeout`` (30 min by default), which would cut long
  inference attempts. Queues are declared with ``x-consumer-timeout``
  (``GRIDQUEUE_BROKER_CONSUMER_TIMEOUT_S``), which RabbitMQ 3.12 and later honour per
  queue. Older servers ignore the argument: raise ``consumer_timeout`` in rabbitmq.conf
  instead (the start check logs a warning on such a server).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import kombu
from celery import Celery
from celery.app.amqp import AMQP, Queues

from gridqueue.brokers import LOWEST_PRIORITY
from gridqueue.errors import BrokerUnavailableError
from gridqueue.logs import get_logger

if TYPE_CHECKING:
    from gridqueue.ledger import Ledger

# The first RabbitMQ release that honours the x-consumer-timeout queue argument.
CONSUMER_TIMEOUT_ARGUMENT_SINCE = (3, 12)
DEFAULT_CONSUMER_TIMEOUT_S = 86_400
# The AMQP heartbeat a connection negotiates: RabbitMQ closes a connection that sent nothing
# for about this long, and returns what it held to its queues.
AMQP_HEARTBEAT_S = 10

# RabbitMQ's management API: where it listens by default, and how long the watchdog's tick
# waits for it (it runs only on a heartbeat verdict).
MANAGEMENT_PORT = 15672
MANAGEMENT_TIMEOUT_S = 2.0
# After the API failed, how long before it is tried again (a tick must not wait on a
# management listener that is down at every verdict).
MANAGEMENT_RETRY_AFTER_S = 60.0
# How long after a verdict the worker's connections are looked for again: the API lists a
# connection only once its first statistics are in (collect_statistics_interval, 5 s).
CUT_OFF_RETRY_FOR_S = 12.0

log = get_logger("gridqueue.brokers.amqp")


@dataclass(frozen=True)
class ManagementTarget:
    """Where RabbitMQ's management API is, with the login, and the broker's vhost."""

    base_url: str
    user: str
    password: str
    vhost: str

    @classmethod
    def of(cls, broker_url: str, management_url: str | None) -> ManagementTarget | None:
        """From ``Settings.broker_management_url``, or derived from the broker URL (same
        host and login, port 15672, https for amqps); None for ``off``."""
        broker = urllib.parse.urlsplit(broker_url)
        path = urllib.parse.unquote(broker.path[1:]) if broker.path else ""
        vhost = path or "/"
        if management_url and management_url.strip() == "off":
            return None
        if management_url:
            given = urllib.parse.urlsplit(management_url)
            host = given.hostname or ""
            netloc = host if given.port is None else f"{host}:{given.port}"
            base = urllib.parse.urlunsplit((given.scheme, netloc, given.path.rstrip("/"), "", ""))
            user = urllib.parse.unquote(given.username or broker.username or "guest")
            password = urllib.parse.unquote(given.password or broker.password or "guest")
            return cls(base, user, password, vhost)
        scheme = "https" if broker.scheme.lower() == "amqps" else "http"
        base = f"{scheme}://{broker.hostname or 'localhost'}:{MANAGEMENT_PORT}"
        user = urllib.parse.unquote(broker.username or "guest")
        password = urllib.parse.unquote(broker.password or "guest")
        return cls(base, user, password, vhost)

    def _request(self, method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
        login = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            headers={"Authorization": f"Basic {login}", **(headers or {})},
        )
        with urllib.request.urlopen(request, timeout=MANAGEMENT_TIMEOUT_S) as response:
            body: bytes = response.read()
        return body

    def connections_named(self, names: set[str]) -> list[str]:
        """The vhost's connections whose ``connection_name`` client property is in
        ``names`` (RabbitMQ's own names for them)."""
        vhost = urllib.parse.quote(self.vhost, safe="")
        listed = json.loads(
            self._request("GET", f"/api/vhosts/{vhost}/connections?columns=name,client_properties")
        )
        return [
            str(c["name"])
            for c in listed
            if (c.get("client_properties") or {}).get("connection_name") in names
        ]

    def close(self, connection: str, reason: str) -> None:
        path = "/api/connections/" + urllib.parse.quote(connection, safe="")
        try:
            self._request("DELETE", path, {"X-Reason": reason})
        except urllib.error.HTTPError as exc:
            if exc.code != 404:  # closed meanwhile: gone all the same
                raise


def _queues_with_consumer_timeout(timeout_ms: int) -> type[Queues]:
    """Celery's queue table, declaring every queue it creates on demand (the per-model
    queues) with ``x-consumer-timeout``; ``task_queue_max_priority`` adds x-max-priority."""

    class ConsumerTimeoutQueues(Queues):  # type: ignore[misc]  # celery ships no hints
        def new_missing(self, name: str) -> Any:
            queue = super().new_missing(name)
            arguments = dict(queue.queue_arguments or {})
            arguments.setdefault("x-consumer-timeout", timeout_ms)
            queue.queue_arguments = arguments
            return queue

    return ConsumerTimeoutQueues


def server_version(properties: dict[str, Any]) -> tuple[int, ...] | None:
    """RabbitMQ's version from its connection properties, e.g. (3, 13, 7)."""
    raw = properties.get("version")
    text = raw.decode() if isinstance(raw, bytes) else str(raw or "")
    parts = []
    for piece in text.split("."):
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts) or None


@dataclass
class _CutOffState:
    """What the cut-off remembers between calls (the broker itself is an immutable value)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    # workers cut off lately -> until when (monotonic s) their connections are looked for
    pending: dict[str, float] = field(default_factory=dict)
    last_try: float = 0.0
    # when the management API last failed, so a dead listener is not waited on each time
    failed_at: float | None = None


@dataclass(frozen=True)
class AmqpBroker:
    url: str
    consumer_timeout_s: int = DEFAULT_CONSUMER_TIMEOUT_S
    name: str = "amqp"
    management_url: str | None = None
    _cut: _CutOffState = field(default_factory=_CutOffState, compare=False, repr=False)

    def configure(self, app: Celery) -> None:
        app.conf.update(
            # a publish returns once RabbitMQ has the message (durable queue, persistent
            # message): a lost publish is a failed one, and its dispatch lease lapses
            broker_transport_options={"confirm_publish": True},
            task_queue_max_priority=LOWEST_PRIORITY,
            # A frozen node (SIGSTOP, a hung host) keeps its connection open, and RabbitMQ
            # pushes into its free prefetch slots: a requeued attempt can sit there, never
            # claimed, until RabbitMQ sees the connection's heartbeats stop and returns the
            # messages. Celery's 120 s default would hold such an attempt for minutes.
            broker_heartbeat=AMQP_HEARTBEAT_S,
        )
        queues = _queues_with_consumer_timeout(self.consumer_timeout_s * 1000)

        class GridQueueAmqp(AMQP):  # type: ignore[misc]  # celery ships no hints
            queues_cls = queues

        app.amqp_cls = GridQueueAmqp

    def name_connections(self, app: Celery, client_name: str) -> None:
        """The ``connection_name`` client property, which RabbitMQ shows and its
        management API lists."""
        options = dict(app.conf.broker_transport_options or {})
        properties = dict(options.get("client_properties") or {})
        properties["connection_name"] = client_name
        options["client_properties"] = properties
        app.conf.broker_transport_options = options

    def message_priority(self, step: int) -> int:
        return LOWEST_PRIORITY - min(max(step, 0), LOWEST_PRIORITY)  # RabbitMQ: highest first

    def prepare_worker(self) -> None:
        """Nothing to change: RabbitMQ's redelivery is harmless (the claim fences it)."""

    def message_renderer(self, app: Celery) -> None:
        """The ledger's scripts cannot reach RabbitMQ: ``send_task`` publishes."""
        return None

    def recover_stranded(self, ledger: Ledger, token: str) -> list[str]:
        return []  # the broker redelivers a dead consumer's messages itself, at once

    def find_lost(self, ledger: Ledger, token: str) -> list[str]:
        return []  # a confirmed message is in its queue or held by a live channel

    def cut_off(self, ledger: Ledger, workers: list[str]) -> int:
        """Close, through the management API, every connection named as one of these
        workers' (a frozen consumer keeps its channel and its prefetch slots, into which
        RabbitMQ would push the requeued attempts); RabbitMQ returns what they held to the
        queues at once. Without the API the AMQP heartbeat (10 s) is the bound.

        The API lists a connection only once its first statistics are in (up to RabbitMQ's
        ``collect_statistics_interval``, 5 s by default), so a worker whose connections
        are newer than that is looked for again (:meth:`retry_cut_off`) for a while."""
        deadline = time.monotonic() + CUT_OFF_RETRY_FOR_S
        with self._cut.lock:
            for name in workers:
                self._cut.pending[name] = deadline
        return self._close_named(workers)

    def retry_cut_off(self, ledger: Ledger) -> int:
        """Each tick: look again, at most once a second, for connections of workers cut off
        in the last ``CUT_OFF_RETRY_FOR_S`` that the API did not list yet."""
        from gridqueue.states import WorkerState

        now = time.monotonic()
        with self._cut.lock:
            for name, until in list(self._cut.pending.items()):
                if until <= now:
                    del self._cut.pending[name]
            if not self._cut.pending or now - self._cut.last_try < 1.0:
                return 0
            names = sorted(self._cut.pending)
        # A worker that registered again (it thawed) has new connections of the same name:
        # those are not to be closed.
        back = []
        for name in names:
            record = ledger.worker(name)
            if record is not None and record.state is not WorkerState.DEAD:
                back.append(name)
        with self._cut.lock:
            for name in back:
                self._cut.pending.pop(name, None)
        names = [name for name in names if name not in back]
        return self._close_named(names) if names else 0

    def _close_named(self, workers: list[str]) -> int:
        from gridqueue.celeryapp import broker_client_name

        target = ManagementTarget.of(self.url, self.management_url)
        if target is None:
            return 0
        now = time.monotonic()
        with self._cut.lock:
            failed_at = self._cut.failed_at
            self._cut.last_try = now
        if failed_at is not None and now - failed_at < MANAGEMENT_RETRY_AFTER_S:
            return 0
        wanted = {broker_client_name(name) for name in workers}
        closed = 0
        try:
            for connection in target.connections_named(wanted):
                target.close(connection, "gridqueue: worker declared dead on its heartbeat")
                closed += 1
        except (OSError, ValueError) as exc:  # refused, timed out, 401/403, not JSON
            with self._cut.lock:
                self._cut.failed_at = time.monotonic()
            log.warning(
                "broker.cut_off_failed",
                management=target.base_url,
                error=f"{type(exc).__name__}: {exc}",
                closed=closed,
                advice="enable rabbitmq_management and give the broker login the "
                "management tag, or set GRIDQUEUE_BROKER_MANAGEMENT_URL (or 'off'); until "
                "then a frozen worker holds what RabbitMQ pushed to it for about two AMQP "
                f"heartbeats ({2 * AMQP_HEARTBEAT_S} s)",
            )
        if closed:
            log.info("broker.connections_closed", workers=workers, connections=closed)
        return closed

    def find_lost_of(self, ledger: Ledger, token: str, models: list[str]) -> list[str]:
        return []  # a confirmed message is in its queue or held by a channel

    def check(self, timeout_s: float) -> None:
        k: Any = kombu  # kombu ships no type hints
        connection = k.Connection(self.url, connect_timeout=timeout_s)
        try:
            connection.connect()
            properties = connection.connection.server_properties
        except Exception as exc:  # socket errors, refused logins, bad vhosts alike
            raise BrokerUnavailableError(self.url, exc) from exc
        finally:
            connection.release()
        version = server_version(properties)
        if version is not None and version < CONSUMER_TIMEOUT_ARGUMENT_SINCE:
            log.warning(
                "broker.consumer_timeout_global",
                version=".".join(map(str, version)),
                advice="this RabbitMQ ignores x-consumer-timeout: set consumer_timeout in "
                "rabbitmq.conf above the longest attempt (default 30 min)",
            )
