"""Stream a job's output to an HTTP client as Server-Sent Events, from FastAPI.

    GRIDQUEUE_REDIS_URL=redis://... uvicorn examples.sse_stream:app

``POST /jobs`` submits a job (``{"model": ..., "payload": ..., "workload": ...}``) and
answers its id; ``GET /jobs/{id}/stream`` sends each chunk the job emits as one SSE
``data:`` event (JSON), in order and once each, across failovers, then one ``end`` event
with the job's state (``SUCCEEDED``, or the state and error it ended with). A client that
reconnects reads from the first chunk again.

Everything runs on the event loop: :class:`gridqueue.AsyncGridQueue` reads the stream with
redis-py's asyncio client (a blocking ``XREAD``), so one process serves many streams.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from gridqueue import AsyncGridQueue, GridQueueError, JobNotFoundError
from gridqueue.errors import InvalidJobError, JobEndedError


class SubmitBody(BaseModel):
    model: str
    payload: Any = None
    workload: str = "realtime"


def sse(data: Any, event: str | None = None) -> str:
    """One Server-Sent Event: an optional name, and JSON data on one line."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(gq: AsyncGridQueue | None = None) -> FastAPI:
    """The app; it builds its client from GRIDQUEUE_* when none is given."""
    client: dict[str, AsyncGridQueue] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        client["gq"] = gq or AsyncGridQueue.from_env()
        yield
        if gq is None:
            await client["gq"].aclose()

    app = FastAPI(title="gridqueue SSE example", lifespan=lifespan)

    @app.post("/jobs")
    async def submit(body: SubmitBody) -> dict[str, str]:
        try:
            job = await client["gq"].submit(body.model, body.payload, workload=body.workload)
        except InvalidJobError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"id": job.id}

    @app.get("/jobs/{job_id}/stream")
    async def stream(job_id: str) -> StreamingResponse:
        try:
            job = await client["gq"].job(job_id)
        except JobNotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in job.stream(timeout=None):
                    yield sse(chunk)
            except JobEndedError as exc:
                yield sse({"state": exc.state, "reason": exc.reason, "error": exc.error}, "end")
                return
            except GridQueueError as exc:
                yield sse({"error": str(exc)}, "error")
                return
            yield sse({"state": "SUCCEEDED"}, "end")

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app


app = create_app()
