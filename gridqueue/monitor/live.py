"""Live updates: the ledger's event stream, tailed for one page as Server-Sent Events.

Each page holds one reader: its own Redis connection, blocked in ``XREAD`` until the next
transition, so an event reaches the page as soon as the script that made it returns. A
disconnect cancels the pending read, and the connection is closed under a shield, so a
reader never outlives its page.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import cast

import anyio
import redis

from gridqueue.connection import RedisTarget
from gridqueue.errors import RedisUnavailableError
from gridqueue.ledger import event_fields

# A quiet stream sends a keep-alive comment this often, so no proxy closes it.
BLOCK_MS = 15_000
BATCH = 500
# Stream ids as XADD writes them.
STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


class LiveStreams:
    """The readers open now, under a cap: each holds a Redis connection."""

    def __init__(self, redis: RedisTarget, events_key: str, client_name: str, limit: int) -> None:
        self.redis = redis
        self.redis_url = redis.url
        self.events_key = events_key
        self.client_name = client_name
        self.limit = limit
        self.active = 0

    @property
    def full(self) -> bool:
        return self.active >= self.limit

    async def tail(self, after: str | None) -> AsyncIterator[str]:
        """SSE text: a ``ready`` event once the starting point is fixed (every transition
        after it is delivered), then one ``message`` per event, ``{id, type, ts, ...}``.

        ``after`` is an event id to resume after; None starts from the newest event now.
        The connection is opened here, not before, so a response that is never sent
        holds none.
        """
        client = self.redis.async_client(
            decode_responses=True,
            socket_connect_timeout=5.0,
            socket_timeout=BLOCK_MS / 1000 + 10,
            client_name=self.client_name,
        )
        self.active += 1
        try:
            position = after
            ready = False
            while True:
                try:
                    if position is None:
                        newest = await client.xrevrange(self.events_key, count=1)
                        position = str(newest[0][0]) if newest else "0-0"
                    if not ready:
                        ready = True
                        yield _sse({"after": position}, event="ready", retry_ms=2000)
                    reply = cast(
                        list[tuple[str, list[tuple[str, dict[str, str]]]]],
                        await client.xread(
                            {self.events_key: position}, count=BATCH, block=BLOCK_MS
                        ),
                    )
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    error = str(RedisUnavailableError(self.redis_url, exc))
                    yield _sse({"error": error}, event="failure")
                    await asyncio.sleep(1.0)
                    continue
                if not reply:
                    yield ": keep-alive\n\n"
                    continue
                for _key, rows in reply:
                    for event_id, fields in rows:
                        position = event_id
                        yield _sse({"id": event_id, **event_fields(fields)}, event_id=event_id)
        finally:
            self.active -= 1
            with anyio.CancelScope(shield=True):
                await client.aclose()


def _sse(
    data: dict[str, str],
    event: str | None = None,
    event_id: str | None = None,
    retry_ms: int | None = None,
) -> str:
    """One SSE message. JSON escapes newlines, so ``data`` is always one line."""
    lines = []
    if retry_ms is not None:
        lines.append(f"retry: {retry_ms}")
    if event is not None:
        lines.append(f"event: {event}")
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return "\n".join(lines) + "\n\n"
