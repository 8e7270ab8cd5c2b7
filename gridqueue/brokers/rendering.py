"""An attempt's Celery message as kombu's Redis transport would write it, for a ledger
script to write instead, in the same atomic step as the transition that publishes it.

On the Redis broker the ledger and the broker are one server, so the message of an
attempt can go out inside the ledger's own script (``submit.lua``, ``end_dispatch.lua``):
one round trip instead of kombu's publish plus the ledger's, and no moment where the job
is written but its message is not.

The message is not written by hand. :class:`MessageRenderer` runs Celery's own
``send_task`` (``create_task_message``, the router, the task-sent event) on a real kombu
Redis channel, inside one of kombu's publish batches: kombu routes the message and hands
the batch its final Redis commands (``LPUSH`` on the priority list ``_q_for_pri`` names,
``PUBLISH`` of the task-sent event on the fanout topic, ``PEXPIRE`` for an expiring
queue), and the batch keeps them instead of sending them. What the script runs is what
kombu would have sent, field for field, so a kombu or Celery upgrade cannot make the two
drift apart unnoticed (``tests/integration/test_message_rendering.py`` compares them).

One difference a Celery user could see: Celery's ``before_task_publish`` and
``after_task_publish`` signals fire when the message is rendered, whether or not the
script then publishes it (a submit that finds its job already written, a dispatch whose
lease was taken meanwhile).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

# The Redis commands kombu's Redis transport publishes with; the scripts run no others.
PUBLISH_COMMANDS = frozenset({"LPUSH", "PUBLISH", "PEXPIRE"})


@dataclass(frozen=True)
class RenderedMessage:
    """The Redis commands that publish one attempt: ``(command, key, value)`` each, the
    key with kombu's ``global_keyprefix`` already on it."""

    commands: tuple[tuple[str, str, str], ...]

    @property
    def args(self) -> list[str]:
        """The commands flattened, as the ledger scripts take them."""
        return [part for command in self.commands for part in command]


class _KeptBatch:
    """A kombu publish batch that keeps the final Redis commands instead of sending them
    (the interface of ``kombu.transport.redis.PublishBatch``)."""

    def __init__(self, channel: Any) -> None:
        self.channel = channel
        self.commands: list[tuple[str, tuple[Any, ...]]] = []

    def publish(self, message: Any, **kwargs: Any) -> Any:
        return self.channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, name: str, *args: Any) -> None:
        self.commands.append((name, args))

    def flush(self) -> None:
        """Nothing to send: the ledger script sends the commands."""

    def discard(self) -> None:
        self.commands.clear()

    def close(self) -> None:
        """Holds no connection."""


def _keeping_channel(base: Any, keep_batch: Any) -> Any:
    """``base`` (a kombu Redis channel class) whose publish batches keep their commands:
    with such a channel, a publish inside a batch never reaches Redis."""

    class KeepingChannel(base):  # type: ignore[misc]  # kombu ships no hints
        # Always batch: kombu would otherwise publish at once, for real.
        supports_batch_publish = True

        def create_publish_batch(self, max_size: int) -> _KeptBatch:
            return keep_batch(self)  # type: ignore[no-any-return]

    return KeepingChannel


class MessageRenderer:
    """Renders attempts' messages through Celery and kombu, sending nothing.

    It holds one kombu channel of the app's broker (opening it checks the broker answers,
    once); rendering itself does no I/O. Thread-safe: a kombu channel is not, so renders
    take turns."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._connection: Any = None
        self._channel: Any = None
        self._producer: Any = None
        self._kept: _KeptBatch | None = None
        self._prefix_args: Any = None

    @property
    def opened(self) -> bool:
        """Whether the channel is open: from then on a rendering does no I/O."""
        return self._channel is not None

    def _open(self) -> None:
        from kombu.messaging import Producer

        connection = self.app.connection_for_write()
        transport = connection.transport
        # This connection's channels keep what a publish batch would send: kombu asks the
        # channel for the batch object when a batch starts. Built on the transport's own
        # channel class (Redis or Sentinel), so routing and key names stay kombu's.
        transport.Channel = _keeping_channel(transport.Channel, self._keep_batch)
        channel = connection.default_channel
        self._connection, self._channel = connection, channel
        # kombu's global_keyprefix, as its client adds it (absent without a prefix).
        self._prefix_args = getattr(channel.client, "_prefix_args", None)
        self._producer = Producer(channel, auto_declare=False)  # type: ignore[no-untyped-call]

    def _keep_batch(self, channel: Any) -> _KeptBatch:
        self._kept = _KeptBatch(channel)
        return self._kept

    def render(
        self, task_name: str, task_id: str, args: list[Any], queue: str, priority: int
    ) -> RenderedMessage:
        """What ``app.send_task(task_name, args=args, task_id=task_id, queue=queue,
        priority=priority)`` would send, as Redis commands."""
        with self._lock:
            if self._channel is None:
                self._open()
            with self._producer.batch():
                # declare=[]: the queue's binding is the consumers' business (they declare
                # it), and declaring it here would write to Redis.
                self.app.send_task(
                    task_name,
                    args=args,
                    task_id=task_id,
                    queue=queue,
                    priority=priority,
                    producer=self._producer,
                    declare=[],
                )
            kept, self._kept = self._kept, None
            prefix_args = self._prefix_args
        if kept is None:  # kombu published outside the batch: nothing to hand the script
            raise RuntimeError("kombu did not publish through the renderer's batch")
        commands = []
        for name, command_args in kept.commands:
            call = [name.upper(), *command_args]
            if prefix_args is not None:
                call = prefix_args(call)
            command, key, value = call
            if command not in PUBLISH_COMMANDS:
                raise RuntimeError(f"kombu published with {command}, which the ledger does not run")
            commands.append((str(command), str(key), _text(value)))
        return RenderedMessage(tuple(commands))

    def close(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.release()
            self._connection = self._channel = self._producer = None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)
