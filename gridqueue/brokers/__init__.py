"""The broker seam: what carries an attempt's Celery message to a worker.

The ledger always lives on Redis. The attempts' messages go to the broker that
``GRIDQUEUE_BROKER_URL`` names: unset, the ledger's own Redis (kombu's Redis transport);
``amqp://...``, RabbitMQ. Everything that differs between the two lives behind
:class:`Broker`, one small interface:

- the Celery/kombu configuration for that broker (per-model queues, requeued attempts
  ahead of fresh work, acks_late, prefetch 1, JSON only);
- how an attempt's priority is written on its message, and who publishes it (the ledger's
  scripts, when the broker is the ledger's own Redis; Celery's ``send_task`` otherwise);
- what the worker process must change in the transport before it consumes;
- what a stranded delivery, or a message that is nowhere, means on that broker, and how
  the watchdog takes such an attempt back;
- the start check: does the broker answer, and accept the login?
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from celery import Celery

    from gridqueue.brokers.rendering import MessageRenderer
    from gridqueue.connection import RedisTarget
    from gridqueue.ledger import Ledger
    from gridqueue.settings import Settings

# gridqueue's priority steps run from 0 (first) to 9 (last), as kombu's Redis transport
# serves them; each broker writes them its own way.
LOWEST_PRIORITY = 9
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")


def broker_url_problem(broker_url: str | None) -> str | None:
    """Why ``GRIDQUEUE_BROKER_URL`` cannot name a broker, or None when it can (unset or
    empty: the ledger's Redis)."""
    if broker_url is None or not broker_url.strip():
        return None
    scheme, sep, rest = broker_url.strip().partition("://")
    if not sep or scheme.lower() not in AMQP_SCHEMES:
        return (
            "GRIDQUEUE_BROKER_URL must be an amqp:// or amqps:// URL (RabbitMQ), e.g. "
            "amqp://user:password@host:5672/vhost; unset it to use the ledger's Redis "
            "as the broker"
        )
    if not rest.partition("/")[0].rpartition("@")[2]:
        return "GRIDQUEUE_BROKER_URL names no host; write amqp://user:password@host:5672/vhost"
    return None


def management_url_problem(management_url: str | None) -> str | None:
    """Why ``GRIDQUEUE_BROKER_MANAGEMENT_URL`` is not usable, or None when it is (unset:
    derived from the broker URL; ``off``: no connection is ever closed)."""
    if management_url is None or management_url.strip() in ("", "off"):
        return None
    scheme, sep, rest = management_url.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https") or not rest.split("/")[0]:
        return (
            "GRIDQUEUE_BROKER_MANAGEMENT_URL must be RabbitMQ's management API as an http:// "
            "or https:// URL, e.g. http://user:password@host:15672, or 'off'"
        )
    return None


class Broker(Protocol):
    """One broker's side of gridqueue."""

    @property
    def name(self) -> str:
        """``redis`` or ``amqp``."""

    @property
    def url(self) -> str:
        """Celery's broker URL."""

    def configure(self, app: Celery) -> None:
        """Give a new Celery app what this broker needs, beside what every gridqueue app
        has (before the app first talks to the broker)."""

    def name_connections(self, app: Celery, client_name: str) -> None:
        """Give every broker connection of ``app`` this name, so the watchdog can find and
        close a dead worker's connections (:meth:`cut_off`)."""

    def message_priority(self, step: int) -> int:
        """The message priority for gridqueue's step ``step`` (0 runs first, 9 last)."""

    def prepare_worker(self) -> None:
        """Adjust the transport in a worker process before it consumes."""

    def message_renderer(self, app: Celery) -> MessageRenderer | None:
        """Where the broker is the ledger's own Redis: what renders an attempt's message
        for the ledger's scripts to publish, in the step that publishes the attempt.
        None elsewhere: the producer and the watchdog publish with ``send_task``."""

    def recover_stranded(self, ledger: Ledger, token: str) -> list[str]:
        """Take back deliveries whose consumer died before claiming; returns the attempts
        whose dispatch is due now."""

    def find_lost(self, ledger: Ledger, token: str) -> list[str]:
        """Publish again attempts whose message is nowhere; returns them."""

    def cut_off(self, ledger: Ledger, workers: list[str]) -> int:
        """Close the broker connections of workers just declared dead on their heartbeat
        (a frozen consumer must not take the messages of their requeued attempts);
        returns how many were closed."""

    def retry_cut_off(self, ledger: Ledger) -> int:
        """On every tick: close connections of workers cut off lately that the broker did
        not show yet when :meth:`cut_off` looked; returns how many were closed."""

    def find_lost_of(self, ledger: Ledger, token: str, models: list[str]) -> list[str]:
        """Right after :meth:`cut_off`: the published attempts of these models whose
        message is nowhere (taken by a consumer that was cut off), to publish again."""

    def check(self, timeout_s: float) -> None:
        """Raise :class:`~gridqueue.errors.BrokerUnavailableError` unless the broker answers
        and accepts the login."""


def broker_of(
    redis: RedisTarget,
    broker_url: str | None = None,
    consumer_timeout_s: int | None = None,
    management_url: str | None = None,
) -> Broker:
    """The broker for a ledger on ``redis`` and an optional ``GRIDQUEUE_BROKER_URL``
    (``consumer_timeout_s``: RabbitMQ's per-queue consumer timeout; ``management_url``:
    its management API, see ``Settings.broker_management_url``)."""
    if broker_url is None or not broker_url.strip():
        from gridqueue.brokers.redis import RedisBroker

        return RedisBroker(redis)
    from gridqueue.brokers.amqp import DEFAULT_CONSUMER_TIMEOUT_S, AmqpBroker
    from gridqueue.errors import ConfigError

    problem = broker_url_problem(broker_url) or management_url_problem(management_url)
    if problem is not None:
        raise ConfigError(problem)
    return AmqpBroker(
        broker_url.strip(),
        consumer_timeout_s or DEFAULT_CONSUMER_TIMEOUT_S,
        management_url=management_url.strip() if management_url else None,
    )


def broker_for(settings: Settings) -> Broker:
    """The broker these settings name."""
    return broker_of(
        settings.redis_target,
        settings.broker_url,
        settings.broker_consumer_timeout_s,
        settings.broker_management_url,
    )
