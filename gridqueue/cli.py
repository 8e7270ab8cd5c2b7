"""The ``gridqueue`` command line. A thin edge: every command calls library functions."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn

import redis
import typer
from kombu.exceptions import OperationalError as BrokerError
from pydantic import ValidationError
from pydantic_settings import SettingsError
from redis.backoff import NoBackoff
from redis.retry import Retry
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gridqueue.connection import RedisTarget
from gridqueue.errors import ConfigError, GridQueueError, JobEndedError, RedisUnavailableError
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


# How long the first PING of a command may take to connect and answer.
REDIS_PING_TIMEOUT_S = 3.0


class _Target:
    """The Redis this command talks to, for the error line of a failure after the start."""

    redis_url: str | None = None


def load_settings(redis_url: str | None = None) -> Settings:
    """The settings of a command that talks to Redis, once Redis has answered a PING."""
    try:
        settings = Settings() if redis_url is None else Settings(redis_url=redis_url)
    except ValidationError as exc:
        raise ConfigError(f"invalid GRIDQUEUE_* setting: {settings_errors(exc)}") from exc
    except SettingsError as exc:
        raise ConfigError(
            f"invalid GRIDQUEUE_* setting (lists are JSON, e.g. [48, 79]): {exc}"
        ) from exc
    configure_logging(settings.log_level, settings.log_format)
    require_redis(settings.redis_target)
    require_broker(settings)
    return settings


def settings_errors(exc: ValidationError) -> str:
    """Each problem as ``GRIDQUEUE_NAME: why``, on one line."""
    parts = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        field = ".".join(str(part) for part in error["loc"])
        parts.append(f"GRIDQUEUE_{field.upper()}: {message}" if field else message)
    return "; ".join(parts)


def require_redis(target: str | RedisTarget) -> None:
    """Fail fast when Redis is unreachable at the start. The ledger retries Redis for 30 s,
    which rides out a blip in the middle of a run, but only delays a plain mistake. For a
    Sentinel set this asks the Sentinels for the primary, and pings it."""
    url = target if isinstance(target, str) else target.url
    _Target.redis_url = url
    try:
        client = (RedisTarget(target) if isinstance(target, str) else target).client(
            socket_connect_timeout=REDIS_PING_TIMEOUT_S,
            socket_timeout=REDIS_PING_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),
        )
    except ValueError as exc:
        raise ConfigError(
            f"invalid Redis URL {RedisUnavailableError.mask(url)} ({exc}); "
            "fix GRIDQUEUE_REDIS_URL or --redis"
        ) from exc
    try:
        client.ping()
    except redis.RedisError as exc:
        raise RedisUnavailableError(url, exc) from exc
    finally:
        client.close()


def require_broker(settings: Settings) -> None:
    """Fail fast, before anything is written, when the broker (RabbitMQ, with
    ``GRIDQUEUE_BROKER_URL``) does not answer or refuses the login; the ledger's Redis as
    the broker is covered by :func:`require_redis`."""
    settings.broker.check(REDIS_PING_TIMEOUT_S)


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
    probe: Annotated[
        str, typer.Option("--probe", help="GPU health probe: nvml, simulated or auto.")
    ] = "auto",
    sim_gpus: Annotated[int, typer.Option("--sim-gpus", min=1, help="Simulated GPUs.")] = 1,
    sim_gpu_memory_gb: Annotated[
        float, typer.Option("--sim-gpu-memory-gb", min=0.1, help="Memory of each simulated GPU.")
    ] = 80.0,
    sim_gpu_name: Annotated[str, typer.Option("--sim-gpu-name")] = "Simulated H100 80GB",
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
        probe_kind=probe,
        sim_gpus=sim_gpus,
        sim_gpu_name=sim_gpu_name,
        sim_gpu_memory_gb=sim_gpu_memory_gb,
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
    stream: Annotated[
        bool, typer.Option("--stream", help="Print the job's output chunks as they arrive.")
    ] = False,
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
    if stream:
        # One JSON chunk a line, as it arrives; then the outcome, as --wait prints it.
        print(json.dumps({"id": job.id}), flush=True)
        with contextlib.suppress(JobEndedError):
            for chunk in job.stream(timeout=timeout_s):
                print(json.dumps(chunk), flush=True)
        wait = True
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
def jobs(
    state: Annotated[str | None, typer.Option("--state", help="QUEUED, RUNNING, ...")] = None,
    model: Annotated[str | None, typer.Option("--model")] = None,
    workload: Annotated[str | None, typer.Option("--workload", help="A workload class.")] = None,
    worker: Annotated[str | None, typer.Option("--worker", help="Jobs it ran.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500)] = 50,
    cursor: Annotated[str | None, typer.Option("--cursor", help="next_cursor.")] = None,
    redis_url: RedisOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first, as the dashboard's /api/jobs does (same filters)."""
    from gridqueue.ledger import Ledger
    from gridqueue.monitor.views import FleetView

    view = FleetView(Ledger.connect(load_settings(redis_url)))
    try:
        page = view.jobs(state, model, workload, worker, limit, cursor)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if as_json:
        _print_json(page)
        return
    table = Table(title=f"jobs ({len(page['jobs'])})")
    for column in ("job", "state", "model", "workload", "attempt", "worker", "reason"):
        table.add_column(column)
    for j in page["jobs"]:
        table.add_row(
            j["id"], j["state"], j["model"], j["workload"], str(j["attempt"]),
            j["worker"] or "-", j["reason"] or "",
        )  # fmt: skip
    console.print(table)
    if page["next_cursor"]:
        console.print(f"more: --cursor {page['next_cursor']}")


@app.command()
def failovers(
    limit: Annotated[int, typer.Option("--limit", min=1, max=500)] = 20,
    redis_url: RedisOption = None,
    as_json: JsonOption = False,
) -> None:
    """Failover incidents, newest first: the fault, the verdict, the jobs moved and how
    long until they ran again (the dashboard's /api/failovers)."""
    from gridqueue.ledger import Ledger
    from gridqueue.monitor.views import FleetView

    incidents = FleetView(Ledger.connect(load_settings(redis_url))).failovers(limit)
    if as_json:
        _print_json(incidents)
        return
    table = Table(title=f"failovers ({len(incidents)})")
    for column in ("kind", "worker", "reason", "detect", "moved", "running again", "pending"):
        table.add_column(column)
    for i in incidents:
        again = "-" if i["running_again_ms"] is None else f"{i['running_again_ms']} ms"
        table.add_row(
            i["kind"], i["worker"], i["reason"], f"{i['detect_ms']} ms", str(i["jobs_moved"]),
            again, str(i["pending"]),
        )  # fmt: skip
    console.print(table)


fault_app = typer.Typer(help="Inject simulated GPU faults into a running worker.")
app.add_typer(fault_app, name="fault")


@fault_app.command("inject")
def fault_inject(
    worker: Annotated[str, typer.Option("--worker", help="Worker name.")],
    xid: Annotated[int | None, typer.Option("--xid", help="Raise this Xid code.")] = None,
    gpu_lost: Annotated[
        bool, typer.Option("--gpu-lost", help="The GPU falls off the bus.")
    ] = False,
    ecc_dbe: Annotated[bool, typer.Option("--ecc-dbe", help="A double-bit ECC error.")] = False,
    temperature: Annotated[
        float | None, typer.Option("--temperature", help="GPU temperature, C.")
    ] = None,
    nvml_hang: Annotated[bool, typer.Option("--nvml-hang", help="Every NVML call hangs.")] = False,
    gpu: Annotated[int, typer.Option("--gpu", min=0, help="GPU index.")] = 0,
    redis_url: RedisOption = None,
) -> None:
    """Inject a fault into a worker that runs the simulated probe."""
    from gridqueue.faults import inject_fault
    from gridqueue.probes.simulated import Fault

    chosen = [xid is not None, gpu_lost, ecc_dbe, temperature is not None, nvml_hang]
    if sum(chosen) != 1:
        raise ConfigError(
            "choose exactly one fault: --xid CODE, --gpu-lost, --ecc-dbe, --temperature C "
            "or --nvml-hang"
        )
    fault = Fault(
        xid=(xid,) if xid is not None else (),
        gpu_lost=gpu_lost,
        ecc_dbe=ecc_dbe,
        temperature_c=temperature,
        nvml_hang=nvml_hang,
    )
    inject_fault(load_settings(redis_url), worker, gpu, fault)
    console.print(f"injected into {worker} gpu {gpu}: {fault.to_dict()}")


@fault_app.command("clear")
def fault_clear(
    worker: Annotated[str, typer.Option("--worker", help="Worker name.")],
    redis_url: RedisOption = None,
) -> None:
    """Clear every injected fault of a worker."""
    from gridqueue.faults import clear_faults

    clear_faults(load_settings(redis_url), worker)
    console.print(f"cleared faults of {worker}")


dlq_app = typer.Typer(help="Dead-lettered (poison) jobs.")
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    count: Annotated[int, typer.Option("--count", min=1)] = 100,
    redis_url: RedisOption = None,
    as_json: JsonOption = False,
) -> None:
    """List dead-lettered jobs, newest first, with the evidence."""
    from gridqueue.client import GridQueue

    records = GridQueue(settings=load_settings(redis_url)).dead_letters(count)
    if as_json:
        _print_json([r.to_dict() for r in records])
        return
    table = Table(title=f"dead letters ({len(records)})")
    for column in ("job", "model", "reason", "evidence"):
        table.add_column(column)
    for r in records:
        table.add_row(r.id, r.model, r.reason or "", r.error or "")
    console.print(table)


@dlq_app.command("replay")
def dlq_replay(job_id: str, redis_url: RedisOption = None) -> None:
    """Replay a dead-lettered job as a fresh attempt chain."""
    from gridqueue.client import GridQueue

    GridQueue(settings=load_settings(redis_url)).replay(job_id, by=_operator())
    console.print(f"replayed {job_id}")


def _operator() -> str:
    import getpass
    import socket

    return f"operator:{getpass.getuser()}@{socket.gethostname()}"


@app.command()
def quarantine(
    name: str,
    reason: Annotated[str, typer.Option("--reason", help="Why; recorded with who.")],
    redis_url: RedisOption = None,
) -> None:
    """Quarantine a worker: no new work, and its running attempts move elsewhere now."""
    from gridqueue.ledger import Ledger

    moved = Ledger.connect(load_settings(redis_url)).quarantine(name, _operator(), reason)
    console.print(f"quarantined {name}; {moved} running attempt(s) moved")


@app.command()
def drain(
    name: str,
    reason: Annotated[str, typer.Option("--reason")] = "drain",
    redis_url: RedisOption = None,
) -> None:
    """Drain a worker: no new work; its running attempts finish where they are."""
    from gridqueue.ledger import Ledger

    Ledger.connect(load_settings(redis_url)).quarantine(name, _operator(), reason, drain=True)
    console.print(f"draining {name}")


@app.command()
def release(name: str, redis_url: RedisOption = None) -> None:
    """Re-admit a quarantined (or probationary) worker now."""
    from gridqueue.ledger import Ledger

    if Ledger.connect(load_settings(redis_url)).release(name, _operator()):
        console.print(f"released {name}")
    else:
        console.print(f"{name} was not quarantined")


@app.command()
def status(redis_url: RedisOption = None, as_json: JsonOption = False) -> None:
    """Workers (state, heartbeat age, running attempts) and job counts by state."""
    from gridqueue.client import GridQueue
    from gridqueue.health import monitoring_notices
    from gridqueue.probes import GpuReading

    overview = GridQueue(settings=load_settings(redis_url)).status()
    if as_json:
        _print_json(overview)
        return
    table = Table(title="workers")
    for column in ("name", "state", "verdict", "heartbeat age", "running", "gpus", "reasons"):
        table.add_column(column)
    for w in overview["workers"]:
        age = "-" if w["heartbeat_age_ms"] is None else f"{w['heartbeat_age_ms'] / 1000:.1f} s"
        gpus = "\n".join(_gpu_headline(g) for g in w["gpus"])
        reasons = ", ".join(w["reasons"])
        notices = monitoring_notices(GpuReading.from_dict(g) for g in w["gpus"])
        if notices:  # monitoring gaps, not faults
            reasons = f"{reasons} (gap: {', '.join(notices)})".strip()
        if w["quarantine_reason"]:
            reasons = f"{reasons} [{w['quarantined_by']}: {w['quarantine_reason']}]".strip()
        table.add_row(
            w["name"], w["state"], w["verdict"] or "-", age, str(len(w["running"])), gpus, reasons
        )
    console.print(table)
    placements = overview["placements"]
    console.print(
        f"first placements: {placements['first']}, bad (gpu_fault/worker_lost): "
        f"{placements['bad']} ({placements['bad_rate']:.1%})"
    )
    jobs = Table(title="jobs")
    jobs.add_column("state")
    jobs.add_column("count", justify="right")
    for state, count in overview["jobs"].items():
        jobs.add_row(state, str(count))
    console.print(jobs)
    if overview["stats"]:
        console.print("counters: " + ", ".join(f"{k}={v}" for k, v in overview["stats"].items()))


@app.command()
def dashboard(
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 8555,
    redis_url: RedisOption = None,
) -> None:
    """Serve the live dashboard, its JSON API (/api, /openapi.json) and /metrics."""
    import uvicorn

    from gridqueue.monitor.web import create_app

    settings = load_settings(redis_url)
    _check_can_listen(host, port)
    token = settings.dashboard_token
    if token is None or not token.get_secret_value().strip():
        mode = "read-only: set GRIDQUEUE_DASHBOARD_TOKEN to enable actions"
    else:
        mode = "actions need the GRIDQUEUE_DASHBOARD_TOKEN bearer token"
    where = f"[{host}]" if ":" in host else host
    err_console.print(
        f"gridqueue dashboard on http://{where}:{port}/ ({mode})", soft_wrap=True, highlight=False
    )
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,  # keep gridqueue's logging; uvicorn reports only its warnings
        log_level=settings.log_level.lower(),
        access_log=False,
        # Live pages hold their streams open: a stop must not wait for them to close.
        timeout_graceful_shutdown=2,
    )


def _check_can_listen(host: str, port: int) -> None:
    """A port in use is one line and exit 2, like every other mistake, not a traceback."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc}); check --host") from exc
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another "
                "--port or --host"
            ) from exc


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


def _gpu_headline(gpu: dict[str, Any]) -> str:
    parts = [f"#{gpu.get('index')}"]
    if gpu.get("lost"):
        return f"#{gpu.get('index')} LOST"
    if gpu.get("temperature_c") is not None:
        parts.append(f"{gpu['temperature_c']:.0f}C")
    if gpu.get("utilization_ratio") is not None:
        parts.append(f"{gpu['utilization_ratio']:.0%}")
    used, total = gpu.get("memory_used_bytes"), gpu.get("memory_total_bytes")
    if used is not None and total:
        parts.append(f"{used / 2**30:.0f}/{total / 2**30:.0f} GiB")
    if gpu.get("power_w") is not None:
        parts.append(f"{gpu['power_w']:.0f} W")
    return " ".join(parts)


@app.command()
def drill(
    duration_s: Annotated[float, typer.Option("--duration", min=5, help="Seconds of load.")] = 60.0,
    rate: Annotated[float, typer.Option("--rate", min=0.1, help="Jobs per second.")] = 4.0,
    workers: Annotated[int, typer.Option("--workers", min=2)] = 5,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1)] = 2,
    faults: Annotated[
        str,
        typer.Option(
            "--faults",
            help="Mix, comma-separated: kill9,child,zombie,stall,gpu,taken,partition,leader,redis.",
        ),
    ] = "kill9,child,zombie,stall,gpu,taken,partition,leader,redis",
    fault_interval_s: Annotated[float, typer.Option("--fault-interval", min=1.0)] = 8.0,
    target: Annotated[
        list[str] | None, typer.Option("--target", help="Existing worker for GPU faults.")
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option("--redis", help="Run against this Redis (default: a private one)."),
    ] = None,
    watchdog: Annotated[
        bool | None, typer.Option("--watchdog/--no-watchdog", help="Start watchdogs.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed")] = 1,
    drain_s: Annotated[
        float, typer.Option("--drain", min=1.0, help="After the load, seconds for jobs to end.")
    ] = 150.0,
    partition_s: Annotated[
        float, typer.Option("--partition", min=0.1, help="How long a partition lasts.")
    ] = 3.0,
    redis_down_s: Annotated[
        float, typer.Option("--redis-down", min=0.0, help="How long Redis stays down.")
    ] = 1.0,
    log_dir: Annotated[
        Path | None, typer.Option("--logs", help="Keep the fleet's logs in this folder.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run a fault drill: load, scheduled faults, and a report. Exits 1 unless the contract
    held: nothing lost, no duplicate visible result, no exclusive job run twice, no job
    stuck."""
    from gridqueue.drill import DrillPlan, print_report, run_drill

    plan = DrillPlan(
        duration_s=duration_s,
        rate_per_s=rate,
        workers=workers,
        concurrency=concurrency,
        fault_interval_s=fault_interval_s,
        faults=tuple(f.strip() for f in faults.split(",") if f.strip()),
        seed=seed,
        targets=tuple(target or ()),
        drain_s=drain_s,
        partition_s=partition_s,
        redis_down_s=redis_down_s,
        log_dir=log_dir,
    )
    configure_logging("WARNING", "json")
    out = err_console if as_json else console
    start_watchdog = watchdog if watchdog is not None else redis_url is None
    if redis_url is not None:
        require_redis(redis_url)
    report = run_drill(plan, redis_url, start_watchdog, out)
    print_report(report, out)
    if as_json:
        _print_json(report)
    if not report["passed"]:
        raise typer.Exit(1)


def _fail(exc: GridQueueError) -> NoReturn:
    # soft_wrap: a message is never broken over lines; escape: "[realtime]" is text.
    err_console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True, highlight=False)
    sys.exit(2)


def main() -> None:
    """The ``gridqueue`` command: a gridqueue error, or a Redis that cannot be reached, is one
    line on stderr and exit status 2, never a traceback."""
    try:
        app()
    except GridQueueError as exc:
        _fail(exc)
    except (redis.ConnectionError, redis.TimeoutError, BrokerError) as exc:
        # Redis went away after the first PING, and the ledger's retries ran out.
        _fail(RedisUnavailableError(_Target.redis_url, exc))


if __name__ == "__main__":
    main()
