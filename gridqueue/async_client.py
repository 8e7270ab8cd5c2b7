"""The asyncio producer: ``AsyncGridQueue``, for producers that are async web servers.

The same verbs as :class:`gridqueue.client.GridQueue`, on redis-py's asyncio client:
``job = await gq.submit(...)``, ``await job.result()``, ``async for chunk in
job.stream()``. The validation, the ledger's submit script and the parsing of what it
reads are the sync client's own (:func:`gridqueue.client.prepare_submit`,
:func:`gridqueue.ledger.submitted_from_reply`, :func:`gridqueue.ledger.parse_stream`);
only the I/O differs.

On the ledger's Redis as the broker, attempt 1's message goes out inside the submit
script, as with the sync client. On another broker publishing it is kombu's work, and
kombu is synchronous: it runs in a worker thread (``asyncio.to_thread``) through the sync
:class:`~gridqueue.dispatch.Dispatcher`, so the event loop never blocks on the broker. As
with the sync client, a publish that fails is not an error: the job is in the ledger, and
the watchdog publishes it once the dispatch grace has passed.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gridqueue.client import GridQueue, outcome_of, prepare_submit, stream_slice_ms
from gridqueue.errors import JobNotFoundError, JobTimeoutError
from gridqueue.keys import attempt_id
from gridqueue.ledger import (
    StreamRead,
    ending_of,
    job_not_found,
    parse_stream,
    stream_after,
    submitted_from_reply,
)
from gridqueue.logs import get_logger
from gridqueue.lua.runner import AsyncScriptRunner
from gridqueue.records import ENDING_FIELDS, Ending, JobRecord
from gridqueue.settings import Settings
from gridqueue.states import TERMINAL_STATES, JobState

_log = get_logger("gridqueue.async_client")

# Redis blips are waited out, as the sync client's retry_redis does: every read is safe to
# repeat, and submit is keyed by a job id chosen before the first try.
_RETRY_FOR_S = 30.0


async def _retrying(call: Any, *args: Any) -> Any:
    give_up_at = time.monotonic() + _RETRY_FOR_S
    delay = 0.05
    while True:
        try:
            return await call(*args)
        except (RedisConnectionError, RedisTimeoutError):
            if time.monotonic() + delay > give_up_at:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class AsyncJob:
    """A handle on one submitted job, for asyncio code."""

    def __init__(self, client: AsyncGridQueue, job_id: str, created: bool = True) -> None:
        self._client = client
        self.id = job_id
        self.created = created

    async def status(self) -> JobState:
        return (await self._client.get(self.id)).state

    async def result(self, timeout: float | None = 60.0) -> Any:
        """As :meth:`gridqueue.client.Job.result`: the result, or the Job* error."""
        return outcome_of(await self._client.wait_ending(self.id, timeout))

    async def stream(self, timeout: float | None = 60.0) -> AsyncIterator[Any]:
        """As :meth:`gridqueue.client.Job.stream`: each chunk once, in order, then the end
        (or the Job* error of an unsuccessful end)."""
        client = self._client
        give_up_at = None if timeout is None else time.monotonic() + timeout
        if await _retrying(client.state_of, self.id) is None:
            raise JobNotFoundError(f"no job {self.id} in the ledger")
        position = 0
        while True:
            block_ms = stream_slice_ms(self.id, give_up_at, timeout, position)
            read = await _retrying(client.read_stream, self.id, position, block_ms)
            for chunk in read.chunks:
                yield chunk
            position = read.next_position
            if read.ended is not None:
                await self.result(timeout=0)
                return
            if not read.chunks:
                state = await _retrying(client.state_of, self.id)
                if state is None or state in TERMINAL_STATES:
                    tail = await _retrying(client.read_stream, self.id, position, None)
                    for chunk in tail.chunks:
                        yield chunk
                    position = tail.next_position
                    if tail.ended is None and tail.chunks:
                        continue
                    await self.result(timeout=0)
                    return

    async def cancel(self) -> bool:
        return await asyncio.to_thread(self._client.sync.ledger.cancel, self.id)

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"


class AsyncGridQueue:
    """Submit jobs and follow them from asyncio code; see the module docstring."""

    def __init__(self, redis_url: str | None = None, settings: Settings | None = None) -> None:
        # The sync client holds what is not I/O (settings, workload classes, key names)
        # and publishes attempts, in a thread.
        self.sync = GridQueue(redis_url, settings)
        self.settings = self.sync.settings
        self.keys = self.sync.ledger.keys
        self.redis = self.settings.redis_target.async_client(
            decode_responses=True,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            health_check_interval=10,
        )
        self._scripts = AsyncScriptRunner(
            self.redis, self.sync.ledger.scripts.names, self.settings.ledger_scripts
        )

    @classmethod
    def from_env(cls) -> AsyncGridQueue:
        return cls(settings=Settings())

    async def submit(
        self,
        model: str,
        payload: Any,
        workload: str = "realtime",
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> AsyncJob:
        """As :meth:`gridqueue.client.GridQueue.submit`."""
        ledger = self.sync.ledger
        request = prepare_submit(ledger, model, payload, workload, deadline_s, idempotency_key)
        # On the Redis broker attempt 1's message goes out with the submit script. A
        # rendering does no I/O once the renderer's channel is open; opening it does, so the
        # first one runs in a worker thread.
        dispatcher = self.sync.dispatcher
        render = functools.partial(
            dispatcher.render, attempt_id(request.job_id, 1), model, workload
        )
        renderer = dispatcher.renderer
        opened = renderer is None or renderer.opened
        message = render() if opened else await asyncio.to_thread(render)
        args = [*ledger.fixed_args, *ledger.submit_args(*request.args, message)]

        need = self.settings.redis_min_replicas
        replicated = True

        async def run_script() -> Any:
            nonlocal replicated
            if not need:
                return await self._scripts.call("submit", args)
            # Durable mode: the script and WAIT in one round trip, as the sync client.
            wait = (need, int(self.settings.redis_replica_timeout_s * 1000))
            reply, confirmed = await self._scripts.call("submit", args, wait=wait)
            replicated = int(confirmed) >= need
            return reply

        submitted = submitted_from_reply(model, await _retrying(run_script))
        if not replicated:
            raise ledger.unreplicated_submit(submitted.job_id)
        if submitted.created and submitted.dispatch_lease:
            member = attempt_id(request.job_id, 1)
            try:
                await asyncio.to_thread(
                    self.sync.dispatcher.publish_own,
                    member,
                    request.model,
                    request.workload,
                    submitted.dispatch_lease,
                )
            except Exception as exc:  # the watchdog publishes it after the grace
                _log.warning("submit.publish_deferred", job=request.job_id, error=repr(exc))
        return AsyncJob(self, submitted.job_id, submitted.created)

    async def job(self, job_id: str) -> AsyncJob:
        """A handle on an existing job; JobNotFoundError if there is none."""
        await self.get(job_id)
        return AsyncJob(self, job_id, created=False)

    async def get(self, job_id: str) -> JobRecord:
        data = cast(dict[str, str], await self.redis.hgetall(self.keys.job(job_id)))
        if not data or "state" not in data:
            raise job_not_found(job_id, self.settings)
        return JobRecord.from_hash(data)

    async def state_of(self, job_id: str) -> JobState | None:
        state = await self.redis.hget(self.keys.job(job_id), "state")
        return JobState(str(state)) if state else None

    async def read_stream(self, job_id: str, position: int, block_ms: int | None) -> StreamRead:
        key = self.keys.job_stream(job_id)
        reply = await self.redis.xread({key: stream_after(position)}, count=1000, block=block_ms)
        entries: list[tuple[str, dict[str, str]]] = []
        for _, rows in cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], reply or []):
            entries.extend(rows)
        return parse_stream(position, entries)

    async def ending(self, job_id: str) -> Ending:
        """As :meth:`gridqueue.ledger.Ledger.ending`."""
        values = await self.redis.hmget(self.keys.job(job_id), ENDING_FIELDS)
        return ending_of(job_id, values, self.settings)

    async def wait(self, job_id: str, timeout_s: float | None) -> JobRecord:
        """As :meth:`gridqueue.ledger.Ledger.wait`, without blocking the loop."""
        await self.wait_ending(job_id, timeout_s)
        record: JobRecord = await _retrying(self.get, job_id)
        return record

    async def wait_ending(self, job_id: str, timeout_s: float | None) -> Ending:
        """As :meth:`gridqueue.ledger.Ledger.wait_ending`, without blocking the loop."""
        give_up_at = None if timeout_s is None else time.monotonic() + timeout_s
        done_key = self.keys.job_done(job_id)
        while True:
            record: Ending = await _retrying(self.ending, job_id)
            if record.terminal:
                return record
            slice_s = 1.0
            if give_up_at is not None:
                remaining = give_up_at - time.monotonic()
                if remaining <= 0:
                    raise JobTimeoutError(
                        f"job {job_id} is still {record.state.value} after {timeout_s} s; "
                        "it is tracked, call result() again or check get(job_id)"
                    )
                slice_s = min(slice_s, remaining)
            try:
                timeout = cast(int, max(slice_s, 0.01))  # Redis takes a float
                await self.redis.blmove(done_key, done_key, timeout, "RIGHT", "LEFT")
            except (RedisConnectionError, RedisTimeoutError):
                await asyncio.sleep(min(slice_s, 0.2))

    async def aclose(self) -> None:
        await self.redis.aclose()
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncGridQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
