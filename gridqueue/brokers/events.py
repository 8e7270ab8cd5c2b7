"""Celery's events, published on kombu's Redis transport without kombu's per-message cost.

A worker's main process sends three task events per attempt (task-received,
task-started, task-succeeded or task-failed). Celery buffers them and flushes the buffer
on the event loop's next tick, one kombu ``Producer.publish`` (one ``PUBLISH`` round
trip) per flush, and a busy worker flushes about 2.3 times per attempt. Each of those
publishes costs a few hundred µs of Python before Redis sees it: kombu builds and
checks the message, declares the exchange again, base64-encodes the body, makes a new
redis-py client, and routes it through the virtual fanout exchange.

:class:`RedisEventDispatcher` is Celery's ``EventDispatcher`` with two changes. First, on
kombu's Redis transport it writes the very ``PUBLISH`` kombu would, from a template, on
one redis-py client it keeps. Celery still builds every event (type, hostname,
timestamp, utcoffset, pid, the Lamport clock, the fields); only the message around the
events is made differently. The template is learnt from kombu itself: the first publish
of each routing key runs Celery's own publish inside a kombu publish batch that keeps the
final Redis commands instead of sending them, and the template is kept only if filling it
with that message's body and delivery tag gives back kombu's text exactly. Second, in a
worker it flushes the buffered task events :data:`FLUSH_DELAY_S` after the first of them
rather than on the loop's next tick, so the events of that time share one ``task.multi``
message (about 0.3 a job instead of 2.3 under load), and it sends what is still buffered
when it closes. Consumers (Flower, ``celery events``, ``events.State``) read the same
events, with the timestamps Celery gave them, on the same channel in the same envelope,
at most that much later.

Anything else takes Celery's own path: another transport (RabbitMQ), a producer other
than the dispatcher's own (the task-sent event of ``send_task``), a publish with retry, a
channel that does not batch, a message kombu shapes differently (compression, another
serializer). A publish that fails is buffered and sent again as Celery does.
"""

from __future__ import annotations

import base64
import contextlib
import time
from typing import Any

from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher
from kombu.transport import redis as kombu_redis
from kombu.utils import json as _kombu_json
from vine import promise  # type: ignore[import-untyped]  # vine ships no hints

from gridqueue.brokers.rendering import _KeptBatch

# kombu's JSON encoder and decoder, those of its messages (kombu ships no hints).
kombu_json: Any = _kombu_json

# How long a worker's buffered task events wait before they are sent: the events of
# about that much time share one message (one PUBLISH) instead of one per loop tick.
FLUSH_DELAY_S = 0.01

# Marks of the fields that change from one message to the next, in a template's text.
_BODY = "gq-event-template-body"
_TAG = "gq-event-template-tag"
# What the template is learnt from: an event list with the kinds of values events carry.
_PROBE: list[dict[str, Any]] = [
    {"type": "gq-template", "hostname": "h\u00e9", "clock": 1, "timestamp": 1.5, "args": None}
]


def encode_events(events: Any) -> str:
    """An event (or a list of them) as kombu writes the body of its message on Redis:
    JSON by kombu's encoder, then base64."""
    return base64.b64encode(kombu_json.dumps(events).encode("utf-8")).decode("ascii")


class _Template:
    """One routing key's message text, in three literal pieces around the body and the
    delivery tag."""

    def __init__(self, head: str, middle: str, tail: str) -> None:
        self.head, self.middle, self.tail = head, middle, tail

    def fill(self, body: str, tag: str) -> str:
        return self.head + body + self.middle + tag + self.tail


def _template_of(payload: str, body: str, tag: str) -> _Template | None:
    """The template of a message kombu wrote (``payload``, its ``body`` and delivery
    ``tag``), or None if filling it back would not give ``payload`` exactly."""
    message = kombu_json.loads(payload)
    properties = message.get("properties")
    if not isinstance(properties, dict) or properties.get("body_encoding") != "base64":
        return None
    if message.get("body") != body or properties.get("delivery_tag") != tag:
        return None
    message["body"], properties["delivery_tag"] = _BODY, _TAG
    text: str = kombu_json.dumps(message)
    if text.count(_BODY) != 1 or text.count(_TAG) != 1 or text.index(_BODY) > text.index(_TAG):
        return None
    head, rest = text.split(_BODY)
    middle, tail = rest.split(_TAG)
    template = _Template(head, middle, tail)
    return template if template.fill(body, tag) == payload else None


class RedisEventDispatcher(EventDispatcher):  # type: ignore[misc]  # celery ships no hints
    """Celery's ``EventDispatcher``, publishing its own events on kombu's Redis transport
    from a template (see the module's docstring)."""

    _templates: dict[str, _Template | None]
    _templates_of: Any = None
    # How long a buffered task event may wait for others to share its message.
    flush_delay_s = FLUSH_DELAY_S
    _hub: Any = None
    _flush_due: float | None = None  # when the pending flush was armed (monotonic)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # In a worker on the event loop, Celery hands the dispatcher the consumer's
        # ``on_send_event_buffered``, which flushes on the loop's next tick; the consumer
        # it is bound to holds the loop (``hub``). Flush a little later instead.
        on_send_buffered = kwargs.get("on_send_buffered")
        hub = getattr(getattr(on_send_buffered, "__self__", None), "hub", None)
        if hub is not None and self.flush_delay_s > 0:
            self._hub = hub
            self._schedule_flush = promise(self._flush_after_delay)
            kwargs["on_send_buffered"] = self._buffered
        super().__init__(*args, **kwargs)

    def _buffered(self) -> None:
        """An event was buffered (in any thread): the loop schedules its flush, as
        Celery's consumer does (one pending callback, however many events)."""
        self._hub.call_soon(self._schedule_flush)

    def _flush_after_delay(self) -> None:
        """On the loop's thread: one flush ``flush_delay_s`` from the first event that
        waits for it (the loop's timer is not for other threads)."""
        now = time.monotonic()
        # Armed long ago and never run (the loop's timer was cleared): arm it again.
        if self._flush_due is None or now - self._flush_due > 1.0 + self.flush_delay_s:
            self._flush_due = now
            self._hub.call_later(self.flush_delay_s, self._flush_due_events)

    def _flush_due_events(self) -> None:
        self._flush_due = None
        self.flush()

    def close(self) -> None:
        """Send what is still buffered, then close as Celery does: a worker's last
        events, those of a warm shutdown, are not left behind."""
        if not self._closed and any(self._group_buffer.values()):
            with contextlib.suppress(Exception):  # an event is not worth a failed stop
                self.flush(errors=False)
        super().close()

    _fast = False
    _client: Any = None

    def _fast_channel(self, producer: Any) -> Any:
        """The dispatcher's Redis channel, if this publish can take the template path."""
        if producer is None or producer is not self.producer:
            return None
        channel = producer.channel
        if channel is not self._templates_of:
            # A new channel (the dispatcher was enabled again): learn afresh.
            self._templates, self._templates_of, self._client = {}, channel, None
            self._fast = isinstance(channel, kombu_redis.Channel) and channel.supports_batch_publish
        return channel if self._fast else None

    def _learn(self, channel: Any, producer: Any, routing_key: str) -> _Template | None:
        """Run Celery's publish of a probe inside a batch that keeps kombu's commands, and
        make the template from the ``PUBLISH`` kombu would send."""
        kept = _KeptBatch(channel)
        buffered = len(self._outbound_buffer)
        channel.create_publish_batch = lambda max_size: kept
        try:
            with producer.batch():
                super()._publish(_PROBE, producer, routing_key)
        finally:
            del channel.create_publish_batch
        # Celery buffers a publish that failed, to send it again: never the probe.
        while len(self._outbound_buffer) > buffered:
            self._outbound_buffer.pop()
            kept.commands.clear()
        topics = channel._get_publish_topics(self.exchange.name, routing_key)
        publishes = [args for name, args in kept.commands if name == "publish"]
        if len(publishes) != len(kept.commands) or [t for t, _ in publishes] != topics:
            return None
        payloads = {payload for _, payload in publishes}
        if len(payloads) != 1:
            return None
        payload = payloads.pop()
        message = kombu_json.loads(payload)
        tag = message.get("properties", {}).get("delivery_tag")
        if not isinstance(tag, str):
            return None
        return _template_of(payload, encode_events(_PROBE), tag)

    def _publish(
        self,
        event: Any,
        producer: Any,
        routing_key: str,
        retry: bool = False,
        retry_policy: Any = None,
        **kwargs: Any,
    ) -> Any:
        channel = self._fast_channel(producer) if not retry and not kwargs else None
        if channel is None:
            return super()._publish(event, producer, routing_key, retry, retry_policy, **kwargs)
        if routing_key not in self._templates:
            self._templates[routing_key] = self._learn(channel, producer, routing_key)
        template = self._templates[routing_key]
        if template is None:
            return super()._publish(event, producer, routing_key, retry, retry_policy, **kwargs)
        try:
            payload = template.fill(encode_events(event), channel._next_delivery_tag())
            topics = channel._get_publish_topics(self.exchange.name, routing_key)
            if self._client is None:
                self._client = channel._create_client()
            if len(topics) == 1:
                self._client.publish(topics[0], payload)
            else:
                pipe = self._client.pipeline(transaction=False)
                for topic in topics:
                    pipe.publish(topic, payload)
                pipe.execute()
        except Exception:
            if not self.buffer_while_offline:
                raise
            self._outbound_buffer.append((event, routing_key))
        return None


class GridQueueEvents(Events):  # type: ignore[misc]  # celery ships no hints
    """``app.events`` whose dispatcher is :class:`RedisEventDispatcher`."""

    dispatcher_cls = "gridqueue.brokers.events:RedisEventDispatcher"
