"""A worker's presence: a subscription that Redis drops the moment the process dies.

The worker's main process holds a subscription on its own channel (``{ns}:presence:
{name}``) on a connection that does nothing else. Nothing is ever published there: what
matters is the subscriber count (``PUBSUB NUMSUB``), which falls to 0 as soon as the
kernel closes the sockets of a process that died (kill -9, the OOM killer, a segfault),
long before its heartbeat would be stale. The watchdog reads that count for workers whose
heartbeat is late (the connection signal, see ``gridqueue/watchdog.py``).

A subscription that drops while the process lives (``CLIENT KILL``, a proxy or network
blip) is taken again at once, then with a short backoff capped at half a heartbeat
interval, so a live worker is without a subscriber for milliseconds, far less than the
quarter interval the watchdog needs to see it gone twice. ``up`` says whether the
subscription is confirmed now; the heartbeat carries it, so the watchdog applies the
connection signal only to an incarnation whose subscription Redis has seen.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from redis.exceptions import RedisError

from gridqueue.connection import RedisTarget
from gridqueue.logs import get_logger

log = get_logger("gridqueue.presence")

# The first retry after a drop is immediate; later ones back off from here.
_FIRST_BACKOFF_S = 0.01


class Presence:
    """Hold the subscription on ``channel`` from a thread of its own, retaking it when it
    drops; ``up`` while Redis has confirmed it."""

    def __init__(
        self, target: RedisTarget, channel: str, max_backoff_s: float, worker: str
    ) -> None:
        self.channel = channel
        self.worker = worker
        self.max_backoff_s = max_backoff_s
        self.drops = 0  # subscriptions lost while the process lived
        self._up = False
        # A connection of its own, made by hand: no pool, no health-check PINGs, no retry
        # layer that would hide a drop from us.
        # Named, so that an operator's CLIENT LIST shows what it is.
        self._pool = target.connection_pool(
            socket_connect_timeout=5.0,
            health_check_interval=0,
            client_name=client_name(worker),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gq-presence", daemon=True)

    @property
    def up(self) -> bool:
        return self._up

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Leave the channel (a clean stop unregisters first: nothing reads it any more)."""
        self._stop.set()
        self._thread.join(timeout=timeout_s)
        with contextlib.suppress(Exception):
            self._pool.disconnect()

    def _loop(self) -> None:
        backoff_s = 0.0
        while not self._stop.is_set():
            connection: Any = self._pool.make_connection()
            try:
                connection.connect()
                connection.send_command("SUBSCRIBE", self.channel)
                # push_request: hiredis hands a subscribe reply over as a push message.
                reply = connection.read_response(push_request=True)
                if not reply or str(_text(reply[0])).lower() != "subscribe":
                    raise RedisError(f"unexpected reply to SUBSCRIBE: {reply!r}")
                self._up = True
                if self.drops:
                    log.info("presence.resubscribed", worker=self.worker, drops=self.drops)
                backoff_s = 0.0
                while not self._stop.is_set():
                    # Readable means a message (none is ever published) or the close of
                    # the connection, which read_response turns into ConnectionError.
                    if connection.can_read(timeout=0.5):
                        connection.read_response(push_request=True)
            except (RedisError, OSError) as exc:
                if self._stop.is_set():
                    break
                if self._up:
                    self.drops += 1
                    log.warning("presence.dropped", worker=self.worker, error=str(exc))
            finally:
                self._up = False  # whatever ended the subscription, it is closed now
                with contextlib.suppress(Exception):
                    connection.disconnect()
            self._stop.wait(backoff_s)
            backoff_s = min(max(_FIRST_BACKOFF_S, backoff_s * 2), self.max_backoff_s)


def client_name(worker: str) -> str:
    """The presence connection's CLIENT SETNAME (no spaces allowed there)."""
    return "gridqueue-presence:" + "".join(
        c if c.isprintable() and c != " " else "_" for c in worker
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
