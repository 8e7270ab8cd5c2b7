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

Celery's ``send_task`` costs 150-350 µs of Python a message, most of it reading the app's
settings, and a rack's requeue renders a thousand at once. So Celery renders one message
per queue and priority (and process), with placeholder ids: a *template*. Every later
message of that queue and priority is the template with its own task id and arguments, a
fresh delivery tag, and (for the task-sent event) the event clock's next value and the
time: the fields that differ between two ``send_task`` calls of the same task, queue and
priority. A template is kept only if the placeholders appear nowhere but where those
fields are; otherwise, and for an id of another shape than gridqueue's, every message is
rendered by Celery. The test compares the two either way.

One difference a Celery user could see: Celery's ``before_task_publish`` and
``after_task_publish`` signals fire once per template, not once per attempt's message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

# The Redis commands kombu's Redis transport publishes with; the scripts run no others.
PUBLISH_COMMANDS = frozenset({"LPUSH", "PUBLISH", "PEXPIRE"})

# A template's placeholders: a job id and an attempt number that no real field holds.
_JOB = "gqtemplate0job"
_N = 987654321
_MEMBER = f"{_JOB}.{_N}"
# The places they may appear: the task id, the arguments in the body (JSON), and their
# repr in the headers and the event; each replaced whole, so no digit elsewhere matches.
_ARGS_JSON = f'"{_JOB}", {_N}]'
_ARGS_REPR = f"'{_JOB}', {_N}]"
# The event's fields that move from one message to the next, and the body and delivery
# tag, marked in a template's text.
_CLOCK = 192837465
_STAMP = 1234567.125
_BODY = "@@gridqueue-body@@"
_TAG = "@@gridqueue-delivery-tag@@"
# Ids that are safe to put in JSON and a repr as they are (gridqueue's are uuid4 hex).
_PLAIN_ID = re.compile(r"[A-Za-z0-9_:-]{1,128}\Z")


@dataclass(frozen=True)
class _Part:
    """One command of a template: ``value`` with the marks above in it (JSON text), its
    body's text apart when kombu base64-encodes it."""

    command: str
    key: str
    value: str
    body: str | None = None
    event: bool = False
    literal: bool = False  # a value with no message in it (PEXPIRE's milliseconds)

    def fill(self, job_id: str, n: int, clock: int, now: float) -> str:
        if self.literal:
            return self.value
        value = _fill_ids(self.value, job_id, n)
        if self.body is not None:
            body = _fill_ids(self.body, job_id, n)
            if self.event:
                body = body.replace(f'"clock": {_CLOCK}', f'"clock": {clock}', 1)
                body = body.replace(f'"timestamp": {_STAMP!r}', f'"timestamp": {now!r}', 1)
            encoded = base64.b64encode(body.encode()).decode()
            value = value.replace(f'"{_BODY}"', f'"{encoded}"', 1)
        return value.replace(_TAG, str(uuid.uuid4()), 1)


def _fill_ids(text: str, job_id: str, n: int) -> str:
    return (
        text.replace(_MEMBER, f"{job_id}.{n}")
        .replace(_ARGS_JSON, f'"{job_id}", {n}]')
        .replace(_ARGS_REPR, f"'{job_id}', {n}]")
    )


def _template_part(command: str, key: str, value: str) -> _Part | None:
    """The template of one rendered command, or None if the placeholders are anywhere but
    where the fields that change are (kombu or Celery put them somewhere new)."""
    if command not in ("LPUSH", "PUBLISH"):
        return _Part(command, key, value, literal=True) if _JOB not in value else None
    message = json.loads(value)
    properties = message.get("properties", {})
    body: str | None = None
    event = False
    if properties.get("body_encoding") == "base64":
        decoded = json.loads(base64.b64decode(message["body"]))
        if isinstance(decoded, dict) and "clock" in decoded and "timestamp" in decoded:
            decoded["clock"], decoded["timestamp"] = _CLOCK, _STAMP
            event = True
        body = json.dumps(decoded)
        message["body"] = _BODY
    if "delivery_tag" not in properties:
        return None
    properties["delivery_tag"] = _TAG
    text = json.dumps(message)
    for part in (text, body or ""):
        placed = part.count(_MEMBER) + part.count(_ARGS_JSON) + part.count(_ARGS_REPR)
        if part.count(str(_N)) != placed or part.count(_JOB) != placed:
            return None
    if event and (body is None or f'"clock": {_CLOCK}' not in body):
        return None
    return _Part(command, key, text, body, event)


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
        # (task, queue, priority, pid) -> the template's parts, or None: render each.
        self._templates: dict[tuple[str, str, int, int], tuple[_Part, ...] | None] = {}
        self._pid = os.getpid()

    def _forked(self) -> None:
        """In a forked child: start afresh. The parent's channel is its own (closing it
        here would close the parent's socket), and its lock may have been held by a
        thread that the fork did not copy."""
        self._lock = threading.Lock()
        self._connection = self._channel = self._producer = self._kept = None
        self._templates = {}
        self._pid = os.getpid()

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
        priority=priority)`` would send, as Redis commands. For an attempt (``task_id``
        is ``<job>.<n>``, ``args`` is ``[job, n]``), from its queue and priority's
        template; for anything else, by Celery."""
        if self._pid != os.getpid():
            self._forked()
        job_id, n = args if len(args) == 2 else (None, None)
        if (
            isinstance(job_id, str)
            and isinstance(n, int)
            and task_id == f"{job_id}.{n}"
            and _PLAIN_ID.match(job_id)
        ):
            key = (task_name, queue, priority, os.getpid())
            if key not in self._templates:
                rendered = self._render(task_name, _MEMBER, [_JOB, _N], queue, priority)
                made = [_template_part(*command) for command in rendered.commands]
                whole = tuple(part for part in made if part is not None)
                self._templates[key] = whole if len(whole) == len(made) else None
            parts = self._templates[key]
            if parts is not None:
                clock = self.app.clock.forward() if any(p.event for p in parts) else 0
                now = time.time()
                return RenderedMessage(
                    tuple((p.command, p.key, p.fill(job_id, n, clock, now)) for p in parts)
                )
        return self._render(task_name, task_id, args, queue, priority)

    def _render(
        self, task_name: str, task_id: str, args: list[Any], queue: str, priority: int
    ) -> RenderedMessage:
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
