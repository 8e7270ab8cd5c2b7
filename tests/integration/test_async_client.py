"""The asyncio producer and the SSE example on real parts: a private redis-server, a
real worker, a real uvicorn server and a real HTTP client (httpx) reading the events."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from gridqueue import AsyncGridQueue, AsyncJob, GridQueue, JobFailed, JobNotFoundError
from gridqueue.fleet import LocalFleet
from gridqueue.settings import Settings

pytestmark = pytest.mark.integration


def test_async_submit_result_and_stream(
    fleet: LocalFleet, gq: GridQueue, settings: Settings
) -> None:
    fleet.start_worker("w1")
    fleet.wait_alive(gq.ledger, ["w1"])

    async def scenario() -> None:
        async with AsyncGridQueue(settings=settings) as agq:
            job = await agq.submit("sim-llm", {"tokens": 12, "ms_per_token": 20})
            chunks = [chunk async for chunk in job.stream(timeout=60)]
            assert chunks == [f"tok{i}" for i in range(12)]
            result = await job.result(timeout=10)
            assert result["text"] == " ".join(chunks)
            failing = await agq.submit("sim-llm", {"tokens": -1}, workload="exclusive")
            with pytest.raises(JobFailed):
                await failing.result(timeout=60)
            with pytest.raises(JobFailed):
                async for _ in failing.stream(timeout=10):
                    pass
            with pytest.raises(JobNotFoundError):
                async for _ in AsyncJob(agq, "no-such-job").stream(timeout=1):
                    pass

    asyncio.run(scenario())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sse_server(settings: Settings) -> Iterator[str]:
    from examples.sse_stream import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(AsyncGridQueue(settings=settings)),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    give_up_at = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < give_up_at, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def read_events(response: httpx.Response) -> list[tuple[str, object]]:
    """(event name, JSON data) for each SSE event, as they arrive."""
    events: list[tuple[str, object]] = []
    name = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: ") :])))
            name = "message"
    return events


def test_sse_endpoint_streams_a_jobs_chunks(
    fleet: LocalFleet, gq: GridQueue, sse_server: str
) -> None:
    fleet.start_worker("w1")
    fleet.wait_alive(gq.ledger, ["w1"])
    with httpx.Client(base_url=sse_server, timeout=60) as http:
        job_id = http.post("/jobs", json={"model": "sim-llm", "payload": {"tokens": 8}}).json()[
            "id"
        ]
        with http.stream("GET", f"/jobs/{job_id}/stream") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = read_events(response)
        assert events == [("message", f"tok{i}") for i in range(8)] + [
            ("end", {"state": "SUCCEEDED"})
        ]
        failed = http.post(
            "/jobs", json={"model": "sim-llm", "payload": {"tokens": -1}, "workload": "exclusive"}
        ).json()["id"]
        with http.stream("GET", f"/jobs/{failed}/stream") as response:
            [(name, data)] = read_events(response)
        assert name == "end" and isinstance(data, dict) and data["state"] == "FAILED"
        assert http.get("/jobs/no-such-job/stream").status_code == 404
        assert http.post("/jobs", json={"model": "bad:name"}).status_code == 422
