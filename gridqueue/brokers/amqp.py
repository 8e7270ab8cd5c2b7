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
  requeued attempt into its free prefetch slots, where nobody claims it. The AMQP
  heartbeat is 10 s (Celery's default is 120 s), so RabbitMQ closes such a connection and
  returns its messages within about two heartbeats.
- **Consumer timeout.** RabbitMQ closes the channel of a consumer that holds an unacked
  message longer than ``consumer_timeout`` (30 min by default), which would cut long
  inference attempts. Queues are declared with ``x-consumer-timeout``
  (``GRIDQUEUE_BROKER_CONSUMER_TIMEOUT_S``), which RabbitMQ 3.12 and later honour per
  queue. Older servers ignore the argument: raise ``consumer_timeout`` in rabbitmq.conf
  instead (the start check logs a warning on such a server).
"""

from __future__ import annotations

from dataclasses import dataclass
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

log = get_logger("gridqueue.brokers.amqp")


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


@dataclass(frozen=True)
class AmqpBroker:
    url: str
    consumer_timeout_s: int = DEFAULT_CONSUMER_TIMEOUT_S
    name: str = "amqp"

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

    def message_priority(self, step: int) -> int:
        return LOWEST_PRIORITY - min(max(step, 0), LOWEST_PRIORITY)  # RabbitMQ: highest first

    def prepare_worker(self) -> None:
        """Nothing to change: RabbitMQ's redelivery is harmless (the claim fences it)."""

    def recover_stranded(self, ledger: Ledger, token: str) -> list[str]:
        return []  # the broker redelivers a dead consumer's messages itself, at once

    def find_lost(self, ledger: Ledger, token: str) -> list[str]:
        return []  # a confirmed message is in its queue or held by a live channel

    def cut_off(self, ledger: Ledger, workers: list[str]) -> int:
        # Not done on RabbitMQ yet: a frozen consumer keeps its channel (and its prefetch
        # slot) until the AMQP heartbeat (10 s) lapses; see docs/performance.md.
        return 0

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
