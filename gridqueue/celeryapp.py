"""The Celery app gridqueue runs on, configured for fenced, ledger-owned redelivery.

- acks_late, prefetch 1 and no prefetch beyond free slots: kombu's ``unacked`` holds
  roughly the running attempts and nothing else. A child that dies requeues its message.
- ``visibility_timeout`` is ten years in every gridqueue process, so kombu never
  redelivers behind the ledger's back; the watchdog requeues instead.
- JSON only; no result backend (the ledger holds the visible result).
- Priority steps: a requeued attempt (step 0) goes ahead of fresh work; the broker
  (:mod:`gridqueue.brokers`: the ledger's Redis, or RabbitMQ) writes the step its way.
- kombu's own queue separator, so stock Celery tools and Flower read the fleet's
  bindings and priority lists as gridqueue does.
- Celery task events and event heartbeats (``events``, ``GRIDQUEUE_CELERY_EVENTS``), so
  Flower and ``celery events`` see every worker and every attempt; JSON, never pickle.
- In a worker, every broker connection carries the worker's name (``CLIENT SETNAME``,
  :func:`broker_client_name`), so the watchdog can cut a frozen node's connections.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual

from gridqueue.connection import RedisTarget

if TYPE_CHECKING:
    from gridqueue.brokers import Broker
    from gridqueue.settings import Settings

TASK_NAME = "gridqueue.attempt"
NEVER_REDELIVER_S = 10 * 365 * 86_400
PRIORITY_STEPS = [0, 3, 6, 9]
# kombu's Redis transport joins a queue and a priority step with this separator
# ('<queue><sep>3'), and binding-table entries with it. gridqueue keeps kombu's default
# ("\x06\x16"): a client that sets another one (gridqueue once used ':') cannot read the
# binding tables of the others, so stock `celery inspect` and Flower would hear no worker.
QUEUE_SEP: str = kombu_redis.Channel.sep


def priority_lists(queue: str) -> list[str]:
    """The Redis lists that hold one queue's messages, highest priority first."""
    return [queue, *(f"{queue}{QUEUE_SEP}{step}" for step in PRIORITY_STEPS if step)]


def broker_client_name(worker: str) -> str:
    """The ``CLIENT SETNAME`` of a worker's broker connections (no spaces allowed there).

    The watchdog kills the connections of this name when it declares the worker dead on
    its heartbeat: a frozen consumer's pending ``BRPOP`` is still a blocked client to
    Redis, and would pop the requeued attempts into a socket that no one reads."""
    return "gridqueue-broker:" + "".join(c if c.isprintable() and c != " " else "_" for c in worker)


def make_celery(
    redis: str | RedisTarget,
    events: bool = True,
    broker: Broker | None = None,
    client_name: str | None = None,
) -> Celery:
    """The app every gridqueue process uses. ``events`` (``Settings.celery_events``) turns
    on Celery's task events in workers (and their event heartbeats, see
    :mod:`gridqueue.worker`) and the ``task-sent`` event in producers, for Flower.
    ``broker`` (``Settings.broker``) carries the attempts' messages; by default the
    ledger's Redis. A Sentinel target uses kombu's ``sentinel`` transport, which asks the
    Sentinels for the primary on every (re)connect. ``client_name`` names every Redis
    broker connection, Redis or RabbitMQ (a worker's: :func:`broker_client_name`)."""
    target = RedisTarget(redis) if isinstance(redis, str) else redis
    if broker is None:
        from gridqueue.brokers import broker_of

        broker = broker_of(target)
    # Celery's event dispatcher, publishing its events from a template on kombu's Redis
    # transport (gridqueue.brokers.events); on any other, Celery's own.
    app = Celery(
        "gridqueue",
        broker=broker.url,
        set_as_current=False,
        events="gridqueue.brokers.events:GridQueueEvents",
    )
    app.conf.update(
        broker_connection_retry_on_startup=True,
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        result_accept_content=["json"],
        task_acks_late=True,
        task_acks_on_failure_or_timeout=True,
        # A pool child that dies puts its message back on the queue instead of acking it:
        # if it died before claiming, the message still owns the attempt (even when the
        # worker agent cannot report it); if it had claimed, the redelivery is refused by
        # the claim (stale or duplicate), so nothing runs twice and nothing loops.
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=events,
        task_send_sent_event=events,
        worker_hijack_root_logger=False,
        task_default_queue="gq.default",
    )
    broker.configure(app)
    if client_name:
        broker.name_connections(app, client_name)
    return app


def celery_for(settings: Settings, client_name: str | None = None) -> Celery:
    """The app for these settings: their ledger, their broker, their events switch."""
    return make_celery(
        settings.redis_target, settings.celery_events, settings.broker, client_name=client_name
    )


def own_redelivery_in_this_worker() -> None:
    """Make kombu's Redis transport, in a gridqueue worker process, leave redelivery to
    gridqueue, and survive its broker connection going away (a Redis restart).

    gridqueue owns redelivery: the ledger republishes what a dead worker held and removes
    its unacked entries, and the watchdog takes back deliveries that nobody claimed. Two
    kombu behaviours get in the way when a worker loses Redis:

    - closing a channel restores its delivered messages to their queues: that would put
      the messages of attempts still running back on the queue; and on a channel whose
      connection is gone it raises AttributeError, which Celery treats as unrecoverable,
      so the whole worker exits;
    - an ack or reject on such a channel raises the same AttributeError from the event
      loop, with the same result.

    Here a channel restores nothing when it closes, and an ack or reject on a channel
    whose connection is gone is dropped: its unacked entry stays, and gridqueue removes
    it (when the attempt ends, or by the stranded-delivery sweep).
    """
    kombu_redis.Channel.do_restore = False
    qos: Any = kombu_redis.QoS  # kombu ships no type hints
    if getattr(qos, "_gridqueue_owned", False):
        return
    ack, reject = qos.ack, qos.reject

    def ack_if_connected(self: Any, delivery_tag: Any) -> None:
        if self.channel.connection is not None:
            ack(self, delivery_tag)

    def reject_if_connected(self: Any, delivery_tag: Any, requeue: bool = False) -> None:
        if self.channel.connection is not None:
            reject(self, delivery_tag, requeue=requeue)

    qos.ack = ack_if_connected
    qos.reject = reject_if_connected
    qos._gridqueue_owned = True


def ack_released(message: Any) -> bool:
    """Ack a delivered message in kombu's memory only, without the Redis round trip:
    for a message whose delivery the ledger already took out of kombu's ``unacked`` and
    ``unacked_index``, in the same script that ended its attempt (``release_attempt`` in
    ``_common.lua``, run by ``complete`` and ``finish``). Returns False, having done
    nothing, whenever that cannot be done exactly as kombu would: the caller then acks
    as usual.

    kombu's Redis ``QoS.ack`` is two parts: ``ZREM unacked_index tag; HDEL unacked tag``
    in one MULTI/EXEC (``_remove_from_indices``), then the virtual transport's
    ``QoS.ack``, which marks the tag dirty (``_quick_ack``, that is ``_dirty.add``): the
    next ``append`` drops it from ``_delivered``, and ``can_consume`` counts
    ``len(_delivered) - len(_dirty)`` against the prefetch count, so the consumer keeps
    consuming. ``Message.ack`` then sets the message's state to ``ACK``
    (``acknowledged``), so a second ack raises. Here the first part is skipped and the
    rest is done as kombu does it. This relies on the internals of kombu 5.7 (checked
    against 5.7.0: ``kombu/transport/redis.py``, ``kombu/transport/virtual/base.py``,
    ``kombu/message.py``); if they are not as expected (another transport, such as
    RabbitMQ's; an attribute missing; the tag not among the channel's deliveries), the
    usual ack is made.

    Safe because the ledger's removal happened atomically with the attempt's end: if
    this process dies before the in-memory ack, nothing is left in Redis to redeliver,
    exactly as after a real ack. (And if the same message was delivered again meanwhile,
    a real ack would take that other delivery's entry away: skipping it is no worse.)
    """
    try:
        channel = message.channel
        qos = channel.qos
        tag = message.delivery_tag
        delivered, dirty = qos._delivered, qos._dirty
        quick_ack = qos._quick_ack
        no_ack_consumers = channel.no_ack_consumers
        consumer_tag = message.delivery_info.get("consumer_tag")
    except AttributeError:
        return False
    if not isinstance(qos, kombu_redis.QoS) or not isinstance(message, kombu_virtual.Message):
        return False
    if channel.connection is None:
        return False  # the usual ack drops it (own_redelivery_in_this_worker)
    if message.acknowledged or (no_ack_consumers and consumer_tag in no_ack_consumers):
        return False  # the usual ack raises, or does nothing: let it
    if not isinstance(dirty, set) or not callable(quick_ack) or tag not in delivered:
        return False
    virtual_qos: Any = kombu_virtual.QoS  # kombu ships no type hints
    virtual_qos.ack(qos, tag)  # _quick_ack(tag): no Redis command
    message._state = "ACK"
    return bool(message.acknowledged)
