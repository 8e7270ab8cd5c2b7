"""The ``gridqueue`` command line. A thin edge: every command calls library functions."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from gridqueue.errors import ConfigError, GridQueueError, JobEndedError
from gridqueue.logs import configure_logging
from gridqueue.settings import Settings

app = typer.Typer(
    help="gridqueue: failover for GPU inference on Celery and Redis.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

RedisOption = Annotated[
    str | None,
    typer.Option("--redis", help="Redis URL (default: GRIDQUEUE_REDIS_URL)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def load_settings(redis_url: str | None = None) -> Settings:
    try:
        settings = Settings() if redis_url is None else Settings(redis_url=redis_url)
    except ValidationError as exc:
        raise ConfigError(f"invalid GRIDQUEUE_* setting:\n{exc}") from exc
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


@app.command()
def worker(
    name: Annotated[str, typer.Option("--name", help="Unique worker name.")],
    models: Annotated[str, typer.Option("--models", help="Models served, comma-separated.")],
    handlers: Annotated[
        str, typer.Option("--handlers", help="Handler modules to import, comma-separated.")
    ] = "workers.simulated",
    concurrency: Annotated[int, typer.Option("--concurrency", min=1)] = 2,
    redis_url: RedisOption = None,
    loglevel: Annotated[str, typer.Option("--loglevel")] = "INFO",
) -> None:
    """Run a GPU worker: a Celery worker with the gridqueue agent."""
    from gridqueue.worker import run_worker

    settings = load_settings(redis_url)
    run_worker(
        name=name,
        models=[m.strip() for m in models.split(",") if m.strip()],
        handler_modules=[h.strip() for h in handlers.split(",") if h.strip()],
        concurrency=concurrency,
        settings=settings,
        loglevel=loglevel,
    )


@app.command()
def watchdog(redis_url: RedisOption = None) -> None:
    """Run a watchdog. Start two or more: one leads, the others stand by."""
    from gridqueue.watchdog import Watchdog

    settings = load_settings(redis_url)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    Watchdog(settings).run(stop)


@app.command()
def submit(
    model: Annotated[str, typer.Argument(help="Model name, e.g. sim-llm.")],
    payload: Annotated[str, typer.Option("--payload", help="JSON payload.")] = "{}",
    workload: Annotated[str, typer.Option("--workload")] = "realtime",
    deadline_s: Annotated[float | None, typer.Option("--deadline")] = None,
    idempotency_key: Annotated[str | None, typer.Option("--idempotency-key")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result.")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout")] = 60.0,
    redis_url: RedisOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit one job from the shell."""
    from gridqueue.client import GridQueue, payload_from_json

    gq = GridQueue(settings=load_settings(redis_url))
    job = gq.submit(
        model,
        payload_from_json(payload),
        workload=workload,
        deadline_s=deadline_s,
        idempotency_key=idempotency_key,
    )
    out: dict[str, Any] = {"id": job.id, "created": job.created}
    if wait:
        with contextlib.suppress(JobEndedError):
            out["result"] = job.result(timeout_s)
        out["record"] = gq.get(job.id).to_dict()
        out["state"] = out["record"]["state"]
    if as_json or wait:
        _print_json(out)
    else:
        console.print(job.id)
    if wait and out["state"] != "SUCCEEDED":
        raise typer.Exit(1)


@app.command()
def job(job_id: str, redis_url: RedisOption = None) -> None:
    """Show one job's record (JSON): state, attempts, result or error."""
    from gridqueue.client import GridQueue

    _print_json(GridQueue(settings=load_settings(redis_url)).get(job_id).to_dict())


@app.command()
def cancel(job_id: str, redis_url: RedisOption = None) -> None:
    """Cancel a job; its running attempt is killed."""
    from gridqueue.client import GridQueue

    gq = GridQueue(settings=load_settings(redis_url))
    if gq.job(job_id).cancel():
        console.print(f"cancelled {job_id}")
    else:
        console.print(f"{job_id} had already ended: {gq.get(job_id).state.value}")


@app.command()
def status(redis_url: RedisOption = None, as_json: JsonOption = False) -> None:
    """Workers (state, heartbeat age, running attempts) and job counts by state."""
    from gridqueue.client import GridQueue

    overview = GridQueue(settings=load_settings(redis_url)).status()
    if as_json:
        _print_json(overview)
        return
    table = Table(title="workers")
    for column in ("name", "state", "models", "heartbeat age", "running"):
        table.add_column(column)
    for w in overview["workers"]:
        age = "-" if w["heartbeat_age_ms"] is None else f"{w['heartbeat_age_ms'] / 1000:.1f} s"
        table.add_row(w["name"], w["state"], ",".join(w["models"]), age, str(len(w["running"])))
    console.print(table)
    jobs = Table(title="jobs")
    jobs.add_column("state")
    jobs.add_column("count", justify="right")
    for state, count in overview["jobs"].items():
        jobs.add_row(state, str(count))
    console.print(jobs)
    if overview["stats"]:
        console.print("counters: " + ", ".join(f"{k}={v}" for k, v in overview["stats"].items()))


@app.command()
def demo(
    jobs: Annotated[int, typer.Option("--jobs", min=1, help="Jobs to submit.")] = 60,
    workers: Annotated[int, typer.Option("--workers", min=2)] = 3,
    as_json: JsonOption = False,
) -> None:
    """Start a local fleet, kill -9 a busy worker, and show every job still ending once."""
    from gridqueue.demo import run_demo

    report = run_demo(jobs=jobs, workers=workers, console=err_console if as_json else console)
    if as_json:
        _print_json(report)
    if report["lost"] or report["duplicates"]:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except GridQueueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
